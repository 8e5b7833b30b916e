// Divergence family, CUDA kernels (included by one translation unit per mode,
// divergence_<mode>.cu, so that the modes compile side by side). Both kernels make three
// sweeps over a row (the structure and the math of kdkernels/triton_kernels/divergence.py,
// whose header explains U_P, U_Q and c):
//   sweep 1  per-thread online max / sum-exp of both rows, then a reduction → log-sum-exps
//   sweep 2  per-element terms: the loss, ΣU_P, ΣU_Q (reduced); KL with only the Q side
//            wanted writes g_Q = Q − P here and stops
//   sweep 3  g_P = c_P·(U_P − P·ΣU_P), g_Q = c_Q·(U_Q − Q·ΣU_Q) in the gradient dtype
// Where the row lives between sweeps is what the two kernels differ in:
//   streaming kernel (any GPU; the default)  one block per row, or one warp per row for
//            short rows (at most 64 vectors, 8 rows per block); sweeps 2 and 3 re-read the row
//            from global memory, which is L2 only while all resident rows fit there.
//   cluster kernel (sm_90+, opt-in: DivergenceArgs::smem_row_budget)  a thread-block cluster
//            holds the row in its blocks' shared memory, so HBM sees each logit once: the
//            bytes the math must move. Rows up to 16 · 200 KiB of logits.
//
// On an H200 the kernels were bound by instruction issue, not HBM (bench/results/
// 2026-11-29-h200.md), so the sweeps are written for few instructions per logit
// (bench/sass_count.py counts them in the SASS):
// - The host orients the rows (PQArgs): the kernels read P and Q, never "student or teacher,
//   whichever swap says"; TAID's mixing and the gradients wanted are compile-time variants
//   of the sweeps (Variant).
// - Every vector a thread loads is whole: 16 bytes (VEC elements) when the host found every
//   row aligned and V a multiple of VEC, else single elements; there is no partial vector.
// - fp32 math, logits in input units (after TAID) with 1/T as a factor, so no division per
//   element; each probability is one MUFU.EX2 relative to the row's maximum, whose
//   difference is taken first (exactly, for nearby logits), so large logits and tiny
//   temperatures cost no precision and the maximum's own term is exactly 1:
//       P = 2^((x − m)·log2(e)/T − log2 Z),   log P = (x − m)/T − log Z.
// - Every x·log-ratio is 0 where x == 0, so −inf logits and underflow never give NaN.
#pragma once
#include <cmath>
#include <type_traits>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "divergence.cuh"
#include "../kl_term.h"

