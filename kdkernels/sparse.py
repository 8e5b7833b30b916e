"""Public API of the sparse-teacher family: divergences against a teacher's top-k
log-probabilities (offline caches, inference servers), and the extractors that make them."""
import torch

from . import _backend, _distributed
from . import _plumbing as P
from .divergence import check_options as check_divergence_options
from .reference.divergence import canonical_kind
from .fused_linear import FusedLinearDivergenceOutput
from .ops import fused_linear as fused_ops
from .ops import sparse as ops
from .ops import vocab_parallel
from .reference import fused_linear as ref_fused
from .reference import sparse as ref

TAILS = ref.TAILS


def _shard_layout(process_group, width, device):
    """(group, Layout) of a vocabulary-parallel call, or (None, None) without one."""
    if process_group is None:
        return None, None
    group = _distributed.check_group(process_group)
    return group, _distributed.layout(group, width, device)


def _tp_backend(backend):
    P.check_choice("backend (with process_group)", backend, ("auto",))


def sparse_divergence(student_logits, teacher_logprobs, teacher_indices, *, kind="fkl",
                      tail="renormalize", temperature=1.0, teacher_temperature=None, beta=0.5,
                      t2_scale=True, labels=None, ignore_index=-100, mask=None,
                      reduction="mean", num_items=None, chunk_size=None, backend="auto",
                      process_group=None):
    """Divergence between the student's full-vocabulary distribution softmax(z/T) and a
    teacher known by its top-k log-probabilities (kdkernels/reference/sparse.py: the math).

    Args:
        student_logits: (..., V) float32/bfloat16/float16 (float64 on the reference backend).
        teacher_logprobs: (..., K) log-probabilities (float32/bfloat16/float16/float64), K in
            [1, min(V, 1024)]; −inf marks padding (contributes nothing; its index may repeat).
        teacher_indices: (..., K) int32/int64 vocabulary ids in [0, V), unique among a row's
            real entries (checked with KDKERNELS_DEBUG=1; otherwise the caller's duty).
        kind: "fkl" KL(p‖q) · "rkl" KL(q‖p) · "jsd" (β, TRL's convention) · "tvd".
        tail: "renormalize" (p renormalized over its K entries; q as gathered) · "bucket" (one
            extra entry with both missing masses, exact as either → 0 or 1) · "none" (the
            truncated sums of the K entries as given).
        temperature: T in [1e-6, 100]: the student's softmax(z/T).
        teacher_temperature: the temperature T_gen the log-probs were stored at: re-tempered
            as ℓ·T_gen/T and renormalized over K (DistillKit's convention). None: T (none). Not
            with tail="bucket" (the mass outside the top-k at T is unknown) nor "none"
            (re-tempered entries are renormalized: that is "renormalize"): ValueError.
        beta, t2_scale, labels, ignore_index, mask, reduction, num_items, backend: as in
            kdkernels.divergence ("cuda" and "cpu" run ATen ops; "triton" its kernels).
        chunk_size: rows per chunk (default: one cache-sized float32 buffer).
        process_group: a torch.distributed ProcessGroup for a vocabulary split: the student's
            logits (or lm_head rows) are this rank's contiguous vocabulary shard, in rank
            order, any sizes; teacher ids, vocab_size and every other argument are global and
            the same on every rank, and so is the result (kdkernels/ops/vocab_parallel.py: what
            is exchanged). Backend "auto" only. DTensor logits Shard(-1) / weights Shard(0) on
            a 1-D mesh take this path with the mesh's group.

    Returns a float32 loss (float64 for float64 inputs on the reference backend). The gradient
    flows to student_logits over the whole vocabulary; the teacher is a constant."""
    (student_logits,), process_group = _distributed.from_dtensors(
        (student_logits,), ("student_logits",), process_group)
    teacher_logprobs, teacher_indices, labels, mask = (_distributed.local(x) for x in (
        teacher_logprobs, teacher_indices, labels, mask))
    P.check_logits("student_logits", student_logits)
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    group, lay = _shard_layout(process_group, vocab, student_logits.device)
    vocab = vocab if lay is None else lay.vocab
    lp, idx = _check_teacher_args(teacher_logprobs, teacher_indices, lead_shape, vocab,
                                  student_logits.device, "student_logits")
    kind, temperature, teacher_temperature, beta = _check_options(
        kind, tail, temperature, teacher_temperature, beta)
    P.check_bool("t2_scale", t2_scale)
    P.check_choice("reduction", reduction, P.REDUCTIONS)
    chunk = P.check_chunk_size(chunk_size)

    n = student_logits.numel() // student_logits.shape[-1]
    device = student_logits.device
    kept = P.kept_rows(lead_shape, device, labels=labels, ignore_index=ignore_index, mask=mask)
    if group is not None:
        _tp_backend(backend)
        weight = P.row_weights(n, kept, scale=temperature ** 2 if t2_scale else 1.0,
                               reduction=reduction, num_items=num_items, device=device)
        loss = vocab_parallel.sparse_divergence(
            P.as_rows(student_logits), lp.detach().reshape(n, lp.shape[-1]),
            idx.reshape(n, idx.shape[-1]), weight, group=group, layout=lay, chunk=chunk,
            reduce=reduction != "none", kind=kind, beta=beta, tail=tail,
            temperature=temperature, teacher_temperature=teacher_temperature)
        return loss if reduction != "none" else loss.reshape(lead_shape)
    backend = _backend.resolve_backend(backend, device, (student_logits.dtype,), family=None)
    fp64 = backend == "reference" and student_logits.dtype == torch.float64
    weight = P.row_weights(n, kept, scale=temperature ** 2 if t2_scale else 1.0,
                           reduction=reduction, num_items=num_items, device=device,
                           dtype=torch.float64 if fp64 else torch.float32)
    lp, idx = lp.reshape(n, lp.shape[-1]), idx.reshape(n, idx.shape[-1])
    if backend == "reference":
        ops.check_teacher(lp, idx, vocab, weight)
        lp, idx = _live_teacher(lp, idx, kept)
        rows = ref.sparse_divergence_rows(
            P.live_rows(student_logits, kept), lp, idx, kind=kind, tail=tail,
            temperature=temperature, teacher_temperature=teacher_temperature, beta=beta)
        loss = torch.where(weight != 0, rows * weight, 0.0)
        if reduction != "none":
            loss = loss.sum()
    else:
        grad_on = torch.is_grad_enabled() and student_logits.requires_grad
        loss, _ = torch.ops.kdkernels.sparse_divergence_fwd(
            P.as_rows(student_logits), lp.detach(), idx, weight, kind, beta, tail, temperature,
            teacher_temperature or 0.0, chunk, backend, reduction != "none", grad_on)
    return loss if reduction != "none" else loss.reshape(lead_shape)


