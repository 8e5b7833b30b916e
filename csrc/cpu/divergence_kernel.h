// Row kernel of the divergence family, written once with ATen's Vectorized<float> and
// compiled per instruction set: the including file defines CPU_CAPABILITY(_X) and
// KD_ROWS_FN. Math and names follow kdkernels/triton_kernels/divergence.py:
//   pass 1  rows → fp32 scratch X (P logits) and Y (Q logits), padded with −inf; maxima
//   pass 2  X ← (X − max X)/T, Y likewise (the maximum subtracted in input units, so tiny T
//           loses nothing), EX = exp(X), EY = exp(Y) and their sums → log-sum-exps. A row whose
//           sums are not > 0 (NaN or +inf inputs, or all −inf) gets NaN loss and gradients.
//           KL: also Σ e^x·(x − y) (x, y relative to their maxima), which gives the loss:
//           KL(P‖Q) = Σe^x(x−y)/Zx − log Zx + log Zy; then one gradient pass
//           (g_Q = Q − P, g_P = P·(log P − log Q − KL)) and done
//   pass 3  P, Q, log P, log Q; U_P, U_Q (stored over X, Y), the loss, ΣU_P, ΣU_Q
//   pass 4  g_P = c_P·(U_P − P·ΣU_P),  g_Q = c_Q·(U_Q − Q·ΣU_Q), written in the input dtype
// A row of V floats ×4 stays in L2 for V up to ~32k, so DRAM sees each input once and each
// gradient once. Every x·log-ratio is 0 where x == 0: no NaN from −inf logits or underflow.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../kl_term.h"
#include "divergence.h"

namespace kdkernels::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline Vec xlr(const Vec& x, const Vec& lx, const Vec& ly) {  // x·(lx − ly), 0 where x == 0
  return Vec::blendv(Vec(0.f), x * (lx - ly), x > Vec(0.f));
}

// kl_term of csrc/kl_term.h (y·φ(log x − log y), the KL term that is ≥ 0), vectorized.
inline Vec kl_term(const Vec& x, const Vec& y, const Vec& v) {
  const Vec small = v.abs() < Vec(0.5f);
  const Vec vs = Vec::blendv(Vec(0.f), v, small);
  const Vec poly = phi_series(vs);
  const Vec big = x * (Vec::blendv(v, Vec(0.f), small) - Vec(1.f)) + y;
  return Vec::blendv(y, Vec::blendv(big, y * poly * vs * vs, small), x > Vec(0.f));
}

inline Vec log_mix_logspace(float log_w, float log_1mw, const Vec& lx, const Vec& ly) {
  // log(w·x + (1−w)·y) from log x, log y, in log space: no log 0 when both underflow.
  const Vec u = lx + Vec(log_w), v = ly + Vec(log_1mw);
  const Vec hi = at::vec::maximum(u, v), lo = at::vec::minimum(u, v);
  const Vec hi_is_ninf = hi == Vec(kNegInf);
  const Vec safe_hi = Vec::blendv(hi, Vec(0.f), hi_is_ninf);
  return Vec::blendv(hi + (lo - safe_hi).exp().log1p(), hi, hi_is_ninf);
}

inline Vec log_mix(const Vec& m, float log_w, float log_1mw, const Vec& lx, const Vec& ly) {
  // log m, m = w·x + (1−w)·y: one log where the mixture is a normal float (a third of the
  // log-space form's cost; the losses' φ sums keep fp32 PyTorch's precision with it); the
  // log-space form in the lanes where it underflows.
  const Vec tiny = m < Vec(1e-30f);
  Vec lm = m.log();
  if (tiny.zero_mask() != (1 << kW) - 1) {  // some lane is tiny
    lm = Vec::blendv(lm, log_mix_logspace(log_w, log_1mw, lx, ly), tiny);
  }
  return lm;
}

