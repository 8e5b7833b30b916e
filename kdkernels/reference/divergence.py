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

0·log 0 = 0: a term x·(log x − log y) is 0 wherever x == 0, with a zero gradient there,
so −inf logits and underflowing tails never produce NaN.
"""
import math

import torch

KINDS = ("fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl")

# Log-probabilities are clamped to this before mixing, so that log(β·e^-inf + ...) and its
# gradient stay finite; exp(_LOG_FLOOR) is 0 in every float type, so values are unchanged.
_LOG_FLOOR = -1e30


def _xlog_ratio(x, lx, ly):
    """Elementwise x·(lx − ly), defined as 0 (value and gradient) where x == 0."""
    live = x > 0
    lx = torch.where(live, lx, 0.0)
    ly = torch.where(live, ly, 0.0)
    return torch.where(live, x * (lx - ly), 0.0)


def _kl(lx, ly):
    """KL(x‖y) per row from log-probabilities."""
    return _xlog_ratio(lx.exp(), lx, ly).sum(-1)


def _log_mix(w, lx, ly):
    """log(w·x + (1−w)·y) from log x and log y, for 0 < w < 1, computed in log space."""
    return torch.logaddexp(
        math.log(w) + lx.clamp_min(_LOG_FLOOR), math.log1p(-w) + ly.clamp_min(_LOG_FLOOR)
    )


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
    lq = torch.log_softmax(s / temperature, dim=-1)  # student log-probabilities
    lp = torch.log_softmax(t / temperature, dim=-1)  # teacher log-probabilities

    kind = canonical_kind(kind, beta, skew)
    if kind == "fkl":
        return _kl(lp, lq)
    if kind == "rkl":
        return _kl(lq, lp)
    if kind == "jsd":
        lm = _log_mix(beta, lp, lq)
        return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)
    if kind == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if kind == "skew_fkl":
        return _kl(lp, _log_mix(skew, lp, lq))
    if kind == "skew_rkl":
        return _kl(lq, _log_mix(skew, lq, lp))
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
