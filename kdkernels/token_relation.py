"""Public API of the token-relation family: token_relation_loss()."""
import math

import torch

from . import _backend
from . import _plumbing as P
from .reference import token_relation as ref

SIMILARITIES = ("dot", "cosine")
LOSSES = ("kl", "mse")
# Relation rows approach uniform as T grows, and the one-sweep KL (terms of both signs) loses
# relative precision there as fp32 PyTorch does: measured per row on random features, cosine
# similarity, 1.7e-3 at T = 10 and 0.2 at T = 100. So this family stops at 10.
TEMPERATURE_MAX = 10.0


def token_relation_loss(student_feats, teacher_feats, *, student_keys=None, teacher_keys=None,
                        temperature=1.0, teacher_temperature=None, similarity="dot", loss="kl",
                        causal=False, mask=None, reduction="mean", backend="auto"):
    """Token-relation distillation loss (TRG's relation graph / contextual loss, MiniLM's
    relation KL): the student's token-to-token relation distributions matched to the teacher's.

    Args:
        student_feats, teacher_feats: (batch, T, d) or (batch, R, T, d); d may differ between
            the models, batch, R and T may not.
        student_keys, teacher_keys: optional keys of the same layout (the relation is then
            queries vs keys: MiniLM's attention-distribution transfer). Give both or neither.
        temperature: divides the student's relation logits (and the teacher's, unless
            teacher_temperature is given); each in [1e-6, 10] (TEMPERATURE_MAX: this family's
            KL is summed online, terms of both signs, so it accepts less than the others).
            similarity: "dot" (F_i·F_j/√d) or "cosine".
        loss: "kl" (KL(P_i‖Q_i) per row) or "mse" (Σ_j (P_ij − Q_ij)²).
        causal: only j ≤ i. mask: (batch, T) bool, True = a real token; padded rows dropped,
            padded tokens never read (whatever they hold, NaN included, changes nothing).
        reduction: "mean" over kept rows (and heads), "sum", or "none" → (batch, [R,] T).
        backend: "auto", "reference" (materializes the T×T relation matrices: the spec),
            "cpu" (tiled C++), "triton" (tiled; GPU, or CPU under TRITON_INTERPRET=1). The
            tiled kernels never build a T×T matrix: O(T·d) memory.

    Gradients flow to the student's features (and keys); the teacher's inputs are constants.

    NaN rule: its unit is the sequence, per relation head (one T×T relation matrix). Every
    row's softmax runs over the sequence's keys, so a NaN or ±inf in any real token's
    features or keys, the student's or the teacher's, makes every kept row of that sequence
    (that head) NaN, and every real token's gradient row there (features and keys); causal
    and query/key layouts included. The other sequences and heads stay exact; reduction
    "mean" / "sum" is then NaN. Batch 0 or T = 0 gives 0 ("mean", "sum") or an empty
    (batch, [R,] T) ("none"), and zero-sized gradients; d = 0 is refused (no relation logits:
    0/√0, cosine of empty vectors)."""
    for name, x in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (batch, [R,] T, d), got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() not in (3, 4) or x.shape[-1] == 0:
            raise ValueError(f"{name} must be (batch, T, d) or (batch, R, T, d) with d ≥ 1, got "
                             f"shape {tuple(x.shape)}")
    if student_feats.shape[:-1] != teacher_feats.shape[:-1]:
        raise ValueError("student_feats and teacher_feats must agree on batch, [R,] and T "
                         f"(d may differ), got {tuple(student_feats.shape)} and "
                         f"{tuple(teacher_feats.shape)}")
    if (student_keys is None) != (teacher_keys is None):
        raise ValueError("give both student_keys and teacher_keys, or neither")
    for name, keys, feats in (("student_keys", student_keys, student_feats),
                              ("teacher_keys", teacher_keys, teacher_feats)):
        if keys is not None and (not isinstance(keys, torch.Tensor) or keys.shape != feats.shape):
            raise ValueError(f"{name} must have the shape of the matching feats "
                             f"{tuple(feats.shape)}, got "
                             f"{tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__}")
    temperature = P.check_temperature("temperature", temperature, high=TEMPERATURE_MAX)
    if teacher_temperature is not None:
        teacher_temperature = P.check_temperature("teacher_temperature", teacher_temperature,
                                                  high=TEMPERATURE_MAX)
    P.check_choice("similarity", similarity, SIMILARITIES)
    P.check_choice("loss", loss, LOSSES)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    batch, t = student_feats.shape[0], student_feats.shape[-2]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor (batch, T), True = a real token")
        if tuple(mask.shape) != (batch, t):
            raise ValueError(f"mask must be (batch, T) = {(batch, t)}, got {tuple(mask.shape)}")
    P.check_choice("reduction", reduction, P.REDUCTIONS)
    P.check_choice("backend", backend, _backend.BACKENDS)
    tensors = [x for x in (student_feats, teacher_feats, student_keys, teacher_keys, mask)
               if x is not None]
    if any(x.device != student_feats.device for x in tensors):
        raise ValueError("all inputs must be on the same device")
    if backend == "cuda":
        raise ValueError("token_relation_loss has no CUDA C++ kernels; use backend='triton' "
                         "(GPU), 'cpu' or 'reference'")
    backend = _backend.resolve_backend(backend, student_feats.device,
                                [x.dtype for x in tensors if x.is_floating_point()],
                                family="token_relation")
    if backend == "reference":
        rows = ref.token_relation_loss_rows(
            student_feats, teacher_feats, student_keys=student_keys, teacher_keys=teacher_keys,
            temperature=temperature, teacher_temperature=teacher_temperature,
            similarity=similarity, loss=loss, causal=causal, mask=mask)
    else:
        rows = _kernel_rows(backend, student_feats, teacher_feats, student_keys, teacher_keys,
                            temperature, teacher_temperature, similarity, loss, causal, mask)
    if reduction == "none":
        return rows
    # padded rows are 0 already; the mean counts kept rows (of every head) like every family
    kept = None if mask is None else (mask[:, None] if rows.dim() == 3 else mask).expand(rows.shape).reshape(-1)
    weight = P.row_weights(rows.numel(), kept, scale=1.0, reduction=reduction, num_items=None,
                           device=rows.device, dtype=rows.dtype)
    return (rows.reshape(-1) * weight).sum()


