"""Shared test helpers: devices and backends to run, the precision-aware comparison, and
the README examples."""
import os
import re

import pytest
import torch

import kdkernels

HAS_CUDA = torch.cuda.is_available()
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Rounding unit of each dtype: a gradient stored in it carries ≤ this relative error.
UNIT = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# Spacing of the subnormals: the absolute rounding error of tiny gradients (fp16's is large).
SUBNORMAL = {d: torch.finfo(d).smallest_normal * UNIT[d] * 2 for d in UNIT}


def kernel_cases():
    """(backend, device) pairs to test against the reference on this machine."""
    cases = [pytest.param("cpu", "cpu", id="cpu")]
    if HAS_TRITON and TRITON_ON_CPU:
        cases.append(pytest.param("triton", "cpu", id="triton-interp"))
    if HAS_CUDA and HAS_TRITON:
        cases.append(pytest.param("triton", "cuda", id="triton-cuda"))
    if HAS_CUDA and kdkernels.backend_info()["cuda"]:
        cases.append(pytest.param("cuda", "cuda", id="cuda"))
        # The same backend with its opt-in cluster kernel (conftest.py sets the knob), so that
        # a GPU with clusters tests both CUDA kernels.
        cases.append(pytest.param("cuda", "cuda", id=CUDA_CLUSTER))
    return cases


CUDA_CLUSTER = "cuda-cluster"


def assert_matches(actual, ref64, ref32, out_dtype, what, factor=8.0, rounding_units=1.0):
    """actual (a kernel's result in out_dtype) against the float64 reference.

    Tolerance per element: the rounding of out_dtype at that value, plus `factor` times the
    largest error the same formula makes in plain fp32 PyTorch (ref32, the reference run on
    float32 copies of the same inputs), plus 1e-6 of the tensor's scale. A kernel passes when
    it is at most a small multiple as inexact as fp32 PyTorch, and rounds its output once.
    rounding_units=2 allows a full ulp: Triton's CPU interpreter converts fp32 to bf16/fp16 by
    truncation (measured: up to 2^-7 relative for bf16), where GPU Triton and C++ round to nearest."""
    ref64 = ref64.double()
    err = (actual.double() - ref64).abs()
    fp32_err = (ref32.double() - ref64).abs().max() if ref32 is not None and ref32.numel() else 0.0
    scale = ref64.abs().max() if ref64.numel() else torch.tensor(0.0)
    tol = (ref64.abs() * UNIT[out_dtype] + SUBNORMAL[out_dtype]) * rounding_units + factor * fp32_err + 1e-6 * scale + 1e-12
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    bad = err > tol
    assert not bad.any(), (f"{what}: max error {err.max().item():.3e} (tol there "
                           f"{tol.flatten()[err.flatten().argmax()].item():.3e}); fp32 formula error "
                           f"{float(fp32_err):.3e}; scale {float(scale):.3e}")


def run_readme_examples(marker, expected, shared=False):
    """Runs the README's python blocks between <!-- marker --> and <!-- /marker -->, each in
    its own namespace, or in order in one (shared=True: later blocks use the first's setup)."""
    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    if not os.path.exists(readme):
        pytest.skip("needs the source checkout")
    text = open(readme, encoding="utf-8").read()
    blocks = re.findall(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert len(blocks) == expected, f"README should hold {expected} {marker} blocks"
    namespace = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md ({marker} {i + 1})", "exec"),  # noqa: S102
             namespace if shared else {})
