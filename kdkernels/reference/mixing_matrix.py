"""Reference (specification) of MOHAWK's mixing-matrix matching loss, in plain PyTorch.

It materializes both T×T matrices per (batch, head), like MOHAWK's materialize_mixer and HF's
eager attention: the spec the tiled kernels are tested against, float64-capable and
differentiable by autograd.

    teacher  A = softmax(scale·q kᵀ + causal mask)                      per (b, h), fp32 or fp64
    student  M[i, j] = (C_i · B_j) · exp(Σ_{k=j+1..i} log_decay_k)      for i ≥ j, else 0
             (+ D_h on the diagonal); C, B of group g = h // (H/G) (SSD's shared B/C)
    loss     ‖M − A‖_F per (b, h), or ‖M − A‖²_F with squared=True
Each segment sum Σ_{k=j+1..i} is its own cumulative sum of log_decay_{j+1..i} (Mamba-2's
stable segsum), not a difference of two prefix sums: its terms are all ≤ 0, so nothing
cancels, whatever the size of a step (a step of −1e30 or −inf decays every segment across it
to exactly 0), and no kept exponent is positive. Above the diagonal it is −inf (exp = 0).

NaN rule (the unit is one (batch, head) loss): see bad_units().
"""
import math

import torch

from .. import _plumbing as P


def teacher_attention(q, k, scale=None, teacher_lse=None):
    """A (batch, H, T, T): causal softmax attention probabilities of q, k (batch, T, H, d).
    With teacher_lse (batch, H, T) the normalizer is taken from it instead of computed."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q.to(dtype), k.to(dtype)) * scale
    t = q.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    if teacher_lse is None:
        return torch.softmax(scores, dim=-1)
    return torch.exp(scores - teacher_lse.to(dtype)[..., None])


def segment_sums(log_decay, dtype=None):
    """(batch, H, T, T): Σ_{k=j+1..i} log_decay_k at (i, j) for i ≥ j (0 on the diagonal),
    −inf above it; log_decay (batch, T, H). Each entry is the cumulative sum over i of
    log_decay_i masked to i > j, so it never subtracts two large prefix sums."""
    x = log_decay.to(dtype or log_decay.dtype).transpose(1, 2)  # (batch, H, T)
    t = x.shape[-1]
    ones = torch.ones(t, t, dtype=torch.bool, device=x.device)
    x = x[..., :, None].expand(*x.shape, t)  # x[..., i, j] = log_decay_i
    seg = x.masked_fill(~ones.tril(-1), 0.0).cumsum(-2)
    return seg.masked_fill(~ones.tril(), float("-inf"))


def per_head(x, heads):
    """(batch, T, G, N) → (batch, H, T, N): group g's slice for each of its H/G heads."""
    return x.repeat_interleave(heads // x.shape[2], dim=2).transpose(1, 2)


def student_mixer(C, B, log_decay, D=None):
    """M (batch, H, T, T): the SSD mixing matrix of C, B (batch, T, G, N), log_decay (batch, T, H)."""
    dtype = torch.promote_types(torch.promote_types(C.dtype, B.dtype), torch.float32)
    heads = log_decay.shape[-1]
    return _mixer(per_head(C.to(dtype), heads), per_head(B.to(dtype), heads), log_decay, D)


def _mixer(c, b, log_decay, D):
    """student_mixer from the per-head c, b (batch, H, T, N)."""
    cb = c @ b.transpose(-1, -2)
    m = cb * torch.exp(segment_sums(log_decay, cb.dtype))
    if D is not None:
        batch, heads, t = m.shape[:3]
        m = m + torch.diag_embed(D.to(m.dtype)[None, :, None].expand(batch, heads, t))
    return m


def _finite_units(x, dims, shape):
    """(shape) bool: no NaN or ±inf in x over `dims` (empty slices are finite)."""
    if x.numel() == 0:
        return torch.ones(shape, dtype=torch.bool, device=x.device)
    return x.amax(dims).isfinite() & x.amin(dims).isfinite()  # amax/amin propagate NaN


def bad_units(q, k, C, B, log_decay, D=None, teacher_lse=None):
    """(batch, H) bool: the (batch, head) units whose inputs hold a bad value.

    A unit (b, h) reads q[b, :, h], k[b, :, h], C[b, :, g], B[b, :, g] (g its group),
    log_decay[b, :, h], D[h] and teacher_lse[b, h]; it is bad when any of them holds NaN or
    ±inf, except log_decay, where −inf is a valid step (a decay to exactly 0) and NaN or a
    positive value is bad (eager calls reject positive values first; this catches them
    where the check cannot run, in compiled graphs). A bad unit's loss is NaN, and so is
    every gradient element it contributes to: C[b, :, g], B[b, :, g], log_decay[b, :, h] and
    D[h]. The other units are unaffected."""
    batch, t, heads, _ = q.shape
    groups = C.shape[2]
    shape = (batch, heads)
    ok = _finite_units(q, (1, 3), shape) & _finite_units(k, (1, 3), shape)
    cb_ok = _finite_units(C, (1, 3), (batch, groups)) & _finite_units(B, (1, 3), (batch, groups))
    if groups:
        ok = ok & cb_ok.repeat_interleave(heads // groups, dim=1)
    if t:
        ok = ok & (log_decay <= 0).all(1)  # False for NaN and +inf, True for −inf
    if D is not None:
        ok = ok & D.isfinite()
    if teacher_lse is not None:
        ok = ok & _finite_units(teacher_lse, (2,), shape)
    return ~ok


def mixing_matrix_loss_per_head(q, k, C, B, log_decay, D=None, *, scale=None, squared=False,
                                teacher_lse=None):
    """‖M − A‖_F (or its square) per (batch, head): shape (batch, H); NaN at bad_units()."""
    q, k = q.detach(), k.detach()  # the teacher is frozen: q, k and teacher_lse are constants
    teacher_lse = None if teacher_lse is None else teacher_lse.detach()
    a = teacher_attention(q, k, scale, teacher_lse)
    dtype = torch.promote_types(torch.promote_types(C.dtype, B.dtype), torch.float32)
    heads = log_decay.shape[-1]
    c, b = per_head(C.to(dtype), heads), per_head(B.to(dtype), heads)
    m = _mixer(c, b, log_decay, D)
    sq = (m - a.to(m.dtype)).square().sum(dim=(-2, -1))
    loss = sq if squared else sq.sqrt()
    bad = bad_units(q, k, C, B, log_decay, D, teacher_lse)
    rows = [c, b, log_decay.transpose(1, 2)]
    if D is not None:
        rows.append(D[None].expand(loss.shape))
    return P.nan_rows(loss, bad, *rows)
