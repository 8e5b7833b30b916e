"""kdkernels.dac_kl: the reference (the spec) against a brute-force evaluation of the
definition and against forward KL at (0, 1); the kernels (cpu, triton) against the reference
computed in float64: per-row losses and the gradients of the student logits and of both
bounds; ties, −inf entries, bounds on group boundaries, temperatures, masks, bad input;
the bounds head and the combined loss module."""
import pytest
import torch

import kdkernels
import kdkernels._extension
from kdkernels.reference.dac_kl import clipped_teacher, dac_kl_rows

from helpers import HAS_CUDA, HAS_TRITON, TRITON_ON_CPU, assert_matches, run_readme_examples

KERNELS = [pytest.param("cpu", "cpu", id="cpu")]
if HAS_TRITON and TRITON_ON_CPU:
    KERNELS.append(pytest.param("triton", "cpu", id="triton-interp"))
if HAS_TRITON and HAS_CUDA:
    KERNELS.append(pytest.param("triton", "cuda", id="triton-cuda"))


def brute_clip(p, lower, upper):
    """One row, ties shared, by walking the distinct values from the top (float64)."""
    out = torch.zeros_like(p)
    c = 0.0
    for value in sorted(set(p.tolist()), reverse=True):
        members = (p == value).nonzero().flatten()
        mass = value * len(members)
        overlap = max(0.0, min(c + mass, upper) - max(c, lower))
        out[members] = overlap / len(members) / (upper - lower)
        c += mass
    return out


