"""kdkernels.dac_kl: the reference (the spec) against a brute-force evaluation of the
definition and against forward KL at (0, 1); the kernels (cpu, triton) against the reference
computed in float64: per-row losses and the gradients of the student logits and of both
bounds; ties, −inf entries, bounds on group boundaries, temperatures (both ends of the
accepted range), masks, bad input; the NaN rule (rows without a distribution, NaN row
weights, bad bands and num_items inside compiled graphs); V = 1 and empty batches; double
backward; the bounds head and the combined loss module."""
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

def interpreted(kernel):
    """The Triton interpreter's case: each of its runs costs seconds (one row ~0.3 s)."""
    return kernel.values == ("triton", "cpu")


# The temperature enters the kernels only as the factor 1/T (no branch depends on it): the
# interpreter runs random bands at one of the three (and T = 1e-6, 0.05, 1, 1.5, 2, 10 and 100
# in the tests below); the native backends at all three.
@pytest.mark.parametrize("backend,device,temperature", [
    pytest.param(*kernel.values, temperature, id=f"{temperature}-{kernel.id}")
    for kernel in KERNELS for temperature in (0.5, 1.0, 4.0)
    if temperature == 0.5 or not interpreted(kernel)])
def test_kernels_random_bands(backend, device, temperature):
    check(backend, device, make(seed=int(temperature * 10)), temperature=temperature)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("band", [(0.0, 1.0), (0.0, 0.6), (0.3, 1.0), (0.45, 0.5)])
def test_kernels_fixed_bands(backend, device, band):
    # Rows are independent programs (and every row has the same band here): the interpreter
    # takes 5 of them, not 13; V = 3000 still spans 3 of its 1024-wide blocks.
    s, t, lo, hi = make(n=5 if backend == "triton" and device == "cpu" else 13, v=3000, seed=4)
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
    # Rows are independent programs: the interpreter takes 13 (6 of them tied), not 41.
    check(backend, device, make(n=13 if interp else 41, seed=5, dtype=dtype, ties=True),
          rounding_units=2.0 if interp else 1.0)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_kernels_neg_inf_teacher_and_extreme_temperatures(backend, device):
    s, t, lo, hi = make(n=9, v=700, seed=6)
    t[::2, ::3] = float("-inf")  # tokens the teacher rules out get p̃ = 0
    for temperature in (1e-6, 0.05, 10.0):
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


# ---- the NaN rule -------------------------------------------------------------------------

ALL = [pytest.param("reference", "cpu", id="reference")] + KERNELS


