// Divergence family, CUDA kernels: one block per row, three sweeps over it (the structure and
// the math of kdkernels/triton_kernels/divergence.py, whose header explains U_P, U_Q and c):
//   sweep 1  per-thread online max / sum-exp of both rows, then a block reduction → log-sum-exps
//   sweep 2  per-element terms: the loss, ΣU_P, ΣU_Q (block-reduced); KL with only the Q side
//            wanted writes g_Q = Q − P here and stops
//   sweep 3  g_P = c_P·(U_P − P·ΣU_P), g_Q = c_Q·(U_Q − Q·ΣU_Q) in the gradient dtype
// The row is read from HBM in sweep 1 and mostly from L2 after. Loads are 16-byte vectors
// (VEC elements) when the host found every row aligned, else scalar. Short rows (at most 64
// vectors) go one warp per row, 8 rows per block, with warp-only reductions. fp32 math throughout;
// every x·log-ratio is 0 where x == 0, so −inf logits and underflow never give NaN.
#include <cmath>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "divergence.cuh"

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

__device__ __forceinline__ float log_mix(float log_w, float log_1mw, float lx, float ly) {
  // log(w·x + (1−w)·y) from log x, log y, in log space (no log 0 when both underflow).
  const float u = lx + log_w, v = ly + log_1mw;
  const float hi = fmaxf(u, v), lo = fminf(u, v);
  return hi == kNegInf ? kNegInf : hi + log1pf(expf(lo - hi));
}

struct RowStats {
  float m_x, m_y, inv_zx, inv_zy, lse_x, lse_y;
};

struct Terms {
  float p, q, up, uq, el;
};

template <int kMode>
__device__ __forceinline__ Terms terms(float x, float y, const RowStats& st, float mix,
                                       float log_w, float log_1mw) {
  const float lp = x - st.lse_x, lq = y - st.lse_y;
  // P = exp(x − max)/Z, not exp(x − lse): the exponent is near 0 where P is large.
  const float p = expf(x - st.m_x) * st.inv_zx, q = expf(y - st.m_y) * st.inv_zy;
  if constexpr (kMode == kKL) {
    const float up = xlr(p, lp, lq);
    return {p, q, up, -p, up};
  } else if constexpr (kMode == kSkew) {
    const float lr = log_mix(log_w, log_1mw, lp, lq);
    const float el = xlr(p, lp, lr);
    const float p_over_r = p > 0.f ? expf(lp - lr) : 0.f;  // ≤ 1/α
    return {p, q, el - mix * p * p_over_r, q * p_over_r, el};
  } else if constexpr (kMode == kJSD) {
    const float lm = log_mix(log_w, log_1mw, lp, lq);
    const float up = xlr(p, lp, lm), uq = xlr(q, lq, lm);
    return {p, q, up, uq, mix * up + (1.f - mix) * uq};
  } else {  // TVD
    const float sg = p > q ? 1.f : (p < q ? -1.f : 0.f);
    return {p, q, p * sg, q * sg, 0.5f * fabsf(p - q)};
  }
}

// ---------------------------------------------------------------- block reductions
__device__ __forceinline__ void lse_merge(float& m, float& z, float m2, float z2) {
  const float mn = fmaxf(m, m2);
  if (mn == kNegInf) return;  // both empty
  z = z * expf(m - mn) + z2 * expf(m2 - mn);
  m = mn;
}

