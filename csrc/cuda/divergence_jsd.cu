// The CUDA divergence kernels of mode kJSD (csrc/cuda/divergence_kernels.cuh), a translation unit
// of their own so that the four modes compile side by side.
#include "divergence_kernels.cuh"

template cudaError_t kdkernels::cuda::launch_mode<kdkernels::cuda::kJSD>(
    const kdkernels::cuda::DivergenceArgs&, cudaStream_t);
