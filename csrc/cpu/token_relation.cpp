// kdkernels::token_relation_fwd / _bwd for CPU tensors: token-relation distillation losses
// (the spec: kdkernels/reference/token_relation.py) without any T×T matrix. Each (batch·head)
// sequence is cut into strips of kRows rows; a strip walks the columns in chunks of kCols
// (only up to the diagonal when causal), each chunk two matmuls (student and teacher relation
// logits) and elementwise work on a kRows×kCols tile. Memory: O(T·d) for the gradients plus,
// per thread, a few tiles and one (T, d_s) column-gradient accumulator.
//
// Notation per sequence: S = a_s·F_s·X_sᵀ, U = a_t·F_t·X_tᵀ (X = keys; without keys X = F
// and F's gradient is the sum of both sides), Q = softmax_rows(S), P = softmax_rows(U) over the allowed columns.
//   forward, kl   one pass, online: per row the running maxima m_s, m_u, sums l_s, l_u and
//                 W = Σ_j e^{u_j − m_u}·((u_j − m_u) − (s_j − m_s)), rescaled when a maximum
//                 moves; KL = W/l_u + log l_s − log l_u. Every term is relative to the row's
//                 maxima, so large logits cost no precision.
//   forward, mse  pass 1: the maxima and sums (online); pass 2: Σ_j (P − Q)², c = Σ_j Q(Q − P).
//   backward      tiles recomputed; with w_i the incoming row gradient,
//                 G = w·(Q − P) (kl) or 2w·Q⊙((Q − P) − c) (mse); dF_s = a_s·G·X_s (row side),
//                 dX_s = a_s·Gᵀ·F_s (column side).
// Each softmax is saved as its row maximum m and log l (not as m + log l, whose fp32 rounding
// would cost |m|·2⁻²⁴ absolute: 10⁻⁴ relative error in every probability for logits in the
// thousands): Q = exp((s − m_s) − log l_s), the same as log_softmax in the reference.
// Columns j are allowed when j ≤ i (causal) and mask_j; a padded row i (mask_i false) is
// computed over all columns, like the reference, and then dropped (loss 0, no gradient).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <mutex>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace kdkernels::cpu {
namespace {

constexpr int64_t kRows = 128;
constexpr int64_t kCols = 512;

struct Inputs {  // fp32, contiguous: (BR, T, d_s) ×2, (BR, T, d_t) ×2, mask (BR, T) or undefined
  at::Tensor fs, xs, ft, xt, mask;
  int64_t seqs, t;
};

// Keys absent: the features are their own keys (X = F).
Inputs prepare(const at::Tensor& fs, const std::optional<at::Tensor>& xs, const at::Tensor& ft,
               const std::optional<at::Tensor>& xt, const std::optional<at::Tensor>& mask) {
  const at::Tensor& xs_ = xs.has_value() ? *xs : fs;
  const at::Tensor& xt_ = xt.has_value() ? *xt : ft;
  for (const auto* x : {&fs, &xs_, &ft, &xt_}) {
    TORCH_CHECK(x->device().is_cpu(), "kdkernels.token_relation (cpu): inputs must be CPU tensors");
    TORCH_CHECK(x->dim() == 3 && x->size(0) == fs.size(0) && x->size(1) == fs.size(1),
                "kdkernels.token_relation: features must be (batch·R, T, d) with equal batch·R, T");
  }
  TORCH_CHECK(xs_.size(2) == fs.size(2) && xt_.size(2) == ft.size(2),
              "kdkernels.token_relation: keys must have their features' width");
  auto f32 = [](const at::Tensor& x) { return x.detach().to(at::kFloat).contiguous(); };
  Inputs in{f32(fs), at::Tensor(), f32(ft), at::Tensor(), at::Tensor(), fs.size(0), fs.size(1)};
  in.xs = xs.has_value() ? f32(*xs) : in.fs;
  in.xt = xt.has_value() ? f32(*xt) : in.ft;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 &&
                    mask->size(0) == in.seqs && mask->size(1) == in.t,
                "kdkernels.token_relation: mask must be bool (batch·R, T)");
    in.mask = mask->contiguous();
  }
  return in;
}

