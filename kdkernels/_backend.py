"""Backend choice, shared by every op family: which implementation runs a call ("auto",
"reference", "cpu", "triton", "cuda"), and whether Triton runs interpreted on the CPU.

Import graph (no cycle): _backend → _extension → ops → ops/<family> → _plumbing."""
import os

import torch

from . import _extension
from ._plumbing import check_choice

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
# "auto" prefers the CUDA C++ kernels over Triton on GPUs (for the families that have them) once
# they have passed the test suite on a GPU: the divergence kernels did on an H200 on 2026-11-29
# (bench/results/2026-11-29-h200.md), where they also ran as fast as Triton or faster in 10 of
# 12 benchmark cases.
CUDA_BACKEND_VERIFIED = True


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_importable():
    try:
        import triton  # noqa: F401, PLC0415
        return True
    except ImportError:
        return False


def resolve_backend(backend, device, dtypes, *, family="divergence"):
    """Pick the backend for tensors on `device` with `dtypes`.

    family: 'cpu' / 'cuda' are available when kdkernels::{family}_fwd has a native kernel for
    the device's dispatch key; None for a family whose 'cpu' / 'cuda' backends run ATen ops
    (always available; on GPUs "auto" then prefers its Triton kernels)."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        env = os.environ.get("KDKERNELS_BACKEND") or "auto"  # set but empty: unset
        if env not in BACKENDS:
            raise ValueError(f"KDKERNELS_BACKEND must be one of {', '.join(BACKENDS)}; got {env!r}")
        backend = env
    if backend == "auto":
        if any(d == torch.float64 for d in dtypes):
            return "reference"
        if device.type == "cuda" and family is None:
            return "triton" if triton_importable() else "cuda"
        if device.type == "cpu" and family is None:
            return "cpu"
        if device.type == "cuda":
            cuda_built = _extension.native_available(family, "CUDA")
            if cuda_built and (CUDA_BACKEND_VERIFIED or not triton_importable()):
                return "cuda"
            backend = "triton"  # checked below: triton must be importable
        elif device.type == "cpu":
            return "cpu" if _extension.native_available(family, "CPU", warn=True) else "reference"
        else:
            return "reference"

    if backend in ("cpu", "cuda", "triton") and any(d == torch.float64 for d in dtypes):
        raise TypeError(f"backend={backend!r} takes float32, bfloat16 or float16 logits; "
                        f"float64 runs on backend='reference' (or 'auto')")
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {device}; use 'auto', "
                             f"'triton' or 'cuda' for GPU tensors")
        if family is not None and not _extension.native_available(family, "CPU", warn=True):
            return "reference"  # the loader warned once, saying why and how to fix it
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {device}")
        if family is not None and not _extension.native_available(family, "CUDA"):
            raise ValueError("backend='cuda' is not available: kdkernels was built without its "
                             "CUDA kernels (rebuild on a machine with nvcc, or with "
                             "KDKERNELS_FORCE_CUDA=1); use backend='triton' (or 'auto')")
    elif backend == "triton":
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError("backend='triton' with CPU tensors needs the Triton interpreter: "
                             "set TRITON_INTERPRET=1 before triton is imported, or use "
                             "backend='cpu' / 'auto'")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' needs CUDA (or CPU, interpreted) tensors, got {device}")
        try:
            import triton  # noqa: F401, PLC0415
        except ImportError as e:
            raise ValueError("backend='triton' (the default for CUDA tensors) needs the triton "
                             "package: pip install triton") from e
    return backend
