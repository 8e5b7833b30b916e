// kdkernels::token_relation_fwd / _bwd for CPU tensors: token-relation distillation losses
// (the spec: kdkernels/reference/token_relation.py) without any T×T matrix. Each (batch·head)
// sequence is walked in kTile×kTile tiles, each two matmuls (the student's and the teacher's
// relation logits) and elementwise work on the tile; threads take row blocks, keep their own
// row statistics per sequence (merged once when they leave it) and add gradient rows under
// per-block locks. Memory: O(T·d) for the gradients plus, per thread, a few tiles.
//
// Notation per sequence: S = a_s·F_s·X_sᵀ, U = a_t·F_t·X_tᵀ (X = keys; without keys X = F
// and F's gradient is the sum of both sides), Q = softmax_rows(S), P = softmax_rows(U) over the allowed columns.
//   forward, kl   one sweep, online: per row the running maxima m_s, m_u, sums l_s, l_u and
//                 W = Σ_j e^{u_j − m_u}·((u_j − m_u) − (s_j − m_s)), rescaled when a maximum
//                 moves (partial statistics merge the same way); KL = W/l_u + log l_s − log l_u.
//                 Every term is relative to the row's maxima: large logits cost no precision.
//   forward, mse  sweep 1: the maxima and sums (online); sweep 2: Σ_j (P − Q)², c = Σ_j Q(Q − P).
//   backward      tiles recomputed; with w_i the incoming row gradient,
//                 G = w·(Q − P) (kl) or 2w·Q⊙((Q − P) − c) (mse); dF_s = a_s·G·X_s (row side),
//                 dX_s = a_s·Gᵀ·F_s (column side). Without keys and not causal, S and U are
//                 symmetric: tiles below the diagonal serve both (I, J) and (J, I), and
//                 dF_s = a_s·(G + Gᵀ)·F_s takes one product per tile side.
// Each softmax is saved as its row maximum m and log l (not as m + log l, whose fp32 rounding
// would cost |m|·2⁻²⁴ absolute: 10⁻⁴ relative error in every probability for logits in the
// thousands): Q = exp((s − m_s) − log l_s), the same as log_softmax in the reference.
// Columns j are allowed when j ≤ i (causal) and mask_j; a padded row i (mask_i false) is
// computed over all columns, like the reference, and then dropped (loss 0, no gradient).
// Padded tokens are never read (the kernel works on copies where they are zeros), so whatever
// they hold changes nothing. NaN rule, per sequence as in the reference: a sequence with a NaN
// or ±inf in a real token's features or keys is skipped; its kept rows' losses and its real
// tokens' gradient rows are NaN.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <mutex>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace kdkernels::cpu {
namespace {

constexpr int64_t kTile = 256;

struct Inputs {  // fp32, contiguous: (BR, T, d_s) ×2, (BR, T, d_t) ×2, mask (BR, T) or undefined
  at::Tensor fs, xs, ft, xt, mask;
  int64_t seqs, t;
  at::Tensor poisoned;             // (BR,) bool: a non-finite value in a real token
  std::vector<uint8_t> skip;       // the same, for the workers
  // (BR, T) bool: the rows (tokens) of poisoned sequences that are NaN: the real ones
  at::Tensor nan_rows() const {
    const at::Tensor rows = poisoned.unsqueeze(1).expand({seqs, t});
    return mask.defined() ? rows.logical_and(mask) : rows;
  }
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
  at::Tensor padded;  // (BR, T, 1), true at padded tokens
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 &&
                    mask->size(0) == fs.size(0) && mask->size(1) == fs.size(1),
                "kdkernels.token_relation: mask must be bool (batch·R, T)");
    padded = mask->logical_not().unsqueeze(2);
  }
  // fp32 contiguous, padded tokens zeroed (a copy: the caller's tensors are never written)
  auto f32 = [&](const at::Tensor& x) {
    const at::Tensor y = x.detach().to(at::kFloat).contiguous();
    return padded.defined() ? y.masked_fill(padded, 0.f) : y;
  };
  Inputs in{f32(fs), at::Tensor(), f32(ft), at::Tensor(), at::Tensor(), fs.size(0), fs.size(1)};
  in.xs = xs.has_value() ? f32(*xs) : in.fs;
  in.xt = xt.has_value() ? f32(*xt) : in.ft;
  if (mask.has_value()) in.mask = mask->contiguous();
  in.poisoned = at::zeros({in.seqs}, in.fs.options().dtype(at::kBool));
  for (const at::Tensor* x : {&in.fs, &in.xs, &in.ft, &in.xt}) {
    const bool repeated = (x == &in.xs && in.xs.is_same(in.fs)) || (x == &in.xt && in.xt.is_same(in.ft));
    if (!repeated && x->numel() > 0) {
      in.poisoned.logical_or_(at::isfinite(*x).logical_not().flatten(1).any(1));
    }
  }
  in.skip.resize(in.seqs);
  const at::Tensor p = in.poisoned.to(at::kByte);
  std::copy(p.data_ptr<uint8_t>(), p.data_ptr<uint8_t>() + in.seqs, in.skip.begin());
  return in;
}