// The columns a strip visits: all, or (causal) those up to its last row.
int64_t columns_end(const Inputs& in, bool causal, int64_t i0, int64_t ti) {
  return causal ? std::min(in.t, i0 + ti) : in.t;
}

// True where (i, j) of the tile is NOT allowed, or an undefined tensor when all are.
at::Tensor disallowed(const Inputs& in, int64_t seq, bool causal, int64_t i0, int64_t ti,
                      int64_t j0, int64_t tj) {
  at::Tensor bad;
  const auto opts = in.fs.options().dtype(at::kLong);
  if (causal && j0 + tj - 1 > i0) {
    bad = at::arange(j0, j0 + tj, opts).unsqueeze(0) > at::arange(i0, i0 + ti, opts).unsqueeze(1);
  }
  if (in.mask.defined()) {
    const at::Tensor row_ok = in.mask[seq].narrow(0, i0, ti).unsqueeze(1);
    const at::Tensor col_bad = in.mask[seq].narrow(0, j0, tj).logical_not().unsqueeze(0);
    bad = bad.defined() ? bad.logical_or(col_bad) : col_bad.expand({ti, tj});
    bad = bad.logical_and(row_ok);  // a padded row keeps all its columns (then is dropped)
  }
  return bad;
}

// Relation logits of one tile for the student (s) and the teacher (u), −inf where disallowed.
std::pair<at::Tensor, at::Tensor> logits(const Inputs& in, int64_t seq, bool causal, int64_t i0,
                                         int64_t ti, int64_t j0, int64_t tj, double scale_s,
                                         double scale_t) {
  at::Tensor s = at::mm(in.fs[seq].narrow(0, i0, ti), in.xs[seq].narrow(0, j0, tj).t()).mul_(scale_s);
  at::Tensor u = at::mm(in.ft[seq].narrow(0, i0, ti), in.xt[seq].narrow(0, j0, tj).t()).mul_(scale_t);
  const at::Tensor bad = disallowed(in, seq, causal, i0, ti, j0, tj);
  if (bad.defined()) {
    s.masked_fill_(bad, -INFINITY);
    u.masked_fill_(bad, -INFINITY);
  }
  return {s, u};
}

at::Tensor row_kept(const Inputs& in, int64_t seq, int64_t i0, int64_t ti) {
  return in.mask.defined() ? in.mask[seq].narrow(0, i0, ti)
                           : at::ones({ti}, in.fs.options().dtype(at::kBool));
}

// Online running maximum of a row block: returns the new maximum and exp(old − new).
// Maxima start at −FLT_MAX (finite), so a row whose first tiles are all −inf never makes NaN.
std::pair<at::Tensor, at::Tensor> advance(const at::Tensor& m, const at::Tensor& tile) {
  const at::Tensor m_new = at::maximum(m, at::amax(tile, 1));
  return {m_new, (m - m_new).exp()};
}

