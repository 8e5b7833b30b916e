"""Loading the compiled C++ (and later CUDA) extension, once.

Order: the extension built by setup.py (`kdkernels._C`); else a JIT build of csrc/ with
ninja into the torch extensions cache (source checkouts only); else nothing, and callers
fall back (reference on CPU, Triton on CUDA) after ONE warning that says why and how to fix.
KDKERNELS_DISABLE_EXTENSION=1 skips both (to test or force the fallback)."""
import glob
import os
import warnings

import torch

_state = {"loaded": None, "why": None, "warned": False}
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "csrc")


def _jit_build():
    from torch.utils.cpp_extension import load  # noqa: PLC0415

    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")) + glob.glob(os.path.join(_CSRC, "cpu", "*.cpp")))
    load(name="kdkernels_C", sources=sources, extra_cflags=["-O3", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-psabi"],
         extra_ldflags=["-fopenmp"], is_python_module=False,
         verbose=os.environ.get("KDKERNELS_VERBOSE_BUILD") == "1")


def _load():
    if os.environ.get("KDKERNELS_DISABLE_EXTENSION") == "1":
        return False, "KDKERNELS_DISABLE_EXTENSION=1 is set"
    try:
        from . import _C  # noqa: F401, PLC0415  (importing it registers the ops)
        return True, None
    except ImportError as e:
        missing = f"the compiled extension kdkernels._C could not be imported ({e})"
    if not os.path.isdir(_CSRC):
        return False, (f"{missing}, and the C++ sources are not beside the package to JIT-build "
                       f"them; reinstall with `pip install --no-build-isolation .` from a checkout")
    try:
        _jit_build()
        return True, None
    except Exception as e:  # noqa: BLE001  (any build failure means: fall back, and say why)
        return False, (f"{missing}, and the JIT build of csrc/ failed ({type(e).__name__}: "
                       f"{str(e).strip()[:400]}); install ninja and a C++17 compiler, or "
                       f"reinstall with `pip install --no-build-isolation .`")


def ensure_loaded():
    """True when the native ops are registered (loading / building them on first call)."""
    if _state["loaded"] is None:
        ok, why = _load()
        _state["loaded"], _state["why"] = ok, why
        if ok:
            from .ops import register_native  # noqa: PLC0415

            register_native()
    return _state["loaded"]


@torch.compiler.assume_constant_result
def native_available(family, dispatch_key, warn=False):
    """Whether kdkernels::{family}_fwd has a native kernel for dispatch_key ('CPU', 'CUDA')."""
    if not ensure_loaded():
        if warn and not _state["warned"]:
            _state["warned"] = True
            warnings.warn(f"kdkernels: native kernels unavailable, falling back to the "
                          f"PyTorch reference on CPU (slower, more memory): {_state['why']}",
                          RuntimeWarning, stacklevel=4)
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"kdkernels::{family}_fwd", dispatch_key)


def why_unavailable():
    ensure_loaded()
    return _state["why"]
