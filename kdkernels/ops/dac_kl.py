"""Ops of the DAC-KL family: C++ (csrc/cpu/dac_kl.cpp) and Triton
(kdkernels/triton_kernels/dac_kl.py, as kdkernels::dac_kl_fwd_triton).

    kdkernels::dac_kl_fwd(student, teacher, lower, upper, row_weight, temperature, reduce,
                          grad_student, grad_bounds)
        -> loss          Σ_i w_i·L_i (shape ()) if reduce, else w_i·L_i per row (N,), float32
           grad_student  w_i·dL_i/ds_i = w_i·(q − p̃)/T, (N, V) in the student's dtype (fp32 for
                         fp16, and for bf16 when not reduce: _plumbing.grad_dtype), or empty
           grad_bounds   (2, N) float32: w_i·dL_i/dl_i and w_i·dL_i/du_i (zeros if not asked)
student, teacher: (N, V) rows (any row stride, unit column stride); lower, upper: (N,) bounds;
row_weight (N,) carries T², masks and the mean's 1/denominator (0: the row is never read).
One forward launch computes everything; backward only scales the saved gradients by the
incoming gradient (handing the student's over without a copy, as the divergence ops do)."""
import torch
from torch import Tensor

from .._plumbing import grad_dtype
from ._register import register_fake_and_autograd
from ._hand_over import keep_for_hand_over, scale, take_handed_over

SCHEMA_ARGS = ("student", "teacher", "lower", "upper", "row_weight", "temperature", "reduce",
               "grad_student", "grad_bounds")


def _fake(student, teacher, lower, upper, row_weight, temperature, reduce, grad_student,
          grad_bounds):
    n = student.shape[0]
    loss = row_weight.new_empty(() if reduce else (n,), dtype=torch.float32)
    gs = student.new_empty(student.shape if grad_student else (0,),
                           dtype=grad_dtype(student.dtype, per_row_scaling=not reduce))
    return loss, gs, row_weight.new_empty((2, n), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _, gs, gb = output
    ctx.reduce = inputs[SCHEMA_ARGS.index("reduce")]
    ctx.dtypes = (inputs[0].dtype, inputs[2].dtype, inputs[3].dtype)
    keep_for_hand_over(ctx, gs, gb)


def _backward(ctx, grad_loss, _unused_gs, _unused_gb):
    gs, gb = take_handed_over(ctx)
    if grad_loss is None:
        return (None,) * len(SCHEMA_ARGS)
    d_bounds = gb * grad_loss  # (2, N) times a scalar, or times per-row factors
    return (scale(gs, grad_loss, ctx.reduce, ctx.dtypes[0]), None,
            d_bounds[0].to(ctx.dtypes[1]), d_bounds[1].to(ctx.dtypes[2])) + \
        (None,) * (len(SCHEMA_ARGS) - 4)


@torch.library.custom_op("kdkernels::dac_kl_fwd_triton", mutates_args=())
def dac_kl_fwd_triton(student: Tensor, teacher: Tensor, lower: Tensor, upper: Tensor,
                      row_weight: Tensor, temperature: float, reduce: bool, grad_student: bool,
                      grad_bounds: bool) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton_kernels.dac_kl import dac_kl_fwd  # noqa: PLC0415 (lazy: imports triton)

    return dac_kl_fwd(student, teacher, lower, upper, row_weight, temperature, reduce,
                      grad_student, grad_bounds)


register_fake_and_autograd("dac_kl_fwd_triton", _fake, _backward, _setup_context)


def register_native():
    """Python-side registrations of the C++ op (ops.register_native runs this once)."""
    register_fake_and_autograd("dac_kl_fwd", _fake, _backward, _setup_context)