// Forward of one strip: fills rows[i0:i0+ti] and stats[:, i0:i0+ti] of sequence seq.
void forward_strip(const Inputs& in, int64_t seq, int64_t i0, int64_t ti, double scale_s,
                   double scale_t, bool causal, bool mse, at::Tensor rows, at::Tensor stats) {
  const auto f32 = in.fs.options();
  at::Tensor m_s = at::full({ti}, -FLT_MAX, f32), m_u = at::full({ti}, -FLT_MAX, f32);
  at::Tensor l_s = at::zeros({ti}, f32), l_u = at::zeros({ti}, f32), w = at::zeros({ti}, f32);
  const int64_t end = columns_end(in, causal, i0, ti);
  for (int64_t j0 = 0; j0 < end; j0 += kCols) {
    const int64_t tj = std::min(kCols, end - j0);
    auto [s, u] = logits(in, seq, causal, i0, ti, j0, tj, scale_s, scale_t);
    auto [ms_new, alpha_s] = advance(m_s, s);
    auto [mu_new, alpha_u] = advance(m_u, u);
    const at::Tensor s_rel = s.sub_(ms_new.unsqueeze(1)), u_rel = u.sub_(mu_new.unsqueeze(1));
    const at::Tensor e_u = u_rel.exp();
    if (!mse) {
      // Old W was relative to the old maxima: shift it by (δu − δs) per unit of l_u.
      const at::Tensor shift = (mu_new - m_u) - (ms_new - m_s);
      // Disallowed entries are NaN here (0·(−inf − −inf)) and nothing else is: nansum drops them.
      w = alpha_u * (w - shift * l_u) + at::nansum(e_u * (u_rel - s_rel), 1);
    }
    l_s = l_s * alpha_s + s_rel.exp().sum(1);
    l_u = l_u * alpha_u + e_u.sum(1);
    m_s = ms_new, m_u = mu_new;
  }
  const at::Tensor ll_s = l_s.log(), ll_u = l_u.log();
  stats[0].narrow(0, i0, ti).copy_(m_s);
  stats[1].narrow(0, i0, ti).copy_(ll_s);
  stats[2].narrow(0, i0, ti).copy_(m_u);
  stats[3].narrow(0, i0, ti).copy_(ll_u);
  at::Tensor loss;
  if (!mse) {
    loss = w / l_u + ll_s - ll_u;
    stats[4].narrow(0, i0, ti).zero_();
  } else {  // pass 2, with the final normalizers
    loss = at::zeros({ti}, f32);
    at::Tensor c = at::zeros({ti}, f32);
    for (int64_t j0 = 0; j0 < end; j0 += kCols) {
      const int64_t tj = std::min(kCols, end - j0);
      auto [s, u] = logits(in, seq, causal, i0, ti, j0, tj, scale_s, scale_t);
      const at::Tensor q = s.sub_(m_s.unsqueeze(1)).sub_(ll_s.unsqueeze(1)).exp_();
      const at::Tensor d = q - u.sub_(m_u.unsqueeze(1)).sub_(ll_u.unsqueeze(1)).exp_();
      loss += d.square().sum(1);
      c += (q * d).sum(1);
    }
    stats[4].narrow(0, i0, ti).copy_(c);
  }
  rows.narrow(0, i0, ti).copy_(at::where(row_kept(in, seq, i0, ti), loss, 0.f));
}

// Backward of one strip: dfs[i0:i0+ti] (row side; dfs is the sequence's (T, d_s) gradient)
// and, added into d_cols, the column side.
void backward_strip(const Inputs& in, int64_t seq, int64_t i0, int64_t ti, double scale_s,
                    double scale_t, bool causal, bool mse, const at::Tensor& grad_rows,
                    const at::Tensor& stats, at::Tensor dfs, at::Tensor d_cols) {
  auto stat = [&](int k) { return stats[k].narrow(0, i0, ti).unsqueeze(1); };
  const at::Tensor m_s = stat(0), ll_s = stat(1), m_u = stat(2), ll_u = stat(3), c = stat(4);
  // The row weight: the incoming gradient, 0 for dropped rows (scale a_s folded in).
  const at::Tensor wgt = at::where(row_kept(in, seq, i0, ti), grad_rows.narrow(0, i0, ti), 0.f)
                             .mul(mse ? 2.0 * scale_s : scale_s).unsqueeze(1);
  at::Tensor d_rows = dfs.narrow(0, i0, ti).zero_();
  const at::Tensor fs_i = in.fs[seq].narrow(0, i0, ti);
  const int64_t end = columns_end(in, causal, i0, ti);
  for (int64_t j0 = 0; j0 < end; j0 += kCols) {
    const int64_t tj = std::min(kCols, end - j0);
    auto [s, u] = logits(in, seq, causal, i0, ti, j0, tj, scale_s, scale_t);
    const at::Tensor q = s.sub_(m_s).sub_(ll_s).exp_();
    at::Tensor g = q - u.sub_(m_u).sub_(ll_u).exp_();
    if (mse) g = q * (g - c);
    g.mul_(wgt);
    d_rows.addmm_(g, in.xs[seq].narrow(0, j0, tj));
    d_cols.narrow(0, j0, tj).addmm_(g.t(), fs_i);
  }
}

