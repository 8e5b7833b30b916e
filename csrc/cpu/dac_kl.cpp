// kdkernels::dac_kl_fwd for CPU tensors: DAC-KL, the KL to a teacher distribution clipped to
// the cumulative-mass band [l, u] (the spec, with its full sort: kdkernels/reference/dac_kl.py),
// without sorting. Per row, in fp32 with double mass sums, one thread per row:
//   1. teacher p = softmax(t/T) into scratch; the student's log-sum-exp (online).
//   2. the two boundary groups (equal probabilities form a group): the group whose mass
//      interval [c_lo, c_hi] holds l, and the one that holds u, found by a radix select on
//      the probabilities' bit patterns (positive floats order as their bits): a 2048-bucket
//      histogram of (count, mass) over the row, then two more digit levels over the few
//      values in the chosen buckets only. No sort: O(V) per row.
//   3. one pass: p̃ = 0 above l's group and below u's group, p/(u − l) between them, the
//      group's overlap |[c_lo, c_hi] ∩ [l, u]| / (count·(u − l)) on each boundary group (the
//      band measured in the masses as computed: [l, u] times the row's fp32 total); the
//      loss Σ p̃ (log p̃ − log q) and the gradient (q − p̃)/T, and the bounds' derivatives
//        ∂L/∂u = (m_u − (L + 1)) / (u − l),   ∂L/∂l = ((L + 1) − m_l) / (u − l),
//      m_G = the mean over group G of (log p̃ + 1 − log q): the boundary group's overlap grows
//      with u (shrinks with l) and the renormalization 1/(u − l) moves every p̃.
// Groups at a bound: l's is the one with c_lo ≤ l < c_hi and u's the one with c_lo < u ≤ c_hi,
// so the derivatives are one-sided (l increasing, u decreasing) where a bound sits exactly on
// a group boundary; at l = 0 it is the derivative into the allowed range. u = 1 clips no
// tail: no group sits at u, and ∂L/∂u = −(L + 1)/(u − l), the renormalization's part (the
// smallest probabilities' log would make the one-sided value rounding noise).
// A kept row whose teacher or student logits are all −inf, or hold +inf or NaN, has no
// distribution: its outputs (loss, gradient row, both bounds' derivatives) are NaN. Every
// output is multiplied by the row's weight (T², masks, 1/denominator), so a NaN weight (a bad
// band or num_items that the host could not check) makes the row NaN too; rows of weight 0
// are never read.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kl_term.h"

