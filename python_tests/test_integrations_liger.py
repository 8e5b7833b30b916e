"""kdkernels.integrations.liger against Liger-Kernel 0.8.5 itself (its chunked PyTorch loss,
which runs on CPU with compiled=False): values, the soft and hard parts, and gradients, the
zero-padded larger teacher vocabulary included (Liger's known bug, kept behind the
compatible class)."""
import pytest
import torch

pytest.importorskip("liger_kernel")

from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss as Theirs  # noqa: E402

from kdkernels.integrations.liger import LigerFusedLinearJSDLoss as Ours  # noqa: E402

N, H_S, H_T = 19, 24, 20


def _inputs(v_s, v_t, bias, seed):
    g = torch.Generator().manual_seed(seed)
    t = dict(sh=torch.randn(N, H_S, generator=g), sw=torch.randn(v_s, H_S, generator=g) * 0.4,
             th=torch.randn(N, H_T, generator=g), tw=torch.randn(v_t, H_T, generator=g) * 0.4)
    if bias:
        t["sb"], t["tb"] = torch.randn(v_s, generator=g), torch.randn(v_t, generator=g)
    labels = torch.randint(0, v_s, (N,), generator=g)
    labels[[1, 5, 6]] = -100
    return t, labels


def _run(cls, t, labels, **kw):
    leaves = {k: v.clone().requires_grad_(k in ("sh", "sw", "sb")) for k, v in t.items()}
    out = cls(**kw)(leaves["sh"], leaves["sw"], leaves["th"], leaves["tw"], labels,
                    leaves.get("sb"), leaves.get("tb"))
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    parts = out if isinstance(out, tuple) else (out,)
    return [p.detach() for p in parts], {k: v.grad for k, v in leaves.items() if v.grad is not None}


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("weights,temperature,bias,parts", [
    ((0.5, 0.5), 1.0, False, False), ((0.2, 0.8), 2.0, True, True), ((0.0, 1.0), 0.7, True, True),
    ((0.3, 0.0), 1.5, False, False)])
@pytest.mark.parametrize("v_s,v_t", [(97, 97), (90, 97)], ids=["same-vocab", "padded-teacher"])
def test_fused_linear_jsd_loss_equals_liger(beta, weights, temperature, bias, parts, v_s, v_t):
    t, labels = _inputs(v_s, v_t, bias, seed=int(beta * 10) + v_s)
    kw = dict(weight_hard_loss=weights[0], weight_soft_loss=weights[1], beta=beta,
              temperature=temperature, return_soft_hard_loss=parts, chunk_size=8)
    ours = _run(Ours, t, labels, **kw)
    theirs = _run(Theirs, t, labels, compiled=False, **kw)
    for a, b, what in zip(ours[0], theirs[0], ("loss", "soft", "hard")):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-5, atol=2e-6, msg=what)
    assert ours[1].keys() == theirs[1].keys()
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], rtol=2e-5, atol=1e-6,
                                   msg=f"grad {name}")