def fused_linear_sparse_divergence(student_hidden, student_weight, teacher_logprobs,
                                   teacher_indices, *, student_bias=None, kind="fkl",
                                   tail="renormalize", temperature=1.0, teacher_temperature=None,
                                   beta=0.5, t2_scale=True, labels=None, ignore_index=-100,
                                   mask=None, hard_label_weight=0.0, soft_label_weight=1.0,
                                   student_logit_scale=1.0, student_softcap=None, vocab_size=None,
                                   chunk_size=None, reduction="mean", num_items=None,
                                   return_components=False, weight_grad_fp32=True,
                                   backend="auto", process_group=None):
    """kdkernels.sparse_divergence of the student's logits logit_scale·(h·Wᵀ + b) (then
    softcapped), from its last hidden states and lm_head, chunk by chunk of rows (the chunk
    loop of kdkernels.fused_linear_divergence: never more than chunk × V logits).

    Args:
        student_hidden (..., H), student_weight (V_s, H), student_bias (V_s,): the student.
        teacher_logprobs, teacher_indices (..., K): as in sparse_divergence, ids < vocab_size.
        vocab_size: the student's columns that take part (default V_s; a padded lm_head).
        hard_label_weight, soft_label_weight, chunk_size, return_components,
        weight_grad_fp32, student_logit_scale, student_softcap: as in
            kdkernels.fused_linear_divergence.
        the others: as in sparse_divergence.
        process_group: as in sparse_divergence. The hidden states are replicated (a DTensor: Replicate()); their gradient is
            all-reduced, the weight's stays on its shard.

    Gradients reach student_hidden, student_weight and student_bias. Returns a float32 loss
    (or a FusedLinearDivergenceOutput with return_components=True)."""
    (ws,), process_group = _distributed.from_dtensors(
        (student_weight,), ("student_weight",), process_group, vocab_dim=0)
    hs = _distributed.local(student_hidden, "student_hidden")
    student_bias, teacher_logprobs, teacher_indices, labels, mask = (
        _distributed.local(x) for x in (student_bias, teacher_logprobs, teacher_indices, labels,
                                        mask))
    P.check_linear("student", hs, ws, student_bias)
    lead_shape = hs.shape[:-1]
    group, lay = _shard_layout(process_group, ws.shape[0], hs.device)
    vocab = P.check_vocab_size(vocab_size, ws.shape[0] if lay is None else lay.vocab)
    lp, idx = _check_teacher_args(teacher_logprobs, teacher_indices, lead_shape, vocab,
                                  hs.device, "student_hidden")
    kind, temperature, teacher_temperature, beta = _check_options(
        kind, tail, temperature, teacher_temperature, beta)
    hard, soft, s_scale, s_cap = P.check_fused_options(
        t2_scale=t2_scale, return_components=return_components,
        weight_grad_fp32=weight_grad_fp32, reduction=reduction,
        hard_label_weight=hard_label_weight, soft_label_weight=soft_label_weight,
        student_logit_scale=student_logit_scale, student_softcap=student_softcap, labels=labels)
    chunk = P.check_chunk_size(chunk_size)

    n, device = hs.numel() // hs.shape[-1], hs.device
    kept = P.kept_rows(lead_shape, device, labels=labels, ignore_index=ignore_index, mask=mask)
    if group is not None:
        _tp_backend(backend)
        backend = "auto"
    else:
        backend = _backend.resolve_backend(backend, device, (hs.dtype,), family=None)
    wdtype = torch.float64 if backend == "reference" and hs.dtype == torch.float64 \
        else torch.float32
    row_weight, flat_labels, ce_weight = P.fused_rows(
        n, kept, labels, t2=temperature ** 2 if t2_scale else 1.0,
        cross_entropy=hard > 0 or return_components, reduction=reduction, num_items=num_items,
        device=device, dtype=wdtype)
    hs2 = hs.reshape(n, hs.shape[-1])
    lp, idx = lp.reshape(n, lp.shape[-1]), idx.reshape(n, idx.shape[-1])

    if group is not None:
        loss, div, ce, entropy = vocab_parallel.fused_linear_sparse_divergence(
            hs2, ws, student_bias, lp.detach(), idx, row_weight, ce_weight, flat_labels,
            group=group, layout=lay, vocab=vocab, kind=kind, beta=beta, tail=tail,
            temperature=temperature, teacher_temperature=teacher_temperature, soft=soft,
            hard=hard, s_scale=s_scale, s_cap=s_cap, chunk=chunk, reduce=reduction != "none",
            entropy=return_components, weight_grad_fp32=weight_grad_fp32)
    elif backend == "reference":
        ops.check_teacher(lp, idx, vocab, row_weight, "vocab_size")
        lp, idx = _live_teacher(lp, idx, kept)
        parts = _fused_reference(hs2, ws, student_bias, lp, idx, row_weight, ce_weight,
                                 flat_labels, kept, vocab=vocab, kind=kind, tail=tail,
                                 temperature=temperature, teacher_temperature=teacher_temperature,
                                 beta=beta, soft=soft, hard=hard, s_scale=s_scale, s_cap=s_cap)
        loss, div, ce, entropy = (x.sum() if reduction != "none" and x.dim() else x for x in parts)
    else:
        grad_on = torch.is_grad_enabled()
        loss, div, ce, entropy, _, _, _ = torch.ops.kdkernels.fused_linear_sparse_divergence_fwd(
            hs2, ws, student_bias, lp.detach(), idx, row_weight, ce_weight, flat_labels, vocab,
            kind, beta, tail, temperature, teacher_temperature or 0.0, soft, hard, s_scale,
            s_cap or 0.0, chunk, backend, reduction != "none", grad_on and hs.requires_grad,
            grad_on and ws.requires_grad,
            grad_on and student_bias is not None and student_bias.requires_grad,
            return_components, weight_grad_fp32)
    if reduction == "none":
        loss, div, ce = (x.reshape(lead_shape) for x in (loss, div, ce))
    if not return_components:
        return loss
    num_kept = torch.tensor(n, device=device) if kept is None else kept.sum()
    return FusedLinearDivergenceOutput(loss, div.detach(), ce.detach(), entropy.detach(), num_kept)