def poisoned_batch():
    """12 rows of 97: clean rows, a row for each way a kept row has no distribution, a row with
    a NaN bound, and a poisoned dropped row (mask False: never read, 0 loss and 0 gradient)."""
    s, t, lo, hi = make(n=12, v=97, seed=20)
    t[1, 5] = float("nan")
    t[2, 7] = float("inf")
    t[3] = float("-inf")
    s[4, 0] = float("nan")
    s[5, 9] = float("inf")
    s[6] = float("-inf")
    t[7, 1] = -float("nan")  # a NaN with its sign bit set
    s[8], t[8], lo[8], hi[8] = float("nan"), float("nan"), 0.9, 0.1  # dropped: anything goes
    lo[9] = float("nan")  # a NaN bound (e.g. from a bounds head fed a NaN teacher row)
    bad = torch.zeros(12, dtype=torch.bool)
    bad[1:8] = bad[9] = True
    mask = torch.ones(12, dtype=torch.bool)
    mask[8] = False
    return (s, t, lo, hi), bad, mask


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_nan_rule_rows_without_a_distribution(backend, device, reduction):
    """A kept row whose teacher or student logits hold NaN or +inf, or are all −inf, or whose
    bound is NaN: NaN loss and NaN in every element of its gradient rows (student and tensor
    bounds); every clean row exact against float64; the poisoned dropped row 0 with zero
    gradient."""
    case, bad, mask = poisoned_batch()
    clean = mask & ~bad

    def run(backend_, device_, dtype=None):
        s, t, lo, hi = case
        s_ = s.to(device_, dtype or s.dtype).detach().requires_grad_()
        lo_ = lo.to(device_).clone().requires_grad_()
        hi_ = hi.to(device_).clone().requires_grad_()
        out = kdkernels.dac_kl(s_, t.to(device_, dtype or t.dtype), lo_, hi_, temperature=2.0,
                               mask=mask.to(device_), reduction=reduction, backend=backend_)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        (out * w.to(device_, out.dtype)).sum().backward()
        return [x.detach().cpu() for x in (out, s_.grad, lo_.grad, hi_.grad)]

    got = run(backend, device)
    want64 = run("reference", "cpu", torch.float64)
    want32 = run("reference", "cpu", torch.float32)
    if reduction == "none":
        assert torch.isnan(got[0][bad]).all() and got[0][8] == 0
        assert_matches(got[0][clean], want64[0][clean], want32[0][clean], torch.float32, "rows")
    else:
        assert torch.isnan(got[0])
    for name, g, w64, w32 in zip(["d_student", "d_lower", "d_upper"], got[1:], want64[1:],
                                 want32[1:]):
        assert torch.isnan(g[bad]).all(), f"{name}: a bad row's gradient is not all NaN"
        assert (g[8] == 0).all(), f"{name}: the dropped row's gradient is not 0"
        assert_matches(g[clean], w64[clean], w32[clean], torch.float32, name)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_kernels_nan_row_weight_gives_nan_row(backend, device):
    """The ops themselves: a kept row with a NaN row weight (how a band or num_items that the
    host could not check reaches them) gives NaN loss, gradient row and bound derivatives,
    whatever its band (even a bad one), including a band inside one tie group (flat: the
    derivatives are 0·w there); the other rows are those of a run with finite weights."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    s = torch.randn(6, 4, generator=torch.Generator().manual_seed(21)).to(device)
    t = probs.log().repeat(6, 1).to(device)
    lo = torch.tensor([0.1, 0.8, 0.6, float("nan"), -4.0, 0.2], dtype=torch.float64, device=device)
    hi = torch.tensor([0.9, 0.9, 0.4, 0.5, 1.5, 0.7], dtype=torch.float64, device=device)
    w = torch.tensor([0.5] * 6, device=device)
    nan_w = w.clone()
    nan_w[1:5] = float("nan")  # row 1: a flat band; rows 2-4: bad bands
    op = torch.ops.kdkernels.dac_kl_fwd_triton if backend == "triton" \
        else torch.ops.kdkernels.dac_kl_fwd
    good_lo, good_hi = lo.clone(), hi.clone()
    good_lo[2:5], good_hi[2:5] = 0.1, 0.9
    ref_rows, ref_gs, ref_gb = [x.cpu() for x in
                                op(s, t, good_lo, good_hi, w, 1.0, False, True, True)]
    rows, gs, gb = [x.cpu() for x in op(s, t, lo, hi, nan_w, 1.0, False, True, True)]
    assert torch.isnan(rows[1:5]).all() and torch.isnan(gs[1:5]).all()
    assert torch.isnan(gb[:, 1:5]).all()
    keep = [0, 5]
    assert torch.equal(rows[keep], ref_rows[keep]) and torch.equal(gs[keep], ref_gs[keep])
    assert torch.equal(gb[:, keep], ref_gb[:, keep])
    assert (ref_gb[:, 1] == 0).all()  # the flat band, with a finite weight
    total, _, _ = op(s, t, lo, hi, nan_w, 1.0, True, False, False)
    assert torch.isnan(total)


# ---- temperatures at the ends of the accepted range ---------------------------------------

def make_tiny_temperature(n=24, v=300, seed=22):
    """Logits spread by a few T = 1e-6 around offsets 0, 1 and 100 (so that x/T is 1e6–1e8
    and its rounding is far coarser than the spread): near-ties that a tiny T resolves."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0.0, 1.0, 100.0]).repeat_interleave(n // 3)[:, None]
    s = offsets + 3e-6 * torch.randn(n, v, generator=g)
    t = offsets + 3e-6 * torch.randn(n, v, generator=g)
    lo = torch.rand(n, generator=g, dtype=torch.float64) * 0.4
    hi = lo + 0.05 + torch.rand(n, generator=g, dtype=torch.float64) * (0.95 - lo)
    return s, t, lo, hi