// Work items (sequence, strip), split into contiguous ranges over the threads; body(range
// begin, range end, strips per sequence) runs once per thread.
template <typename F>
void for_strip_ranges(const Inputs& in, F&& body) {
  const int64_t strips = (in.t + kRows - 1) / kRows;
  at::parallel_for(0, in.seqs * strips, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: without this guard their
    // ATen calls would go through autograd (recording graphs on grad-requiring inputs).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    body(begin, end, strips);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_relation_fwd_cpu(
    const at::Tensor& fs, const std::optional<at::Tensor>& xs, const at::Tensor& ft,
    const std::optional<at::Tensor>& xt,
    const std::optional<at::Tensor>& mask, double scale_s, double scale_t, bool causal,
    bool mse) {
  const Inputs in = prepare(fs, xs, ft, xt, mask);
  const auto f32 = in.fs.options();
  at::Tensor rows = at::empty({in.seqs, in.t}, f32), stats = at::empty({in.seqs, 5, in.t}, f32);
  for_strip_ranges(in, [&](int64_t begin, int64_t end, int64_t strips) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / strips, i0 = (item % strips) * kRows;
      forward_strip(in, seq, i0, std::min(kRows, in.t - i0), scale_s, scale_t, causal, mse,
                    rows[seq], stats[seq]);
    }
  });
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> token_relation_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& fs, const std::optional<at::Tensor>& xs,
    const at::Tensor& ft, const std::optional<at::Tensor>& xt, const std::optional<at::Tensor>& mask, double scale_s, double scale_t,
    bool causal, bool mse, const at::Tensor& stats) {
  const Inputs in = prepare(fs, xs, ft, xt, mask);
  const at::Tensor grad = grad_rows.to(at::kFloat).contiguous();
  at::Tensor dfs = at::empty_like(in.fs), dxs = at::zeros_like(in.xs);
  std::mutex flush;
  for_strip_ranges(in, [&](int64_t begin, int64_t end, int64_t strips) {
    // The column side of a sequence gathers from all its strips: each thread sums its strips
    // of a sequence privately (one (T, d_s) buffer) and adds that to dxs once, under a lock.
    at::Tensor d_cols = at::empty({in.t, in.xs.size(2)}, in.fs.options());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / strips, i0 = (item % strips) * kRows;
      if (item == begin || i0 == 0) d_cols.zero_();
      backward_strip(in, seq, i0, std::min(kRows, in.t - i0), scale_s, scale_t, causal, mse,
                     grad[seq], stats[seq], dfs[seq], d_cols);
      if (item + 1 == end || i0 + kRows >= in.t) {
        const std::lock_guard<std::mutex> lock(flush);
        dxs[seq].add_(d_cols);
      }
    }
  });
  if (!xs.has_value()) {  // X = F: both sides are F's gradient
    return {dfs.add_(dxs).to(fs.scalar_type()), at::empty({0}, dfs.options())};
  }
  return {dfs.to(fs.scalar_type()), dxs.to(xs->scalar_type())};
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("token_relation_fwd", &token_relation_fwd_cpu);
  m.impl("token_relation_bwd", &token_relation_bwd_cpu);
}

}  // namespace kdkernels::cpu