namespace kdkernels::cuda {

// Launches mode kMode's kernels (defined at the end; called by divergence_fwd).
template <int kMode>
cudaError_t launch_mode(const DivergenceArgs& a, cudaStream_t stream);

namespace detail {

constexpr float kNegInf = -INFINITY;

template <typename T> struct Elem;
template <> struct Elem<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <> struct Elem<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Elem<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
// The gradient type of an input type (fp16 → fp32, see divergence.cuh).
template <typename T> struct GradOf { using type = T; };
template <> struct GradOf<__half> { using type = float; };

template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

__device__ __forceinline__ float xlr(float x, float lx, float ly) {  // x·(lx − ly), 0 at x = 0
  return x > 0.f ? x * (lx - ly) : 0.f;
}

// The rows as the math sees them: P (the teacher's, or the student's if swap) and Q. The
// host fills it from DivergenceArgs (orient, below); the kernels never look at `swap`.
struct PQArgs {
  const void* p;
  const void* q;
  int64_t p_stride, q_stride;
  void* gp;  // contiguous (n_rows, V) gradient of the tensor on P's side, or nullptr
  void* gq;
  float p_factor, q_factor;  // d(softmax input)/d(logit) of each side: 1/T, or λ/T (TAID's teacher)
  bool taid_on_p;            // TAID (DivergenceArgs::taid): the teacher is P (no swap), else Q
};

inline PQArgs orient(const DivergenceArgs& a) {
  PQArgs o;
  if (a.swap) {
    o = {a.student, a.teacher, a.student_stride, a.teacher_stride, a.grad_student, a.grad_teacher,
         a.gs_factor, a.gt_factor, false};
  } else {
    o = {a.teacher, a.student, a.teacher_stride, a.student_stride, a.grad_teacher, a.grad_student,
         a.gt_factor, a.gs_factor, true};
  }
  return o;
}

inline DType p_dtype(const DivergenceArgs& a) { return a.swap ? a.student_dtype : a.teacher_dtype; }
inline DType q_dtype(const DivergenceArgs& a) { return a.swap ? a.teacher_dtype : a.student_dtype; }

// How the cluster kernel splits a row: `ranks` blocks of `threads` threads, each holding
// `slice` logits of both inputs (a multiple of 16) in `smem_bytes` of shared memory.
struct ClusterPlan {
  int ranks = 0;  // 0: no plan (the streaming kernel)
  int threads = 0;
  int64_t slice = 0;
  size_t smem_bytes = 0;
  bool operator==(const ClusterPlan& o) const {
    return ranks == o.ranks && threads == o.threads && slice == o.slice && smem_bytes == o.smem_bytes;
  }
};

constexpr int64_t kMaxSmemRowSlice = 200 * 1024;  // one block per SM, at 16 ranks
constexpr int kMaxRanks = 16;                     // 8 is portable; 16 where the GPU allows it

struct ClusterSmem {  // after the two logit slices in dynamic shared memory
  float scratch[64];  // block reductions
  float part[8];      // this block's partials, read by the other ranks
  float total[8];     // the cluster's totals, for the whole block
};

// Bytes of dynamic shared memory of a cluster block holding `slice` logits of each input.
__host__ __device__ inline size_t cluster_smem_bytes(int64_t slice, size_t p_elem, size_t q_elem) {
  return (slice * p_elem + 15) / 16 * 16 + (slice * q_elem + 15) / 16 * 16 + sizeof(ClusterSmem);
}

// The fewest ranks (a power of two) whose slices fit `budget` bytes (≤ 0: none, streaming).
inline ClusterPlan plan_cluster(int64_t V, size_t p_elem, size_t q_elem, int vec, int64_t n_rows,
                                int64_t budget) {
  if (budget <= 0) return {};
  for (int ranks = 1; ranks <= kMaxRanks; ranks *= 2) {
    const int64_t slice = ((V + ranks - 1) / ranks + 15) / 16 * 16;
    const int64_t bytes = slice * static_cast<int64_t>(p_elem + q_elem);
    if (bytes > budget && !(ranks == kMaxRanks && bytes <= kMaxSmemRowSlice)) continue;
    if (n_rows * ranks > 0x7fffffff) return {};
    ClusterPlan plan;
    plan.ranks = ranks;
    plan.slice = slice;
    const int64_t vectors = slice / vec;
    plan.threads = vectors >= 4096 ? 512 : vectors >= 1024 ? 256 : 128;
    plan.smem_bytes = cluster_smem_bytes(slice, p_elem, q_elem);
    return plan;
  }
  return {};
}

constexpr float kLog2e = 1.4426950408889634f;

// 2^x in one instruction (MUFU.EX2, relative error ≤ 2⁻²², exp2f's own core); results below
// 2⁻¹²⁶ (probabilities under 1e-38, which no sum or gradient here can see) flush to 0.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef KDKERNELS_CUDA_EMULATION
  const float r = std::exp2(x);
  return r < 1.17549435e-38f ? 0.f : r;
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

// A row's constants after sweep 1, in input units: maxima m (0 for an all −inf row), 1/T (c),
// log2(e)/T (c2), each side's log Z (natural and base 2), and log Z_Q − log Z_P (dlz).
struct RowStats {
  float m_x, m_y, c, c2, lz_x, lz_y, l2z_x, l2z_y, dlz;
  float log_w, log_1mw;  // log(mix), log(1 − mix)
};

struct Terms {
  float p, q, up, uq, el;
};

// log(1 + r) for r in [0, 1], within about an ulp, without log1pf's range handling (half of a
// JSD sweep's instructions went there): for r > 1/2, log 2 + log1p(f) with f = (r − 1)/2
// (exact); then log1p(f) = 2·atanh(s), s = f/(2 + f), |s| ≤ 0.2, by its series in s² to s⁹
// (the next term is below 1e-8 of it). The quotient is the reciprocal's, refined once.
__device__ __forceinline__ float log1p_unit(float r) {
  const bool big = r > 0.5f;
  const float f = big ? fmaf(r, 0.5f, -0.5f) : r;
  const float d = 2.f + f;
#ifdef KDKERNELS_CUDA_EMULATION
  const float inv = 1.f / d;
#else
  float inv;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(inv) : "f"(d));
#endif
  float sq = f * inv;
  sq = fmaf(fmaf(-sq, d, f), inv, sq);  // one Newton step: the rounded quotient
  const float s2 = sq * sq;
  float poly = fmaf(s2, 1.f / 9, 1.f / 7);
  poly = fmaf(poly, s2, 1.f / 5);
  poly = fmaf(poly, s2, 1.f / 3);
  poly = fmaf(poly, s2, 1.f);
  return fmaf(2.f * sq, poly, big ? 0.69314718055994531f : 0.f);
}

// log(mix·P + (1 − mix)·Q) from log P, log Q, in log space: the rounding of log P and
// log Q cancels in log P − log M (logf of the mixture itself would add an ulp of |log M|,
// measured 40× the fp32 formula's error on JSD losses). Exact at mix = 0 and 1.
__device__ __forceinline__ float log_mix(const RowStats& st, float lp, float lq) {
  const float u = lp + st.log_w, v = lq + st.log_1mw;  // −inf + … at mix = 0 or 1: the other
  const float hi = fmaxf(u, v), lo = fminf(u, v);
  return hi == kNegInf ? kNegInf : hi + log1p_unit(fast_exp2((lo - hi) * kLog2e));
}

// The per-element terms at logits (x, y) of P and Q (input units).
template <int kMode>
__device__ __forceinline__ Terms terms(float x, float y, const RowStats& st, float mix) {
  const float dx = x - st.m_x, dy = y - st.m_y;  // −inf for −inf logits: P = 0, log P = −inf
  const float p = fast_exp2(fmaf(dx, st.c2, -st.l2z_x)), q = fast_exp2(fmaf(dy, st.c2, -st.l2z_y));
  if constexpr (kMode == kKL) {
    const float v = fmaf(dx - dy, st.c, st.dlz);  // log P − log Q (NaN where both are −inf: P = 0)
    return {p, q, p > 0.f ? p * v : 0.f, -p, kdkernels::kl_term(p, q, v)};
  }
  const float lp = fmaf(dx, st.c, -st.lz_x), lq = fmaf(dy, st.c, -st.lz_y);
  if constexpr (kMode == kSkew) {
    const float lr = log_mix(st, lp, lq);
    const float p_over_r = p > 0.f ? fast_exp2((lp - lr) * kLog2e) : 0.f;  // ≤ 1/α
    const float r = fmaf(mix, p, (1.f - mix) * q);
    return {p, q, xlr(p, lp, lr) - mix * p * p_over_r, q * p_over_r,
            kdkernels::kl_term(p, r, lp - lr)};
  } else if constexpr (kMode == kJSD) {
    const float lm = log_mix(st, lp, lq);
    const float m = fmaf(mix, p, (1.f - mix) * q);
    return {p, q, xlr(p, lp, lm), xlr(q, lq, lm),
            mix * kdkernels::kl_term(p, m, lp - lm) +
                (1.f - mix) * kdkernels::kl_term(q, m, lq - lm)};
  } else {  // TVD
    const float sg = p > q ? 1.f : (p < q ? -1.f : 0.f);
    return {p, q, p * sg, q * sg, 0.5f * fabsf(p - q)};
  }
}

// ---------------------------------------------------------------- block reductions
// Sums of exponentials in input units: z = Σ 2^((x − m)·c2) with c2 = log2(e)/T.
// A NaN in z (a NaN or +inf logit was seen) survives every merge: the NaN rule. The merge is
// symmetric in its two pairs (both products rounded, never contracted into an FMA), so every
// lane of a butterfly ends with the same bits.
__device__ __forceinline__ void lse_merge(float& m, float& z, float m2, float z2, float c2) {
  const float mn = fmaxf(m, m2);
  if (mn == kNegInf) {  // both empty: z and z2 are 0, or NaN
    z += z2;
    return;
  }
  z = __fmul_rn(z, fast_exp2((m - mn) * c2)) + __fmul_rn(z2, fast_exp2((m2 - mn) * c2));
  m = mn;
}

// Warp-wide merge of per-lane (max, sum-exp) pairs / warp-wide sum; every lane gets it.
__device__ __forceinline__ void warp_lse(float& m, float& z, float c2) {
  for (int o = 16; o > 0; o >>= 1) {
    lse_merge(m, z, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, z, o), c2);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide merge of per-thread (max, sum-exp) pairs; every thread gets the result: each
// warp merges its lanes, then every warp merges the warps' results (lane k takes warp k's).
__device__ __forceinline__ void block_lse(float& m, float& z, float c2, float* smem) {
  warp_lse(m, z, c2);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // smem may still be read from a previous reduction
  if (lane == 0) {
    smem[warp] = m;
    smem[32 + warp] = z;
  }
  __syncthreads();
  m = lane < warps ? smem[lane] : kNegInf;
  z = lane < warps ? smem[32 + lane] : 0.f;
  warp_lse(m, z, c2);
}

// Block-wide sum; every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? smem[lane] : 0.f);
}

// ---------------------------------------------------------------- row access
// VEC logits at `at` (a whole vector, 16-byte aligned when VEC > 1) as fp32: bf16 pairs by a
// shift and a mask of their 32-bit word, one instruction per logit.
template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* at, float (&v)[VEC]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && VEC % 2 == 0) {
    const Pack<unsigned, VEC / 2> w = *reinterpret_cast<const Pack<unsigned, VEC / 2>*>(at);
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
      v[2 * i] = __uint_as_float(w.v[i] << 16);
      v[2 * i + 1] = __uint_as_float(w.v[i] & 0xffff0000u);
    }
  } else {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(at);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = Elem<T>::load(pk.v[i]);
  }
}