def topk_logprobs(logits, k, *, temperature=1.0, logprob_dtype=torch.float32, chunk_size=None,
                  backend="auto", process_group=None):
    """The k largest log-probabilities of softmax(logits/T) per row, sorted descending, ties
    broken by the lower index, and their indices: (logprobs (..., k) in logprob_dtype,
    indices (..., k) int64). Exact: the normalizer runs over the whole vocabulary; each value
    is rounded once. Feeds sparse_divergence directly (cache them as bf16 / int32 if you like).
    No gradient (a teacher's cache). process_group: as in sparse_divergence (logits:
    this rank's vocabulary shard); each rank gets the same global top-k."""
    (logits,), process_group = _distributed.from_dtensors((logits,), ("logits",), process_group)
    P.check_logits("logits", logits)
    vocab = logits.shape[-1]
    group, lay = _shard_layout(process_group, vocab, logits.device)
    k = _check_k(k, vocab if lay is None else lay.vocab)
    temperature = P.check_temperature("temperature", temperature)
    _check_logprob_dtype(logprob_dtype)
    chunk = P.check_chunk_size(chunk_size)
    rows = logits.detach().reshape(-1, vocab)
    if group is not None:
        _tp_backend(backend)
        backend = "shard"
    else:
        backend = _backend.resolve_backend(backend, logits.device, (logits.dtype,), family=None)
    if backend == "shard":
        values, indices = vocab_parallel.topk_logprobs(
            P.as_rows(rows), k, group=group, layout=lay, temperature=temperature, chunk=chunk,
            logprob_dtype=logprob_dtype)
    elif backend == "reference":
        values, indices = _reference_topk(rows, k, temperature, logprob_dtype)
    else:
        values, indices = torch.ops.kdkernels.topk_logprobs(
            P.as_rows(rows), k, temperature, chunk, backend, logprob_dtype)
    shape = logits.shape[:-1] + (k,)
    return values.reshape(shape), indices.reshape(shape)


