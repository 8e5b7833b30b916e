"""kdkernels.integrations.liger against Liger-Kernel 0.8.5.

LigerFusedLinearJSDLoss against Liger itself (its chunked PyTorch loss, which runs on CPU with
compiled=False): values, the soft and hard parts, and gradients, the zero-padded larger
teacher vocabulary included (Liger's known bug, kept behind the compatible class).

LigerJSD, LigerKLDIVLoss, LigerTVDLoss and LigerFusedLinearJSD are Triton kernels in Liger.
Their oracle is a transcription of each kernel's loss and of the gradient it returns (w.r.t.
the log-probabilities or probabilities as free variables), in plain PyTorch in this file,
citing the Liger file it transcribes, run in float64 (the oracle) and float32 (the fp32-formula
error of helpers.assert_matches). Liger's JSD and fused-linear JSD kernels also run under
Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1 without a GPU), so where Liger
runs (that, or a GPU) they are checked against the same oracle and against ours as well; its
KL and TVD kernels do not (they call .to() on a Python float, which the interpreter passes
for a scalar argument). The gradients are compared where they are comparable: w.r.t. the
logits upstream of the caller's log_softmax / softmax (kdkernels/integrations/liger.py's
docstring says why). Liger's signatures and attributes are compared with Liger's classes."""
import importlib
import inspect
import math
import os

import pytest
import torch

pytest.importorskip("liger_kernel")

from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss as Theirs  # noqa: E402

import kdkernels  # noqa: E402
from helpers import assert_matches  # noqa: E402
from kdkernels.integrations.liger import LigerFusedLinearJSDLoss as Ours  # noqa: E402
from kdkernels.integrations.liger import (LigerFusedLinearJSD, LigerJSD,  # noqa: E402
                                          LigerKLDIVLoss, LigerTVDLoss)

# Where Liger's Triton kernels run: a GPU, else Triton's CPU interpreter; else nowhere here.
LIGER_DEVICE = "cuda" if torch.cuda.is_available() else \
    "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


def theirs(module, name):
    """Liger's class liger_kernel.transformers.<module>.<name>."""
    return getattr(importlib.import_module(f"liger_kernel.transformers.{module}"), name)

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


# ============================================================================================
# LigerJSD, LigerKLDIVLoss, LigerTVDLoss, LigerFusedLinearJSD: against transcriptions of
# Liger's Triton kernels in plain PyTorch, run in float64 (the oracle) and in float32 (the
# fp32-formula error of helpers.assert_matches); and Liger's own JSD kernels where they run.
# ============================================================================================
IGNORE = -100
REDUCTIONS = ["none", "batchmean", "sum", "mean"]


def _times(a, b, literal):
    """a·b; 0·anything = 0 unless literal (Liger's kernels multiply as written: 0·(−inf) = NaN)."""
    return a * b if literal else torch.where(a == 0, 0.0, a * b)


def _kept(labels, n, device):
    return torch.ones(n, dtype=torch.bool, device=device) if labels is None \
        else labels.reshape(-1) != IGNORE


def liger_jsd(x, y, labels, beta, literal=False):
    """liger_kernel/ops/jsd.py, _jsd_kernel and jsd_forward, on (N, V) log-probabilities:
    X = log q (the student, the argument that gets a gradient), Y = log p (the teacher), per
    element
        β = 0:   loss P·(Y − X)                               dX = −P
        β = 1:   loss Q·(X − Y)                               dX = Q·(X − Y) + Q
        else:    log M = log(β·P + (1−β)·Q)  (computed in log space, as the kernel does)
                 loss β·P·(Y − log M) + (1−β)·Q·(X − log M)   dX = (1−β)·Q·(X − log M)
    both times 1/n, n = the rows whose label != ignore_index (all rows without labels); a row
    whose label is ignore_index gives loss 0 and dX 0. Returns (Σ loss, dX), dX the gradient
    w.r.t. X as a free variable (what the kernel stores)."""
    P, Q = y.exp(), x.exp()
    if beta == 0.0:
        loss, dx = _times(P, y - x, literal), -P
    elif beta == 1.0:
        loss = _times(Q, x - y, literal)
        dx = loss + Q
    else:
        log_m = torch.logaddexp(math.log(beta) + y, math.log1p(-beta) + x)
        loss = _times(beta * P, y - log_m, literal) + _times((1 - beta) * Q, x - log_m, literal)
        dx = _times((1 - beta) * Q, x - log_m, literal)
    kept = _kept(labels, x.shape[0], x.device)[:, None]
    n = max(int(kept.sum()), 1)  # n = 0: every row returns early, so loss and dX are 0
    return torch.where(kept, loss, 0.0).sum() / n, torch.where(kept, dx, 0.0) / n


