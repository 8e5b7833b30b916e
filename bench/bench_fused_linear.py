"""Benchmarks of fused linear + divergence (hidden states and lm_heads → loss), forward+backward,
time and peak memory, side by side in one run:

    kdkernels-<backend>  kdkernels.fused_linear_divergence (cpu; triton and cuda on a GPU)
    bare-matmuls         the four vocabulary-sized matmuls alone (student and teacher logits,
                         dh, dW): the floor of any exact method
    eager                the materializing formula: logits, then bench/formulas.py's loss, autograd
    torch.compile        torch.compile of eager
    trl                  TRL 1.16's DistillationTrainer._chunked_divergence_loss (PyTorch tiles on
                         CPU, its Triton path on a GPU)
    liger                liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (PyTorch chunks)
    liger-triton         liger_kernel.transformers.LigerFusedLinearJSD (GPU only)
Same math everywhere: T = 1 (the peers have no T², which is then 1), β = 0.5 for jsd and β = 0
(their fkl) for fkl, mean over the rows, no labels. Run:
    pytest bench/bench_fused_linear.py --benchmark-only
CPU default fp32 N=2048 H=1024 V=32000; GPU default bf16 N=8192 and N=1024, H=4096, V=128256.
Overrides: KDK_FL_CASES ("float32:2048x1024x32000"), KDK_BENCH_KINDS ("fkl,jsd"),
KDK_FL_ROUNDS. The "peak extra" column is the process's peak above the inputs and parameters
(their gradients included: N·H + V·H elements); "× one grad" is that peak over one N×V fp32
tensor."""
import os

import pytest
import torch

import kdkernels

from conftest import cpu_peak_bytes, cuda_peak_bytes
from formulas import EAGER

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
DEFAULT = "bfloat16:8192x4096x128256,bfloat16:1024x4096x128256" if GPU else "float32:2048x1024x32000"
CASES = [(getattr(torch, c.split(":")[0]), *map(int, c.split(":")[1].split("x")))
         for c in os.environ.get("KDK_FL_CASES", DEFAULT).split(",")]
KINDS = os.environ.get("KDK_BENCH_KINDS", "fkl,jsd").split(",")
ROUNDS = int(os.environ.get("KDK_FL_ROUNDS", "10" if GPU else "3"))
IMPLS = (["kdkernels-triton", "kdkernels-cuda"] if GPU else ["kdkernels-cpu"]) + \
    ["bare-matmuls", "eager", "torch.compile", "trl", "liger"] + (["liger-triton"] if GPU else [])
BETA = {"fkl": 0.0, "jsd": 0.5}
_compiled = {}


def _eager(kind):
    def fn(hs, ws, ht, wt):
        s = hs @ ws.t()
        with torch.no_grad():
            t = ht @ wt.t()
        return EAGER[kind](s, t, 1.0)
    return fn


def _bare(hs, ws, ht, wt):
    """The four matmuls with autograd's shapes: s = hs·Wsᵀ, t = ht·Wtᵀ, dh = g·Ws, dW = gᵀ·hs,
    with g a gradient of s's shape (s itself: no loss math at all)."""
    s = hs.detach() @ ws.detach().t()
    with torch.no_grad():
        ht @ wt.t()
    hs.grad = s @ ws.detach()
    ws.grad = s.t() @ hs.detach()
    return None


def implementation(kind, impl):
    """fn(hs, ws, ht, wt) → loss (or None: the gradients are set by fn), or None if unavailable."""
    if impl.startswith("kdkernels-"):
        backend = impl.split("-", 1)[1]
        if backend == "cuda" and not kdkernels.backend_info()["cuda"]:
            return None
        k = "jsd" if kind == "jsd" else "fkl"
        return lambda hs, ws, ht, wt: kdkernels.fused_linear_divergence(
            hs, ws, ht, wt, kind=k, beta=BETA["jsd"], backend=backend)
    if impl == "bare-matmuls":
        return _bare
    if impl == "eager":
        return _eager(kind)
    if impl == "torch.compile":
        return _compiled.setdefault(kind, torch.compile(_eager(kind)))
    try:
        from fused_linear_peers import liger_jsd, trl_chunked  # noqa: PLC0415
    except ImportError:
        return None
    if impl == "trl":
        return lambda hs, ws, ht, wt: trl_chunked(hs, ws, ht, wt, kind=kind, temperature=1.0,
                                                  beta=BETA[kind])
    if impl == "liger":
        return lambda hs, ws, ht, wt: liger_jsd(hs, ws, ht, wt, kind=kind, temperature=1.0,
                                                beta=BETA[kind])
    if impl == "liger-triton":
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD  # noqa: PLC0415
        except ImportError:
            return None
        op = LigerFusedLinearJSD(jsd_beta=BETA[kind], temperature=1.0)
        return lambda hs, ws, ht, wt: op(hs, ws, ht, wt, None)
    return None


_inputs = {}


def inputs(dtype, n, h, v):
    if (dtype, n, h, v) not in _inputs:
        _inputs.clear()
        g = torch.Generator(device=DEVICE).manual_seed(0)
        mk = lambda *shape, s=1.0: (torch.randn(*shape, generator=g, device=DEVICE) * s).to(dtype)  # noqa: E731
        _inputs[(dtype, n, h, v)] = (mk(n, h), mk(v, h, s=h ** -0.5 * 4), mk(n, h),
                                     mk(v, h, s=h ** -0.5 * 4))
    return _inputs[(dtype, n, h, v)]


PARAMS = [(d, n, h, v, k, i) for (d, n, h, v) in CASES for k in KINDS for i in IMPLS]


@pytest.mark.parametrize("dtype,n,h,v,kind,impl", PARAMS,
                         ids=[f"{str(d)[6:]}-{n}x{h}x{v}-{k}-{i}" for d, n, h, v, k, i in PARAMS])
def test_fused_linear(benchmark, record, dtype, n, h, v, kind, impl):
    fn = implementation(kind, impl)
    if fn is None:
        pytest.skip(f"{impl} not available here")
    hs0, ws0, ht, wt = inputs(dtype, n, h, v)
    hs = hs0.detach().requires_grad_()
    ws = ws0.detach().requires_grad_()

    def run():
        hs.grad = ws.grad = None
        loss = fn(hs, ws, ht, wt)
        if loss is not None:
            loss.backward()
        if GPU:
            torch.cuda.synchronize()

    try:
        run()  # warm-up (compiles)
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        hs.grad = ws.grad = None
        peak = cuda_peak_bytes(run) if GPU else cpu_peak_bytes(run)
    except torch.cuda.OutOfMemoryError:
        hs.grad = ws.grad = None
        torch.cuda.empty_cache()
        pytest.skip(f"{impl}: out of GPU memory at N={n}, H={h}, V={v}")
    info = dict(group=f"{kind} fwd+bwd  N={n} H={h} V={v} {str(dtype).replace('torch.', '')} {DEVICE}",
                impl=impl, median_s=benchmark.stats.stats.median, peak=peak,
                grad_bytes=n * v * 4, bytes=None)
    benchmark.extra_info.update(info)
    record(info)
