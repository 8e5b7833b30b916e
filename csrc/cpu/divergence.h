// Divergence family, C++ CPU kernels: the parameters of one call and the per-ISA row kernels.
// The row kernel (divergence_kernel.h) is compiled once per instruction set
// (divergence_{avx512,avx2,default}.cpp); divergence.cpp picks one at run time.
#pragma once
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

namespace kdkernels::cpu {

// Canonical modes; P is the teacher's distribution and Q the student's, swapped if `swap`.
enum DivergenceMode : int64_t { kKL = 0, kSkew = 1, kJSD = 2, kTVD = 3 };

struct DivergenceParams {
  const void* student;  // (n_rows, vocab) rows; row stride below, unit column stride
  const void* teacher;
  int64_t student_stride, teacher_stride;
  c10::ScalarType student_dtype, teacher_dtype;
  void* grad_student;  // contiguous (n_rows, vocab), or nullptr (see grad_dtype())
  void* grad_teacher;  // likewise for the teacher
  c10::ScalarType grad_student_dtype, grad_teacher_dtype;
  const float* row_weight;  // w_i: masks, T², 1/denominator; 0 = dropped row
  float* loss_rows;         // out: w_i · L_i
  int64_t n_rows, vocab;
  int64_t mode;
  bool swap, taid;
  float mix, temperature, lam;  // mix = α or β (weight of P); lam = TAID's λ
  float c_p, c_q;               // gradient coefficients of the P and Q sides
  float gs_factor, gt_factor;   // d(logits/T)/d(logits) (× λ for the teacher)
};

// Gradients come in the input's dtype, except fp16 ones, which come in fp32: backward scales
// them by the incoming gradient (a GradScaler's 2^16, say) before the one rounding to fp16,
// as eager autograd does; rounded first, the small ones would underflow to 0.
inline c10::ScalarType grad_dtype(c10::ScalarType input) {
  return input == c10::ScalarType::Half ? c10::ScalarType::Float : input;
}

using DivergenceRowsFn = void (*)(const DivergenceParams&, int64_t row_begin, int64_t row_end);

// The vocabulary-parallel form (kdkernels/ops/vocab_parallel.py): the row kernel's passes split
// where the ranks' statistics are summed; logits are this rank's vocabulary shard. stats is
// (n_rows, kShardStats) float64, in (student, teacher) order for the first four columns:
//   [m_s, m_t, z_s, z_t, loss, ΣU_P, ΣU_Q]
// kShardLocal  writes m (this shard's row maxima) and z = Σ e^((x − m)/T) per side
// kShardTerms  reads m = the global row maxima (0 for none) and z = log of the global
//              normalizers (NaN: no distribution), writes this shard's unweighted loss and
//              ΣU_P, ΣU_Q (the U of divergence_kernel.h)
// kShardGrads  reads all seven (the sums over every shard) and writes the gradients,
//              c·w·(U − P·ΣU) × d(logits/T)/d(logits), as divergence_rows_into does.
// Dropped rows (weight 0) are never read: m = −inf, z = 0, sums 0, zero gradients.
enum DivergenceShardPhase : int64_t { kShardLocal = 0, kShardTerms = 1, kShardGrads = 2 };
constexpr int64_t kShardStats = 7;
using DivergenceShardRowsFn = void (*)(const DivergenceParams&, int64_t phase, double* stats,
                                       int64_t row_begin, int64_t row_end);
void divergence_shard_rows_default(const DivergenceParams&, int64_t, double*, int64_t, int64_t);
void divergence_shard_rows_avx2(const DivergenceParams&, int64_t, double*, int64_t, int64_t);
void divergence_shard_rows_avx512(const DivergenceParams&, int64_t, double*, int64_t, int64_t);

void divergence_rows_default(const DivergenceParams&, int64_t, int64_t);
void divergence_rows_avx2(const DivergenceParams&, int64_t, int64_t);
void divergence_rows_avx512(const DivergenceParams&, int64_t, int64_t);

// The row launcher behind kdkernels::divergence_fwd and kdkernels::divergence_rows_out, for ops
// that build on the divergence rows (fused linear + divergence): (N, V) logits with any row
// stride and unit column stride; writes loss_rows (N,) float32 (w_i·L_i) and the requested
// gradients into the caller's contiguous (N, V) buffers in grad_dtype(input). A gradient buffer
// may be its own (contiguous) logits: every row is read into scratch before its gradient is
// written.
void divergence_rows_into(const at::Tensor& student, const at::Tensor& teacher,
                          const at::Tensor& row_weight, int64_t mode, bool swap, double mix,
                          double temperature, double taid, at::Tensor& loss_rows,
                          const std::optional<at::Tensor>& grad_student,
                          const std::optional<at::Tensor>& grad_teacher);

}  // namespace kdkernels::cpu
