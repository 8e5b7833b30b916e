"""The registration every forward/backward op pair shares: fake (shape) kernels for both ops,
and autograd on the forward that calls the backward op."""
import torch


def register_pair(fwd, bwd, fake_fwd, fake_bwd, backward_with, setup_context):
    """kdkernels::{fwd} and kdkernels::{bwd}: backward_with(bwd_op) builds the autograd
    backward of fwd around the backward op."""
    torch.library.register_fake(f"kdkernels::{fwd}", fake_fwd)
    torch.library.register_fake(f"kdkernels::{bwd}", fake_bwd)
    torch.library.register_autograd(
        f"kdkernels::{fwd}",
        backward_with(lambda *args: getattr(torch.ops.kdkernels, bwd)(*args)),
        setup_context=setup_context)


def register_fake_and_autograd(fwd, fake, backward, setup_context):
    """A single forward op whose backward needs no op of its own (saved gradients scaled)."""
    torch.library.register_fake(f"kdkernels::{fwd}", fake)
    torch.library.register_autograd(f"kdkernels::{fwd}", backward, setup_context=setup_context)