def _temperature_end_cases():
    """(backend, device, temperature, band, t2_scale): the full product on the native
    backends. t2_scale only sets the rows' weight (T² or 1), so the interpreter runs every band
    at each end with the weight that matters there (1 at T = 1e-6, where the T²-scaled losses
    sit near the tolerance's absolute floor; T² = 1e4 at T = 100) and the other weight with one
    band at each end: 8 of the 12."""
    for kernel in KERNELS:
        for t2_scale in (True, False):
            for band in ("forward_kl", "clipped", "random"):
                for temperature in (1e-6, 100.0):
                    main = t2_scale == (temperature > 1)
                    other = band == ("random" if temperature < 1 else "clipped")
                    if main or other or not interpreted(kernel):
                        yield pytest.param(*kernel.values, temperature, band, t2_scale,
                                           id=f"{t2_scale}-{band}-{temperature}-{kernel.id}")


@pytest.mark.parametrize("backend,device,temperature,band,t2_scale", list(_temperature_end_cases()))
def test_kernels_at_the_temperature_ends(backend, device, temperature, band, t2_scale):
    """T = 1e-6 and T = 100, the ends of P.check_temperature's range: per-row losses and all
    gradients within the tolerance rule of the float64 reference, for (0, 1) (plain forward
    KL), a fixed clipped band and random bands. Without T² too: at T = 1e-6 the T²-scaled
    losses (~1e-11) sit below the rule's absolute floor of 1e-12 only by a factor of 10."""
    n = 12 if backend == "triton" and device == "cpu" else 24  # the interpreter: 4 rows per offset
    s, t, lo, hi = make_tiny_temperature(n=n) if temperature < 1 else make(n=n, v=300, seed=23)
    if band == "forward_kl":
        lo, hi = torch.zeros_like(lo), torch.ones_like(hi)
    elif band == "clipped":
        lo, hi = torch.full_like(lo, 0.2), torch.full_like(hi, 0.7)
    check(backend, device, (s, t, lo, hi), temperature=temperature, t2_scale=t2_scale)


