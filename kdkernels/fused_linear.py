"""Public API of fused linear + divergence: fused_linear_divergence()."""
from typing import NamedTuple

import torch

from . import _backend, _distributed
from . import _plumbing as P
from .divergence import check_options as check_divergence_options
from .ops import divergence as div_ops
from .ops import fused_linear as ops
from .ops import vocab_parallel
from .reference import fused_linear as ref


class FusedLinearDivergenceOutput(NamedTuple):
    """return_components=True: the loss, and for logging (no gradient) its parts."""
    loss: torch.Tensor            # soft_label_weight·divergence + hard_label_weight·cross_entropy
    divergence: torch.Tensor      # the divergence part (T² included), reduced like the loss
    cross_entropy: torch.Tensor   # the cross-entropy part (0 without labels), reduced likewise
    student_entropy: torch.Tensor  # Σ over kept rows of the entropy of softmax(student/T)
    num_kept: torch.Tensor        # kept rows (int64)


def fused_linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                            student_bias=None, teacher_bias=None, kind="fkl", temperature=1.0,
                            beta=0.5, skew=0.1, taid_t=None, t2_scale=True, labels=None,
                            ignore_index=-100, mask=None, hard_label_weight=0.0,
                            soft_label_weight=1.0, student_logit_scale=1.0,
                            teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                            vocab_size=None, chunk_size=None, reduction="mean", num_items=None,
                            return_components=False, weight_grad_fp32=True, backend="auto",
                            process_group=None):
    """kdkernels.divergence of the logits h·Wᵀ of two models, from their last hidden states
    and lm_head weights, without ever holding the (N, V) logits (chunks of rows instead).

    Args:
        student_hidden (..., H_s), teacher_hidden (..., H_t): same leading dims; float32,
            bfloat16 or float16 (float64 on the reference backend); any strides.
        student_weight (V_s, H_s), teacher_weight (V_t, H_t): the lm_heads (tied embeddings
            too), in their hidden states' dtype; student_bias (V_s,), teacher_bias (V_t,).
        kind, temperature, beta, skew, taid_t, t2_scale, labels, ignore_index, mask,
        reduction, num_items: as in kdkernels.divergence, over the logits
            logit_scale·(h·Wᵀ + b), then cap·tanh(logits/cap) with a softcap (Gemma).
        vocab_size: the columns that take part (default min(V_s, V_t)): padded vocabularies
            count as if their other columns were −inf; those weight rows get zero gradient.
        hard_label_weight, soft_label_weight: loss = soft·divergence + hard·cross-entropy of
            the student logits at temperature 1 against labels (hard > 0 needs labels).
        chunk_size: rows per chunk (default: ops.fused_linear.default_chunk's memory budget).
        return_components: return a FusedLinearDivergenceOutput instead of the loss.
        weight_grad_fp32: accumulate a 16-bit student weight's (and bias') gradient in fp32
            across chunks and round once (default); False accumulates bf16 in bf16.
        backend: "auto", "reference" (materializes the logits: the spec), "cpu", "triton" or
            "cuda" (the divergence kernel of that backend per chunk; matmuls by torch).
        process_group: a torch.distributed ProcessGroup for vocabulary-sharded lm_heads: the
            weights and biases are this rank's contiguous rows of the heads (shards in rank
            order, any sizes, the same rows on both sides), the hidden states are replicated
            (the column-parallel input); vocab_size counts global columns. The loss is the
            loss of the full vocabulary on every rank; the hidden-state gradient is
            all-reduced, the weight gradient stays on its shard (kdkernels/ops/vocab_parallel.py:
            what is exchanged); float32/bf16/fp16. backend: the row step's kernels, as in
            kdkernels.divergence with a process_group ("reference": PyTorch ops, in the
            chunk loop all the same). DTensor weights sharded Shard(0) on a 1-D mesh take this
            path with the mesh's group; DTensor hidden states must be Replicate().

    Gradients reach student_hidden, student_weight and student_bias; the teacher side is a
    constant (no gradient, whether or not its tensors require grad). Returns a float32 loss
    (float64 on the reference backend for float64 inputs)."""
    (ws, wt), process_group = _distributed.from_dtensors(
        (student_weight, teacher_weight), ("student_weight", "teacher_weight"), process_group,
        vocab_dim=0)
    student_bias, teacher_bias = (_distributed.local(b) for b in (student_bias, teacher_bias))
    hs = _distributed.local(student_hidden, "student_hidden")
    ht = _distributed.local(teacher_hidden, "teacher_hidden")
    labels, mask = _distributed.local(labels), _distributed.local(mask)
    P.check_linear("student", hs, ws, student_bias)
    P.check_linear("teacher", ht, wt, teacher_bias)
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"student_hidden and teacher_hidden must have the same leading dims, got "
                         f"{tuple(hs.shape)} and {tuple(ht.shape)}")
    if hs.device != ht.device:
        raise ValueError(f"student_hidden and teacher_hidden must be on the same device, got "
                         f"{hs.device} and {ht.device}")
    temperature, beta, skew, taid_t = check_divergence_options(kind, temperature, beta, skew,
                                                               taid_t)
    hard, soft, s_scale, s_cap = P.check_fused_options(
        t2_scale=t2_scale, return_components=return_components,
        weight_grad_fp32=weight_grad_fp32, reduction=reduction,
        hard_label_weight=hard_label_weight, soft_label_weight=soft_label_weight,
        student_logit_scale=student_logit_scale, student_softcap=student_softcap, labels=labels)
    t_scale = P.check_real("teacher_logit_scale", teacher_logit_scale, low=0.0, low_open=True)
    t_cap = P.check_softcap("teacher_softcap", teacher_softcap)
    if process_group is None:
        vocab = P.check_vocab_size(vocab_size, min(ws.shape[0], wt.shape[0]),
                                   f"the smaller vocabulary: student {ws.shape[0]}, teacher "
                                   f"{wt.shape[0]}")

    lead_shape = hs.shape[:-1]
    n = hs.numel() // hs.shape[-1]
    device = hs.device
    kept = P.kept_rows(lead_shape, device, labels=labels, ignore_index=ignore_index, mask=mask)
    chunk = P.check_chunk_size(chunk_size)  # 0: the op's memory budget (default_chunk)
    if process_group is not None:
        group = _distributed.check_group(process_group)
        if torch.float64 in (hs.dtype, ht.dtype):
            raise TypeError("fused_linear_divergence with process_group takes float32, bfloat16 "
                            "or float16 hidden states and weights, got float64")
        backend = vocab_parallel.row_backend(backend, device, (hs.dtype, ht.dtype))
    else:
        backend = _backend.resolve_backend(backend, device, (hs.dtype, ht.dtype))
    fp64 = backend == "reference" and torch.float64 in (hs.dtype, ht.dtype)
    wdtype = torch.float64 if fp64 else torch.float32
    row_weight, flat_labels, ce_weight = P.fused_rows(
        n, kept, labels, t2=temperature ** 2 if t2_scale else 1.0,
        cross_entropy=hard > 0 or return_components, reduction=reduction, num_items=num_items,
        device=device, dtype=wdtype)
    hs2, ht2 = hs.reshape(n, hs.shape[-1]), ht.reshape(n, ht.shape[-1])

    if process_group is not None:
        loss, div, ce, entropy = vocab_parallel.fused_linear_divergence(
            hs2, ws, student_bias, ht2, wt, teacher_bias, row_weight, ce_weight, flat_labels,
            group=group, vocab_size=vocab_size, kind=kind, beta=beta, skew=skew,
            temperature=temperature, taid_t=taid_t, t_scale=t_scale, t_cap=t_cap,
            backend=backend, soft=soft,
            hard=hard, s_scale=s_scale, s_cap=s_cap, chunk=chunk, reduce=reduction != "none",
            entropy=return_components, weight_grad_fp32=weight_grad_fp32)
    elif backend == "reference":
        parts = _reference(hs2, ws, student_bias, ht2, wt, teacher_bias, row_weight, ce_weight,
                           flat_labels, kept, vocab=vocab, kind=kind, temperature=temperature,
                           beta=beta, skew=skew, taid_t=taid_t, soft=soft, hard=hard,
                           s_scale=s_scale, t_scale=t_scale, s_cap=s_cap, t_cap=t_cap)
        loss, div, ce, entropy = (x.sum() if reduction != "none" and x.dim() else x for x in parts)
    else:
        mode, swap, mix = div_ops.kernel_args(kind, beta, skew)
        grad_on = torch.is_grad_enabled()
        loss, div, ce, entropy, _, _, _ = torch.ops.kdkernels.fused_linear_divergence_fwd(
            hs2, ws, student_bias, ht2.detach(), wt.detach(),
            None if teacher_bias is None else teacher_bias.detach(), row_weight, ce_weight,
            flat_labels, vocab, mode, swap, mix, temperature, 1.0 if taid_t is None else taid_t,
            soft, hard, s_scale, t_scale, s_cap or 0.0, t_cap or 0.0, chunk, backend,
            reduction != "none", grad_on and hs.requires_grad, grad_on and ws.requires_grad,
            grad_on and student_bias is not None and student_bias.requires_grad,
            return_components, weight_grad_fp32)
    if reduction == "none":
        loss, div, ce = (x.reshape(lead_shape) for x in (loss, div, ce))
    if not return_components:
        return loss
    num_kept = (torch.tensor(n, device=device) if kept is None else kept.sum())
    return FusedLinearDivergenceOutput(loss, div.detach(), ce.detach(), entropy.detach(), num_kept)


def _reference(hs, ws, bs, ht, wt, bt, row_weight, ce_weight, labels, kept, *, soft, hard,
               s_scale, t_scale, s_cap, t_cap, **kw):
    """(loss, divergence, cross-entropy, entropy) per row (weighted; entropy summed)."""
    div, ce, entropy = ref.fused_linear_rows(
        P.live_rows(hs, kept), ws, P.live_rows(ht, kept), wt, student_bias=bs, teacher_bias=bt,
        labels=labels, student_logit_scale=s_scale, teacher_logit_scale=t_scale,
        student_softcap=s_cap, teacher_softcap=t_cap, **kw)
    div = torch.where(row_weight != 0, div * row_weight, 0.0)  # dropped rows: 0, never 0·inf
    ce = torch.zeros_like(div) if ce is None else torch.where(ce_weight != 0, ce * ce_weight, 0.0)
    live = torch.ones_like(entropy, dtype=torch.bool) if kept is None else kept
    entropy = torch.where(live, entropy, 0.0).sum()
    return ops.combine(soft, div, hard, ce), div, ce, entropy