// How a kernel's sweeps handle TAID and the gradients wanted: compiled in (kLean: no TAID;
// kLeanTaid: TAID) for the 16-byte kernels, looked up at run time (kAny) for the scalar ones,
// which are slow anyway and so cost no more compile time than they must.
enum Variant { kLean = 0, kLeanTaid = 1, kAny = 2 };

// The VEC logits of P and Q at p_at, q_at in input units (the host guarantees whole vectors:
// n % VEC == 0); TAID mixes the student into the teacher side: λ·t + (1 − λ)·s, or s at λ = 0.
template <int VEC, int kVariant, typename TP, typename TQ>
__device__ __forceinline__ void load_pq(const TP* p_at, const TQ* q_at, const DivergenceArgs& a,
                                        const PQArgs& o, float (&x)[VEC], float (&y)[VEC]) {
  load_vec<VEC>(p_at, x);
  load_vec<VEC>(q_at, y);
  if (kVariant == kLeanTaid || (kVariant == kAny && a.taid)) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {  // −inf stays −inf
      const float t = o.taid_on_p ? x[i] : y[i], s = o.taid_on_p ? y[i] : x[i];
      const float mixed = a.lam == 0.f ? s : a.lam * t + (1.f - a.lam) * s;
      x[i] = o.taid_on_p ? mixed : x[i];
      y[i] = o.taid_on_p ? y[i] : mixed;
    }
  }
}

