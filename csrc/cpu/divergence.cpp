// kdkernels::divergence_fwd for CPU tensors: checks, allocation, the choice of the row
// kernel's instruction set, and the parallel loop over rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstdlib>
#include <cstring>
#include <optional>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <torch/library.h>

#include "divergence.h"
#include "../divergence_common.h"

namespace kdkernels::cpu {
namespace {

DivergenceRowsFn pick_rows_fn_once() {
  // The widest instruction set the CPU has; ATEN_CPU_CAPABILITY=avx2|default caps it, as in ATen.
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  const bool allow512 = !cap || std::strcmp(cap, "avx512") == 0;
  const bool allow2 = allow512 || std::strcmp(cap, "avx2") == 0;
#if defined(__x86_64__) && !defined(_MSC_VER)
  if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return divergence_rows_avx512;
  if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return divergence_rows_avx2;
#endif
  (void)allow2;
  return divergence_rows_default;
}

DivergenceRowsFn pick_rows_fn() {
  static const DivergenceRowsFn fn = pick_rows_fn_once();
  return fn;
}

DivergenceShardRowsFn pick_shard_rows_fn() {  // the instruction set pick_rows_fn chose
  static const DivergenceShardRowsFn fn =
      pick_rows_fn() == divergence_rows_avx512 ? divergence_shard_rows_avx512
      : pick_rows_fn() == divergence_rows_avx2 ? divergence_shard_rows_avx2
                                               : divergence_shard_rows_default;
  return fn;
}

// Large outputs (the gradients) on transparent huge pages where the kernel offers them: a fresh
// 256 MiB gradient then costs ~130 page faults instead of ~65k (measured: 60 ms → 11 ms to
// first-touch N=2048 × V=32000 fp32 on the 2-core dev machine). Small ones: the usual allocator.
at::Tensor empty_rows(int64_t n, int64_t v, const at::TensorOptions& opt) {
#if defined(__linux__)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = size_t(n) * size_t(v) * c10::elementSize(c10::typeMetaToScalarType(opt.dtype()));
  if (bytes >= 2 * kHuge) {
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHuge, rounded) == 0) {
      madvise(ptr, rounded, MADV_HUGEPAGE);  // advice only: harmless where THP is off
      return at::from_blob(ptr, {n, v}, [](void* q) { std::free(q); }, opt);
    }
  }
#endif
  return at::empty({n, v}, opt);
}

void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "kdkernels.divergence_fwd (cpu): ", name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, "kdkernels.divergence_fwd: ", name, " must be (N, V), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "kdkernels.divergence_fwd (cpu): ", name, " must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "kdkernels.divergence_fwd: ", name,
              " must have unit stride along V");
}

void check_grad_buffer(const at::Tensor& g, const at::Tensor& input, const char* name) {
  TORCH_CHECK(g.device().is_cpu() && g.dim() == 2 && g.sizes() == input.sizes() &&
                  g.is_contiguous() && g.scalar_type() == grad_dtype(input.scalar_type()),
              "kdkernels.divergence_rows_out (cpu): ", name, " must be a contiguous CPU tensor ",
              "shaped like its logits ", input.sizes(), " in ", grad_dtype(input.scalar_type()),
              ", got ", g.sizes(), " ", g.scalar_type());
}

// The params of one call on (N, V) logits (shared by the row kernel and its sharded form).
DivergenceParams divergence_params(const at::Tensor& student, const at::Tensor& teacher,
                                   const at::Tensor& w, int64_t mode, bool swap, double mix,
                                   double temperature, double taid,
                                   const std::optional<at::Tensor>& grad_student,
                                   const std::optional<at::Tensor>& grad_teacher) {
  check_logits(student, "student");
  check_logits(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "kdkernels.divergence_fwd: shapes differ");
  TORCH_CHECK(mode >= kKL && mode <= kTVD, "kdkernels.divergence_fwd: unknown mode ", mode);
  const int64_t n = student.size(0), v = student.size(1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == n, "kdkernels.divergence_fwd: row_weight must be (N,)");
  const bool gs = grad_student.has_value() && grad_student->defined();
  const bool gt = grad_teacher.has_value() && grad_teacher->defined();
  if (gs) check_grad_buffer(*grad_student, student, "grad_student");
  if (gt) check_grad_buffer(*grad_teacher, teacher, "grad_teacher");
  DivergenceParams p{};
  p.student = student.data_ptr();
  p.teacher = teacher.data_ptr();
  p.student_stride = student.stride(0);
  p.teacher_stride = teacher.stride(0);
  p.student_dtype = student.scalar_type();
  p.teacher_dtype = teacher.scalar_type();
  p.grad_student = gs ? grad_student->data_ptr() : nullptr;
  p.grad_teacher = gt ? grad_teacher->data_ptr() : nullptr;
  p.grad_student_dtype = grad_dtype(student.scalar_type());
  p.grad_teacher_dtype = grad_dtype(teacher.scalar_type());
  p.row_weight = w.data_ptr<float>();
  p.n_rows = n;
  p.vocab = v;
  fill_divergence_scalars(p, mode, swap, mix, temperature, taid);
  return p;
}

