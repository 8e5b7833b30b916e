"""Benchmarks of DAC-KL: kdkernels' sort-free kernels vs the sort-based reference (eager and
under torch.compile), forward+backward with learnable bounds (gradients to the student logits
and to per-row lower/upper), time and peak memory.
CPU default (issue 6): fp32, N=1024, V=32000 and 128256, backend cpu.
GPU default: bf16, N=8192, V=32000 and 128256, backend triton.
Override with KDK_DAC_N, KDK_DAC_V (comma list), KDK_DAC_IMPLS (comma list of ours, reference,
compile)."""
import os

import pytest
import torch

import kdkernels
from kdkernels.reference.dac_kl import dac_kl_rows

from conftest import cpu_peak_bytes, cuda_peak_bytes

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
N = int(os.environ.get("KDK_DAC_N", "8192" if GPU else "1024"))
VS = [int(v) for v in os.environ.get("KDK_DAC_V", "32000,128256").split(",")]
OURS = "triton" if GPU else "cpu"
IMPLS = [OURS if i == "ours" else i
         for i in os.environ.get("KDK_DAC_IMPLS", "ours,reference,compile").split(",")]


def make(v):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    s = (torch.randn(N, v, generator=g, device=DEVICE) * 2).to(DTYPE).requires_grad_()
    t = (torch.randn(N, v, generator=g, device=DEVICE) * 3).to(DTYPE)
    lo = (torch.rand(N, generator=g, device=DEVICE) * 0.2).requires_grad_()
    hi = (0.7 + torch.rand(N, generator=g, device=DEVICE) * 0.3).requires_grad_()
    return s, t, lo, hi


def _reference_mean(s, t, lo, hi):
    return dac_kl_rows(s, t, lo, hi).mean()


_compiled = torch.compile(_reference_mean)


@pytest.mark.parametrize("v", VS)
@pytest.mark.parametrize("impl", IMPLS)
def test_dac_kl(benchmark, record, v, impl):
    s, t, lo, hi = make(v)

    def run():
        if impl == "compile":
            value = _compiled(s, t, lo, hi)
        else:
            value = kdkernels.dac_kl(s, t, lo, hi, backend=impl, t2_scale=False)
        value.backward()
        s.grad = lo.grad = hi.grad = None
        if GPU:
            torch.cuda.synchronize()

    run()  # warm-up (and, for compile, the compilation)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    peak = cuda_peak_bytes(run) if GPU else cpu_peak_bytes(run)
    names = {OURS: f"kdkernels-{OURS}", "reference": "reference (sort, eager)",
             "compile": "torch.compile(reference)"}
    info = dict(group=f"dac_kl fwd+bwd  N={N} V={v} {str(DTYPE)[6:]} {DEVICE}", impl=names[impl],
                median_s=benchmark.stats.stats.median, peak=peak,
                grad_bytes=s.numel() * s.element_size(), bytes=None)
    benchmark.extra_info.update(info)
    record(info)
