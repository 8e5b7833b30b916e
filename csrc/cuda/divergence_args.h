// From ATen tensors to the CUDA launcher's arguments: checks, output allocation, the
// coefficient table. Shared by the torch glue (divergence_glue.cpp) and the CPU emulation
// that tests the kernels' logic (python_tests/cuda_emulation/). ATen core headers only.
#pragma once
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

#include "divergence.cuh"
#include "../divergence_common.h"

namespace kdkernels::cuda {

inline DType to_dtype(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "kdkernels.divergence_fwd (cuda): ", name,
                  " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

inline at::ScalarType to_scalar_type(DType t) {
  return t == DType::kFloat32 ? at::kFloat : t == DType::kBFloat16 ? at::kBFloat16 : at::kHalf;
}

struct PreparedCall {
  DivergenceArgs args;
  at::Tensor loss_rows, grad_student, grad_teacher, row_weight;
};

inline void check_logits(const at::Tensor& student, const at::Tensor& teacher, int64_t mode) {
  for (const auto* x : {&student, &teacher}) {
    TORCH_CHECK(x->dim() == 2, "kdkernels.divergence_fwd: logits must be (N, V), got ", x->sizes());
    TORCH_CHECK(x->size(1) <= 1 || x->stride(1) == 1,
                "kdkernels.divergence_fwd: logits must have unit stride along V");
  }
  TORCH_CHECK(student.sizes() == teacher.sizes(), "kdkernels.divergence_fwd: shapes differ");
  TORCH_CHECK(student.size(1) <= kMaxVocab, "kdkernels.divergence_fwd (cuda): rows of at most ",
              kMaxVocab, " logits, got ", student.size(1));
  TORCH_CHECK(student.device() == teacher.device(), "kdkernels.divergence_fwd: devices differ");
  TORCH_CHECK(mode >= kKL && mode <= kTVD, "kdkernels.divergence_fwd: unknown mode ", mode);
}

inline void check_out(const at::Tensor& g, const at::Tensor& input, DType dtype, const char* name) {
  TORCH_CHECK(g.device() == input.device() && g.sizes() == input.sizes() && g.is_contiguous() &&
                  g.scalar_type() == to_scalar_type(dtype),
              "kdkernels.divergence_rows_out: ", name, " must be contiguous, on ", input.device(),
              ", shaped ", input.sizes(), " in ", to_scalar_type(dtype), "; got ", g.sizes(), " ",
              g.scalar_type());
}

// Fills the args for (N, V) logits and the caller's outputs: loss_rows (N,) float32 and
// contiguous (N, V) gradients in grad_dtype(input), or undefined tensors for gradients not
// wanted. A gradient may be its own (contiguous) logits: each thread reads its elements of a
// row before it writes their gradient (the last sweep reads and writes the same elements).
inline DivergenceArgs divergence_args(const at::Tensor& student, const at::Tensor& teacher,
                                      const at::Tensor& row_weight, int64_t mode, bool swap,
                                      double mix, double temperature, double taid,
                                      const at::Tensor& loss_rows, const at::Tensor& grad_student,
                                      const at::Tensor& grad_teacher) {
  check_logits(student, teacher, mode);
  const int64_t n = student.size(0), v = student.size(1);
  TORCH_CHECK(row_weight.dim() == 1 && row_weight.size(0) == n &&
                  row_weight.scalar_type() == at::kFloat && row_weight.is_contiguous() &&
                  row_weight.device() == student.device(),
              "kdkernels.divergence_fwd: row_weight must be a contiguous float32 (N,) beside the logits");
  TORCH_CHECK(loss_rows.dim() == 1 && loss_rows.size(0) == n &&
                  loss_rows.scalar_type() == at::kFloat && loss_rows.is_contiguous() &&
                  loss_rows.device() == student.device(),
              "kdkernels.divergence_rows_out: loss_rows must be a contiguous float32 (N,)");
  DivergenceArgs a{};
  a.student_dtype = to_dtype(student, "student");
  a.teacher_dtype = to_dtype(teacher, "teacher");
  if (grad_student.defined()) check_out(grad_student, student, grad_dtype(a.student_dtype), "grad_student");
  if (grad_teacher.defined()) check_out(grad_teacher, teacher, grad_dtype(a.teacher_dtype), "grad_teacher");
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.student_stride = student.stride(0);
  a.teacher_stride = teacher.stride(0);
  a.grad_student = grad_student.defined() ? grad_student.data_ptr() : nullptr;
  a.grad_teacher = grad_teacher.defined() ? grad_teacher.data_ptr() : nullptr;
  a.row_weight = row_weight.data_ptr<float>();
  a.loss_rows = loss_rows.data_ptr<float>();
  a.n_rows = n;
  a.vocab = v;
  fill_divergence_scalars(a, mode, swap, mix, temperature, taid);
  return a;
}

// Checks the (N, V) logits, allocates the outputs on the logits' device and fills the args.
inline PreparedCall prepare_divergence_call(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_weight,
    int64_t mode, bool swap, double mix, double temperature, double taid, bool grad_student,
    bool grad_teacher) {
  check_logits(student, teacher, mode);
  const int64_t n = student.size(0), v = student.size(1);
  PreparedCall c;
  c.row_weight = row_weight.to(student.device(), at::kFloat).contiguous();
  TORCH_CHECK(c.row_weight.dim() == 1 && c.row_weight.size(0) == n,
              "kdkernels.divergence_fwd: row_weight must be (N,)");
  const DType sd = to_dtype(student, "student"), td = to_dtype(teacher, "teacher");
  const auto gs_opt = student.options().dtype(to_scalar_type(grad_dtype(sd)));
  const auto gt_opt = teacher.options().dtype(to_scalar_type(grad_dtype(td)));
  const std::vector<int64_t> full{n, v}, none{0};
  c.loss_rows = at::empty({n}, student.options().dtype(at::kFloat));
  c.grad_student = at::empty(grad_student ? full : none, gs_opt);
  c.grad_teacher = at::empty(grad_teacher ? full : none, gt_opt);
  c.args = divergence_args(student, teacher, c.row_weight, mode, swap, mix, temperature, taid,
                           c.loss_rows, grad_student ? c.grad_student : at::Tensor(),
                           grad_teacher ? c.grad_teacher : at::Tensor());
  return c;
}

}  // namespace kdkernels::cuda
