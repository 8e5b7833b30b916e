"""kdkernels.divergence: every backend against the float64 reference, forward and gradients;
masks, reductions, odd shapes, numerics, compile/opcheck, and bad input."""
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import kdkernels
from kdkernels import _backend, _plumbing
from kdkernels.reference.divergence import divergence_rows

from helpers import HAS_TRITON, TRITON_ON_CPU, UNIT, assert_matches, kernel_cases

KERNELS = kernel_cases()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Every kind, with the parameter values that matter (end points included).
KIND_SPECS = [
    ("fkl", {}), ("rkl", {}), ("tvd", {}),
    ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}), ("jsd", {"beta": 1.0}),
    ("skew_fkl", {"skew": 0.0}), ("skew_fkl", {"skew": 0.1}), ("skew_fkl", {"skew": 0.5}),
    ("skew_rkl", {"skew": 0.1}), ("skew_rkl", {"skew": 0.7}),
]
SPEC_IDS = [k + "".join(f"-{n}{v}" for n, v in kw.items()) for k, kw in KIND_SPECS]


def logits(shape, dtype, device, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def evaluate(backend, s, t, *, grad_out=None, **kw):
    """Loss and both gradients on `backend` (inputs as given, both requiring grad)."""
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    loss = kdkernels.divergence(s, t, backend=backend, **kw)
    (loss * (1.0 if grad_out is None else grad_out)).sum().backward()
    return loss.detach(), s.grad, t.grad


def reference_results(s, t, grad_out=None, **kw):
    """The reference's (loss, student grad, teacher grad) in float64 and in float32."""
    r64 = evaluate("reference", s.double(), t.double(),
                   grad_out=None if grad_out is None else grad_out.double(), **kw)
    r32 = evaluate("reference", s.float(), t.float(), grad_out=grad_out, **kw)
    # With TAID λ = 0 the target is the (detached) student: the reference's teacher gets no
    # gradient at all (None), the kernels' an exact zero one.
    r64 = tuple(torch.zeros_like(t, dtype=torch.float64) if g is None else g for g in r64)
    r32 = tuple(torch.zeros_like(t, dtype=torch.float32) if g is None else g for g in r32)
    return r64, r32


def check_against_reference(backend, s, t, grad_out=None, refs=None, **kw):
    """backend against the reference; refs: reference_results(s, t, grad_out, **kw) when the
    caller has them already (the same inputs checked on several backends)."""
    out_dtypes = (s.dtype, t.dtype)
    loss, gs, gt = evaluate(backend, s, t, grad_out=grad_out, **kw)
    r64, r32 = reference_results(s, t, grad_out, **kw) if refs is None else refs
    assert loss.dtype == torch.float32
    assert gs.dtype == out_dtypes[0] and gt.dtype == out_dtypes[1]
    units = 2.0 if (backend == "triton" and s.device.type == "cpu") else 1.0  # see assert_matches
    assert_matches(loss.cpu(), r64[0].cpu(), r32[0].cpu(), torch.float32, "loss")
    assert_matches(gs.cpu(), r64[1].cpu(), r32[1].cpu(), out_dtypes[0], "student grad",
                   rounding_units=units)
    assert_matches(gt.cpu(), r64[2].cpu(), r32[2].cpu(), out_dtypes[1], "teacher grad",
                   rounding_units=units)
    return loss, gs, gt


# ------------------------------------------------------------------ the main matrix
# Every kind spec at every temperature, each in one dtype, rotated so that every (kind, dtype)
# and every (temperature, dtype) pair occurs as well, on every backend. The temperature enters
# the kernels only as the factor 1/T (no branch or specialization depends on it) and the dtype
# only through the loads and the one rounding of each output, so the full product (3× the
# cases) repeated the same paths; test_grad_scaler_factor, test_misaligned_rows and
# test_mixed_dtypes test the dtypes further. Rows are independent (one program, or one
# parallel_for item, each): 13 per case, with new logits in every case (676 distinct rows,
# where the full product checked the same 41 in each of its cases).
TEMPERATURES = [0.5, 1.0, 2.0, 4.0]
MAIN_CASES = [pytest.param(kind, params, temperature, DTYPES[(i + j) % len(DTYPES)],
                           100 + 2 * (len(TEMPERATURES) * i + j),
                           id=f"{spec_id}-{temperature}-{DTYPES[(i + j) % len(DTYPES)]}")
              for i, ((kind, params), spec_id) in enumerate(zip(KIND_SPECS, SPEC_IDS))
              for j, temperature in enumerate(TEMPERATURES)]
_main_refs = {}  # the reference's results for the last case, shared by its backends


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("kind,params,temperature,dtype,seed", MAIN_CASES)
def test_matches_reference(backend, device, dtype, temperature, kind, params, seed):
    s = logits((13, 1271), dtype, device, seed=seed)
    t = logits((13, 1271), dtype, device, seed=seed + 1)
    kw = dict(kind=kind, temperature=temperature, **params)
    key = (seed, dtype, device)
    if key not in _main_refs:
        _main_refs.clear()
        _main_refs[key] = reference_results(s, t, **kw)
    check_against_reference(backend, s, t, refs=_main_refs[key], **kw)


# Row selection and reduction are the host's (kdkernels/_plumbing.py: each row's weight, and
# the incoming gradient); the kind is the kernels' mode. Every (reduction, rows) pair, and
# every kind with every reduction and with every row selection: 18 cases, not 54.
REDUCTIONS, ROW_SELECTIONS = ["mean", "sum", "none"], ["labels", "mask", "all"]
REDUCTION_CASES = [pytest.param(reduction, ROW_SELECTIONS[(k + r) % 3], kind,
                                id=f"{kind}-{ROW_SELECTIONS[(k + r) % 3]}-{reduction}")
                   for k, kind in enumerate(kdkernels.KINDS)
                   for r, reduction in enumerate(REDUCTIONS)]


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("reduction,rows,kind", REDUCTION_CASES)
def test_reductions_and_masks(backend, device, reduction, rows, kind):
    s = logits((3, 5, 203), torch.float32, device, seed=3)  # leading dims (3, 5)
    t = logits((3, 5, 203), torch.float32, device, seed=4)
    kw = {}
    g = torch.Generator().manual_seed(5)
    if rows == "labels":
        labels = torch.randint(0, 203, (3, 5), generator=g)
        labels[0, :3] = -100
        labels[2, 4] = -100
        kw["labels"] = labels.to(device)
    elif rows == "mask":
        kw["mask"] = (torch.rand(3, 5, generator=g) > 0.4).to(device)
    grad_out = torch.rand(3, 5, generator=g).to(device) if reduction == "none" else None
    loss, _, _ = check_against_reference(backend, s, t, kind=kind, reduction=reduction,
                                         temperature=2.0, grad_out=grad_out, **kw)
    if reduction == "none":
        assert loss.shape == (3, 5)
        dropped = (kw["labels"] == -100) if rows == "labels" else \
            (~kw["mask"] if rows == "mask" else torch.zeros(3, 5, dtype=torch.bool, device=device))
        assert (loss[dropped] == 0).all()
    else:
        assert loss.shape == ()


def test_mean_is_sum_over_kept_rows():
    s, t = logits((10, 50), torch.float32, "cpu", seed=1), logits((10, 50), torch.float32, "cpu", seed=2)
    labels = torch.tensor([1, -100, 3, 4, -100, 5, 6, 7, 8, -100])
    rows = divergence_rows(s.double(), t.double(), kind="jsd", temperature=2.0)
    keep = labels != -100
    expect = 4.0 * rows[keep].sum() / keep.sum()  # T² = 4
    got = kdkernels.divergence(s, t, kind="jsd", temperature=2.0, labels=labels)
    assert abs(got.item() - expect.item()) < 1e-5 * expect.item()
    got_ni = kdkernels.divergence(s, t, kind="jsd", temperature=2.0, labels=labels, num_items=20)
    assert abs(got_ni.item() - 4.0 * rows[keep].sum().item() / 20) < 1e-5
    got_ni_t = kdkernels.divergence(s, t, kind="jsd", temperature=2.0, labels=labels,
                                    num_items=torch.tensor(20))
    assert abs(got_ni_t.item() - got_ni.item()) < 1e-7
    no_t2 = kdkernels.divergence(s, t, kind="jsd", temperature=2.0, labels=labels, t2_scale=False)
    assert abs(no_t2.item() * 4.0 - got.item()) < 1e-5


@pytest.mark.parametrize("backend,device", KERNELS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_dropped(backend, device, reduction):
    s = logits((4, 300), torch.float32, device).requires_grad_()
    t = logits((4, 300), torch.float32, device).requires_grad_()
    s.data[1] = float("-inf")  # garbage in dropped rows is never read
    labels = torch.full((4,), -100, device=device)
    for kind in kdkernels.KINDS:
        loss = kdkernels.divergence(s, t, kind=kind, labels=labels, reduction=reduction,
                                    backend=backend)
        loss.sum().backward()
        assert (loss == 0).all() and torch.isfinite(loss).all()
        assert (s.grad == 0).all() and (t.grad == 0).all()
        s.grad = t.grad = None


# ------------------------------------------------------------------ shapes and layout
@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("vocab", [1, 2, 15, 16, 17, 1271])
def test_small_and_odd_vocab(backend, device, vocab):
    s = logits((6, vocab), torch.float32, device, seed=7)
    t = logits((6, vocab), torch.float32, device, seed=8)
    for kind in ("fkl", "jsd", "tvd", "skew_rkl"):
        loss, gs, _ = check_against_reference(backend, s, t, kind=kind)
        if vocab == 1:  # one outcome: p = q = 1 (up to fp32 rounding of log-mixtures)
            assert abs(loss.item()) < 1e-7 and gs.abs().max() < 1e-7


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("kind", ["fkl", "jsd", "tvd"])
def test_large_vocab(backend, device, kind):
    v = 262144
    s = logits((2, v), torch.bfloat16, device, seed=9)
    t = logits((2, v), torch.bfloat16, device, seed=10)
    check_against_reference(backend, s, t, kind=kind, temperature=2.0)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_sliced_teacher_and_strided_rows(backend, device):
    v, pad = 1271, 37
    s_full = logits((3, 4, v + 5), torch.float32, device, seed=11)
    t_full = logits((3, 4, v + pad), torch.bfloat16, device, seed=12)
    s, t = s_full[..., :v], t_full[..., :v]  # a padded teacher vocabulary, a strided student
    assert not t.is_contiguous()
    rows = _plumbing.as_rows(t)
    assert rows.data_ptr() == t.data_ptr() and rows.stride() == (v + pad, 1), "sliced rows must not be copied"
    for kind in ("fkl", "rkl", "jsd"):
        loss, gs, gt = check_against_reference(backend, s, t, kind=kind)
        ref = kdkernels.divergence(s.contiguous(), t.contiguous(), kind=kind, backend=backend)
        assert loss.item() == ref.item()
        assert gs.shape == s.shape and gt.shape == t.shape


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_rows(backend, device, dtype, offset):
    """Row starts off the 16-byte grid (a slice starting at column `offset`), V not a multiple
    of any vector width: the vectorized paths must fall back, not read across rows."""
    v = 1000
    s_full = logits((7, v + 8), dtype, device, seed=46)
    t_full = logits((7, v + 8), dtype, device, seed=47)
    s, t = s_full[:, offset:offset + v], t_full[:, offset + 1:offset + 1 + v]
    for kind in ("fkl", "rkl", "jsd", "tvd"):
        check_against_reference(backend, s, t, kind=kind, temperature=2.0)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_mixed_dtypes(backend, device):
    s = logits((9, 500), torch.bfloat16, device, seed=13)
    t = logits((9, 500), torch.float32, device, seed=14)
    for kind in kdkernels.KINDS:
        check_against_reference(backend, s, t, kind=kind, temperature=2.0)


# ---------------------------------------------------------------------- numerics
@pytest.mark.parametrize("backend,device", KERNELS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("kind", kdkernels.KINDS)
def test_neg_inf_in_both(backend, device, kind):
    """A masked vocabulary (−inf at the same entries of both) contributes nothing, finitely."""
    s = logits((8, 400), torch.float32, device, seed=15)
    t = logits((8, 400), torch.float32, device, seed=16)
    s[:, 300:] = float("-inf")
    t[:, 300:] = float("-inf")
    s[3, ::2] = t[3, ::2] = float("-inf")
    loss, gs, gt = check_against_reference(backend, s, t, kind=kind, temperature=0.5)
    assert (gs[:, 300:] == 0).all() and (gt[:, 300:] == 0).all()
    unmasked = kdkernels.divergence(s[:, :300], t[:, :300], kind=kind, temperature=0.5,
                                    backend=backend)
    assert abs(loss.item() - unmasked.item()) <= 1e-5 * abs(unmasked.item()) + 1e-7


@pytest.mark.parametrize("backend,device", KERNELS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("kind", ["fkl", "jsd", "tvd", "skew_fkl", "skew_rkl"])
def test_neg_inf_in_teacher_only(backend, device, kind):
    """p = 0 where q > 0: finite for every kind whose math is (not rkl: KL(q‖p) = ∞)."""
    s = logits((8, 400), torch.float32, device, seed=17)
    t = logits((8, 400), torch.float32, device, seed=18)
    t[:, ::3] = float("-inf")
    check_against_reference(backend, s, t, kind=kind, temperature=2.0)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("temperature", [0.25, 1.0])
@pytest.mark.parametrize("kind", kdkernels.KINDS)
def test_underflowing_tails(backend, device, temperature, kind):
    """Both distributions underflow to 0 in the tail (log-probs far below −104): no NaN."""
    s = logits((6, 600), torch.float32, device, seed=19, scale=1.0)
    t = logits((6, 600), torch.float32, device, seed=20, scale=1.0)
    s[:, 100:] -= 60.0
    t[:, 100:] -= 50.0
    t[:, 50:100] -= 110.0
    check_against_reference(backend, s, t, kind=kind, temperature=temperature, beta=0.3)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("kind", kdkernels.KINDS)
def test_extreme_logits(backend, device, kind):
    s = logits((5, 300), torch.float32, device, seed=21, scale=3000.0).clamp(-1e4, 1e4)
    t = logits((5, 300), torch.float32, device, seed=22, scale=3000.0).clamp(-1e4, 1e4)
    s[0, 0], t[0, 1] = 1e4, -1e4
    check_against_reference(backend, s, t, kind=kind, temperature=0.5)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_identical_distributions(backend, device):
    """p == q: every divergence is 0 and so is the gradient (TVD's subgradient at 0 too)."""
    s = logits((7, 333), torch.float32, device, seed=23)
    for kind in kdkernels.KINDS:
        loss, gs, gt = evaluate(backend, s, s.clone(), kind=kind)
        assert abs(loss.item()) < 1e-6
        assert gs.abs().max() < 1e-7 and gt.abs().max() < 1e-7


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("taid_t", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "skew_fkl"])
def test_taid(backend, device, taid_t, kind):
    s = logits((9, 700), torch.float32, device, seed=24)
    t = logits((9, 700), torch.float32, device, seed=25)
    s[:, -3:] = t[:, -3:] = float("-inf")
    check_against_reference(backend, s, t, kind=kind, taid_t=taid_t, temperature=2.0)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_taid_with_ties(backend, device):
    """s == t at some entries (common with bf16 logits): the teacher's gradient there is λ/T·…"""
    s = logits((5, 300), torch.bfloat16, device, seed=40, scale=1.0)
    t = s.clone()
    t[:, ::2] = logits((5, 150), torch.bfloat16, device, seed=41, scale=1.0)
    check_against_reference(backend, s, t, kind="fkl", taid_t=0.5, temperature=2.0)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_scaler_factor(backend, device, dtype):
    """A GradScaler multiplies the loss by 2^16 (inf in fp16): gradients must be scaled before
    their one rounding, as in eager autograd, so none overflows and the small ones survive."""
    s = logits((512, 64), dtype, device, seed=42)
    t = logits((512, 64), dtype, device, seed=43)
    loss, gs, gt = check_against_reference(backend, s, t, grad_out=torch.tensor(65536.0, device=device))
    ref = evaluate("reference", s.float(), t.float(), grad_out=torch.tensor(65536.0, device=device))
    lost = (gs == 0) & (ref[1].to(dtype) != 0)
    assert not lost.any(), f"{int(lost.sum())} gradients underflowed to 0"


def test_module_taid_per_call():
    s, t = logits((4, 50), torch.float32, "cpu", seed=44), logits((4, 50), torch.float32, "cpu", seed=45)
    m = kdkernels.nn.KLDivLoss(taid_t=0.2, temperature=2.0)
    assert m(s, t, taid_t=0.7) == kdkernels.kl_div(s, t, taid_t=0.7, temperature=2.0)
    assert m(s, t) == kdkernels.kl_div(s, t, taid_t=0.2, temperature=2.0)


def test_taid_target_is_interpolation():
    s = logits((4, 50), torch.float64, "cpu", seed=26)
    t = logits((4, 50), torch.float64, "cpu", seed=27)
    via_taid = kdkernels.divergence(s, t, taid_t=0.25, backend="reference")
    explicit = kdkernels.divergence(s, 0.75 * s + 0.25 * t, backend="reference")
    assert torch.allclose(via_taid, explicit, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind,params", KIND_SPECS, ids=SPEC_IDS)
def test_reference_gradcheck(kind, params):
    s = logits((3, 11), torch.float64, "cpu", seed=28).requires_grad_()
    t = logits((3, 11), torch.float64, "cpu", seed=29).requires_grad_()
    for temperature in (0.5, 2.0):
        fn = lambda a, b: divergence_rows(a, b, kind=kind, temperature=temperature, **params)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (s, t))


def test_reference_known_values():
    """Hand-computable cases pin the reference to the math in the spec."""
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    s, t = q.log(), p.log()
    kl_pq = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_qp = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert abs(divergence_rows(s, t, kind="fkl").item() - kl_pq) < 1e-12
    assert abs(divergence_rows(s, t, kind="rkl").item() - kl_qp) < 1e-12
    assert abs(divergence_rows(s, t, kind="tvd").item() - 0.25) < 1e-12
    m = 0.5 * p + 0.5 * q
    js = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    assert abs(divergence_rows(s, t, kind="jsd", beta=0.5).item() - js.item()) < 1e-12
    r = 0.1 * p + 0.9 * q
    assert abs(divergence_rows(s, t, kind="skew_fkl", skew=0.1).item()
               - (p * (p / r).log()).sum().item()) < 1e-12
    assert divergence_rows(s, t, kind="jsd", beta=0.0).item() == divergence_rows(s, t, kind="fkl").item()
    assert divergence_rows(s, t, kind="jsd", beta=1.0).item() == divergence_rows(s, t, kind="rkl").item()


# --------------------------------------------------------- autograd, compile, opcheck
@pytest.mark.parametrize("backend,device", KERNELS)
def test_incoming_gradient_scales(backend, device):
    s = logits((5, 100), torch.float32, device, seed=30)
    t = logits((5, 100), torch.float32, device, seed=31)
    check_against_reference(backend, s, t, kind="jsd", grad_out=torch.tensor(3.0, device=device))
    check_against_reference(backend, s, t, kind="rkl", reduction="none",
                            grad_out=torch.linspace(-1, 2, 5, device=device))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_no_grad_and_teacher_without_grad(backend, device):
    s = logits((5, 100), torch.float32, device, seed=32)
    t = logits((5, 100), torch.float32, device, seed=33)
    with torch.no_grad():
        a = kdkernels.divergence(s.requires_grad_(), t, backend=backend)
    assert not a.requires_grad
    s.grad = None
    b = kdkernels.divergence(s, t, backend=backend)
    b.backward()
    assert t.grad is None and s.grad is not None and a.item() == b.item()


@pytest.mark.parametrize("backend,device", KERNELS)
def test_second_backward_raises(backend, device):
    s = logits((3, 50), torch.float32, device).requires_grad_()
    loss = kdkernels.divergence(s, logits((3, 50), torch.float32, device, seed=1), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@pytest.mark.parametrize("backend,device", KERNELS + [pytest.param("reference", "cpu", id="reference")])
def test_compile_fullgraph_training_step(backend, device):
    torch.manual_seed(0)
    torch._dynamo.reset()
    head = torch.nn.Linear(16, 301).to(device)
    teacher_head = torch.nn.Linear(16, 301).to(device)
    x = torch.randn(2, 7, 16, device=device)
    labels = torch.randint(0, 301, (2, 7), device=device)
    labels[0, :2] = -100

    def loss_fn(x, labels):
        return kdkernels.divergence(head(x), teacher_head(x).detach(), kind="jsd",
                                    temperature=2.0, labels=labels, backend=backend)

    eager = loss_fn(x, labels)
    eager.backward()
    g_eager = head.weight.grad.clone()
    head.weight.grad = None
    # The usual training-step pattern: the forward and the loss compiled as ONE graph (no
    # graph break: fullgraph=True), the backward compiled by AOTAutograd, run by .backward().
    compiled = torch.compile(loss_fn, fullgraph=True)(x, labels)
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-7)
    assert torch.allclose(head.weight.grad, g_eager, rtol=1e-4, atol=1e-7)


def _op_samples(device):
    s = logits((6, 129), torch.float32, device, seed=34).requires_grad_()
    t = logits((6, 129), torch.bfloat16, device, seed=35).requires_grad_()
    w = torch.tensor([0.5, 0.0, 1.0, 2.0, 0.25, 1.0], device=device)
    for mode, swap, mix, taid, reduce in [(0, False, 0.0, 1.0, True), (0, True, 0.0, 0.5, False),
                                          (1, False, 0.2, 1.0, True), (2, False, 0.3, 1.0, False),
                                          (3, False, 0.0, 1.0, True)]:
        yield (s, t, w, mode, swap, mix, 2.0, taid, reduce, True, True)
        yield (s.detach(), t.detach(), w, mode, swap, mix, 2.0, taid, reduce, False, False)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_opcheck(backend, device):
    kdkernels._extension.ensure_loaded()
    op = torch.ops.kdkernels.divergence_fwd_triton if backend == "triton" \
        else torch.ops.kdkernels.divergence_fwd
    for args in _op_samples(device):
        # test_autograd_registration runs backward twice over one forward, which the
        # hand-over design refuses on purpose (test_second_backward_raises); the rest run.
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))


# -------------------------------------------------------------- API and backends
def test_aliases_and_modules():
    s, t = logits((4, 6, 90), torch.float32, "cpu", seed=36), logits((4, 6, 90), torch.float32, "cpu", seed=37)
    labels = torch.randint(0, 90, (4, 6))
    labels[1] = -100
    base = dict(temperature=2.0)
    assert kdkernels.kl_div(s, t, **base) == kdkernels.divergence(s, t, kind="fkl", **base)
    assert kdkernels.reverse_kl(s, t, **base) == kdkernels.divergence(s, t, kind="rkl", **base)
    assert kdkernels.jsd(s, t, beta=0.2, **base) == kdkernels.divergence(s, t, kind="jsd", beta=0.2, **base)
    assert kdkernels.tvd(s, t, **base) == kdkernels.divergence(s, t, kind="tvd", **base)
    nn = kdkernels.nn
    assert nn.KLDivLoss(**base)(s, t, labels) == kdkernels.kl_div(s, t, labels=labels, **base)
    assert nn.KLDivLoss(reverse=True)(s, t) == kdkernels.reverse_kl(s, t)
    assert nn.JSDLoss(beta=0.3)(s, t) == kdkernels.jsd(s, t, beta=0.3)
    assert nn.TVDLoss()(s, t) == kdkernels.tvd(s, t)
    m = nn.DivergenceLoss("skew_fkl", skew=0.2, reduction="none")
    assert torch.equal(m(s, t), kdkernels.divergence(s, t, kind="skew_fkl", skew=0.2, reduction="none"))
    assert "skew_fkl" in repr(m)
    with pytest.raises(ValueError, match="temperature"):
        nn.JSDLoss(temperature=0)
    with pytest.raises(TypeError, match="labels"):
        nn.KLDivLoss(labels=labels)


def test_auto_backend_choice(monkeypatch):
    dev = torch.device("cpu")
    assert _backend.resolve_backend("auto", dev, (torch.float32, torch.float32)) == "cpu"
    assert _backend.resolve_backend("auto", dev, (torch.float64, torch.float32)) == "reference"
    monkeypatch.setenv("KDKERNELS_BACKEND", "reference")
    assert _backend.resolve_backend("auto", dev, (torch.float32, torch.float32)) == "reference"
    assert _backend.resolve_backend("cpu", dev, (torch.float32, torch.float32)) == "cpu"
    monkeypatch.setenv("KDKERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="KDKERNELS_BACKEND"):
        _backend.resolve_backend("auto", dev, (torch.float32,))


def test_fallback_warns_once_and_is_correct():
    code = (
        "import warnings, torch, kdkernels\n"
        "warnings.simplefilter('always')\n"
        "s, t = torch.randn(4, 50), torch.randn(4, 50)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = kdkernels.divergence(s, t, kind='jsd'); b = kdkernels.divergence(s, t, backend='cpu')\n"
        "msgs = [str(x.message) for x in w if 'kdkernels' in str(x.message)]\n"
        "ref = kdkernels.divergence(s, t, kind='jsd', backend='reference')\n"
        "print(len(msgs), a.item() == ref.item(), msgs[0] if msgs else '')\n")
    package_root = os.path.dirname(os.path.dirname(kdkernels.__file__))  # the kdkernels under test
    env = dict(os.environ, KDKERNELS_DISABLE_EXTENSION="1", PYTHONPATH=package_root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(__file__)).stdout.strip()
    count, same, msg = out.split(" ", 2)
    assert count == "1" and same == "True"
    assert "KDKERNELS_DISABLE_EXTENSION" in msg and "reference" in msg


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(),
                    reason="needs triton installed and no GPU (then CPU tensors are the only ones)")
def test_triton_on_cpu_without_interpreter_is_refused():
    """In a process without TRITON_INTERPRET, backend='triton' on CPU tensors says how to fix it."""
    code = ("import torch, kdkernels\n"
            "try:\n"
            "    kdkernels.divergence(torch.randn(2, 5), torch.randn(2, 5), backend='triton')\n"
            "except ValueError as e:\n"
            "    print('refused:', e)\n")
    package_root = os.path.dirname(os.path.dirname(kdkernels.__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = package_root
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(__file__)).stdout
    assert out.startswith("refused:") and "TRITON_INTERPRET=1" in out


# ---------------------------------------------------------------------- bad input
def _bad(match, exc=ValueError, s=None, t=None, **kw):
    s = torch.randn(4, 10) if s is None else s
    t = torch.randn(4, 10) if t is None else t
    with pytest.raises(exc, match=match):
        kdkernels.divergence(s, t, **kw)


def test_bad_inputs():
    _bad("same shape", s=torch.randn(4, 10), t=torch.randn(4, 12))
    _bad(r"teacher_logits\[\.\.\., :10\]", s=torch.randn(4, 10), t=torch.randn(4, 12))
    _bad("student_logits must be a torch.Tensor", TypeError, s=[[1.0, 2.0]])
    _bad("floating", TypeError, s=torch.ones(4, 10, dtype=torch.long))
    _bad("floating", TypeError, t=torch.ones(4, 10, dtype=torch.int32))
    _bad("V >= 1", s=torch.randn(4, 0), t=torch.randn(4, 0))
    _bad("temperature", temperature=0.0)
    _bad("temperature", temperature=1e-23)  # T² would underflow fp32: every row silently dropped
    _bad("num_items must be a finite number > 0", num_items=torch.tensor(0))
    _bad("temperature", temperature=-1.0)
    _bad("temperature", temperature=float("nan"))
    _bad("temperature", TypeError, temperature="2")
    _bad("beta", beta=1.5)
    _bad("beta", beta=-0.1)
    _bad("skew", skew=1.0)
    _bad("skew", skew=-0.5)
    _bad("taid_t", taid_t=2.0)
    _bad("kind", kind="kl")
    _bad("backend", backend="gpu")
    _bad("reduction", reduction="batchmean")
    _bad("labels must have shape", labels=torch.zeros(5, dtype=torch.long))
    _bad("labels must be an integer", TypeError, labels=torch.zeros(4))
    _bad("mask must have shape", mask=torch.ones(4, 1, dtype=torch.bool))
    _bad("mask must be a bool", TypeError, mask=torch.ones(4))
    _bad("not both", labels=torch.zeros(4, dtype=torch.long), mask=torch.ones(4, dtype=torch.bool))
    _bad("num_items is only used", reduction="sum", num_items=3)
    _bad("num_items", num_items=0)
    _bad("t2_scale", TypeError, t2_scale=1)
    _bad("float64 runs on backend='reference'", TypeError, s=torch.randn(4, 10, dtype=torch.float64),
         backend="cpu")
    _bad("needs CUDA tensors", backend="cuda")
    _bad("ignore_index", TypeError, labels=torch.zeros(4, dtype=torch.long), ignore_index=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_devices_differ():
    _bad("same device", s=torch.randn(4, 10), t=torch.randn(4, 10, device="cuda"))
    _bad("backend='cpu' needs CPU tensors", s=torch.randn(4, 10, device="cuda"),
         t=torch.randn(4, 10, device="cuda"), backend="cpu")


def test_meta_device_is_refused_by_cpu_backend():
    _bad("backend='cpu' needs CPU tensors", s=torch.randn(4, 10, device="meta"),
         t=torch.randn(4, 10, device="meta"), backend="cpu")


# ------------------------------------------------- Triton: the real compiler, no GPU needed
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_kernels_compile_for_gpus():
    """The interpreter runs the kernels here but is lenient; the real Triton compiler (down to
    PTX and a cubin through the ptxas Triton ships) must accept every mode and flag
    combination, for sm_80 and sm_90. Runs in a subprocess: TRITON_INTERPRET must be unset."""
    pytest.importorskip("triton.backends.nvidia")
    script = os.path.join(os.path.dirname(__file__), "compile_triton_kernels.py")
    package_root = os.path.dirname(os.path.dirname(kdkernels.__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = package_root
    # One process per architecture, side by side (each compiles one kernel at a time, so on
    # a machine with two cores the pair takes the time of one).
    procs = {arch: subprocess.Popen([sys.executable, script, arch], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for arch in ("80", "90")}
    try:
        out = {arch: p.communicate(timeout=600) for arch, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for arch, p in procs.items():
        assert p.returncode == 0, out[arch][0][-2000:] + out[arch][1][-3000:]
    assert "compiled 48 variants for sm_80" in out["80"][0]
    assert "compiled 48 variants for sm_90" in out["90"][0]
    assert "compiled 12 mixing-matrix kernels for sm_90" in out["90"][0]


# ------------------------------------------------------------------ hardening: edge semantics
BACKENDS_AND_REF = KERNELS + [pytest.param("reference", "cpu", id="reference")]


def poisoned(device, v=203, seed=60):
    """Rows 0, 3 and 6 clean; 1: a NaN teacher logit, 2: a +inf teacher logit, 4: all −inf
    teacher, 5: a NaN student logit, 7: all −inf student, 8: a NaN in a dropped row."""
    s = logits((9, v), torch.float32, device, seed=seed)
    t = logits((9, v), torch.float32, device, seed=seed + 1)
    t[1, 7] = float("nan")
    t[2, 11] = float("inf")
    t[4] = float("-inf")
    s[5, 0] = float("nan")
    s[7] = float("-inf")
    s[8, 3] = t[8, 4] = float("nan")
    bad = torch.tensor([False, True, True, False, True, True, False, True, False])
    mask = torch.ones(9, dtype=torch.bool)
    mask[8] = False
    return s, t, bad, mask.to(device)


@pytest.mark.parametrize("backend,device", BACKENDS_AND_REF)
@pytest.mark.parametrize("kind,params", KIND_SPECS, ids=SPEC_IDS)
def test_nan_rule(backend, device, kind, params):
    """A kept row with a NaN or +inf logit, or without a distribution, is NaN (loss and every
    gradient element of that row); the clean rows are exact; a dropped row never matters."""
    s, t, bad, mask = poisoned(device)
    kw = dict(kind=kind, temperature=2.0, reduction="none", **params)
    loss, gs, gt = evaluate(backend, s, t, mask=mask, **kw)
    loss, gs, gt, bad = loss.cpu(), gs.cpu(), gt.cpu(), bad.clone()
    assert loss[bad].isnan().all() and gs[bad].isnan().all() and gt[bad].isnan().all()
    assert loss[8] == 0 and (gs[8] == 0).all() and (gt[8] == 0).all()
    clean = ~bad
    clean[8] = False
    idx = clean.nonzero().flatten().to(device)
    r64 = evaluate("reference", s[idx].double(), t[idx].double(), **kw)
    r32 = evaluate("reference", s[idx], t[idx], **kw)
    units = 2.0 if (backend == "triton" and s.device.type == "cpu") else 1.0
    for got, want64, want32, what in zip((loss, gs, gt), r64, r32, ("loss", "gs", "gt")):
        assert_matches(got[clean], want64.cpu(), want32.cpu(), torch.float32, what,
                       rounding_units=units)
    total = kdkernels.divergence(s, t, mask=mask, backend=backend, **{**kw, "reduction": "mean"})
    assert total.isnan()


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("kind", kdkernels.KINDS)
def test_nan_rule_taid_and_one_sided_gradients(backend, device, kind):
    s, t, bad, mask = poisoned(device, v=64, seed=61)
    for grads in ((True, False), (False, True)):
        s_, t_ = s.clone().requires_grad_(grads[0]), t.clone().requires_grad_(grads[1])
        loss = kdkernels.divergence(s_, t_, kind=kind, taid_t=0.6, mask=mask, reduction="none",
                                    backend=backend)
        loss.sum().backward()
        g = (s_ if grads[0] else t_).grad.cpu()
        assert loss.cpu()[bad].isnan().all() and g[bad].isnan().all()
        assert torch.isfinite(loss.cpu()[~bad]).all() and torch.isfinite(g[~bad]).all()


# Temperatures at both ends of the accepted range. At T = 1e-6 logits that differ by ~T (so
# that the distribution is not one-hot) test that the maximum is subtracted before dividing.
@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("end", ["min", "max"])
@pytest.mark.parametrize("kind,params", KIND_SPECS, ids=SPEC_IDS)
def test_temperature_range_ends(backend, device, end, kind, params):
    if end == "min":
        temperature = _plumbing.TEMPERATURE_MIN
        s = 3.0 + logits((7, 301), torch.float32, device, seed=62, scale=2e-6)
        t = 3.0 + logits((7, 301), torch.float32, device, seed=63, scale=2e-6)
    else:
        temperature = _plumbing.TEMPERATURE_MAX
        s = logits((7, 301), torch.float32, device, seed=62, scale=1.0)
        t = logits((7, 301), torch.float32, device, seed=63, scale=1.0)
    check_against_reference(backend, s, t, kind=kind, temperature=temperature,
                            reduction="none", **params)


@pytest.mark.parametrize("kind,params", KIND_SPECS, ids=SPEC_IDS)
def test_reference_is_exact_at_the_largest_temperature(kind, params):
    """The fp32 reference (the spec, and the yardstick of the tolerance rule) stays within
    1e-5 of float64 at T = 100 on unit-normal logits; the plain Σ p·log(p/q) errs ~3e-3 there."""
    s = logits((8, 1003), torch.float32, "cpu", seed=69, scale=1.0)
    t = logits((8, 1003), torch.float32, "cpu", seed=70, scale=1.0)
    kw = dict(kind=kind, temperature=_plumbing.TEMPERATURE_MAX, **params)
    want = divergence_rows(s.double(), t.double(), **kw)
    got = divergence_rows(s, t, **kw)
    assert ((got.double() - want).abs() / want.abs()).max() < 1e-5


def test_temperature_outside_range_is_refused():
    _bad(r"temperature must be a finite number in \[1e-06, 100.0\]", temperature=100.5)
    _bad("temperature", temperature=1e4)
    _bad("temperature", temperature=0.9e-6)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("kind", ["jsd", "skew_fkl", "skew_rkl"])
def test_large_logits_at_large_temperature(backend, device, kind):
    """|logits| up to 1e4 at the largest T: the mixtures keep fp32 PyTorch's precision."""
    s = logits((5, 300), torch.float32, device, seed=64, scale=3000.0).clamp(-1e4, 1e4)
    t = logits((5, 300), torch.float32, device, seed=65, scale=3000.0).clamp(-1e4, 1e4)
    check_against_reference(backend, s, t, kind=kind, temperature=_plumbing.TEMPERATURE_MAX,
                            reduction="none")


@pytest.mark.parametrize("backend,device", BACKENDS_AND_REF)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_rows(backend, device, reduction):
    """N = 0: a 0 loss (empty for 'none') and (0, V) zero gradients, on every backend."""
    s = torch.zeros(0, 7, device=device, requires_grad=True)
    t = torch.zeros(0, 7, device=device, requires_grad=True)
    loss = kdkernels.divergence(s, t, reduction=reduction, backend=backend)
    assert loss.shape == ((0,) if reduction == "none" else ())
    loss.sum().backward()
    assert s.grad is not None and s.grad.shape == (0, 7)
    assert t.grad is not None and t.grad.shape == (0, 7)
    if reduction != "none":
        assert loss.item() == 0


@pytest.mark.parametrize("backend,device", KERNELS)
def test_double_backward_is_refused(backend, device):
    s = logits((3, 20), torch.float32, device).requires_grad_()
    t = logits((3, 20), torch.float32, device)
    loss = kdkernels.divergence(s, t, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_double_backward_on_the_reference():
    """The reference is plain autograd: second derivatives work there (Hessian-vector)."""
    s = logits((3, 20), torch.float64, "cpu").requires_grad_()
    t = logits((3, 20), torch.float64, "cpu")
    (g,) = torch.autograd.grad(kdkernels.divergence(s, t, backend="reference"), s,
                               create_graph=True)
    (hv,) = torch.autograd.grad(g.sum(), s)
    assert torch.isfinite(hv).all() and hv.abs().max() > 0


def test_argument_types():
    s, t = logits((4, 10), torch.float32, "cpu"), logits((4, 10), torch.float32, "cpu")
    want = kdkernels.divergence(s, t, temperature=2.0)
    assert kdkernels.divergence(s, t, temperature=torch.tensor(2)) == want  # 0-dim int tensor
    assert kdkernels.divergence(s, t, temperature=torch.tensor(2.0)) == want
    labels = torch.tensor([1, -100, 2, 3])
    with_labels = kdkernels.divergence(s, t, labels=labels)
    import numpy as np  # noqa: PLC0415
    assert kdkernels.divergence(s, t, labels=labels, ignore_index=np.int64(-100)) == with_labels
    assert kdkernels.divergence(s, t, labels=labels, ignore_index=torch.tensor(-100)) == with_labels
    assert kdkernels.divergence(s, t, num_items=torch.tensor(8)) == \
        kdkernels.divergence(s, t, num_items=8)
    _bad("num_items must be a finite number > 0", num_items=torch.tensor(float("inf")))
    _bad("num_items must be a finite number > 0", num_items=torch.tensor(float("nan")))
    _bad("num_items must be a finite number > 0", num_items=torch.tensor(-4.0))
    _bad("num_items", num_items=float("inf"))
    _bad("num_items must be a real", TypeError, num_items=torch.tensor(True))
    _bad("requires grad", TypeError, temperature=torch.tensor(2.0, requires_grad=True))
    _bad("ignore_index must be an int", TypeError, labels=labels, ignore_index=True)


def test_empty_backend_variable_means_unset(monkeypatch):
    s, t = logits((4, 10), torch.float32, "cpu"), logits((4, 10), torch.float32, "cpu")
    monkeypatch.setenv("KDKERNELS_BACKEND", "")
    assert _backend.resolve_backend("auto", s.device, (s.dtype,)) in ("cpu", "reference")
    kdkernels.divergence(s, t)
    monkeypatch.setenv("KDKERNELS_BACKEND", "bogus")
    _bad("KDKERNELS_BACKEND")


@pytest.mark.parametrize("backend", ["cpu", "reference"] + (["triton"] if HAS_TRITON and TRITON_ON_CPU
                                                             else []))
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_bad_num_items_is_nan(backend, compiler):
    """Inside a compiled graph the eager ValueError cannot be raised: the loss is NaN instead."""
    s = logits((4, 10), torch.float32, "cpu").requires_grad_()
    t = logits((4, 10), torch.float32, "cpu")

    def step(s, t, n):
        return kdkernels.divergence(s, t, num_items=n, backend=backend)

    fn = torch.compile(step, fullgraph=True, backend=compiler)
    good = fn(s, t, torch.tensor(8.0))
    torch.testing.assert_close(good, step(s, t, torch.tensor(8.0)))
    for n in (0.0, -4.0, float("inf"), float("nan")):
        assert fn(s, t, torch.tensor(n)).isnan(), n


@pytest.mark.parametrize("backend,device", BACKENDS_AND_REF)
def test_genuinely_infinite_rows(backend, device):
    """rkl where the teacher is −inf and the student is not (fkl: the other way round) is +inf
    on every backend, not NaN: −inf entries are valid, and the cancellation-free sum keeps it."""
    for kind, side in (("rkl", "teacher"), ("fkl", "student")):
        s = logits((3, 50), torch.float32, device, seed=71)
        t = logits((3, 50), torch.float32, device, seed=72)
        (t if side == "teacher" else s)[1, 4] = float("-inf")
        loss = kdkernels.divergence(s, t, kind=kind, reduction="none", backend=backend).cpu()
        assert loss[1] == float("inf") and torch.isfinite(loss[[0, 2]]).all(), (kind, loss)
