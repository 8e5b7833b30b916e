"""kdkernels.fused_linear_divergence against its peers, TRL 1.16's chunked divergence (the
DistillationTrainer loss) and Liger-Kernel's LigerFusedLinearJSDLoss, through the adapters of
bench/fused_linear_peers.py (whose docstrings give each peer's contract, with line numbers);
and both peers against _formula, the contract in plain float64 PyTorch (materialized logits),
which is the arbiter when ours and a peer disagree.

The peers know fkl, rkl and jsd (β = 0 / 1 / in between, our β convention), no T²: so
ours(t2_scale=True) == T² · peer, ours(t2_scale=False) == peer. Both normalize per kept row
like our reduction="mean". Small odd shapes (N = 13, H_s = 24 ≠ H_t = 20, V = 97)."""
import math
import os
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("liger_kernel")

import kdkernels  # noqa: E402

from helpers import UNIT  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))
from fused_linear_peers import liger_jsd, trl_chunked  # noqa: E402

N, H_S, H_T, V = 13, 24, 20, 97
BACKENDS = ["cpu", "reference"]
TEMPERATURES = [1.0, 2.5]
KIND_SPECS = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 0.9)]
SPEC_IDS = ["fkl", "rkl", "jsd-beta0.3", "jsd-beta0.5", "jsd-beta0.9"]
# TRL projects and accumulates in fp32 whatever the input dtype (chunked_divergence.py:360-368,
# 537-541), so it has no float64 case; Liger computes float64 in float64 (its loss scalar
# excepted, which is float32: fused_linear_distillation.py:205).
PEER_CASES = [pytest.param(trl_chunked, torch.float32, id="trl-fp32"),
              pytest.param(liger_jsd, torch.float32, id="liger-fp32"),
              pytest.param(liger_jsd, torch.float64, id="liger-fp64")]
# (backend, dtype) pairs ours runs: the cpu kernels take fp32/bf16/fp16, float64 runs on the
# reference (the cpu backend's refusal of float64 is tested in test_fused_linear.py).
OURS_CASES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in BACKENDS
              for d in (torch.float32, torch.float64) if not (b == "cpu" and d == torch.float64)]
OURS_PEER_CASES = [pytest.param(b, *c.values, id=f"{b}-{c.id}") for b in BACKENDS for c in PEER_CASES
                   if not (b == "cpu" and c.values[1] == torch.float64)]