@pytest.mark.parametrize("temperature", [1e-6, 100.0])
def test_reference_at_the_temperature_ends(temperature):
    """The reference itself: in float64 it is the forward KL at (0, 1) (against an independent
    float64 formula), and in float32 it stays close to float64 at both ends: at T = 1e-6 the
    row maximum is subtracted before the division by T (dividing first leaves errors of order 1
    in x/T); at T = 100 the KL is summed without cancellation (the plain Σ p̃·log(p̃/q) errs
    ~3e-3 there)."""
    s, t, lo, hi = make_tiny_temperature() if temperature < 1 else make(n=24, v=300, seed=23)
    s64, t64 = s.double(), t.double()
    log_q = torch.log_softmax((s64 - s64.amax(-1, keepdim=True)) / temperature, -1)
    log_p = torch.log_softmax((t64 - t64.amax(-1, keepdim=True)) / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2
    got = kdkernels.dac_kl(s64, t64, 0.0, 1.0, temperature=temperature, reduction="none")
    torch.testing.assert_close(got, kl, rtol=1e-10, atol=0.0)
    for a, b in ((0.0, 1.0), (0.2, 0.7)):
        got32 = kdkernels.dac_kl(s, t, a, b, temperature=temperature, reduction="none",
                                 backend="reference")
        want = kdkernels.dac_kl(s64, t64, a, b, temperature=temperature, reduction="none")
        torch.testing.assert_close(got32.double(), want, rtol=1e-4,
                                   atol=1e-6 * want.abs().max().item())


def test_temperature_range():
    s, t, lo, hi = make(n=3, v=20)
    for bad_t in (0.0, 9e-7, 100.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"temperature must be a finite number in \[1e-06, 100"):
            kdkernels.dac_kl(s, t, lo, hi, temperature=bad_t)
    for ok_t in (1e-6, 100.0, torch.tensor(2.0)):
        assert torch.isfinite(kdkernels.dac_kl(s, t, lo, hi, temperature=ok_t, backend="reference"))


# ---- bad values that no host check sees: compiled graphs ------------------------------------

COMPILED = [pytest.param(b, d, id=i) for b, d, i in
            [("reference", "cpu", "reference"), ("cpu", "cpu", "cpu")] +
            ([("triton", "cpu", "triton-interp")] if HAS_TRITON and TRITON_ON_CPU else [])]


# The NaN weights come from the traced host code (the same for every backend); the backend's
# op only receives them. The interpreter runs under inductor (which traces through
# AOTAutograd as aot_eager does, then generates code around the op); aot_eager runs on the
# reference and the cpu backend.
@pytest.mark.parametrize("backend,device,compiler", [
    pytest.param(*kernel.values, compiler, id=f"{compiler}-{kernel.id}")
    for kernel in COMPILED for compiler in ("aot_eager", "inductor")
    if compiler == "inductor" or not interpreted(kernel)])
def test_compiled_bad_band_and_num_items_give_nan(backend, device, compiler):
    """Inside torch.compile(fullgraph=True) the eager ValueError checks are skipped: a band
    outside 0 ≤ l < u ≤ 1 (tensor or float bounds) or a num_items ≤ 0 or inf must make the
    affected kept rows NaN, loss and student gradient, never a finite number; clean rows and
    a dropped row with a bad band are as in eager mode."""
    torch._dynamo.reset()
    s, t, lo, hi = make(n=6, v=50, seed=24)
    s, t, lo, hi = s.to(device), t.to(device), lo.to(device), hi.to(device)
    mask = torch.ones(6, dtype=torch.bool, device=device)
    mask[5] = False

    def rows_fn(x, lo_, hi_):
        return kdkernels.dac_kl(x, t, lo_, hi_, mask=mask, reduction="none", backend=backend)

    def mean_fn(x, lo_, hi_, n):
        return kdkernels.dac_kl(x, t, lo_, hi_, mask=mask, num_items=n, backend=backend)

    rows_c = torch.compile(rows_fn, fullgraph=True, backend=compiler)
    mean_c = torch.compile(mean_fn, fullgraph=True, backend=compiler)

    def run(fn, *args):
        x = s.clone().requires_grad_()
        out = fn(x, *args)
        out.sum().backward()
        return out.detach().cpu(), x.grad.cpu()

    want_rows, want_grad = run(rows_fn, lo, hi)
    bad_bands = [("lower > upper", 0, 0.8, 0.3), ("upper > 1", 1, 0.1, 1.5),
                 ("lower < 0", 2, -4.0, 0.5), ("lower = upper", 3, 0.4, 0.4),
                 ("NaN lower", 4, float("nan"), 0.5)]
    for what, row, a, b in bad_bands:
        lo_, hi_ = lo.clone(), hi.clone()
        lo_[row], hi_[row] = a, b
        lo_[5], hi_[5] = b, a  # the dropped row: a bad band too, never read
        got_rows, got_grad = run(rows_c, lo_, hi_)
        assert torch.isnan(got_rows[row]) and torch.isnan(got_grad[row]).all(), what
        others = [i for i in range(6) if i != row]
        torch.testing.assert_close(got_rows[others], want_rows[others], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got_grad[others], want_grad[others], rtol=1e-5, atol=1e-7)
        assert got_rows[5] == 0 and (got_grad[5] == 0).all(), what
    for a, b in ((0.8, 0.3), (0.1, 1.5), (-0.5, 0.5)):  # float bounds: every kept row
        got_rows, got_grad = run(rows_c, a, b)
        assert torch.isnan(got_rows[:5]).all() and torch.isnan(got_grad[:5]).all(), (a, b)
        assert got_rows[5] == 0 and (got_grad[5] == 0).all(), (a, b)
    want_mean, _ = run(mean_fn, lo, hi, torch.tensor(4.0))
    got_mean, _ = run(mean_c, lo, hi, torch.tensor(4.0))
    torch.testing.assert_close(got_mean, want_mean, rtol=1e-5, atol=1e-7)
    for n in map(torch.tensor, (0, -4.0, float("inf"), float("nan"))):
        got_mean, got_grad = run(mean_c, lo, hi, n)
        assert torch.isnan(got_mean), n
        assert torch.isnan(got_grad[:5]).all(), n


def test_eager_checks_of_the_band_and_num_items():
    """The same bad values in eager mode on the CPU: ValueErrors naming the argument; a bad band
    on a dropped row is never read."""
    s, t, lo, hi = make(n=4, v=10)
    for a, b, match in ((torch.full((4,), 0.8, dtype=torch.float64), hi, "lower must be < upper"),
                        (lo, torch.full((4,), 1.5, dtype=torch.float64), r"lie in \[0, 1\]"),
                        (torch.full((4,), float("inf"), dtype=torch.float64), hi, r"lie in \[0, 1\]"),
                        (0.3, 0.2, "lower must be < upper"),
                        (float("nan"), 0.5, r"lower must lie in \[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            kdkernels.dac_kl(s, t, a, b)
    for n in (torch.tensor(0), torch.tensor(-4.0), torch.tensor(float("inf"))):
        with pytest.raises(ValueError, match="num_items"):
            kdkernels.dac_kl(s, t, lo, hi, num_items=n)
    lo_, hi_ = lo.clone(), hi.clone()
    lo_[2], hi_[2] = 0.9, 0.1
    mask = torch.tensor([True, True, False, True])
    for backend in ("reference", "cpu"):
        assert torch.isfinite(kdkernels.dac_kl(s, t, lo_, hi_, mask=mask, backend=backend))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_eager_band_check_by_device(backend, device):
    """Eager mode: a bad tensor band is a ValueError on the CPU; on a GPU it is not read back
    (no host sync), and its row comes out NaN instead, never finite."""
    s, t, lo, hi = make(n=4, v=30, seed=30)
    lo[1], hi[1] = 0.7, 0.2
    args = (s.to(device), t.to(device), lo.to(device), hi.to(device))
    if device == "cpu":
        with pytest.raises(ValueError, match="lower must be < upper"):
            kdkernels.dac_kl(*args, backend=backend)
    else:
        rows = kdkernels.dac_kl(*args, reduction="none", backend=backend).cpu()
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3]]).all()


