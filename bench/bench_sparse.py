"""Benchmarks of the sparse-teacher family (a teacher known only by its top-k log-probabilities),
time and peak memory, side by side in one run:

  sparse    fwd+bwd  student logits (N, V) + teacher (N, K) -> loss (fkl, T = 1):
      kdkernels-<b>-renorm       kdkernels.sparse_divergence(tail="renormalize")
      kdkernels-<b>-bucket       kdkernels.sparse_divergence(tail="bucket")
      distillkit                 bench/sparse_peers.py: distillkit_sparse_kl (= ours renormalize)
      distillkit-compile         torch.compile of it
      trl-topk                   sparse_peers.trl_server_topk_kl, add_tail (= ours bucket)
  fused-linear sparse  fwd+bwd  hidden (N, H) + lm_head (V, H) + teacher (N, K) -> loss:
      kdkernels-<b>              kdkernels.fused_linear_sparse_divergence(tail="renormalize")
      bare-matmuls               h·Wᵀ, g·W, gᵀ·h alone (the floor of any exact method)
      distillkit                 distillkit_sparse_kl on the logits h·Wᵀ (eager autograd)
  topk      fwd (no grad)  the teacher side, extraction of the top-k log-probabilities:
      kdkernels-<b>              kdkernels.topk_logprobs(logits, k)
      eager                      torch.topk(torch.log_softmax(logits, -1), k)
  fused-linear topk  fwd (no grad):
      kdkernels-<b>              kdkernels.fused_linear_topk_logprobs(h, W, k)
      eager                      torch.topk(torch.log_softmax(h @ W.T, -1), k)
<b> is cpu on CPU, auto on a GPU. On a GPU a row that runs out of memory skips, saying so.

Memory: "peak extra" is the process's peak during one call above what was resident before it
(inputs, parameters and teacher entries; the gradients are freed before each call, so they are
INSIDE the peak); "× one grad" (extra_info x_one_grad) is that peak over one N×V fp32 tensor.
Targets: sparse ≈ 1.0× (the N×V gradient itself, nothing else of vocabulary size); fused linear
≪ 1× (no N×V tensor at all; dh and dW are N·H + V·H); topk ≪ 1× (no log-softmax materialized).
extra_info also has, for every peer row, vs_kdkernels (its median / ours', the matching tail for
the sparse group) and peak_vs_kdkernels, and each fwd+bwd row's loss value.

Run from the repository root (so that the checkout's kdkernels is imported, not an installed copy):
    python -m pytest bench/bench_sparse.py --benchmark-only
Defaults (CPU and GPU): fp32, N=2048, V=151936, K=64, H=896, T=1. Overrides:
KDK_SP_CASES ("float32:2048x151936x64", NxVxK, comma-separated), KDK_SP_HIDDEN (896),
KDK_SP_ROUNDS (3 on CPU, 10 on a GPU), KDK_SP_GROUPS ("sparse,fused,topk,fused-topk"). Smoke:
    KDK_SP_CASES=float32:64x4096x8 KDK_SP_HIDDEN=64 python -m pytest bench/bench_sparse.py \\
        --benchmark-disable -q
(--benchmark-disable runs each case once, timed by hand.)"""
import os
import time

import pytest
import torch

import kdkernels

from conftest import cpu_peak_bytes, cuda_peak_bytes
from sparse_peers import distillkit_sparse_kl, trl_server_topk_kl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
CASES = [(getattr(torch, c.split(":")[0]), *map(int, c.split(":")[1].split("x")))
         for c in os.environ.get("KDK_SP_CASES", "float32:2048x151936x64").split(",")]
HIDDEN = int(os.environ.get("KDK_SP_HIDDEN", "896"))
ROUNDS = int(os.environ.get("KDK_SP_ROUNDS", "10" if GPU else "3"))
GROUPS = os.environ.get("KDK_SP_GROUPS", "sparse,fused,topk,fused-topk").split(",")
BACKEND = "auto" if GPU else "cpu"
OURS = f"kdkernels-{BACKEND}"
TEMPERATURE = 1.0
_compiled = {}
_ours = {}  # (group, tail) -> (median_s, peak) of our row, for the peers' ratios


def sync():
    if GPU:
        torch.cuda.synchronize()


# -- implementations: fn(*inputs) -> loss (fwd+bwd groups) or anything (fwd groups) -----------