// VEC gradients at j in G (bf16 pairs rounded by one conversion each).
template <int VEC, typename G>
__device__ __forceinline__ void store_vec(G* row, int j, const float (&g)[VEC]) {
  if constexpr (std::is_same_v<G, __nv_bfloat16> && VEC % 2 == 0) {
    Pack<__nv_bfloat162, VEC / 2> pk;
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) pk.v[i] = __floats2bfloat162_rn(g[2 * i], g[2 * i + 1]);
    *reinterpret_cast<Pack<__nv_bfloat162, VEC / 2>*>(row + j) = pk;
  } else {
    Pack<G, VEC> pk;
#pragma unroll
    for (int i = 0; i < VEC; ++i) pk.v[i] = Elem<G>::store(g[i]);
    *reinterpret_cast<Pack<G, VEC>*>(row + j) = pk;
  }
}

// ---------------------------------------------------------------- the three sweeps
// One row, or one cluster rank's slice of it: p_row / q_row point at the slice's first logits
// (global or shared memory), n is its length (a multiple of VEC), gp / gq its gradients
// (nullptr: not wanted); this thread takes vectors first, first + step, ...  Reduce holds the
// merges over everything that holds the row: lse(m_x, z_x, m_y, z_y) and sums(loss, ΣU_P,
// ΣU_Q), every thread getting the totals. Returns the row's w·L (every thread).
template <int kMode, int VEC, int kVariant, typename TP, typename TQ, typename GP, typename GQ,
          class Reduce>
__device__ __forceinline__ float row_sweeps(const DivergenceArgs& a, const PQArgs& o, float w,
                                            const TP* p_row, const TQ* q_row, int n, GP* gp,
                                            GQ* gq, int first, int step, Reduce& reduce) {
  float x[VEC], y[VEC];

  // sweep 1: log-sum-exps, online: each term 2^((x − r)·c2) relative to the thread's running
  // maximum m (rescaled by one 2^x when m grows). While m is −inf the reference r is 0: −inf
  // logits add 2^−inf = 0, and a NaN (which fmaxf passes over) makes z NaN for good.
  RowStats st;
  st.c = 1.f / a.temperature;
  st.c2 = kLog2e / a.temperature;
  float m_x = kNegInf, r_x = 0.f, z_x = 0.f, m_y = kNegInf, r_y = 0.f, z_y = 0.f;
  auto online = [&](float& m, float& r, float& z, const float (&v)[VEC]) {
    float mn = m;
#pragma unroll
    for (int i = 0; i < VEC; ++i) mn = fmaxf(mn, v[i]);
    if (mn != m) {  // the maximum grew (so it is not −inf); z is 0 or NaN while m is −inf
      z = m == kNegInf ? z : z * fast_exp2((m - mn) * st.c2);
      m = r = mn;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) z += fast_exp2((v[i] - r) * st.c2);
  };
  for (int j = first; j < n; j += step) {
    load_pq<VEC, kVariant>(p_row + j, q_row + j, a, o, x, y);
    online(m_x, r_x, z_x, x);
    online(m_y, r_y, z_y, y);
  }
  reduce.lse(m_x, z_x, m_y, z_y, st.c2);
  // The NaN rule: a row whose inputs hold NaN or +inf (z is NaN) or that has no distribution
  // (all −inf: z = 0) gets NaN loss and NaN gradients, through its weight.
  if (!(z_x > 0.f) || !(z_y > 0.f)) w = NAN;
  st.m_x = m_x == kNegInf ? 0.f : m_x;
  st.m_y = m_y == kNegInf ? 0.f : m_y;
  st.lz_x = logf(z_x);
  st.lz_y = logf(z_y);
  st.l2z_x = log2f(z_x);
  st.l2z_y = log2f(z_y);
  st.dlz = st.lz_y - st.lz_x;
  st.log_w = logf(a.mix);
  st.log_1mw = log1pf(-a.mix);
  const float q_factor = w * o.q_factor, p_factor = w * o.p_factor;

  // sweep 2: the loss and ΣU; KL with only Q's gradient wanted writes it here (fused)
  float loss = 0.f, sum_up = 0.f, sum_uq = 0.f;
  auto sweep2 = [&](auto fused) {
    for (int j = first; j < n; j += step) {
      load_pq<VEC, kVariant>(p_row + j, q_row + j, a, o, x, y);
      float g[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const Terms r = terms<kMode>(x[i], y[i], st, a.mix);
        loss += r.el;
        if constexpr (kMode != kKL) {  // KL: ΣU_P is the loss and ΣU_Q = −ΣP = −1 (below)
          sum_up += r.up;
          sum_uq += r.uq;
        }
        if constexpr (decltype(fused)::value) g[i] = (r.q - r.p) * q_factor;
      }
      if constexpr (decltype(fused)::value) store_vec<VEC>(gq, j, g);
    }
  };
  const bool fused = kMode == kKL && gq != nullptr && gp == nullptr;
  if constexpr (kMode == kKL) {
    if (fused) sweep2(std::true_type{});
    else sweep2(std::false_type{});
  } else {
    sweep2(std::false_type{});
  }
  reduce.sums(loss, sum_up, sum_uq);
  if constexpr (kMode == kKL) {
    sum_up = loss;
    sum_uq = -1.f;  // so g_Q = c_Q·(Q − P), as in the fused sweep
  }
  if (fused || (gp == nullptr && gq == nullptr)) return w * loss;

  // sweep 3: gradients, one loop per set of sides wanted
  const float cp = a.c_p * p_factor, cq = a.c_q * q_factor;
  auto sweep3 = [&](auto want_p, auto want_q) {
    for (int j = first; j < n; j += step) {
      load_pq<VEC, kVariant>(p_row + j, q_row + j, a, o, x, y);
      float g_p[VEC], g_q[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const Terms r = terms<kMode>(x[i], y[i], st, a.mix);
        if constexpr (decltype(want_p)::value) g_p[i] = cp * (r.up - r.p * sum_up);
        if constexpr (decltype(want_q)::value) g_q[i] = cq * (r.uq - r.q * sum_uq);
      }
      if (decltype(want_p)::value && (kVariant != kAny || gp != nullptr)) store_vec<VEC>(gp, j, g_p);
      if (decltype(want_q)::value && (kVariant != kAny || gq != nullptr)) store_vec<VEC>(gq, j, g_q);
    }
  };
  if constexpr (kVariant == kAny) {
    sweep3(std::true_type{}, std::true_type{});
  } else {
    if (gp == nullptr) sweep3(std::false_type{}, std::true_type{});
    else if (gq == nullptr) sweep3(std::true_type{}, std::false_type{});
    else sweep3(std::true_type{}, std::true_type{});
  }
  return w * loss;
}

