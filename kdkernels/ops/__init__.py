"""torch.library registration of kdkernels' ops: fake (shape) kernels and autograd.

Native (C++/CUDA) ops are defined in csrc/ with TORCH_LIBRARY; their Python-side
registrations run once the extension is loaded (register_native). Triton ops are
defined here as opaque custom ops, so torch.compile sees one node per call."""
from . import dac_kl, divergence, fused_linear, mixing_matrix, sparse, token_relation


_native_registered = []


def register_native():
    """Once, after the extension has loaded: each family's Python-side registrations of its
    C++ ops."""
    if _native_registered:
        return
    _native_registered.append(True)
    divergence.register_native()
    dac_kl.register_native()
    mixing_matrix.register_native()
    token_relation.register_native()
