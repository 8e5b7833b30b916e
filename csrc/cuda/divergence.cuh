// Divergence family, CUDA kernels: the launcher API. Depends on CUDA only (no torch), so the
// kernels build with plain nvcc/CMake and can be embedded in C++ programs; the torch glue
// (divergence_glue.cpp) registers them for the CUDA dispatch key of kdkernels::divergence_fwd.
// The math and the argument meanings are those of csrc/cpu/divergence.h and
// kdkernels/ops/divergence.py.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace kdkernels::cuda {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
// Canonical modes; P is the teacher's distribution and Q the student's, swapped if `swap`.
enum DivergenceMode : int32_t { kKL = 0, kSkew = 1, kJSD = 2, kTVD = 3 };

struct DivergenceArgs {
  const void* student;  // (n_rows, vocab): row stride below (elements), unit column stride
  const void* teacher;
  int64_t student_stride, teacher_stride;
  DType student_dtype, teacher_dtype;
  void* grad_student;  // contiguous (n_rows, vocab) or nullptr; dtype: grad_dtype(student)
  void* grad_teacher;
  const float* row_weight;  // w_i (masks, T², 1/denominator); 0 = dropped row, never read
  float* loss_rows;         // out: w_i · L_i
  int64_t n_rows, vocab;
  int32_t mode;
  bool swap, taid;
  float mix, temperature, lam;  // mix = α or β (weight of P); lam = TAID's λ (taid: 0 ≤ λ < 1)
  float c_p, c_q;               // gradient coefficients of the P and Q sides
  float gs_factor, gt_factor;   // 1/T and λ/T
  // The cluster kernel (sm_90+, opt-in): bytes of a row (both inputs' logits) one block may
  // keep in shared memory; 98304 (96 KiB: two blocks per H100/H200 SM) is its design point.
  // 0 (the default) = the streaming kernel, which measured as fast or faster on an H200
  // (bench/results/2026-11-29-h200.md).
  int64_t smem_row_budget;
};

// Rows longer than this are refused (the kernels index a row with 32-bit integers).
constexpr int64_t kMaxVocab = int64_t(1) << 30;

// Gradients come in the input's dtype, except fp16 ones, in fp32 (see csrc/cpu/divergence.h).
inline DType grad_dtype(DType input) {
  return input == DType::kFloat16 ? DType::kFloat32 : input;
}

// Launches the forward (loss per row and the requested gradients) on `stream`.
// Returns cudaSuccess or the launch error; the kernels themselves run asynchronously.
cudaError_t divergence_fwd(const DivergenceArgs& args, cudaStream_t stream);

}  // namespace kdkernels::cuda
