"""Benchmarks of MOHAWK's mixing-matrix loss: kdkernels' tiled kernels vs the reference, which
materializes both T×T matrices per head (as MOHAWK's public code does), forward+backward,
time and peak memory. CPU default: fp32, batch 1, H=8, d=64, N=64 (G=8), T=2048.
Override with KDK_MM_T (comma list), KDK_MM_H."""
import os

import pytest
import torch

import kdkernels

from conftest import cpu_peak_bytes

TS = [int(t) for t in os.environ.get("KDK_MM_T", "2048").split(",")]
HEADS = int(os.environ.get("KDK_MM_H", "8"))


def make(t):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, t, HEADS, 64, generator=g)
    k = torch.randn(1, t, HEADS, 64, generator=g)
    C = (torch.randn(1, t, HEADS, 64, generator=g) / 8).requires_grad_()
    B = torch.randn(1, t, HEADS, 64, generator=g).requires_grad_()
    ld = (-torch.rand(1, t, HEADS, generator=g) * 0.1).requires_grad_()
    D = torch.randn(HEADS, generator=g).requires_grad_()
    return q, k, C, B, ld, D


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_mixing_matrix(benchmark, record, t, backend):
    q, k, C, B, ld, D = make(t)

    def run():
        kdkernels.mixing_matrix_loss(q, k, C, B, ld, D, backend=backend).backward()
        for x in (C, B, ld, D):
            x.grad = None

    run()
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    peak = cpu_peak_bytes(run)
    info = dict(group=f"mixing_matrix fwd+bwd  batch=1 H={HEADS} d=64 N=64 T={t} fp32 cpu",
                impl=f"kdkernels-{backend}" if backend == "cpu" else "reference (materialized)",
                median_s=benchmark.stats.stats.median, peak=peak,
                grad_bytes=HEADS * t * t * 4, bytes=None)
    benchmark.extra_info.update(info)
    record(info)