def liger_kl(y_pred, y_true, reduction, log_target, eps=1e-10, upstream=None, literal=False):
    """liger_kernel/ops/kl_div.py on (BT, V): _kldiv_kernel_forward's elementwise loss
    y_true·(log max(y_true, eps) − y_pred) (log_target: e^y_true·(y_true − y_pred)), then
    kldiv_forward_triton's reduction ("none" the terms, "sum" their total, "mean" / (BT·V),
    "batchmean" / BT); the gradient, _kldiv_kernel_backward and LigerKLDivLossFunction.backward:
    −y_true (log_target: −e^y_true) times the upstream gradient (elementwise for "none"), / BT
    for "batchmean", / (BT·V) for "mean". Returns (loss, d loss / d y_pred)."""
    if log_target:
        terms, d = _times(y_true.exp(), y_true - y_pred, literal), -y_true.exp()
    else:
        terms, d = _times(y_true, y_true.clamp_min(eps).log() - y_pred, literal), -y_true
    bt, v = y_pred.shape
    denominator = {"none": 1, "sum": 1, "mean": bt * v, "batchmean": bt}[reduction]
    if reduction == "none":
        return terms, d * upstream
    return terms.sum() / denominator, d / denominator


def liger_tvd(p, q, labels, reduction, upstream=None):
    """liger_kernel/ops/tvd.py, _tv_distance_kernel and tv_distance_forward_triton, on (BT, V)
    probabilities: terms ½|p − q|, gradient w.r.t. p 0 where p == q, else ±½ (the sign of
    p − q), both times scale = 1/n ("batchmean"), 1/(n·V) ("mean"), 1 ("sum", "none"), n the
    rows whose label != ignore_index (all rows without labels); an ignored row gives 0 terms
    and 0 gradient. "none" returns the terms and multiplies the gradient by the upstream
    gradient elementwise (tvd_backward_triton). Returns (loss, d loss / d p)."""
    kept = _kept(labels, p.shape[0], p.device)[:, None]
    n = max(int(kept.sum()), 1)  # (Liger divides by 0 here: ZeroDivisionError)
    scale = {"batchmean": 1 / n, "mean": 1 / (n * p.shape[1]), "sum": 1.0, "none": 1.0}[reduction]
    terms = torch.where(kept, 0.5 * (p - q).abs(), 0.0)
    grad = torch.where(kept, torch.where(p == q, 0.0, torch.where(p > q, 0.5, -0.5)) * scale, 0.0)
    if reduction == "none":
        return terms, grad * upstream
    return terms.sum() * scale, grad


def liger_fused_jsd(hs, ws, ht, wt, labels, beta, temperature):
    """liger_kernel/ops/fused_linear_jsd.py, fused_linear_jsd_forward, unchunked (its chunks
    change nothing in exact arithmetic): logits h·Wᵀ/T of both models, their log_softmax into
    the JSD kernel (liger_jsd, scaled by 1/n over all rows), then the kernel's dX through the
    log_softmax and the 1/T, dz = (dX − softmax(z_s)·ΣdX)/T, and dh = dz·W_s, dW = dzᵀ·h_s.
    Returns (loss, d loss / d h_s, d loss / d W_s)."""
    zs, zt = hs @ ws.T / temperature, ht @ wt.T / temperature
    x = torch.log_softmax(zs, -1)
    loss, dx = liger_jsd(x, torch.log_softmax(zt, -1), labels, beta)
    dz = (dx - x.exp() * dx.sum(-1, keepdim=True)) / temperature
    return loss, dz @ ws, dz.T @ hs


def through_log_softmax(dx, x):
    """The gradient w.r.t. the logits upstream of the caller's x = log_softmax(logits), from
    the gradient dx w.r.t. x: dx − softmax·Σdx (log_softmax's backward, which takes its output)."""
    return dx - x.exp() * dx.sum(-1, keepdim=True)


def through_softmax(dp, p):
    """Likewise for the caller's p = softmax(logits): p·(dp − Σ p·dp)."""
    return p * (dp - (p * dp).sum(-1, keepdim=True))