# ---- degenerate shapes ----------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", ALL)
def test_one_token_vocabulary_strided(backend, device):
    """V = 1 with a non-unit column stride (as divergence accepts): p̃ = q = 1, so the loss and
    the student's gradient are 0; bound derivatives as the float64 reference's."""
    # (7, 1) with stride (1, 7)
    s = torch.randn(3, 7, generator=torch.Generator().manual_seed(25)).t()[:, :1]
    t = torch.randn(3, 7, generator=torch.Generator().manual_seed(26)).t()[:, 1:2]
    assert s.stride(-1) != 1 and t.stride(-1) != 1
    lo = torch.rand(7, generator=torch.Generator().manual_seed(27), dtype=torch.float64) * 0.5
    hi = torch.tensor([0.9, 1.0, 0.6, 1.0, 0.99, 0.7, 1.0], dtype=torch.float64)
    got = check(backend, device, (s, t, lo, hi), temperature=2.0)
    assert (got[0] == 0).all() and (got[1] == 0).all()


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("shape", [(0, 33), (2, 0, 33), (0, 1)])
def test_empty_batch(backend, device, shape):
    """No rows at all: every reduction works (mean 0, sum 0, none shaped like the leading dims),
    and backward gives gradients of the inputs' shapes."""
    for reduction in ("mean", "sum", "none"):
        s = torch.randn(shape, device=device, requires_grad=True)
        lo = torch.zeros(shape[:-1], dtype=torch.float64, device=device, requires_grad=True)
        out = kdkernels.dac_kl(s, torch.randn(shape, device=device), lo, 0.5, reduction=reduction,
                               backend=backend)
        assert out.shape == (() if reduction != "none" else shape[:-1])
        if reduction != "none":
            assert out.item() == 0
        out.sum().backward()
        assert s.grad is not None and s.grad.shape == shape
        assert lo.grad is not None and lo.grad.shape == shape[:-1]


# ---- double backward ------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", KERNELS)
def test_double_backward_raises(backend, device):
    s, t, lo, hi = make(n=3, v=40, seed=28)
    s = s.to(device).requires_grad_()
    loss = kdkernels.dac_kl(s, t.to(device), lo.to(device), hi.to(device), backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_reference_double_backward():
    """The reference is plain autograd: second derivatives work (gradgradcheck)."""
    s, t, lo, hi = make(n=3, v=12, seed=29)
    s = s.double().requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x: kdkernels.dac_kl(x, t.double(), lo, hi, reduction="none", backend="reference"),
        (s,))


@pytest.mark.parametrize("backend,device", KERNELS + [pytest.param("reference", "cpu", id="reference")])
def test_infinite_row(backend, device):
    """A student −inf where the clipped teacher has mass: KL is +inf on every backend, not NaN."""
    s, t, lo, hi = make(n=3, v=20)
    s, t = s.to(device), t.to(device)
    s[1, int(t[1].argmax())] = float("-inf")
    loss = kdkernels.dac_kl(s, t, 0.0, 1.0, reduction="none", backend=backend).cpu()
    assert loss[1] == float("inf") and torch.isfinite(loss[[0, 2]]).all(), loss
