"""Relative error of the fp32 divergence losses against float64 as the temperature grows: the
reference and cpu backends (both sum Σ y·φ(log x − log y)) and the plain formula
Σ p·(log p − log q) as PyTorch users write it. Unit-normal logits, 64 rows of V = 1003; the
worst row. Run: python bench/temperature_precision.py"""
import torch

import kdkernels

torch.manual_seed(0)
s, t = torch.randn(64, 1003), torch.randn(64, 1003)
print("T      kind  reference  cpu      plain fp32")
for temperature in (1.0, 10.0, 100.0):
    for kind in ("fkl", "jsd"):
        kw = dict(kind=kind, temperature=temperature, reduction="none", t2_scale=False)
        want = kdkernels.divergence(s.double(), t.double(), backend="reference", **kw)

        def rel(x):
            return ((x.double() - want).abs() / want.abs()).max().item()

        ref = kdkernels.divergence(s, t, backend="reference", **kw)
        cpu = kdkernels.divergence(s, t, backend="cpu", **kw)
        plain = ""
        if kind == "fkl":
            lp, lq = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
            plain = f"{rel((lp.exp() * (lp - lq)).sum(-1)):.1e}"
        print(f"{temperature:<6g} {kind:<5} {rel(ref):.1e}    {rel(cpu):.1e}  {plain}")