def _kernel_rows(backend, fs, ft, ks, kt, temperature, teacher_temperature, similarity, loss,
                 causal, mask):
    """Per-row losses from the tiled kernels: inputs flattened to (batch·R, T, d) sequences;
    cosine similarity becomes a dot product of normalized rows (autograd differentiates the
    normalization; padded tokens are zeroed first, so that no gradient reaches them); the
    scales fold in 1/√d and the temperatures."""
    heads = fs.shape[1] if fs.dim() == 4 else 1
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature

    seqs = fs.shape[0] * heads
    m = None if mask is None else (mask.repeat_interleave(heads, 0) if heads > 1 else mask).contiguous()

    def prepare(f, k):  # → (S, T, d) features and keys (None: the features are the keys)
        f = f.reshape(seqs, *f.shape[-2:])
        k = None if k is None else k.reshape(seqs, *k.shape[-2:])
        if similarity == "cosine":
            f32 = torch.promote_types(f.dtype, torch.float32)

            def unit(x):
                x = x.to(f32) if m is None else torch.where(m[..., None], x.to(f32), 0.0)
                return torch.nn.functional.normalize(x, dim=-1)
            f, k = unit(f), None if k is None else unit(k)
        return f, k

    fs_, xs_ = prepare(fs, ks)
    with torch.no_grad():
        ft_, xt_ = prepare(ft.detach(), None if kt is None else kt.detach())
    if similarity == "cosine":
        scale_s, scale_t = 1.0 / temperature, 1.0 / teacher_temperature
    else:
        scale_s = 1.0 / (math.sqrt(fs.shape[-1]) * temperature)
        scale_t = 1.0 / (math.sqrt(ft.shape[-1]) * teacher_temperature)
    op = torch.ops.kdkernels.token_relation_fwd_triton if backend == "triton" else \
        torch.ops.kdkernels.token_relation_fwd
    rows, _ = op(fs_, xs_, ft_, xt_, m, scale_s, scale_t, causal, loss == "mse")
    return rows.view(fs.shape[:-1]).to(torch.promote_types(fs.dtype, torch.float32))
