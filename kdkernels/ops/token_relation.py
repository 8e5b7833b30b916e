"""Ops of the token-relation family: C++ (csrc/cpu/token_relation.cpp) and Triton
(kdkernels/triton_kernels/token_relation.py, as kdkernels::token_relation_{fwd,bwd}_triton).

    kdkernels::token_relation_fwd(fs, xs?, ft, xt?, mask?, scale_s, scale_t, causal, mse)
        -> rows (S, T) fp32: the per-row losses, 0 at padded rows, NaN at the kept rows of a
           sequence with a NaN or ±inf in a real token of any input (the NaN rule's unit is
           the sequence; its real tokens' gradient rows are NaN too; padded tokens are never
           read);
           stats (S, 5, T) fp32: per row the student's maximum and log-sum (m_s, log l_s:
           its log-sum-exp is m_s + log l_s, kept apart for precision), the teacher's
           (m_t, log l_t), and for mse c = Σ_j Q(Q − P) (0 for kl): what backward needs
    kdkernels::token_relation_bwd(grad_rows, fs, xs?, ft, xt?, mask?, scale_s, scale_t, causal,
                                  mse, stats) -> dfs, dxs (the inputs' shapes and dtypes; dxs
                                  empty without keys, when dfs holds both sides)
Shapes: S = batch·R sequences; fs, xs (S, T, d_s) the student's features and keys (xs None:
the features are their own keys); ft, xt (S, T, d_t) the teacher's (constants); mask (S, T) bool, True = a real token. Relation logits are
scale·F·Xᵀ (cosine similarity: the caller normalizes F and X first). The backward recomputes
the tiles from the saved row statistics."""
from typing import Optional

import torch
from torch import Tensor

from ._register import register_pair

_N_ARGS = 9  # fs, xs, ft, xt, mask, scale_s, scale_t, causal, mse


def _fake_fwd(fs, xs, ft, xt, mask, scale_s, scale_t, causal, mse):
    seqs, t = fs.shape[0], fs.shape[1]
    return fs.new_empty((seqs, t), dtype=torch.float32), \
        fs.new_empty((seqs, 5, t), dtype=torch.float32)


def _fake_bwd(grad_rows, fs, xs, ft, xt, mask, scale_s, scale_t, causal, mse, stats):
    # the kernels return contiguous gradients, whatever the inputs' strides
    return fs.new_empty(fs.shape), (xs.new_empty(xs.shape) if xs is not None else fs.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    fs, xs, ft, xt, mask, scale_s, scale_t, causal, mse = inputs
    ctx.save_for_backward(fs, xs, ft, xt, mask, output[1])
    ctx.args = (scale_s, scale_t, causal, mse)


def _backward_with(bwd_op):
    def backward(ctx, grad_rows, _unused_stats):
        fs, xs, ft, xt, mask, stats = ctx.saved_tensors
        if grad_rows is None:
            return (None,) * _N_ARGS
        dfs, dxs = bwd_op(grad_rows.contiguous(), fs, xs, ft, xt, mask, *ctx.args, stats)
        return dfs, (dxs if xs is not None else None), None, None, None, None, None, None, None
    return backward


# The Triton kernels (kdkernels/triton_kernels/token_relation.py) as opaque custom ops.
@torch.library.custom_op("kdkernels::token_relation_fwd_triton", mutates_args=())
def token_relation_fwd_triton(fs: Tensor, xs: Optional[Tensor], ft: Tensor, xt: Optional[Tensor],
                              mask: Optional[Tensor], scale_s: float, scale_t: float,
                              causal: bool, mse: bool) -> tuple[Tensor, Tensor]:
    from ..triton_kernels import token_relation as kernels  # noqa: PLC0415 (imports triton)

    return kernels.token_relation_fwd(fs, xs, ft, xt, mask, scale_s, scale_t, causal, mse)


@torch.library.custom_op("kdkernels::token_relation_bwd_triton", mutates_args=())
def token_relation_bwd_triton(grad_rows: Tensor, fs: Tensor, xs: Optional[Tensor], ft: Tensor,
                              xt: Optional[Tensor],
                              mask: Optional[Tensor], scale_s: float, scale_t: float,
                              causal: bool, mse: bool, stats: Tensor) -> tuple[Tensor, Tensor]:
    from ..triton_kernels import token_relation as kernels  # noqa: PLC0415

    return kernels.token_relation_bwd(grad_rows, fs, xs, ft, xt, mask, scale_s, scale_t,
                                      causal, mse, stats)


register_pair("token_relation_fwd_triton", "token_relation_bwd_triton", _fake_fwd, _fake_bwd,
              _backward_with, _setup_context)


def register_native():
    """Python-side registrations of the C++ ops (ops.register_native runs this once)."""
    register_pair("token_relation_fwd", "token_relation_bwd", _fake_fwd, _fake_bwd, _backward_with,
                  _setup_context)