void store_row_any(c10::ScalarType dt, void* base, int64_t row, int64_t n, const float* src) {
  switch (dt) {
    case c10::ScalarType::Float:
      std::memcpy(static_cast<float*>(base) + row * n, src, n * sizeof(float));
      return;
    case c10::ScalarType::BFloat16:
      at::vec::convert(src, static_cast<c10::BFloat16*>(base) + row * n, n);
      return;
    default:
      at::vec::convert(src, static_cast<c10::Half*>(base) + row * n, n);
  }
}

void zero_row_any(c10::ScalarType dt, void* base, int64_t row, int64_t n) {
  const size_t bytes = c10::elementSize(dt);
  std::memset(static_cast<char*>(base) + row * n * bytes, 0, n * bytes);
}

void nan_row_any(c10::ScalarType dt, void* base, int64_t row, int64_t n) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  switch (dt) {
    case c10::ScalarType::Float:
      std::fill_n(static_cast<float*>(base) + row * n, n, nan);
      return;
    case c10::ScalarType::BFloat16:
      std::fill_n(static_cast<c10::BFloat16*>(base) + row * n, n, c10::BFloat16(nan));
      return;
    default:
      std::fill_n(static_cast<c10::Half*>(base) + row * n, n, c10::Half(nan));
  }
}

// P, Q, U_P, U_Q and the loss term of one vector of a row (see the file comment).
struct Terms {
  Vec p, q, up, uq, el;
};

template <int64_t kMode>
inline Terms terms(const Vec& x, const Vec& y, const Vec& ex, const Vec& ey, float lse_x,
                   float lse_y, float inv_zx, float inv_zy, float mix, float log_w, float log_1mw) {
  // (Every Vec is built from a value: ATen's default constructor is not inlined.)
  const Vec lp = x - Vec(lse_x), lq = y - Vec(lse_y);
  const Vec p = ex * Vec(inv_zx), q = ey * Vec(inv_zy);
  if constexpr (kMode == kKL) {
    return Terms{p, q, xlr(p, lp, lq), Vec(0.f) - p, kl_term(p, q, lp - lq)};
  } else if constexpr (kMode == kSkew) {
    const Vec r = Vec(mix) * p + Vec(1.f - mix) * q;
    const Vec lr = log_mix(r, log_w, log_1mw, lp, lq);
    const Vec p_over_r = Vec::blendv(Vec(0.f), (lp - lr).exp(), p > Vec(0.f));  // ≤ 1/α
    return Terms{p, q, xlr(p, lp, lr) - Vec(mix) * p * p_over_r, q * p_over_r,
                 kl_term(p, r, lp - lr)};
  } else if constexpr (kMode == kJSD) {
    const Vec m = Vec(mix) * p + Vec(1.f - mix) * q;
    const Vec lm = log_mix(m, log_w, log_1mw, lp, lq);
    const Vec up = xlr(p, lp, lm), uq = xlr(q, lq, lm);
    return Terms{p, q, up, uq,
                 Vec(mix) * kl_term(p, m, lp - lm) + Vec(1.f - mix) * kl_term(q, m, lq - lm)};
  } else {  // TVD
    const Vec sg = ((p > q) & Vec(1.f)) - ((p < q) & Vec(1.f));
    return Terms{p, q, p * sg, q * sg, Vec(0.5f) * (p - q).abs()};
  }
}

double reduce_sum(const Vec& v) {
  float lanes[kW];
  v.store(lanes);
  double s = 0;
  for (int64_t k = 0; k < kW; ++k) s += lanes[k];
  return s;
}

// The fp32 view of one input row: the row itself if it is fp32, else converted into dst.
const float* row_as_float(c10::ScalarType dt, const void* base, int64_t stride, int64_t row,
                          int64_t V, float* dst) {
  switch (dt) {
    case c10::ScalarType::Float: return static_cast<const float*>(base) + row * stride;
    case c10::ScalarType::BFloat16:
      at::vec::convert(static_cast<const c10::BFloat16*>(base) + row * stride, dst, V);
      return dst;
    default:
      at::vec::convert(static_cast<const c10::Half*>(base) + row * stride, dst, V);
      return dst;
  }
}

