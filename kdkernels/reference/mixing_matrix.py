"""Reference (specification) of MOHAWK's mixing-matrix matching loss, in plain PyTorch.

It materializes both T×T matrices per (batch, head), like MOHAWK's materialize_mixer and HF's
eager attention: the spec the tiled kernels are tested against, float64-capable and
differentiable by autograd.

    teacher  A = softmax(scale·q kᵀ + causal mask)                      per (b, h), fp32 or fp64
    student  M[i, j] = (C_i · B_j) · exp(Σ_{k=j+1..i} log_decay_k)      for i ≥ j, else 0
             (+ D_h on the diagonal); C, B of group g = h // (H/G) (SSD's shared B/C)
    loss     ‖M − A‖_F per (b, h), or ‖M − A‖²_F with squared=True
The segment sums Σ_{k=j+1..i} are differences of cumulative sums, masked above the diagonal
before the exponential (exp(−inf) = 0), so nothing overflows: log_decay ≤ 0 makes every
kept exponent ≤ 0.
"""
import math

import torch


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


def student_mixer(C, B, log_decay, D=None):
    """M (batch, H, T, T): the SSD mixing matrix of C, B (batch, T, G, N), log_decay (batch, T, H)."""
    dtype = torch.promote_types(torch.promote_types(C.dtype, B.dtype), torch.float32)
    heads, groups = log_decay.shape[-1], C.shape[2]
    per_group = heads // groups
    c = C.to(dtype).repeat_interleave(per_group, dim=2)  # (batch, T, H, N)
    b = B.to(dtype).repeat_interleave(per_group, dim=2)
    cb = torch.einsum("bihn,bjhn->bhij", c, b)
    cs = torch.cumsum(log_decay.to(dtype), dim=1).transpose(1, 2)  # (batch, H, T)
    segsum = cs[..., :, None] - cs[..., None, :]  # Σ_{k=j+1..i} log_decay_k at (i, j)
    t = C.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=C.device).tril()
    m = cb * torch.exp(segsum.masked_fill(~causal, float("-inf")))
    if D is not None:
        m = m + torch.diag_embed(D.to(dtype)[None, :, None].expand(m.shape[0], heads, t))
    return m


def mixing_matrix_loss_per_head(q, k, C, B, log_decay, D=None, *, scale=None, squared=False,
                                teacher_lse=None):
    """‖M − A‖_F (or its square) per (batch, head): shape (batch, H)."""
    a = teacher_attention(q.detach(), k.detach(), scale, teacher_lse)  # the teacher is frozen
    m = student_mixer(C, B, log_decay, D)
    sq = (m - a.to(m.dtype)).square().sum(dim=(-2, -1))
    return sq if squared else sq.sqrt()
