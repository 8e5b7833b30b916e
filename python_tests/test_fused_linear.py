"""Fused linear + divergence: every kernel backend against the float64 reference (which
materializes the logits), forward and gradients, with the precision-aware tolerance rule; chunk
sizes, options, dtypes, layouts, tied weights, reductions, compile, opcheck, memory, errors.
The peers (TRL, Liger) as oracles: test_fused_linear_peers.py."""
import pytest
import torch

import kdkernels
from helpers import assert_matches, kernel_cases, run_readme_examples
from kdkernels.ops import fused_linear as fl_ops

KERNELS = kernel_cases()
assert kdkernels.backend_info()["cpu"]  # loads the C++ ops, which the op-level tests call directly
N, HS, HT, VS, VT = 41, 96, 160, 1271, 1301  # the odd shapes


def make(n=N, hs=HS, ht=HT, vs=VS, vt=VT, *, lead=None, bias=False, seed=0):
    """Student/teacher hidden states and lm_heads (float64 masters), logits of scale ~3, labels
    with every fifth row ignored."""
    g = torch.Generator().manual_seed(seed)
    lead = (n,) if lead is None else lead
    case = dict(
        student_hidden=torch.randn(*lead, hs, generator=g, dtype=torch.float64),
        student_weight=torch.randn(vs, hs, generator=g, dtype=torch.float64) * (3 / hs ** 0.5),
        teacher_hidden=torch.randn(*lead, ht, generator=g, dtype=torch.float64),
        teacher_weight=torch.randn(vt, ht, generator=g, dtype=torch.float64) * (3 / ht ** 0.5),
    )
    if bias:
        case["student_bias"] = torch.randn(vs, generator=g, dtype=torch.float64) * 0.5
        case["teacher_bias"] = torch.randn(vt, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, min(vs, vt), lead, generator=g)
    labels.view(-1)[::5] = -100
    return case, labels


STUDENT = ("student_hidden", "student_weight", "student_bias")


def run(case, backend, dtype, upstream=None, **options):
    """Loss and the gradients of the student's tensors, with the inputs cast to dtype. The
    upstream gradient of reduction='none' is a fixed ramp (rows get different factors)."""
    args = {k: v.to(dtype).detach().requires_grad_(k in STUDENT) for k, v in case.items()}
    loss = kdkernels.fused_linear_divergence(**args, backend=backend, **options)
    if loss.dim():
        upstream = torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        (loss * upstream).sum().backward()
    else:
        loss.backward()
    return loss.detach(), {k: args[k].grad for k in STUDENT if k in args}


def check(case, backend, dtype=torch.float32, what="", rounding_units=1.0, **options):
    """backend at dtype against the float64 reference (tolerance: helpers.assert_matches, with
    the fp32 reference run as the fp32-formula error)."""
    ref_loss, ref_grads = run(case, "reference", torch.float64, **options)
    r32_loss, r32_grads = run(case, "reference", torch.float32, **options)
    loss, grads = run(case, backend, dtype, **options)
    assert_matches(loss, ref_loss, r32_loss, torch.float32, f"{what} loss")
    for k, g in grads.items():
        assert g.dtype == dtype, (k, g.dtype)
        assert_matches(g, ref_grads[k], r32_grads[k], dtype, f"{what} d{k}",
                       rounding_units=rounding_units)
    return loss, grads


def _interp_units(backend, dtype):
    """Triton's CPU interpreter rounds to 16 bits by truncation (helpers.assert_matches)."""
    return 2.0 if backend == "triton" and dtype != torch.float32 else 1.0


# ------------------------------------------------------------------------ against the reference
KIND_OPTIONS = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}), ("tvd", {}),
                ("skew_fkl", {"skew": 0.2}), ("skew_rkl", {"skew": 0.4})]


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("kind,params", KIND_OPTIONS, ids=[k for k, _ in KIND_OPTIONS])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kinds_and_reductions(backend, device, kind, params, reduction):
    case, labels = make()
    check(case, backend, what=f"{kind} {reduction}", kind=kind, temperature=2.0, labels=labels,
          reduction=reduction, chunk_size=7, **params)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("chunk", [1, 7, N, 1000, None])
