"""Reference (specification) of the token-relation losses (TRG's relation graph and contextual
loss, MiniLM/MiniLMv2's relation KL), in plain PyTorch: it materializes the T×T relation
matrices of both models, as every public implementation does. Float64-capable.

Per model, relation logits between tokens i and j (features F (…, T, d), keys K optional):
    "dot"     F_i · X_j / √d,  X = K if keys are given, else F
    "cosine"  cos(F_i, X_j)
divided by the model's temperature. Per row i, over the allowed j (j ≤ i when causal; j not
padded where mask is False): P_i = softmax(teacher), Q_i = softmax(student);
    "kl"   KL(P_i ‖ Q_i)        "mse"  Σ_j (P_ij − Q_ij)²
Padded rows are dropped (their loss is 0 and they get no gradient) and padded tokens are never
read: whatever they hold (NaN included) changes nothing.

The NaN rule's unit is the sequence (one (batch, head) relation matrix): every row's softmax
runs over the sequence's keys, so a NaN or ±inf in any real token's features or keys, the
student's or the teacher's, makes every kept row of that sequence NaN, and every real token's
gradient row of the student's features and keys there; the other sequences stay exact.
"""
import math

import torch

from .. import _plumbing as P


def relation_logits(feats, keys, similarity, temperature):
    """(…, T, T) relation logits of one model, in at least float32."""
    dtype = torch.promote_types(feats.dtype, torch.float32)
    f = feats.to(dtype)
    x = f if keys is None else keys.to(dtype)
    if similarity == "cosine":
        f = torch.nn.functional.normalize(f, dim=-1)
        x = torch.nn.functional.normalize(x, dim=-1)
        return f @ x.transpose(-1, -2) / temperature
    return f @ x.transpose(-1, -2) / (math.sqrt(feats.shape[-1]) * temperature)


def allowed_pairs(t, causal, mask, device):
    """Bool (batch or 1, 1 or R…, T, T): which (i, j) take part; rows of padded i are all False."""
    allowed = torch.ones(t, t, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    if mask is not None:  # mask (batch, T): True = a real token
        allowed = allowed & mask[:, None, :] & mask[:, :, None]
    return allowed


def token_relation_loss_rows(student_feats, teacher_feats, *, student_keys=None,
                             teacher_keys=None, temperature=1.0, teacher_temperature=None,
                             similarity="dot", loss="kl", causal=False, mask=None):
    """Per-row losses, shaped (batch, [R,] T); 0 at padded rows, NaN at the kept rows of a
    sequence holding a non-finite value in a real token (the module's NaN rule)."""
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    real = None
    if mask is not None:  # (batch, [1,] T): the same tokens are real in every relation head
        real = mask if student_feats.dim() == 3 else mask[:, None]
    inputs = [student_feats, student_keys, teacher_feats.detach(),
              None if teacher_keys is None else teacher_keys.detach()]
    # a non-finite value in a real token poisons its sequence: (batch, [R,] 1)
    poisoned = torch.zeros(student_feats.shape[:-2] + (1,), dtype=torch.bool,
                           device=student_feats.device)
    for x in inputs:
        if x is not None:
            bad = ~torch.isfinite(x).all(-1)
            poisoned = poisoned | (bad if real is None else bad & real).any(-1, keepdim=True)
    if real is not None:  # padded tokens are never read (where: no gradient reaches them)
        inputs = [x if x is None else torch.where(real[..., None], x, 0.0) for x in inputs]
    fs, ks, ft, kt = inputs
    s = relation_logits(fs, ks, similarity, temperature)
    with torch.no_grad():  # the teacher is constant
        t = relation_logits(ft, kt, similarity, teacher_temperature)
    allowed = allowed_pairs(s.shape[-1], causal, mask, s.device)
    if s.dim() == 4 and allowed.dim() == 3:
        allowed = allowed[:, None]  # the same mask for every relation head
    allowed = allowed.expand(s.shape)
    row_kept = allowed.any(-1)
    # Rows with nothing allowed (padded rows) get a harmless stand-in, then a 0 loss.
    keep = allowed | ~row_kept[..., None]
    lq = torch.log_softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    lp = torch.log_softmax(t.to(s.dtype).masked_fill(~keep, float("-inf")), dim=-1)
    p, q = lp.exp(), lq.exp()
    if loss == "kl":
        terms = torch.where(keep & (p > 0), p * (torch.where(keep, lp, 0.0) - torch.where(keep, lq, 0.0)), 0.0)
    else:
        terms = (p - q).square()
    rows = torch.where(row_kept, terms.sum(-1), 0.0)
    student = [x for x in (student_feats, student_keys) if x is not None]
    return P.nan_rows(rows, poisoned & row_kept, *student)
