// kdkernels::divergence_fwd for CUDA tensors: checks, allocation, the launch on torch's current
// stream. Uses only ATen / c10 core headers (the stream through c10's device-guard
// interface), so it also compiles against a CPU-only torch (KDKERNELS_FORCE_CUDA=1 builds).
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "divergence.cuh"

namespace kdkernels::cuda {
namespace {

DType to_dtype(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "kdkernels.divergence_fwd (cuda): ", name,
                  " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

at::ScalarType to_scalar_type(DType t) {
  return t == DType::kFloat32 ? at::kFloat : t == DType::kBFloat16 ? at::kBFloat16 : at::kHalf;
}

void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "kdkernels.divergence_fwd (cuda): ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "kdkernels.divergence_fwd: ", name, " must be (N, V), got ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "kdkernels.divergence_fwd: ", name,
              " must have unit stride along V");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_weight,
    int64_t mode, bool swap, double mix, double temperature, double taid, bool reduce,
    bool grad_student, bool grad_teacher) {
  check_logits(student, "student");
  check_logits(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "kdkernels.divergence_fwd: shapes differ");
  TORCH_CHECK(student.device() == teacher.device(), "kdkernels.divergence_fwd: devices differ");
  TORCH_CHECK(mode >= kKL && mode <= kTVD, "kdkernels.divergence_fwd: unknown mode ", mode);
  const c10::DeviceGuard guard(student.device());
  const int64_t n = student.size(0), v = student.size(1);
  const at::Tensor w = row_weight.to(student.device(), at::kFloat).contiguous();
  TORCH_CHECK(w.dim() == 1 && w.size(0) == n, "kdkernels.divergence_fwd: row_weight must be (N,)");

  DivergenceArgs a{};
  a.student_dtype = to_dtype(student, "student");
  a.teacher_dtype = to_dtype(teacher, "teacher");
  const auto gs_opt = student.options().dtype(to_scalar_type(grad_dtype(a.student_dtype)));
  const auto gt_opt = teacher.options().dtype(to_scalar_type(grad_dtype(a.teacher_dtype)));
  at::Tensor loss_rows = at::empty({n}, student.options().dtype(at::kFloat));
  const std::vector<int64_t> full{n, v}, none{0};
  at::Tensor gs = at::empty(grad_student ? full : none, gs_opt);
  at::Tensor gt = at::empty(grad_teacher ? full : none, gt_opt);

  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.student_stride = student.stride(0);
  a.teacher_stride = teacher.stride(0);
  a.grad_student = grad_student ? gs.data_ptr() : nullptr;
  a.grad_teacher = grad_teacher ? gt.data_ptr() : nullptr;
  a.row_weight = w.data_ptr<float>();
  a.loss_rows = loss_rows.data_ptr<float>();
  a.n_rows = n;
  a.vocab = v;
  a.mode = static_cast<int32_t>(mode);
  a.swap = swap;
  a.taid = taid != 1.0;
  a.mix = static_cast<float>(mix);
  a.temperature = static_cast<float>(temperature);
  a.lam = static_cast<float>(taid);
  switch (mode) {  // gradient coefficients (csrc/cpu/divergence.cpp has the same table)
    case kKL: a.c_p = 1.f; a.c_q = 1.f; break;
    case kSkew: a.c_p = 1.f; a.c_q = -(1.f - a.mix); break;
    case kJSD: a.c_p = a.mix; a.c_q = 1.f - a.mix; break;
    default: a.c_p = 0.5f; a.c_q = -0.5f;
  }
  a.gs_factor = static_cast<float>(1.0 / temperature);
  a.gt_factor = static_cast<float>(taid / temperature);

  const c10::Stream stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(student.device());
  const cudaError_t err = divergence_fwd(a, static_cast<cudaStream_t>(stream.native_handle()));
  TORCH_CHECK(err == cudaSuccess, "kdkernels.divergence_fwd (cuda): launch failed: ",
              cudaGetErrorString(err));
  at::Tensor loss = reduce ? loss_rows.sum() : loss_rows;
  return {loss, gs, gt};
}

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) { m.impl("divergence_fwd", &divergence_fwd_cuda); }

}  // namespace kdkernels::cuda
