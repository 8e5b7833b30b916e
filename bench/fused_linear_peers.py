"""Peer implementations of the fused linear divergence (hidden states + lm_heads -> loss), behind
one signature, for the benchmarks and the oracle tests of kdkernels.fused_linear_divergence:

    peer(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
         kind, temperature, beta, labels=None, hard_label_weight=0.0) -> scalar loss

differentiable w.r.t. student_hidden and student_weight (neither peer gives the teacher a
gradient). hidden may have leading dims (..., H); they are flattened to rows. labels (same
leading dims) marks the kept rows (label != -100); None keeps every row.

How each relates to ours (kdkernels.fused_linear_divergence, reduction="mean", no bias, scale
1, no softcap, labels as given, all other arguments at their defaults):

    ours(kind, T, beta, t2_scale=True)                       == T**2 * peer(kind, T, beta)
    ours(kind, T, beta, t2_scale=False)                      ==        peer(kind, T, beta)
    ours(..., t2_scale=False, hard_label_weight=w)           == liger_jsd(..., hard_label_weight=w)

Both peers use our β convention (TRL's): m = β·p_teacher + (1−β)·q_student,
jsd = β·KL(p‖m) + (1−β)·KL(q‖m), with β == 0 special-cased to KL(p‖q) and β == 1 to KL(q‖p)
(the interior formula itself tends to 0 at both ends). Both divide the sum over kept rows by
max(1, number of kept rows) ("mean" per kept token, not batchmean over sequences); neither
applies T². Vocabularies: the adapters cut both heads to their first min(V_s, V_t) rows (our
contract); see each peer for what it would do with unequal heads by itself.
"""
import torch

IGNORE_INDEX = -100


def _beta_for(kind, beta, peer):
    """Our kind -> the peer's β (both peers select the divergence by β alone)."""
    if kind == "fkl":
        return 0.0
    if kind == "rkl":
        return 1.0
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        return float(beta)
    raise NotImplementedError(f"{peer} has no {kind!r} (only fkl, rkl, jsd)")


def _rows(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
    """2-D rows, both heads cut to the shared vocabulary, the labels flattened."""
    v = min(student_weight.shape[0], teacher_weight.shape[0])
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    lab = None if labels is None else labels.reshape(-1)
    return sh, student_weight[:v], th, teacher_weight[:v], lab


def trl_chunked(student_hidden, student_weight, teacher_hidden, teacher_weight, *, kind,
                temperature, beta, labels=None, hard_label_weight=0.0):
    """TRL 1.16's DistillationTrainer loss: trl.trainer.distillation_trainer._chunked_divergence_loss
    (distillation_trainer.py:101-213), around trl.kernels.chunked_divergence.ChunkedDivergenceFunction
    (chunked_divergence.py:371-589; 4096-token x 32768-vocab tiles, Triton on cuda/xpu, torch tiles
    elsewhere).

    Supports fkl (β=0), rkl (β=1), jsd (0<β<1); tvd/skew_* raise NotImplementedError, and so does
    hard_label_weight != 0 (the trainer has no hard-label term).
    Contract: per row D_β(softmax(z_t/T), softmax(z_s/T)) with β as ours (chunked_divergence.py:
    376-378, 482-490), no T²; rows with mask 0 are zeroed (on CPU every row is still projected,
    distillation_trainer.py:183-202), loss = Σ / max(1, kept) (or / num_items_in_batch, :206-212).
    So ours(t2_scale=True) == T² · this. labels are used only as the mask (label != -100).
    Precision: every logit tile, statistic and gradient accumulator is fp32 whatever the input
    dtype (_project, :360-368; backward :537-541): float64 inputs give fp32-accurate results.
    fkl/rkl use Σp·(z_t−z_s) − log Z_t + log Z_s (:482-486), which cancels at large T.
    Vocabulary: by itself TRL iterates over V_s and slices the teacher head with the same ranges
    (:426, :436-437): V_t > V_s silently uses the teacher's first V_s rows (= our contract),
    V_t < V_s fails; the adapter cuts both to min(V_s, V_t) anyway.
    Entropy (returned as a sum, not used here): per row log Z_s − Σ q·z_s/T of q = softmax(z_s/T),
    the student AT the loss temperature (:481); the trainer sums it over kept rows, gathers sum and
    count over ranks and logs entropy_sum / num_valid_tokens, the mean per kept token in nats
    (distillation_trainer.py:1807-1814)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    b = _beta_for(kind, beta, "TRL")
    if hard_label_weight:
        raise NotImplementedError("TRL's distillation loss has no hard-label (CE) term")
    sh, sw, th, tw, lab = _rows(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                labels)
    mask = (torch.ones(sh.shape[0], dtype=torch.long, device=sh.device) if lab is None
            else (lab != IGNORE_INDEX).long())
    loss, _entropy_sum, _n_valid = _chunked_divergence_loss(
        sh, th, sw, tw, mask, b, num_items_in_batch=None, temperature=float(temperature))
    return loss


def liger_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, *, kind,
              temperature, beta, labels=None, hard_label_weight=0.0):
    """liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (Liger-Kernel 0.8.5; chunked_loss/jsd_loss.py
    and fused_linear_distillation.py): pure PyTorch over row chunks (1024 rows; torch.func.grad_and_value
    per chunk, gradients computed during the forward), so it runs on CPU.

    Supports fkl (β=0), rkl (β=1), jsd (0<β<1) (jsd_loss.py:33-47, β as ours); tvd/skew_* raise
    NotImplementedError.
    Contract: soft = Σ_kept D_β(softmax(z_t/T), softmax(z_s/T)) / max(1, kept) with no T²
    (fused_linear_distillation.py:120-121, 138-146); hard = Σ_kept CE(z_s at T=1, label) / max(1, kept)
    (:55-63, 141, CE in fp32); loss = weight_hard·hard + weight_soft·soft (:148). Rows with
    label == ignore_index are dropped from both (jsd_loss.py:52-55, nll ignore_index).
    The adapter passes weight_soft=1, weight_hard=hard_label_weight (Liger's defaults are 0.5/0.5;
    with weight_hard == 0 the CE is skipped, :201). So
    ours(t2_scale=True, hard_label_weight=0) == T² · this and
    ours(t2_scale=False, hard_label_weight=w) == this(hard_label_weight=w).
    labels=None: all rows kept (zeros passed as Liger's required labels).
    Precision: the divergence runs in the input dtype (float64 works) but the loss is accumulated
    into a float32 scalar (:205): float64 inputs give float64 gradients and a float32-rounded loss.
    compiled=True only on CUDA (torch.compile of the chunk step on CPU costs a C++ build per shape).
    Vocabulary: by itself Liger pads the STUDENT logits (after /T) with zeros up to V_t when
    V_t > V_s (:127-136) and fails when V_s > V_t; the adapter cuts both heads to min(V_s, V_t)."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    b = _beta_for(kind, beta, "Liger")
    sh, sw, th, tw, lab = _rows(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                labels)
    if lab is None:
        lab = torch.zeros(sh.shape[0], dtype=torch.long, device=sh.device)
    fn = LigerFusedLinearJSDLoss(weight_hard_loss=float(hard_label_weight), weight_soft_loss=1.0,
                                 beta=b, ignore_index=IGNORE_INDEX, temperature=float(temperature),
                                 compiled=sh.is_cuda)
    return fn(sh, sw, th, tw, lab)


PEERS = {"trl": trl_chunked, "liger": liger_jsd}