def test_chunk_sizes(backend, device, chunk):
    """Every chunking gives the reference's result (1 row, odd chunks, exactly N, more than N,
    the default budget)."""
    case, labels = make()
    check(case, backend, what=f"chunk {chunk}", kind="jsd", labels=labels, chunk_size=chunk)


OPTIONS = {
    "biases": dict(bias=True),
    "student softcap and scale": dict(student_softcap=2.5, student_logit_scale=1.7),
    "teacher softcap and scale": dict(teacher_softcap=4.0, teacher_logit_scale=0.6),
    "hard labels": dict(hard_label_weight=0.7, soft_label_weight=0.4),
    "hard labels, softcap, bias": dict(bias=True, hard_label_weight=0.5, student_softcap=3.0),
    "taid": dict(taid_t=0.3),
    "taid 0": dict(taid_t=0.0, kind="rkl"),
    "vocab_size": dict(vocab_size=1000),
    "no t2": dict(t2_scale=False, temperature=3.0),
    "num_items": dict(num_items=97),
    "low temperature": dict(temperature=0.05),
}


# reduction="none" recomputes the chunks in backward with per-row weights: the options whose
# backward differs (the cross-entropy and softcap chain rules, biases, TAID's target) again so.
OPTION_CASES = [(name, "mean") for name in OPTIONS] + \
    [(name, "none") for name in ("hard labels, softcap, bias", "taid", "teacher softcap and scale",
                                 "student softcap and scale")]


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("name,reduction", OPTION_CASES, ids=[f"{n}-{r}" for n, r in OPTION_CASES])
def test_options(backend, device, name, reduction):
    opts = dict(OPTIONS[name])
    case, labels = make(bias=opts.pop("bias", False))
    opts.setdefault("kind", "jsd")
    opts.setdefault("temperature", 1.5)
    if reduction == "none":
        opts.pop("num_items", None)
    check(case, backend, what=name, labels=labels, reduction=reduction, chunk_size=16, **opts)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_half_precision(backend, device, dtype, kind):
    """16-bit hidden states and weights: the logits are never rounded to 16 bits (the Liger
    #1432 case), so the loss is as exact as fp32 PyTorch on the 16-bit inputs, and gradients are
    within the dtype's rounding (the reference computes on the same 16-bit values, upcast)."""
    case, labels = make(bias=True)
    case = {k: v.to(dtype).double() for k, v in case.items()}  # the 16-bit values, exactly
    check(case, backend, dtype, what=str(dtype), kind=kind, temperature=2.0, labels=labels,
          hard_label_weight=0.3, chunk_size=9, rounding_units=_interp_units(backend, dtype))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_bf16_weight_grad_accumulated_in_bf16(backend, device):
    """weight_grad_fp32=False: a bf16 weight's gradient accumulates in bf16 across chunks (6
    roundings here, of bf16 products): within 6 bf16 units of the float64 reference, and less
    exact on average than the default's fp32 accumulation with one rounding at the end (which
    a flag that changed nothing would equal)."""
    case, labels = make()
    case = {k: v.to(torch.bfloat16).double() for k, v in case.items()}
    _, ref = run(case, "reference", torch.float64, labels=labels)
    _, fp32_acc = run(case, backend, torch.bfloat16, labels=labels, chunk_size=7)
    _, bf16_acc = run(case, backend, torch.bfloat16, labels=labels, chunk_size=7,
                      weight_grad_fp32=False)
    want = ref["student_weight"]
    err16 = (bf16_acc["student_weight"].double() - want).abs()
    err32 = (fp32_acc["student_weight"].double() - want).abs()
    assert (err16 <= 6 * 2 ** -8 * want.abs().max()).all()
    assert err16.mean() > 1.5 * err32.mean(), (err16.mean(), err32.mean())