// The sequence is walked in kTile×kTile tiles (I, J): for each row block I, the column blocks
// J ≤ I (causal, or symmetric) or all J. Without keys and without causality both relation
// matrices are symmetric (s_ij = s_ji), so each tile below the diagonal also serves the
// transposed block (rows J, columns I): half the matmuls.
struct Walk {
  bool causal, symmetric;
  int64_t blocks;
  int64_t end_block(int64_t ib) const { return causal || symmetric ? ib + 1 : blocks; }
  // Work item k → row block; alternate ends, so contiguous ranges of items have equal work
  // when the number of column blocks grows with the row block.
  int64_t row_block(int64_t k) const {
    return !(causal || symmetric) ? k : (k % 2 == 0 ? k / 2 : blocks - 1 - k / 2);
  }
};

Walk make_walk(const Inputs& in, bool causal) {
  const bool keys = !in.xs.is_same(in.fs) || !in.xt.is_same(in.ft);
  return Walk{causal, !keys && !causal, (in.t + kTile - 1) / kTile};
}

// True where (i, j) of rows r0… × cols c0… is NOT allowed, or undefined when all are.
at::Tensor disallowed(const Inputs& in, int64_t seq, bool causal, int64_t r0, int64_t nr,
                      int64_t c0, int64_t nc) {
  at::Tensor bad;
  const auto opts = in.fs.options().dtype(at::kLong);
  if (causal && c0 + nc - 1 > r0) {
    bad = at::arange(c0, c0 + nc, opts).unsqueeze(0) > at::arange(r0, r0 + nr, opts).unsqueeze(1);
  }
  if (in.mask.defined()) {
    const at::Tensor row_ok = in.mask[seq].narrow(0, r0, nr).unsqueeze(1);
    const at::Tensor col_bad = in.mask[seq].narrow(0, c0, nc).logical_not().unsqueeze(0);
    bad = bad.defined() ? bad.logical_or(col_bad) : col_bad.expand({nr, nc});
    bad = bad.logical_and(row_ok);  // a padded row keeps all its columns (then is dropped)
  }
  return bad;
}

// One direction of a tile: the student's and the teacher's relation logits of rows r0… ×
// cols c0…, −inf where not allowed (copies when masking, so the raw tile can serve twice).
struct Dir {
  at::Tensor s, u;
  int64_t r0, c0;
};

Dir direction(const Inputs& in, int64_t seq, bool causal, const at::Tensor& s,
              const at::Tensor& u, int64_t r0, int64_t c0, bool in_place) {
  const at::Tensor bad = disallowed(in, seq, causal, r0, s.size(0), c0, s.size(1));
  if (!bad.defined()) return {s, u, r0, c0};
  if (in_place) return {s.masked_fill_(bad, -INFINITY), u.masked_fill_(bad, -INFINITY), r0, c0};
  return {s.masked_fill(bad, -INFINITY), u.masked_fill(bad, -INFINITY), r0, c0};
}