def make(n=41, v=1271, seed=0, scale=3.0, dtype=torch.float32, ties=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 2.0
    t = torch.randn(n, v, generator=g) * scale
    if ties:  # rows with only a few distinct logits
        t[: n // 2] = torch.randint(0, 4, (n // 2, v), generator=g).float()
    lo = torch.rand(n, generator=g, dtype=torch.float64) * 0.4
    hi = lo + 0.05 + torch.rand(n, generator=g, dtype=torch.float64) * (0.95 - lo)
    return s.to(dtype), t.to(dtype), lo, hi


def evaluate(backend, s, t, lo, hi, device="cpu", dtype=None, **kw):
    """Per-row losses and the gradients of Σ rows·w (w fixed random) in s, lo and hi."""
    def put(x):
        x = x.to(device)
        return x.to(dtype) if dtype is not None else x

    s_ = put(s).detach().requires_grad_()
    lo_ = lo.to(device).clone().requires_grad_()
    hi_ = hi.to(device).clone().requires_grad_()
    rows = kdkernels.dac_kl(s_, put(t), lo_, hi_, reduction="none", backend=backend, **kw)
    w = torch.randn(rows.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (rows * w.to(rows.device, rows.dtype)).sum().backward()
    return [x.detach().cpu() for x in (rows, s_.grad, lo_.grad, hi_.grad)]


def check(backend, device, case, rounding_units=1.0, **kw):
    got = evaluate(backend, *case, device=device, **kw)
    want64 = evaluate("reference", *case, dtype=torch.float64, **kw)
    want32 = evaluate("reference", *case, dtype=torch.float32, **kw)
    for name, a, b, c in zip(["rows", "d_student", "d_lower", "d_upper"], got, want64, want32):
        dtype = a.dtype if name == "d_student" else torch.float32
        assert_matches(a, b, c, dtype, f"{backend} {name}",
                       rounding_units=rounding_units if name == "d_student" else 1.0)
    return got


# ---- the reference ------------------------------------------------------------------------

def test_reference_is_forward_kl_at_full_band():
    s, t, _, _ = make(n=7, v=50, seed=1)
    s, t = s.double(), t.double()
    for temperature in (0.5, 2.0):
        got = kdkernels.dac_kl(s, t, 0.0, 1.0, temperature=temperature, reduction="none")
        want = kdkernels.divergence(s, t, temperature=temperature, reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_clip_matches_brute_force_with_ties():
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randint(0, 5, (6, 40), generator=g).double(), -1)
    lo = torch.tensor([0.0, 0.1, 0.33, 0.5, 0.0, 0.2], dtype=torch.float64)
    hi = torch.tensor([1.0, 0.7, 0.9, 0.51, 0.3, 1.0], dtype=torch.float64)
    got = clipped_teacher(p, lo, hi)
    for i in range(6):
        torch.testing.assert_close(got[i], brute_clip(p[i], lo[i].item(), hi[i].item()))
    torch.testing.assert_close(got.sum(-1), torch.ones(6, dtype=torch.float64))


def test_reference_gradients_gradcheck_and_finite_differences():
    s, t, lo, hi = make(n=4, v=30, seed=3)
    s = s.double().requires_grad_()
    lo, hi = lo.requires_grad_(), hi.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: dac_kl_rows(a, t.double(), b, c), (s, lo, hi))


# ---- the kernels against the float64 reference --------------------------------------------

@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_kernels_random_bands(backend, device, temperature):
    check(backend, device, make(seed=int(temperature * 10)), temperature=temperature)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("band", [(0.0, 1.0), (0.0, 0.6), (0.3, 1.0), (0.45, 0.5)])
def test_kernels_fixed_bands(backend, device, band):
    s, t, lo, hi = make(n=13, v=3000, seed=4)
    lo, hi = torch.full_like(lo, band[0]), torch.full_like(hi, band[1])
    got = check(backend, device, (s, t, lo, hi), temperature=1.5)
    if band == (0.0, 1.0):  # exactly forward KL (×T²), gradients included
        s_ = s.to(device).requires_grad_()
        kl = kdkernels.divergence(s_, t.to(device), temperature=1.5, reduction="none",
                                  backend=backend)
        torch.testing.assert_close(got[0], kl.detach().cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_16bit_and_ties(backend, device, dtype):
    """16-bit logits (ties are common) and rows of only 4 distinct logits: tied tokens share
    their group's overlap, exactly as the reference's sort-and-group does."""
    interp = backend == "triton" and device == "cpu"
    check(backend, device, make(seed=5, dtype=dtype, ties=True), rounding_units=2.0 if interp else 1.0)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_kernels_neg_inf_teacher_and_extreme_temperatures(backend, device):
    s, t, lo, hi = make(n=9, v=700, seed=6)
    t[::2, ::3] = float("-inf")  # tokens the teacher rules out get p̃ = 0
    for temperature in (0.05, 30.0):
        check(backend, device, (s, t, lo, hi), temperature=temperature)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_kernels_bounds_on_group_boundaries(backend, device):
    """l and u exactly at cumulative masses of the sorted teacher (dyadic probabilities,
    exact in every float type): values agree, and the one-sided derivatives follow the
    reference's convention."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125])
    t = probs.log().repeat(4, 1)
    s = torch.randn(4, 6, generator=torch.Generator().manual_seed(8))
    lo = torch.tensor([0.5, 0.75, 0.0, 0.5], dtype=torch.float64)
    hi = torch.tensor([0.875, 1.0, 0.75, 0.96875], dtype=torch.float64)
    check(backend, device, (s, t, lo, hi))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_kernels_bound_gradients_match_finite_differences(backend, device):
    s, t, lo, hi = make(n=5, v=64, seed=9, scale=1.0)
    rows, _, d_lo, d_hi = evaluate(backend, s, t, lo, hi, device=device)
    h = 1e-4

    def loss_at(l_, h_):
        return kdkernels.dac_kl(s.double(), t.double(), l_, h_, reduction="none").detach()

    w = torch.randn(rows.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fd_lo = ((loss_at(lo + h, hi) - loss_at(lo - h, hi)) / (2 * h)) * w
    fd_hi = ((loss_at(lo, hi + h) - loss_at(lo, hi - h)) / (2 * h)) * w
    # a kink (a group boundary within ±h) makes the central difference an average: skip those
    smooth = torch.isclose(fd_lo, ((loss_at(lo + h / 2, hi) - loss_at(lo - h / 2, hi)) / h) * w, rtol=1e-3)
    assert smooth.sum() >= 3
    torch.testing.assert_close(d_lo.double()[smooth], fd_lo[smooth], rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(d_hi.double(), fd_hi, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kernels_masks_reductions_and_scalar_bounds(backend, device, reduction):
    s, t, _, _ = make(n=12, v=200, seed=10)
    s3, t3 = s.view(3, 4, 200).to(device), t.view(3, 4, 200).to(device)
    labels = torch.randint(0, 200, (3, 4), generator=torch.Generator().manual_seed(1)).to(device)
    labels[1] = -100
    lo = torch.rand(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.3
    lo = lo.to(device).requires_grad_()
    sg = s3.clone().requires_grad_()
    got = kdkernels.dac_kl(sg, t3, lo, 0.8, labels=labels, reduction=reduction, backend=backend)
    want = kdkernels.dac_kl(s3.double(), t3.double(), lo.detach(), 0.8, labels=labels,
                            reduction=reduction)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    got.backward()
    assert (sg.grad[1] == 0).all() and (lo.grad[1] == 0).all() and torch.isfinite(lo.grad).all()
    none = kdkernels.dac_kl(s3, t3, 0.1, 0.9, mask=torch.zeros(3, 4, dtype=torch.bool, device=device),
                            backend=backend)
    assert none.item() == 0


def test_cpu_op_compiles_fullgraph_and_passes_opcheck():
    kdkernels._extension.ensure_loaded()
    s, t, lo, hi = make(n=6, v=90, seed=11)
    s.requires_grad_()
    lo.requires_grad_()

    def fn(a, b):
        return kdkernels.dac_kl(a, t, b, hi, temperature=2.0, backend="cpu")

    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(s, lo), fn(s, lo))
    w = torch.full((6,), 0.5)
    for reduce in (True, False):
        torch.library.opcheck(torch.ops.kdkernels.dac_kl_fwd, (s, t, lo, hi, w, 2.0, reduce, True, True),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_no_sort_on_the_cpu_path():
    """The cpu kernel's hot path never sorts (the profiler sees no sort op; the reference does)."""
    from torch.profiler import profile  # noqa: PLC0415

    s, t, lo, hi = make(n=8, v=4000, seed=12)
    for backend, sorts in (("cpu", False), ("reference", True)):
        with profile() as prof:
            kdkernels.dac_kl(s.requires_grad_(), t, lo, hi, backend=backend).backward()
        names = {e.name for e in prof.events()}
        assert any("sort" in n for n in names) == sorts, (backend, sorted(names))


def test_bad_inputs():
    s, t, lo, hi = make(n=4, v=10)

    def bad(exc, match, **kw):
        args = dict(student_logits=s, teacher_logits=t, lower=lo, upper=hi)
        args.update(kw)
        with pytest.raises(exc, match=match):
            kdkernels.dac_kl(args.pop("student_logits"), args.pop("teacher_logits"),
                             args.pop("lower"), args.pop("upper"), **args)

    bad(ValueError, "lower must be < upper", lower=0.5, upper=0.5)
    bad(ValueError, r"lie in \[0, 1\]", lower=-0.1)
    bad(ValueError, r"lie in \[0, 1\]", upper=1.5)
    bad(ValueError, "shaped like the leading dims", lower=torch.zeros(3, dtype=torch.float64))
    bad(TypeError, "lower must be a float or a tensor", lower="0.1")
    bad(TypeError, "floating tensor", upper=torch.ones(4, dtype=torch.long))
    bad(ValueError, "same shape", teacher_logits=torch.randn(4, 11))
    bad(ValueError, "temperature", temperature=0.0)
    bad(ValueError, "reduction", reduction="batchmean")
    bad(ValueError, "no CUDA C\\+\\+ kernels", backend="cuda")


# ---- the bounds head and the combined module ----------------------------------------------

def test_bounds_head_range_and_gradients():
    head = kdkernels.nn.DACBoundsHead(k=8, width=16)
    t = torch.randn(3, 5, 100) * 4
    lo, hi = head(t)
    assert lo.shape == hi.shape == (3, 5)
    assert (lo >= 0).all() and (hi <= 1).all() and (hi - lo > 0).all()
    with torch.no_grad():  # saturate the parametrization: still 0 ≤ l < u ≤ 1
        for sign in (1e4, -1e4):
            head.mlp[-1].bias.fill_(sign)
            lo, hi = head(t)
            assert (lo >= 0).all() and (hi <= 1).all() and (hi - lo > 0).all()
    head = kdkernels.nn.DACBoundsHead(k=8, width=16)
    loss = kdkernels.nn.DACKLLoss(head=head, temperature=2.0)
    s = torch.randn(3, 5, 100, requires_grad=True)
    loss(s, t).backward()
    assert s.grad is not None and all(p.grad is not None for p in head.parameters())


def test_readme_example_runs():
    """README's DAC-KL example (a student and its bounds head trained together) runs and
    lowers the student's plain KL to the teacher."""
    run_readme_examples("dac-kl-example", expected=1)


def test_second_backward_raises_and_t2_scale():
    s, t, lo, hi = make(n=3, v=40, seed=13)
    s.requires_grad_()
    loss = kdkernels.dac_kl(s, t, lo, hi, temperature=2.0, backend="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same kdkernels loss twice"):
        loss.backward()
    plain = kdkernels.dac_kl(s, t, lo, hi, temperature=2.0, t2_scale=False, backend="cpu")
    torch.testing.assert_close(loss.detach(), 4.0 * plain.detach())


@pytest.mark.parametrize("backend,device", KERNELS)
def test_kernels_large_logits_and_narrow_tail_bands(backend, device):
    """Logits around 1e4 (log q and log p formed from differences to the row maxima, never
    m + log z rounded at 1e4), and narrow bands deep in the tail (the band measured in the
    masses as computed, so p̃ still sums to 1)."""
    s, t, lo, hi = make(n=6, v=2000, seed=14)
    check(backend, device, (s + 1e4, t + 1e4, lo, hi))
    lo, hi = torch.full_like(lo, 0.999), torch.full_like(hi, 0.99901)
    check(backend, device, (s, t, lo, hi))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_kernels_band_inside_one_group_is_flat(backend, device):
    """Both bounds inside one tie group: p̃ = 1/count on it whatever l and u, so both bound
    derivatives are exactly 0 (not (K − m)/(u − l) rounding noise)."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    t = probs.log().repeat(2, 1).to(device)
    s = torch.randn(2, 4, generator=torch.Generator().manual_seed(15)).to(device)
    lo = torch.tensor([0.5, 0.8], dtype=torch.float64, device=device).requires_grad_()
    hi = torch.tensor([0.5000001, 0.9], dtype=torch.float64, device=device).requires_grad_()
    kdkernels.dac_kl(s, t, lo, hi, backend=backend).backward()
    assert (lo.grad == 0).all() and (hi.grad == 0).all()


def test_cpu_row_without_a_distribution_is_nan_not_a_crash():
    """A kept row whose logits are all −inf (or hold +inf or NaN) has no distribution: NaN,
    and nothing is read or written out of bounds."""
    s, t = torch.randn(5, 8), torch.randn(5, 8)
    t[1] = float("-inf")
    t[2, 3] = float("inf")
    t[3, 1] = -float("nan")  # a NaN with its sign bit set
    s[4, 0] = float("nan")
    rows = kdkernels.dac_kl(s, t, 0.1, 0.9, reduction="none", backend="cpu")
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1:]).all()
