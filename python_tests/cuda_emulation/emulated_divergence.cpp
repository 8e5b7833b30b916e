// The CUDA divergence kernels (csrc/cuda/divergence.cu), compiled for the CPU through the
// emulation headers beside this file, exposed to Python for test_cuda_emulated.py.
#include <torch/extension.h>

#define KDKERNELS_CUDA_EMULATION 1
#include "divergence.cu"
#include "divergence_args.h"

std::vector<at::Tensor> emulated_divergence_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                const at::Tensor& row_weight, int64_t mode, bool swap,
                                                double mix, double temperature, double taid,
                                                bool grad_student, bool grad_teacher) {
  auto c = kdkernels::cuda::prepare_divergence_call(student, teacher, row_weight, mode, swap, mix,
                                                    temperature, taid, grad_student, grad_teacher);
  TORCH_CHECK(kdkernels::cuda::divergence_fwd(c.args, nullptr) == cudaSuccess, "launch failed");
  return {c.loss_rows, c.grad_student, c.grad_teacher};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("divergence_fwd", &emulated_divergence_fwd); }
