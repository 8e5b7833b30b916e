"""kdkernels.token_relation_loss: the reference (the spec) against a row-by-row evaluation of
the definitions; the tiled kernels (cpu, triton) against the reference computed in float64,
per-row losses and the gradients of the student's features and keys; padding, keys, heads,
dtypes, extreme values, the temperature range's ends, strided inputs, torch.compile; the NaN
rule (per sequence), empty batches and sequences, double backward; bad input."""
import math
import zlib

import pytest
import torch

import kdkernels
from kdkernels.reference.token_relation import token_relation_loss_rows

from helpers import HAS_CUDA, HAS_TRITON, TRITON_ON_CPU, assert_matches, run_readme_examples

KERNELS = [pytest.param("cpu", "cpu", id="cpu")]
if HAS_TRITON and TRITON_ON_CPU:
    KERNELS.append(pytest.param("triton", "cpu", id="triton-interp"))
if HAS_TRITON and HAS_CUDA:
    KERNELS.append(pytest.param("triton", "cuda", id="triton-cuda"))
BACKENDS = [pytest.param("reference", "cpu", id="reference")] + KERNELS


def feats(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def direct_rows(s, t, sk, tk, temp, t_temp, similarity, loss, causal, mask):
    """Per-row losses for (batch, T, d) inputs, one row at a time from the definitions."""
    batch, n = s.shape[0], s.shape[1]
    out = torch.zeros(batch, n, dtype=torch.float64)
    for b in range(batch):
        for i in range(n):
            if mask is not None and not mask[b, i]:
                continue
            js = [j for j in range(n) if (not causal or j <= i) and (mask is None or mask[b, j])]

            def logits(f, k, tau):
                x = f if k is None else k
                if similarity == "cosine":
                    return torch.stack([torch.dot(f[b, i], x[b, j]) / (f[b, i].norm() * x[b, j].norm())
                                        for j in js]) / tau
                return torch.stack([torch.dot(f[b, i], x[b, j]) for j in js]) / (math.sqrt(f.shape[-1]) * tau)

            q = torch.softmax(logits(s, sk, temp), 0)
            p = torch.softmax(logits(t, tk, t_temp), 0)
            out[b, i] = (p * (p.log() - q.log())).sum() if loss == "kl" else ((p - q) ** 2).sum()
    return out


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("keys", [False, True])
def test_reference_matches_definition(similarity, loss, causal, keys):
    s, t = feats(2, 7, 5, seed=1), feats(2, 7, 9, seed=2)  # d_s != d_t
    sk = feats(2, 7, 5, seed=3) if keys else None
    tk = feats(2, 7, 9, seed=4) if keys else None
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    got = token_relation_loss_rows(s, t, student_keys=sk, teacher_keys=tk, temperature=2.0,
                                   teacher_temperature=0.5, similarity=similarity, loss=loss,
                                   causal=causal, mask=mask)
    want = direct_rows(s, t, sk, tk, 2.0, 0.5, similarity, loss, causal, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_heads_and_reductions():
    s, t = feats(2, 4, 6, 8, seed=5), feats(2, 4, 6, 16, seed=6)  # R = 4 relation heads
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    rows = kdkernels.token_relation_loss(s, t, mask=mask, reduction="none")
    assert rows.shape == (2, 4, 6) and (rows[1, :, 4:] == 0).all()
    for r in range(4):
        torch.testing.assert_close(rows[:, r], token_relation_loss_rows(s[:, r], t[:, r], mask=mask))
    torch.testing.assert_close(kdkernels.token_relation_loss(s, t, mask=mask, reduction="sum"), rows.sum())
    torch.testing.assert_close(kdkernels.token_relation_loss(s, t, mask=mask), rows.sum() / (4 * 10))


def test_gradients_flow_to_student_only_and_gradcheck():
    s = feats(1, 5, 4, seed=7).requires_grad_()
    sk = feats(1, 5, 4, seed=8).requires_grad_()
    t = feats(1, 5, 6, seed=9).requires_grad_()
    tk = feats(1, 5, 6, seed=10).requires_grad_()
    for similarity in ("dot", "cosine"):
        for loss in ("kl", "mse"):
            def fn(a, b):
                return token_relation_loss_rows(a, t, student_keys=b, teacher_keys=tk,
                                                similarity=similarity, loss=loss, causal=True)
            assert torch.autograd.gradcheck(fn, (s, sk))
    kdkernels.token_relation_loss(s, t, student_keys=sk, teacher_keys=tk).backward()
    assert t.grad is None and tk.grad is None and s.grad is not None and sk.grad is not None


def test_fully_padded_sequences_give_zero_not_nan():
    s = feats(2, 5, 4, seed=11).float().requires_grad_()
    t = feats(2, 5, 4, seed=12).float()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for loss in ("kl", "mse"):
        value = kdkernels.token_relation_loss(s, t, mask=mask, loss=loss)
        value.backward()
        assert value.item() == 0 and torch.isfinite(s.grad).all() and (s.grad == 0).all()
        s.grad = None


def test_bf16_inputs_and_module():
    s, t = feats(2, 9, 8, seed=13), feats(2, 9, 12, seed=14)
    want = kdkernels.token_relation_loss(s, t, similarity="cosine")
    got = kdkernels.token_relation_loss(s.bfloat16(), t.bfloat16(), similarity="cosine")
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) < 2e-2 * want.item()
    m = kdkernels.nn.TokenRelationLoss(loss="mse", causal=True)
    assert m(s, t) == kdkernels.token_relation_loss(s, t, loss="mse", causal=True)
    assert "causal=True" in repr(m)


def test_bad_inputs():
    s, t = feats(2, 5, 4), feats(2, 5, 6)

    def bad(exc, match, **kw):
        args = dict(student_feats=s, teacher_feats=t)
        args.update({k: kw.pop(k) for k in list(kw) if k in args})
        with pytest.raises(exc, match=match):
            kdkernels.token_relation_loss(args["student_feats"], args["teacher_feats"], **kw)

    bad(ValueError, "must agree on batch", teacher_feats=feats(2, 6, 6))
    bad(ValueError, "must agree on batch", teacher_feats=feats(3, 5, 6))
    bad(ValueError, r"\(batch, T, d\)", student_feats=feats(5, 4))
    bad(ValueError, "d ≥ 1", student_feats=feats(2, 5, 0))
    bad(ValueError, "d ≥ 1", teacher_feats=feats(2, 5, 0))
    bad(TypeError, "floating", student_feats=torch.ones(2, 5, 4, dtype=torch.long))
    bad(ValueError, "both student_keys and teacher_keys", student_keys=s)
    bad(ValueError, "student_keys must have the shape", student_keys=feats(2, 5, 3), teacher_keys=t)
    bad(ValueError, "temperature", temperature=0.0)
    bad(ValueError, "teacher_temperature", teacher_temperature=-1.0)
    bad(ValueError, r"temperature must be a finite number in \[1e-06, 10.0\]", temperature=10.5)
    bad(ValueError, "temperature", temperature=9e-7)
    bad(ValueError, "teacher_temperature", teacher_temperature=10.5)
    bad(ValueError, "teacher_temperature", teacher_temperature=float("nan"))
    bad(TypeError, "temperature", temperature="1")
    bad(ValueError, "similarity", similarity="l2")
    bad(ValueError, "loss", loss="js")
    bad(ValueError, r"mask must be \(batch, T\)", mask=torch.ones(2, 4, dtype=torch.bool))
    bad(TypeError, "mask must be a bool", mask=torch.ones(2, 5))
    bad(ValueError, "reduction", reduction="batchmean")


# ---- the tiled kernels against the float64 reference ------------------------------------

def make_case(batch=2, heads=None, t=64, ds=24, dt=40, keys=False, seed=0, scale=1.0,
              dtype=torch.float32, padded=True):
    """Student/teacher features (and keys) in dtype, a padding mask with a padded tail, one
    padded token mid-sequence, and (batch ≥ 3) one fully padded sequence."""
    g = torch.Generator().manual_seed(seed)
    lead = (batch,) if heads is None else (batch, heads)

    def x(d):
        return (torch.randn(*lead, t, d, generator=g) * scale).to(dtype)

    fs, ft = x(ds), x(dt)
    ks, kt = (x(ds), x(dt)) if keys else (None, None)
    mask = None
    if padded:
        mask = torch.ones(batch, t, dtype=torch.bool)
        mask[-1, t - t // 3:] = False
        mask[0, t // 2] = False
        if batch >= 3:
            mask[1] = False
    return fs, ft, ks, kt, mask


def evaluate(backend, fs, ft, ks, kt, mask, device="cpu", dtype=None, weights=None, **kw):
    """Per-row losses and the gradients (features, keys) of Σ rows·w, w fixed random weights
    (or `weights`)."""
    def put(x):
        if x is None:
            return None
        x = x.to(device)
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x

    fs_, ks_ = (None if x is None else put(x).detach().requires_grad_() for x in (fs, ks))
    rows = kdkernels.token_relation_loss(fs_, put(ft), student_keys=ks_, teacher_keys=put(kt),
                                         mask=put(mask), reduction="none", backend=backend, **kw)
    w = weights if weights is not None else \
        torch.randn(rows.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    (rows * w.to(rows.device, rows.dtype)).sum().backward()
    return [rows.detach().cpu(), fs_.grad.cpu()] + ([ks_.grad.cpu()] if ks is not None else [])


def check(backend, device, case, rounding_units=1.0, factor=8.0, **kw):
    got = evaluate(backend, *case, device=device, **kw)
    want64 = evaluate("reference", *case, dtype=torch.float64, **kw)
    want32 = evaluate("reference", *case, dtype=torch.float32, **kw)
    for name, a, b, c in zip(["rows", "d_feats", "d_keys"], got, want64, want32):
        assert a.dtype == (torch.float32 if name == "rows" else case[0].dtype), name
        assert_matches(a, b, c, a.dtype, f"{backend} {name}", factor=factor,
                       rounding_units=1.0 if name == "rows" else rounding_units)
    return got


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("keys", [False, True])
def test_kernels_match_reference(backend, device, similarity, loss, causal, keys):
    case = make_case(batch=3, t=100, keys=keys, seed=zlib.crc32(repr((similarity, loss, causal, keys)).encode()) % 1000)
    check(backend, device, case, similarity=similarity, loss=loss, causal=causal,
          temperature=0.7, teacher_temperature=1.9)


def _shape_cases():
    """(backend, device, T) for test_kernel_shapes. T = 1024 (4 of the cpu kernel's 256-token
    tiles, 16 of Triton's 64-row blocks) runs on every backend but the Triton interpreter,
    where T = 300 (5 blocks, the last partial: the multi-block row and column walks, causal
    and not) takes the same loops."""
    for kernel in KERNELS:
        backend, device = kernel.values
        for t in (1, 5, 64, 300, 1024):
            if not (backend == "triton" and device == "cpu" and t > 300):
                yield pytest.param(backend, device, t, id=f"{t}-{kernel.id}")


@pytest.mark.parametrize("backend,device,t", list(_shape_cases()))
@pytest.mark.parametrize("heads", [None, 4])
def test_kernel_shapes(backend, device, t, heads):
    case = make_case(batch=2, heads=heads, t=t, ds=16, dt=48, seed=t)
    check(backend, device, case, loss="kl" if t % 2 else "mse", causal=t > 64)
    check(backend, device, case[:4] + (None,), similarity="cosine", causal=t <= 64)
    if t >= 300:
        # the cpu kernel's symmetric walk (no keys, not causal) over several tiles, with padding
        check(backend, device, case, loss="mse" if t % 2 else "kl")


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_kernels_16bit(backend, device, dtype, loss):
    """16-bit features: the reference runs the same rounded values in float64; gradients come
    back in the features' dtype, rounded once (a full ulp under the interpreter, which
    truncates)."""
    case = make_case(t=130, keys=True, seed=5, dtype=dtype)
    interp = backend == "triton" and device == "cpu"
    check(backend, device, case, rounding_units=2.0 if interp else 1.0, loss=loss)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_mixed_dtypes_and_strided_inputs(backend, device):
    """A bf16 teacher with an fp32 student, features that are strided slices of larger
    tensors (every other feature, a transposed layout)."""
    g = torch.Generator().manual_seed(3)
    fs = torch.randn(2, 24, 70, generator=g).transpose(1, 2)  # (2, 70, 24), strided
    ft = torch.randn(2, 70, 80, generator=g).bfloat16()[..., ::2]  # (2, 70, 40), strided
    ks = torch.randn(2, 70, 48, generator=g)[..., 1::2]
    kt = torch.randn(2, 70, 40, generator=g).bfloat16()
    assert not fs.is_contiguous() and not ft.is_contiguous() and not ks.is_contiguous()
    check(backend, device, (fs, ft, ks, kt, None), loss="kl", causal=True)
    check(backend, device, (fs, ft, None, None, None), loss="mse", similarity="cosine")


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("scale,temperature", [(30.0, 1.0), (1.0, 1e-3)])
def test_kernels_extreme_logits(backend, device, scale, temperature):
    """Relation logits in the thousands (sharp, one-hot-like rows): the online softmaxes must
    stay exact and finite (near-uniform rows: test_temperature_range_ends). At τ = 1e-3 every
    logit is 1000× its dot product, so the dot's fp32 rounding alone moves each probability by
    ~1e-4 relative, in any fp32 evaluation; which of two is nearer float64 is chance (measured over 6 seeds: the
    kernels' max error was 0.3–8.7× the fp32 reference's), so that case allows 16×."""
    case = make_case(t=150, seed=8, scale=scale)
    for loss in ("kl", "mse"):
        check(backend, device, case, loss=loss, temperature=temperature,
              factor=16.0 if temperature < 1e-2 else 8.0)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kernel_reductions_and_all_padded(backend, device, reduction):
    fs, ft, _, _, mask = make_case(batch=3, t=40, seed=9)
    fs = fs.to(device).requires_grad_()
    kw = dict(mask=mask.to(device), reduction=reduction)
    got = kdkernels.token_relation_loss(fs, ft.to(device), backend=backend, **kw)
    want = kdkernels.token_relation_loss(fs.detach().cpu().double(), ft.double(), **kw)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    got.backward()
    assert (fs.grad.cpu()[1] == 0).all()  # the fully padded sequence gets no gradient
    # every token padded: a 0 loss and 0 gradients, never NaN
    fs.grad = None
    zero = kdkernels.token_relation_loss(fs, ft.to(device), backend=backend,
                                         mask=torch.zeros_like(mask).to(device), reduction=reduction)
    zero.backward()
    assert zero.item() == 0 and (fs.grad == 0).all()


def test_cpu_kernel_compiles_fullgraph_and_passes_opcheck():
    fs, ft, ks, kt, mask = make_case(t=40, keys=True, seed=10)
    fs.requires_grad_()

    def fn(a):
        return kdkernels.token_relation_loss(a, ft, student_keys=ks, teacher_keys=kt, mask=mask,
                                             causal=True, backend="cpu")

    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(fs), fn(fs))
    seqs = fs.shape[0]
    args = (fs.detach().requires_grad_(), ks.detach().requires_grad_(), ft, kt, mask, 0.2, 0.15,
            True, False)
    torch.library.opcheck(torch.ops.kdkernels.token_relation_fwd.default, args)
    no_keys = (args[0], None, ft, None, None, 0.2, 0.15, False, True)
    torch.library.opcheck(torch.ops.kdkernels.token_relation_fwd.default, no_keys)
    grad = torch.randn(seqs, fs.shape[1])
    with torch.no_grad():
        _, stats = torch.ops.kdkernels.token_relation_fwd(*args)
    plain = tuple(x.detach() for x in args[:4])
    torch.library.opcheck(torch.ops.kdkernels.token_relation_bwd.default,
                          (grad,) + plain + (mask, 0.2, 0.15, True, False, stats))


def test_kernel_memory_is_linear_in_t():
    """The cpu kernel's forward+backward allocates O(T·d), never a T×T matrix: at T=2048 no
    single op allocates a quarter of one T×T fp32 matrix (16 MiB); the reference does."""
    fs, ft, _, _, _ = make_case(batch=1, t=2048, ds=32, dt=32, padded=False, seed=11)
    fs.requires_grad_()
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kdkernels.token_relation_loss(fs, ft, backend="cpu").backward()
    sizes = [e.cpu_memory_usage for e in prof.events() if e.name.startswith(("aten::", "kdkernels"))]
    assert len(sizes) > 10 and max(sizes) > 0  # the profiler saw the allocations
    assert max(sizes) < 2048 * 2048 * 4 / 4, max(sizes)
    # the reference, for contrast, allocates whole T×T matrices
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kdkernels.token_relation_loss(fs, ft, backend="reference").backward()
    assert max(e.cpu_memory_usage for e in prof.events()) >= 2048 * 2048 * 4


def test_readme_example_runs():
    """README's token-relation example (a text encoder distilled) runs and lowers the loss."""
    run_readme_examples("token-relation-example", expected=1)


def test_cpu_kernel_under_inductor_with_strided_features():
    """The fake kernels describe the real outputs (contiguous gradients for strided inputs),
    so torch.compile's inductor backend compiles forward and backward."""
    fs = torch.randn(2, 8, 40).transpose(1, 2).requires_grad_()  # (2, 40, 8), strided
    ft = torch.randn(2, 40, 6)

    def fn(a):
        return kdkernels.token_relation_loss(a, ft, backend="cpu")

    fn(fs).backward()
    want = fs.grad.clone()
    fs.grad = None
    torch.compile(fn, fullgraph=True)(fs).backward()
    torch.testing.assert_close(fs.grad, want)


# ---- the temperature range, the NaN rule, degenerate shapes, double backward ------------

def _temperature_end_cases():
    """(backend, device, temperature, teacher_temperature, similarity, keys): the full product
    on the native backends; on the Triton interpreter every temperature pair with each
    similarity, keys rotated so that every temperature pair runs with and without keys and
    every similarity with and without keys (8 of the 16). The temperatures are only the
    kernels' logit scales (no branch depends on them)."""
    ends = [(1e-6, None), (10.0, None), (1e-6, 10.0), (10.0, 1e-6)]
    for kernel in KERNELS:
        for keys in (False, True):
            for s, similarity in enumerate(("dot", "cosine")):
                for e, (temperature, teacher_temperature) in enumerate(ends):
                    if kernel.values != ("triton", "cpu") or keys == bool((e + s) % 2):
                        yield pytest.param(*kernel.values, temperature, teacher_temperature,
                                           similarity, keys,
                                           id=f"{keys}-{similarity}-{temperature}-"
                                              f"{teacher_temperature}-{kernel.id}")


@pytest.mark.parametrize("backend,device,temperature,teacher_temperature,similarity,keys",
                         list(_temperature_end_cases()))
def test_temperature_range_ends(backend, device, temperature, teacher_temperature, similarity,
                                keys):
    """Both ends of the accepted range, [1e-6, 10], for either model: at 1e-6 the relation
    logits are ~1e6 (one-hot rows; with keys the two models' rows peak at different tokens,
    KL ~1e6), at 10 near-uniform rows. The tolerance rule, unchanged."""
    case = make_case(t=100, keys=keys, seed=17)
    for loss in ("kl", "mse"):
        check(backend, device, case, similarity=similarity, loss=loss, temperature=temperature,
              teacher_temperature=teacher_temperature)


def poisoned_case(heads, keys):
    """Four sequences (batch 4; or batch 2 × 2 heads), each with padded tokens, and their
    poisoned copies: sequence 0 gets a NaN in the teacher's features at a real token,
    sequence 2 a +inf in the student's keys (features without keys) at its last real token
    (the causal rows before it read nothing non-finite: the unit is still the sequence) and a
    −inf in the teacher's keys; every sequence gets NaN and ±inf at a padded token, in every
    input. Returns (clean, poisoned, mask, which sequences are poisoned: (batch, [R]) bool)."""
    batch, t = (4, 9) if heads is None else (2, 9)
    lead = (batch,) if heads is None else (batch, heads)
    g = torch.Generator().manual_seed(21)

    def x(d):
        return torch.randn(*lead, t, d, generator=g)

    clean = [x(6), x(10), x(6) if keys else None, x(10) if keys else None]  # fs, ft, ks, kt
    mask = torch.ones(batch, t, dtype=torch.bool)
    mask[:, 7] = False
    mask[-1, 3] = False
    poisoned = [None if v is None else v.clone() for v in clean]
    flat = [None if v is None else v.view(-1, t, v.shape[-1]) for v in poisoned]  # per sequence
    for v, value in zip(flat, (float("nan"), float("inf"), float("-inf"), float("nan"))):
        if v is not None:
            v[:, 7, 1] = value  # padded in every sequence
    bad = torch.zeros(flat[0].shape[0], dtype=torch.bool)
    flat[1][0, 4, 2] = float("nan")
    flat[2 if keys else 0][2, 8, 0] = float("inf")
    if keys:
        flat[3][2, 5, 3] = float("-inf")
    bad[[0, 2]] = True
    return clean, poisoned, mask, bad.view(lead)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("keys", [False, True])
@pytest.mark.parametrize("heads", [None, 2])
def test_nan_rule_per_sequence(backend, device, similarity, loss, causal, keys, heads):
    """A sequence (a (batch, head) relation matrix) with a NaN or ±inf in a real token of any
    input: NaN at every kept row and in every real token's gradient row (features and keys),
    exact zeros at its padded tokens; the clean sequences as in a batch of only them (with
    finite values at the padded tokens, against the float64 reference); NaN or ±inf at
    padded tokens changes nothing; mean and sum are NaN."""
    clean, poisoned, mask, bad = poisoned_case(heads, keys)
    kw = dict(similarity=similarity, loss=loss, causal=causal, temperature=0.8,
              teacher_temperature=1.3)
    real = (mask if heads is None else mask[:, None]).expand(bad.shape + mask.shape[-1:])
    weights = torch.randn(real.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = evaluate(backend, *poisoned, mask, device=device, weights=weights, **kw)
    rows, grads = got[0], got[1:]
    nan_rows = bad[..., None] & real
    assert rows[nan_rows].isnan().all() and not rows[~nan_rows].isnan().any()
    assert (rows[~real] == 0).all()
    for grad in grads:
        assert grad[nan_rows].isnan().all(), "a poisoned sequence's real tokens: NaN gradients"
        assert (grad[~real] == 0).all(), "padded tokens: exact zero gradients"
        assert torch.isfinite(grad[~nan_rows]).all()
    # the clean sequences alone (batch rows 1 and 3; or head 1 of both): the same rows and
    # gradients
    if heads is None:
        def pick(v):
            return v[~bad]
        sub_mask = mask[~bad]
    else:
        assert bad[:, 0].all() and not bad[:, 1].any()

        def pick(v):
            return v[:, 1:]
        sub_mask = mask
    sub = [None if v is None else pick(v) for v in clean] + [sub_mask]
    want64 = evaluate("reference", *sub, dtype=torch.float64, weights=pick(weights), **kw)
    want32 = evaluate("reference", *sub, dtype=torch.float32, weights=pick(weights), **kw)
    for name, a, b, c in zip(["rows", "d_feats", "d_keys"], got, want64, want32):
        assert_matches(pick(a), b, c, a.dtype, f"{backend} {name}")
    fs, ft, ks, kt = (None if v is None else v.to(device) for v in poisoned)
    for reduction in ("mean", "sum"):
        value = kdkernels.token_relation_loss(fs, ft, student_keys=ks, teacher_keys=kt,
                                              mask=mask.to(device), reduction=reduction,
                                              backend=backend, **kw)
        assert value.isnan(), reduction


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 4), (2, 0, 4), (0, 3, 5, 4), (2, 3, 0, 4)],
                         ids=["batch0", "T0", "batch0-heads", "T0-heads"])
@pytest.mark.parametrize("keys", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_empty_batches_and_sequences(backend, device, shape, keys, masked):
    """Batch 0 or T = 0: mean and sum are 0, "none" is an empty (batch, [R,] T); gradients
    exist, zero-sized, shaped like the inputs (d = 0 is refused: test_bad_inputs)."""
    g = torch.Generator().manual_seed(4)
    t_shape = shape[:-1] + (6,)
    mask = torch.ones(shape[0], shape[-2], dtype=torch.bool, device=device) if masked else None
    for reduction in ("mean", "sum", "none"):
        fs = torch.randn(*shape, generator=g).to(device).requires_grad_()
        ks = torch.randn(*shape, generator=g).to(device).requires_grad_() if keys else None
        ft = torch.randn(*t_shape, generator=g).to(device)
        kt = torch.randn(*t_shape, generator=g).to(device) if keys else None
        value = kdkernels.token_relation_loss(fs, ft, student_keys=ks, teacher_keys=kt, mask=mask,
                                              reduction=reduction, backend=backend)
        if reduction == "none":
            assert value.shape == shape[:-1]
            value = value.sum()
        assert value.shape == () and value.item() == 0, reduction
        value.backward()
        for x in (fs, ks) if keys else (fs,):
            assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype


@pytest.mark.parametrize("backend,device", KERNELS)
def test_double_backward_is_refused(backend, device):
    fs = torch.randn(2, 6, 4, device=device, requires_grad=True)
    value = kdkernels.token_relation_loss(fs, torch.randn(2, 6, 5, device=device), backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(value, fs, create_graph=True)


def test_reference_has_second_derivatives():
    """The reference (autograd through plain PyTorch) supports create_graph=True."""
    s = feats(1, 4, 3, seed=30).requires_grad_()
    k = feats(1, 4, 3, seed=31).requires_grad_()
    t, tk = feats(1, 4, 5, seed=32), feats(1, 4, 5, seed=33)
    for loss in ("kl", "mse"):
        def fn(a, b):
            return token_relation_loss_rows(a, t, student_keys=b, teacher_keys=tk, loss=loss,
                                            similarity="cosine")
        assert torch.autograd.gradgradcheck(fn, (s, k))


def test_tensor_temperature_is_checked_under_compile():
    """A 0-dim tensor temperature is read on the host (a graph break under torch.compile),
    so its range check runs there too: never a silent result for a bad value."""
    fs, ft, _, _, mask = make_case(t=20, seed=12)

    def fn(a, temperature):
        return kdkernels.token_relation_loss(a, ft, mask=mask, temperature=temperature,
                                             backend="cpu")

    compiled = torch.compile(fn, backend="aot_eager")
    torch.testing.assert_close(compiled(fs, torch.tensor(0.5)), fn(fs, 0.5))
    for bad in (0.0, 20.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            compiled(fs, torch.tensor(bad))
