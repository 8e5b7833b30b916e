"""Reference (specification) of the logit-divergence family, in plain PyTorch.

Readable rather than fast; runs in float64 when given float64 tensors (the tests do),
and is differentiable by autograd, so `torch.autograd.gradcheck` checks it and the
kernels' gradients are compared with its gradients.

Per row, over the last dim (s, t the student and teacher logits, T the temperature):
    q = softmax(s/T)                        the student distribution
    p = softmax(t'/T)                       the teacher distribution, where t' = t, or with TAID
    t' = (1 - λ)·stopgrad(s) + λ·t          (λ = taid_t, a constant target for autograd)
and the kinds
    fkl       Σ p (log p − log q)                         KL(p‖q)
    rkl       Σ q (log q − log p)                         KL(q‖p)
    jsd       β·KL(p‖m) + (1−β)·KL(q‖m),  m = βp + (1−β)q  (β=0 is fkl, β=1 is rkl, as in TRL)
    tvd       ½ Σ |p − q|
    skew_fkl  KL(p ‖ αp + (1−α)q)                          (α = skew, DistiLLM)
    skew_rkl  KL(q ‖ αq + (1−α)p)
The T² factor, masks and reductions are applied by the caller (kdkernels/_plumbing.py).

Every KL is summed as Σ y·φ(log x − log y), terms ≥ 0 (kl_term): as T grows and p, q approach
each other, the plain Σ x·log(x/y) would lose its digits to cancellation. 0·log 0 = 0: a term is
y wherever x == 0, with a zero gradient through log x, so −inf logits and underflowing tails
never produce NaN.

The NaN rule: a row whose logits hold NaN or +inf, or that has no distribution (all −inf),
in either input, has no divergence: its loss is NaN, and so is its gradient row.
log softmax(x/T) is computed as (x − max x)/T − log Σ e^((x − max x)/T): the maximum is
subtracted in input units, so tiny temperatures lose no digits (x/T − max(x/T) would).
"""
import math

import torch

from .._plumbing import nan_rows

KINDS = ("fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl")

# Log-probabilities are clamped to this before mixing, so that log(β·e^-inf + ...) and its
# gradient stay finite; exp(_LOG_FLOOR) is 0 in every float type, so values are unchanged.
_LOG_FLOOR = -1e30


# φ(v) = v·e^v − e^v + 1 = Σ_{n≥2} (n−1)/n!·vⁿ: the coefficients of v² … v¹⁷. For |v| < 1/2 the
# truncation is below 1e-17 of φ, exact in float64; the fp32 kernels stop after v⁹ (3e-8 of φ).
PHI_SERIES = (1 / 2, 1 / 3, 1 / 8, 1 / 30, 1 / 144, 1 / 840, 1 / 5760, 1 / 45360, 1 / 403200,
              1 / 3991680, 1 / 43545600, 1 / 518918400, 1 / 6706022400, 1 / 93405312000,
              1 / 1394852659200, 1 / 22230464256000)


def kl_term(x, y, v):
    """y·φ(v) = x·v − x + y for probabilities x, y and v = log x − log y: the per-element term
    of KL(x‖y) = Σ x·log(x/y), plus y − x (which sums to 0 over a row). Every term is ≥ 0, so
    the row sum has no cancellation: as p and q approach each other (a large T) the plain
    Σ x·log(x/y) loses its digits to terms of both signs, this does not. For |v| < 1/2 the
    series (x·v − x + y cancels there), else x·(v − 1) + y. x = 0: y (no NaN from 0·−inf,
    zero gradient to v); y = 0 < x: +inf."""
    small = v.abs() < 0.5
    vs = torch.where(small, v, 0.0)
    poly = torch.zeros_like(vs)
    for c in reversed(PHI_SERIES):
        poly = poly * vs + c
    live = x > 0
    vl = torch.where(live & ~small, v, 0.0)
    return torch.where(live, torch.where(small, y * poly * vs * vs, x * (vl - 1.0) + y), y)


def _plain(x, lx, ly):
    """x·(lx − ly), 0 (value and gradient) where x == 0."""
    live = x > 0
    return torch.where(live, x * (torch.where(live, lx, 0.0) - torch.where(live, ly, 0.0)), 0.0)