// A dropped row (w = 0) is never read: zero gradient over the slice.
template <int VEC, typename GP, typename GQ>
__device__ __forceinline__ void zero_slice(GP* gp, GQ* gq, int n, int first, int step) {
  const float zero[VEC] = {};
  for (int j = first; j < n; j += step) {
    if (gp) store_vec<VEC>(gp, j, zero);
    if (gq) store_vec<VEC>(gq, j, zero);
  }
}

// row_sweeps in the variant for this VEC (and TAID).
template <int kMode, int VEC, typename TP, typename TQ, typename GP, typename GQ, class Reduce>
__device__ __forceinline__ float row_loss(const DivergenceArgs& a, const PQArgs& o, float w,
                                          const TP* p_row, const TQ* q_row, int n, GP* gp, GQ* gq,
                                          int first, int step, Reduce& reduce) {
  if constexpr (VEC == 1) {
    return row_sweeps<kMode, VEC, kAny>(a, o, w, p_row, q_row, n, gp, gq, first, step, reduce);
  } else {
    if (a.taid) return row_sweeps<kMode, VEC, kLeanTaid>(a, o, w, p_row, q_row, n, gp, gq, first, step, reduce);
    return row_sweeps<kMode, VEC, kLean>(a, o, w, p_row, q_row, n, gp, gq, first, step, reduce);
  }
}

// ---------------------------------------------------------------- the streaming kernel
// The row is read from global memory in every sweep (from HBM in sweep 1, from L2 after, as far
// as L2 holds it). kWarpRows: one warp per row (blockDim.x / 32 rows per block), else one block
// per row. Any GPU; the fallback where the cluster kernel below cannot run.
template <bool kWarpRows>
struct StreamingReduce {
  float* smem;
  __device__ void lse(float& m_x, float& z_x, float& m_y, float& z_y, float c2) {
    if (kWarpRows) {
      warp_lse(m_x, z_x, c2);
      warp_lse(m_y, z_y, c2);
    } else {
      block_lse(m_x, z_x, c2, smem);
      block_lse(m_y, z_y, c2, smem);
    }
  }
  __device__ void sums(float& a, float& b, float& c) {
    if (kWarpRows) {
      a = warp_sum(a), b = warp_sum(b), c = warp_sum(c);
    } else {
      a = block_sum(a, smem), b = block_sum(b, smem), c = block_sum(c, smem);
    }
  }
};