// The directions tile (I, J) serves: (rows I, cols J), and for symmetric walks below the
// diagonal also (rows J, cols I) on the transposed logits.
std::vector<Dir> tile_directions(const Inputs& in, const Walk& walk, int64_t seq, int64_t ib,
                                 int64_t jb, double scale_s, double scale_t) {
  const int64_t i0 = ib * kTile, j0 = jb * kTile;
  const int64_t ti = std::min(kTile, in.t - i0), tj = std::min(kTile, in.t - j0);
  const at::Tensor s = at::mm(in.fs[seq].narrow(0, i0, ti), in.xs[seq].narrow(0, j0, tj).t()).mul_(scale_s);
  const at::Tensor u = at::mm(in.ft[seq].narrow(0, i0, ti), in.xt[seq].narrow(0, j0, tj).t()).mul_(scale_t);
  const bool both = walk.symmetric && jb != ib;
  std::vector<Dir> dirs{direction(in, seq, walk.causal, s, u, i0, j0, !both)};
  if (both) dirs.push_back(direction(in, seq, walk.causal, s.t(), u.t(), j0, i0, true));
  return dirs;
}

at::Tensor rows_kept(const Inputs& in) {
  return in.mask.defined() ? in.mask : at::ones({in.seqs, in.t}, in.fs.options().dtype(at::kBool));
}

// Online softmax statistics of a set of rows: running maxima m (from −FLT_MAX: finite, so a
// row whose first tiles are all −inf never makes NaN), sums l, and for kl the weighted
// log-ratio W = Σ_j e^{u_j − m_u}((u_j − m_u) − (s_j − m_s)). Rows are (5, T) views.
struct Online {
  at::Tensor m_s, l_s, m_u, l_u, w;
  explicit Online(const at::Tensor& st) : m_s(st[0]), l_s(st[1]), m_u(st[2]), l_u(st[3]), w(st[4]) {}
};

at::Tensor fresh_stats(int64_t n, const at::TensorOptions& f32) {
  at::Tensor st = at::zeros({5, n}, f32);
  st.narrow(0, 0, 1).fill_(-FLT_MAX);
  st.narrow(0, 2, 1).fill_(-FLT_MAX);
  return st;
}

// Merges the statistics of b (maxima mb_s, mb_u; sums lb_s, lb_u; wb) into rows r0… of a.
void merge(Online& a, int64_t r0, const at::Tensor& mb_s, const at::Tensor& lb_s,
           const at::Tensor& mb_u, const at::Tensor& lb_u, const at::Tensor& wb, bool mse) {
  const int64_t n = mb_s.size(0);
  at::Tensor m_s = a.m_s.narrow(0, r0, n), l_s = a.l_s.narrow(0, r0, n);
  at::Tensor m_u = a.m_u.narrow(0, r0, n), l_u = a.l_u.narrow(0, r0, n), w = a.w.narrow(0, r0, n);
  const at::Tensor ms = at::maximum(m_s, mb_s), mu = at::maximum(m_u, mb_u);
  const at::Tensor ea_u = (m_u - mu).exp(), eb_u = (mb_u - mu).exp();
  if (!mse) {  // each W is relative to its own maxima: shift both to the merged ones
    w.copy_(ea_u * (w - ((mu - m_u) - (ms - m_s)) * l_u) +
            eb_u * (wb - ((mu - mb_u) - (ms - mb_s)) * lb_u));
  }
  l_s.copy_(l_s * (m_s - ms).exp() + lb_s * (mb_s - ms).exp());
  l_u.copy_(l_u * ea_u + lb_u * eb_u);
  m_s.copy_(ms);
  m_u.copy_(mu);
}

// One direction's tile statistics, merged into its rows.
void accumulate(Online& a, const Dir& d, bool mse) {
  // A row with no allowed column in this tile has max −inf: clamp to the finite start value.
  const at::Tensor ms = at::amax(d.s, 1).clamp_min_(-FLT_MAX), mu = at::amax(d.u, 1).clamp_min_(-FLT_MAX);
  const at::Tensor s_rel = d.s - ms.unsqueeze(1), u_rel = d.u - mu.unsqueeze(1);
  const at::Tensor e_u = u_rel.exp();
  // Disallowed entries are NaN in e_u·(u_rel − s_rel) (0·(−inf − −inf)), and nothing else
  // is: nansum drops them.
  const at::Tensor w = mse ? at::Tensor() : at::nansum(e_u * (u_rel - s_rel), 1);
  merge(a, d.r0, ms, s_rel.exp().sum(1), mu, e_u.sum(1), w, mse);
}

