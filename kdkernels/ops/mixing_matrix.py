"""Ops of the MOHAWK mixing-matrix family: C++ (csrc/cpu/mixing_matrix.cpp) and Triton
(kdkernels/triton_kernels/mixing_matrix.py, as kdkernels::mixing_matrix_{fwd,bwd}_triton).

    kdkernels::mixing_matrix_fwd(q, k, C, B, log_decay, D?, scale, squared, teacher_lse?)
        -> loss (batch, H) fp32, lse (batch, H, T) fp32 (the teacher's row normalizers),
           sq (batch, H) fp32 (Σ (M − A)², what backward needs)
    kdkernels::mixing_matrix_bwd(grad_loss, q, k, C, B, log_decay, D?, scale, squared, lse, sq)
        -> dC, dB, dlog_decay (inputs' shapes and dtypes), dD ((H,) or empty without D)
Shapes: q, k (batch, T, H, d); C, B (batch, T, G, N); log_decay (batch, T, H); D (H,).
q and k get no gradient (the teacher is frozen). The backward recomputes the tiles.
log_decay may hold −inf (a decay to 0) and steps of any size; a NaN in a (batch, head)'s
log_decay makes that unit's loss and all its gradient contributions NaN, which is how
kdkernels.mixing_matrix_loss applies the NaN rule to the ops (the ops do not check the other
inputs for NaN/inf)."""
from typing import Optional

import torch
from torch import Tensor

from ._register import register_pair

_ARGS = ("q", "k", "C", "B", "log_decay", "D", "scale", "squared", "teacher_lse")


def _fake_fwd(q, k, C, B, log_decay, D, scale, squared, teacher_lse):
    batch, t, heads, _ = q.shape
    f32 = dict(dtype=torch.float32)
    return q.new_empty((batch, heads), **f32), q.new_empty((batch, heads, t), **f32), \
        q.new_empty((batch, heads), **f32)


def _fake_bwd(grad_loss, q, k, C, B, log_decay, D, scale, squared, lse, sq):
    d_d = torch.empty_like(D) if D is not None else q.new_empty((0,))
    return torch.empty_like(C), torch.empty_like(B), torch.empty_like(log_decay), d_d


def _setup_context(ctx, inputs, output):
    q, k, C, B, log_decay, D, scale, squared, _ = inputs
    _, lse, sq = output
    ctx.save_for_backward(q, k, C, B, log_decay, D, lse, sq)
    ctx.scale, ctx.squared = scale, squared


def _backward_with(bwd_op):
    def backward(ctx, grad_loss, _unused_lse, _unused_sq):
        q, k, C, B, log_decay, D, lse, sq = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * len(_ARGS)
        dc, db, dld, dd = bwd_op(grad_loss.contiguous(), q, k, C, B, log_decay, D, ctx.scale,
                                 ctx.squared, lse, sq)
        return None, None, dc, db, dld, (dd if D is not None else None), None, None, None
    return backward


# The Triton kernels (kdkernels/triton_kernels/mixing_matrix.py) as opaque custom ops.
@torch.library.custom_op("kdkernels::mixing_matrix_fwd_triton", mutates_args=())
def mixing_matrix_fwd_triton(q: Tensor, k: Tensor, C: Tensor, B: Tensor, log_decay: Tensor,
                             D: Optional[Tensor], scale: float, squared: bool,
                             teacher_lse: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton_kernels import mixing_matrix as kernels  # noqa: PLC0415 (imports triton)

    return kernels.mixing_matrix_fwd(q, k, C, B, log_decay, D, scale, squared, teacher_lse)


@torch.library.custom_op("kdkernels::mixing_matrix_bwd_triton", mutates_args=())
def mixing_matrix_bwd_triton(grad_loss: Tensor, q: Tensor, k: Tensor, C: Tensor, B: Tensor,
                             log_decay: Tensor, D: Optional[Tensor], scale: float, squared: bool,
                             lse: Tensor, sq: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..triton_kernels import mixing_matrix as kernels  # noqa: PLC0415

    return kernels.mixing_matrix_bwd(grad_loss, q, k, C, B, log_decay, D, scale, squared, lse, sq)


register_pair("mixing_matrix_fwd_triton", "mixing_matrix_bwd_triton", _fake_fwd, _fake_bwd,
              _backward_with, _setup_context)


def register_native():
    """Python-side registrations of the C++ ops (ops.register_native runs this once)."""
    register_pair("mixing_matrix_fwd", "mixing_matrix_bwd", _fake_fwd, _fake_bwd, _backward_with,
                  _setup_context)