template <int kMode, int VEC, typename TP, typename TQ, bool kWarpRows>
__global__ void __launch_bounds__(1024) divergence_fwd_kernel(const DivergenceArgs a, const PQArgs o) {
  using GP = typename GradOf<TP>::type;
  using GQ = typename GradOf<TQ>::type;
  __shared__ float smem[64];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = kWarpRows ? static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + warp
                                : static_cast<int64_t>(blockIdx.x);
  if (kWarpRows && row >= a.n_rows) return;  // the last block's spare warps
  const int V = static_cast<int>(a.vocab);
  const int step = (kWarpRows ? 32 : static_cast<int>(blockDim.x)) * VEC;
  const int first = (kWarpRows ? lane : static_cast<int>(threadIdx.x)) * VEC;
  GP* gp = o.gp ? static_cast<GP*>(o.gp) + row * a.vocab : nullptr;
  GQ* gq = o.gq ? static_cast<GQ*>(o.gq) + row * a.vocab : nullptr;
  const float w = a.row_weight[row];
  float loss = 0.f;
  if (w == 0.f) {
    zero_slice<VEC>(gp, gq, V, first, step);
  } else {
    StreamingReduce<kWarpRows> reduce{smem};
    loss = row_loss<kMode, VEC>(a, o, w, static_cast<const TP*>(o.p) + row * o.p_stride,
                                static_cast<const TQ*>(o.q) + row * o.q_stride, V, gp, gq, first,
                                step, reduce);
  }
  if (first == 0) a.loss_rows[row] = loss;
}

// ---------------------------------------------------------------- the cluster kernel (sm_90+)
// Each row is read from HBM once: a thread-block cluster of R blocks holds it, rank r keeping
// logits [r·slice, (r+1)·slice) of both inputs in its shared memory for the three sweeps, and
// the ranks merge their per-block statistics through distributed shared memory (each rank's
// warp 0 merges all ranks' partials in the same order, so every rank gets the same bits).
// Each thread copies its own vectors and reads back only those, so the copy needs no barrier.
#if defined(KDKERNELS_CUDA_EMULATION) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define KDK_HAS_CLUSTERS 1
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef KDKERNELS_CUDA_EMULATION
  return kdk_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char kdk_dynamic_smem[];
  return kdk_dynamic_smem;
#endif
}

template <class Cluster>
struct ClusterReduce {
  Cluster& cluster;
  ClusterSmem* sm;
  // Block totals → part[base..base+k); cluster barrier; warp 0 merges rank by rank (lane r
  // reads rank r) → total[base..]; block barrier.
  template <int K, class Merge>
  __device__ void exchange(float (&v)[K], int base, Merge merge) {
    if (threadIdx.x == 0) {
      for (int k = 0; k < K; ++k) sm->part[base + k] = v[k];
    }
    cluster.sync();  // every rank's partials written (and visible)
    if (threadIdx.x < 32) {
      const unsigned lane = threadIdx.x;
      float mine[K];
      for (int k = 0; k < K; ++k) mine[k] = merge.identity(k);
      if (lane < cluster.num_blocks()) {
        const float* other = cluster.map_shared_rank(sm->part, lane);
        for (int k = 0; k < K; ++k) mine[k] = other[base + k];
      }
      merge.warp(mine);
      if (lane == 0) {
        for (int k = 0; k < K; ++k) sm->total[base + k] = mine[k];
      }
    }
    __syncthreads();
    for (int k = 0; k < K; ++k) v[k] = sm->total[base + k];
  }
  struct LseMerge {
    float c2;
    __device__ float identity(int k) const { return k % 2 == 0 ? kNegInf : 0.f; }
    __device__ void warp(float (&v)[4]) const {
      warp_lse(v[0], v[1], c2);
      warp_lse(v[2], v[3], c2);
    }
  };
  struct SumMerge {
    __device__ float identity(int) const { return 0.f; }
    __device__ void warp(float (&v)[3]) const {
      for (float& x : v) x = warp_sum(x);
    }
  };
  __device__ void lse(float& m_x, float& z_x, float& m_y, float& z_y, float c2) {
    block_lse(m_x, z_x, c2, sm->scratch);
    block_lse(m_y, z_y, c2, sm->scratch);
    float v[4] = {m_x, z_x, m_y, z_y};
    exchange(v, 0, LseMerge{c2});
    m_x = v[0], z_x = v[1], m_y = v[2], z_y = v[3];
  }
  __device__ void sums(float& a, float& b, float& c) {
    a = block_sum(a, sm->scratch), b = block_sum(b, sm->scratch), c = block_sum(c, sm->scratch);
    float v[3] = {a, b, c};
    exchange(v, 4, SumMerge{});
    a = v[0], b = v[1], c = v[2];
  }
};
#endif