# ------------------------------------------------------------------ the contract, in float64
def _formula(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
             student_bias=None, teacher_bias=None, kind="fkl", temperature=1.0, beta=0.5,
             skew=0.1, t2_scale=True, labels=None, ignore_index=-100, mask=None,
             hard_label_weight=0.0, soft_label_weight=1.0, student_logit_scale=1.0,
             teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
             vocab_size=None, reduction="mean", num_items=None, entropy=False):
    """kdkernels.fused_linear_divergence's contract with materialized logits, in the inputs'
    dtype (float64 for the arbiter, float32 for "what plain fp32 PyTorch errs"). Plain
    Σ x·(log x − log y); β = 0 / 1 of jsd and α = 0 of the skews are the plain KLs.
    entropy=True returns the mean over kept rows of H(softmax(z_s/T)) instead (TRL's logged
    metric)."""
    v = vocab_size or min(student_weight.shape[0], teacher_weight.shape[0])

    def project(h, w, b, scale, cap):
        z = h.reshape(-1, h.shape[-1]) @ w.t()
        if b is not None:
            z = z + b
        z = scale * z
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        return z[:, :v]

    zs = project(student_hidden, student_weight, student_bias, student_logit_scale, student_softcap)
    zt = project(teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap)
    lq = torch.log_softmax(zs / temperature, -1)
    lp = torch.log_softmax(zt / temperature, -1)

    def kl(la, lb):
        return (la.exp() * (la - lb)).sum(-1)

    def log_mix(w, la, lb):  # log(w·a + (1−w)·b)
        return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))

    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "fkl" if beta == 0.0 else "rkl"
    if kind in ("skew_fkl", "skew_rkl") and skew == 0.0:
        kind = kind[5:]
    if kind == "fkl":
        div = kl(lp, lq)
    elif kind == "rkl":
        div = kl(lq, lp)
    elif kind == "jsd":
        lm = log_mix(beta, lp, lq)
        div = beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    elif kind == "tvd":
        div = 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    elif kind == "skew_fkl":
        div = kl(lp, log_mix(skew, lp, lq))
    elif kind == "skew_rkl":
        div = kl(lq, log_mix(skew, lq, lp))
    else:
        raise ValueError(kind)
    if t2_scale:
        div = div * temperature ** 2

    keep = torch.ones(zs.shape[0], dtype=torch.bool)
    if labels is not None:
        keep &= labels.reshape(-1) != ignore_index
    if mask is not None:
        keep &= mask.reshape(-1).bool()
    n_kept = keep.sum()
    denom = (n_kept.clamp_min(1) if num_items is None else torch.as_tensor(num_items)).to(zs.dtype)
    if entropy:
        ent = -(lq.exp() * lq).sum(-1)
        return torch.where(keep, ent, 0.0).sum() / denom
    row = soft_label_weight * div
    if hard_label_weight:
        safe = torch.where(keep, labels.reshape(-1), 0)
        ce = -torch.log_softmax(zs, -1).gather(-1, safe[:, None]).squeeze(-1)  # at T = 1
        row = row + hard_label_weight * ce
    row = torch.where(keep, row, 0.0)  # dropped rows: 0, value and gradient
    if reduction == "none":
        return row.reshape(student_hidden.shape[:-1])
    if reduction == "sum":
        return row.sum()
    return row.sum() / denom


# ------------------------------------------------------------------ inputs and comparison
def inputs(dtype, *, v_s=V, v_t=V, lead=(N,), labels=True, seed=0):
    """Hidden states ~ N(0, 1) and heads ~ N(0, 0.25): logits of std ≈ 2.4 (student) and 2.2."""
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(*lead, H_S, generator=g)
    sw = 0.5 * torch.randn(v_s, H_S, generator=g)
    th = torch.randn(*lead, H_T, generator=g)
    tw = 0.5 * torch.randn(v_t, H_T, generator=g)
    lab = None
    if labels:
        lab = torch.randint(0, min(v_s, v_t), lead, generator=g)
        flat = lab.view(-1)
        flat[[0, 4, 5, flat.numel() - 1]] = -100  # the first and last rows among the dropped
    return [x.to(dtype) for x in (sh, sw, th, tw)], lab


def evaluate(fn, tensors, **kw):
    """Loss and the gradients of student_hidden and student_weight (teacher: no grad)."""
    sh, sw, th, tw = (x.detach().clone() for x in tensors)
    sh.requires_grad_()
    sw.requires_grad_()
    loss = fn(sh, sw, th, tw, **kw)
    loss.backward()
    return loss.detach(), sh.grad, sw.grad


def references(tensors, **kw):
    """The contract in float64 (the arbiter) and in float32 (plain fp32 PyTorch's error)."""
    r64 = evaluate(_formula, [x.double() for x in tensors], **kw)
    r32 = evaluate(_formula, [x.float() for x in tensors], **kw)
    return r64, r32


def tolerance(ref64, ref32, dtype, fp32_out=False):
    """Per element. float32 runs: the rounding of fp32 at that value, plus 8 times the largest
    error the same formula makes in plain fp32 PyTorch (materialized logits, its own matmul and
    log-softmax: the error any fp32 implementation has to be allowed), plus 1e-6 of the tensor's
    scale (the products h·Wᵀ are summed in another order in chunked code) — helpers.assert_matches'
    rule. float64 runs: 1e-10 of the scale (the float64 formula errs ~1e-15; different summation
    orders and log-sum-exp paths stay far below 1e-10), or the fp32 rule for a value the code
    rounds to float32 (fp32_out: Liger's loss)."""
    ref64 = ref64.double()
    scale = ref64.abs().max()
    if dtype == torch.float64 and not fp32_out:
        return 1e-10 * scale + 1e-14
    fp32_err = (ref32.double() - ref64).abs().max()
    return ref64.abs() * UNIT[torch.float32] + 8.0 * fp32_err + 1e-6 * scale + 1e-12