@pytest.mark.parametrize("backend,device", KERNELS)
def test_leading_dims_and_noncontiguous_hidden(backend, device):
    """(B, T, H) hidden states that are strided views (a slice of a wider tensor, and a
    transposed one) give the same result as contiguous ones."""
    case, labels = make(lead=(3, 7))
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(3, 7, 2 * HS, generator=g, dtype=torch.float64)
    case["student_hidden"] = wide[..., ::2]  # stride 2 along H
    case["teacher_hidden"] = case["teacher_hidden"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not case["student_hidden"].is_contiguous() and not case["teacher_hidden"].is_contiguous()
    loss, grads = check(case, backend, what="strided", kind="fkl", labels=labels,
                        reduction="none", chunk_size=5)
    assert loss.shape == (3, 7) and grads["student_hidden"].shape == (3, 7, HS)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("n", [6, 0], ids=["all-dropped", "empty"])
def test_all_rows_dropped(backend, device, reduction, n):
    case, _ = make(n=n)
    labels = torch.full((n,), -100)
    loss, grads = run(case, backend, torch.float32, labels=labels, reduction=reduction,
                      hard_label_weight=0.5)
    assert (loss == 0).all()
    for k, g in grads.items():
        assert g is not None and (g == 0).all(), k


@pytest.mark.parametrize("backend,device", KERNELS)
def test_dropped_rows_are_never_read(backend, device):
    """Dropped rows' hidden states may hold anything (NaN here): they are gathered out."""
    case, labels = make()
    dirty = {k: v.clone() for k, v in case.items()}
    dirty["student_hidden"][labels == -100] = float("nan")
    dirty["teacher_hidden"][labels == -100] = float("inf")
    loss, grads = run(dirty, backend, torch.float32, labels=labels, kind="jsd")
    clean_loss, clean = run(case, backend, torch.float32, labels=labels, kind="jsd")
    assert torch.equal(loss, clean_loss)
    assert (grads["student_hidden"][labels == -100] == 0).all()
    for k in grads:
        assert torch.isfinite(grads[k]).all() and torch.allclose(grads[k], clean[k]), k


@pytest.mark.parametrize("backend,device", KERNELS)
def test_nan_rule(backend, device):
    """A kept row whose logits hold NaN has a NaN loss; the other rows are untouched."""
    case, labels = make()
    case["student_hidden"][3, 5] = float("nan")
    loss, _ = run(case, backend, torch.float32, labels=labels, reduction="none")
    ref, _ = run(case, "reference", torch.float64, labels=labels, reduction="none")
    assert torch.isnan(loss[3]) and torch.isnan(ref[3])
    others = torch.arange(N) != 3
    assert torch.isfinite(loss[others]).all()
    assert torch.allclose(loss[others].double(), ref[others], rtol=1e-5, atol=1e-6)


WITH_REFERENCE = KERNELS + [pytest.param("reference", "cpu", id="reference")]


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_terms_with_zero_weight_never_poison_the_loss(backend, device):
    """A term whose weight is 0 is left out, not multiplied by 0: an infinite divergence
    (fkl where the student's logit is −inf and the teacher's is not) with soft_label_weight=0,
    or an infinite cross-entropy (label at a −inf logit) with hard_label_weight=0 and
    return_components=True, or a dropped row's stand-in label at a −inf logit, leave the loss
    and its gradients finite."""
    case, _ = make(n=4, hs=8, ht=12, vs=20, vt=22, bias=True)
    case["student_bias"][9] = float("-inf")
    labels = torch.tensor([1, 2, 3, -100])
    # soft = 0: the divergence is +inf in every row, the loss is the cross-entropy alone
    loss, grads = run(case, backend, torch.float32, labels=labels, soft_label_weight=0.0,
                      hard_label_weight=1.0)
    student = case["student_hidden"] @ case["student_weight"].t() + case["student_bias"]
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert abs(loss.item() - ce.item()) < 1e-5 * ce.item()
    assert all(torch.isfinite(g).all() for g in grads.values())
    # hard = 0, components asked: the cross-entropy (inf: label 9 is −inf) is logged, not added
    case["teacher_bias"][9] = float("-inf")
    args = {k: v.float() for k, v in case.items()}
    labels = torch.tensor([9, 2, 3, -100])
    out = kdkernels.fused_linear_divergence(**args, labels=labels, backend=backend,
                                            return_components=True)
    plain = kdkernels.fused_linear_divergence(**args, labels=labels, backend=backend)
    assert torch.isfinite(plain) and out.loss.item() == plain.item()
    assert out.cross_entropy.item() == float("inf")
    # a dropped row's stand-in label (0) at a −inf logit (of both models: a finite divergence)
    case["student_bias"][0] = case["teacher_bias"][0] = float("-inf")
    loss, grads = run(case, backend, torch.float32, labels=torch.tensor([1, 2, 3, -100]),
                      hard_label_weight=0.5)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("backend,device", KERNELS)
def test_gradient_accumulation(backend, device):
    """Two half batches with num_items = the kept rows of both sum to the full batch's loss
    and gradients."""
    case, labels = make()
    kept = int((labels != -100).sum())
    full_loss, full = run(case, backend, torch.float32, labels=labels, kind="jsd")
    args = {k: v.float().detach().requires_grad_(k in STUDENT) for k, v in case.items()}
    total = 0.0
    for half in (slice(0, 20), slice(20, N)):
        loss = kdkernels.fused_linear_divergence(
            args["student_hidden"][half], args["student_weight"], args["teacher_hidden"][half],
            args["teacher_weight"], kind="jsd", labels=labels[half], num_items=kept,
            backend=backend)
        loss.backward()
        total += loss.item()
    assert abs(total - full_loss.item()) <= 1e-6 * abs(full_loss.item()) + 1e-7
    for k in full:
        torch.testing.assert_close(args[k].grad, full[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_tied_weights(backend, device):
    """The student's lm_head is its input embedding (tied): the embedding's gradient is the
    sum of the lookup's and the loss's, as with the reference."""
    case, labels = make()
    tokens = torch.randint(0, VS, (N,), generator=torch.Generator().manual_seed(3))
    grads = {}
    for be, dtype in ((backend, torch.float32), ("reference", torch.float64)):
        emb = torch.nn.Embedding(VS, HS, dtype=dtype)
        with torch.no_grad():
            emb.weight.copy_(case["student_weight"])
        hidden = torch.tanh(emb(tokens)) + case["student_hidden"].to(dtype)
        loss = kdkernels.fused_linear_divergence(
            hidden, emb.weight, case["teacher_hidden"].to(dtype), case["teacher_weight"].to(dtype),
            labels=labels, kind="fkl", backend=be, chunk_size=8)
        loss.backward()
        grads[be] = emb.weight.grad
    assert_matches(grads[backend], grads["reference"], None, torch.float32, "tied", factor=0.0)


def test_teacher_gets_no_gradient():
    case, labels = make(n=8, bias=True)
    args = {k: v.float().requires_grad_() for k, v in case.items()}
    kdkernels.fused_linear_divergence(**args, labels=labels[:8]).backward()
    assert all(args[k].grad is None for k in ("teacher_hidden", "teacher_weight", "teacher_bias"))
    assert all(args[k].grad is not None for k in STUDENT)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_components(backend, device):
    """return_components: the loss' parts, the student entropy at T summed over kept rows (as
    TRL logs it), the kept rows."""
    case, labels = make(bias=True)
    opts = dict(kind="jsd", temperature=2.0, labels=labels, hard_label_weight=0.4,
                soft_label_weight=0.8)
    args = {k: v.float() for k, v in case.items()}
    out = kdkernels.fused_linear_divergence(**args, **opts, backend=backend,
                                            return_components=True, chunk_size=11)
    ref = kdkernels.fused_linear_divergence(**case, **opts, backend="reference",
                                            return_components=True)
    for name in ("loss", "divergence", "cross_entropy", "student_entropy"):
        a, b = getattr(out, name), getattr(ref, name)
        assert abs(a.item() - b.item()) <= 2e-6 * abs(b.item()) + 1e-6, (name, a, b)
    assert out.num_kept.item() == ref.num_kept.item() == int((labels != -100).sum())
    assert abs(ref.loss.item() - (0.8 * ref.divergence + 0.4 * ref.cross_entropy).item()) < 1e-12
    # the entropy: recomputed here from materialized logits
    s = case["student_hidden"] @ case["student_weight"].t() + case["student_bias"]
    q = torch.softmax(s / 2.0, -1)
    ent = -(q * q.log()).sum(-1)[labels != -100].sum()
    assert abs(ref.student_entropy.item() - ent.item()) < 1e-9 * ent.item()


def test_module_matches_function():
    case, labels = make(bias=True)
    args = {k: v.float() for k, v in case.items()}
    module = kdkernels.nn.FusedLinearDivergenceLoss(kind="tvd", temperature=1.3, vocab_size=1100,
                                                    chunk_size=13)
    got = module(args["student_hidden"], args["student_weight"], args["teacher_hidden"],
                 args["teacher_weight"], labels=labels, student_bias=args["student_bias"],
                 teacher_bias=args["teacher_bias"])
    want = kdkernels.fused_linear_divergence(**args, kind="tvd", temperature=1.3, vocab_size=1100,
                                             labels=labels, chunk_size=13)
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="labels"):
        kdkernels.nn.FusedLinearDivergenceLoss(labels=labels)
    with pytest.raises(ValueError, match="softcap"):
        kdkernels.nn.FusedLinearDivergenceLoss(student_softcap=0.0)


@pytest.mark.parametrize("kind,mode,swap,mix", [("fkl", 0, False, 0.0), ("jsd", 2, False, 0.3),
                                                ("rkl", 0, True, 0.0)])
@pytest.mark.parametrize("budget", [0, 2048], ids=["streaming", "cluster"])
def test_emulated_cuda_rows_in_place(kind, mode, swap, mix, budget):
    """The CUDA divergence kernels (compiled for the CPU, test_cuda_emulated.py) writing the
    gradient over their own student logits, as the fused op does, give the out-of-place bits."""
    import test_cuda_emulated  # noqa: PLC0415

    emu = test_cuda_emulated.emulated.__wrapped__()
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 700, generator=g) * 3, torch.randn(3, 700, generator=g) * 3
    w = torch.tensor([0.5, 0.0, 2.0])
    loss, gs, _ = emu.divergence_fwd(s, t, w, mode, swap, mix, 1.5, 1.0, True, False, budget)
    buf, rows = s.clone(), torch.empty(3)
    emu.divergence_rows_out(buf, t, w, mode, swap, mix, 1.5, 1.0, rows, buf, budget)
    assert torch.equal(buf, gs) and torch.equal(rows, loss)


# ----------------------------------------------------------------- compile, opcheck, memory
def test_compiled_training_step():
    """torch.compile(fullgraph=True) of a step's forward (projection → fused loss; dynamo
    cannot capture .backward() itself, so backward runs AOT autograd's compiled backward) gives
    the eager step's loss and gradients."""
    case, labels = make(n=24, bias=True)
    proj = torch.nn.Linear(HS, HS, dtype=torch.float32)
    args = {k: v.float() for k, v in case.items()}

    def forward(x, weight, bias):
        return kdkernels.fused_linear_divergence(
            proj(x), weight, args["teacher_hidden"], args["teacher_weight"], student_bias=bias,
            teacher_bias=args["teacher_bias"], kind="jsd", labels=labels[:24],
            hard_label_weight=0.2, student_softcap=5.0, chunk_size=10)

    results = []
    for fn in (forward, torch.compile(forward, fullgraph=True)):
        proj.zero_grad()
        w = args["student_weight"].clone().requires_grad_()
        b = args["student_bias"].clone().requires_grad_()
        loss = fn(args["student_hidden"], w, b)
        loss.backward()
        results.append((loss.detach(), w.grad, b.grad, proj.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def sample_inputs():
    """Op-level arguments of kdkernels::fused_linear_divergence_fwd: plain, and with biases,
    softcaps, labels and per-row losses."""
    case, labels = make(n=9, hs=16, ht=24, vs=67, vt=70, bias=True)
    c = {k: v.float() for k, v in case.items()}
    kept = labels != -100
    w = kept.float() / kept.sum()
    lab = torch.where(kept, labels, 0)
    common = (c["student_hidden"].requires_grad_(), c["student_weight"].requires_grad_())
    for bias, ce, caps, reduce in ((False, False, (0.0, 0.0), True), (True, True, (3.0, 2.0), True),
                                   (True, True, (3.0, 0.0), False)):
        yield (*common[:2], c["student_bias"].requires_grad_() if bias else None,
               c["teacher_hidden"], c["teacher_weight"], c["teacher_bias"] if bias else None,
               w * 4.0, w if ce else torch.zeros(9), lab if ce else None, 67, 2, False, 0.3, 2.0,
               1.0, 1.0, 0.5 if ce else 0.0, 1.2, 1.0, caps[0], caps[1], 4, "cpu", reduce,
               True, True, bias, True, True)


@pytest.mark.parametrize("i", range(3))
def test_opcheck(i):
    args = list(sample_inputs())[i]
    torch.library.opcheck(torch.ops.kdkernels.fused_linear_divergence_fwd.default, args)


def test_opcheck_backward_op_and_row_launcher():
    """The reduction='none' backward op, and the divergence family's launcher into caller
    buffers (kdkernels::divergence_rows_out) that the fused op calls per chunk."""
    args = list(sample_inputs())[2]
    fwd_only = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    grad_rows = torch.linspace(-1.0, 1.0, 9)
    bwd_args = [grad_rows] + fwd_only[:23] + fwd_only[24:27] + fwd_only[28:]
    torch.library.opcheck(torch.ops.kdkernels.fused_linear_divergence_bwd.default, bwd_args)
    s, t = torch.randn(5, 33), torch.randn(5, 33)
    torch.library.opcheck(torch.ops.kdkernels.divergence_rows_out.default,
                          (s, t, torch.ones(5), 2, False, 0.3, 2.0, 1.0, torch.empty(5),
                           torch.empty(5, 33), None))


@pytest.mark.parametrize("options", [
    dict(kind="jsd"),
    dict(kind="fkl", hard_label_weight=0.5, student_softcap=5.0, return_components=True,
         temperature=2.0),
    dict(kind="rkl", reduction="none"),
    dict(kind="fkl", dtype=torch.bfloat16, weight_grad_fp32=False),
], ids=["jsd", "ce-softcap-components", "per-row", "bf16-accumulator"])
def test_memory_never_n_by_v(options):
    """The cpu path allocates O(chunk·V), never N×V: at N=1024, V=8192, chunks of 64 rows,
    no single allocation reaches a quarter of one N×V fp32 tensor (8 MiB), whatever the
    options (cross-entropy, softcap, entropy, per-row backward, a bf16 accumulator: the
    weight-sized ones are V×H = 1 MiB here); the reference's do."""
    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    n, h, v = 1024, 32, 8192
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    ws = (torch.randn(v, h, generator=g) * 0.2).to(dtype).requires_grad_()
    ht, wt = torch.randn(n, h, generator=g).to(dtype), (torch.randn(v, h, generator=g) * 0.2).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    for backend, fits in (("cpu", True), ("reference", False)):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = kdkernels.fused_linear_divergence(hs, ws, ht, wt, labels=labels, chunk_size=64,
                                                    backend=backend, **options)
            loss = out.loss if isinstance(out, tuple) else out
            loss.sum().backward()
        sizes = [e.cpu_memory_usage for e in prof.events()]
        assert len(sizes) > 10 and max(sizes) > 0
        assert (max(sizes) < n * v * 4 / 4) == fits, (backend, max(sizes))
        hs.grad = ws.grad = None


@pytest.mark.skipif(not any("triton" in str(c.id) for c in KERNELS), reason="needs Triton")
def test_triton_multi_block_rows_in_place(monkeypatch):
    """The GPU's Triton path sweeps rows in several blocks (4096 logits each); under the
    interpreter rows are one block. Blocks of 256 here, writing in place over the logits."""
    from kdkernels.triton_kernels import divergence as tk  # noqa: PLC0415

    monkeypatch.setitem(tk.MAX_BLOCK, "interpreted", 256)
    case, labels = make(bias=True)
    for kind, extra in (("fkl", {}), ("jsd", {"hard_label_weight": 0.3}),
                        ("skew_rkl", {"taid_t": 0.5, "student_softcap": 4.0})):
        check(case, "triton", what=f"{kind} blocks of 256", kind=kind, labels=labels,
              chunk_size=16, **extra)


def test_default_chunk_is_within_budget():
    assert fl_ops.default_chunk(2048, 32000, 2, torch.device("cpu")) == 512
    assert fl_ops.default_chunk(10, 32000, 2, torch.device("cpu")) == 10
    assert fl_ops.default_chunk(8192, 128256, 2, torch.device("cuda")) == 1024
    assert fl_ops.default_chunk(100, 10 ** 9, 3, torch.device("cpu")) == 1


def test_double_backward_and_retain_graph_are_refused():
    case, labels = make(n=6)
    args = {k: v.float().requires_grad_(k in STUDENT) for k, v in case.items()}
    loss = kdkernels.fused_linear_divergence(**args)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, args["student_hidden"], create_graph=True)
    loss = kdkernels.fused_linear_divergence(**args)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


# ------------------------------------------------------------------------------------ errors
def _bad(**overrides):
    case, labels = make(n=4, hs=8, ht=12, vs=20, vt=22)
    args = {k: v.float() for k, v in case.items()}
    args.update(overrides)
    return args


ERRORS = [
    (dict(student_weight=torch.zeros(20, 9)), ValueError, "student_weight .* H = "),
    (dict(teacher_weight=torch.zeros(22, 11)), ValueError, "teacher_weight"),
    (dict(teacher_hidden=torch.zeros(5, 12)), ValueError, "leading dims"),
    (dict(student_bias=torch.zeros(19)), ValueError, "student_bias must have shape"),
    (dict(teacher_bias=torch.zeros(22, 1)), ValueError, "teacher_bias"),
    (dict(vocab_size=21), ValueError, "vocab_size must be in"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(student_softcap=0.0), ValueError, "student_softcap"),
    (dict(teacher_softcap=-1.0), ValueError, "teacher_softcap"),
    (dict(student_logit_scale=float("inf")), ValueError, "student_logit_scale"),
    (dict(teacher_logit_scale=0.0), ValueError, "teacher_logit_scale"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), TypeError, "chunk_size"),
    (dict(hard_label_weight=0.5), ValueError, "needs labels"),
    (dict(hard_label_weight=0.5, labels=torch.tensor([0, 1, 20, -100])), ValueError,
     "labels of kept rows"),
    (dict(student_weight=torch.zeros(20, 8, dtype=torch.float64)), TypeError, "dtype"),
    (dict(student_hidden=torch.zeros(4, 8, dtype=torch.int32)), TypeError, "student_hidden"),
    (dict(student_weight=torch.zeros(8, 20).t()), ValueError, "unit stride"),
    (dict(kind="kl"), ValueError, "kind"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
    (dict(student_weight=[[0.0]]), TypeError, "student_weight"),
]


@pytest.mark.parametrize("overrides,error,match", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        kdkernels.fused_linear_divergence(**_bad(**overrides), backend="cpu")


def test_readme_example_runs(monkeypatch):
    """README's fused-linear example: a Trainer's compute_loss on tiny random HF causal LMs
    built from configs (offline: nothing is downloaded)."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_readme_examples("fused-linear-example", 1)
