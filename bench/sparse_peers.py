"""Peer implementations of the sparse-teacher divergence (student logits (N, V) against a teacher
known only by its top-k log-probabilities (N, K) at indices (N, K)), for the benchmarks and the
oracle tests of kdkernels.sparse_divergence:

    distillkit_sparse_kl  DistillKit's sparse forward KL (arcee-ai/DistillKit,
                          distillkit/lossfuncs/kl.py: KLDLoss -> sparse_kl_div, with
                          lossfuncs/common.py: get_logprobs / get_target_logprobs), missing mass
                          ZERO, re-written here (DistillKit is not a dependency)
    trl_server_topk_kl    TRL 1.16's ServerDistillationTrainer._compute_server_forward_kl_loss
                          (trl/experimental/server_distillation/server_distillation_trainer.py),
                          TRL's own method called on tensors
    trl_sparse_divergence TRL's pieces of that method (_add_tail_bucket, _jsd_divergence,
                          _reduce_divergence_loss) at any β: rkl and jsd on the same support

How each relates to ours (kdkernels.sparse_divergence, reduction="mean", no mask; every peer
keeps the rows with label != -100 and divides by max(1, kept)):

    ours(kind="fkl", tail="renormalize", T, teacher_temperature=Tg, t2_scale=True)
        == distillkit_sparse_kl(T, Tg)                         (DistillKit applies T² itself)
    ours(kind="fkl", tail="bucket", T, t2_scale=False)
        == trl_server_topk_kl(T, add_tail=True)                (TRL applies no T²)
    ours(kind=k, beta=b, tail="bucket", T, t2_scale=False)
        == trl_sparse_divergence(T, beta=b', add_tail=True)    b' = 0 fkl, 1 rkl, b jsd
up to the peers' clamps (see each docstring): they agree to rounding while the teacher's top-k
mass and the student's mass on the teacher's top-k both stay below 1 − 1e-7 (TRL) / the teacher
has no −inf padding (DistillKit). TRL's add_tail=False has no counterpart among our tails: it
renormalizes the student over the top-k too, which adds log Σ_I q to the fkl of
tail="renormalize" (see trl_server_topk_kl).
"""
import os
import types

import torch

IGNORE_INDEX = -100


def _kept(labels, n, device):
    return (torch.ones(n, dtype=torch.bool, device=device) if labels is None
            else labels.reshape(-1) != IGNORE_INDEX)


def distillkit_sparse_kl(student_logits, teacher_logprobs, teacher_indices, temperature=1.0,
                         teacher_temperature=None, *, t2_scale=True, labels=None):
    """DistillKit's sparse forward KL with MissingProbabilityHandling.ZERO and log-prob targets
    (its default KLDLoss path), written in our own words from distillkit/lossfuncs/kl.py and
    common.py. The benchmarks' "hand-written formula" baseline: it materializes the (N, V)
    log-normalizer input and its gradient.

    Per row: log q = z/T − logsumexp(z/T) (logsumexp in fp32), gathered at the K indices;
    teacher a_k = ℓ_k·(T_gen/T), log p_k = a_k − logsumexp_K(a) (renormalized over the K entries
    whether or not T changes: DistillKit's ZERO case always renormalizes); loss_row =
    Σ_k p_k (log p_k − log q_k); missing mass contributes nothing. Reduction, as KLDLoss: the sum
    over kept rows × T² / number of kept rows (num_items_in_batch = mask.sum()).

    Contract in our API: kdkernels.sparse_divergence(kind="fkl", tail="renormalize",
    temperature=T, teacher_temperature=T_gen, t2_scale=True, labels=labels). t2_scale=False here
    drops the T² (== ours with t2_scale=False).
    Conventions that differ from DistillKit's own signature:
      - teacher_temperature=None means "the teacher's log-probs are already at T" (no
        re-tempering), as ours. DistillKit's target_generation_temperature defaults to 1.0
        (signal.generation_temperature), i.e. it re-tempers by 1/T unless told otherwise.
      - DistillKit has no padding: a −inf teacher entry gives 0·(−inf) = NaN there; here too
        (pass only real entries).
      - DistillKit's empty mask divides by 0; here the denominator is max(1, kept).
      - DistillKit subtracts the fp32 logsumexp rounded back to the input dtype from the logits
        in the input dtype; here log_softmax is formed in fp32 (identical for fp32 inputs) and
        the loss returned in fp32."""
    z = student_logits.reshape(-1, student_logits.shape[-1])
    idx = teacher_indices.reshape(z.shape[0], -1).long()
    lp_in = teacher_logprobs.reshape(idx.shape).detach()
    dtype = torch.promote_types(z.dtype, torch.float32)
    zf = z.to(dtype)
    if temperature != 1.0:
        zf = zf / temperature
    lq = zf.gather(-1, idx) - torch.logsumexp(zf, -1, keepdim=True)
    with torch.no_grad():
        a = lp_in.to(dtype)
        if teacher_temperature is not None and teacher_temperature != temperature:
            a = a * (teacher_temperature / temperature)
        lp = a - torch.logsumexp(a, -1, keepdim=True)
    rows = (lp.exp() * (lp - lq)).sum(-1)
    kept = _kept(labels, rows.shape[0], rows.device)
    loss = (rows * kept).sum() / kept.sum().clamp_min(1)
    return loss * temperature ** 2 if t2_scale else loss


def _trl():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # its import-time warning
    from trl.experimental.server_distillation import server_distillation_trainer as m  # noqa: PLC0415
    return m


