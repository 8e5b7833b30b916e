// kdkernels::divergence_fwd for CUDA tensors: the launch on torch's current stream. Uses only
// ATen / c10 core headers (the stream through c10's device-guard interface), so it also
// compiles against a CPU-only torch (KDKERNELS_FORCE_CUDA=1 builds).
#include <cstdlib>
#include <optional>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "divergence_args.h"

namespace kdkernels::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_weight,
    int64_t mode, bool swap, double mix, double temperature, double taid, bool reduce,
    bool grad_student, bool grad_teacher) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda(),
              "kdkernels.divergence_fwd (cuda): logits must be CUDA tensors");
  const c10::DeviceGuard guard(student.device());
  PreparedCall c = prepare_divergence_call(student, teacher, row_weight, mode, swap, mix,
                                           temperature, taid, grad_student, grad_teacher);
  // KDKERNELS_CUDA_SMEM_ROW_BUDGET (bytes per block, e.g. 98304) opts into the cluster kernel
  // on sm_90+ (see divergence.cuh); unset or 0 = the streaming kernel.
  if (const char* budget = std::getenv("KDKERNELS_CUDA_SMEM_ROW_BUDGET")) {
    c.args.smem_row_budget = std::strtoll(budget, nullptr, 10);
  }
  const c10::Stream stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(student.device());
  const cudaError_t err = divergence_fwd(c.args, static_cast<cudaStream_t>(stream.native_handle()));
  TORCH_CHECK(err == cudaSuccess, "kdkernels.divergence_fwd (cuda): launch failed: ",
              cudaGetErrorString(err));
  at::Tensor loss = reduce ? c.loss_rows.sum() : c.loss_rows;
  return {loss, c.grad_student, c.grad_teacher};
}

void divergence_rows_out_cuda(const at::Tensor& student, const at::Tensor& teacher,
                              const at::Tensor& row_weight, int64_t mode, bool swap, double mix,
                              double temperature, double taid, at::Tensor loss_rows,
                              const std::optional<at::Tensor>& grad_student,
                              const std::optional<at::Tensor>& grad_teacher) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda(),
              "kdkernels.divergence_rows_out (cuda): logits must be CUDA tensors");
  const c10::DeviceGuard guard(student.device());
  const DivergenceArgs a = divergence_args(student, teacher, row_weight, mode, swap, mix,
                                           temperature, taid, loss_rows,
                                           grad_student.value_or(at::Tensor()),
                                           grad_teacher.value_or(at::Tensor()));
  const c10::Stream stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(student.device());
  const cudaError_t err = divergence_fwd(a, static_cast<cudaStream_t>(stream.native_handle()));
  TORCH_CHECK(err == cudaSuccess, "kdkernels.divergence_rows_out (cuda): launch failed: ",
              cudaGetErrorString(err));
}

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("divergence_fwd", &divergence_fwd_cuda);
  m.impl("divergence_rows_out", &divergence_rows_out_cuda);
}

}  // namespace kdkernels::cuda
