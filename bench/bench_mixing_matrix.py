"""Benchmarks of MOHAWK's mixing-matrix loss: kdkernels' tiled kernels vs the reference, which
materializes both T×T matrices per head (as MOHAWK's public code does), forward+backward,
time and peak memory.
CPU default: fp32, batch 1, H=8, d=64, N=64 (G=H), T=2048, backend cpu.
GPU default: bf16, batch 1, H=32, d=64, N=64, T=4096 and 16384 (where the reference runs out
of memory), backend triton. Override with KDK_MM_T (comma list), KDK_MM_H."""
import os

import pytest
import torch

import kdkernels

from conftest import cpu_peak_bytes, cuda_peak_bytes

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
TS = [int(t) for t in os.environ.get("KDK_MM_T", "4096,16384" if GPU else "2048").split(",")]
HEADS = int(os.environ.get("KDK_MM_H", "32" if GPU else "8"))
OURS = "triton" if GPU else "cpu"


def make(t):
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape, div=1.0):
        return (torch.randn(*shape, generator=g, device=DEVICE) / div).to(DTYPE)

    q, k = randn(1, t, HEADS, 64), randn(1, t, HEADS, 64)
    C, B = randn(1, t, HEADS, 64, div=8.0).requires_grad_(), randn(1, t, HEADS, 64).requires_grad_()
    ld = (-torch.rand(1, t, HEADS, generator=g, device=DEVICE) * 0.1).to(DTYPE).requires_grad_()
    D = randn(HEADS).requires_grad_()
    return q, k, C, B, ld, D


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("backend", [OURS, "reference"])
def test_mixing_matrix(benchmark, record, t, backend):
    q, k, C, B, ld, D = make(t)

    def run():
        kdkernels.mixing_matrix_loss(q, k, C, B, ld, D, backend=backend).backward()
        for x in (C, B, ld, D):
            x.grad = None
        if GPU:
            torch.cuda.synchronize()

    try:
        run()
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
        peak = cuda_peak_bytes(run) if GPU else cpu_peak_bytes(run)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{backend}: out of GPU memory at T={t}")
    info = dict(group=f"mixing_matrix fwd+bwd  batch=1 H={HEADS} d=64 N=64 T={t} "
                      f"{str(DTYPE)[6:]} {DEVICE}",
                impl=f"kdkernels-{backend}" if backend == OURS else "reference (materialized)",
                median_s=benchmark.stats.stats.median, peak=peak,
                grad_bytes=HEADS * t * t * 4, bytes=None)
    benchmark.extra_info.update(info)
    record(info)
