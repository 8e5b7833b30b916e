"""Benchmarks of the divergence family: kdkernels vs the eager PyTorch formula vs torch.compile
of it (vs Liger-Kernel on GPU when installed), forward and forward+backward, time and peak
memory. Run:  pytest bench/ --benchmark-only   (the closing table prints ratios).

Shapes: CPU fp32 N=2048, V=32000; GPU bf16 N=8192, V=128256. Override with KDK_BENCH_N,
KDK_BENCH_V, KDK_BENCH_DTYPE (float32|bfloat16|float16), KDK_BENCH_KINDS (comma list)."""
import os

import pytest
import torch

import kdkernels

from conftest import cpu_peak_bytes, cuda_peak_bytes
from formulas import EAGER, liger_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = int(os.environ.get("KDK_BENCH_N", 8192 if DEVICE == "cuda" else 2048))
V = int(os.environ.get("KDK_BENCH_V", 128256 if DEVICE == "cuda" else 32000))
DTYPE = getattr(torch, os.environ.get("KDK_BENCH_DTYPE", "bfloat16" if DEVICE == "cuda" else "float32"))
KINDS = os.environ.get("KDK_BENCH_KINDS", "fkl,jsd").split(",")
TEMPERATURE = 2.0
_compiled = {}


def implementations(kind):
    impls = {
        "kdkernels-auto": lambda s, t: kdkernels.divergence(
            s, t, kind=kind, temperature=TEMPERATURE),
        "eager": lambda s, t: EAGER[kind](s, t, TEMPERATURE),
        "torch.compile": lambda s, t: _compiled.setdefault(kind, torch.compile(EAGER[kind]))(s, t, TEMPERATURE),
    }
    liger = liger_loss(kind) if DEVICE == "cuda" else None
    if liger is not None:
        impls["liger"] = lambda s, t: liger(s, t, TEMPERATURE)
    return impls


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    s = (torch.randn(N, V, generator=g, device=DEVICE) * 2).to(DTYPE)
    t = (torch.randn(N, V, generator=g, device=DEVICE) * 2).to(DTYPE)
    return s, t


CASES = [(k, i) for k in KINDS for i in ("kdkernels-auto", "eager", "torch.compile", "liger")]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("kind,impl", CASES, ids=[f"{k}-{i}" for k, i in CASES])
def test_divergence(benchmark, record, inputs, kind, impl, mode):
    impls = implementations(kind)
    if impl not in impls:
        pytest.skip(f"{impl} not available here (Liger: needs liger-kernel and a GPU)")
    fn = impls[impl]
    s0, t0 = inputs
    s = s0.detach().requires_grad_(mode == "fwd+bwd")

    def run():
        if mode == "fwd":
            with torch.no_grad():
                fn(s, t0)
        else:
            fn(s, t0).backward()
            s.grad = None
        sync()

    run()  # warm-up (compiles)
    run()
    benchmark.pedantic(run, rounds=10 if DEVICE == "cpu" else 20, iterations=1, warmup_rounds=0)
    peak = cuda_peak_bytes(run) if DEVICE == "cuda" else cpu_peak_bytes(run)
    elem = torch.finfo(DTYPE).bits // 8
    moved = N * V * elem * (2 if mode == "fwd" else 3)  # two reads (+ one gradient write)
    info = dict(group=f"{kind} {mode}  N={N} V={V} {str(DTYPE).replace('torch.', '')} {DEVICE}",
                impl=impl, median_s=benchmark.stats.stats.median, peak=peak,
                grad_bytes=N * V * elem, bytes=moved if DEVICE == "cuda" else None)
    benchmark.extra_info.update({k: v for k, v in info.items() if k != "group"})
    benchmark.extra_info["group"] = info["group"]
    record(info)