def trl_server_topk_kl(student_logits, teacher_logprobs, teacher_indices, *, temperature=1.0,
                       add_tail=True, labels=None):
    """TRL 1.16's sparse top-k forward KL, the ServerDistillationTrainer's beta == 0 loss: its own
    method ServerDistillationTrainer._compute_server_forward_kl_loss (server_distillation_
    trainer.py:500-542) called with a stand-in `self` (the method reads only self.loss_add_tail
    and the staticmethod self._reduce_divergence_loss), after the trainer's
    log_softmax(student_logits / T) (compute_loss, :319). No trainer, server or model is built.

    TRL's contract, per row, entries I = teacher entries with ℓ > −inf (−inf = padding):
      add_tail=True (loss_add_tail, TRL's default): the K+1 entries of _add_tail_bucket (:72-82):
        teacher ℓ_k as given (NOT re-tempered, NOT renormalized) and
            log p_tail = log(1 − exp(min(logsumexp_I ℓ, −1e-7))),
        student log q_k = log_softmax(z/T) gathered (not renormalized) and
            log q_tail = log(1 − exp(min(logsumexp_I log q, −1e-7))),
        loss_row = Σ_{I ∪ tail} p (log p − log q) (_jsd_divergence β = 0 with the support mask,
        :40-41; NaNs from 0·inf zeroed by nan_to_num).
        == ours(kind="fkl", tail="bucket", temperature=T, t2_scale=False) except where a clamp
        binds: Σ_I p ≥ 1 − 1e-7 gives TRL p_tail ≈ 1e-7 (ours: 1 − Σ, clamped at 0), and a
        student mass on I ≥ 1 − 1e-7 gives TRL q_tail = 1e-7 with NO gradient through the tail
        (clamp), where ours sums the mass outside I directly (exact, with its gradient). In fp32
        1 − Σ_I q also loses all relative precision as the student's top-k mass → 1; ours does
        not form it.
      add_tail=False: both sides renormalized over I (teacher a − logsumexp_I, student
        log q − logsumexp_I log q): loss_row = fkl(tail="renormalize") + log Σ_I q_k. None of
        our tails: ours never renormalizes the student.
    β: fkl only (this method hard-codes beta=0.0; TRL's beta > 0 path uses top-1 support, see
    trl_sparse_divergence). Temperature: the teacher's top-k come from the server already at T
    (get_sequence_logprobs(..., temperature=self.temperature), :376-380): no re-tempering, so the API's
    teacher_temperature has no counterpart. T²: none. Reduction: _reduce_divergence_loss
    "batchmean": Σ over rows with labels != −100 / max(1, kept) (num_items_in_batch unused on this
    path, :251-285); the trainer then divides by the gradient-accumulation steps (not done here).
    labels None keeps every row. Precision: the input dtype throughout (fp32/float64 as given)."""
    m = _trl()
    z = student_logits.reshape(-1, student_logits.shape[-1])
    idx = teacher_indices.reshape(z.shape[0], -1).long()
    lp = teacher_logprobs.reshape(idx.shape).detach().to(z.dtype)
    lab = torch.zeros(z.shape[0], dtype=torch.long, device=z.device) if labels is None \
        else labels.reshape(-1)
    student_log_probs = torch.nn.functional.log_softmax(z / temperature, dim=-1)
    stand_in = types.SimpleNamespace(
        loss_add_tail=add_tail,
        _reduce_divergence_loss=m.ServerDistillationTrainer._reduce_divergence_loss)
    return m.ServerDistillationTrainer._compute_server_forward_kl_loss(
        stand_in, {"topk_logprobs": lp, "topk_token_ids": idx}, student_log_probs, lab)


def trl_sparse_divergence(student_logits, teacher_logprobs, teacher_indices, *, beta,
                          temperature=1.0, add_tail=True, labels=None):
    """The body of trl_server_topk_kl's method with TRL's _jsd_divergence at any β (TRL itself
    reaches β > 0 only through _compute_sparse_top_1_divergence_loss, on the support {teacher
    top-1, sampled token}; this applies the same pieces to the teacher's top-k): TRL's
    _add_tail_bucket, _jsd_divergence(support_mask) and _reduce_divergence_loss, called as is.

    β convention (TRL's, = ours): β = 0 forward KL Σ p log(p/q), β = 1 reverse KL Σ q log(q/p),
    otherwise β·KL(p‖m) + (1−β)·KL(q‖m) with m = β p + (1−β) q (log m from m clamped at
    finfo.tiny). So ours(kind="fkl"|"rkl"|"jsd", beta=β, tail="bucket", t2_scale=False) ==
    this(beta=0 | 1 | β, add_tail=True), with the same tail clamps as trl_server_topk_kl; no T²,
    batchmean over rows with labels != −100."""
    m = _trl()
    z = student_logits.reshape(-1, student_logits.shape[-1])
    idx = teacher_indices.reshape(z.shape[0], -1).long()
    t = teacher_logprobs.reshape(idx.shape).detach().to(z.dtype)
    lab = torch.zeros(z.shape[0], dtype=torch.long, device=z.device) if labels is None \
        else labels.reshape(-1)
    valid = t > float("-inf")
    neg_inf = torch.full((), float("-inf"), dtype=z.dtype, device=z.device)
    s = torch.where(valid, torch.log_softmax(z / temperature, -1).gather(-1, idx), neg_inf)
    t = torch.where(valid, t, neg_inf)
    if add_tail:
        s, support = m._add_tail_bucket(s, valid)
        t, _ = m._add_tail_bucket(t, valid)
    else:
        support = valid
        s = s - torch.logsumexp(s, -1, keepdim=True)
        t = t - torch.logsumexp(t, -1, keepdim=True)
    per_entry = m._jsd_divergence(s, t, float(beta), support)
    return m.ServerDistillationTrainer._reduce_divergence_loss(
        per_entry, completion_mask=lab != IGNORE_INDEX, reduction="batchmean")


PEERS = {"distillkit": distillkit_sparse_kl, "trl": trl_server_topk_kl}
