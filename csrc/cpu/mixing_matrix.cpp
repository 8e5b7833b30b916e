// kdkernels::mixing_matrix_fwd / _bwd for CPU tensors: MOHAWK's ‖M − A‖_F per (batch, head)
// (the spec: kdkernels/reference/mixing_matrix.py) without any T×T matrix. For each batch
// element, the causal T×T plane of all H heads is walked in kTile×kTile tiles (j-tiles ≤
// i-tile), each a few matmuls batched over heads on strided (H, T, ·) views of the inputs (no
// copies for fp32 inputs with G = H), so memory is O(T·H·N) for the gradients plus
// O(H·kTile²) for one tile's temporaries.
//   forward   pass 1: per-row log-sum-exp of the teacher scores (skipped with teacher_lse);
//             pass 2: S = Σ (M − A)², tile by tile; loss = √S (or S if squared)
//   backward  tiles recomputed; G = dL/dM = (M − A)·(1/L or 2)·grad; then
//             dC_i += (G⊙E)·B_j, dB_j += (G⊙E)ᵀ·C_i, dcs_i += Σ_j G⊙M', dcs_j −= Σ_i G⊙M',
//             dD += diag G; dlog_decay = reverse cumulative sum of dcs
// Segment sums cs_i − cs_j come from float64 cumulative sums (no cancellation for long T),
// masked to −inf above the diagonal before exp, so no exponent is ever positive. Steps below
// −kDecayFloor are clamped to it (as in kdkernels/triton_kernels/mixing_matrix.py): every
// segment across such a step sums to ≤ −kDecayFloor, whose exp is exactly 0 in float64 and
// float32 alike, so no decay changes, while the cumulative sums stay small enough for their
// differences to be exact (a −1e30 step would wipe out the later segments, a −inf step make
// them −inf − (−inf) = NaN). NaN stays NaN.
#include <cmath>

#include <ATen/ATen.h>
#include <torch/library.h>

