"""Ops of the divergence family.

    kdkernels::divergence_fwd          C++ op (csrc/ops.cpp): CPU kernel in csrc/cpu/divergence.cpp
    kdkernels::divergence_fwd_triton   Triton kernels in kdkernels/triton_kernels/divergence.py

Both take logits as (N, V) rows (any row stride, unit column stride) and return
    loss          Σ_i w_i·L_i (shape ()) if reduce, else w_i·L_i per row (shape (N,)), float32
    grad_student  d loss_i / d student_i, (N, V) in the student's dtype (fp32 for fp16: see
                  _plumbing.grad_dtype), or empty if not asked
    grad_teacher  d loss_i / d teacher_i, likewise
computed in ONE forward launch: backward only scales the saved gradients by the incoming
gradient (in place; skipped when it is exactly 1).

Kernel arguments are in canonical form (kernel_args): `mode` is one of
    KL    KL(P‖Q)                              SKEW  KL(P ‖ mix·P + (1−mix)·Q)
    JSD   mix·KL(P‖M) + (1−mix)·KL(Q‖M), M = mix·P + (1−mix)·Q     TVD  ½Σ|P − Q|
where P is the teacher distribution and Q the student's, or the other way round if `swap`.
`taid` is TAID's λ (1.0: the plain teacher). row_weight carries masks, T² and 1/denominator.
"""
import torch
from torch import Tensor

from .._plumbing import grad_dtype
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


def _eager(t):
    """True for a plain tensor outside tracing (torch.compile, make_fx, opcheck's AOT tests),
    where in-place hand-over and a host-side check of the incoming gradient are allowed."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def keep_for_hand_over(ctx, *grads):
    """Setup-context half of the hand-over: the forward's gradients, saved for backward.
    Eager: detached references (no reference cycle through grad_fn) that backward hands over
    and drops, so autograd can adopt the buffer as .grad without a copy. Traced: saved."""
    ctx.set_materialize_grads(False)  # the grad outputs are never used: no (N, V) zeros for them
    if not _eager(grads[0]):
        ctx.save_for_backward(*grads)
        ctx.handed_over = None
    else:
        ctx.handed_over = [g.detach() for g in grads]


def take_handed_over(ctx):
    """Backward half: the saved gradients, once."""
    if ctx.handed_over is None:
        return ctx.saved_tensors
    if not ctx.handed_over:
        raise RuntimeError("kdkernels: backward through the same kdkernels loss twice "
                           "(retain_graph=True) is not supported: the fused kernels hand over "
                           "their saved gradient on the first backward. Compute the loss again.")
    grads = tuple(ctx.handed_over)
    ctx.handed_over.clear()
    return grads


def _setup_context(ctx, inputs, output):
    _, gs, gt = output
    ctx.reduce = inputs[SCHEMA_ARGS.index("reduce")]
    ctx.input_dtypes = (inputs[0].dtype, inputs[1].dtype)
    keep_for_hand_over(ctx, gs, gt)


def _scale(grad, grad_loss, reduce, dtype):
    """grad (N, V) times the incoming gradient (a scalar if reduce, else one per row), in the
    input's dtype. The factor is never rounded to the gradient's dtype first (a GradScaler's
    2^16 is inf in fp16); fp16 gradients arrive in fp32 and are rounded once, at the end."""
    if grad.numel() == 0 or grad_loss is None:
        return None
    factor = grad_loss if reduce else grad_loss.unsqueeze(-1)
    if not (_eager(grad) and _eager(grad_loss)):
        return (grad * factor).to(dtype)  # functional while traced (Inductor fuses it)
    capturing = grad_loss.is_cuda and torch.cuda.is_current_stream_capturing()  # no syncs then
    if reduce and not capturing:
        # The scalar read once (on CUDA, one host sync). Exactly 1 (loss.backward() on the loss
        # itself): no pass at all; that pass took 3.9 ms at bf16 N=8192 V=128256 on an H200,
        # more than the loss kernel (bench/results/2026-11-29-h200.md). Otherwise a Python
        # scalar, computing in fp32 with the same bits as the tensor factor; a CUDA 0-dim
        # factor took ATen's generic broadcast kernel in those 3.9 ms, and the scalar one is
        # expected to take its vectorized kernel instead (not yet measured on a GPU).
        f = float(grad_loss)
        return grad.to(dtype) if f == 1.0 else grad.mul_(f).to(dtype)
    # In place: no second (N, V) buffer.
    return grad.mul_(factor).to(dtype)


def _backward(ctx, grad_loss, _unused_gs, _unused_gt):
    gs, gt = take_handed_over(ctx)
    return (_scale(gs, grad_loss, ctx.reduce, ctx.input_dtypes[0]),
            _scale(gt, grad_loss, ctx.reduce, ctx.input_dtypes[1])) + (None,) * (len(SCHEMA_ARGS) - 2)


@torch.library.custom_op("kdkernels::divergence_fwd_triton", mutates_args=(), device_types=None)
def divergence_fwd_triton(student: Tensor, teacher: Tensor, row_weight: Tensor, mode: int,
                          swap: bool, mix: float, temperature: float, taid: float, reduce: bool,
                          grad_student: bool, grad_teacher: bool) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton_kernels.divergence import divergence_fwd  # noqa: PLC0415 (lazy: imports triton)

    return divergence_fwd(student, teacher, row_weight, mode, swap, mix, temperature, taid,
                          reduce, grad_student, grad_teacher)


torch.library.register_fake("kdkernels::divergence_fwd_triton", _fake)
torch.library.register_autograd("kdkernels::divergence_fwd_triton", _backward,
                                setup_context=_setup_context)


def register_native():
    """Python-side registrations of the C++ op (ops.register_native runs this once)."""
    torch.library.register_fake("kdkernels::divergence_fwd", _fake)
    torch.library.register_autograd("kdkernels::divergence_fwd", _backward,
                                    setup_context=_setup_context)