// Warp-wide merge of per-lane (max, sum-exp) pairs / warp-wide sum; every lane gets it.
__device__ __forceinline__ void warp_lse(float& m, float& z) {
  for (int o = 16; o > 0; o >>= 1) {
    lse_merge(m, z, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, z, o));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide merge of per-thread (max, sum-exp) pairs; every thread gets the result.
__device__ void block_lse(float& m, float& z, float* smem) {
  warp_lse(m, z);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // smem may still be read from a previous reduction
  if (lane == 0) {
    smem[warp] = m;
    smem[32 + warp] = z;
  }
  __syncthreads();
  m = kNegInf;
  z = 0.f;
  for (int k = 0; k < warps; ++k) lse_merge(m, z, smem[k], smem[32 + k]);
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
// VEC consecutive logits of P and Q at j0 (TAID applied, divided by T; −inf past V).
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
    const float si = s[i] / a.temperature;
    ti = ti / a.temperature;
    x[i] = a.swap ? si : ti;
    y[i] = a.swap ? ti : si;
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

// ---------------------------------------------------------------- the kernel
// kWarpRows: one warp per row (blockDim.x / 32 rows per block), else one block per row.
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
  auto row_lse = [&](float& m, float& z) {
    if (kWarpRows) warp_lse(m, z);
    else block_lse(m, z, smem);
  };
  auto row_sum = [&](float v) { return kWarpRows ? warp_sum(v) : block_sum(v, smem); };
  GS* gs = a.grad_student ? static_cast<GS*>(a.grad_student) + row * V : nullptr;
  GT* gt = a.grad_teacher ? static_cast<GT*>(a.grad_teacher) + row * V : nullptr;
  const bool need_p = a.swap ? gs != nullptr : gt != nullptr;
  const bool need_q = a.swap ? gt != nullptr : gs != nullptr;
  // P-side gradient → student if swap, else teacher (and the other way round for Q).
  auto store_side = [&](bool p_side, int64_t j0, const float (&g)[VEC]) {
    if (p_side == a.swap) store_vec<VEC>(gs, j0, V, g);
    else store_vec<VEC>(gt, j0, V, g);
  };

  const float w = a.row_weight[row];
  if (w == 0.f) {  // dropped row: never read, zero gradient
    float zero[VEC] = {};
    for (int64_t j0 = first; j0 < V; j0 += step) {
      if (gs) store_vec<VEC>(gs, j0, V, zero);
      if (gt) store_vec<VEC>(gt, j0, V, zero);
    }
    if (first == 0) a.loss_rows[row] = 0.f;
    return;
  }
  const TS* s_row = static_cast<const TS*>(a.student) + row * a.student_stride;
  const TT* t_row = static_cast<const TT*>(a.teacher) + row * a.teacher_stride;
  float x[VEC], y[VEC];

  // sweep 1: log-sum-exps
  float m_x = kNegInf, z_x = 0.f, m_y = kNegInf, z_y = 0.f;
  for (int64_t j0 = first; j0 < V; j0 += step) {
    load_xy<VEC>(s_row, t_row, j0, V, a, x, y);
    float bx = kNegInf, by = kNegInf;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      bx = fmaxf(bx, x[i]);
      by = fmaxf(by, y[i]);
    }
    float zx = 0.f, zy = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      zx += bx == kNegInf ? 0.f : expf(x[i] - bx);
      zy += by == kNegInf ? 0.f : expf(y[i] - by);
    }
    lse_merge(m_x, z_x, bx, zx);
    lse_merge(m_y, z_y, by, zy);
  }
  row_lse(m_x, z_x);
  row_lse(m_y, z_y);
  RowStats st;
  st.lse_x = m_x + logf(z_x);
  st.lse_y = m_y + logf(z_y);
  st.m_x = m_x == kNegInf ? 0.f : m_x;
  st.m_y = m_y == kNegInf ? 0.f : m_y;
  st.inv_zx = 1.f / z_x;
  st.inv_zy = 1.f / z_y;
  const float log_w = logf(a.mix), log_1mw = log1pf(-a.mix);
  const float q_factor = w * (a.swap ? a.gt_factor : a.gs_factor);
  const float p_factor = w * (a.swap ? a.gs_factor : a.gt_factor);
  const bool fused_q = kMode == kKL && need_q && !need_p;

  // sweep 2: the loss and ΣU
  float loss = 0.f, sum_up = 0.f, sum_uq = 0.f;
  for (int64_t j0 = first; j0 < V; j0 += step) {
    load_xy<VEC>(s_row, t_row, j0, V, a, x, y);
    float g[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const Terms r = terms<kMode>(x[i], y[i], st, a.mix, log_w, log_1mw);
      loss += r.el;
      sum_up += r.up;
      sum_uq += r.uq;
      g[i] = (r.q - r.p) * q_factor;
    }
    if (fused_q) store_side(false, j0, g);
  }
  loss = row_sum(loss);
  sum_up = row_sum(sum_up);
  sum_uq = row_sum(sum_uq);
  if (first == 0) a.loss_rows[row] = w * loss;
  if (fused_q || !(need_p || need_q)) return;

  // sweep 3: gradients
  const float cp = a.c_p * p_factor, cq = a.c_q * q_factor;
  for (int64_t j0 = first; j0 < V; j0 += step) {
    load_xy<VEC>(s_row, t_row, j0, V, a, x, y);
    float gp[VEC], gq[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const Terms r = terms<kMode>(x[i], y[i], st, a.mix, log_w, log_1mw);
      gp[i] = cp * (r.up - r.p * sum_up);
      gq[i] = cq * (r.uq - r.q * sum_uq);
    }
    if (need_p) store_side(true, j0, gp);
    if (need_q) store_side(false, j0, gq);
  }
}

// ---------------------------------------------------------------- dispatch

bool aligned(const void* p, int64_t stride_elems, size_t elem, int vec) {
  const size_t bytes = elem * vec;
  return reinterpret_cast<uintptr_t>(p) % bytes == 0 && (stride_elems * elem) % bytes == 0;
}

template <int kMode, typename TS, typename TT, bool kWarpRows>
cudaError_t launch_kernel(const DivergenceArgs& a, bool vec_ok, dim3 grid, int threads,
                          cudaStream_t stream) {
  constexpr int kVec = 16 / (sizeof(TS) > sizeof(TT) ? sizeof(TS) : sizeof(TT));
#ifdef KDKERNELS_CUDA_EMULATION  // the CPU emulation that tests the kernels' logic (python_tests)
  if (vec_ok) kdk_emulate_launch(divergence_fwd_kernel<kMode, kVec, TS, TT, kWarpRows>, grid, threads, a);
  else kdk_emulate_launch(divergence_fwd_kernel<kMode, 1, TS, TT, kWarpRows>, grid, threads, a);
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
    return launch_kernel<kMode, TS, TT, true>(a, vec_ok, grid, 32 * kRowsPerBlock, stream);
  }
  const int threads = chunks >= 8192 ? 1024 : chunks >= 2048 ? 512 : chunks >= 512 ? 256 : 128;
  return launch_kernel<kMode, TS, TT, false>(a, vec_ok, dim3(static_cast<unsigned>(a.n_rows)),
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
