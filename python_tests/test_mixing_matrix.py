"""kdkernels.mixing_matrix_loss (MOHAWK stage 1): the tiled kernels against the reference
computed in float64, loss and the gradients of C, B, log_decay and D; the reference itself
against an element-by-element evaluation of the definition; bad input."""
import math

import pytest
import torch

import kdkernels
import kdkernels._extension
from kdkernels.reference.mixing_matrix import mixing_matrix_loss_per_head, student_mixer

from helpers import HAS_CUDA, HAS_TRITON, TRITON_ON_CPU, assert_matches, run_readme_examples

KERNELS = [pytest.param("cpu", "cpu", id="cpu")]
if HAS_TRITON and TRITON_ON_CPU:
    KERNELS.append(pytest.param("triton", "cpu", id="triton-interp"))
if HAS_TRITON and HAS_CUDA:
    KERNELS.append(pytest.param("triton", "cuda", id="triton-cuda"))


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


def evaluate(backend, q, k, C, B, log_decay, D, grad_out=None, **kw):
    C, B, log_decay = (x.detach().clone().requires_grad_() for x in (C, B, log_decay))
    D = None if D is None else D.detach().clone().requires_grad_()
    loss = kdkernels.mixing_matrix_loss(q, k, C, B, log_decay, D, backend=backend, **kw)
    (loss * (1.0 if grad_out is None else grad_out)).sum().backward()
    return [loss.detach(), C.grad, B.grad, log_decay.grad] + ([D.grad] if D is not None else [])


def check(backend, inputs, device="cpu", **kw):
    """backend on `device` against the reference on CPU (float64, and float32 for the tolerance)."""
    on_device = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    got = evaluate(backend, *[None if x is None else x.to(device) for x in inputs], **on_device)
    got = [g.cpu() for g in got]
    r64 = evaluate("reference", *[None if x is None else x.double() for x in inputs], **kw)
    r32 = evaluate("reference", *[None if x is None else x.float() for x in inputs], **kw)
    names = ["loss", "dC", "dB", "dlog_decay", "dD"]
    for name, a, b, c in zip(names, got, r64, r32):
        out_dtype = torch.float32 if name == "loss" else a.dtype
        assert_matches(a, b, c, out_dtype, name)
    return got


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("t", [1, 7, 64, 257, 1024])
@pytest.mark.parametrize("heads,groups", [(1, 1), (4, 1), (4, 4)])
def test_shapes(backend, device, t, heads, groups):
    check(backend, make_inputs(batch=2, t=t, heads=heads, groups=groups, seed=t), device)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dim,n", [(16, 64), (64, 16)])
@pytest.mark.parametrize("decay", ["strong", "moderate", "weak"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("with_d", [False, True])
def test_options(backend, device, dim, n, decay, squared, with_d):
    inputs = make_inputs(t=300, dim=dim, n=n, decay=decay, seed=1)
    if not with_d:
        inputs[5] = None
    check(backend, inputs, device, squared=squared)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_teacher_lse(backend, device, reduction):
    q, k, C, B, ld, D = make_inputs(batch=2, t=270, seed=2)
    scale = 0.3
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * scale
    causal = torch.ones(270, 270, dtype=torch.bool).tril()
    lse = torch.logsumexp(scores.masked_fill(~causal, float("-inf")), dim=-1)  # (batch, H, T)
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


def test_reference_matches_definition():
    """M and the loss element by element, straight from the issue's formulas."""
    q, k, C, B, ld, D = (x.double() for x in make_inputs(batch=1, t=9, heads=2, groups=1, dim=4, n=3, seed=4))
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
    bad(ValueError, "scale", scale=-1.0)
    bad(ValueError, "reduction", reduction="batchmean")
    bad(ValueError, "no CUDA C\\+\\+ kernels", backend="cuda")


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
