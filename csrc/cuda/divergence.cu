// The CUDA divergence launcher (divergence.cuh's divergence_fwd): checks the call and hands it
// to its mode's kernels (divergence_kernels.cuh, instantiated in divergence_<mode>.cu).
#include "divergence_kernels.cuh"

namespace kdkernels::cuda {

cudaError_t divergence_fwd(const DivergenceArgs& a, cudaStream_t stream) {
  if (a.n_rows == 0) return cudaSuccess;
  if (a.n_rows > 0x7fffffff || a.vocab < 1 || a.vocab > kMaxVocab) return cudaErrorInvalidValue;
  switch (a.mode) {
    case kKL: return launch_mode<kKL>(a, stream);
    case kSkew: return launch_mode<kSkew>(a, stream);
    case kJSD: return launch_mode<kJSD>(a, stream);
    case kTVD: return launch_mode<kTVD>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kdkernels::cuda