def fused_linear_topk_logprobs(hidden, weight, k, *, bias=None, logit_scale=1.0, softcap=None,
                               temperature=1.0, vocab_size=None, chunk_size=None,
                               logprob_dtype=torch.float32, backend="auto", process_group=None):
    """topk_logprobs of the logits logit_scale·(hidden·weightᵀ + bias) (then softcapped), chunk
    by chunk of rows: never more than chunk × V logits, never an (N, V) log-softmax. hidden
    (..., H), weight (V, H), bias (V,); vocab_size: the columns that take part (default V).
    process_group: as in sparse_divergence (weight, bias: this rank's rows; hidden
    replicated, a DTensor: Replicate()).
    Returns (logprobs (..., k), indices (..., k) int64)."""
    (weight,), process_group = _distributed.from_dtensors((weight,), ("weight",), process_group,
                                                          vocab_dim=0)
    hidden, bias = _distributed.local(hidden, "hidden"), _distributed.local(bias)
    P.check_linear("", hidden, weight, bias)
    group, lay = _shard_layout(process_group, weight.shape[0], hidden.device)
    vocab = P.check_vocab_size(vocab_size, weight.shape[0] if lay is None else lay.vocab)
    k = _check_k(k, vocab)
    temperature = P.check_temperature("temperature", temperature)
    scale_ = P.check_real("logit_scale", logit_scale, low=0.0, low_open=True)
    cap = P.check_softcap("softcap", softcap)
    _check_logprob_dtype(logprob_dtype)
    chunk = P.check_chunk_size(chunk_size)
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    w, b = weight.detach(), None if bias is None else bias.detach()
    if group is not None:
        _tp_backend(backend)
        values, indices = vocab_parallel.fused_linear_topk_logprobs(
            h, w, b, k, group=group, layout=lay, vocab=vocab, logit_scale=scale_,
            softcap=cap or 0.0, temperature=temperature, chunk=chunk,
            logprob_dtype=logprob_dtype)
        return values.reshape(hidden.shape[:-1] + (k,)), indices.reshape(hidden.shape[:-1] + (k,))
    backend = _backend.resolve_backend(backend, hidden.device, (hidden.dtype,), family=None)
    if backend == "reference":
        z = ref_fused.logits(h, w, b, vocab=vocab, scale=scale_, softcap=cap)
        values, indices = _reference_topk(z, k, temperature, logprob_dtype)
    else:
        values, indices = torch.ops.kdkernels.fused_linear_topk_logprobs(
            h, w, b, k, vocab, scale_, cap or 0.0, temperature, chunk, backend, logprob_dtype)
    shape = hidden.shape[:-1] + (k,)
    return values.reshape(shape), indices.reshape(shape)