def sparse_impl(impl):
    """fn(z, lp, idx) -> loss, and the tail it matches."""
    if impl.startswith("kdkernels-"):
        tail = {"renorm": "renormalize", "bucket": "bucket"}[impl.rsplit("-", 1)[1]]
        return (lambda z, lp, idx: kdkernels.sparse_divergence(
            z, lp, idx, kind="fkl", tail=tail, temperature=TEMPERATURE, t2_scale=False,
            backend=BACKEND)), tail
    if impl == "distillkit":
        return (lambda z, lp, idx: distillkit_sparse_kl(z, lp, idx, TEMPERATURE, t2_scale=False)), \
            "renormalize"
    if impl == "distillkit-compile":
        fn = _compiled.setdefault("distillkit", torch.compile(distillkit_sparse_kl))
        return (lambda z, lp, idx: fn(z, lp, idx, TEMPERATURE, t2_scale=False)), "renormalize"
    if impl == "trl-topk":
        return (lambda z, lp, idx: trl_server_topk_kl(z, lp, idx, temperature=TEMPERATURE,
                                                      add_tail=True)), "bucket"
    raise ValueError(impl)


def _bare(h, w):
    """The three matmuls of autograd's shapes, g = s itself (no loss math): s = h·Wᵀ, dh = g·W,
    dW = gᵀ·h."""
    s = h.detach() @ w.detach().t()
    h.grad = s @ w.detach()
    w.grad = s.t() @ h.detach()


def fused_impl(impl):
    if impl == OURS:
        return (lambda h, w, lp, idx: kdkernels.fused_linear_sparse_divergence(
            h, w, lp, idx, kind="fkl", tail="renormalize", temperature=TEMPERATURE,
            t2_scale=False, backend=BACKEND))
    if impl == "bare-matmuls":
        return lambda h, w, lp, idx: _bare(h, w)
    if impl == "distillkit":
        return lambda h, w, lp, idx: distillkit_sparse_kl(h @ w.t(), lp, idx, TEMPERATURE,
                                                          t2_scale=False)
    raise ValueError(impl)


def topk_impl(impl, k):
    if impl == OURS:
        return lambda z: kdkernels.topk_logprobs(z, k, temperature=TEMPERATURE)
    return lambda z: torch.topk(torch.log_softmax(z.float() / TEMPERATURE, -1), k, -1)


def fused_topk_impl(impl, k):
    if impl == OURS:
        return lambda h, w: kdkernels.fused_linear_topk_logprobs(h, w, k, temperature=TEMPERATURE)
    return lambda h, w: torch.topk(torch.log_softmax((h @ w.t()).float() / TEMPERATURE, -1), k, -1)


# -- inputs, one shape resident at a time ------------------------------------------------------

_inputs = {}


def inputs(dtype, n, v, k):
    """Student logits (n, v), hidden (n, H), lm_head (v, H), and the teacher's top-k (log-probs
    fp32, indices int64) of a random softmax (teacher logits of std 2)."""
    key = (dtype, n, v, k)
    if key not in _inputs:
        _inputs.clear()
        g = torch.Generator(device=DEVICE).manual_seed(0)
        with torch.no_grad():
            t = torch.randn(n, v, generator=g, device=DEVICE) * 2
            lp, idx = torch.topk(torch.log_softmax(t, -1), k, -1)
            del t
            z = (torch.randn(n, v, generator=g, device=DEVICE) * 2).to(dtype)
            h = torch.randn(n, HIDDEN, generator=g, device=DEVICE).to(dtype)
            w = (torch.randn(v, HIDDEN, generator=g, device=DEVICE) * HIDDEN ** -0.5 * 4).to(dtype)
        _inputs[key] = (z, h, w, lp, idx)
    return _inputs[key]


# -- the measurement, shared by every group ----------------------------------------------------

def measure(benchmark, record, run, reset, *, group, impl, n, v, tail=None):
    """Warm-up, timing, peak; extra_info with x_one_grad and, for peers, the ratios to ours."""
    try:
        run()  # warm-up (compiles)
        reset()
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        reset()
        if benchmark.stats is not None:
            median = benchmark.stats.stats.median
        else:  # --benchmark-disable: one call, timed by hand
            start = time.perf_counter()
            run()
            median = time.perf_counter() - start
            reset()
        peak = cuda_peak_bytes(run) if GPU else cpu_peak_bytes(run)
        reset()
    except torch.cuda.OutOfMemoryError:
        reset()
        torch.cuda.empty_cache()
        pytest.skip(f"{impl}: out of GPU memory at N={n}, V={v}")
    grad_bytes = n * v * 4
    info = dict(group=group, impl=impl, median_s=median, peak=peak, grad_bytes=grad_bytes,
                bytes=None, x_one_grad=None if peak is None else peak / grad_bytes)
    if impl.startswith("kdkernels"):
        _ours[(group, tail)] = (median, peak)
    elif (group, tail) in _ours:
        ours_s, ours_peak = _ours[(group, tail)]
        info["vs_kdkernels"] = median / ours_s
        if peak is not None and ours_peak:
            info["peak_vs_kdkernels"] = peak / ours_peak
    benchmark.extra_info.update(info)
    record(info)