// Store to a gradient row that goes to memory and is not read again soon: a streaming store
// (no read-for-ownership of the line) where the instruction set has one and ptr is aligned.
inline void store_stream(const Vec& v, float* ptr) {
#if defined(CPU_CAPABILITY_AVX512)
  if ((reinterpret_cast<uintptr_t>(ptr) & 63) == 0) return _mm512_stream_ps(ptr, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if ((reinterpret_cast<uintptr_t>(ptr) & 31) == 0) return _mm256_stream_ps(ptr, v);
#endif
  v.store(ptr);
}

// Prefetch (towards L2) the part `step` of `steps` of a byte range: spread over a compute loop
// on the current row, it brings the next row in while the current one is being computed on.
inline void prefetch_part(const char* base, int64_t bytes, int64_t step, int64_t steps) {
  const int64_t chunk = ((bytes + steps - 1) / steps + 63) / 64 * 64;
  const int64_t begin = step * chunk, end = std::min(bytes, begin + chunk);
  for (int64_t b = begin; b < end; b += 64) __builtin_prefetch(base + b, 0, 2);
}

// A vector of src at j (−inf past V).
inline Vec load_padded(const float* src, int64_t j, int64_t V) {
  if (j + kW <= V) return Vec::loadu(src + j);
  if (j >= V) return Vec(kNegInf);
  return Vec::set(Vec(kNegInf), Vec::loadu(src + j, V - j), V - j);
}

// Row i of both inputs → fp32 scratch X (P's side) and Y (Q's side), the student's and the
// teacher's in either order (swap), padded with −inf to Vp; TAID's target λ·t + (1−λ)·s
// formed (0 < λ < 1: −inf entries stay −inf); the rows' maxima.
inline void load_rows(const DivergenceParams& p, int64_t i, int64_t Vp, float* X, float* Y,
                      float& max_s, float& max_t) {
  const int64_t V = p.vocab;
  float* student_row = p.swap ? X : Y;
  float* teacher_row = p.swap ? Y : X;
  const float* s_in = row_as_float(p.student_dtype, p.student, p.student_stride, i, V, student_row);
  const float* t_in = row_as_float(p.teacher_dtype, p.teacher, p.teacher_stride, i, V, teacher_row);
  Vec ms(kNegInf), mt(kNegInf);
  for (int64_t j = 0; j < Vp; j += kW) {
    Vec s = load_padded(s_in, j, V), t = load_padded(t_in, j, V);
    if (p.taid) t = p.lam == 0.f ? s : Vec(p.lam) * t + Vec(1.f - p.lam) * s;
    s.store(student_row + j);
    t.store(teacher_row + j);
    ms = at::vec::maximum(ms, s);
    mt = at::vec::maximum(mt, t);
  }
  auto vmax = [](Vec& a, Vec& b) { return at::vec::maximum(a, b); };
  max_s = at::vec::vec_reduce_all<float>(vmax, ms);
  max_t = at::vec::vec_reduce_all<float>(vmax, mt);
}

template <int64_t kMode>
void rows_mode(const DivergenceParams& p, int64_t begin, int64_t end) {
  // Rows are padded to Vp, a multiple of two vectors (two accumulators hide add latency).
  const int64_t V = p.vocab, Vp = (V + 2 * kW - 1) / (2 * kW) * (2 * kW);
  // Scratch: X, Y (P and Q logits/T, then U_P, U_Q), EX, EY (exponentials, then gradients).
  std::vector<float> scratch(4 * Vp, 0.f);
  float *X = scratch.data(), *Y = X + Vp, *EX = Y + Vp, *EY = EX + Vp;
  const bool grad_s = p.grad_student != nullptr, grad_t = p.grad_teacher != nullptr;
  const bool need_p = p.swap ? grad_s : grad_t, need_q = p.swap ? grad_t : grad_s;
  const float log_w = std::log(p.mix), log_1mw = std::log1p(-p.mix);
  const float inv_t = 1.f / p.temperature;

  for (int64_t i = begin; i < end; ++i) {
    const float w = p.row_weight[i];
    if (w == 0.f) {  // dropped row: never read, zero gradient
      p.loss_rows[i] = 0.f;
      if (grad_s) zero_row_any(p.grad_student_dtype, p.grad_student, i, V);
      if (grad_t) zero_row_any(p.grad_teacher_dtype, p.grad_teacher, i, V);
      continue;
    }
    // pass 1: rows → fp32 scratch, TAID, maxima. This is the one read of the inputs from memory.
    float max_s, max_t;
    load_rows(p, i, Vp, X, Y, max_s, max_t);
    const float mx = p.swap ? max_s : max_t, my = p.swap ? max_t : max_s;

    // pass 2: exponentials and log-sum-exps
    const float sx = mx == kNegInf ? 0.f : mx, sy = my == kNegInf ? 0.f : my;
    // The next row's inputs, prefetched during passes 2 (student) and 3 (teacher).
    const bool prefetch = i + 1 < end;
    const char* next_s = static_cast<const char*>(p.student) +
                         (i + 1) * p.student_stride * c10::elementSize(p.student_dtype);
    const char* next_t = static_cast<const char*>(p.teacher) +
                         (i + 1) * p.teacher_stride * c10::elementSize(p.teacher_dtype);
    const int64_t s_bytes = V * c10::elementSize(p.student_dtype);
    const int64_t t_bytes = V * c10::elementSize(p.teacher_dtype);
    const int64_t steps = Vp / (2 * kW);

    Vec zx0(0.f), zy0(0.f), zx1(0.f), zy1(0.f), a0(0.f), a1(0.f);
    for (int64_t j = 0; j < Vp; j += 2 * kW) {
      if (prefetch) {
        prefetch_part(next_s, s_bytes, j / (2 * kW), steps);
        if (kMode == kKL) prefetch_part(next_t, t_bytes, j / (2 * kW), steps);
      }
      const Vec x0 = (Vec::loadu(X + j) - Vec(sx)) * Vec(inv_t);
      const Vec y0 = (Vec::loadu(Y + j) - Vec(sy)) * Vec(inv_t);
      const Vec x1 = (Vec::loadu(X + j + kW) - Vec(sx)) * Vec(inv_t);
      const Vec y1 = (Vec::loadu(Y + j + kW) - Vec(sy)) * Vec(inv_t);
      x0.store(X + j);  // from here on X, Y hold (logit − max)/T
      y0.store(Y + j);
      x1.store(X + j + kW);
      y1.store(Y + j + kW);
      const Vec ex0 = x0.exp(), ey0 = y0.exp(), ex1 = x1.exp(), ey1 = y1.exp();
      ex0.store(EX + j);
      ey0.store(EY + j);
      ex1.store(EX + j + kW);
      ey1.store(EY + j + kW);
      zx0 = zx0 + ex0;
      zy0 = zy0 + ey0;
      zx1 = zx1 + ex1;
      zy1 = zy1 + ey1;
      if constexpr (kMode == kKL) {  // Σ e^x·(x − y), both relative to their maxima
        a0 = a0 + xlr(ex0, x0, y0);
        a1 = a1 + xlr(ex1, x1, y1);
      }
    }
    const double zxd = reduce_sum(zx0) + reduce_sum(zx1), zyd = reduce_sum(zy0) + reduce_sum(zy1);
    if (!(zxd > 0.0) || !(zyd > 0.0)) {  // the NaN rule: no distribution on one side
      p.loss_rows[i] = std::numeric_limits<float>::quiet_NaN();
      if (grad_s) nan_row_any(p.grad_student_dtype, p.grad_student, i, V);
      if (grad_t) nan_row_any(p.grad_teacher_dtype, p.grad_teacher, i, V);
      continue;
    }
    // log-sum-exps of the max-relative X, Y
    const float lse_x = static_cast<float>(std::log(zxd));
    const float lse_y = static_cast<float>(std::log(zyd));
    const float inv_zx = static_cast<float>(1.0 / zxd), inv_zy = static_cast<float>(1.0 / zyd);

    // Gradients go straight into fp32 outputs, else through EX (P side) / EY (Q side).
    const float q_factor = w * (p.swap ? p.gt_factor : p.gs_factor);
    const float p_factor = w * (p.swap ? p.gs_factor : p.gt_factor);
    auto out_row = [&](bool student_side) -> float* {
      void* base = student_side ? p.grad_student : p.grad_teacher;
      const c10::ScalarType dt = student_side ? p.grad_student_dtype : p.grad_teacher_dtype;
      if (base != nullptr && dt == c10::ScalarType::Float && V == Vp)
        return static_cast<float*>(base) + i * V;
      return nullptr;
    };
    float* GP = need_p ? out_row(p.swap) : nullptr;   // P side is the student's if swap
    float* GQ = need_q ? out_row(!p.swap) : nullptr;
    float* gp = GP ? GP : EX;
    float* gq = GQ ? GQ : EY;

    if constexpr (kMode == kKL) {
      // The loss is Σ Q·φ(lP − lQ) (kl_term), summed in the one gradient pass (a pass of its
      // own when no gradient is wanted). The gradients need KL only at fp32 precision, in
      // closed form: KL = Σ e^x·(x − y)/Zx − log Zx + log Zy (x, y max-relative).
      const double kl = (reduce_sum(a0) + reduce_sum(a1)) / zxd - std::log(zxd) + std::log(zyd);
      // g_Q = Q − P;  g_P = P·(lP − lQ − KL)
      const float log_ratio_z = static_cast<float>(std::log(zyd) - std::log(zxd) - kl);
      Vec acc0(0.f), acc1(0.f);
      for (int64_t j = 0; j < Vp; j += 2 * kW) {
        for (int k = 0; k < 2; ++k) {
          const int64_t jk = j + k * kW;
          const Vec xv = Vec::loadu(X + jk), yv = Vec::loadu(Y + jk);
          const Vec pv = Vec::loadu(EX + jk) * Vec(inv_zx), qv = Vec::loadu(EY + jk) * Vec(inv_zy);
          const Vec term = kl_term(pv, qv, (xv - Vec(lse_x)) - (yv - Vec(lse_y)));
          if (k == 0) acc0 = acc0 + term;
          else acc1 = acc1 + term;
          if (need_q) store_stream((qv - pv) * Vec(q_factor), gq + jk);
          if (need_p) store_stream(Vec(p_factor) * xlr(pv, xv - yv + Vec(log_ratio_z), Vec(0.f)), gp + jk);
        }
      }
      p.loss_rows[i] = static_cast<float>(w * (reduce_sum(acc0) + reduce_sum(acc1)));
    } else {  // other modes: passes 3 and 4
      // pass 3: the loss and ΣU
      Vec acc_el[2] = {Vec(0.f), Vec(0.f)}, acc_up[2] = {Vec(0.f), Vec(0.f)},
          acc_uq[2] = {Vec(0.f), Vec(0.f)};
      for (int64_t j0 = 0; j0 < Vp; j0 += 2 * kW) {
        if (prefetch) prefetch_part(next_t, t_bytes, j0 / (2 * kW), steps);
        for (int k = 0; k < 2; ++k) {
          const int64_t j = j0 + k * kW;
          const Terms r = terms<kMode>(Vec::loadu(X + j), Vec::loadu(Y + j), Vec::loadu(EX + j),
                                       Vec::loadu(EY + j), lse_x, lse_y, inv_zx, inv_zy, p.mix,
                                       log_w, log_1mw);
          acc_el[k] = acc_el[k] + r.el;
          acc_up[k] = acc_up[k] + r.up;
          acc_uq[k] = acc_uq[k] + r.uq;
          r.up.store(X + j);
          r.uq.store(Y + j);
        }
      }
      p.loss_rows[i] = static_cast<float>(w * (reduce_sum(acc_el[0]) + reduce_sum(acc_el[1])));
      const float sum_up = static_cast<float>(reduce_sum(acc_up[0]) + reduce_sum(acc_up[1]));
      const float sum_uq = static_cast<float>(reduce_sum(acc_uq[0]) + reduce_sum(acc_uq[1]));

      // pass 4: g_P = c_P·(U_P − P·ΣU_P), g_Q = c_Q·(U_Q − Q·ΣU_Q)
      if (need_p || need_q) {
        const float cp = p.c_p * p_factor, cq = p.c_q * q_factor;
        for (int64_t j = 0; j < Vp; j += kW) {
          if (need_p) {
            const Vec pv = Vec::loadu(EX + j) * Vec(inv_zx);
            store_stream(Vec(cp) * (Vec::loadu(X + j) - pv * Vec(sum_up)), gp + j);
          }
          if (need_q) {
            const Vec qv = Vec::loadu(EY + j) * Vec(inv_zy);
            store_stream(Vec(cq) * (Vec::loadu(Y + j) - qv * Vec(sum_uq)), gq + j);
          }
        }
      }
    }
    // Hand the gradients not written in place to the student / teacher buffers.
    if (need_p && !GP) store_row_any(p.swap ? p.grad_student_dtype : p.grad_teacher_dtype,
                                     p.swap ? p.grad_student : p.grad_teacher, i, V, EX);
    if (need_q && !GQ) store_row_any(p.swap ? p.grad_teacher_dtype : p.grad_student_dtype,
                                     p.swap ? p.grad_teacher : p.grad_student, i, V, EY);
  }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // streaming stores are visible before the parallel region ends
#endif
}

// The vocabulary-parallel form: the passes above split where the ranks' row statistics are
// summed (divergence.h: DivergenceShardPhase; kdkernels/ops/vocab_parallel.py runs the
// all-reduces between the phases). Each phase reads its rows from memory once.
template <int64_t kMode>
void shard_rows_mode(const DivergenceParams& p, int64_t phase, double* stats, int64_t begin,
                     int64_t end) {
  const int64_t V = p.vocab, Vp = (V + kW - 1) / kW * kW;
  std::vector<float> scratch(4 * Vp, 0.f);
  float *X = scratch.data(), *Y = X + Vp, *EX = Y + Vp, *EY = EX + Vp;
  const bool grad_s = p.grad_student != nullptr, grad_t = p.grad_teacher != nullptr;
  const bool need_p = p.swap ? grad_s : grad_t, need_q = p.swap ? grad_t : grad_s;
  const float log_w = std::log(p.mix), log_1mw = std::log1p(-p.mix);
  const float inv_t = 1.f / p.temperature;
  for (int64_t i = begin; i < end; ++i) {
    double* st = stats + i * kShardStats;
    const float w = p.row_weight[i];
    if (w == 0.f) {  // dropped row: never read
      if (phase == kShardLocal) {
        st[0] = st[1] = -std::numeric_limits<double>::infinity();
        st[2] = st[3] = 0.0;
      } else if (phase == kShardTerms) {
        st[4] = st[5] = st[6] = 0.0;
      } else {
        if (grad_s) zero_row_any(p.grad_student_dtype, p.grad_student, i, V);
        if (grad_t) zero_row_any(p.grad_teacher_dtype, p.grad_teacher, i, V);
      }
      continue;
    }
    float max_s, max_t;
    load_rows(p, i, Vp, X, Y, max_s, max_t);
    float* student_row = p.swap ? X : Y;
    float* teacher_row = p.swap ? Y : X;
    if (phase == kShardLocal) {  // this shard's maxima and Σ e^((x − max)/T), per side
      const float shift_s = max_s == kNegInf ? 0.f : max_s, shift_t = max_t == kNegInf ? 0.f : max_t;
      Vec zs(0.f), zt(0.f);
      for (int64_t j = 0; j < Vp; j += kW) {
        zs = zs + ((Vec::loadu(student_row + j) - Vec(shift_s)) * Vec(inv_t)).exp();
        zt = zt + ((Vec::loadu(teacher_row + j) - Vec(shift_t)) * Vec(inv_t)).exp();
      }
      st[0] = max_s;
      st[1] = max_t;
      st[2] = reduce_sum(zs);
      st[3] = reduce_sum(zt);
      continue;
    }
    // Phases 1 and 2: the global shifts and log-normalizers (NaN: no distribution).
    const float sx = static_cast<float>(p.swap ? st[0] : st[1]);
    const float sy = static_cast<float>(p.swap ? st[1] : st[0]);
    const float lse_x = static_cast<float>(p.swap ? st[2] : st[3]);
    const float lse_y = static_cast<float>(p.swap ? st[3] : st[2]);
    const float inv_zx = std::exp(-lse_x), inv_zy = std::exp(-lse_y);
    for (int64_t j = 0; j < Vp; j += kW) {
      const Vec x = (Vec::loadu(X + j) - Vec(sx)) * Vec(inv_t);
      const Vec y = (Vec::loadu(Y + j) - Vec(sy)) * Vec(inv_t);
      x.store(X + j);
      y.store(Y + j);
      x.exp().store(EX + j);
      y.exp().store(EY + j);
    }
    Vec acc_el(0.f), acc_up(0.f), acc_uq(0.f);
    const float q_factor = w * (p.swap ? p.gt_factor : p.gs_factor);
    const float p_factor = w * (p.swap ? p.gs_factor : p.gt_factor);
    const float cp = p.c_p * p_factor, cq = p.c_q * q_factor;
    const float sum_up = static_cast<float>(st[5]), sum_uq = static_cast<float>(st[6]);
    for (int64_t j = 0; j < Vp; j += kW) {
      const Terms r = terms<kMode>(Vec::loadu(X + j), Vec::loadu(Y + j), Vec::loadu(EX + j),
                                   Vec::loadu(EY + j), lse_x, lse_y, inv_zx, inv_zy, p.mix,
                                   log_w, log_1mw);
      if (phase == kShardTerms) {
        acc_el = acc_el + r.el;
        acc_up = acc_up + r.up;
        acc_uq = acc_uq + r.uq;
      } else {  // the gradients, with the row sums of every shard; in place of EX / EY
        if (need_p) (Vec(cp) * (r.up - r.p * Vec(sum_up))).store(EX + j);
        if (need_q) (Vec(cq) * (r.uq - r.q * Vec(sum_uq))).store(EY + j);
      }
    }
    if (phase == kShardTerms) {
      st[4] = reduce_sum(acc_el);
      st[5] = reduce_sum(acc_up);
      st[6] = reduce_sum(acc_uq);
      continue;
    }
    if (need_p) store_row_any(p.swap ? p.grad_student_dtype : p.grad_teacher_dtype,
                              p.swap ? p.grad_student : p.grad_teacher, i, V, EX);
    if (need_q) store_row_any(p.swap ? p.grad_teacher_dtype : p.grad_student_dtype,
                              p.swap ? p.grad_teacher : p.grad_student, i, V, EY);
  }
}

}  // namespace

void KD_SHARD_ROWS_FN(const DivergenceParams& p, int64_t phase, double* stats, int64_t begin,
                      int64_t end) {
  switch (p.mode) {
    case kKL: return shard_rows_mode<kKL>(p, phase, stats, begin, end);
    case kSkew: return shard_rows_mode<kSkew>(p, phase, stats, begin, end);
    case kJSD: return shard_rows_mode<kJSD>(p, phase, stats, begin, end);
    default: return shard_rows_mode<kTVD>(p, phase, stats, begin, end);
  }
}

void KD_ROWS_FN(const DivergenceParams& p, int64_t begin, int64_t end) {
  switch (p.mode) {
    case kKL: return rows_mode<kKL>(p, begin, end);
    case kSkew: return rows_mode<kSkew>(p, begin, end);
    case kJSD: return rows_mode<kJSD>(p, begin, end);
    default: return rows_mode<kTVD>(p, begin, end);
  }
}

}  // namespace kdkernels::cpu