// Grid: n_rows · R blocks in clusters of R (R = gridDim.x / n_rows, set at launch).
template <int kMode, int VEC, typename TP, typename TQ>
__global__ void __launch_bounds__(512) divergence_fwd_cluster_kernel(const DivergenceArgs a,
                                                                     const PQArgs o, int slice) {
#ifndef KDK_HAS_CLUSTERS
  __trap();  // never launched: the host launches it only where the binary is sm_90+
#else
  using GP = typename GradOf<TP>::type;
  using GQ = typename GradOf<TQ>::type;
  auto cluster = cooperative_groups::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t row = blockIdx.x / cluster.num_blocks();
  const int V = static_cast<int>(a.vocab), begin = rank * slice;
  const int n = begin < V ? (V - begin < slice ? V - begin : slice) : 0;
  const int step = static_cast<int>(blockDim.x) * VEC, first = static_cast<int>(threadIdx.x) * VEC;
  GP* gp = o.gp ? static_cast<GP*>(o.gp) + row * a.vocab + begin : nullptr;
  GQ* gq = o.gq ? static_cast<GQ*>(o.gq) + row * a.vocab + begin : nullptr;
  const float w = a.row_weight[row];
  if (w == 0.f) {  // the whole cluster leaves here: no rank reads another's memory
    zero_slice<VEC>(gp, gq, n, first, step);
    if (rank == 0 && threadIdx.x == 0) a.loss_rows[row] = 0.f;
    return;
  }
  unsigned char* smem = dynamic_smem();
  TP* p_sm = reinterpret_cast<TP*>(smem);
  TQ* q_sm = reinterpret_cast<TQ*>(smem + (slice * sizeof(TP) + 15) / 16 * 16);
  auto* sm = reinterpret_cast<ClusterSmem*>(smem + cluster_smem_bytes(slice, sizeof(TP), sizeof(TQ)) -
                                            sizeof(ClusterSmem));
  // The copy, kBatch vectors of each input in flight per thread: all loads, then all stores.
  const TP* p_row = static_cast<const TP*>(o.p) + row * o.p_stride + begin;
  const TQ* q_row = static_cast<const TQ*>(o.q) + row * o.q_stride + begin;
  constexpr int kBatch = 4;
  int j = first;
  for (; j + (kBatch - 1) * step < n; j += kBatch * step) {
    Pack<TP, VEC> pp[kBatch];
    Pack<TQ, VEC> pq[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      pp[u] = *reinterpret_cast<const Pack<TP, VEC>*>(p_row + j + u * step);
      pq[u] = *reinterpret_cast<const Pack<TQ, VEC>*>(q_row + j + u * step);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      *reinterpret_cast<Pack<TP, VEC>*>(p_sm + j + u * step) = pp[u];
      *reinterpret_cast<Pack<TQ, VEC>*>(q_sm + j + u * step) = pq[u];
    }
  }
  for (; j < n; j += step) {  // the rest, one vector at a time
    *reinterpret_cast<Pack<TP, VEC>*>(p_sm + j) = *reinterpret_cast<const Pack<TP, VEC>*>(p_row + j);
    *reinterpret_cast<Pack<TQ, VEC>*>(q_sm + j) = *reinterpret_cast<const Pack<TQ, VEC>*>(q_row + j);
  }
  ClusterReduce<decltype(cluster)> reduce{cluster, sm};
  const float loss = row_loss<kMode, VEC>(a, o, w, p_sm, q_sm, n, gp, gq, first, step, reduce);
  if (rank == 0 && threadIdx.x == 0) a.loss_rows[row] = loss;
  cluster.sync();  // no block leaves while another rank may still read its partials
#endif
}

// ---------------------------------------------------------------- dispatch

inline bool aligned(const void* p, int64_t stride_elems, size_t elem, int vec) {
  const size_t bytes = elem * vec;
  return reinterpret_cast<uintptr_t>(p) % bytes == 0 && (stride_elems * elem) % bytes == 0;
}

template <int kMode, typename TP, typename TQ, bool kWarpRows>
cudaError_t launch_streaming(const DivergenceArgs& a, const PQArgs& o, bool vec_ok, dim3 grid,
                             int threads, cudaStream_t stream) {
  constexpr int kVec = 16 / (sizeof(TP) > sizeof(TQ) ? sizeof(TP) : sizeof(TQ));
#ifdef KDKERNELS_CUDA_EMULATION  // the CPU emulation that tests the kernels' logic (python_tests)
  if (vec_ok) kdk_emulate_launch(divergence_fwd_kernel<kMode, kVec, TP, TQ, kWarpRows>, grid, threads, 1, 0, a, o);
  else kdk_emulate_launch(divergence_fwd_kernel<kMode, 1, TP, TQ, kWarpRows>, grid, threads, 1, 0, a, o);
  (void)stream;
#else
  if (vec_ok) {
    divergence_fwd_kernel<kMode, kVec, TP, TQ, kWarpRows><<<grid, threads, 0, stream>>>(a, o);
  } else {
    divergence_fwd_kernel<kMode, 1, TP, TQ, kWarpRows><<<grid, threads, 0, stream>>>(a, o);
  }
#endif
  return cudaGetLastError();
}

