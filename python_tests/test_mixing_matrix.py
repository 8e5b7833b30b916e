"""kdkernels.mixing_matrix_loss (MOHAWK stage 1): the tiled kernels against the reference
computed in float64, loss and the gradients of C, B, log_decay and D; the reference itself
against an element-by-element evaluation of the definition; bad input."""
import math

import pytest
import torch

import kdkernels
import kdkernels._extension
from kdkernels.mixing_matrix import SCALE_MAX
from kdkernels.reference.mixing_matrix import mixing_matrix_loss_per_head, student_mixer

from helpers import HAS_CUDA, HAS_TRITON, TRITON_ON_CPU, assert_matches, run_readme_examples

KERNELS = [pytest.param("cpu", "cpu", id="cpu")]
if HAS_TRITON and TRITON_ON_CPU:
    KERNELS.append(pytest.param("triton", "cpu", id="triton-interp"))
if HAS_TRITON and HAS_CUDA:
    KERNELS.append(pytest.param("triton", "cuda", id="triton-cuda"))
# Every backend, the reference (the spec, and the fallback without the extension) included.
BACKENDS = [pytest.param("reference", "cpu", id="reference")] + KERNELS


def make_inputs(batch=1, t=64, heads=4, groups=2, dim=16, n=16, decay="moderate", seed=0,
                dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, t, heads, dim, generator=g)
    k = torch.randn(batch, t, heads, dim, generator=g)
    C = torch.randn(batch, t, groups, n, generator=g) / math.sqrt(n)
    B = torch.randn(batch, t, groups, n, generator=g)
    rate = {"strong": 3.0, "moderate": 0.1, "weak": 1e-4}[decay]
    log_decay = -torch.rand(batch, t, heads, generator=g) * rate
    D = torch.randn(heads, generator=g)
    return [x.to(dtype) for x in (q, k, C, B, log_decay, D)]


def lse_of(q, k, scale):
    """The teacher's causal row log-sum-exps (batch, H, T), in q's dtype (float64 math)."""
    t = q.shape[1]
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * scale
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.logsumexp(scores.masked_fill(~causal, float("-inf")), dim=-1).to(q.dtype)


def evaluate(backend, q, k, C, B, log_decay, D, grad_out=None, **kw):
    C, B, log_decay = (x.detach().clone().requires_grad_() for x in (C, B, log_decay))
    D = None if D is None else D.detach().clone().requires_grad_()
    loss = kdkernels.mixing_matrix_loss(q, k, C, B, log_decay, D, backend=backend, **kw)
    (loss * (1.0 if grad_out is None else grad_out)).sum().backward()
    return [loss.detach(), C.grad, B.grad, log_decay.grad] + ([D.grad] if D is not None else [])


def check(backend, inputs, device="cpu", strict=False, **kw):
    """backend on `device` against the reference on CPU (float64, and float32 for the tolerance).
    strict: the reference backend is held to its output's rounding (+ 1e-6 of the scale), not
    to its own fp32 error (which would pass it whatever it computes)."""
    on_device = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    got = evaluate(backend, *[None if x is None else x.to(device) for x in inputs], **on_device)
    got = [g.cpu() for g in got]
    r64 = evaluate("reference", *[None if x is None else x.double() for x in inputs], **kw)
    r32 = evaluate("reference", *[None if x is None else x.float() for x in inputs], **kw)
    if strict and backend == "reference":
        r32 = [None] * len(r32)
    names = ["loss", "dC", "dB", "dlog_decay", "dD"]
    for name, a, b, c in zip(names, got, r64, r32):
        assert a.shape == b.shape, name
        if a.numel():  # (assert_matches needs values)
            out_dtype = torch.float32 if name == "loss" else a.dtype
            assert_matches(a, b, c, out_dtype, name)
    return got


def _interpreted(kernel):
    return kernel.values == ("triton", "cpu")


def _shape_cases():
    """(backend, device, T) for test_shapes. T = 1024 (8 of the cpu kernel's 128-token tiles,
    16 of Triton's 64-row blocks) runs on every backend but the Triton interpreter, where
    T = 257 (5 blocks, the last one row: the multi-block forward, rows and columns walks)
    takes the same loops."""
    for kernel in KERNELS:
        for t in (1, 7, 64, 257, 1024):
            if not (_interpreted(kernel) and t > 257):
                yield pytest.param(*kernel.values, t, id=f"{t}-{kernel.id}")