# ---------------------------------------------------------------------------------- checks
def _check_options(kind, tail, temperature, teacher_temperature, beta):
    if kind in ("skew_fkl", "skew_rkl"):
        raise ValueError(f"kind={kind!r} needs the teacher's full distribution; a top-k "
                         f"teacher takes one of {', '.join(map(repr, ops.KINDS))}")
    P.check_choice("kind", kind, ops.KINDS)
    P.check_choice("tail", tail, TAILS)
    temperature, beta, _, _ = check_divergence_options(kind, temperature, beta, 0.1, None)
    if teacher_temperature is not None:
        teacher_temperature = P.check_temperature("teacher_temperature", teacher_temperature)
        if teacher_temperature == temperature:
            teacher_temperature = None
        elif tail == "bucket":
            raise ValueError("teacher_temperature != temperature is not defined with "
                             "tail='bucket': the mass outside the top-k at another temperature "
                             "is unknown. Use tail='renormalize', or store the log-probs at "
                             "the training temperature")
        elif tail == "none":
            raise ValueError("teacher_temperature != temperature with tail='none': re-tempered "
                             "log-probs are renormalized over the K entries, which is "
                             "tail='renormalize'; pass that (tail='none' takes the entries as "
                             "stored)")
    return canonical_kind(kind, beta, 0.0), temperature, teacher_temperature, beta