// Launches the cluster kernel for `plan`; false (nothing launched) where this GPU or this
// binary has no clusters, or the plan's blocks cannot be co-scheduled.
template <int kMode, int VEC, typename TP, typename TQ>
bool launch_cluster(const DivergenceArgs& a, const PQArgs& o, const ClusterPlan& plan,
                    cudaStream_t stream) {
  const auto kernel = divergence_fwd_cluster_kernel<kMode, VEC, TP, TQ>;
  const dim3 grid(static_cast<unsigned>(a.n_rows * plan.ranks));
  const int slice = static_cast<int>(plan.slice);
#ifdef KDKERNELS_CUDA_EMULATION
  kdk_emulate_launch(kernel, grid, plan.threads, plan.ranks, plan.smem_bytes, a, o, slice);
  (void)stream;
  return true;
#else
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(plan.threads);
  cfg.dynamicSmemBytes = plan.smem_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = plan.ranks;
  attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // Whether this configuration runs here, remembered per thread for the last one asked.
  struct Asked {
    int device = -1;
    const void* kernel = nullptr;
    ClusterPlan plan{};
    bool ok = false;
  };
  static thread_local Asked last;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (last.device != device || last.kernel != reinterpret_cast<const void*>(kernel) ||
      !(last.plan == plan)) {
    last = Asked{device, reinterpret_cast<const void*>(kernel), plan, false};
    int has_clusters = 0, clusters = 0;
    cudaFuncAttributes fa{};
    if (cudaDeviceGetAttribute(&has_clusters, cudaDevAttrClusterLaunch, device) == cudaSuccess &&
        has_clusters && cudaFuncGetAttributes(&fa, kernel) == cudaSuccess &&
        fa.binaryVersion >= 90 && fa.ptxVersion >= 90 &&  // sm_8x PTX JIT-compiled here: __trap
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(plan.smem_bytes)) == cudaSuccess &&
        (plan.ranks <= 8 || cudaFuncSetAttribute(
                                kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) &&
        cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess) {
      last.ok = clusters > 0;
    }
    cudaGetLastError();  // a refused query is an answer, not an error to report later
  }
  if (!last.ok) return false;
  if (cudaLaunchKernelEx(&cfg, kernel, a, o, slice) != cudaSuccess) {
    cudaGetLastError();
    last.ok = false;
    return false;
  }
  return true;
#endif
}

template <int kMode, typename TP, typename TQ>
cudaError_t launch_pq(const DivergenceArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / (sizeof(TP) > sizeof(TQ) ? sizeof(TP) : sizeof(TQ));
  const PQArgs o = orient(a);
  using GP = typename GradOf<TP>::type;
  using GQ = typename GradOf<TQ>::type;
  const bool vec_ok = aligned(o.p, o.p_stride, sizeof(TP), kVec) &&
                      aligned(o.q, o.q_stride, sizeof(TQ), kVec) &&
                      (o.gp == nullptr || aligned(o.gp, a.vocab, sizeof(GP), kVec)) &&
                      (o.gq == nullptr || aligned(o.gq, a.vocab, sizeof(GQ), kVec)) &&
                      a.vocab % kVec == 0;  // whole vectors
  const int64_t chunks = (a.vocab + kVec - 1) / kVec;  // vectors per row
  if (chunks <= 64) {  // short rows: one warp each, 8 per block
    constexpr int kRowsPerBlock = 8;
    const dim3 grid(static_cast<unsigned>((a.n_rows + kRowsPerBlock - 1) / kRowsPerBlock));
    return launch_streaming<kMode, TP, TQ, true>(a, o, vec_ok, grid, 32 * kRowsPerBlock, stream);
  }
  const ClusterPlan plan = plan_cluster(a.vocab, sizeof(TP), sizeof(TQ), vec_ok ? kVec : 1,
                                        a.n_rows, a.smem_row_budget);
  if (plan.ranks > 0) {
    const bool launched = vec_ok ? launch_cluster<kMode, kVec, TP, TQ>(a, o, plan, stream)
                                 : launch_cluster<kMode, 1, TP, TQ>(a, o, plan, stream);
    if (launched) return cudaSuccess;
  }
  const int threads = chunks >= 8192 ? 1024 : chunks >= 2048 ? 512 : chunks >= 512 ? 256 : 128;
  return launch_streaming<kMode, TP, TQ, false>(a, o, vec_ok, dim3(static_cast<unsigned>(a.n_rows)),
                                                threads, stream);
}

template <int kMode, typename TP>
cudaError_t launch_q(const DivergenceArgs& a, cudaStream_t stream) {
  switch (q_dtype(a)) {
    case DType::kFloat32: return launch_pq<kMode, TP, float>(a, stream);
    case DType::kBFloat16: return launch_pq<kMode, TP, __nv_bfloat16>(a, stream);
    default: return launch_pq<kMode, TP, __half>(a, stream);
  }
}

template <int kMode>
cudaError_t launch_p(const DivergenceArgs& a, cudaStream_t stream) {
  switch (p_dtype(a)) {
    case DType::kFloat32: return launch_q<kMode, float>(a, stream);
    case DType::kBFloat16: return launch_q<kMode, __nv_bfloat16>(a, stream);
    default: return launch_q<kMode, __half>(a, stream);
  }
}

}  // namespace detail

template <int kMode>
cudaError_t launch_mode(const DivergenceArgs& a, cudaStream_t stream) {
  return detail::launch_p<kMode>(a, stream);
}
// Each instantiated in its own translation unit, divergence_<mode>.cu.
extern template cudaError_t launch_mode<kKL>(const DivergenceArgs&, cudaStream_t);
extern template cudaError_t launch_mode<kSkew>(const DivergenceArgs&, cudaStream_t);
extern template cudaError_t launch_mode<kJSD>(const DivergenceArgs&, cudaStream_t);
extern template cudaError_t launch_mode<kTVD>(const DivergenceArgs&, cudaStream_t);

}  // namespace kdkernels::cuda