@pytest.mark.parametrize("backend,device,t", list(_shape_cases()))
@pytest.mark.parametrize("heads,groups", [(1, 1), (4, 1), (4, 4)])
def test_shapes(backend, device, t, heads, groups):
    check(backend, make_inputs(batch=2, t=t, heads=heads, groups=groups, seed=t), device)


# (dim, n), decay, squared, with_d: the full product on the native backends; on the Triton
# interpreter a covering set holding every pair of option values (6 cases, not 24). Only the
# widths change the Triton kernels' code (compile-time tile shapes); decay is log_decay's
# values, squared the host's loss (√S or S) and backward coefficient (1/L or 2), and without
# D the launcher passes D = 0.
OPTION_VALUES = [[(16, 64), (64, 16)], ["strong", "moderate", "weak"], [False, True], [False, True]]
OPTION_PAIRS = [((16, 64), "strong", False, False), ((16, 64), "moderate", True, True),
                ((16, 64), "weak", False, True), ((64, 16), "strong", True, True),
                ((64, 16), "moderate", False, False), ((64, 16), "weak", True, False)]


def _option_cases():
    import itertools  # noqa: PLC0415

    for kernel in KERNELS:
        combos = OPTION_PAIRS if _interpreted(kernel) else itertools.product(*OPTION_VALUES)
        for (dim, n), decay, squared, with_d in combos:
            yield pytest.param(*kernel.values, dim, n, decay, squared, with_d,
                               id=f"{with_d}-{squared}-{decay}-{dim}-{n}-{kernel.id}")


@pytest.mark.parametrize("backend,device,dim,n,decay,squared,with_d", list(_option_cases()))
def test_options(backend, device, dim, n, decay, squared, with_d):
    inputs = make_inputs(t=300, dim=dim, n=n, decay=decay, seed=1)
    if not with_d:
        inputs[5] = None
    check(backend, inputs, device, squared=squared)


# The reductions are the host's (kdkernels/mixing_matrix.py: a sum or a mean of the kernels'
# (batch, H) losses); to the kernels they are only the incoming gradient, which "none" with a
# random one per unit covers: the Triton interpreter runs that one.
@pytest.mark.parametrize("backend,device,reduction", [
    pytest.param(*kernel.values, reduction, id=f"{reduction}-{kernel.id}")
    for kernel in KERNELS for reduction in ("mean", "sum", "none")
    if reduction == "none" or not _interpreted(kernel)])
