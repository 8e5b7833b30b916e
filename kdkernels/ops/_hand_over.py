"""The gradient hand-over shared by every op whose forward launch also computes the gradient
(the divergence and DAC-KL families, and the ops that build on their kernels).

The forward returns its gradients as extra outputs; setup_context keeps them
(keep_for_hand_over), and backward takes them once (take_handed_over) and multiplies them by
the incoming gradient (scale). In eager mode the saved gradient is held as a detached
reference instead of through save_for_backward, so that autograd can adopt the buffer as .grad
without a copy; while traced (torch.compile, make_fx, opcheck) everything is functional."""
import torch


def eager(t):
    """True for a plain tensor outside tracing (torch.compile, make_fx, opcheck's AOT tests),
    where in-place hand-over and a host-side check of the incoming gradient are allowed."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def keep_for_hand_over(ctx, *grads):
    """Setup-context half of the hand-over: the forward's gradients, saved for backward.
    Eager: detached references (no reference cycle through grad_fn) that backward hands over
    and drops, so autograd can adopt the buffer as .grad without a copy. Traced: saved."""
    ctx.set_materialize_grads(False)  # the grad outputs are never used: no (N, V) zeros for them
    if not eager(grads[0]):
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


def scale(grad, grad_loss, reduce, dtype):
    """grad (N, V) times the incoming gradient (a scalar if reduce, else one per row), in the
    input's dtype. The factor is never rounded to the gradient's dtype first (a GradScaler's
    2^16 is inf in fp16); fp16 gradients arrive in fp32 and are rounded once, at the end.
    A gradient that was not asked for is the kernels' 1-d placeholder of shape (0,): None; an
    asked one with no rows, (0, V), is returned as such (autograd then sets a (0, V) .grad).
    (A bias gradient (V,) is 1-d too, but never empty: V ≥ 1.)"""
    if grad_loss is None or (grad.dim() == 1 and grad.shape[0] == 0):
        return None
    factor = grad_loss if reduce else grad_loss.unsqueeze(-1)
    if not (eager(grad) and eager(grad_loss)):
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
