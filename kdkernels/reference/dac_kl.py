"""Reference (specification) of DAC-KL, the distribution-adaptive clipped KL of Liu et al. 2024
("Multi-Granularity Semantic Revision for Large Language Model Distillation"), as this library
defines it; plain PyTorch with a full sort of each row, float64-capable, differentiable by
autograd in the student logits and in both bounds.

Per row, p = softmax(t/T) sorted in descending order, cumulative masses c_0 = 0,
c_k = p_(1) + … + p_(k). For bounds 0 ≤ l < u ≤ 1 the clipped teacher gives each token the
part of its mass interval [c_{k−1}, c_k] inside [l, u], renormalized:
    p̃_(k) = |[c_{k−1}, c_k] ∩ [l, u]| / (u − l)
Tokens of exactly equal probability form one group, whose interval is the union of theirs;
they share the group's overlap equally (so the result does not depend on how ties are
ordered). Loss = Σ_j p̃_j (log p̃_j − log q_j), q = softmax(s/T) over the full vocabulary
(0·log 0 = 0); the caller multiplies by T² (t2_scale), masks and reduces.
Derivatives in the bounds where a bound sits exactly on a group boundary are one-sided: l's
group is the one with c_lo ≤ l < c_hi (l increasing; at l = 0 the top group), u's the one
with c_lo < u ≤ c_hi (u decreasing); u = 1 clips no tail, so there only the renormalization
1/(u − l) depends on u.
(l, u) = (0, 1) is the forward KL; (0, u) keeps a top-p band; l > 0 clips the dominant head.
A row without a distribution (logits holding NaN or +inf, or all −inf, in the student or the
teacher) is NaN, its gradient rows too (no_distribution, the library's NaN rule).
"""
import torch

from .divergence import kl_sum

from .. import _plumbing as P


def clipped_teacher(p, lower, upper):
    """p (N, V) probabilities, lower/upper (N,) → p̃ (N, V); differentiable in lower/upper."""
    ps, order = torch.sort(p, dim=-1, descending=True, stable=True)
    c_hi = ps.cumsum(-1)
    c_lo = c_hi - ps
    v = p.shape[-1]
    pos = torch.arange(v, device=p.device).expand_as(ps)
    starts = torch.ones_like(ps, dtype=torch.bool)  # first member of each group of equal values
    starts[:, 1:] = ps[:, 1:] != ps[:, :-1]
    ends = torch.ones_like(starts)  # last member of each group
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, 0).cummax(-1).values
    last = torch.where(ends, pos, v).flip(-1).cummin(-1).values.flip(-1)
    g_lo, g_hi = c_lo.gather(-1, first), c_hi.gather(-1, last)
    size = (last - first + 1).to(p.dtype)
    lo, hi = lower[:, None].to(p.dtype), upper[:, None].to(p.dtype)
    # min/max written as where() so that on a group boundary the derivative is one-sided and
    # counted once: l's group is the one with c_lo ≤ l < c_hi, u's the one with c_lo < u ≤ c_hi
    # (l increasing, u decreasing: inward at l = 0); u = 1 clips no tail (no group at u).
    top = torch.where(hi >= 1.0, g_hi, torch.where(hi <= g_hi, hi, g_hi))
    bottom = torch.where(lo >= g_lo, lo, g_lo)
    overlap = top - bottom
    share = torch.where(overlap > 0, overlap, 0.0) / size / (hi - lo)
    return torch.zeros_like(share).scatter(-1, order, share)


def no_distribution(student, teacher):
    """(N,) bool: the rows the NaN rule makes NaN: logits holding NaN or +inf, or all −inf
    (no softmax exists), in the student or the teacher. −inf entries alone are a masked
    vocabulary, not an error."""
    def bad(x):
        return (torch.isnan(x) | (x == float("inf"))).any(-1) | (x == float("-inf")).all(-1)

    return bad(student) | bad(teacher)


def dac_kl_rows(student, teacher, lower, upper, *, temperature=1.0):
    """Per-row DAC-KL (without T²) of (N, V) logits; lower/upper (N,) tensors.

    A row without a distribution (no_distribution) is NaN, and so are its gradient rows in the
    student and in the bounds (tensors of one bound per row). Both logits are shifted by their
    row maximum before the division by T: at a tiny T, x/T − max(x/T) would keep only the
    rounding of the large quotients."""
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    s = student.to(dtype)
    log_q = torch.log_softmax((s - s.detach().amax(-1, keepdim=True)) / temperature, dim=-1)
    with torch.no_grad():  # the teacher is constant
        t = teacher.detach().to(dtype)
        p = torch.softmax((t - t.amax(-1, keepdim=True)) / temperature, dim=-1)
    p_clip = clipped_teacher(p, lower, upper)
    log_p = torch.where(p_clip > 0, p_clip, 1.0).log()
    rows = kl_sum(p_clip, log_q.exp(), log_p, log_q)  # Σ p̃·log(p̃/q), cancellation-free
    return P.nan_rows(rows, no_distribution(student.detach(), teacher.detach()), student,
                      lower, upper)