def _master(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _labels(lead, seed, every=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, lead, generator=g)
    labels.view(-1)[1::every] = IGNORE
    return labels


def _check(got, ref64, ref32, dtypes, what):
    """(loss, grad) against the oracle's, each in its expected dtype."""
    for name, a, r64, r32, dtype in zip(("loss", "grad"), got, ref64, ref32, dtypes):
        assert a.dtype == dtype, (what, name, a.dtype)
        assert a.shape == r64.shape, (what, name, a.shape, r64.shape)
        assert_matches(a, r64, r32, dtype, f"{what} {name}")


# ------------------------------------------------------------------------------------ LigerJSD
def _jsd_via_logits(zs, zt, labels, beta, module=None, device="cpu"):
    """Ours (or `module`, on `device`): the leaf is the student's fp32 logits, the module gets
    their log_softmax (as a trainer calls it); returns (loss, d loss / d logits) on the CPU."""
    z = zs.float().to(device).requires_grad_()
    loss = (module or LigerJSD(beta=beta))(torch.log_softmax(z, -1),
                                           torch.log_softmax(zt.float().to(device), -1),
                                           None if labels is None else labels.to(device))
    loss.backward()
    return loss.detach().cpu(), z.grad.cpu()


def _liger_jsd_itself(zs, zt, labels, beta, ref64, ref32, ours, what):
    """Liger's own LigerJSD, where it runs: within the same tolerance of the oracle, and
    equal to ours to fp32 rounding."""
    if LIGER_DEVICE is None:
        return
    got = _jsd_via_logits(zs, zt, labels, beta, theirs("jsd", "LigerJSD")(beta=beta), LIGER_DEVICE)
    _check(got, ref64, ref32, (torch.float32,) * 2, f"Liger itself, {what}")
    for a, b in zip(ours, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _jsd_oracle(zs, zt, labels, beta, dtype):
    """Liger's loss and gradient, chained through the caller's log_softmax, from the logits."""
    x, y = torch.log_softmax(zs.to(dtype), -1), torch.log_softmax(zt.to(dtype), -1)
    loss, dx = liger_jsd(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), labels, beta)
    return loss, through_log_softmax(dx, x.reshape(dx.shape)).reshape(x.shape)


@pytest.mark.parametrize("labels", [False, True], ids=["all-rows", "shift_labels"])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_liger(beta, labels):
    zs, zt = _master((13, 97), 1), _master((13, 97), 2)
    lab = _labels((13,), 3) if labels else None
    got = _jsd_via_logits(zs, zt, lab, beta)
    ref64, ref32 = (_jsd_oracle(zs, zt, lab, beta, d) for d in (torch.float64, torch.float32))
    _check(got, ref64, ref32, (torch.float32,) * 2, f"beta={beta}")
    _liger_jsd_itself(zs, zt, lab, beta, ref64, ref32, got, f"beta={beta}")


def _renormalized_oracle(oracle, x, y, dtype, *args):
    """An oracle on the 16-bit log-probabilities x, y as given, renormalized: Liger's formulas
    presume log-probabilities, which 16-bit ones are only to their rounding (ours renormalizes,
    the module docstring says so). The gradient is w.r.t. x taken as the logits of its own
    log_softmax, which is what ours returns for x (and the same after any caller's log_softmax)."""
    lx, ly = torch.log_softmax(x.to(dtype), -1), torch.log_softmax(y.to(dtype), -1)
    loss, dx = oracle(lx, ly, *args)
    return loss, through_log_softmax(dx, lx)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_jsd_bf16(beta):
    """bf16 log-probabilities in: loss in bf16 (Liger casts to log_q's dtype), gradient in
    bf16, each within bf16's rounding of the float64 oracle."""
    zs, zt = _master((11, 61), 4), _master((11, 61), 5)
    x = torch.log_softmax(zs, -1).to(torch.bfloat16).requires_grad_()
    y = torch.log_softmax(zt, -1).to(torch.bfloat16)
    lab = _labels((11,), 6)
    loss = LigerJSD(beta=beta)(x, y, lab)
    loss.backward()
    _check((loss.detach(), x.grad),
           _renormalized_oracle(liger_jsd, x.detach(), y, torch.float64, lab, beta),
           _renormalized_oracle(liger_jsd, x.detach(), y, torch.float32, lab, beta),
           (torch.bfloat16,) * 2, f"bf16 beta={beta}")


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_every_row_dropped(beta):
    """Every row ignored (and holding NaN, never read): 0 and zero gradients, as Liger's."""
    modules = [LigerJSD] + ([theirs("jsd", "LigerJSD")] if LIGER_DEVICE else [])
    for cls in modules:
        device = "cpu" if cls is LigerJSD else LIGER_DEVICE
        x = torch.full((4, 9), float("nan"), device=device, requires_grad=True)
        loss = cls(beta=beta, ignore_index=7)(x, torch.zeros(4, 9, device=device),
                                              torch.full((4,), 7, device=device))
        loss.backward()
        assert loss.item() == 0.0 and (x.grad == 0).all(), cls


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_jsd_zero_probabilities(beta):
    """−inf log-probabilities (a masked vocabulary: −inf logits): at the same entries of both,
    at the teacher's only (β < 1: finite) and at the student's only (β > 0): finite, equal to
    Liger's formula read with 0·log 0 = 0; Liger's kernel itself gives NaN there."""
    zs, zt = _master((9, 40), 7), _master((9, 40), 8)
    zs[:, :6] = zt[:, :6] = float("-inf")
    zs[2, 10:30] = zt[2, 10:30] = float("-inf")
    if beta < 1:
        zt[:, 6:9] = float("-inf")
    if beta > 0:
        zs[:, 9:12] = float("-inf")
    lab = _labels((9,), 9, every=4)
    got = _jsd_via_logits(zs, zt, lab, beta)
    ref64 = _jsd_oracle(zs, zt, lab, beta, torch.float64)
    _check(got, ref64, _jsd_oracle(zs, zt, lab, beta, torch.float32), (torch.float32,) * 2,
           f"-inf beta={beta}")
    assert (got[1][:, :6] == 0).all()
    lx, ly = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    assert liger_jsd(lx, ly, lab, beta, literal=True)[0].isnan()  # what Liger's kernel returns:
    if LIGER_DEVICE:
        assert _jsd_via_logits(zs, zt, lab, beta, theirs("jsd", "LigerJSD")(beta=beta),
                               LIGER_DEVICE)[0].isnan()


LAYOUTS = ["N=1", "V=1", "V=2", "3-D", "row-strided", "transposed"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jsd_shapes_and_layouts(layout):
    """Odd shapes (one row, V = 1: both distributions are [1], loss and gradient 0), (B, T, V)
    inputs with (B, T) labels, and non-contiguous log-probabilities (every other row of a
    tensor; the transpose of a (V, N) one)."""
    shape = {"N=1": (1, 7), "V=1": (5, 1), "V=2": (6, 2), "3-D": (2, 3, 7)}.get(layout, (6, 11))
    zs, zt = _master(shape, 10), _master(shape, 11)
    lab = _labels(shape[:-1], 12) if layout in ("3-D", "V=1", "row-strided") else None
    if layout == "row-strided":  # the student's rows are rows 0, 2, 4, … of a (2N, V) tensor
        z = torch.cat([zs.float(), torch.randn_like(zs.float())], 1).reshape(-1, shape[1])
        z.requires_grad_()
        x = torch.log_softmax(z, -1)[::2]
    elif layout == "transposed":  # the student's log-probs are the transpose of (V, N) ones
        z = zs.float().T.contiguous().requires_grad_()
        x = torch.log_softmax(z, 0).T
    else:
        z = zs.float().requires_grad_()
        x = torch.log_softmax(z, -1)
    assert x.is_contiguous() == (layout not in ("row-strided", "transposed"))
    loss = LigerJSD(beta=0.3)(x, torch.log_softmax(zt.float(), -1), lab)
    loss.backward()
    grad = {"row-strided": lambda g: g[::2], "transposed": lambda g: g.T}.get(layout, lambda g: g)
    _check((loss.detach(), grad(z.grad)), _jsd_oracle(zs, zt, lab, 0.3, torch.float64),
           _jsd_oracle(zs, zt, lab, 0.3, torch.float32), (torch.float32,) * 2, layout)
    if layout == "row-strided":
        assert (z.grad[1::2] == 0).all()
    if layout == "V=1":
        assert loss.item() == 0.0 and (z.grad == 0).all()


def test_jsd_unnormalized_inputs_are_renormalized():
    """Raw logits instead of log-probabilities: ours is the JSD of their softmaxes (kdkernels.jsd
    of the logits); Liger's formula, which exponentiates them as they are, is something else
    (the module docstring's choice)."""
    zs, zt = _master((8, 30), 13), _master((8, 30), 14)
    x = zs.float().requires_grad_()
    loss = LigerJSD(beta=0.5)(x, zt.float())
    loss.backward()
    want = kdkernels.jsd(zs, zt, beta=0.5, t2_scale=False)
    assert_matches(loss.detach(), want, kdkernels.jsd(zs.float(), zt.float(), beta=0.5,
                                                      t2_scale=False), torch.float32, "loss")
    literal = liger_jsd(zs, zt, None, 0.5)[0]
    assert (literal - want).abs() > 0.1 * want.abs()
    if LIGER_DEVICE:
        liger = theirs("jsd", "LigerJSD")()(zs.float().to(LIGER_DEVICE),
                                            zt.float().to(LIGER_DEVICE))
        torch.testing.assert_close(liger.cpu().double(), literal, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ LigerKLDIVLoss
def _kl_inputs(log_target, dtype, zs, zt):
    y_pred = torch.log_softmax(zs.to(dtype), -1)
    y_true = (torch.log_softmax if log_target else torch.softmax)(zt.to(dtype), -1)
    return y_pred, y_true


def _kl_oracle(zs, zt, reduction, log_target, dtype, upstream, eps=1e-10):
    y_pred, y_true = _kl_inputs(log_target, dtype, zs, zt)
    loss, d = liger_kl(y_pred, y_true, reduction, log_target, eps, upstream.to(dtype))
    return loss, through_log_softmax(d, y_pred)


@pytest.mark.parametrize("log_target", [False, True], ids=["probs", "log_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_div_equals_liger(reduction, log_target):
    zs, zt = _master((13, 97), 20), _master((13, 97), 21)
    zt[3, :40] = float("-inf")  # zero target probabilities in one row
    upstream = torch.linspace(-1.0, 2.0, 13 * 97, dtype=torch.float64).reshape(13, 97)
    z = zs.float().requires_grad_()
    y_pred, y_true = _kl_inputs(log_target, torch.float32, z, zt)
    loss = LigerKLDIVLoss(reduction=reduction, log_target=log_target)(y_pred, y_true)
    (loss * (upstream.float() if reduction == "none" else 1.0)).sum().backward()
    _check((loss.detach(), z.grad),
           _kl_oracle(zs, zt, reduction, log_target, torch.float64, upstream),
           _kl_oracle(zs, zt, reduction, log_target, torch.float32, upstream),
           (torch.float32,) * 2, f"{reduction} log_target={log_target}")


@pytest.mark.parametrize("log_target", [False, True], ids=["probs", "log_target"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_kl_div_bf16(reduction, log_target):
    """bf16 inputs: float32 loss (as Liger's), bf16 gradient, against the float64 oracle."""
    zs, zt = _master((11, 61), 22), _master((11, 61), 23)
    y_pred, y_true = (t.to(torch.bfloat16) for t in _kl_inputs(log_target, torch.float64, zs, zt))
    y_pred.requires_grad_()
    loss = LigerKLDIVLoss(reduction=reduction, log_target=log_target)(y_pred, y_true)
    loss.backward()
    target = y_true if log_target else y_true.double().log()  # log-probs, renormalized below

    def oracle(dtype):
        def kl(lx, ly):
            return liger_kl(lx, ly if log_target else ly.exp(), reduction, log_target)
        return _renormalized_oracle(kl, y_pred.detach(), target, dtype)
    _check((loss.detach(), y_pred.grad), oracle(torch.float64), oracle(torch.float32),
           (torch.float32, torch.bfloat16), f"bf16 {reduction}")


def test_kl_div_eps():
    """eps: "none" is Liger's terms exactly (log max(y_true, eps)); the reductions are the exact
    KL, torch.nn.KLDivLoss's value, which Liger's misses by y·log(eps/y) per entry y < eps."""
    eps = 0.02
    zs, zt = _master((6, 20), 24), _master((6, 20), 25)
    y_pred = torch.log_softmax(zs, -1).float()
    y_true = torch.softmax(zt, -1).float()
    small = (y_true > 0) & (y_true < eps)
    assert small.sum() > 10
    none = LigerKLDIVLoss(eps, reduction="none")(y_pred, y_true)
    torch.testing.assert_close(none, liger_kl(y_pred, y_true, "none", False, eps,
                                              torch.ones(()))[0], rtol=1e-6, atol=1e-7)
    total = LigerKLDIVLoss(eps, reduction="sum")(y_pred, y_true)
    exact = torch.nn.KLDivLoss(reduction="sum")(y_pred.double(), y_true.double())
    torch.testing.assert_close(total.double(), exact, rtol=1e-5, atol=1e-6)
    theirs = liger_kl(y_pred.double(), y_true.double(), "sum", False, eps)[0]
    gap = (y_true.double() * (math.log(eps) - y_true.double().log()))[small].sum()
    torch.testing.assert_close(theirs - exact, gap)
    assert gap > 1e-3 and (gap <= small.sum() * eps / math.e)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_div_zero_probabilities(reduction):
    """A target probability 0 where y_pred is −inf (a masked vocabulary): finite, 0·log 0 = 0;
    Liger's kernel (and torch's kl_div) give NaN there."""
    zs, zt = _master((5, 30), 26), _master((5, 30), 27)
    zs[:, :5] = zt[:, :5] = float("-inf")
    for log_target in (False, True):
        z = zs.float().requires_grad_()
        y_pred, y_true = _kl_inputs(log_target, torch.float32, z, zt)
        out = LigerKLDIVLoss(reduction=reduction, log_target=log_target)(y_pred, y_true)
        out.sum().backward()
        upstream = torch.ones(5, 30, dtype=torch.float64)
        _check((out.detach(), z.grad),
               _kl_oracle(zs, zt, reduction, log_target, torch.float64, upstream),
               _kl_oracle(zs, zt, reduction, log_target, torch.float32, upstream),
               (torch.float32,) * 2, f"{reduction} log_target={log_target}")
        y_pred, y_true = _kl_inputs(log_target, torch.float64, zs, zt)
        assert liger_kl(y_pred, y_true, reduction, log_target, literal=True,
                        upstream=upstream)[0].isnan().any()


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_kl_div_3d_follows_torch(reduction):
    """(B, T, V) inputs (Liger takes 2-D only): torch.nn.KLDivLoss's reductions, batchmean / B."""
    zs, zt = _master((2, 5, 17), 28), _master((2, 5, 17), 29)
    y_pred, y_true = torch.log_softmax(zs, -1), torch.softmax(zt, -1)
    ours = LigerKLDIVLoss(reduction=reduction)(y_pred.float(), y_true.float())
    want = torch.nn.KLDivLoss(reduction=reduction)(y_pred, y_true)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-7)
    assert isinstance(LigerKLDIVLoss(), torch.nn.KLDivLoss)


# -------------------------------------------------------------------------------- LigerTVDLoss
def _tvd_oracle(p, q, labels, reduction, upstream, dtype, chain=True):
    p, q = p.detach().to(dtype), q.to(dtype)
    loss, dp = liger_tvd(p, q, labels, reduction, upstream.to(dtype))
    return loss, through_softmax(dp, p) if chain else dp


@pytest.mark.parametrize("labels", [False, True], ids=["all-rows", "shift_labels"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_tvd_equals_liger(reduction, labels):
    """p = softmax(logits) (the leaf), q fixed: the loss, p's gradient (Liger's exactly, as a
    free variable) and the logits' gradient after the caller's softmax backward."""
    zs, zt = _master((13, 97), 30), _master((13, 97), 31)
    zs[2, :20] = zt[2, 10:30] = float("-inf")  # zero probabilities
    lab = _labels((13,), 32) if labels else None
    upstream = torch.linspace(-1.0, 2.0, 13 * 97, dtype=torch.float64).reshape(13, 97)
    z = zs.float().requires_grad_()
    p = torch.softmax(z, -1)
    p.retain_grad()
    q = torch.softmax(zt.float(), -1)
    loss = LigerTVDLoss(reduction=reduction)(p, q, lab)
    (loss * (upstream.float() if reduction == "none" else 1.0)).sum().backward()
    what = f"{reduction} labels={labels}"
    for chain, grad in ((False, p.grad), (True, z.grad)):
        _check((loss.detach(), grad),
               _tvd_oracle(p, q, lab, reduction, upstream, torch.float64, chain),
               _tvd_oracle(p, q, lab, reduction, upstream, torch.float32, chain),
               (torch.float32,) * 2, f"{what} {'d logits' if chain else 'dp'}")


def test_tvd_ties_and_zeros():
    """p == q entries (whole rows, single entries, zeros at the same places) have gradient 0
    (Liger #1374); unnormalized inputs are taken as they are, as Liger does."""
    g = torch.Generator().manual_seed(33)
    p = torch.rand(6, 25, generator=g)
    q = torch.rand(6, 25, generator=g)
    q[0] = p[0]
    q[1, ::3] = p[1, ::3]
    p[2, :8] = q[2, :8] = 0.0
    p[3, 5:9] = 0.0
    for reduction in REDUCTIONS:
        leaf = p.clone().requires_grad_()
        out = LigerTVDLoss(reduction=reduction)(leaf, q)
        out.sum().backward()
        ones = torch.ones(6, 25, dtype=torch.float64)
        _check((out.detach(), leaf.grad),
               _tvd_oracle(p, q, None, reduction, ones, torch.float64, False),
               _tvd_oracle(p, q, None, reduction, ones, torch.float32, False),
               (torch.float32,) * 2, reduction)
        assert (leaf.grad[p == q] == 0).all()


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_tvd_bf16(reduction):
    zs, zt = _master((11, 61), 34), _master((11, 61), 35)
    p = torch.softmax(zs, -1).to(torch.bfloat16).requires_grad_()
    q = torch.softmax(zt, -1).to(torch.bfloat16)
    lab = _labels((11,), 36)
    upstream = torch.linspace(-1.0, 2.0, 11 * 61, dtype=torch.float64).reshape(11, 61)
    out = LigerTVDLoss(reduction=reduction)(p, q, lab)
    (out * (upstream.float() if reduction == "none" else 1.0)).sum().backward()
    _check((out.detach(), p.grad),
           _tvd_oracle(p, q, lab, reduction, upstream, torch.float64, False),
           _tvd_oracle(p, q, lab, reduction, upstream, torch.float32, False),
           (torch.float32, torch.bfloat16), f"bf16 {reduction}")


def test_tvd_every_row_dropped_and_q_constant():
    """Every row ignored (NaN inside, never read): 0 and zero gradients for every reduction
    (Liger: ZeroDivisionError for batchmean and mean); q gets no gradient, as in Liger."""
    for reduction in REDUCTIONS:
        p = torch.full((3, 8), float("nan"), requires_grad=True)
        q = torch.rand(3, 8, requires_grad=True)
        out = LigerTVDLoss(reduction=reduction)(p, q, torch.full((3,), IGNORE))
        out.sum().backward()
        assert (out == 0).all() and (p.grad == 0).all() and q.grad is None, reduction


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_and_tvd_non_contiguous(reduction):
    """Transposed (column-strided) inputs give what their contiguous copies give, gradients
    included."""
    zs, zt = _master((19, 8), 37), _master((19, 8), 38)  # (V, N): the transposes are (N, V)
    for cls, make in ((LigerKLDIVLoss, lambda z, d: torch.log_softmax(z, d)),
                      (LigerTVDLoss, lambda z, d: torch.softmax(z, d))):
        results = []
        for contiguous in (False, True):
            z = zs.float().requires_grad_()
            x, y = make(z, 0).T, torch.softmax(zt.float(), 0).T
            if contiguous:
                x, y = x.contiguous(), y.contiguous()
            out = cls(reduction=reduction)(x, y)
            out.sum().backward()
            results.append((out.detach(), z.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------- LigerFusedLinearJSD
def _fused_case(lead, seed):
    g = torch.Generator().manual_seed(seed)
    v = 97
    return dict(hs=torch.randn(*lead, 24, generator=g, dtype=torch.float64),
                ws=torch.randn(v, 24, generator=g, dtype=torch.float64) * 0.6,
                ht=torch.randn(*lead, 20, generator=g, dtype=torch.float64),
                wt=torch.randn(v, 20, generator=g, dtype=torch.float64) * 0.6)


def _fused_oracle(case, labels, beta, temperature, dtype):
    c = {k: v.to(dtype) for k, v in case.items()}
    lead = c["hs"].shape[:-1]
    loss, dh, dw = liger_fused_jsd(c["hs"].reshape(-1, 24), c["ws"], c["ht"].reshape(-1, 20),
                                   c["wt"], labels, beta, temperature)
    return loss, dh.reshape(*lead, 24), dw


def _fused_check(case, labels, beta, temperature, dtype, what):
    leaves = {k: v.to(dtype).requires_grad_() for k, v in case.items()}  # the teacher's too
    loss = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)(
        leaves["hs"], leaves["ws"], leaves["ht"], leaves["wt"], labels)
    loss.backward()
    assert leaves["ht"].grad is None and leaves["wt"].grad is None
    exact = {k: v.to(dtype).double() for k, v in case.items()}  # the dtype's values, exactly
    ref64 = _fused_oracle(exact, labels, beta, temperature, torch.float64)
    ref32 = _fused_oracle(exact, labels, beta, temperature, torch.float32)
    _check((loss.detach(), leaves["hs"].grad), ref64[:2], ref32[:2], (torch.float32, dtype),
           f"{what} dh")
    assert_matches(leaves["ws"].grad, ref64[2], ref32[2], dtype, f"{what} dW")
    assert leaves["ws"].grad.dtype == dtype
    if LIGER_DEVICE is None or dtype != torch.float32:  # (no bf16 in Triton's interpreter)
        return
    c = {k: v.float().to(LIGER_DEVICE) for k, v in case.items()}
    c["hs"], c["ht"] = c["hs"].reshape(-1, 24), c["ht"].reshape(-1, 20)  # Liger takes 2-D only
    for k in ("hs", "ws"):
        c[k].requires_grad_()
    module = theirs("fused_linear_jsd", "LigerFusedLinearJSD")(jsd_beta=beta,
                                                               temperature=temperature)
    loss_l = module(c["hs"], c["ws"], c["ht"], c["wt"],
                    None if labels is None else labels.reshape(-1).to(LIGER_DEVICE))
    loss_l.backward()
    got_l = (loss_l.detach().cpu(), c["hs"].grad.cpu().reshape(leaves["hs"].shape),
             c["ws"].grad.cpu())
    for name, a, b, r64, r32 in zip(("loss", "dh", "dW"), (loss.detach(), leaves["hs"].grad,
                                    leaves["ws"].grad), got_l, ref64, ref32):
        assert_matches(b, r64, r32, torch.float32, f"Liger itself, {what} {name}")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_fused_linear_jsd_equals_liger(beta, temperature):
    _fused_check(_fused_case((13,), 40), _labels((13,), 41), beta, temperature, torch.float32,
                 f"beta={beta} T={temperature}")


@pytest.mark.parametrize("name,lead,labels,beta,temperature,dtype", [
    ("bf16", (13,), True, 0.5, 2.0, torch.bfloat16),
    ("bf16 rkl", (13,), False, 1.0, 0.7, torch.bfloat16),
    ("no labels", (13,), False, 0.9, 0.7, torch.float32),
    ("3-D", (2, 5), True, 0.5, 1.5, torch.float32),
    ("one row", (1,), False, 0.2, 1.0, torch.float32)])
def test_fused_linear_jsd_cases(name, lead, labels, beta, temperature, dtype):
    _fused_check(_fused_case(lead, 42), _labels(lead, 43) if labels else None, beta, temperature,
                 dtype, name)


def test_fused_linear_jsd_every_row_dropped():
    case = {k: v.float().requires_grad_(k in ("hs", "ws"))
            for k, v in _fused_case((5,), 44).items()}
    loss = LigerFusedLinearJSD()(case["hs"], case["ws"], case["ht"], case["wt"],
                                 torch.full((5,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and (case["hs"].grad == 0).all() and (case["ws"].grad == 0).all()


# ------------------------------------------------------------------------ signatures and errors
@pytest.mark.parametrize("ours,module,name", [
    (LigerJSD, "jsd", "LigerJSD"), (LigerKLDIVLoss, "kl_div", "LigerKLDIVLoss"),
    (LigerTVDLoss, "tvd", "LigerTVDLoss"), (LigerFusedLinearJSD, "fused_linear_jsd",
                                            "LigerFusedLinearJSD")])
def test_signatures_and_attributes_match_liger(ours, module, name):
    """Liger's constructor and forward parameters, in order, with Liger's defaults (ours may
    add a default, e.g. shift_labels=None), and the same public attributes after construction
    (constructing Liger's modules runs no kernel)."""
    cls = theirs(module, name)
    for method in ("__init__", "forward"):
        a = inspect.signature(getattr(ours, method)).parameters
        b = inspect.signature(getattr(cls, method)).parameters
        assert list(a) == list(b), (method, list(a), list(b))
        for key, param in b.items():
            assert param.kind == a[key].kind, (method, key)
            if param.default is not inspect.Parameter.empty:
                assert a[key].default == param.default, (method, key)

    def public(m):
        return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
    assert public(ours()) == public(cls())


def _bad_cases():
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    lab = torch.zeros(4, dtype=torch.long)
    h, w, ht, wt = torch.randn(4, 3), torch.randn(6, 3), torch.randn(4, 5), torch.randn(6, 5)
    fused = LigerFusedLinearJSD()
    return [
        (lambda: LigerJSD(beta=1.5), ValueError, "beta"),
        (lambda: LigerJSD(beta="0.5"), TypeError, "beta"),
        (lambda: LigerJSD(ignore_index=1.5), TypeError, "ignore_index"),
        (lambda: LigerJSD()(x, y[:, :5]), ValueError, "log_q and log_p"),
        (lambda: LigerJSD()(x, y.numpy()), TypeError, "^log_p must be a torch.Tensor"),
        (lambda: LigerJSD()(x.long(), y), TypeError, "^log_q must be a floating"),
        (lambda: LigerJSD()(x, y, lab.float()), TypeError, "shift_labels"),
        (lambda: LigerJSD()(x, y, lab[:3]), ValueError, "shift_labels"),
        (lambda: LigerKLDIVLoss(reduction="avg"), ValueError, "reduction"),
        (lambda: LigerKLDIVLoss(log_target=1), TypeError, "log_target"),
        (lambda: LigerKLDIVLoss(-1.0), ValueError, "eps"),
        (lambda: LigerKLDIVLoss()(x, y[:3]), ValueError, "y_pred and y_true"),
        (lambda: LigerTVDLoss(reduction="max"), ValueError, "reduction"),
        (lambda: LigerTVDLoss(ignore_index=None), TypeError, "ignore_index"),
        (lambda: LigerTVDLoss()(x, y, lab[:2]), ValueError, "shift_labels"),
        (lambda: LigerTVDLoss()(x, "q"), TypeError, "^q must be a torch.Tensor"),
        (lambda: LigerFusedLinearJSD(jsd_beta=-0.1), ValueError, "jsd_beta"),
        (lambda: LigerFusedLinearJSD(temperature=0), ValueError, "temperature"),
        (lambda: LigerFusedLinearJSD(accum_dtype="fp32"), TypeError, "accum_dtype"),
        (lambda: fused(h, w, ht, wt[:5]), ValueError, "teacher_weight"),
        (lambda: fused(h[:, :2], w, ht, wt), ValueError, "student_input"),
        (lambda: fused(h, w.double(), ht, wt), TypeError, "student_weight"),
        (lambda: fused(h, w, ht[:3], wt), ValueError, "student_input and teacher_input"),
        (lambda: fused(h, w, ht, wt, lab[:3]), ValueError, "shift_labels"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_arguments(case):
    fn, error, name = _bad_cases()[case]
    with pytest.raises(error, match=name):
        fn()
