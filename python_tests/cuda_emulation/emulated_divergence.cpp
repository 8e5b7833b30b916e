// The CUDA divergence kernels (csrc/cuda/divergence*.cu), compiled for the CPU through the
// emulation headers beside this file (KDKERNELS_CUDA_EMULATION is defined on the command
// line), exposed to Python for test_cuda_emulated.py. Each mode's kernels compile in a
// translation unit of their own, as on the GPU (emulated_<mode>.cpp), side by side.
#include <torch/extension.h>

#include "divergence.cu"
#include "divergence_args.h"

std::vector<at::Tensor> emulated_divergence_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                const at::Tensor& row_weight, int64_t mode, bool swap,
                                                double mix, double temperature, double taid,
                                                bool grad_student, bool grad_teacher,
                                                int64_t smem_row_budget) {
  auto c = kdkernels::cuda::prepare_divergence_call(student, teacher, row_weight, mode, swap, mix,
                                                    temperature, taid, grad_student, grad_teacher);
  c.args.smem_row_budget = smem_row_budget;  // which kernel: see csrc/cuda/divergence.cu
  TORCH_CHECK(kdkernels::cuda::divergence_fwd(c.args, nullptr) == cudaSuccess, "launch failed");
  return {c.loss_rows, c.grad_student, c.grad_teacher};
}

// kdkernels::divergence_rows_out's launch into the caller's buffers (a gradient may be its own
// logits: in place), for the fused-linear tests.
void emulated_divergence_rows_out(const at::Tensor& student, const at::Tensor& teacher,
                                  const at::Tensor& row_weight, int64_t mode, bool swap, double mix,
                                  double temperature, double taid, const at::Tensor& loss_rows,
                                  const at::Tensor& grad_student, int64_t smem_row_budget) {
  auto a = kdkernels::cuda::divergence_args(student, teacher, row_weight, mode, swap, mix,
                                            temperature, taid, loss_rows, grad_student, at::Tensor());
  a.smem_row_budget = smem_row_budget;
  TORCH_CHECK(kdkernels::cuda::divergence_fwd(a, nullptr) == cudaSuccess, "launch failed");
}

// The number of cluster ranks the launcher plans for a row (0: the streaming kernel).
int64_t cluster_ranks(int64_t vocab, int64_t student_elem, int64_t teacher_elem, int64_t vec,
                      int64_t n_rows, int64_t budget) {
  return kdkernels::cuda::detail::plan_cluster(vocab, student_elem, teacher_elem, static_cast<int>(vec),
                                       n_rows, budget).ranks;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("divergence_fwd", &emulated_divergence_fwd);
  m.def("cluster_ranks", &cluster_ranks);
  m.def("divergence_rows_out", &emulated_divergence_rows_out);
}