// Parallel walk over work items (sequence, row block). body(seq, ib, local) runs per item with
// the thread's local buffers for that sequence; flush(seq, local) runs once per thread and
// sequence, when the thread leaves it. Worker threads do not inherit the caller's dispatch
// state: without the guard their ATen calls would go through autograd.
template <typename Init, typename Body, typename Flush>
void walk_items(const Inputs& in, const Walk& walk, Init&& init, Body&& body, Flush&& flush) {
  at::parallel_for(0, in.seqs * walk.blocks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto local = init();
    int64_t seq = begin / walk.blocks;
    for (int64_t item = begin; item < end; ++item) {
      if (item / walk.blocks != seq) {
        flush(seq, local);
        local = init();
        seq = item / walk.blocks;
      }
      body(seq, walk.row_block(item % walk.blocks), local);
    }
    if (end > begin) flush(seq, local);
  });
}

// Q and P of one direction with the final statistics (st: (5, T) = m_s, log l_s, m_u, log l_u, c).
std::pair<at::Tensor, at::Tensor> probabilities(const Dir& d, const at::Tensor& st) {
  auto col = [&](int k) { return st[k].narrow(0, d.r0, d.s.size(0)).unsqueeze(1); };
  return {(d.s - col(0)).sub_(col(1)).exp_(), (d.u - col(2)).sub_(col(3)).exp_()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_relation_fwd_cpu(
    const at::Tensor& fs, const std::optional<at::Tensor>& xs, const at::Tensor& ft,
    const std::optional<at::Tensor>& xt, const std::optional<at::Tensor>& mask, double scale_s,
    double scale_t, bool causal, bool mse) {
  const Inputs in = prepare(fs, xs, ft, xt, mask);
  const Walk walk = make_walk(in, causal);
  const auto f32 = in.fs.options();
  at::Tensor stats = at::empty({in.seqs, 5, in.t}, f32);
  for (int64_t i = 0; i < in.seqs; ++i) stats[i].copy_(fresh_stats(in.t, f32));
  std::mutex lock;
  // Sweep 1: the online statistics (and W for kl) of every row.
  walk_items(in, walk, [&] { return fresh_stats(in.t, f32); },
      [&](int64_t seq, int64_t ib, at::Tensor& local) {
        if (in.skip[seq]) return;
        Online acc(local);
        for (int64_t jb = 0; jb < walk.end_block(ib); ++jb) {
          for (const Dir& d : tile_directions(in, walk, seq, ib, jb, scale_s, scale_t)) accumulate(acc, d, mse);
        }
      },
      [&](int64_t seq, at::Tensor& local) {
        const std::lock_guard<std::mutex> guard(lock);
        Online total(stats[seq]);
        merge(total, 0, local[0], local[1], local[2], local[3], local[4], mse);
      });
  // Row losses; stats become (m_s, log l_s, m_u, log l_u, c).
  const at::Tensor l_s = stats.select(1, 1).clone(), l_u = stats.select(1, 3).clone();
  const at::Tensor w = stats.select(1, 4).clone();
  stats.select(1, 1).copy_(l_s.log());
  stats.select(1, 3).copy_(l_u.log());
  stats.select(1, 4).zero_();
  at::Tensor rows;
  if (!mse) {
    rows = w / l_u + stats.select(1, 1) - stats.select(1, 3);
  } else {  // sweep 2, with the final normalizers: Σ (Q − P)² and c = Σ Q(Q − P)
    at::Tensor sums = at::zeros({in.seqs, 2, in.t}, f32);
    walk_items(in, walk, [&] { return at::zeros({2, in.t}, f32); },
        [&](int64_t seq, int64_t ib, at::Tensor& local) {
          if (in.skip[seq]) return;
          for (int64_t jb = 0; jb < walk.end_block(ib); ++jb) {
            for (const Dir& d : tile_directions(in, walk, seq, ib, jb, scale_s, scale_t)) {
              auto [q, p] = probabilities(d, stats[seq]);
              const at::Tensor diff = q - p;
              local[0].narrow(0, d.r0, q.size(0)).add_(diff.square().sum(1));
              local[1].narrow(0, d.r0, q.size(0)).add_((q * diff).sum(1));
            }
          }
        },
        [&](int64_t seq, at::Tensor& local) {
          const std::lock_guard<std::mutex> guard(lock);
          sums[seq].add_(local);
        });
    rows = sums.select(1, 0);
    stats.select(1, 4).copy_(sums.select(1, 1));
  }
  stats.masked_fill_(in.poisoned.view({in.seqs, 1, 1}), NAN);
  return {at::where(rows_kept(in), rows, 0.f).masked_fill_(in.nan_rows(), NAN), stats};
}

std::tuple<at::Tensor, at::Tensor> token_relation_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& fs, const std::optional<at::Tensor>& xs,
    const at::Tensor& ft, const std::optional<at::Tensor>& xt, const std::optional<at::Tensor>& mask,
    double scale_s, double scale_t, bool causal, bool mse, const at::Tensor& stats_in) {
  const Inputs in = prepare(fs, xs, ft, xt, mask);
  const Walk walk = make_walk(in, causal);
  const bool keys = xs.has_value();
  const at::Tensor stats = stats_in.to(at::kFloat).contiguous();
  // Row weights: the incoming gradient, 0 for dropped rows, times a_s (and mse's 2).
  const at::Tensor wgt = at::where(rows_kept(in), grad_rows.to(at::kFloat), 0.f)
                             .mul_(mse ? 2.0 * scale_s : scale_s);
  const int64_t ds = in.fs.size(2);
  at::Tensor dfs = at::zeros({in.seqs, in.t, ds}, in.fs.options());
  at::Tensor dxs = keys ? at::zeros_like(dfs) : dfs;  // without keys both sides are F's
  // Gradient rows of block k of a sequence are added under lock k: a tile's products are
  // computed outside any lock, then added (no per-thread copies of the gradient).
  std::vector<std::mutex> block_locks(in.seqs * walk.blocks);
  auto add_rows = [&](at::Tensor& grad, int64_t seq, int64_t r0, const at::Tensor& rows) {
    const std::lock_guard<std::mutex> guard(block_locks[seq * walk.blocks + r0 / kTile]);
    grad[seq].narrow(0, r0, rows.size(0)).add_(rows);
  };
  // G = w(Q − P) (kl) or w·Q((Q − P) − c) (mse, w holding the 2) for one direction.
  auto grad_of = [&](const Dir& d, int64_t seq) {
    auto [q, p] = probabilities(d, stats[seq]);
    at::Tensor g = q - p;
    if (mse) g = q * (g - stats[seq][4].narrow(0, d.r0, q.size(0)).unsqueeze(1));
    return g.mul_(wgt[seq].narrow(0, d.r0, q.size(0)).unsqueeze(1));
  };
  walk_items(in, walk, [] { return 0; },
      [&](int64_t seq, int64_t ib, int&) {
        if (in.skip[seq]) return;
        const at::Tensor f = in.fs[seq], x = in.xs[seq];
        for (int64_t jb = 0; jb < walk.end_block(ib); ++jb) {
          const std::vector<Dir> dirs = tile_directions(in, walk, seq, ib, jb, scale_s, scale_t);
          const Dir& d = dirs[0];
          const int64_t ti = d.s.size(0), tj = d.s.size(1);
          at::Tensor g = grad_of(d, seq);
          if (dirs.size() == 2) g.add_(grad_of(dirs[1], seq).t());  // H = G_IJ + G_JIᵀ
          // dF_I += G·X_J; dX_J += Gᵀ·F_I (into dF without keys). On a symmetric walk's
          // diagonal tile X = F and I = J: both sides in one product, (G + Gᵀ)·F_I.
          if (walk.symmetric && jb == ib) {
            add_rows(dfs, seq, d.r0, at::mm(g + g.t(), f.narrow(0, d.r0, ti)));
            continue;
          }
          add_rows(dfs, seq, d.r0, at::mm(g, x.narrow(0, d.c0, tj)));
          add_rows(dxs, seq, d.c0, at::mm(g.t(), f.narrow(0, d.r0, ti)));
        }
      },
      [](int64_t, int&) {});
  const at::Tensor nan_rows = in.nan_rows().unsqueeze(2);
  dfs.masked_fill_(nan_rows, NAN);
  if (keys) dxs.masked_fill_(nan_rows, NAN);
  return {dfs.to(fs.scalar_type()),
          keys ? dxs.to(xs->scalar_type()) : at::empty({0}, dfs.options())};
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("token_relation_fwd", &token_relation_fwd_cpu);
  m.impl("token_relation_bwd", &token_relation_bwd_cpu);
}

}  // namespace kdkernels::cpu