namespace kdkernels::cpu {
namespace {

inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// A group of equal teacher probabilities at a bound.
struct Group {
  float value = 0.f;  // the members' probability
  double lo = 0.0;    // c_lo: the mass of all strictly larger probabilities
  int64_t count = 0;
  double hi() const { return lo + static_cast<double>(count) * value; }
};

// One digit level of the radix select: among `values` (all sharing the higher digits), the
// digit (bits >> shift) & mask whose cumulative mass from the top, starting at `above`, first
// passes x (with `closed`: reaches x). Returns the digit and the mass above it; keeps in
// `values` only its members. Falls back to the smallest non-empty digit when x is beyond
// the total (u ≥ the row's mass, or l within rounding of it). Zero probabilities never count.
std::pair<uint32_t, double> select_digit(std::vector<float>& values, int shift, uint32_t mask,
                                         double above, double x, bool closed) {
  std::vector<double> mass(mask + 1, 0.0);
  std::vector<int64_t> count(mask + 1, 0);
  for (float p : values) {
    const uint32_t d = (bits_of(p) >> shift) & mask;
    mass[d] += p;
    ++count[d];
  }
  int64_t chosen = -1;
  double c = above, c_chosen = above;
  for (int64_t d = mask; d >= 0; --d) {
    if (mass[d] == 0.0) continue;  // empty, or zeros only (a zero probability is in no band)
    chosen = d, c_chosen = c;
    const double next = c + mass[d];
    if (closed ? next >= x : next > x) break;
    c = next;
  }
  const uint32_t digit = static_cast<uint32_t>(std::max<int64_t>(chosen, 0));
  values.erase(std::remove_if(values.begin(), values.end(),
                              [&](float p) { return ((bits_of(p) >> shift) & mask) != digit; }),
               values.end());
  return {digit, c_chosen};
}

// The group of row p (V values) holding x: lo ≤ x < hi (for l) or lo < x ≤ hi (for u).
// Level 1 histograms the whole row; levels 2 and 3 only the chosen bucket's members.
Group find_group(const float* p, int64_t v, double x, bool closed, const std::vector<double>& mass1,
                 const std::vector<int64_t>& count1, std::vector<float>& scratch) {
  constexpr int kShift1 = 20;  // 2048 buckets: the exponent and 3 mantissa bits
  int64_t bucket = -1;
  double c = 0.0, c_bucket = 0.0;
  for (int64_t b = static_cast<int64_t>(mass1.size()) - 1; b >= 0; --b) {
    if (mass1[b] == 0.0) continue;
    bucket = b, c_bucket = c;
    const double next = c + mass1[b];
    if (closed ? next >= x : next > x) break;
    c = next;
  }
  Group g;
  if (bucket < 0) return g;  // every probability is 0 (cannot happen for a softmax)
  scratch.clear();
  for (int64_t j = 0; j < v; ++j) {
    if (static_cast<int64_t>(bits_of(p[j]) >> kShift1) == bucket) scratch.push_back(p[j]);
  }
  auto [d2, c2] = select_digit(scratch, 10, 0x3FF, c_bucket, x, closed);
  auto [d3, c3] = select_digit(scratch, 0, 0x3FF, c2, x, closed);
  (void)d2, (void)d3;
  g.value = scratch.front();  // all remaining members are equal
  g.lo = c3;
  g.count = static_cast<int64_t>(scratch.size());
  return g;
}

struct RowOut {
  double loss = 0.0, d_lower = 0.0, d_upper = 0.0;
};

template <typename S, typename T, typename G>
RowOut dac_row(const S* s, const T* t, int64_t v, double lower, double upper, float inv_temp,
               float* p, G* grad, float grad_scale, std::vector<double>& mass1,
               std::vector<int64_t>& count1, std::vector<float>& scratch) {
  // 1. the teacher's probabilities, the student's log-sum-exp. The maxima are taken in logit
  // units and subtracted before the division by T (at a tiny T, x/T − max(x/T) would keep
  // only the rounding of the large quotients).
  float m_t = -INFINITY, m_s = -INFINITY;
  for (int64_t j = 0; j < v; ++j) {
    p[j] = static_cast<float>(t[j]);
    m_t = std::max(m_t, p[j]);
    m_s = std::max(m_s, static_cast<float>(s[j]));
  }
  double z_t = 0.0, z_s = 0.0;
  for (int64_t j = 0; j < v; ++j) {
    p[j] = std::exp((p[j] - m_t) * inv_temp);
    z_t += p[j];
    z_s += std::exp((static_cast<float>(s[j]) - m_s) * inv_temp);
  }
  // A row of all −inf, or holding +inf or NaN, has no distribution: NaN outputs.
  auto no_distribution = [&] {
    RowOut nan;
    nan.loss = nan.d_lower = nan.d_upper = NAN;
    if (grad != nullptr) std::fill(grad, grad + v, static_cast<G>(NAN));
    return nan;
  };
  if (!std::isfinite(m_t) || !std::isfinite(m_s) || !std::isfinite(z_t) || !std::isfinite(z_s)) {
    return no_distribution();
  }
  const float inv_z = static_cast<float>(1.0 / z_t);
  std::fill(mass1.begin(), mass1.end(), 0.0);
  std::fill(count1.begin(), count1.end(), 0);
  double total = 0.0;
  for (int64_t j = 0; j < v; ++j) {
    p[j] *= inv_z;  // equal logits give equal probabilities: groups survive
    // (a NaN logit makes a NaN p, whose bits may carry the sign: clamped, the row is NaN)
    const uint32_t b = std::min<uint32_t>(bits_of(p[j]) >> 20, 2047);
    mass1[b] += p[j];
    ++count1[b];
    total += p[j];
  }
  if (!std::isfinite(total)) return no_distribution();
  // The band in the masses as computed: [l, u]·total (the fp32 probabilities sum to the total,
  // not exactly 1), so p̃ sums to 1 even for the narrowest band near the tail.
  const double x_l = lower * total, x_u = upper * total, width = upper - lower;
  const double norm = total * width;  // p̃ = overlap / (count · norm)
  // log q = (s − m_s)/T − log z_s and log p = (t − m_t)/T − log z_t: the small terms are added
  // to the differences, never to the maxima (whose fp32 rounding would swamp them).
  const float log_zs = static_cast<float>(std::log(z_s));
  // 2. the boundary groups
  const Group gl = find_group(p, v, x_l, /*closed=*/false, mass1, count1, scratch);
  // u = 1 clips no tail (whatever the rounding of the row's total): no group at u, and u's
  // derivative is the renormalization's alone.
  const bool tail = upper < 1.0;
  const Group gu = tail ? find_group(p, v, x_u, /*closed=*/true, mass1, count1, scratch) : Group{};
  auto share = [&](const Group& g) {
    const double overlap = std::min(g.hi(), x_u) - std::max(g.lo, x_l);
    return std::max(overlap, 0.0) / (static_cast<double>(g.count) * norm);
  };
  const double share_l = share(gl), share_u = tail ? share(gu) : 0.0;
  const float inv_norm = static_cast<float>(1.0 / norm);
  // log p̃ of interior tokens: log p − log(total·(u − l))
  const float log_rest = static_cast<float>(std::log(z_t) + std::log(norm));
  // 3. the loss, the gradient, the boundary groups' Σ log q
  double loss = 0.0, sum_lq_l = 0.0, sum_lq_u = 0.0;
  for (int64_t j = 0; j < v; ++j) {
    const float pj = p[j];
    const float lq = (static_cast<float>(s[j]) - m_s) * inv_temp - log_zs;
    float pc = 0.f;
    float log_pc = 0.f;
    if (pj == gl.value || (tail && pj == gu.value)) {
      const double sh = pj == gl.value ? share_l : share_u;
      pc = static_cast<float>(sh);
      log_pc = sh > 0 ? static_cast<float>(std::log(sh)) : 0.f;
      (pj == gl.value ? sum_lq_l : sum_lq_u) += lq;
    } else if (pj < gl.value && pj > gu.value) {
      pc = pj * inv_norm;
      log_pc = (static_cast<float>(t[j]) - m_t) * inv_temp - log_rest;
    }
    // Σ p̃·(log p̃ − log q) as Σ q·φ(log p̃ − log q) (kl_term.h): no cancellation at large T
    loss += kl_term<double>(pc, std::exp(static_cast<double>(lq)), static_cast<double>(log_pc) - lq);
    if (grad != nullptr) grad[j] = static_cast<G>(grad_scale * (std::exp(lq) - pc));
  }
  if (tail && gl.value == gu.value) sum_lq_u = sum_lq_l;  // one group holds both bounds
  RowOut out;
  out.loss = loss;
  if (tail && gl.value == gu.value) {  // p̃ is 1/count on that group whatever l and u: flat
    out.d_lower = out.d_upper = 0.0;
    return out;
  }
  const double k = loss + 1.0;
  const double mean_u = tail ? std::log(share_u) + 1.0 - sum_lq_u / gu.count : 0.0;
  const double mean_l = share_l > 0 ? std::log(share_l) + 1.0 - sum_lq_l / gl.count : 0.0;
  out.d_upper = ((tail ? mean_u : 0.0) - k) / width;
  out.d_lower = (k - mean_l) / width;
  return out;
}

}  // namespace

// See kdkernels/ops/dac_kl.py for the meaning of every argument and output.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dac_kl_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& lower,
    const at::Tensor& upper, const at::Tensor& row_weight, double temperature, bool reduce,
    bool grad_student, bool grad_bounds) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(),
              "kdkernels.dac_kl (cpu): inputs must be CPU tensors");
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(),
              "kdkernels.dac_kl: logits must be (N, V) rows of equal shape");
  const int64_t n = student.size(0), v = student.size(1);
  TORCH_CHECK(v <= 1 || (student.stride(1) == 1 && teacher.stride(1) == 1),
              "kdkernels.dac_kl: logits need unit stride along V");  // (V = 1: no column stride)
  const at::Tensor lo = lower.to(at::kDouble).contiguous(), hi = upper.to(at::kDouble).contiguous();
  const at::Tensor w = row_weight.to(at::kFloat).contiguous();
  TORCH_CHECK(lo.numel() == n && hi.numel() == n && w.numel() == n,
              "kdkernels.dac_kl: lower, upper and row_weight need one value per row");
  // kdkernels._plumbing.grad_dtype(dtype, per_row_scaling=!reduce): fp16 gradients in fp32;
  // so are bf16 ones when backward scales rows by different factors, to be rounded once.
  const bool wide = student.scalar_type() == at::kHalf ||
                    (student.scalar_type() == at::kBFloat16 && !reduce);
  const auto gdtype = wide ? at::kFloat : student.scalar_type();
  at::Tensor grad = grad_student ? at::empty({n, v}, student.options().dtype(gdtype))
                                 : at::empty({0}, student.options().dtype(gdtype));
  at::Tensor rows = at::zeros({n}, student.options().dtype(at::kDouble));
  at::Tensor d_bounds = at::zeros({2, n}, student.options().dtype(at::kFloat));
  const float inv_temp = static_cast<float>(1.0 / temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "dac_kl_s", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher.scalar_type(), "dac_kl_t", [&] {
      using T = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gdtype, "dac_kl_g", [&] {
        using G = scalar_t;
        const S* s_ptr = student.data_ptr<S>();
        const T* t_ptr = teacher.data_ptr<T>();
        G* g_ptr = grad_student ? grad.data_ptr<G>() : nullptr;
        const double* lo_ptr = lo.data_ptr<double>();
        const double* hi_ptr = hi.data_ptr<double>();
        const float* w_ptr = w.data_ptr<float>();
        double* rows_ptr = rows.data_ptr<double>();
        float* db_ptr = d_bounds.data_ptr<float>();
        at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> p(v), scratch;
          std::vector<double> mass1(2048);
          std::vector<int64_t> count1(2048);
          for (int64_t i = begin; i < end; ++i) {
            G* g_row = g_ptr ? g_ptr + i * v : nullptr;
            if (w_ptr[i] == 0.f) {  // a dropped row: never read
              if (g_row) std::fill(g_row, g_row + v, G(0));
              continue;
            }
            const RowOut r = dac_row(s_ptr + i * student.stride(0), t_ptr + i * teacher.stride(0),
                                     v, lo_ptr[i], hi_ptr[i], inv_temp, p.data(), g_row,
                                     w_ptr[i] * inv_temp, mass1, count1, scratch);
            rows_ptr[i] = w_ptr[i] * r.loss;
            if (grad_bounds) {
              db_ptr[i] = static_cast<float>(w_ptr[i] * r.d_lower);
              db_ptr[n + i] = static_cast<float>(w_ptr[i] * r.d_upper);
            }
          }
        });
      });
    });
  });
  at::Tensor loss = reduce ? rows.sum().to(at::kFloat) : rows.to(at::kFloat);
  return {loss, grad, d_bounds};
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) { m.impl("dac_kl_fwd", &dac_kl_fwd_cpu); }

}  // namespace kdkernels::cpu