namespace kdkernels::cpu {
namespace {

constexpr int64_t kTile = 128;
constexpr double kDecayFloor = 1024.0;

struct Flat {  // one batch element: (H, T, ·) fp32 views (no copy for fp32 inputs and G = H)
  at::Tensor q, k, c, b, cs, d;
  int64_t heads, groups, t;
};

Flat flatten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& C, const at::Tensor& B,
             const at::Tensor& log_decay, const std::optional<at::Tensor>& D, int64_t bi) {
  Flat f;
  f.t = q.size(1), f.heads = q.size(2), f.groups = C.size(2);
  const int64_t per_group = f.heads / f.groups;
  auto per_head = [&](const at::Tensor& x) {  // (T, G, n) → (H, T, n), strided, fp32
    const at::Tensor y = x.select(0, bi).to(at::kFloat);
    return (per_group == 1 ? y : y.repeat_interleave(per_group, 1)).permute({1, 0, 2});
  };
  f.q = q.select(0, bi).to(at::kFloat).permute({1, 0, 2});
  f.k = k.select(0, bi).to(at::kFloat).permute({1, 0, 2});
  f.c = per_head(C);
  f.b = per_head(B);
  f.cs = log_decay.select(0, bi).to(at::kDouble).clamp_min(-kDecayFloor).cumsum(0).t()
             .contiguous();  // (H, T)
  f.d = D.has_value() ? D->to(at::kFloat) : at::zeros({f.heads}, q.options().dtype(at::kFloat));
  return f;
}

// One (i-tile, j-tile) of the causal plane: the teacher probabilities A, the decay E and the
// student matrix without its diagonal term M' (all (BH, ti, tj), fp32, 0 above the diagonal).
struct Tile {
  at::Tensor a, e, mp, m;
};

at::Tensor causal_mask(int64_t i0, int64_t ti, int64_t j0, int64_t tj, const at::TensorOptions& o) {
  const at::Tensor rows = at::arange(i0, i0 + ti, o.dtype(at::kLong)).unsqueeze(1);
  const at::Tensor cols = at::arange(j0, j0 + tj, o.dtype(at::kLong)).unsqueeze(0);
  return cols <= rows;  // (ti, tj)
}

at::Tensor scores(const Flat& f, int64_t i0, int64_t ti, int64_t j0, int64_t tj, double scale) {
  return at::bmm(f.q.narrow(1, i0, ti), f.k.narrow(1, j0, tj).transpose(1, 2)) * scale;
}

Tile make_tile(const Flat& f, const at::Tensor& lse, int64_t i0, int64_t ti, int64_t j0,
               int64_t tj, double scale) {
  Tile t;
  const bool diagonal = j0 + tj > i0;
  const at::Tensor mask = diagonal ? causal_mask(i0, ti, j0, tj, f.q.options()) : at::Tensor();
  at::Tensor s = scores(f, i0, ti, j0, tj, scale) - lse.narrow(1, i0, ti).unsqueeze(2);
  at::Tensor seg = f.cs.narrow(1, i0, ti).unsqueeze(2) - f.cs.narrow(1, j0, tj).unsqueeze(1);
  if (diagonal) {
    s = s.masked_fill(mask.logical_not(), -INFINITY);
    seg = seg.masked_fill(mask.logical_not(), -INFINITY);
  }
  t.a = s.exp();
  t.e = seg.to(at::kFloat).exp();
  t.mp = at::bmm(f.c.narrow(1, i0, ti), f.b.narrow(1, j0, tj).transpose(1, 2)) * t.e;
  t.m = t.mp;
  if (diagonal) {  // + D_h where i == j
    const at::Tensor eye = (at::arange(i0, i0 + ti, f.q.options().dtype(at::kLong)).unsqueeze(1) ==
                            at::arange(j0, j0 + tj, f.q.options().dtype(at::kLong)).unsqueeze(0));
    t.m = t.mp + f.d.view({-1, 1, 1}) * eye.to(at::kFloat);
  }
  return t;
}

void teacher_lse_of(const Flat& f, double scale, at::Tensor lse) {  // fills lse (H, T) fp32
  const int64_t bh = f.q.size(0);
  for (int64_t i0 = 0; i0 < f.t; i0 += kTile) {
    const int64_t ti = std::min(kTile, f.t - i0);
    at::Tensor m = at::full({bh, ti}, -INFINITY, f.q.options());
    at::Tensor z = at::zeros({bh, ti}, f.q.options());
    for (int64_t j0 = 0; j0 <= i0; j0 += kTile) {
      const int64_t tj = std::min(kTile, f.t - j0);
      at::Tensor s = scores(f, i0, ti, j0, tj, scale);
      if (j0 + tj > i0) s = s.masked_fill(causal_mask(i0, ti, j0, tj, s.options()).logical_not(), -INFINITY);
      const at::Tensor m_new = at::maximum(m, std::get<0>(s.max(2)));  // finite: j = i is in the last tile
      z = z * (m - m_new).exp() + (s - m_new.unsqueeze(2)).exp().sum(2);
      m = m_new;
    }
    lse.narrow(1, i0, ti).copy_(m + z.log());
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& C,
                  const at::Tensor& B, const at::Tensor& log_decay) {
  for (const auto* x : {&q, &k, &C, &B, &log_decay}) {
    TORCH_CHECK(x->device().is_cpu(), "kdkernels.mixing_matrix (cpu): inputs must be CPU tensors");
  }
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && C.dim() == 4 && B.sizes() == C.sizes() &&
                  log_decay.dim() == 3,
              "kdkernels.mixing_matrix: bad shapes (see kdkernels/ops/mixing_matrix.py)");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixing_matrix_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& C, const at::Tensor& B,
    const at::Tensor& log_decay, const std::optional<at::Tensor>& D, double scale, bool squared,
    const std::optional<at::Tensor>& teacher_lse) {
  check_inputs(q, k, C, B, log_decay);
  const int64_t batch = q.size(0), t = q.size(1), heads = q.size(2);
  const auto f32 = q.options().dtype(at::kFloat);
  // (lse is an output: a copy of teacher_lse, never an alias of it.)
  at::Tensor lse = teacher_lse.has_value() ? teacher_lse->to(at::kFloat, false, /*copy=*/true).contiguous()
                                           : at::empty({batch, heads, t}, f32);
  at::Tensor sq = at::zeros({batch, heads}, q.options().dtype(at::kDouble));
  for (int64_t bi = 0; bi < batch; ++bi) {
    const Flat f = flatten(q, k, C, B, log_decay, D, bi);
    const at::Tensor lse_b = lse.select(0, bi);
    if (!teacher_lse.has_value()) teacher_lse_of(f, scale, lse_b);
    at::Tensor sq_b = sq.select(0, bi);
    for (int64_t i0 = 0; i0 < t; i0 += kTile) {
      const int64_t ti = std::min(kTile, t - i0);
      for (int64_t j0 = 0; j0 <= i0; j0 += kTile) {
        const int64_t tj = std::min(kTile, t - j0);
        const Tile tile = make_tile(f, lse_b, i0, ti, j0, tj, scale);
        sq_b += (tile.m - tile.a).square().sum({1, 2}).to(at::kDouble);
      }
    }
  }
  const at::Tensor loss = (squared ? sq : sq.sqrt()).to(at::kFloat);
  return {loss, lse, sq.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixing_matrix_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& C,
    const at::Tensor& B, const at::Tensor& log_decay, const std::optional<at::Tensor>& D,
    double scale, bool squared, const at::Tensor& lse, const at::Tensor& sq) {
  check_inputs(q, k, C, B, log_decay);
  const int64_t batch = q.size(0), t = q.size(1), heads = q.size(2), groups = C.size(2);
  const int64_t n = C.size(3), per_group = heads / groups;
  const auto f32 = q.options().dtype(at::kFloat);
  // dL/dM = (M − A) · coef per (b, h): 1/L for L = √S (0 where S = 0), 2 if squared.
  const at::Tensor s = sq.to(at::kFloat);
  at::Tensor coef = squared ? at::full_like(s, 2.f) : at::where(s > 0, s.rsqrt(), at::zeros_like(s));
  coef = coef * grad_loss.to(at::kFloat);  // (batch, H)
  // Gradients of C, B accumulate straight into their (batch, T, G, N) layout when G = H.
  at::Tensor d_c = at::zeros({batch, t, groups, n}, f32), d_b = at::zeros({batch, t, groups, n}, f32);
  at::Tensor d_ld = at::empty({batch, t, heads}, f32), d_d = at::zeros({heads}, f32);
  for (int64_t bi = 0; bi < batch; ++bi) {
    const Flat f = flatten(q, k, C, B, log_decay, D, bi);
    const at::Tensor lse_b = lse.select(0, bi).to(at::kFloat);
    const at::Tensor coef_b = coef.select(0, bi).view({heads, 1, 1});
    at::Tensor dc = per_group == 1 ? d_c.select(0, bi).permute({1, 0, 2}) : at::zeros({heads, t, n}, f32);
    at::Tensor db = per_group == 1 ? d_b.select(0, bi).permute({1, 0, 2}) : at::zeros({heads, t, n}, f32);
    at::Tensor dcs = at::zeros({heads, t}, f32);
    for (int64_t i0 = 0; i0 < t; i0 += kTile) {
      const int64_t ti = std::min(kTile, t - i0);
      for (int64_t j0 = 0; j0 <= i0; j0 += kTile) {
        const int64_t tj = std::min(kTile, t - j0);
        const Tile tile = make_tile(f, lse_b, i0, ti, j0, tj, scale);
        const at::Tensor g = (tile.m - tile.a) * coef_b;
        const at::Tensor ge = g * tile.e;
        dc.narrow(1, i0, ti).add_(at::bmm(ge, f.b.narrow(1, j0, tj)));
        db.narrow(1, j0, tj).add_(at::bmm(ge.transpose(1, 2), f.c.narrow(1, i0, ti)));
        const at::Tensor w = g * tile.mp;
        dcs.narrow(1, i0, ti).add_(w.sum(2));
        dcs.narrow(1, j0, tj).sub_(w.sum(1));
        if (j0 + tj > i0) d_d += g.diagonal(i0 - j0, 1, 2).sum(1);  // entries (i, i) of this tile
      }
    }
    if (per_group > 1) {  // C and B were shared by the H/G heads of a group
      d_c.select(0, bi).copy_(dc.view({groups, per_group, t, n}).sum(1).permute({1, 0, 2}));
      d_b.select(0, bi).copy_(db.view({groups, per_group, t, n}).sum(1).permute({1, 0, 2}));
    }
    d_ld.select(0, bi).copy_(dcs.flip(1).cumsum(1).flip(1).t());  // reverse cumulative sum
  }
  return {d_c.to(C.scalar_type()), d_b.to(B.scalar_type()), d_ld.to(log_decay.scalar_type()),
          D.has_value() ? d_d.to(D->scalar_type()) : at::empty({0}, f32)};
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("mixing_matrix_fwd", &mixing_matrix_fwd_cpu);
  m.impl("mixing_matrix_bwd", &mixing_matrix_bwd_cpu);
}

}  // namespace kdkernels::cpu