def _check_teacher_args(lp, idx, lead_shape, vocab, device, student_name):
    if not isinstance(lp, torch.Tensor) or lp.dtype not in P.INPUT_DTYPES:
        got = lp.dtype if isinstance(lp, torch.Tensor) else type(lp).__name__
        raise TypeError(f"teacher_logprobs must be a floating tensor (float32, bfloat16, float16 "
                        f"or float64), got {got}")
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
        got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"teacher_indices must be an int32 or int64 tensor, got {got}")
    if lp.shape != idx.shape:
        raise ValueError(f"teacher_logprobs and teacher_indices must have the same shape "
                         f"(..., K), got {tuple(lp.shape)} and {tuple(idx.shape)}")
    if lp.dim() < 1 or tuple(lp.shape[:-1]) != tuple(lead_shape):
        raise ValueError(f"teacher_logprobs must have shape (..., K) with the leading dims of "
                         f"{student_name} {tuple(lead_shape)}, got {tuple(lp.shape)}")
    k = lp.shape[-1]
    if not 1 <= k <= min(vocab, ops.MAX_K):
        raise ValueError(f"teacher_logprobs' K must be in [1, {min(vocab, ops.MAX_K)}] (at most "
                         f"V = {vocab} and {ops.MAX_K}), got K = {k}")
    if lp.device != device or idx.device != device:
        raise ValueError(f"teacher_logprobs and teacher_indices must be on {device}, got "
                         f"{lp.device} and {idx.device}")
    if lp.requires_grad:
        lp = lp.detach()  # a constant target (as every family's teacher)
    return lp, idx


def _live_teacher(lp, idx, kept):
    """The reference computes every row: a dropped row's teacher entries (anything at all)
    become one padding entry at index 0."""
    if kept is None:
        return lp, idx
    return (torch.where(kept[:, None], lp, float("-inf")),
            torch.where(kept[:, None], idx, torch.zeros_like(idx)))


def _reference_topk(z, k, temperature, dtype):
    """The reference extractor, with the kernels' error for rows that have no distribution."""
    values, indices = ref.topk_logprobs(z, k, temperature=temperature)
    bad = ~torch.isfinite(torch.logsumexp(z.double(), -1))
    if bool(bad.any()):
        raise ValueError(f"logits row {int(bad.nonzero()[0, 0])} has no distribution (it holds "
                         f"NaN or +inf, or is all −inf): its top-k log-probabilities are "
                         f"undefined")
    return values.to(dtype), indices


def _check_k(k, vocab):
    k = P.check_int("k", k)
    if not 1 <= k <= min(vocab, ops.MAX_K):
        raise ValueError(f"k must be in [1, {min(vocab, ops.MAX_K)}] (at most V = {vocab} and "
                         f"{ops.MAX_K}), got {k}")
    return k


def _check_logprob_dtype(dtype):
    if dtype not in P.INPUT_DTYPES:
        raise TypeError(f"logprob_dtype must be torch.float32, bfloat16, float16 or float64, "
                        f"got {dtype!r}")


def _fused_reference(hs, ws, bs, lp, idx, row_weight, ce_weight, labels, kept, *, vocab, soft,
                     hard, s_scale, s_cap, **kw):
    """(loss, divergence, cross-entropy, entropy) per row (weighted; entropy summed)."""
    z = ref_fused.logits(P.live_rows(hs, kept), ws, bs, vocab=vocab, scale=s_scale,
                         softcap=s_cap)
    div = ref.sparse_divergence_rows(z, lp, idx, **kw)
    div = torch.where(row_weight != 0, div * row_weight, 0.0)
    ce = torch.zeros_like(div)
    if labels is not None:
        ce = torch.logsumexp(z, -1) - z.gather(-1, labels[:, None]).squeeze(-1)
        ce = torch.where(ce_weight != 0, ce * ce_weight, 0.0)
    with torch.no_grad():
        lq = torch.log_softmax(z.detach() / kw["temperature"], -1)
        ent = -(lq.exp() * torch.where(lq > float("-inf"), lq, 0.0)).sum(-1)
        live = torch.ones_like(ent, dtype=torch.bool) if kept is None else kept
        ent = torch.where(live, ent, 0.0).sum()
    return fused_ops.combine(soft, div, hard, ce), div, ce, ent
