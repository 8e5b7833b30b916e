// Divergence family, CUDA kernels. Both kernels make three sweeps over a row (the structure and
// the math of kdkernels/triton_kernels/divergence.py, whose header explains U_P, U_Q and c):
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
//            bytes the math must move. Rows up to 16 · 200 KiB of logits. On an H200 it was
//            not faster (the kernels are not yet bound by HBM; bench/results/2026-11-29-h200.md),
//            so it waits for the arithmetic to shrink further.
// Loads are 16-byte vectors (VEC elements) when the host found every row aligned, else
// scalar. fp32 math throughout, kept lean, as the kernels must keep pace with HBM: logits stay
// in input units (after TAID) and 1/T enters as a factor of (logit − row max), so there is no
// division per element, every exponent is relative to the row's maximum (large logits cost no
// precision), and each probability is one MUFU.EX2:  P = 2^((x − m)·log2(e)/T − log2 Z),
// log P = (x − m)/T − log Z.  Every x·log-ratio is 0 where x == 0, so −inf logits and
// underflow never give NaN.
#include <cmath>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "divergence.cuh"
#include "../kl_term.h"

namespace kdkernels::cuda {
namespace {

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
__host__ __device__ inline size_t cluster_smem_bytes(int64_t slice, size_t student_elem,
                                                     size_t teacher_elem) {
  return (slice * student_elem + 15) / 16 * 16 + (slice * teacher_elem + 15) / 16 * 16 +
         sizeof(ClusterSmem);
}

// The fewest ranks (a power of two) whose slices fit `budget` bytes (≤ 0: none, streaming).
ClusterPlan plan_cluster(int64_t V, size_t student_elem, size_t teacher_elem, int vec,
                         int64_t n_rows, int64_t budget) {
  if (budget <= 0) return {};
  for (int ranks = 1; ranks <= kMaxRanks; ranks *= 2) {
    const int64_t slice = ((V + ranks - 1) / ranks + 15) / 16 * 16;
    const int64_t bytes = slice * static_cast<int64_t>(student_elem + teacher_elem);
    if (bytes > budget && !(ranks == kMaxRanks && bytes <= kMaxSmemRowSlice)) continue;
    if (n_rows * ranks > 0x7fffffff) return {};
    ClusterPlan plan;
    plan.ranks = ranks;
    plan.slice = slice;
    const int64_t vectors = slice / vec;
    plan.threads = vectors >= 4096 ? 512 : vectors >= 1024 ? 256 : 128;
    plan.smem_bytes = cluster_smem_bytes(slice, student_elem, teacher_elem);
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
// log2(e)/T (c2), and each side's log Z (natural and base 2).
struct RowStats {
  float m_x, m_y, c, c2, lz_x, lz_y, l2z_x, l2z_y;
  float log_w, log_1mw;  // log(mix), log(1 − mix)
};

struct Terms {
  float p, q, up, uq, el;
};

// log(mix·P + (1 − mix)·Q) from log P, log Q, in log space: the rounding of log P and
// log Q cancels in log P − log M (logf of the mixture itself would add an ulp of |log M|,
// measured 40× the fp32 formula's error on JSD losses). Exact at mix = 0 and 1.
__device__ __forceinline__ float log_mix(const RowStats& st, float lp, float lq) {
  const float u = lp + st.log_w, v = lq + st.log_1mw;  // −inf + … at mix = 0 or 1: the other
  const float hi = fmaxf(u, v), lo = fminf(u, v);
  return hi == kNegInf ? kNegInf : hi + log1pf(fast_exp2((lo - hi) * kLog2e));
}

template <int kMode>
__device__ __forceinline__ Terms terms(float ax, float ay, const RowStats& st, float mix) {
  const float dx = ax - st.m_x, dy = ay - st.m_y;  // −inf for −inf logits: P = 0, log P = −inf
  const float p = fast_exp2(fmaf(dx, st.c2, -st.l2z_x)), q = fast_exp2(fmaf(dy, st.c2, -st.l2z_y));
  const float lp = fmaf(dx, st.c, -st.lz_x), lq = fmaf(dy, st.c, -st.lz_y);
  if constexpr (kMode == kKL) {
    return {p, q, xlr(p, lp, lq), -p, kdkernels::kl_term(p, q, lp - lq)};
  } else if constexpr (kMode == kSkew) {
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
// A NaN in z (a NaN or +inf logit was seen) survives every merge: the NaN rule.
__device__ __forceinline__ void lse_merge(float& m, float& z, float m2, float z2, float c2) {
  const float mn = fmaxf(m, m2);
  if (mn == kNegInf) {  // both empty: z and z2 are 0, or NaN
    z += z2;
    return;
  }
  z = z * fast_exp2((m - mn) * c2) + z2 * fast_exp2((m2 - mn) * c2);
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

// Block-wide merge of per-thread (max, sum-exp) pairs; every thread gets the result.
__device__ void block_lse(float& m, float& z, float c2, float* smem) {
  warp_lse(m, z, c2);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // smem may still be read from a previous reduction
  if (lane == 0) {
    smem[warp] = m;
    smem[32 + warp] = z;
  }
  __syncthreads();
  m = kNegInf;
  z = 0.f;
  for (int k = 0; k < warps; ++k) lse_merge(m, z, smem[k], smem[32 + k], c2);
}

// Block-wide sum; every thread gets the result.
__device__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int k = 0; k < warps; ++k) total += smem[k];
  return total;
}

// ---------------------------------------------------------------- row access
// VEC consecutive logits of P and Q at j0 (TAID applied, in input units; −inf past V).
template <int VEC, typename TS, typename TT>
__device__ __forceinline__ void load_xy(const TS* s_row, const TT* t_row, int64_t j0, int64_t V,
                                        const DivergenceArgs& a, float (&x)[VEC], float (&y)[VEC]) {
  float s[VEC], t[VEC];
  if (j0 + VEC <= V) {
    const Pack<TS, VEC> ps = *reinterpret_cast<const Pack<TS, VEC>*>(s_row + j0);
    const Pack<TT, VEC> pt = *reinterpret_cast<const Pack<TT, VEC>*>(t_row + j0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      s[i] = Elem<TS>::load(ps.v[i]);
      t[i] = Elem<TT>::load(pt.v[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      s[i] = j0 + i < V ? Elem<TS>::load(s_row[j0 + i]) : kNegInf;
      t[i] = j0 + i < V ? Elem<TT>::load(t_row[j0 + i]) : kNegInf;
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float ti = t[i];
    if (a.taid) ti = a.lam == 0.f ? s[i] : a.lam * ti + (1.f - a.lam) * s[i];  // −inf stays −inf
    x[i] = a.swap ? s[i] : ti;
    y[i] = a.swap ? ti : s[i];
  }
}

template <int VEC, typename G>
__device__ __forceinline__ void store_vec(G* row, int64_t j0, int64_t V, const float (&g)[VEC]) {
  if (j0 + VEC <= V) {
    Pack<G, VEC> pk;
#pragma unroll
    for (int i = 0; i < VEC; ++i) pk.v[i] = Elem<G>::store(g[i]);
    *reinterpret_cast<Pack<G, VEC>*>(row + j0) = pk;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if (j0 + i < V) row[j0 + i] = Elem<G>::store(g[i]);
    }
  }
}

// ---------------------------------------------------------------- the three sweeps
// One row, or one cluster rank's slice of it: s_row / t_row point at the slice's first logits
// (global or shared memory), n is its length, gs / gt its gradient (nullptr: not wanted); this
// thread takes vectors first, first + step, ...  Reduce holds the merges over everything that
// holds the row: lse(m_x, z_x, m_y, z_y) and sums(loss, ΣU_P, ΣU_Q), every thread getting the
// totals. Returns the row's w·L (every thread).
template <int kMode, int VEC, typename TS, typename TT, typename GS, typename GT, class Reduce>
__device__ __forceinline__ float row_sweeps(const DivergenceArgs& a, float w, const TS* s_row,
                                            const TT* t_row, int64_t n, GS* gs, GT* gt,
                                            int64_t first, int64_t step, Reduce& reduce) {
  const bool need_p = a.swap ? gs != nullptr : gt != nullptr;
  const bool need_q = a.swap ? gt != nullptr : gs != nullptr;
  // P-side gradient → student if swap, else teacher (and the other way round for Q).
  auto store_side = [&](bool p_side, int64_t j0, const float (&g)[VEC]) {
    if (p_side == a.swap) store_vec<VEC>(gs, j0, n, g);
    else store_vec<VEC>(gt, j0, n, g);
  };
  float x[VEC], y[VEC];

  // sweep 1: log-sum-exps, online: each vector's exponentials relative to the running maximum
  // (rescaled by one 2^x when the maximum grows)
  RowStats st;
  st.c = 1.f / a.temperature;
  st.c2 = kLog2e / a.temperature;
  float m_x = kNegInf, z_x = 0.f, m_y = kNegInf, z_y = 0.f;
  auto online = [&](float& m, float& z, const float (&v)[VEC]) {
    float mn = m;
#pragma unroll
    for (int i = 0; i < VEC; ++i) mn = fmaxf(mn, v[i]);
    if (mn == kNegInf) {  // nothing but −inf so far, or NaN (which fmaxf passes over)
#pragma unroll
      for (int i = 0; i < VEC; ++i) z += v[i] == kNegInf ? 0.f : v[i];  // NaN stays NaN
      return;
    }
    if (mn != m) z *= fast_exp2((m - mn) * st.c2);  // 0 while m is −inf (z is 0 then too)
    m = mn;
#pragma unroll
    for (int i = 0; i < VEC; ++i) z += fast_exp2((v[i] - mn) * st.c2);
  };
  for (int64_t j0 = first; j0 < n; j0 += step) {
    load_xy<VEC>(s_row, t_row, j0, n, a, x, y);
    online(m_x, z_x, x);
    online(m_y, z_y, y);
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
  st.log_w = logf(a.mix);
  st.log_1mw = log1pf(-a.mix);
  const float q_factor = w * (a.swap ? a.gt_factor : a.gs_factor);
  const float p_factor = w * (a.swap ? a.gs_factor : a.gt_factor);
  const bool fused_q = kMode == kKL && need_q && !need_p;

  // sweep 2: the loss and ΣU
  float loss = 0.f, sum_up = 0.f, sum_uq = 0.f;
  for (int64_t j0 = first; j0 < n; j0 += step) {
    load_xy<VEC>(s_row, t_row, j0, n, a, x, y);
    float g[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const Terms r = terms<kMode>(x[i], y[i], st, a.mix);
      loss += r.el;
      if constexpr (kMode != kKL) {  // KL: ΣU_P is the loss and ΣU_Q = −ΣP = −1 (below)
        sum_up += r.up;
        sum_uq += r.uq;
      }
      g[i] = (r.q - r.p) * q_factor;
    }
    if (fused_q) store_side(false, j0, g);
  }
  reduce.sums(loss, sum_up, sum_uq);
  if constexpr (kMode == kKL) {
    sum_up = loss;
    sum_uq = -1.f;  // so g_Q = c_Q·(Q − P), as in the fused sweep
  }
  if (fused_q || !(need_p || need_q)) return w * loss;

  // sweep 3: gradients
  const float cp = a.c_p * p_factor, cq = a.c_q * q_factor;
  for (int64_t j0 = first; j0 < n; j0 += step) {
    load_xy<VEC>(s_row, t_row, j0, n, a, x, y);
    float gp[VEC], gq[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const Terms r = terms<kMode>(x[i], y[i], st, a.mix);
      gp[i] = cp * (r.up - r.p * sum_up);
      gq[i] = cq * (r.uq - r.q * sum_uq);
    }
    if (need_p) store_side(true, j0, gp);
    if (need_q) store_side(false, j0, gq);
  }
  return w * loss;
}

// A dropped row (w = 0) is never read: zero gradient over the slice.
template <int VEC, typename GS, typename GT>
__device__ __forceinline__ void zero_slice(GS* gs, GT* gt, int64_t n, int64_t first, int64_t step) {
  const float zero[VEC] = {};
  for (int64_t j0 = first; j0 < n; j0 += step) {
    if (gs) store_vec<VEC>(gs, j0, n, zero);
    if (gt) store_vec<VEC>(gt, j0, n, zero);
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

template <int kMode, int VEC, typename TS, typename TT, bool kWarpRows>
__global__ void __launch_bounds__(1024) divergence_fwd_kernel(const DivergenceArgs a) {
  using GS = typename GradOf<TS>::type;
  using GT = typename GradOf<TT>::type;
  __shared__ float smem[64];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = kWarpRows ? static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + warp
                                : static_cast<int64_t>(blockIdx.x);
  if (kWarpRows && row >= a.n_rows) return;  // the last block's spare warps
  const int64_t V = a.vocab;
  const int64_t step = static_cast<int64_t>(kWarpRows ? 32 : blockDim.x) * VEC;
  const int64_t first = static_cast<int64_t>(kWarpRows ? lane : threadIdx.x) * VEC;
  GS* gs = a.grad_student ? static_cast<GS*>(a.grad_student) + row * V : nullptr;
  GT* gt = a.grad_teacher ? static_cast<GT*>(a.grad_teacher) + row * V : nullptr;
  const float w = a.row_weight[row];
  float loss = 0.f;
  if (w == 0.f) {
    zero_slice<VEC>(gs, gt, V, first, step);
  } else {
    StreamingReduce<kWarpRows> reduce{smem};
    loss = row_sweeps<kMode, VEC>(a, w, static_cast<const TS*>(a.student) + row * a.student_stride,
                                  static_cast<const TT*>(a.teacher) + row * a.teacher_stride, V,
                                  gs, gt, first, step, reduce);
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
template <int kMode, int VEC, typename TS, typename TT>
__global__ void __launch_bounds__(512) divergence_fwd_cluster_kernel(const DivergenceArgs a,
                                                                     int64_t slice) {
#ifndef KDK_HAS_CLUSTERS
  __trap();  // never launched: the host launches it only where the binary is sm_90+
#else
  using GS = typename GradOf<TS>::type;
  using GT = typename GradOf<TT>::type;
  auto cluster = cooperative_groups::this_cluster();
  const unsigned rank = cluster.block_rank();
  const int64_t row = blockIdx.x / cluster.num_blocks();
  const int64_t V = a.vocab, begin = rank * slice;
  const int64_t n = begin < V ? (V - begin < slice ? V - begin : slice) : 0;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC, first = threadIdx.x * VEC;
  GS* gs = a.grad_student ? static_cast<GS*>(a.grad_student) + row * V + begin : nullptr;
  GT* gt = a.grad_teacher ? static_cast<GT*>(a.grad_teacher) + row * V + begin : nullptr;
  const float w = a.row_weight[row];
  if (w == 0.f) {  // the whole cluster leaves here: no rank reads another's memory
    zero_slice<VEC>(gs, gt, n, first, step);
    if (rank == 0 && threadIdx.x == 0) a.loss_rows[row] = 0.f;
    return;
  }
  unsigned char* smem = dynamic_smem();
  TS* s_sm = reinterpret_cast<TS*>(smem);
  TT* t_sm = reinterpret_cast<TT*>(smem + (slice * sizeof(TS) + 15) / 16 * 16);
  auto* sm = reinterpret_cast<ClusterSmem*>(smem + cluster_smem_bytes(slice, sizeof(TS), sizeof(TT)) -
                                            sizeof(ClusterSmem));
  // The copy, kBatch vectors of each input in flight per thread: all loads, then all stores.
  const TS* s_row = static_cast<const TS*>(a.student) + row * a.student_stride + begin;
  const TT* t_row = static_cast<const TT*>(a.teacher) + row * a.teacher_stride + begin;
  constexpr int kBatch = 4;
  int64_t j0 = first;
  for (; j0 + (kBatch - 1) * step + VEC <= n; j0 += kBatch * step) {
    Pack<TS, VEC> ps[kBatch];
    Pack<TT, VEC> pt[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      ps[u] = *reinterpret_cast<const Pack<TS, VEC>*>(s_row + j0 + u * step);
      pt[u] = *reinterpret_cast<const Pack<TT, VEC>*>(t_row + j0 + u * step);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      *reinterpret_cast<Pack<TS, VEC>*>(s_sm + j0 + u * step) = ps[u];
      *reinterpret_cast<Pack<TT, VEC>*>(t_sm + j0 + u * step) = pt[u];
    }
  }
  for (; j0 < n; j0 += step) {  // the rest, one vector (or the partial last one) at a time
    for (int64_t j = j0; j < j0 + VEC && j < n; ++j) s_sm[j] = s_row[j], t_sm[j] = t_row[j];
  }
  ClusterReduce<decltype(cluster)> reduce{cluster, sm};
  const float loss = row_sweeps<kMode, VEC>(a, w, s_sm, t_sm, n, gs, gt, first, step, reduce);
  if (rank == 0 && threadIdx.x == 0) a.loss_rows[row] = loss;
  cluster.sync();  // no block leaves while another rank may still read its partials
#endif
}

// ---------------------------------------------------------------- dispatch

bool aligned(const void* p, int64_t stride_elems, size_t elem, int vec) {
  const size_t bytes = elem * vec;
  return reinterpret_cast<uintptr_t>(p) % bytes == 0 && (stride_elems * elem) % bytes == 0;
}

template <int kMode, typename TS, typename TT, bool kWarpRows>
cudaError_t launch_streaming(const DivergenceArgs& a, bool vec_ok, dim3 grid, int threads,
                             cudaStream_t stream) {
  constexpr int kVec = 16 / (sizeof(TS) > sizeof(TT) ? sizeof(TS) : sizeof(TT));
#ifdef KDKERNELS_CUDA_EMULATION  // the CPU emulation that tests the kernels' logic (python_tests)
  if (vec_ok) kdk_emulate_launch(divergence_fwd_kernel<kMode, kVec, TS, TT, kWarpRows>, grid, threads, 1, 0, a);
  else kdk_emulate_launch(divergence_fwd_kernel<kMode, 1, TS, TT, kWarpRows>, grid, threads, 1, 0, a);
  (void)stream;
#else
  if (vec_ok) {
    divergence_fwd_kernel<kMode, kVec, TS, TT, kWarpRows><<<grid, threads, 0, stream>>>(a);
  } else {
    divergence_fwd_kernel<kMode, 1, TS, TT, kWarpRows><<<grid, threads, 0, stream>>>(a);
  }
#endif
  return cudaGetLastError();
}

// Launches the cluster kernel for `plan`; false (nothing launched) where this GPU or this
// binary has no clusters, or the plan's blocks cannot be co-scheduled.
template <int kMode, int VEC, typename TS, typename TT>
bool launch_cluster(const DivergenceArgs& a, const ClusterPlan& plan, cudaStream_t stream) {
  const auto kernel = divergence_fwd_cluster_kernel<kMode, VEC, TS, TT>;
  const dim3 grid(static_cast<unsigned>(a.n_rows * plan.ranks));
#ifdef KDKERNELS_CUDA_EMULATION
  kdk_emulate_launch(kernel, grid, plan.threads, plan.ranks, plan.smem_bytes, a, plan.slice);
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
  if (cudaLaunchKernelEx(&cfg, kernel, a, plan.slice) != cudaSuccess) {
    cudaGetLastError();
    last.ok = false;
    return false;
  }
  return true;
#endif
}

template <int kMode, typename TS, typename TT>
cudaError_t launch(const DivergenceArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / (sizeof(TS) > sizeof(TT) ? sizeof(TS) : sizeof(TT));
  const bool vec_ok = aligned(a.student, a.student_stride, sizeof(TS), kVec) &&
                      aligned(a.teacher, a.teacher_stride, sizeof(TT), kVec) &&
                      a.vocab % kVec == 0;  // gradient rows (stride V) aligned too
  const int64_t chunks = (a.vocab + kVec - 1) / kVec;  // vectors per row
  if (chunks <= 64) {  // short rows: one warp each, 8 per block
    constexpr int kRowsPerBlock = 8;
    const dim3 grid(static_cast<unsigned>((a.n_rows + kRowsPerBlock - 1) / kRowsPerBlock));
    return launch_streaming<kMode, TS, TT, true>(a, vec_ok, grid, 32 * kRowsPerBlock, stream);
  }
  const ClusterPlan plan = plan_cluster(a.vocab, sizeof(TS), sizeof(TT), vec_ok ? kVec : 1,
                                        a.n_rows, a.smem_row_budget);
  if (plan.ranks > 0) {
    const bool launched = vec_ok ? launch_cluster<kMode, kVec, TS, TT>(a, plan, stream)
                                 : launch_cluster<kMode, 1, TS, TT>(a, plan, stream);
    if (launched) return cudaSuccess;
  }
  const int threads = chunks >= 8192 ? 1024 : chunks >= 2048 ? 512 : chunks >= 512 ? 256 : 128;
  return launch_streaming<kMode, TS, TT, false>(a, vec_ok, dim3(static_cast<unsigned>(a.n_rows)),
                                                threads, stream);
}

template <int kMode, typename TS>
cudaError_t launch_t(const DivergenceArgs& a, cudaStream_t stream) {
  switch (a.teacher_dtype) {
    case DType::kFloat32: return launch<kMode, TS, float>(a, stream);
    case DType::kBFloat16: return launch<kMode, TS, __nv_bfloat16>(a, stream);
    default: return launch<kMode, TS, __half>(a, stream);
  }
}

template <int kMode>
cudaError_t launch_st(const DivergenceArgs& a, cudaStream_t stream) {
  switch (a.student_dtype) {
    case DType::kFloat32: return launch_t<kMode, float>(a, stream);
    case DType::kBFloat16: return launch_t<kMode, __nv_bfloat16>(a, stream);
    default: return launch_t<kMode, __half>(a, stream);
  }
}

}  // namespace

cudaError_t divergence_fwd(const DivergenceArgs& a, cudaStream_t stream) {
  if (a.n_rows == 0) return cudaSuccess;
  if (a.n_rows > 0x7fffffff || a.vocab < 1) return cudaErrorInvalidValue;
  switch (a.mode) {
    case kKL: return launch_st<kKL>(a, stream);
    case kSkew: return launch_st<kSkew>(a, stream);
    case kJSD: return launch_st<kJSD>(a, stream);
    case kTVD: return launch_st<kTVD>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kdkernels::cuda