def kl_sum(x, y, lx, ly):
    """Σ over the row of the KL terms of (x, y) = (p, q) or (p, m) and so on, whose y·φ terms
    sum to the KL without cancellation. The value is that sum; the gradient is autograd's
    through the plain Σ x·log(x/y), the same function (the two differ by Σ(y − x), identically
    0), whose derivative U − P·ΣU is also the closed form the kernels compute."""
    plain = _plain(x, lx, ly).sum(-1)
    exact = (kl_term(x, y, lx - ly).sum(-1) - plain).detach()
    return plain + torch.where(torch.isfinite(plain), exact, 0.0)  # +inf (x > 0 = y) stays


def _kl(lx, ly):
    """KL(x‖y) per row from log-probabilities."""
    return kl_sum(lx.exp(), ly.exp(), lx, ly)


def _log_mix(w, lx, ly):
    """log(w·x + (1−w)·y) from log x and log y, for 0 < w < 1, computed in log space."""
    return torch.logaddexp(
        math.log(w) + lx.clamp_min(_LOG_FLOOR), math.log1p(-w) + ly.clamp_min(_LOG_FLOOR)
    )


def log_softmax(x, temperature):
    """log softmax(x/T) over the last dim, the maximum subtracted before dividing by T, and
    whether each row has a distribution (its log-sum-exp is finite: no NaN, no +inf, not all
    −inf)."""
    m = x.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)  # NaN / ±inf rows: left to show in the lse
    a = (x - m) / temperature
    lse = torch.logsumexp(a, -1, keepdim=True)
    return a - lse, torch.isfinite(lse).squeeze(-1)


def taid_target(student, teacher, taid_t):
    """TAID's interpolated target logits (1−λ)·s + λ·t, with the student detached."""
    s = student.detach()
    if taid_t == 1.0:
        return teacher
    if taid_t == 0.0:
        return s
    # 0 < λ < 1: an entry −inf in either stays −inf (no 0·inf), with zero gradient.
    return taid_t * teacher + (1.0 - taid_t) * s


def canonical_kind(kind, beta, skew):
    """Map the end points of the parametrized kinds to the exact plain KLs."""
    if kind == "jsd" and beta == 0.0:
        return "fkl"
    if kind == "jsd" and beta == 1.0:
        return "rkl"
    if kind == "skew_fkl" and skew == 0.0:
        return "fkl"
    if kind == "skew_rkl" and skew == 0.0:
        return "rkl"
    return kind


def divergence_rows(student, teacher, *, kind="fkl", temperature=1.0, beta=0.5, skew=0.1,
                    taid_t=None):
    """Per-row divergence, shaped like the leading dims; no T² factor, no masking.

    Half-precision inputs are computed in float32; float32 and float64 in their own dtype.
    """
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    s = student.to(dtype)
    t = teacher.to(dtype)
    if taid_t is not None:
        t = taid_target(s, t, taid_t)
    lq, q_ok = log_softmax(s, temperature)  # student log-probabilities
    lp, p_ok = log_softmax(t, temperature)  # teacher log-probabilities
    loss = rows_from_log_probs(lp, lq, canonical_kind(kind, beta, skew), beta, skew)
    return nan_rows(loss, ~(p_ok & q_ok), student, teacher)


def rows_from_log_probs(lp, lq, kind, beta, skew):
    """Σ over the last dim of each kind's per-element terms, from the teacher's and the
    student's log-probabilities (kind canonical: see canonical_kind). Every kind is such a sum
    of terms of (lp, lq) alone, so the sum over any partition of the columns (a vocabulary
    shard, kdkernels/ops/vocab_parallel.py) adds up to the row's divergence."""
    if kind == "fkl":
        return _kl(lp, lq)
    if kind == "rkl":
        return _kl(lq, lp)
    if kind == "jsd":
        lm = _log_mix(beta, lp, lq)
        m = lm.exp()
        return beta * kl_sum(lp.exp(), m, lp, lm) + (1.0 - beta) * kl_sum(lq.exp(), m, lq, lm)
    if kind == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if kind == "skew_fkl":
        return _kl(lp, _log_mix(skew, lp, lq))
    if kind == "skew_rkl":
        return _kl(lq, _log_mix(skew, lq, lp))
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