def check(what, actual, ref64, tol, extra=0.0):
    err = (actual.double() - ref64.double()).abs()
    tol = tol + extra
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    bad = err > tol
    assert not bad.any(), (f"{what}: max error {err.max().item():.3e} (tol there "
                           f"{torch.as_tensor(tol).expand_as(err).flatten()[err.flatten().argmax()].item():.3e})"
                           f"; scale {ref64.abs().max().item():.3e}")


def check_triple(who, got, r64, r32, dtype, extra=(0.0, 0.0, 0.0), fp32_loss=False):
    for i, name in enumerate(("loss", "student_hidden grad", "student_weight grad")):
        tol = tolerance(r64[i], r32[i], dtype, fp32_out=fp32_loss and i == 0)
        check(f"{who} {name}", got[i], r64[i], tol, extra[i])


def ours(backend):
    def fn(sh, sw, th, tw, **kw):
        return kdkernels.fused_linear_divergence(sh, sw, th, tw, backend=backend, **kw)
    return fn


def peer_kw(kind, beta, temperature, labels):
    return dict(kind=kind, beta=beta, temperature=temperature, labels=labels)


# ------------------------------------------------------------------ the peers vs the contract
@pytest.mark.parametrize("peer,dtype", PEER_CASES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind,beta", KIND_SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("with_labels", [False, True], ids=["all-rows", "ignore-index"])
def test_peer_matches_formula(peer, dtype, temperature, kind, beta, with_labels):
    """Validates the conversions (no T², β convention, per-kept-row mean, ignore_index): the
    peer equals _formula(t2_scale=False) within fp32's tolerance (Liger in float64: float64's,
    its float32 loss scalar excepted)."""
    tensors, labels = inputs(dtype, labels=with_labels)
    kw = peer_kw(kind, beta, temperature, labels)
    got = evaluate(peer, tensors, **kw)
    r64, r32 = references(tensors, t2_scale=False, **kw)
    check_triple(peer.__name__, got, r64, r32, dtype, fp32_loss=peer is liger_jsd)


def test_trl_entropy_is_student_at_temperature_mean_per_kept_token():
    """The entropy DistillationTrainer logs: H(softmax(z_s/T)) (the student at the loss
    temperature), summed over kept rows, divided by their count (distillation_trainer.py:
    1807-1814)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss
    (sh, sw, th, tw), labels = inputs(torch.float32)
    keep = labels != -100
    _, ent_sum, n = _chunked_divergence_loss(sh, th, sw, tw, keep.long(), 0.5, temperature=2.5)
    expect = _formula(sh.double(), sw.double(), th.double(), tw.double(), labels=labels,
                      temperature=2.5, entropy=True)
    assert n.item() == keep.sum().item()
    assert abs(ent_sum.item() / n.item() - expect.item()) < 1e-5 * expect.item()
    at_one = _formula(sh.double(), sw.double(), th.double(), tw.double(), labels=labels,
                      temperature=1.0, entropy=True)
    assert abs(at_one.item() - expect.item()) > 1e-2  # so the test does tell T from 1


@pytest.mark.parametrize("peer", [trl_chunked, liger_jsd], ids=["trl", "liger"])
def test_peer_unsupported_kinds(peer):
    tensors, _ = inputs(torch.float32, labels=False)
    for kind in ("tvd", "skew_fkl", "skew_rkl"):
        with pytest.raises(NotImplementedError):
            peer(*tensors, kind=kind, temperature=1.0, beta=0.5)


# ------------------------------------------------------------------ ours vs the peers
@pytest.mark.parametrize("backend,peer,dtype", OURS_PEER_CASES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind,beta", KIND_SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("with_labels", [False, True], ids=["all-rows", "ignore-index"])
def test_matches_peer(backend, peer, dtype, temperature, kind, beta, with_labels):
    """ours (t2_scale=True) == T² · peer, loss and both student gradients. Tolerance: the
    peer's own measured error against the float64 formula (its distance from the truth, which
    is not ours to blame) plus the rule of `tolerance` for ours; on failure, the message says
    which side is off the float64 arbiter."""
    fn = ours(backend)
    tensors, labels = inputs(dtype, labels=with_labels)
    kw = peer_kw(kind, beta, temperature, labels)
    t2 = temperature ** 2
    p = tuple(t2 * x for x in evaluate(peer, tensors, **kw))
    mine = evaluate(fn, tensors, **kw)
    r64, r32 = references(tensors, **kw)
    peer_err = tuple((a.double() - b).abs() for a, b in zip(p, r64))
    for i, name in enumerate(("loss", "student_hidden grad", "student_weight grad")):
        tol = tolerance(r64[i], r32[i], dtype)
        mine_err = (mine[i].double() - r64[i]).abs().max().item()
        try:
            check(f"ours vs T²·{peer.__name__} {name}", mine[i], p[i].double(), tol, peer_err[i])
        except AssertionError as e:
            raise AssertionError(f"{e}; vs float64 formula: ours {mine_err:.3e}, "
                                 f"peer {peer_err[i].max().item():.3e}") from None
        check(f"ours {name} vs float64 formula", mine[i], r64[i], tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("peer", [trl_chunked, liger_jsd], ids=["trl", "liger"])
def test_without_t2_equals_peer(backend, peer):
    tensors, labels = inputs(torch.float32)
    kw = peer_kw("jsd", 0.5, 2.5, labels)
    p = evaluate(peer, tensors, **kw)
    mine = evaluate(ours(backend), tensors, t2_scale=False, **kw)
    r64, r32 = references(tensors, t2_scale=False, **kw)
    check_triple("ours(t2_scale=False)", mine, r64, r32, torch.float32)
    for i in range(3):
        tol = tolerance(r64[i], r32[i], torch.float32)
        check("ours(t2_scale=False) vs peer", mine[i], p[i], tol, (p[i].double() - r64[i]).abs())


@pytest.mark.parametrize("backend,dtype", OURS_CASES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_hard_label_ce_matches_liger(backend, dtype, temperature):
    """hard_label_weight: both add w·CE(student logits at T = 1, label) averaged over the kept
    rows; Liger without T² on the soft part, so compare at t2_scale=False."""
    fn = ours(backend)
    tensors, labels = inputs(dtype)
    kw = peer_kw("jsd", 0.3, temperature, labels)
    p = evaluate(liger_jsd, tensors, hard_label_weight=0.7, **kw)
    mine = evaluate(fn, tensors, t2_scale=False, hard_label_weight=0.7, **kw)
    r64, r32 = references(tensors, t2_scale=False, hard_label_weight=0.7, **kw)
    # Liger computes the CE in fp32 whatever the input dtype (fused_linear_distillation.py:57):
    # its float64 loss and gradients are fp32-accurate here, so they get the fp32 rule.
    check_triple("liger + CE", p, r64, r32, torch.float32)
    check_triple("ours + CE", mine, r64, r32, dtype)
    for i in range(3):
        tol = tolerance(r64[i], r32[i], dtype)
        check("ours + CE vs liger + CE", mine[i], p[i], tol, (p[i].double() - r64[i]).abs())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("peer", [trl_chunked, liger_jsd], ids=["trl", "liger"])
def test_leading_dims(backend, peer):
    """(B, K, H) hidden states and (B, K) labels: the peers see the flattened rows."""
    tensors, labels = inputs(torch.float32, lead=(3, 5))
    check_vs_t2_peer("leading dims", peer, backend, tensors, peer_kw("fkl", 0.5, 2.5, labels))


def check_vs_t2_peer(what, peer, backend, tensors, kw):
    """ours (fp32, t2_scale=True) == T²·peer: loss and both student gradients, shapes too."""
    t2 = kw["temperature"] ** 2
    p = evaluate(peer, tensors, **kw)
    mine = evaluate(ours(backend), tensors, **kw)
    r64, r32 = references(tensors, **kw)
    for i in range(3):
        tol = tolerance(r64[i], r32[i], torch.float32)
        assert mine[i].shape == r64[i].shape
        check(f"ours vs T²·peer, {what}", mine[i], t2 * p[i], tol,
              (t2 * p[i].double() - r64[i]).abs())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("peer", [trl_chunked, liger_jsd], ids=["trl", "liger"])
def test_all_rows_dropped(backend, peer):
    """Every label ignore_index: 0 loss, 0 gradients everywhere (all divide by max(1, kept))."""
    tensors, _ = inputs(torch.float32, labels=False)
    labels = torch.full((N,), -100)
    for fn in (peer, ours(backend)):
        loss, gh, gw = evaluate(fn, tensors, **peer_kw("jsd", 0.5, 2.5, labels))
        assert loss.item() == 0.0 and (gh == 0).all() and (gw == 0).all()


# ------------------------------------------------------------------ unequal vocabularies
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("peer", [trl_chunked, liger_jsd], ids=["trl", "liger"])
def test_padded_teacher_vocab(backend, peer):
    """V_t = V + 6 (a teacher head padded for efficiency): ours counts the first min(V_s, V_t)
    columns; the adapters cut both heads to that, so ours == T²·peer, and the student head's
    gradient has the full (V, H_s) shape."""
    tensors, labels = inputs(torch.float32, v_t=V + 6)
    check_vs_t2_peer("padded teacher", peer, backend, tensors, peer_kw("jsd", 0.5, 2.5, labels))


def test_trl_raw_padded_teacher_is_our_contract():
    """Unadapted, TRL already does what our contract says: it iterates over V_s and slices the
    teacher head with the same ranges (chunked_divergence.py:426, 436-437)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss
    (sh, sw, th, tw), labels = inputs(torch.float32, v_t=V + 6)
    raw, _, _ = _chunked_divergence_loss(sh, th, sw, tw, (labels != -100).long(), 0.0,
                                         temperature=2.5)
    expect = _formula(sh.double(), sw.double(), th.double(), tw.double(), labels=labels,
                      kind="fkl", temperature=2.5, t2_scale=False)
    assert abs(raw.item() - expect.item()) < 1e-5 * expect.item()