def _dt(dtype):
    return str(dtype).replace("torch.", "")


SPARSE_IMPLS = [f"{OURS}-renorm", f"{OURS}-bucket", "distillkit", "distillkit-compile",
                "trl-topk"]
P_SPARSE = [(d, n, v, k, i) for (d, n, v, k) in CASES for i in SPARSE_IMPLS] \
    if "sparse" in GROUPS else []


@pytest.mark.parametrize("dtype,n,v,k,impl", P_SPARSE,
                         ids=[f"{_dt(d)}-{n}x{v}x{k}-{i}" for d, n, v, k, i in P_SPARSE])
def test_sparse(benchmark, record, dtype, n, v, k, impl):
    fn, tail = sparse_impl(impl)
    z0, _h, _w, lp, idx = inputs(dtype, n, v, k)
    z = z0.detach().requires_grad_()
    value = []

    def run():
        loss = fn(z, lp, idx)
        loss.backward()
        sync()
        value[:] = [float(loss.detach())]
        z.grad = None

    def reset():
        z.grad = None

    measure(benchmark, record, run, reset, impl=impl, n=n, v=v, tail=tail,
            group=f"sparse fkl fwd+bwd  N={n} V={v} K={k} {_dt(dtype)} {DEVICE}")
    benchmark.extra_info["loss"] = value[0]


FUSED_IMPLS = [OURS, "bare-matmuls", "distillkit"]
P_FUSED = [(d, n, v, k, i) for (d, n, v, k) in CASES for i in FUSED_IMPLS] \
    if "fused" in GROUPS else []


@pytest.mark.parametrize("dtype,n,v,k,impl", P_FUSED,
                         ids=[f"{_dt(d)}-{n}x{HIDDEN}x{v}x{k}-{i}" for d, n, v, k, i in P_FUSED])
def test_fused_linear_sparse(benchmark, record, dtype, n, v, k, impl):
    fn = fused_impl(impl)
    _z, h0, w0, lp, idx = inputs(dtype, n, v, k)
    h = h0.detach().requires_grad_()
    w = w0.detach().requires_grad_()
    value = []

    def run():
        loss = fn(h, w, lp, idx)
        if loss is not None:
            loss.backward()
            value[:] = [float(loss.detach())]
        sync()
        h.grad = w.grad = None

    def reset():
        h.grad = w.grad = None

    measure(benchmark, record, run, reset, impl=impl, n=n, v=v,
            group=f"fused-linear sparse fkl fwd+bwd  N={n} H={HIDDEN} V={v} K={k} "
                  f"{_dt(dtype)} {DEVICE}")
    if value:
        benchmark.extra_info["loss"] = value[0]


TOPK_IMPLS = [OURS, "eager"]
P_TOPK = [(d, n, v, k, i) for (d, n, v, k) in CASES for i in TOPK_IMPLS] \
    if "topk" in GROUPS else []
P_FTOPK = [(d, n, v, k, i) for (d, n, v, k) in CASES for i in TOPK_IMPLS] \
    if "fused-topk" in GROUPS else []


@pytest.mark.parametrize("dtype,n,v,k,impl", P_TOPK,
                         ids=[f"{_dt(d)}-{n}x{v}x{k}-{i}" for d, n, v, k, i in P_TOPK])
def test_topk_logprobs(benchmark, record, dtype, n, v, k, impl):
    fn = topk_impl(impl, k)
    z, _h, _w, _lp, _idx = inputs(dtype, n, v, k)

    def run():
        with torch.no_grad():
            fn(z)
        sync()

    measure(benchmark, record, run, lambda: None, impl=impl, n=n, v=v,
            group=f"topk fwd  N={n} V={v} K={k} {_dt(dtype)} {DEVICE}")


@pytest.mark.parametrize("dtype,n,v,k,impl", P_FTOPK,
                         ids=[f"{_dt(d)}-{n}x{HIDDEN}x{v}x{k}-{i}" for d, n, v, k, i in P_FTOPK])
def test_fused_linear_topk_logprobs(benchmark, record, dtype, n, v, k, impl):
    fn = fused_topk_impl(impl, k)
    _z, h, w, _lp, _idx = inputs(dtype, n, v, k)

    def run():
        with torch.no_grad():
            fn(h, w)
        sync()

    measure(benchmark, record, run, lambda: None, impl=impl, n=n, v=v,
            group=f"fused-linear topk fwd  N={n} H={HIDDEN} V={v} K={k} {_dt(dtype)} {DEVICE}")
