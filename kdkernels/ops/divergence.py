"""Ops of the divergence family.

    kdkernels::divergence_fwd          C++ op (csrc/ops.cpp): CPU kernel in csrc/cpu/divergence.cpp
    kdkernels::divergence_fwd_triton   Triton kernels in kdkernels/triton_kernels/divergence.py
    kdkernels::divergence_rows_out     C++ op: the same rows into the caller's buffers (CPU, CUDA)
    kdkernels::divergence_shard_rows   C++ op: the rows' passes split for the vocabulary-parallel
                                       path (CPU; Triton's twin in triton_kernels/divergence.py)
    rows_into                          the row launcher of every backend, for the ops built on
                                       these kernels (fused linear + divergence, ...)

Both take logits as (N, V) rows (any row stride, unit column stride) and return
    loss          Σ_i w_i·L_i (shape ()) if reduce, else w_i·L_i per row (shape (N,)), float32
    grad_student  d loss_i / d student_i, (N, V) in the student's dtype (fp32 for fp16: see
                  _plumbing.grad_dtype), or empty if not asked
    grad_teacher  d loss_i / d teacher_i, likewise
computed in ONE forward launch: backward only scales the saved gradients by the incoming
gradient (in place; skipped when it is exactly 1): see _hand_over.py.

Kernel arguments are in canonical form (kernel_args): `mode` is one of
    KL    KL(P‖Q)                              SKEW  KL(P ‖ mix·P + (1−mix)·Q)
    JSD   mix·KL(P‖M) + (1−mix)·KL(Q‖M), M = mix·P + (1−mix)·Q     TVD  ½Σ|P − Q|
where P is the teacher distribution and Q the student's, or the other way round if `swap`.
`taid` is TAID's λ (1.0: the plain teacher). row_weight carries masks, T² and 1/denominator.
"""
import torch
from torch import Tensor

from .._plumbing import grad_dtype
from ._hand_over import keep_for_hand_over, scale, take_handed_over
from ._register import register_fake_and_autograd
from ..reference.divergence import canonical_kind

MODE_KL, MODE_SKEW, MODE_JSD, MODE_TVD = 0, 1, 2, 3
SCHEMA_ARGS = ("student", "teacher", "row_weight", "mode", "swap", "mix", "temperature", "taid",
               "reduce", "grad_student", "grad_teacher")


def kernel_args(kind, beta, skew):
    """(mode, swap, mix) for a user-level kind."""
    kind = canonical_kind(kind, beta, skew)
    return {
        "fkl": (MODE_KL, False, 0.0),
        "rkl": (MODE_KL, True, 0.0),
        "jsd": (MODE_JSD, False, float(beta)),
        "tvd": (MODE_TVD, False, 0.0),
        "skew_fkl": (MODE_SKEW, False, float(skew)),
        "skew_rkl": (MODE_SKEW, True, float(skew)),
    }[kind]


def _fake(student, teacher, row_weight, mode, swap, mix, temperature, taid, reduce,
          grad_student, grad_teacher):
    loss = row_weight.new_empty(() if reduce else (student.shape[0],), dtype=torch.float32)
    gs = student.new_empty(student.shape if grad_student else (0,), dtype=grad_dtype(student.dtype))
    gt = teacher.new_empty(teacher.shape if grad_teacher else (0,), dtype=grad_dtype(teacher.dtype))
    return loss, gs, gt


def _setup_context(ctx, inputs, output):
    _, gs, gt = output
    ctx.reduce = inputs[SCHEMA_ARGS.index("reduce")]
    ctx.input_dtypes = (inputs[0].dtype, inputs[1].dtype)
    keep_for_hand_over(ctx, gs, gt)


def _backward(ctx, grad_loss, _unused_gs, _unused_gt):
    gs, gt = take_handed_over(ctx)
    return (scale(gs, grad_loss, ctx.reduce, ctx.input_dtypes[0]),
            scale(gt, grad_loss, ctx.reduce, ctx.input_dtypes[1])) + (None,) * (len(SCHEMA_ARGS) - 2)


@torch.library.custom_op("kdkernels::divergence_fwd_triton", mutates_args=(), device_types=None)
def divergence_fwd_triton(student: Tensor, teacher: Tensor, row_weight: Tensor, mode: int,
                          swap: bool, mix: float, temperature: float, taid: float, reduce: bool,
                          grad_student: bool, grad_teacher: bool) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton_kernels.divergence import divergence_fwd  # noqa: PLC0415 (lazy: imports triton)

    return divergence_fwd(student, teacher, row_weight, mode, swap, mix, temperature, taid,
                          reduce, grad_student, grad_teacher)


register_fake_and_autograd("divergence_fwd_triton", _fake, _backward, _setup_context)


def rows_into(backend, student, teacher, row_weight, mode, swap, mix, temperature, taid,
              loss_rows, grad_student=None, grad_teacher=None):
    """The divergence rows of a kernel backend ('cpu', 'cuda', 'triton') into the caller's
    buffers: loss_rows (N,) float32 gets w_i·L_i, and grad_student / grad_teacher (contiguous
    (N, V), dtype grad_dtype(input)), when given, the gradients of those weighted losses. A
    gradient buffer may be its own logits (in place). Eager, no autograd: the building block
    that ops built on the divergence kernels call per chunk (kdkernels/ops/fused_linear.py)."""
    args = (student, teacher, row_weight, mode, swap, mix, temperature, taid, loss_rows,
            grad_student, grad_teacher)
    if backend == "triton":
        from ..triton_kernels.divergence import divergence_rows  # noqa: PLC0415 (imports triton)

        divergence_rows(*args)
    else:
        torch.ops.kdkernels.divergence_rows_out(*args)


def shard_rows(backend, student, teacher, row_weight, mode, swap, mix, temperature, taid, phase,
               stats, grad_student=None, grad_teacher=None):
    """One phase of the divergence rows split at the all-reduces of the vocabulary-parallel
    path (kdkernels/ops/vocab_parallel.py runs the phases; csrc/cpu/divergence.h has their
    meaning and the stats (N, 7) float64 columns), on a kernel backend: 'cpu' (C++) or
    'triton'. Eager, in place."""
    args = (student, teacher, row_weight, mode, swap, mix, temperature, taid, phase, stats,
            grad_student, grad_teacher)
    if backend == "triton":
        from ..triton_kernels.divergence import divergence_shard_rows  # noqa: PLC0415

        divergence_shard_rows(*args)
    else:
        torch.ops.kdkernels.divergence_shard_rows(*args)


def register_native():
    """Python-side registrations of the C++ op (ops.register_native runs this once)."""
    register_fake_and_autograd("divergence_fwd", _fake, _backward, _setup_context)