int64_t grain_for(int64_t n) {  // a few rows per task: each task allocates its scratch once
  return std::max<int64_t>(1, std::min<int64_t>(16, n / (4 * at::get_num_threads() + 1)));
}

}  // namespace

void divergence_rows_into(const at::Tensor& student, const at::Tensor& teacher,
                          const at::Tensor& row_weight, int64_t mode, bool swap, double mix,
                          double temperature, double taid, at::Tensor& loss_rows,
                          const std::optional<at::Tensor>& grad_student,
                          const std::optional<at::Tensor>& grad_teacher) {
  const at::Tensor w = row_weight.to(at::kFloat).contiguous();
  DivergenceParams p = divergence_params(student, teacher, w, mode, swap, mix, temperature, taid,
                                         grad_student, grad_teacher);
  const int64_t n = p.n_rows;
  TORCH_CHECK(loss_rows.device().is_cpu() && loss_rows.scalar_type() == at::kFloat &&
                  loss_rows.dim() == 1 && loss_rows.size(0) == n && loss_rows.is_contiguous(),
              "kdkernels.divergence_rows_out (cpu): loss_rows must be a contiguous float32 (N,)");
  p.loss_rows = loss_rows.data_ptr<float>();
  if (n > 0) {
    const DivergenceRowsFn rows_fn = pick_rows_fn();
    at::parallel_for(0, n, grain_for(n), [&](int64_t b, int64_t e) { rows_fn(p, b, e); });
  }
}

void divergence_shard_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& row_weight, int64_t mode, bool swap, double mix,
                               double temperature, double taid, int64_t phase, at::Tensor stats,
                               const std::optional<at::Tensor>& grad_student,
                               const std::optional<at::Tensor>& grad_teacher) {
  const at::Tensor w = row_weight.to(at::kFloat).contiguous();
  DivergenceParams p = divergence_params(student, teacher, w, mode, swap, mix, temperature, taid,
                                         phase == kShardGrads ? grad_student : std::nullopt,
                                         phase == kShardGrads ? grad_teacher : std::nullopt);
  const int64_t n = p.n_rows;
  TORCH_CHECK(phase >= kShardLocal && phase <= kShardGrads,
              "kdkernels.divergence_shard_rows: unknown phase ", phase);
  TORCH_CHECK(stats.device().is_cpu() && stats.scalar_type() == at::kDouble &&
                  stats.is_contiguous() && stats.dim() == 2 && stats.size(0) == n &&
                  stats.size(1) == kShardStats,
              "kdkernels.divergence_shard_rows (cpu): stats must be a contiguous float64 (N, ",
              kShardStats, "), got ", stats.sizes());
  double* st = stats.data_ptr<double>();
  if (n > 0) {
    const DivergenceShardRowsFn fn = pick_shard_rows_fn();
    at::parallel_for(0, n, grain_for(n), [&](int64_t b, int64_t e) { fn(p, phase, st, b, e); });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_weight,
    int64_t mode, bool swap, double mix, double temperature, double taid, bool reduce,
    bool grad_student, bool grad_teacher) {
  check_logits(student, "student");
  check_logits(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "kdkernels.divergence_fwd: shapes differ");
  const int64_t n = student.size(0), v = student.size(1);
  at::Tensor loss_rows = at::empty({n}, student.options().dtype(at::kFloat));
  const auto gs_opt = student.options().dtype(grad_dtype(student.scalar_type()));
  const auto gt_opt = teacher.options().dtype(grad_dtype(teacher.scalar_type()));
  at::Tensor gs = grad_student ? empty_rows(n, v, gs_opt) : at::empty({0}, gs_opt);
  at::Tensor gt = grad_teacher ? empty_rows(n, v, gt_opt) : at::empty({0}, gt_opt);
  divergence_rows_into(student, teacher, row_weight, mode, swap, mix, temperature, taid, loss_rows,
                       grad_student ? std::optional<at::Tensor>(gs) : std::nullopt,
                       grad_teacher ? std::optional<at::Tensor>(gt) : std::nullopt);
  at::Tensor loss = reduce ? loss_rows.to(at::kDouble).sum().to(at::kFloat) : loss_rows;
  return {loss, gs, gt};
}

void divergence_rows_out_cpu(const at::Tensor& student, const at::Tensor& teacher,
                             const at::Tensor& row_weight, int64_t mode, bool swap, double mix,
                             double temperature, double taid, at::Tensor loss_rows,
                             const std::optional<at::Tensor>& grad_student,
                             const std::optional<at::Tensor>& grad_teacher) {
  divergence_rows_into(student, teacher, row_weight, mode, swap, mix, temperature, taid, loss_rows,
                       grad_student, grad_teacher);
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("divergence_fwd", &divergence_fwd_cpu);
  m.impl("divergence_rows_out", &divergence_rows_out_cpu);
  m.impl("divergence_shard_rows", &divergence_shard_rows_cpu);
}

}  // namespace kdkernels::cpu
