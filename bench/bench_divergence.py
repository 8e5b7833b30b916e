"""Benchmarks of the divergence family: kdkernels vs the eager PyTorch formula vs torch.compile
of it (vs Liger-Kernel on GPU when installed), forward and forward+backward, time and peak
memory. Run:  pytest bench/ --benchmark-only   (the closing table prints ratios).

CPU default: fp32, N=2048, V=32000, fkl and jsd, fwd and fwd+bwd, backend "auto" (cpu).
GPU default: fwd+bwd, N=8192, bf16 at V=32000/128256/262144 and fp32 at V=128256, fkl/jsd/tvd;
kdkernels' triton and cuda backends side by side (each when available), the cuda backend also
with its opt-in cluster kernel (kdkernels-cuda-cluster, sm_90+: see csrc/cuda/divergence_kernels.cuh).
Overrides:
KDK_BENCH_CASES ("bfloat16:8192x128256,float32:2048x32000"), KDK_BENCH_KINDS ("fkl,jsd"),
KDK_BENCH_MODES ("fwd,fwd+bwd"), KDK_HBM_GBPS (peak bandwidth, for the % column)."""
import os

import pytest
import torch

import kdkernels

from conftest import cpu_peak_bytes, cuda_peak_bytes
from formulas import EAGER, liger_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
DEFAULT_CASES = ("bfloat16:8192x128256,float32:8192x128256,bfloat16:8192x262144,bfloat16:8192x32000"
                 if GPU else "float32:2048x32000")  # the headline case first
CASES = [(getattr(torch, c.split(":")[0]), *map(int, c.split(":")[1].split("x")))
         for c in os.environ.get("KDK_BENCH_CASES", DEFAULT_CASES).split(",")]
KINDS = os.environ.get("KDK_BENCH_KINDS", "fkl,jsd,tvd" if GPU else "fkl,jsd").split(",")
MODES = os.environ.get("KDK_BENCH_MODES", "fwd+bwd" if GPU else "fwd,fwd+bwd").split(",")
IMPLS = (["kdkernels-triton", "kdkernels-cuda", "kdkernels-cuda-cluster"] if GPU
         else ["kdkernels-auto"]) + \
    ["eager", "torch.compile", "liger"]
TEMPERATURE = 2.0
_compiled = {}


def implementation(kind, impl):
    """The callable (s, t) -> loss for impl, or None if not available here."""
    if impl == "kdkernels-cuda-cluster":
        ours = implementation(kind, "kdkernels-cuda")
        return None if ours is None else (lambda s, t: cluster_kernel(ours, s, t))
    if impl.startswith("kdkernels-"):
        backend = impl.split("-", 1)[1]
        if backend == "cuda" and not kdkernels.backend_info()["cuda"]:
            return None
        return lambda s, t: kdkernels.divergence(s, t, kind=kind, temperature=TEMPERATURE,
                                                 backend=backend)
    if impl == "eager":
        return lambda s, t: EAGER[kind](s, t, TEMPERATURE)
    if impl == "torch.compile":
        fn = _compiled.setdefault(kind, torch.compile(EAGER[kind]))
        return lambda s, t: fn(s, t, TEMPERATURE)
    liger = liger_loss(kind) if GPU else None
    return None if liger is None else (lambda s, t: liger(s, t, TEMPERATURE))


def cluster_kernel(fn, s, t):
    """fn(s, t) with the CUDA backend's cluster kernel where the GPU has clusters (its kernels
    run in the forward, which hands the gradient over to the backward)."""
    os.environ["KDKERNELS_CUDA_SMEM_ROW_BUDGET"] = "98304"
    try:
        return fn(s, t)
    finally:
        del os.environ["KDKERNELS_CUDA_SMEM_ROW_BUDGET"]


def sync():
    if GPU:
        torch.cuda.synchronize()


_inputs = {}


def inputs(dtype, n, v):
    if (dtype, n, v) not in _inputs:
        _inputs.clear()  # one shape resident at a time
        g = torch.Generator(device=DEVICE).manual_seed(0)
        s = (torch.randn(n, v, generator=g, device=DEVICE) * 2).to(dtype)
        t = (torch.randn(n, v, generator=g, device=DEVICE) * 2).to(dtype)
        _inputs[(dtype, n, v)] = (s, t)
    return _inputs[(dtype, n, v)]


PARAMS = [(d, n, v, k, i) for (d, n, v) in CASES for k in KINDS for i in IMPLS]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,n,v,kind,impl", PARAMS,
                         ids=[f"{str(d)[6:]}-{n}x{v}-{k}-{i}" for d, n, v, k, i in PARAMS])
def test_divergence(benchmark, record, dtype, n, v, kind, impl, mode):
    fn = implementation(kind, impl)
    if fn is None:
        pytest.skip(f"{impl} not available here (Liger: needs liger-kernel and a GPU)")
    s0, t0 = inputs(dtype, n, v)
    s = s0.detach().requires_grad_(mode == "fwd+bwd")

    def run():
        if mode == "fwd":
            with torch.no_grad():
                fn(s, t0)
        else:
            fn(s, t0).backward()
            s.grad = None
        sync()

    try:
        run()  # warm-up (compiles)
        run()
        benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=0)
        peak = cuda_peak_bytes(run) if GPU else cpu_peak_bytes(run)
    except torch.cuda.OutOfMemoryError:
        s.grad = None
        torch.cuda.empty_cache()
        pytest.skip(f"{impl}: out of GPU memory at N={n}, V={v}")
    elem = torch.finfo(dtype).bits // 8
    moved = n * v * elem * (2 if mode == "fwd" else 3)  # two reads (+ one gradient write)
    info = dict(group=f"{kind} {mode}  N={n} V={v} {str(dtype).replace('torch.', '')} {DEVICE}",
                impl=impl, median_s=benchmark.stats.stats.median, peak=peak,
                grad_bytes=n * v * elem, bytes=moved if GPU else None)
    benchmark.extra_info.update(info)
    record(info)
