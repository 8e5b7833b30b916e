"""The sparse-teacher family (kdkernels/sparse.py): every kernel backend against the float64
reference (kdkernels/reference/sparse.py), loss and gradients, with the precision-aware
tolerance rule (helpers.assert_matches); the dense equality K = V ↔ kdkernels.divergence;
edge cases (padding, a top-k that holds all the mass, DistillKit #45, extreme values, −inf
logits); dtypes and layouts; the extractors (ties, options, chunks); the extractor → loss
round trip; compile, opcheck; bad input.

Every option value of the main matrices occurs, and every pair that interacts (tail × kind,
tail × K, kind × temperature, temperature × re-tempering, reduction × row selection), in
covering sets instead of the full product (a modest runtime, also interpreted)."""
import math
import os

import pytest
import torch

import kdkernels
from helpers import assert_matches, kernel_cases, run_readme_examples
from kdkernels import _plumbing as P
from kdkernels.reference import sparse as ref_sparse

KERNELS = kernel_cases()
WITH_REFERENCE = KERNELS + [pytest.param("reference", "cpu", id="reference")]
N, V, H = 41, 1271, 96  # the odd shapes
KS = (1, 7, 64, 1024)
TAILS = ("renormalize", "bucket", "none")
KINDS = (("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}), ("tvd", {}))
REDUCTIONS = ("mean", "sum", "none")
ROWS = ("all", "mask", "labels")
NEG_INF = float("-inf")


# ------------------------------------------------------------------------------- inputs
def pad_teacher(lp, idx):
    """Padding (−inf log-prob) as caches and inference servers write it, in place on (n, K):
    row 2 its last third (at least one entry), the padding's index repeating the row's first
    (real) entry; row 5 one entry in the middle, keeping its own index (that id then belongs
    to the tail); row 7 all padding, every index the same."""
    k = lp.shape[-1]
    m = max(1, k // 3)
    lp[2, k - m:] = NEG_INF
    idx[2, k - m:] = idx[2, 0]
    lp[5, k // 2] = NEG_INF
    lp[7] = NEG_INF
    idx[7] = idx[7, 0]
    return lp, idx


def teacher_topk(teacher_logits, k, *, temperature=1.0, pad=True):
    """A realistic teacher: the top-k of its log_softmax (float64), padded (pad_teacher)."""
    lp, idx = torch.topk(torch.log_softmax(teacher_logits / temperature, -1), k, dim=-1)
    return pad_teacher(lp, idx) if pad else (lp, idx)


def sample_inputs(n=N, v=V, k=64, *, seed=0, pad=True, scale=3.0):
    """float64 masters: student logits (n, v) of scale ~3, the top-k (K = k) of a teacher
    correlated with the student (padded: pad_teacher), labels with every fifth row ignored,
    and a random mask. Shared by the correctness, gradient, compile and opcheck tests."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    teacher = 0.8 * student + torch.randn(n, v, generator=g, dtype=torch.float64) * scale * 0.6
    lp, idx = teacher_topk(teacher, k, pad=pad)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    mask = torch.rand(n, generator=g) > 0.3
    return dict(student=student, lp=lp, idx=idx, labels=labels, mask=mask)


def row_options(case, rows):
    return {"all": {}, "mask": {"mask": case["mask"]}, "labels": {"labels": case["labels"]}}[rows]


def on(device, *xs):
    """The tensors moved to device (a kernel case's; the references run on the CPU)."""
    moved = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in xs)
    return moved if len(xs) > 1 else moved[0]


def backward(loss):
    """loss.backward(); reduction='none' with a non-uniform upstream gradient (a ramp)."""
    if loss.dim():
        up = torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype, device=loss.device)
        up = up.reshape(loss.shape)
        (loss * up).sum().backward()
    else:
        loss.backward()


def run_sparse(backend, student, lp, idx, device="cpu", **opts):
    """Loss and student gradient (on the CPU) of backend on device; the inputs as given
    (layouts kept: a detached view of the student is the leaf)."""
    opts = {k: on(device, v) for k, v in opts.items()}
    x = on(device, student).detach().requires_grad_()
    loss = kdkernels.sparse_divergence(x, on(device, lp), on(device, idx), backend=backend,
                                       **opts)
    backward(loss)
    return loss.detach().cpu(), x.grad.cpu()


def check_sparse(backend, student, lp, idx, dtype=torch.float32, what="", grad_parts=(),
                 device="cpu", **opts):
    """backend on student.to(dtype) and the teacher as given against the reference run on
    float64 copies of the same values (the fp32 reference: the fp32-formula error).
    grad_parts: boolean (n, V) masks of gradient entries also compared on their own scale
    (the gradient off the teacher's entries is tiny next to the one at them)."""
    s = student.to(dtype)
    ref64 = run_sparse("reference", s.double(), lp.double(), idx, **opts)
    ref32 = run_sparse("reference", s.float(), lp.float(), idx, **opts)
    loss, grad = run_sparse(backend, s, lp, idx, device, **opts)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert ref64[0].dtype == torch.float64
    assert_matches(loss, ref64[0], ref32[0], torch.float32, f"{what} loss")
    assert_matches(grad, ref64[1], ref32[1], dtype, f"{what} grad")
    for part in grad_parts:
        assert_matches(grad[part], ref64[1][part], ref32[1][part], dtype, f"{what} grad part")
    return loss, grad, ref64


# --------------------------------------------------------------- against the reference
# Every (tail, kind) pair once; K, T, re-tempering (renormalize only: the other tails reject
# it), the row selection and the reduction rotate so that tail × K, kind × T, T ×
# re-tempering and reduction × rows all occur, and num_items with mean.
def _main_cases():
    cases = []
    for i, tail in enumerate(TAILS):
        for j, (kind, params) in enumerate(KINDS):
            c = 4 * i + j
            k = KS[(i + j) % 4]
            temperature = (1.0, 2.0)[(i + j) % 2]
            retemper = tail == "renormalize" and (j // 2 + i // 2) % 2 == 1
            reduction, rows = REDUCTIONS[c % 3], ROWS[(c // 3) % 3]
            opts = dict(kind=kind, tail=tail, temperature=temperature, reduction=reduction,
                        teacher_temperature=1.5 if retemper else None, **params)
            if c == 9:
                opts["num_items"] = 97
            cases.append(pytest.param(k, rows, opts, id=f"{tail}-{kind}-K{k}-T{temperature}"
                                      f"{'-Tgen1.5' if retemper else ''}-{rows}-{reduction}"))
    return cases


MAIN_CASES = _main_cases()


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("k,rows,opts", MAIN_CASES)
def test_matches_reference(backend, device, k, rows, opts):
    case = sample_inputs(k=k, seed=k + len(opts))
    loss, _, _ = check_sparse(backend, case["student"], case["lp"].float(), case["idx"],
                              what=str(opts), device=device, **row_options(case, rows), **opts)
    if opts["reduction"] == "none":
        assert loss.shape == (N,)
        dropped = {"all": torch.zeros(N, dtype=torch.bool), "mask": ~case["mask"],
                   "labels": case["labels"] == -100}[rows]
        assert (loss[dropped] == 0).all()


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_bucket_rejects_retempering(backend, device):
    case = sample_inputs(n=8, v=50, k=7)
    s, lp, idx = on(device, case["student"].float(), case["lp"].float(), case["idx"])
    for tail in ("bucket", "none"):
        with pytest.raises(ValueError, match="teacher_temperature"):
            kdkernels.sparse_divergence(s, lp, idx, tail=tail, teacher_temperature=1.5,
                                        backend=backend)
    # teacher_temperature equal to the temperature is no re-tempering: allowed, the same loss
    a = kdkernels.sparse_divergence(s, lp, idx, tail="bucket", temperature=2.0,
                                    teacher_temperature=2.0, backend=backend)
    b = kdkernels.sparse_divergence(s, lp, idx, tail="bucket", temperature=2.0, backend=backend)
    assert torch.equal(a, b)


def test_tails_and_retempering_differ():
    """The options reach the math: each tail, and re-tempering, changes the loss (a backend
    that ignored one would pass the reference comparisons only if the reference did too)."""
    case = sample_inputs(n=8, v=300, k=7, pad=False)
    s, lp, idx = case["student"].float(), case["lp"].float(), case["idx"]
    got = {(tail, tt): kdkernels.sparse_divergence(s, lp, idx, tail=tail, temperature=2.0,
                                                   teacher_temperature=tt, backend="cpu").item()
           for tail in TAILS for tt in (None, 1.0) if not (tail != "renormalize" and tt)}
    assert len({round(v, 6) for v in got.values()}) == len(got), got
    # tail="none" is the truncated sum: with the teacher's K entries renormalized by hand
    # (Σ p = 1), it equals tail="renormalize" on the raw entries
    renorm = lp - torch.logsumexp(lp.double(), -1, keepdim=True).float()
    a = kdkernels.sparse_divergence(s, renorm, idx, tail="none", backend="cpu")
    b = kdkernels.sparse_divergence(s, lp, idx, tail="renormalize", backend="cpu")
    assert abs(a.item() - b.item()) < 1e-5 * abs(b.item())


# -------------------------------------------------------------------- hand-made sums
def test_bucket_by_hand():
    """One row, V = 5, K = 2, worked out by hand: p = (0.5, 0.25 | tail 0.25), the student's
    q = softmax(z) with its tail summed over the other 3 ids (an oracle independent of the
    reference's code)."""
    z = torch.tensor([[0.3, -1.0, 2.0, 0.5, -0.2]], dtype=torch.float64)
    lp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    idx = torch.tensor([[2, 0]])
    q = torch.softmax(z[0], -1)
    qe = torch.stack([q[2], q[0], q[1] + q[3] + q[4]])
    pe = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    qr = torch.stack([q[2], q[0]])
    pr = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    m = 0.3 * pe + 0.7 * qe
    want = {("fkl", "bucket"): (pe * (pe / qe).log()).sum(),
            ("rkl", "bucket"): (qe * (qe / pe).log()).sum(),
            ("tvd", "bucket"): 0.5 * (pe - qe).abs().sum(),
            ("jsd", "bucket"): (0.3 * (pe * (pe / m).log()).sum()
                                + 0.7 * (qe * (qe / m).log()).sum()),
            ("fkl", "renormalize"): (pr * (pr / qr).log()).sum(),
            ("fkl", "none"): (pe[:2] * (pe[:2] / qr).log()).sum(),
            ("tvd", "none"): 0.5 * (pe[:2] - qr).abs().sum()}
    for (kind, tail), w in want.items():
        for backend, dtype in (("reference", torch.float64), ("cpu", torch.float32)):
            got = kdkernels.sparse_divergence(z.to(dtype), lp, idx, kind=kind, tail=tail,
                                              beta=0.3, backend=backend)
            assert abs(got.item() - w.item()) < 1e-6 * abs(w.item()) + 1e-7, (kind, tail, backend)


# ------------------------------------------------------------------------------ fused
FUSED_STUDENT = ("student_hidden", "student_weight", "student_bias")


def fused_inputs(n=N, h=H, v=V, k=64, *, seed=0, bias=True, vocab=None, pad=True):
    """The student's hidden states, lm_head (v rows) and bias (float64 masters, logits of
    scale ~3), and a correlated teacher's top-k over the first `vocab` columns."""
    g = torch.Generator().manual_seed(seed)
    vocab = v if vocab is None else vocab
    case = dict(student_hidden=torch.randn(n, h, generator=g, dtype=torch.float64),
                student_weight=torch.randn(v, h, generator=g, dtype=torch.float64) * (3 / h ** 0.5))
    if bias:
        case["student_bias"] = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    z = case["student_hidden"] @ case["student_weight"][:vocab].t()
    teacher = 0.8 * z + torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0
    lp, idx = teacher_topk(teacher, k, pad=pad)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = -100
    mask = torch.rand(n, generator=g) > 0.3
    return case, dict(lp=lp, idx=idx, labels=labels, mask=mask)


def run_fused(backend, case, dtype, lp, idx, device="cpu", **opts):
    """The output and the student's gradients (on the CPU) of backend on device."""
    opts = {k: on(device, v) for k, v in opts.items()}
    args = {k: on(device, case[k].to(dtype)).detach().requires_grad_()
            for k in FUSED_STUDENT if k in case}
    out = kdkernels.fused_linear_sparse_divergence(
        args["student_hidden"], args["student_weight"], on(device, lp), on(device, idx),
        student_bias=args.get("student_bias"), backend=backend, **opts)
    loss = out.loss if isinstance(out, tuple) else out
    backward(loss)
    out = type(out)(*(x.cpu() for x in out)) if isinstance(out, tuple) else out.cpu()
    return out, {k: a.grad.cpu() for k, a in args.items()}


def check_fused(backend, case, lp, idx, dtype=torch.float32, what="", device="cpu", **opts):
    case = {k: v.to(dtype).double() for k, v in case.items()}  # the dtype's values, exactly
    ref64, g64 = run_fused("reference", case, torch.float64, lp.double(), idx, **opts)
    ref32, g32 = run_fused("reference", case, torch.float32, lp.float(), idx, **opts)
    out, grads = run_fused(backend, case, dtype, lp, idx, device, **opts)
    loss = out.loss if isinstance(out, tuple) else out
    assert loss.dtype == torch.float32
    as_loss = (lambda o: o.loss if isinstance(o, tuple) else o)
    assert_matches(loss.detach(), as_loss(ref64).detach(), as_loss(ref32).detach(),
                   torch.float32, f"{what} loss")
    assert set(grads) == set(g64)
    for k, g in grads.items():
        assert g is not None and g.dtype == dtype, k
        assert_matches(g, g64[k], g32[k], dtype, f"{what} d{k}")
    return out, ref64


# Option sets of the fused op, rotated over the (tail, kind) pairs as in MAIN_CASES.
FUSED_EXTRAS = [
    dict(),
    dict(bias=True, hard_label_weight=0.4),
    dict(student_softcap=4.0, student_logit_scale=1.3),
    dict(vocab_size=1100, chunk_size=None),
    dict(bias=True, hard_label_weight=0.3, soft_label_weight=0.6, student_softcap=5.0),
    dict(chunk_size=1),
]


def _fused_cases():
    cases = []
    for i, tail in enumerate(TAILS):
        for j, (kind, params) in enumerate(KINDS):
            c = 4 * i + j
            extra = dict(FUSED_EXTRAS[c % len(FUSED_EXTRAS)])
            k = KS[(i + j + 1) % 4]
            temperature = (1.0, 2.0)[(i + j + 1) % 2]
            retemper = tail == "renormalize" and (j // 2 + i // 2) % 2 == 0
            reduction = REDUCTIONS[(c + 2 + c // 3) % 3]  # every (reduction, rows) pair
            rows = "labels" if "hard_label_weight" in extra else ROWS[(c // 4 + 1) % 3]
            opts = dict(kind=kind, tail=tail, temperature=temperature, reduction=reduction,
                        teacher_temperature=1.5 if retemper else None, **params, **extra)
            opts.setdefault("chunk_size", 16)
            if reduction == "mean" and not any("num_items" in p.values[2] for p in cases):
                opts["num_items"] = 50
            cases.append(pytest.param(k, rows, opts, id=f"{tail}-{kind}-K{k}-T{temperature}"
                                      f"{'-Tgen1.5' if retemper else ''}-{rows}-{reduction}-"
                                      f"x{c % len(FUSED_EXTRAS)}"))
    return cases


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("k,rows,opts", _fused_cases())
def test_fused_matches_reference(backend, device, k, rows, opts):
    opts = dict(opts)
    bias = opts.pop("bias", False)
    vocab = opts.get("vocab_size")
    case, t = fused_inputs(k=k, seed=k + 1, bias=bias, vocab=vocab)
    check_fused(backend, case, t["lp"].float(), t["idx"], what=str(opts), device=device,
                **row_options(t, rows), **opts)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype,tail,kind,reduction", [
    (torch.bfloat16, "bucket", "fkl", "mean"), (torch.float16, "renormalize", "jsd", "none"),
    (torch.bfloat16, "none", "rkl", "none")], ids=["bf16-bucket", "fp16-renormalize-none",
                                                   "bf16-none-none"])
def test_fused_half_precision(backend, device, dtype, tail, kind, reduction):
    """16-bit hidden states, weight and bias, a bf16-stored teacher with int32 indices: the
    logits are never rounded to 16 bits, the gradients are within the dtype's rounding of the
    reference's (on the same 16-bit values, upcast)."""
    case, t = fused_inputs(n=N, k=64, seed=21, bias=True)
    check_fused(backend, case, t["lp"].to(torch.bfloat16), t["idx"].to(torch.int32), dtype=dtype,
                what=str(dtype), device=device, kind=kind, tail=tail, temperature=2.0,
                labels=t["labels"],
                hard_label_weight=0.3, reduction=reduction, chunk_size=9, beta=0.3)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_fused_components(backend, device):
    """return_components: the divergence, cross-entropy, student entropy at T and the kept
    rows of the reference."""
    case, t = fused_inputs(n=19, v=500, k=7, bias=True)
    opts = dict(kind="jsd", tail="bucket", temperature=2.0, labels=t["labels"][:19],
                hard_label_weight=0.4, soft_label_weight=0.8, return_components=True,
                chunk_size=5)
    lp, idx = t["lp"].float(), t["idx"]
    out, ref = check_fused(backend, case, lp, idx, what="components", device=device, **opts)
    for name in ("loss", "divergence", "cross_entropy", "student_entropy"):
        a, b = getattr(out, name), getattr(ref, name)
        assert abs(a.item() - b.item()) <= 2e-6 * abs(b.item()) + 1e-6, (name, a, b)
    assert out.num_kept.item() == ref.num_kept.item() == int((t["labels"][:19] != -100).sum())
    # the entropy, from materialized logits (of the fp32 values the kernels got)
    c = {k: v.float().double() for k, v in case.items()}
    z = c["student_hidden"] @ c["student_weight"].t() + c["student_bias"]
    q = torch.softmax(z / 2.0, -1)
    ent = -(q * q.log()).sum(-1)[t["labels"][:19] != -100].sum()
    assert abs(ref.student_entropy.item() - ent.item()) < 1e-9 * ent.item()


@pytest.mark.parametrize("backend,device", KERNELS)
def test_fused_equals_sparse_on_logits(backend, device):
    """The fused op is sparse_divergence of its logits (with every row chunking)."""
    case, t = fused_inputs(n=23, v=700, k=64, bias=True)
    c = {k: on(device, v.float()) for k, v in case.items()}
    z = (c["student_hidden"] @ c["student_weight"].t() + c["student_bias"]).requires_grad_()
    lp, idx = on(device, t["lp"][:23].float(), t["idx"][:23])
    want = kdkernels.sparse_divergence(z, lp, idx, kind="rkl", tail="bucket",
                                       temperature=2.0, backend=backend)
    want.backward()
    for chunk in (1, 7, 23, 100):
        h = c["student_hidden"].clone().requires_grad_()
        got = kdkernels.fused_linear_sparse_divergence(
            h, c["student_weight"], lp, idx, student_bias=c["student_bias"],
            kind="rkl", tail="bucket", temperature=2.0, chunk_size=chunk, backend=backend)
        got.backward()
        assert abs(got.item() - want.item()) < 1e-5 * abs(want.item())
        torch.testing.assert_close(h.grad, z.grad @ c["student_weight"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_fused_zero_weight_divergence_never_poisons_the_loss(backend, device):
    """soft_label_weight=0: the divergence is left out, not multiplied by 0, so an infinite
    one (fkl where the student's logit is −inf at a teacher entry) leaves the loss the
    cross-entropy (of materialized logits) and the gradients finite."""
    case, t = fused_inputs(n=6, h=8, v=40, k=5, bias=True, pad=False)
    col = int(t["idx"][0, 0])
    case["student_bias"][col] = NEG_INF
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    labels[labels == col] = 0 if col else 7
    dt = torch.float64 if backend == "reference" else torch.float32
    args = {k: on(device, v.to(dt)).requires_grad_() for k, v in case.items()}
    call = dict(student_bias=args["student_bias"], kind="fkl", labels=on(device, labels),
                backend=backend)
    lp, idx = on(device, t["lp"].to(dt), t["idx"])
    div = kdkernels.fused_linear_sparse_divergence(args["student_hidden"], args["student_weight"],
                                                   lp, idx, **call)
    assert div.item() == float("inf")
    loss = kdkernels.fused_linear_sparse_divergence(
        args["student_hidden"], args["student_weight"], lp, idx, soft_label_weight=0.0,
        hard_label_weight=1.0, **call)
    loss.backward()
    z = case["student_hidden"] @ case["student_weight"].t() + case["student_bias"]
    ce = torch.nn.functional.cross_entropy(z, labels)
    assert abs(loss.item() - ce.item()) < 1e-5 * ce.item()
    assert all(torch.isfinite(a.grad).all() for a in args.values())


# ------------------------------------------------------------------------------ edge cases
def _edge(scenario, n=10, v=300, k=7, seed=0):
    """(student, lp, idx, grad_parts) for each edge scenario (float64 student, float32
    teacher)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    parts = ()
    if scenario == "padding":
        lp, idx = teacher_topk(t, k)
        lp[0] = NEG_INF  # a second all-padding row, indices as they were
    elif scenario == "teacher holds all mass":
        keep = torch.topk(t, k, dim=-1).indices
        t = torch.full_like(t, NEG_INF).scatter(-1, keep, t.gather(-1, keep))
        lp, idx = teacher_topk(t, k, pad=False)
        assert torch.isfinite(lp).all() and (lp.double().exp().sum(-1) - 1).abs().max() < 1e-12
    elif scenario == "student top-k mass rounds to 1":
        lp, idx = teacher_topk(t, k, pad=False)
        s.scatter_add_(-1, idx, torch.full(idx.shape, 30.0, dtype=s.dtype))
        q32 = torch.softmax(s.float(), -1)
        assert (q32.gather(-1, idx).sum(-1) == 1.0).any()  # fp32: the top-k mass rounds to 1
        off = torch.ones(n, v, dtype=torch.bool).scatter(-1, idx, False)
        parts = (off,)  # the tiny gradient off the top-k, on its own scale
    elif scenario == "extreme values":
        s = s * 30  # logits of scale ~100: peaked distributions
        lp, idx = teacher_topk(t * 30, k)
        lp[1, -1] = -3000.0  # a real entry of negligible mass
    elif scenario == "-inf student logits":
        lp, idx = teacher_topk(t, k)
        s[:, ::7] = NEG_INF  # off and at teacher indices
        s[3] = NEG_INF
        s[3, idx[3, 0]] = 0.0  # one finite logit, at a teacher index
        s[4] = NEG_INF
        s[4, 11] = 1.0  # one finite logit, off the teacher's entries
        s[6] = NEG_INF
        s[6].scatter_(-1, idx[6], 0.5)  # student mass only on the teacher's entries
    else:
        raise AssertionError(scenario)
    return s, lp.float(), idx, parts


def _edge_allowed(scenario, tail, kind):
    """Where the divergence is finite. fkl is +inf where the student has no mass at a
    teacher entry (−inf logits at one: ±inf rows would mask any error); a teacher with all
    mass in its top-k (to fp32 rounding) has an empty bucket, where rkl is +inf."""
    if scenario == "-inf student logits" and kind == "fkl":
        return False
    if scenario in ("teacher holds all mass", "extreme values") and (tail, kind) == ("bucket",
                                                                               "rkl"):
        return False  # (extreme values: the teacher's top-7 mass rounds to 1 in fp32)
    return True


EDGE_SCENARIOS = ("padding", "teacher holds all mass", "student top-k mass rounds to 1",
                  "extreme values", "-inf student logits")
EDGE_CASES = [pytest.param(sc, tail, kind, params, (1.0, 2.0)[(a + b) % 2] if
                           sc != "student top-k mass rounds to 1" else 1.0,
                           id=f"{sc}-{tail}-{kind}")
              for a, sc in enumerate(EDGE_SCENARIOS) for b, tail in enumerate(TAILS)
              for kind, params in KINDS if _edge_allowed(sc, tail, kind)]


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("scenario,tail,kind,params,temperature", EDGE_CASES)
def test_edge_cases(backend, device, scenario, tail, kind, params, temperature):
    s, lp, idx, parts = _edge(scenario, seed=len(scenario))
    loss, grad, ref = check_sparse(backend, s, lp, idx, what=scenario, grad_parts=parts,
                                   device=device, kind=kind, tail=tail, temperature=temperature,
                                   reduction="none", **params)
    assert torch.isfinite(ref[0]).all()
    if scenario == "padding":  # the all-padding rows: no entry, no loss (renormalize, none)
        if tail != "bucket":
            assert (loss[[0, 7]] == 0).all() and (grad[[0, 7]] == 0).all()
    if scenario == "-inf student logits":  # probability 0 stays 0: its gradient is 0
        assert (grad[torch.isinf(s)] == 0).all()


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_gradient_precision_at_llm_logit_scale(backend, device, tail):
    """A student of logit scale ~10 (row maxima ~45, as LLMs' are) at T = 0.5 (z/T ~ 90),
    that disagrees with the teacher (its top logit off the teacher's top-k): the gradient is
    within the project's rule (8x fp32 PyTorch's error, + 1e-6 of its scale): a normalizer
    rounded to fp32 at |lse| ~ 90 before e^(x − lse) would give ~90·2^-24 relative error
    there (fp32 PyTorch: ~2^-24)."""
    case = sample_inputs(n=N, v=V, k=64, seed=13)
    g = torch.Generator().manual_seed(14)
    s = case["student"] + torch.randn(N, V, generator=g, dtype=torch.float64) * 10.0
    check_sparse(backend, s, case["lp"].float(), case["idx"], kind="fkl", tail=tail,
                 temperature=0.5, what="logits ~45 at T = 0.5", device=device)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_distillkit_45_bucket_is_exact(backend, device):
    """DistillKit #45: with the student's top-k mass 1 in fp32, 1 − Σq is 0 and fkl's tail
    log(p_tail/q_tail) infinite; the exact bucket gives the reference's finite loss and the
    gradient off the top-k of the tail's own size (not 0)."""
    s, lp, idx, (off,) = _edge("student top-k mass rounds to 1", n=6, v=500, k=16)
    naive_q_tail = 1.0 - torch.softmax(s.float(), -1).gather(-1, idx).sum(-1)
    assert (naive_q_tail <= 0).any()
    loss, grad, ref = check_sparse(backend, s, lp, idx, grad_parts=(off,), kind="fkl",
                                   tail="bucket", reduction="none", device=device)
    assert torch.isfinite(loss).all() and (grad[off] != 0).all()


@pytest.mark.parametrize("backend,device", KERNELS)
def test_nan_student_row(backend, device):
    """A kept row with a NaN student logit has a NaN loss; the others are the reference's."""
    case = sample_inputs(n=9, v=200, k=7)
    s = case["student"].float()
    s[4, 10] = float("nan")
    loss = kdkernels.sparse_divergence(*on(device, s, case["lp"].float(), case["idx"]),
                                       reduction="none", backend=backend).cpu()
    ref = kdkernels.sparse_divergence(s.double(), case["lp"], case["idx"], reduction="none",
                                      backend="reference")
    assert torch.isnan(loss[4]) and torch.isnan(ref[4])
    others = torch.arange(9) != 4
    assert torch.allclose(loss[others].double(), ref[others], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_rows_dropped(backend, device, reduction):
    case = sample_inputs(n=8, v=100, k=7)
    dt = torch.float64 if backend == "reference" else torch.float32
    s = on(device, case["student"].to(dt)).requires_grad_()
    mask = torch.zeros(8, dtype=torch.bool, device=device)
    lp, idx = on(device, case["lp"].to(dt), case["idx"])
    for tail in TAILS:
        loss = kdkernels.sparse_divergence(s, lp, idx, tail=tail, mask=mask,
                                           reduction=reduction, backend=backend)
        loss.sum().backward()
        assert (loss == 0).all() and (s.grad == 0).all()
        s.grad = None
    fc, t = fused_inputs(n=8, h=8, v=100, k=7)
    args = {k: on(device, v.to(dt)).requires_grad_() for k, v in fc.items()}
    loss = kdkernels.fused_linear_sparse_divergence(
        args["student_hidden"], args["student_weight"], *on(device, t["lp"].to(dt), t["idx"]),
        student_bias=args["student_bias"], mask=mask, reduction=reduction, backend=backend)
    loss.sum().backward()
    assert (loss == 0).all()
    assert all(a.grad is not None and (a.grad == 0).all() for a in args.values())


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_empty_batch(backend, device, reduction):
    """No rows at all (logits with leading dims (2, 0), hidden states (0, H)): a zero loss
    and empty (or zero) gradients, as kdkernels.divergence gives."""
    dt = torch.float64 if backend == "reference" else torch.float32
    s = torch.zeros(2, 0, 30, dtype=dt, device=device, requires_grad=True)
    lp = torch.zeros(2, 0, 5, dtype=dt, device=device)
    idx = torch.zeros(2, 0, 5, dtype=torch.int64, device=device)
    loss = kdkernels.sparse_divergence(s, lp, idx, reduction=reduction, backend=backend)
    loss.sum().backward()
    assert loss.shape == ((2, 0) if reduction == "none" else ()) and (loss == 0).all()
    assert s.grad.shape == s.shape
    h = torch.zeros(0, 8, dtype=dt, device=device, requires_grad=True)
    w = torch.randn(30, 8, dtype=dt, device=device, requires_grad=True)
    loss = kdkernels.fused_linear_sparse_divergence(h, w, lp[0], idx[0], reduction=reduction,
                                                    backend=backend)
    loss.sum().backward()
    assert (loss == 0).all() and (w.grad == 0).all() and h.grad.shape == (0, 8)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_dropped_rows_are_never_read(backend, device):
    """Dropped rows' student logits may hold anything (NaN here): never read; their gradient
    is 0, and the loss and the other rows' gradients are the clean input's."""
    case = sample_inputs(n=20, v=300, k=7)
    dirty = case["student"].float().clone()
    dirty[case["labels"][:20] == -100] = float("nan")
    opts = dict(kind="jsd", tail="bucket", labels=case["labels"][:20])
    loss, grad = run_sparse(backend, dirty, case["lp"].float(), case["idx"], device, **opts)
    clean_loss, clean = run_sparse(backend, case["student"].float(), case["lp"].float(),
                                   case["idx"], device, **opts)
    assert torch.isfinite(loss) and torch.equal(loss, clean_loss)
    assert torch.isfinite(grad).all() and torch.equal(grad, clean)


# ------------------------------------------------------------------------- dense equality
DENSE_CASES = [pytest.param(kind, params, tail, stored, id=f"{kind}-{tail}-{stored}")
               for kind, params in KINDS for tail, stored in (
                   ("renormalize", "at T"), ("renormalize", "at 1 re-tempered"), ("none", "at T"))]


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("kind,params,tail,stored", DENSE_CASES)
def test_dense_equality(backend, device, kind, params, tail, stored):
    """K = V (the indices a permutation of the vocabulary): every kind equals
    kdkernels.divergence of the full logits at the same temperature, loss and gradient;
    the teacher stored at T, or at 1 and re-tempered to T (ℓ·1/T, renormalized)."""
    n, v, temperature = 13, 600, 2.0
    g = torch.Generator().manual_seed(v + len(kind))
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    at = temperature if stored == "at T" else 1.0
    lp, idx = torch.topk(torch.log_softmax(t / at, -1), v, dim=-1)
    assert torch.equal(idx.sort(-1).values, torch.arange(v).expand(n, v))
    opts = dict(kind=kind, temperature=temperature, **params)
    sparse_opts = dict(tail=tail, teacher_temperature=None if stored == "at T" else 1.0, **opts)

    def dense(dtype):
        x = s.to(dtype).detach().clone().requires_grad_()
        loss = kdkernels.divergence(x, t.to(dtype), backend="reference", **opts)
        loss.backward()
        return loss.detach(), x.grad

    d64, d32 = dense(torch.float64), dense(torch.float32)
    if backend == "reference":
        loss, grad = run_sparse("reference", s, lp, idx, **sparse_opts)
        assert abs(loss.item() - d64[0].item()) <= 1e-10 * abs(d64[0].item()) + 1e-13
        assert (grad - d64[1]).abs().max() <= 1e-10 * d64[1].abs().max()
    else:
        loss, grad = run_sparse(backend, s.float(), lp.float(), idx, device, **sparse_opts)
        assert_matches(loss, d64[0], d32[0], torch.float32, "dense-equality loss")
        assert_matches(grad, d64[1], d32[1], torch.float32, "dense-equality grad")


# ------------------------------------------------------------------------ dtypes and layout
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Every (student dtype, teacher dtype) pair, the index dtype, tail and kind rotating; and a
# float64 teacher with an fp32 student.
DTYPE_CASES = [pytest.param(sd, ld, (torch.int32, torch.int64)[(i + j) % 2], TAILS[(i + 2 * j) % 3],
                            KINDS[(2 * i + j) % 4], id=f"{sd}-{ld}".replace("torch.", ""))
               for i, sd in enumerate(DTYPES) for j, ld in enumerate(DTYPES)]
DTYPE_CASES.append(pytest.param(torch.float32, torch.float64, torch.int32, "bucket",
                                KINDS[2], id="float32-float64"))


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype,lp_dtype,idx_dtype,tail,kind", DTYPE_CASES)
def test_dtypes(backend, device, dtype, lp_dtype, idx_dtype, tail, kind):
    """Student logits in each dtype, teacher log-probs stored in each dtype, int32 or int64
    indices: the reference on float64 copies of the same (rounded) values."""
    case = sample_inputs(n=17, v=V, k=64, seed=3)
    lp, idx = case["lp"].to(lp_dtype), case["idx"].to(idx_dtype)
    check_sparse(backend, case["student"], lp, idx, dtype=dtype, device=device, kind=kind[0],
                 tail=tail, temperature=2.0, labels=case["labels"][:17], **kind[1])


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_per_row_gradient(backend, device, dtype):
    """16-bit logits with reduction='none' (each row scaled by its own upstream gradient in
    backward): the gradient is within the dtype's rounding of the reference's."""
    case = sample_inputs(n=17, v=V, k=7, seed=4)
    check_sparse(backend, case["student"], case["lp"].float(), case["idx"], dtype=dtype,
                 device=device, kind="fkl", tail="bucket", reduction="none")


@pytest.mark.parametrize("backend,device", KERNELS)
def test_noncontiguous_and_leading_dims(backend, device):
    """A transposed-then-sliced student (column stride ≠ 1), and the teacher's log-probs
    and indices strided slices of wider tensors, with leading dims (3, 7): the contiguous
    copies' results, and the reference's."""
    case = sample_inputs(n=21, v=V, k=7, seed=5)
    wide = torch.zeros(V + 9, 21, device=device)
    wide[:V] = case["student"].t().float()
    s = wide.t()[:, :V].reshape(3, 7, V)  # strides (7, 1, 21): a view, column stride 21
    lp_wide = torch.zeros(21, 14, device=device)
    lp_wide[:, ::2] = case["lp"].float()
    idx_wide = torch.zeros(21, 21, dtype=torch.int64, device=device)
    idx_wide[:, ::3] = case["idx"]
    lp, idx = lp_wide[:, ::2].reshape(3, 7, 7), idx_wide[:, ::3].reshape(3, 7, 7)
    assert s.stride() == (7, 1, 21) and lp.stride() == (98, 14, 2) and idx.stride()[-1] == 3
    labels = case["labels"].reshape(3, 7)
    opts = dict(kind="tvd", tail="bucket", labels=labels, reduction="none")
    loss, grad, _ = check_sparse(backend, s, lp, idx, what="strided", device=device, **opts)
    assert loss.shape == (3, 7) and grad.shape == (3, 7, V)
    loss_c, grad_c = run_sparse(backend, s.contiguous(), lp.contiguous(), idx.contiguous(),
                                device, **opts)
    assert torch.equal(loss, loss_c) and torch.equal(grad, grad_c)


def test_teacher_gets_no_gradient():
    case = sample_inputs(n=8, v=60, k=7)
    s = case["student"].float().requires_grad_()
    lp = case["lp"].float().requires_grad_()
    kdkernels.sparse_divergence(s, lp, case["idx"], backend="cpu").backward()
    assert s.grad is not None and lp.grad is None


@pytest.mark.parametrize("backend,device", [c for c in KERNELS if c.values[0] == "triton"])
def test_triton_multi_block_rows(monkeypatch, backend, device):
    """The GPU's Triton path sweeps rows in blocks (4096 logits); interpreted, rows are one
    block. Blocks of 256 here (V = 1271: 5 blocks, the last one partial), −inf logits in
    the first block (the online maximum's all −inf start)."""
    from kdkernels.triton_kernels import sparse as tk  # noqa: PLC0415

    monkeypatch.setitem(tk.MAX_BLOCK, "interpreted", 256)
    monkeypatch.setitem(tk.MAX_BLOCK, "gpu", 256)
    case = sample_inputs(n=9, v=V, k=64, seed=6)
    s = case["student"].clone()
    s[1, :300] = NEG_INF
    for kind, params in KINDS[1:3]:
        check_sparse("triton", s, case["lp"].float(), case["idx"], what=f"{kind} blocks",
                     device=device, kind=kind, tail="bucket", temperature=2.0, **params)
    values, indices = (x.cpu() for x in kdkernels.topk_logprobs(on(device, s.float()), 5,
                                                                backend="triton"))
    want_v, want_i = ref_sparse.topk_logprobs(s.float().double(), 5)
    assert torch.equal(indices, want_i)
    assert_matches(values, want_v, None, torch.float32, "topk blocks", factor=0.0)


# ------------------------------------------------------------------------------ extractors
def check_topk(values, indices, logits64, k, temperature, dtype, exact_ids):
    """Extracted (values, indices) against torch.topk(log_softmax) in float64 and the
    reference extractor. exact_ids: the logits are exact in fp32 and 1/T a power of two (the
    order of z/T is the float64 order): the indices must be the reference's (ties: the lower
    index first). Otherwise (rounded matmuls) the indices must pick values within the
    tolerance of the float64 top-k ones, and equal it wherever the top-k has no near-tie."""
    logp = torch.log_softmax(logits64 / temperature, -1)
    top_v, top_i = torch.topk(logp, k, dim=-1)
    # the (k+1)-th value, or −inf at k = V: a tie across the k-th position is a tie too
    nxt = torch.topk(logp, k + 1, dim=-1).values[..., -1:] if k < logp.shape[-1] \
        else torch.full_like(top_v[..., :1], NEG_INF)
    ref_v, ref_i = ref_sparse.topk_logprobs(logits64, k, temperature=temperature)
    ref32_v = torch.topk(torch.log_softmax(logits64.float() / temperature, -1), k, -1).values
    assert values.dtype == dtype and indices.dtype == torch.int64
    assert values.shape == indices.shape == logits64.shape[:-1] + (k,)
    assert torch.equal(ref_v, top_v)  # the reference's values are torch.topk's
    assert_matches(values, ref_v, ref32_v, dtype, "topk values")
    assert (values[..., 1:] <= values[..., :-1]).all(), "values sorted descending"
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "indices unique per row"
    if exact_ids:
        assert torch.equal(indices, ref_i)
        ext = torch.cat([top_v, nxt], -1)
        distinct = (ext[..., 1:] != ext[..., :-1]).all(-1)
        assert torch.equal(indices[distinct], top_i[distinct])  # no ties: torch.topk's too
    else:
        picked = logp.gather(-1, indices)
        assert_matches(picked.to(dtype), ref_v, ref32_v, dtype, "topk picked values",
                       factor=16.0)
        gaps = torch.cat([ref_v[..., :1] * 0 + 1, (ref_v[..., :-1] - ref_v[..., 1:])], -1)
        gaps = torch.minimum(gaps, torch.cat([gaps[..., 1:], gaps[..., :1] * 0 + 1], -1))
        clear = gaps > 1e-4
        clear[..., -1] &= (ref_v[..., -1] - nxt[..., 0]) > 1e-4  # the k-th against the next
        assert torch.equal(indices[clear], ref_i[clear])


# k, temperature (1/T exact or not), input dtype, logprob_dtype, chunk: every k, every value
# of each other option at least twice.
TOPK_CASES = [
    pytest.param(1, 1.0, torch.float32, torch.float32, None, id="k1"),
    pytest.param(7, 2.0, torch.bfloat16, torch.bfloat16, 7, id="k7-T2-bf16in-bf16out-chunk7"),
    pytest.param(64, 1.5, torch.float32, torch.bfloat16, 5, id="k64-T1.5-bf16out-chunk5"),
    pytest.param(1024, 0.5, torch.float16, torch.float32, 16, id="k1024-T0.5-fp16in-chunk16"),
    pytest.param(64, 1.0, torch.bfloat16, torch.float16, None, id="k64-bf16in-fp16out"),
    pytest.param(900, 2.0, torch.float32, torch.float32, 10, id="k=V-T2-chunk10"),
]


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("k,temperature,dtype,logprob_dtype,chunk", TOPK_CASES)
def test_topk_logprobs(backend, device, k, temperature, dtype, logprob_dtype, chunk):
    v = k if k == 900 else V  # k = V (every id, sorted)
    g = torch.Generator().manual_seed(k)
    z = (torch.randn(N, v, generator=g) * 3).to(dtype)
    if k < v:  # −inf logits: probability 0, never picked before finite ones
        z[3, ::50] = NEG_INF
        z[3, :40] = NEG_INF
    values, indices = kdkernels.topk_logprobs(on(device, z), k, temperature=temperature,
                                              logprob_dtype=logprob_dtype, chunk_size=chunk,
                                              backend=backend)
    values, indices = values.cpu(), indices.cpu()
    exact = temperature in (0.5, 1.0, 2.0)
    check_topk(values, indices, z.double(), k, temperature, logprob_dtype, exact)
    assert k == v or not (indices[3] < 40).any()


def test_topk_k_equals_v_is_refused_beyond_1024():
    with pytest.raises(ValueError, match="k must be in"):
        kdkernels.topk_logprobs(torch.randn(2, 1271), 1271)


def _tie_logits():
    """Integer logits (ties everywhere, also at the k-th position), and rows made by hand."""
    g = torch.Generator().manual_seed(9)
    z = torch.randint(-4, 5, (N, 300), generator=g).float()
    z[0] = 0.0  # every logit tied
    z[1] = 0.0
    z[1, [40, 3, 17]] = torch.tensor([2.0, 1.0, 1.0])
    return z


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("k", [1, 5, 37, 300])
def test_topk_ties_take_the_lower_index(backend, device, k):
    z = _tie_logits()
    values, indices = kdkernels.topk_logprobs(on(device, z.reshape(1, N, 300)), k,
                                              chunk_size=6, backend=backend)
    assert values.shape == (1, N, k)
    values, indices = values[0].cpu(), indices[0].cpu()
    check_topk(values, indices, z.double(), k, 1.0, torch.float32, exact_ids=True)
    # by hand: row 0 all tied: 0, 1, ...; row 1: 40 (2), then 3 and 17 (1), then 0, 1, 2, ...
    assert indices[0].tolist() == list(range(k))
    want = ([40, 3, 17] + [i for i in range(300) if i not in (3, 17, 40)])[:k]
    assert indices[1].tolist() == want
    assert torch.allclose(values[0].double(), torch.full((k,), -math.log(300.0),
                                                         dtype=torch.float64))


def fused_topk_inputs(n=N, h=64, v=1300, *, seed=0, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # exact logits in any summation order: integers, with ties
        hidden = torch.randint(-1, 2, (n, h), generator=g).double()
        weight = torch.randint(-2, 3, (v, h), generator=g).double()
        bias = torch.randint(-2, 3, (v,), generator=g).double()
    else:
        hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
        weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (3 / h ** 0.5)
        bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    return hidden, weight, bias


def fused_logits64(hidden, weight, bias, *, vocab, scale=1.0, cap=None):
    """The logits, written out here: scale·(h·W[:vocab]ᵀ + b[:vocab]), softcapped."""
    z = hidden.double() @ weight[:vocab].double().t()
    if bias is not None:
        z = z + bias[:vocab].double()
    z = z * scale
    return z if cap is None else cap * torch.tanh(z / cap)


# k, temperature, logit_scale, softcap, bias, vocab_size, chunk, hidden dtype, logprob dtype
FUSED_TOPK_CASES = [
    pytest.param(1, 1.0, 1.0, None, False, None, None, torch.float32, torch.float32, id="k1"),
    pytest.param(7, 1.5, 1.3, 6.0, True, 1271, 8, torch.float32, torch.bfloat16,
                 id="k7-T1.5-scale-softcap-bias-vocab-chunk8-bf16out"),
    pytest.param(64, 2.0, 0.7, None, True, 1271, 5, torch.bfloat16, torch.float32,
                 id="k64-T2-scale-bias-vocab-chunk5-bf16in"),
    pytest.param(1024, 1.0, 1.0, 10.0, False, None, 16, torch.float32, torch.float32,
                 id="k1024-softcap-chunk16"),
]


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("k,temperature,scale,cap,bias,vocab,chunk,dtype,logprob_dtype",
                         FUSED_TOPK_CASES)
def test_fused_linear_topk_logprobs(backend, device, k, temperature, scale, cap, bias, vocab,
                                    chunk, dtype, logprob_dtype):
    hidden, weight, b = fused_topk_inputs(seed=k)
    hidden, weight, b = (x.to(dtype) for x in (hidden, weight, b))
    values, indices = kdkernels.fused_linear_topk_logprobs(
        on(device, hidden), on(device, weight), k, bias=on(device, b) if bias else None,
        logit_scale=scale, softcap=cap, temperature=temperature, vocab_size=vocab,
        chunk_size=chunk, logprob_dtype=logprob_dtype, backend=backend)
    values, indices = values.cpu(), indices.cpu()
    z = fused_logits64(hidden, weight, b if bias else None, vocab=vocab or 1300, scale=scale,
                       cap=cap)
    check_topk(values, indices, z, k, temperature, logprob_dtype, exact_ids=False)
    assert int(indices.max()) < (vocab or 1300)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_fused_linear_topk_ties(backend, device):
    """Integer hidden states, weights and bias: integer logits, exact in every summation
    order, tied everywhere: the indices are the reference's (the lower ones first), in
    chunks of 6 rows, with a padded lm_head (vocab_size) and logit_scale 0.5 (exact)."""
    hidden, weight, bias = fused_topk_inputs(v=400, integer=True)
    for k in (1, 9, 60):
        values, indices = kdkernels.fused_linear_topk_logprobs(
            *on(device, hidden.float(), weight.float()), k, bias=on(device, bias.float()),
            logit_scale=0.5, vocab_size=350, chunk_size=6, temperature=2.0, backend=backend)
        values, indices = values.cpu(), indices.cpu()
        z = fused_logits64(hidden, weight, bias, vocab=350, scale=0.5)
        check_topk(values, indices, z, k, 2.0, torch.float32, exact_ids=True)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_topk_rows_without_a_distribution(backend, device):
    z = torch.randn(4, 50, device=device)
    z[2] = NEG_INF
    with pytest.raises(ValueError, match="row 2"):
        kdkernels.topk_logprobs(z, 3, backend=backend)
    z[2] = 0.0
    z[1, 4] = float("nan")
    with pytest.raises(ValueError, match="row 1"):
        kdkernels.topk_logprobs(z, 3, backend=backend)


# ------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("tail,temperature,stored_at", [("bucket", 2.0, 2.0),
                                                        ("renormalize", 2.0, 1.0)],
                         ids=["bucket-stored-at-T", "renormalize-re-tempered"])
def test_round_trip(backend, device, tail, temperature, stored_at):
    """A teacher's top-64 extracted by fused_linear_topk_logprobs, stored as bf16 log-probs
    and int32 indices, then fused_linear_sparse_divergence of a student against them: the
    reference on float64 copies of the student and of the stored teacher."""
    g = torch.Generator().manual_seed(11)
    ht = torch.randn(N, 160, generator=g)
    wt = torch.randn(V, 160, generator=g) * (3 / 160 ** 0.5)
    lp, idx = kdkernels.fused_linear_topk_logprobs(*on(device, ht, wt), 64,
                                                   temperature=stored_at, chunk_size=16,
                                                   logprob_dtype=torch.bfloat16, backend=backend)
    lp, idx = lp.cpu(), idx.to(torch.int32).cpu()  # the cache
    assert lp.dtype == torch.bfloat16
    case, t = fused_inputs(n=N, h=H, v=V, k=1, seed=12)
    retemper = None if stored_at == temperature else stored_at
    check_fused(backend, case, lp, idx, what="round trip", device=device, kind="jsd", tail=tail,
                temperature=temperature, teacher_temperature=retemper, labels=t["labels"],
                hard_label_weight=0.2, chunk_size=16)


# ------------------------------------------------------------------- compile and opcheck
def test_compiled_sparse_divergence():
    case = sample_inputs(n=24, v=500, k=16)
    lp, idx = case["lp"][:24].float(), case["idx"][:24].to(torch.int32)

    def fn(z):
        return kdkernels.sparse_divergence(torch.tanh(z) * 4.0, lp, idx, kind="jsd",
                                           tail="bucket", temperature=2.0, beta=0.3,
                                           labels=case["labels"][:24], backend="cpu")

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        z = case["student"].float().clone().requires_grad_()
        loss = f(z)
        loss.backward()
        results.append((loss.detach(), z.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-7)
    # the value checks run inside the op: compiled calls get them too
    bad = idx.clone()
    bad[0, 0] = 500
    with pytest.raises(ValueError, match="teacher_indices must be in"):
        torch.compile(lambda z: kdkernels.sparse_divergence(z, lp, bad, backend="cpu"),
                      fullgraph=True)(case["student"].float())


def test_compiled_fused_linear_sparse_divergence():
    case, t = fused_inputs(n=24, h=32, v=500, k=16, bias=True)
    c = {k: v.float() for k, v in case.items()}
    proj = torch.nn.Linear(32, 32)
    lp, idx = t["lp"][:24].float(), t["idx"][:24]

    def fn(x, w, b):
        return kdkernels.fused_linear_sparse_divergence(
            proj(x), w, lp, idx, student_bias=b, kind="rkl", tail="renormalize",
            temperature=2.0, teacher_temperature=1.0, labels=t["labels"][:24],
            hard_label_weight=0.3, student_softcap=6.0, chunk_size=7, backend="cpu")

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        proj.zero_grad()
        w = c["student_weight"].clone().requires_grad_()
        b = c["student_bias"].clone().requires_grad_()
        loss = f(c["student_hidden"], w, b)
        loss.backward()
        results.append((loss.detach(), w.grad, b.grad, proj.weight.grad.clone()))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def sparse_op_args(case, *, kind="jsd", beta=0.3, tail="bucket", temperature=2.0,
                   teacher_temperature=0.0, reduce=True, rows="labels"):
    """Op-level arguments of kdkernels::sparse_divergence_fwd for a sample_inputs case."""
    n = case["student"].shape[0]
    kept = P.kept_rows((n,), torch.device("cpu"), **row_options(case, rows))
    w = P.row_weights(n, kept, scale=temperature ** 2, reduction="mean" if reduce else "none",
                      num_items=None, device=torch.device("cpu"))
    return (case["student"].float().requires_grad_(), case["lp"].float(), case["idx"], w, kind,
            beta, tail, temperature, teacher_temperature, 4, "cpu", reduce, True)


OPCHECK_SPARSE = [dict(), dict(kind="fkl", tail="renormalize", teacher_temperature=1.0,
                               reduce=False, rows="mask"),
                  dict(kind="tvd", tail="none", rows="all")]


@pytest.mark.parametrize("i", range(len(OPCHECK_SPARSE)))
def test_opcheck_sparse_divergence(i):
    case = sample_inputs(n=9, v=67, k=7)
    torch.library.opcheck(torch.ops.kdkernels.sparse_divergence_fwd.default,
                          sparse_op_args(case, **OPCHECK_SPARSE[i]))


def fused_op_args(case, t, *, bias, ce, reduce, cap, kind="jsd", tail="bucket",
                  teacher_temperature=0.0):
    """Op-level arguments of kdkernels::fused_linear_sparse_divergence_fwd."""
    n = case["student_hidden"].shape[0]
    kept = t["labels"] != -100
    reduction = "mean" if reduce else "none"
    w = P.row_weights(n, kept, scale=4.0, reduction=reduction, num_items=None,
                      device=torch.device("cpu"))
    labels, ce_w = P.cross_entropy_rows(n, kept, t["labels"] if ce else None,
                                        reduction=reduction, num_items=None,
                                        device=torch.device("cpu"), dtype=torch.float32)
    c = {k: v.float().requires_grad_() for k, v in case.items()}
    return [c["student_hidden"], c["student_weight"], c["student_bias"] if bias else None,
            t["lp"].float(), t["idx"], w, ce_w, labels, 67, kind, 0.3, tail, 2.0,
            teacher_temperature, 1.0, 0.5 if ce else 0.0, 1.2, cap, 4, "cpu", reduce, True,
            True, bias, True, True]


FUSED_OPCHECK = [dict(bias=False, ce=False, reduce=True, cap=0.0),
                 dict(bias=True, ce=True, reduce=True, cap=3.0, kind="rkl", tail="renormalize",
                      teacher_temperature=1.0),
                 dict(bias=True, ce=True, reduce=False, cap=3.0, kind="tvd", tail="none")]


@pytest.mark.parametrize("i", range(len(FUSED_OPCHECK)), ids=["reduce", "ce-softcap", "per-row"])
def test_opcheck_fused_linear_sparse_divergence(i):
    case, t = fused_inputs(n=9, h=16, v=67, k=7, bias=True)
    torch.library.opcheck(torch.ops.kdkernels.fused_linear_sparse_divergence_fwd.default,
                          fused_op_args(case, t, **FUSED_OPCHECK[i]))


def test_opcheck_fused_linear_sparse_divergence_bwd():
    """The reduction='none' backward op (the chunk loop again)."""
    case, t = fused_inputs(n=9, h=16, v=67, k=7, bias=True)
    fwd = [a.detach() if isinstance(a, torch.Tensor) else a
           for a in fused_op_args(case, t, **FUSED_OPCHECK[2])]
    bwd = [torch.linspace(-1.0, 1.0, 9)] + fwd[:20] + fwd[21:24] + fwd[25:]
    torch.library.opcheck(torch.ops.kdkernels.fused_linear_sparse_divergence_bwd.default, bwd)


def test_opcheck_topk_ops():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 67, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.kdkernels.topk_logprobs.default,
                              (z, 5, 1.5, 4, "cpu", dtype))
    h, w, b = torch.randn(9, 16, generator=g), torch.randn(70, 16, generator=g), torch.randn(70)
    for bias, cap in ((None, 0.0), (b, 3.0)):
        torch.library.opcheck(torch.ops.kdkernels.fused_linear_topk_logprobs.default,
                              (h, w, bias, 5, 67, 1.2, cap, 2.0, 4, "cpu", torch.bfloat16))


# ------------------------------------------------------------------------------ bad input
def _bad_sparse(**overrides):
    case = sample_inputs(n=4, v=20, k=5, pad=False)
    args = dict(student_logits=case["student"].float(), teacher_logprobs=case["lp"].float(),
                teacher_indices=case["idx"])
    args.update(overrides)
    return args


def _teacher(shape, value):
    """A teacher of constant log-probabilities (value) at ids 0, 1, …: the shape checks."""
    k = shape[-1]
    return dict(teacher_logprobs=torch.full(shape, value),
                teacher_indices=torch.arange(k).expand(shape).contiguous())


def _lp_at(r, c, v, base=-3.0):
    lp = torch.full((4, 5), base)
    lp[r, c] = v
    return lp


def _idx_with(r, c, v, idx=None):
    idx = (_bad_sparse()["teacher_indices"] if idx is None else idx).clone()
    idx[r, c] = v
    return idx


SPARSE_ERRORS = [
    (dict(teacher_indices=torch.zeros(4, 6, dtype=torch.int64)), ValueError,
     "teacher_logprobs and teacher_indices must have the same shape"),
    (_teacher((4, 21), -5.0), ValueError, "teacher_logprobs' K must be in"),  # K > V = 20
    (dict(student_logits=torch.zeros(4, 2000), **_teacher((4, 1025), -9.0)), ValueError,
     "1024"),
    (dict(teacher_indices=_idx_with(1, 2, -1)), ValueError, "teacher_indices must be in"),
    (dict(teacher_indices=_idx_with(3, 0, 20)), ValueError, "teacher_indices must be in"),
    (dict(teacher_logprobs=_lp_at(2, 1, 0.01)), ValueError,
     "teacher_logprobs must be log-probabilities"),
    (dict(teacher_logprobs=torch.full((4, 5), math.log(0.21))), ValueError,
     r"exp\(teacher_logprobs\) sum to"),
    (dict(teacher_logprobs=_lp_at(0, 4, float("nan"))), ValueError, "teacher_logprobs hold NaN"),
    (dict(teacher_indices=torch.zeros(4, 5)), TypeError, "teacher_indices must be an int32"),
    (dict(teacher_indices=torch.zeros(4, 5, dtype=torch.int16)), TypeError, "teacher_indices"),
    (dict(teacher_logprobs=torch.zeros(4, 5, dtype=torch.int64)), TypeError, "teacher_logprobs"),
    (_teacher((5, 5), -3.0), ValueError, "leading dims of student_logits"),
    (_teacher((2, 2, 5), -3.0), ValueError, "leading dims of student_logits"),
    (dict(kind="skew_fkl"), ValueError, "skew_fkl"),
    (dict(kind="kl"), ValueError, "kind"),
    (dict(tail="drop"), ValueError, "tail"),
    (dict(tail="bucket", teacher_temperature=2.0), ValueError, "teacher_temperature"),
    (dict(teacher_temperature=0.0), ValueError, "teacher_temperature"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(beta=1.5, kind="jsd"), ValueError, "beta"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
    (dict(num_items=10, reduction="sum"), ValueError, "num_items"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(student_logits=torch.zeros(4, 20, dtype=torch.int32)), TypeError, "student_logits"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("overrides,error,match", SPARSE_ERRORS,
                         ids=[str(i) for i in range(len(SPARSE_ERRORS))])
def test_bad_input(backend, overrides, error, match):
    with pytest.raises(error, match=match):
        kdkernels.sparse_divergence(**_bad_sparse(**overrides), backend=backend)


# The fused op's own checks, and the teacher checks again there (its leading dims are the
# hidden states', its V the vocab_size).
def _bad_fused(**overrides):
    case, t = fused_inputs(n=4, h=8, v=20, k=5, bias=True, pad=False)
    args = dict(student_hidden=case["student_hidden"].float(),
                student_weight=case["student_weight"].float(),
                teacher_logprobs=t["lp"].float(), teacher_indices=t["idx"])
    args.update(overrides)
    return args


FUSED_ERRORS = [
    (dict(teacher_indices=torch.zeros(4, 4, dtype=torch.int64)), ValueError, "same shape"),
    (_teacher((3, 5), -3.0), ValueError, "leading dims of student_hidden"),
    (dict(vocab_size=4), ValueError, "teacher_logprobs' K must be in"),
    (dict(vocab_size=10, teacher_indices=torch.arange(10, 15).expand(4, 5)), ValueError,
     "teacher_indices must be in"),
    (dict(teacher_logprobs=torch.full((4, 5), 0.5)), ValueError, "log-probabilities"),
    (dict(teacher_indices=torch.zeros(4, 5, dtype=torch.float32)), TypeError, "teacher_indices"),
    (dict(kind="skew_rkl"), ValueError, "skew_rkl"),
    (dict(tail="Bucket"), ValueError, "tail"),
    (dict(tail="bucket", teacher_temperature=1.5), ValueError, "teacher_temperature"),
    (dict(hard_label_weight=0.5), ValueError, "needs labels"),
    (dict(student_weight=torch.zeros(20, 9)), ValueError, "student_weight"),
]


@pytest.mark.parametrize("overrides,error,match", FUSED_ERRORS,
                         ids=[str(i) for i in range(len(FUSED_ERRORS))])
def test_fused_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        kdkernels.fused_linear_sparse_divergence(**_bad_fused(**overrides), backend="cpu")


@pytest.mark.parametrize("fused", [False, True], ids=["topk_logprobs", "fused_linear_topk"])
@pytest.mark.parametrize("k,error,match", [(0, ValueError, "k must be in"),
                                           (-3, ValueError, "k must be in"),
                                           (21, ValueError, "k must be in"),
                                           (2.0, TypeError, "k"),
                                           ("kdk", TypeError, "k")])
def test_extractors_bad_k(fused, k, error, match):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(error, match=match):
        if fused:  # a padded lm_head: V is vocab_size = 20, not the weight's 30 rows
            kdkernels.fused_linear_topk_logprobs(torch.randn(3, 8, generator=g),
                                                 torch.randn(30, 8, generator=g), k,
                                                 vocab_size=20)
        else:
            kdkernels.topk_logprobs(torch.randn(3, 20, generator=g), k)


def test_extractors_bad_options():
    z, h, w = torch.randn(3, 20), torch.randn(3, 8), torch.randn(20, 8)
    for call, error, match in (
            (lambda: kdkernels.topk_logprobs(z, 3, temperature=0.0), ValueError, "temperature"),
            (lambda: kdkernels.topk_logprobs(z, 3, logprob_dtype=torch.int32), TypeError,
             "logprob_dtype"),
            (lambda: kdkernels.topk_logprobs(z, 3, chunk_size=0), ValueError, "chunk_size"),
            (lambda: kdkernels.topk_logprobs(z.long(), 3), TypeError, "logits"),
            (lambda: kdkernels.fused_linear_topk_logprobs(h, w, 3, softcap=0.0), ValueError,
             "softcap"),
            (lambda: kdkernels.fused_linear_topk_logprobs(h, w, 3, logit_scale=-1.0),
             ValueError, "logit_scale"),
            (lambda: kdkernels.fused_linear_topk_logprobs(h, w, 3, vocab_size=21), ValueError,
             "vocab_size"),
            (lambda: kdkernels.fused_linear_topk_logprobs(h, w, 3, bias=torch.zeros(19)),
             ValueError, "bias")):
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sum_tolerance_allows_the_stored_rounding(backend):
    """A row's stored probabilities may sum a little above 1 by their dtype's rounding (a
    bf16 cache: ~1%), not by more."""
    s = torch.randn(2, 20, dtype=torch.float64 if backend == "reference" else torch.float32)
    idx = torch.arange(5).expand(2, 5)
    ok = torch.full((2, 5), math.log(1.01 / 5)).to(torch.bfloat16)
    loss = kdkernels.sparse_divergence(s, ok, idx, tail="bucket", backend=backend)
    assert torch.isfinite(loss)
    one = torch.full((2, 1), 5e-4)  # a log-prob just above 0 (rounding), K = 1
    assert torch.isfinite(kdkernels.sparse_divergence(s, one, idx[:, :1], backend=backend))
    for lp in (torch.full((2, 5), math.log(1.1 / 5)).to(torch.bfloat16),
               torch.full((2, 5), math.log(1.05 / 5))):
        with pytest.raises(ValueError, match="sum to"):
            kdkernels.sparse_divergence(s, lp, idx, backend=backend)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_ignore_index(backend, device):
    """labels with a custom ignore_index drop the same rows as the equivalent mask."""
    case = sample_inputs(n=12, v=100, k=7)
    dt = torch.float64 if backend == "reference" else torch.float32
    s, lp, idx = on(device, case["student"].to(dt), case["lp"].to(dt), case["idx"])
    labels = torch.randint(0, 100, (12,), generator=torch.Generator().manual_seed(2))
    labels[[1, 4, 5]] = 7
    labels = labels.to(device)
    by_label = kdkernels.sparse_divergence(s, lp, idx, labels=labels, ignore_index=7,
                                           kind="rkl", tail="bucket", backend=backend)
    by_mask = kdkernels.sparse_divergence(s, lp, idx, mask=labels != 7, kind="rkl",
                                          tail="bucket", backend=backend)
    everything = kdkernels.sparse_divergence(s, lp, idx, kind="rkl", tail="bucket",
                                             backend=backend)
    assert torch.equal(by_label, by_mask) and not torch.equal(by_label, everything)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_duplicate_indices_checked_in_debug_mode(monkeypatch, backend):
    """KDKERNELS_DEBUG=1 checks that a row's real entries have distinct ids (a padding entry
    may repeat one); without it the check is skipped (the caller's duty)."""
    args = _bad_sparse()
    idx = args["teacher_indices"].clone()
    lp = args["teacher_logprobs"].clone()
    padded = idx.clone()
    padded[1, 4] = padded[1, 0]
    lp_padded = lp.clone()
    lp_padded[1, 4] = NEG_INF
    idx[2, 3] = idx[2, 1]  # a repeat among real entries
    monkeypatch.delenv("KDKERNELS_DEBUG", raising=False)
    kdkernels.sparse_divergence(args["student_logits"], lp, idx, backend=backend)
    monkeypatch.setenv("KDKERNELS_DEBUG", "1")
    kdkernels.sparse_divergence(args["student_logits"], lp_padded, padded, backend=backend)
    with pytest.raises(ValueError, match="teacher_indices repeat a vocabulary id within row 2"):
        kdkernels.sparse_divergence(args["student_logits"], lp, idx, backend=backend)
    f = _bad_fused()
    with pytest.raises(ValueError, match="teacher_indices repeat"):
        kdkernels.fused_linear_sparse_divergence(
            f["student_hidden"], f["student_weight"], f["teacher_logprobs"],
            _idx_with(0, 1, int(f["teacher_indices"][0, 0]), f["teacher_indices"]),
            backend=backend)


# --------------------------------------------------------------------------------- modules
def test_modules_match_functions():
    """kdkernels.nn.SparseDivergenceLoss / FusedLinearSparseDivergenceLoss equal the
    functions (loss and gradients), take the tensors per call, check options when built."""
    case = sample_inputs(n=12, v=300, k=7)
    s, lp, idx = case["student"].float(), case["lp"][:12].float(), case["idx"][:12]
    opts = dict(kind="jsd", beta=0.3, tail="bucket", temperature=2.0)
    module = kdkernels.nn.SparseDivergenceLoss(**opts)
    grads = []
    for fn in (lambda x: module(x, lp, idx, labels=case["labels"][:12]),
               lambda x: kdkernels.sparse_divergence(x, lp, idx, labels=case["labels"][:12],
                                                     **opts)):
        x = s.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    ref = kdkernels.sparse_divergence(s.double(), lp.double(), idx, labels=case["labels"][:12],
                                      backend="reference", **opts)
    assert abs(grads[0][0].item() - ref.item()) < 1e-5 * ref.item()  # not a constant
    got = kdkernels.nn.SparseDivergenceLoss(kind="tvd", reduction="none")(s, lp, idx,
                                                                          mask=case["mask"][:12])
    assert got.shape == (12,) and (got[~case["mask"][:12]] == 0).all()
    fc, t = fused_inputs(n=12, h=16, v=300, k=7, bias=True)
    c = {k: v.float() for k, v in fc.items()}
    fopts = dict(kind="rkl", tail="renormalize", temperature=1.5, teacher_temperature=1.0,
                 chunk_size=5)
    fmod = kdkernels.nn.FusedLinearSparseDivergenceLoss(**fopts)
    got = fmod(c["student_hidden"], c["student_weight"], t["lp"].float(), t["idx"],
               labels=t["labels"], student_bias=c["student_bias"])
    want = kdkernels.fused_linear_sparse_divergence(
        c["student_hidden"], c["student_weight"], t["lp"].float(), t["idx"],
        labels=t["labels"], student_bias=c["student_bias"], **fopts)
    assert torch.equal(got, want)
    _, t2 = fused_inputs(n=12, h=16, v=300, k=7, vocab=250)  # a teacher of the first 250 ids
    fmod = kdkernels.nn.FusedLinearSparseDivergenceLoss(hard_label_weight=0.5, vocab_size=250)
    got = fmod(c["student_hidden"], c["student_weight"], t2["lp"].float(), t2["idx"],
               labels=t2["labels"], num_items=30)
    want = kdkernels.fused_linear_sparse_divergence(
        c["student_hidden"], c["student_weight"], t2["lp"].float(), t2["idx"],
        labels=t2["labels"], num_items=30, hard_label_weight=0.5, vocab_size=250)
    assert torch.equal(got, want)


MODULE_ERRORS = [
    (lambda: kdkernels.nn.SparseDivergenceLoss(tail="drop"), ValueError, "tail"),
    (lambda: kdkernels.nn.SparseDivergenceLoss(kind="skew_fkl"), ValueError, "skew_fkl"),
    (lambda: kdkernels.nn.SparseDivergenceLoss(tail="bucket", teacher_temperature=2.0),
     ValueError, "teacher_temperature"),
    (lambda: kdkernels.nn.SparseDivergenceLoss(labels=torch.zeros(1)), TypeError, "per call"),
    (lambda: kdkernels.nn.SparseDivergenceLoss(backend="bogus"), ValueError, "backend"),
    (lambda: kdkernels.nn.FusedLinearSparseDivergenceLoss(tail="bucket", teacher_temperature=2.0),
     ValueError, "teacher_temperature"),
    (lambda: kdkernels.nn.FusedLinearSparseDivergenceLoss(student_bias=torch.zeros(3)),
     TypeError, "per call"),
    (lambda: kdkernels.nn.FusedLinearSparseDivergenceLoss(student_softcap=0.0), ValueError,
     "student_softcap"),
    (lambda: kdkernels.nn.FusedLinearSparseDivergenceLoss(vocab_size=0), ValueError,
     "vocab_size"),
    (lambda: kdkernels.nn.FusedLinearSparseDivergenceLoss(bogus=1), TypeError, "bogus"),
]


@pytest.mark.parametrize("build,error,match", MODULE_ERRORS,
                         ids=[str(i) for i in range(len(MODULE_ERRORS))])
def test_modules_check_options_when_built(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_readme_example():
    """The README's cached-teacher example: top-k of a teacher's hidden states cached as
    bf16 / int32, a student distilled from the cache; its loss must fall."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("transformers")
    run_readme_examples("sparse-example", 1)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_dropped_rows_teacher_never_checked(backend, device):
    """A dropped row's cache entries may hold anything (index −1, log-prob 0, NaN): neither
    read nor checked; the kept rows are the same loss as without that row."""
    case = sample_inputs(n=8, v=50, k=7)
    dt = torch.float64 if backend == "reference" else torch.float32
    s, lp, idx = on(device, case["student"].to(dt), case["lp"].to(dt), case["idx"])
    bad_lp, bad_idx = lp.clone(), idx.clone()
    bad_lp[0], bad_idx[0] = float("nan"), -1
    bad_lp[3], bad_idx[3] = 0.0, 10 ** 6
    labels = torch.ones(8, dtype=torch.long, device=device)
    labels[[0, 3]] = -100
    a = kdkernels.sparse_divergence(s, bad_lp, bad_idx, labels=labels, backend=backend)
    keep = torch.tensor([1, 2, 4, 5, 6, 7], device=device)
    b = kdkernels.sparse_divergence(s[keep], lp[keep], idx[keep], backend=backend)
    assert torch.allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("offset", [30.0, 1000.0])
def test_tiny_temperature_subtracts_the_maximum_first(backend, device, offset):
    """T = 1e-3 on logits offset by up to 1000: the loss, gradient and extracted log-probs
    within the project's tolerance of the float64 reference (dividing before subtracting the
    row maximum lost |z|/T·2^-24: 4e-3 relative at offset 1000)."""
    g = torch.Generator().manual_seed(int(offset))
    z = offset + torch.randn(6, 64, generator=g, dtype=torch.float64) * 1e-3
    t = torch.randn(6, 64, generator=g, dtype=torch.float64) * 2
    lp, idx = torch.topk(torch.log_softmax(t, -1), 7)
    check_sparse(backend, z, lp.float(), idx, kind="jsd", beta=0.3, tail="bucket",
                 temperature=1e-3, what=f"T=1e-3, offset {offset}", device=device)
    values, indices = kdkernels.topk_logprobs(z.float().to(device), 7, temperature=1e-3,
                                              backend=backend)
    ref_values, ref_indices = kdkernels.topk_logprobs(z.float().double(), 7, temperature=1e-3,
                                                      backend="reference")
    assert torch.equal(indices.cpu(), ref_indices)
    assert (values.cpu().double() - ref_values).abs().max() <= 1e-5 * (1 + ref_values.abs().max())


def test_topk_many_ties_vectorized():
    """bf16-rounded logits (many ties at the k-th value): the lower indices, as the spec."""
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(64, 3000, generator=g) * 2).to(torch.bfloat16).float()
    values, indices = kdkernels.topk_logprobs(z, 64, backend="cpu")
    ref_values, ref_indices = kdkernels.topk_logprobs(z.double(), 64, backend="reference")
    assert torch.equal(indices, ref_indices)
    assert torch.allclose(values.double(), ref_values.double(), atol=1e-5)