def test_liger_raw_padded_teacher_differs_on_purpose():
    """Unadapted, Liger pads the student's logits with zeros up to V_t (fused_linear_distillation.py:
    127-136) and keeps the teacher's padding columns. Ours (first min(V_s, V_t) columns, both
    renormalized there) is the right one: the padding columns are no tokens, and a fixed 0 logit
    makes Liger's loss depend on the student's logit offset (adding a constant to every student
    logit, e.g. through the bias, changes it), which no softmax-based divergence may do. The test
    pins Liger's behaviour (= the formula on zero-padded student logits) and that it differs."""
    (sh, sw, th, tw), labels = inputs(torch.float64, v_t=V + 6)
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                 temperature=2.5, compiled=False)
    got = fn(sh, sw, th, tw, labels)
    keep = labels != -100
    zs = torch.cat([sh @ sw.t() / 2.5, torch.zeros(N, 6, dtype=torch.float64)], -1)
    lq, lp = torch.log_softmax(zs, -1), torch.log_softmax(th @ tw.t() / 2.5, -1)
    padded = ((lp.exp() * (lp - lq)).sum(-1)[keep]).sum() / keep.sum()
    assert abs(got.item() - padded.item()) < 1e-6 * padded.item()
    ours_contract = _formula(sh, sw, th, tw, labels=labels, kind="fkl", temperature=2.5,
                             t2_scale=False)
    assert abs(got.item() - ours_contract.item()) > 1e-3 * ours_contract.item()