def test_reductions_and_teacher_lse(backend, device, reduction):
    q, k, C, B, ld, D = make_inputs(batch=2, t=270, seed=2)
    scale = 0.3
    lse = lse_of(q.double(), k.double(), scale)  # (batch, H, T)
    grad_out = torch.rand(2, 4) if reduction == "none" else None
    with_lse = check(backend, [q, k, C, B, ld, D], device, scale=scale, teacher_lse=lse.float(),
                     reduction=reduction, grad_out=grad_out)
    without = check(backend, [q, k, C, B, ld, D], device, scale=scale, reduction=reduction,
                    grad_out=grad_out)
    assert with_lse[0].shape == ((2, 4) if reduction == "none" else ())
    torch.testing.assert_close(with_lse[0], without[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_bf16_inputs(backend, device):
    check(backend, make_inputs(t=257, dtype=torch.bfloat16, seed=3), device)


@pytest.mark.parametrize("step", [None, -1e7, -1e30, float("-inf")])
def test_reference_matches_definition(step):
    """M and the loss element by element, straight from the issue's formulas; with a huge
    step (or −inf) in log_decay, the decay of every segment across it is exactly 0."""
    q, k, C, B, ld, D = (x.double() for x in make_inputs(batch=1, t=9, heads=2, groups=1, dim=4, n=3, seed=4))
    if step is not None:
        ld[0, 4, 1] = step
        ld[0, 7, 0] = step
    m = student_mixer(C, B, ld, D)
    for h in range(2):
        for i in range(9):
            for j in range(9):
                want = 0.0 if j > i else float(C[0, i, 0] @ B[0, j, 0]) * math.exp(float(ld[0, j + 1:i + 1, h].sum()))
                want += float(D[h]) if i == j else 0.0
                assert abs(m[0, h, i, j].item() - want) < 1e-12
    a = torch.softmax((torch.einsum("bihd,bjhd->bhij", q, k) / 2.0).masked_fill(
        ~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf")), -1)
    want = ((m - a) ** 2).sum((-2, -1)).sqrt()
    torch.testing.assert_close(mixing_matrix_loss_per_head(q, k, C, B, ld, D), want, rtol=1e-12, atol=0)


EMPTY = {"batch0": dict(batch=0), "t0": dict(t=0), "batch0-t0": dict(batch=0, t=0),
         "h0": dict(heads=0, groups=1), "h0-g2": dict(heads=0, groups=2)}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", list(EMPTY))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty(backend, device, shape, reduction):
    """No unit, or units of 0×0 matrices: loss 0 ("none": (batch, H) zeros), zero gradients
    of the inputs' shapes."""
    size = dict(batch=2, t=5, heads=4, groups=2) | EMPTY[shape]
    q, k, C, B, ld, D = make_inputs(**size, seed=12)
    for squared in (False, True):
        for lse in (None, lse_of(q, k, 0.25)):
            kw = dict(scale=0.25, squared=squared, teacher_lse=lse, reduction=reduction)
            got = evaluate(backend, *(x.to(device) for x in (q, k, C, B, ld, D)),
                           **{n: (v.to(device) if isinstance(v, torch.Tensor) else v)
                              for n, v in kw.items()})
            want = (size["batch"], size["heads"]) if reduction == "none" else ()
            assert got[0].shape == want
            assert (got[0] == 0).all()
            for grad, x in zip(got[1:], (C, B, ld, D)):
                assert grad is not None and grad.shape == x.shape and (grad == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_state_dim(backend, device):
    """N = 0: C·Bᵀ = 0, so M = D on the diagonal."""
    check(backend, make_inputs(batch=2, t=70, n=0, seed=13), device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("step", [-1e7, -1e30, float("-inf")])
@pytest.mark.parametrize("squared", [False, True])
def test_huge_decay_steps(backend, device, step, squared):
    """Steps whose decay is 0 (to float64 precision, or exactly for −inf), across tiles, two in
    one head, one at t = 0 (which no segment reads): every backend exact against float64,
    gradients finite."""
    inputs = make_inputs(batch=2, t=150, seed=9)
    ld = inputs[4]
    for b, i, h in ((0, 0, 0), (0, 70, 1), (1, 149, 2), (1, 30, 3), (1, 100, 3), (0, 64, 2)):
        ld[b, i, h] = step
    check(backend, inputs, device, strict=True, squared=squared)


def test_huge_decay_steps_are_the_limit():
    """In float64, a step of −1e7 or −1e30 and a −inf step give the same loss and gradients
    (exp underflows to exactly 0 across them): the reference cancels nothing."""
    inputs = [x.double() for x in make_inputs(batch=2, t=40, seed=14)]
    results = []
    for step in (-1e7, -1e30, float("-inf")):
        ld = inputs[4].clone()
        ld[0, 20, 1] = ld[1, 3, 0] = step
        results.append(evaluate("reference", *inputs[:4], ld, inputs[5], reduction="none"))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# A bad value read by unit (batch 1, head 2), of group 1 (H = 4, G = 2): input, index, value.
# One in C or B is read by both heads of the group, one in D by head 2 of every batch element.
BAD = {
    "q-nan": ("q", (1, 3, 2, 0), float("nan")),
    "k-inf": ("k", (1, 0, 2, 5), float("inf")),
    "k-neginf": ("k", (1, 19, 2, 1), float("-inf")),
    "C-nan": ("C", (1, 7, 1, 2), float("nan")),
    "C-inf": ("C", (1, 12, 1, 0), float("inf")),
    "B-neginf": ("B", (1, 19, 1, 3), float("-inf")),
    "log_decay-nan": ("log_decay", (1, 11, 2), float("nan")),
    "log_decay-nan-t0": ("log_decay", (1, 0, 2), float("nan")),
    "D-inf": ("D", (2,), float("inf")),
    "teacher_lse-nan": ("teacher_lse", (1, 2, 4), float("nan")),
    "teacher_lse-neginf": ("teacher_lse", (1, 2, 9), float("-inf")),
}
NAMES = ("q", "k", "C", "B", "log_decay", "D")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", list(BAD))
def test_nan_rule(backend, device, case):
    """A NaN or ±inf in a (batch, head) unit's inputs: its loss NaN, and NaN in every gradient
    element it contributes to (C, B of its batch element and group, log_decay of the unit,
    D of its head); every other unit and gradient element exact."""
    name, index, value = BAD[case]
    q, k, C, B, ld, D = make_inputs(batch=2, t=20, seed=10)
    clean = dict(zip(NAMES, (q, k, C, B, ld, D)), teacher_lse=lse_of(q, k, 0.25))
    dirty = {n: v.clone() for n, v in clean.items()}
    dirty[name][index] = value
    grad_out = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))

    def run(backend, values, device="cpu", dtype=None):
        v = {n: x.to(device=device, dtype=dtype or x.dtype) for n, x in values.items()}
        return evaluate(backend, *(v[n] for n in NAMES), grad_out=grad_out.to(device),
                        scale=0.25, teacher_lse=v["teacher_lse"], reduction="none")

    got = [g.cpu() for g in run(backend, dirty, device)]
    r64, r32 = run("reference", clean, dtype=torch.float64), run("reference", clean)
    bad = torch.zeros(2, 4, dtype=torch.bool)
    bad[1, 2] = True
    if name == "D":  # read by head 2 of every batch element
        bad[:, 2] = True
    if name in ("C", "B"):  # read by both heads of group 1
        bad[1, 3] = True
    groups = bad.view(2, 2, 2).any(2)  # (batch, G)
    scopes = [bad, groups[:, None, :, None].expand_as(C), groups[:, None, :, None].expand_as(B),
              bad[:, None, :].expand_as(ld), bad.any(0)]
    for what, a, b, c, scope in zip(["loss", "dC", "dB", "dlog_decay", "dD"], got, r64, r32, scopes):
        assert a[scope].isnan().all(), f"{what}: not NaN where the bad unit contributes"
        assert_matches(a[~scope], b[~scope], c[~scope], torch.float32, what)
    v = {n: x.to(device) for n, x in dirty.items()}
    total = kdkernels.mixing_matrix_loss(*(v[n] for n in NAMES), scale=0.25,
                                         teacher_lse=v["teacher_lse"], backend=backend)
    assert total.isnan()


@pytest.mark.parametrize("backend,device", KERNELS)
def test_compiled_positive_log_decay_is_nan(backend, device):
    """Inside a compiled graph log_decay > 0 cannot be refused on the host: the unit holding it
    is NaN (loss and gradient contributions), the others exact."""
    torch._dynamo.reset()
    q, k, C, B, ld, D = (x.to(device) for x in make_inputs(batch=2, t=20, seed=15))
    dirty = ld.clone()
    dirty[1, 5, 2] = 0.5

    def fn(C, ld):
        return kdkernels.mixing_matrix_loss(q, k, C, B, ld, D, reduction="none", backend=backend)

    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f, x in ((compiled, dirty), (fn, ld)):
        c, l = C.clone().requires_grad_(), x.clone().requires_grad_()
        loss = f(c, l)
        loss.sum().backward()
        results.append((loss.detach().cpu(), c.grad.cpu(), l.grad.cpu()))
    (loss, dc, dld), (want, want_dc, want_dld) = results
    assert loss[1, 2].isnan() and dc[1, :, 1].isnan().all() and dld[1, :, 2].isnan().all()
    loss[1, 2], dc[1, :, 1], dld[1, :, 2] = want[1, 2], want_dc[1, :, 1], want_dld[1, :, 2]
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dc, want_dc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dld, want_dld, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale", [1e-30, SCALE_MAX])
def test_scale_range_ends(backend, device, scale):
    """The smallest and largest softmax scales accepted: exact against float64."""
    check(backend, make_inputs(batch=2, t=70, seed=11), device, scale=scale)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_double_backward_refused(backend, device):
    q, k, C, B, ld, D = (x.to(device) for x in make_inputs(t=8, seed=16))
    C.requires_grad_()
    loss = kdkernels.mixing_matrix_loss(q, k, C, B, ld, D, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, C, create_graph=True)


def test_reference_gradgradcheck():
    """The reference backend (plain autograd) supports double backward."""
    q, k, C, B, ld, D = (x.double() for x in make_inputs(batch=1, t=5, heads=2, groups=1, dim=4, n=3, seed=17))

    def fn(c, l, d):
        return kdkernels.mixing_matrix_loss(q, k, c, B, l, d, backend="reference")

    assert torch.autograd.gradgradcheck(fn, tuple(x.requires_grad_() for x in (C, ld, D)))


def test_reference_gradcheck():
    q, k, C, B, ld, D = (x.double() for x in make_inputs(batch=1, t=6, heads=2, groups=1, dim=4, n=3, seed=5))
    fn = lambda c, b, l, d: mixing_matrix_loss_per_head(q, k, c, b, l, d)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(x.requires_grad_() for x in (C, B, ld, D)))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_compile_training_step(backend, device):
    torch._dynamo.reset()
    q, k, C, B, ld, D = (v.to(device) for v in make_inputs(t=70, seed=6))
    proj = torch.nn.Linear(16, 16).to(device)
    x = torch.randn(1, 70, 2, 16, device=device)

    def step(x):
        return kdkernels.mixing_matrix_loss(q, k, proj(x) / 4, B, ld, D, backend=backend)

    eager = step(x)
    eager.backward()
    g = proj.weight.grad.clone()
    proj.weight.grad = None
    compiled = torch.compile(step, fullgraph=True)(x)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(proj.weight.grad, g, rtol=1e-4, atol=1e-6)


def test_module():
    q, k, C, B, ld, D = make_inputs(t=20, seed=8)
    m = kdkernels.nn.MixingMatrixLoss(squared=True, reduction="sum")
    assert m(q, k, C, B, ld, D) == kdkernels.mixing_matrix_loss(q, k, C, B, ld, D, squared=True,
                                                               reduction="sum")
    assert "squared=True" in repr(m)


def test_bad_inputs():
    q, k, C, B, ld, D = make_inputs(t=8)

    def bad(exc, match, **over):
        args = dict(q=q, k=k, C=C, B=B, log_decay=ld, D=D)
        kw = {n: over.pop(n) for n in list(over) if n not in args}
        args.update(over)
        with pytest.raises(exc, match=match):
            kdkernels.mixing_matrix_loss(*args.values(), **kw)

    bad(ValueError, "k must have q's shape", k=k[:, :, :2])
    bad(ValueError, "divisible", C=torch.randn(1, 8, 3, 16), B=torch.randn(1, 8, 3, 16))
    bad(ValueError, "B must have C's shape", B=B[..., :4])
    bad(ValueError, r"log_decay must be <= 0.*max is 0\.5", log_decay=ld.clone().fill_(0.5))
    bad(ValueError, "log_decay must be", log_decay=ld[:, :4])
    bad(ValueError, r"D must be \(H,\)", D=torch.randn(3))
    bad(ValueError, "teacher_lse must be", teacher_lse=torch.randn(1, 4, 7))
    bad(TypeError, "floating", C=torch.ones(1, 8, 2, 16, dtype=torch.long))
    bad(ValueError, r"\(batch, T, H, d\)", q=q[0], k=k[0])
    for scale in (-1.0, 0.0, float("nan"), float("inf"), SCALE_MAX * 1.01):
        bad(ValueError, "scale must be a finite number", scale=scale)
    bad(TypeError, "scale", scale="0.1")
    bad(TypeError, "scale is a constant", scale=torch.tensor(0.1, requires_grad=True))
    bad(TypeError, "squared must be a bool", squared=1)
    bad(ValueError, "reduction", reduction="batchmean")
    bad(ValueError, "no CUDA C\\+\\+ kernels", backend="cuda")
    bad(ValueError, "backend", backend="gpu")
    bad(ValueError, r"log_decay must be <= 0.*max is inf", log_decay=ld.clone().fill_(float("inf")))
    bad(ValueError, "head dimension d >= 1", q=q[..., :0], k=k[..., :0])
    bad(ValueError, "G >= 1", C=C[:, :, :0], B=B[:, :, :0])
    bad(TypeError, "float32, bfloat16, float16 or float64", D=D.to(torch.complex64))
    bad(TypeError, "float64 runs on backend='reference'", C=C.double(), backend="cpu")


def test_opcheck():
    kdkernels._extension.ensure_loaded()
    q, k, C, B, ld, D = make_inputs(t=40, seed=7)
    C.requires_grad_()
    ld.requires_grad_()
    for d, lse in ((D.requires_grad_(), None), (None, torch.randn(1, 4, 40))):
        torch.library.opcheck(torch.ops.kdkernels.mixing_matrix_fwd,
                              (q, k, C, B, ld, d, 0.25, False, lse),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_autograd_registration", "test_aot_dispatch_dynamic"))


def test_readme_example_runs():
    """README's MOHAWK examples (discrete and standard Mamba-2) run and lower the loss."""
    run_readme_examples("mohawk-example", expected=2)
