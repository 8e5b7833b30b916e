"""The registration every op shares: fake (shape) kernels, and autograd whose backward refuses
double backward (the kernels' backward is not itself differentiable)."""
import torch


def first_order(op, backward):
    """backward, refusing create_graph=True: autograd runs backward with grad mode on exactly
    then, and the gradient it would get back has no graph (silently first-order)."""
    def guarded(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"kdkernels::{op}: double backward (torch.autograd.grad(..., create_graph=True)) "
                f"is not supported: the kernels' gradients are not differentiable. Use "
                f"backend='reference' for higher-order derivatives.")
        return backward(ctx, *grads)
    return guarded


def register_pair(fwd, bwd, fake_fwd, fake_bwd, backward_with, setup_context):
    """kdkernels::{fwd} and kdkernels::{bwd}: backward_with(bwd_op) builds the autograd
    backward of fwd around the backward op."""
    torch.library.register_fake(f"kdkernels::{fwd}", fake_fwd)
    torch.library.register_fake(f"kdkernels::{bwd}", fake_bwd)
    torch.library.register_autograd(
        f"kdkernels::{fwd}",
        first_order(fwd, backward_with(lambda *args: getattr(torch.ops.kdkernels, bwd)(*args))),
        setup_context=setup_context)


def register_fake_and_autograd(fwd, fake, backward, setup_context):
    """A single forward op whose backward needs no op of its own (saved gradients scaled);
    fake None: registered with the op already (custom_op's register_fake)."""
    if fake is not None:
        torch.library.register_fake(f"kdkernels::{fwd}", fake)
    torch.library.register_autograd(f"kdkernels::{fwd}", first_order(fwd, backward),
                                    setup_context=setup_context)
