"""Benchmarks of the token-relation losses: kdkernels' tiled kernels vs the reference, which
materializes both models' T×T relation matrices and their softmaxes (as every public TRG /
MiniLM implementation does), eager and under torch.compile; forward+backward, time and peak
memory.
CPU default (issue 5's target): fp32, batch 2, T=4096, d_s=384, d_t=768, backend cpu.
GPU default: bf16, batch 8, R=12 relation heads, T=4096, d=64, backend triton.
Override with KDK_TR_T (comma list of T), KDK_TR_LOSS (comma list of kl, mse), KDK_TR_IMPLS
(comma list of ours, reference, compile), KDK_TR_KEYS=1 (separate student and teacher keys:
the MiniLM form, which has no symmetric relation matrices)."""
import os

import pytest
import torch

import kdkernels
from kdkernels.reference.token_relation import token_relation_loss_rows

from conftest import cpu_peak_bytes, cuda_peak_bytes

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
TS = [int(t) for t in os.environ.get("KDK_TR_T", "4096").split(",")]
LOSSES = os.environ.get("KDK_TR_LOSS", "kl,mse").split(",")
OURS = "triton" if GPU else "cpu"
IMPLS = [OURS if i == "ours" else i
         for i in os.environ.get("KDK_TR_IMPLS", "ours,reference,compile").split(",")]
# (batch, R or None, d_s, d_t)
SHAPE = (8, 12, 64, 64) if GPU else (2, None, 384, 768)
KEYS = os.environ.get("KDK_TR_KEYS") == "1"


def make(t):
    batch, heads, ds, dt = SHAPE
    lead = (batch,) if heads is None else (batch, heads)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    fs = torch.randn(*lead, t, ds, generator=g, device=DEVICE).to(DTYPE).requires_grad_()
    ft = torch.randn(*lead, t, dt, generator=g, device=DEVICE).to(DTYPE)
    if not KEYS:
        return fs, ft, None, None
    ks = torch.randn(*lead, t, ds, generator=g, device=DEVICE).to(DTYPE).requires_grad_()
    kt = torch.randn(*lead, t, dt, generator=g, device=DEVICE).to(DTYPE)
    return fs, ft, ks, kt


def _reference_mean(fs, ft, ks, kt, loss):
    return token_relation_loss_rows(fs, ft, student_keys=ks, teacher_keys=kt, loss=loss).mean()


_compiled = torch.compile(_reference_mean)


@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("impl", IMPLS)
def test_token_relation(benchmark, record, t, loss, impl):
    fs, ft, ks, kt = make(t)

    def run():
        if impl == "compile":
            value = _compiled(fs, ft, ks, kt, loss)
        else:
            value = kdkernels.token_relation_loss(fs, ft, student_keys=ks, teacher_keys=kt,
                                                  loss=loss, backend=impl)
        value.backward()
        fs.grad = None
        if ks is not None:
            ks.grad = None
        if GPU:
            torch.cuda.synchronize()

    try:
        run()  # warm-up (and, for compile, the compilation)
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
        peak = cuda_peak_bytes(run) if GPU else cpu_peak_bytes(run)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl}: out of GPU memory at T={t}")
    batch, heads, ds, dt = SHAPE
    names = {OURS: f"kdkernels-{OURS}", "reference": "reference (eager)",
             "compile": "torch.compile(reference)"}
    info = dict(group=f"token_relation {loss}{' keys' if KEYS else ''} fwd+bwd  batch={batch} R={heads or 1} T={t} "
                      f"d_s={ds} d_t={dt} {str(DTYPE)[6:]} {DEVICE}",
                impl=names[impl], median_s=benchmark.stats.stats.median, peak=peak,
                grad_bytes=fs.numel() * fs.element_size(), bytes=None)
    benchmark.extra_info.update(info)
    record(info)
