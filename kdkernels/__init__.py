"""kdkernels: fused knowledge-distillation losses for PyTorch.

    import kdkernels
    loss = kdkernels.divergence(student_logits, teacher_logits, kind="jsd", temperature=2.0)

See README.md for the API, backends and measured numbers."""
from . import nn
from .dac_kl import dac_kl
from .divergence import KINDS, divergence, jsd, kl_div, reverse_kl, tvd
from .fused_linear import FusedLinearDivergenceOutput, fused_linear_divergence
from .mixing_matrix import mixing_matrix_loss
from .sparse import (fused_linear_sparse_divergence, fused_linear_topk_logprobs, sparse_divergence,
                     topk_logprobs)
from .token_relation import token_relation_loss

__version__ = "0.1.0"
__all__ = ["KINDS", "FusedLinearDivergenceOutput", "backend_info", "dac_kl", "divergence",
           "fused_linear_divergence", "fused_linear_sparse_divergence",
           "fused_linear_topk_logprobs", "jsd", "kl_div", "mixing_matrix_loss", "nn", "reverse_kl",
           "sparse_divergence", "token_relation_loss", "topk_logprobs", "tvd"]


def backend_info():
    """Which backends this install can run, and why a missing one is missing."""
    import os  # noqa: PLC0415

    from . import _extension  # noqa: PLC0415

    native = _extension.ensure_loaded()
    try:
        import triton  # noqa: PLC0415
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "cpu": native and _extension.native_available("divergence", "CPU"),
        "cuda": native and _extension.native_available("divergence", "CUDA"),
        "native_unavailable_because": _extension.why_unavailable(),
        "triton": triton_version,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }
