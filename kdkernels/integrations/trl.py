"""TRL 1.16's distillation losses on kdkernels' kernels, with TRL's signatures, β convention
and reductions, so that switching a trainer over is one line:

    chunked_divergence_loss     trl.trainer.distillation_trainer._chunked_divergence_loss
                                (DistillationTrainer): fused_linear_divergence
    generalized_jsd_loss        GKDTrainer.generalized_jsd_loss: divergence
    server_forward_kl_loss      ServerDistillationTrainer._compute_server_forward_kl_loss
                                (loss_add_tail=True): sparse_divergence, tail="bucket"
    use_kdkernels(trainer)      switches a trainer instance (and, for DistillationTrainer's
                                module-level loss, the process: see there)

The contracts (TRL's code, in our words): β = 0 is KL(teacher‖student), β = 1 is
KL(student‖teacher), otherwise β·KL(p‖m) + (1−β)·KL(q‖m) with m = βp + (1−β)q; the
temperature divides both logits (after the logit scale and the softcap) and there is no T².
Where TRL's numbers differ from ours beyond rounding it is TRL's clamp of a top-k tail mass
at 1 − 1e-7 (server_forward_kl_loss): ours is exact there (python_tests/test_integrations_trl.py
says so against the float64 reference)."""
import types

import torch

from ..divergence import divergence
from ..fused_linear import fused_linear_divergence
from ..sparse import sparse_divergence


def _kind(beta):
    beta = float(beta)
    return ("fkl", 0.5) if beta == 0.0 else ("rkl", 0.5) if beta == 1.0 else ("jsd", beta)


def _plain(weight, dtype):
    """A DTensor lm_head weight gathered once (as TRL does under FSDP2), in the hidden
    states' dtype (TRL casts the mixed-precision fp32 master copy the same way)."""
    if weight is None:
        return None
    full_tensor = getattr(weight, "full_tensor", None)
    if full_tensor is not None:
        weight = full_tensor()
    return weight if weight.dtype == dtype else weight.to(dtype)


def chunked_divergence_loss(student_hidden_states, teacher_hidden_states,
                            student_lm_head_weight, teacher_lm_head_weight, completion_mask,
                            beta, num_items_in_batch=None, student_lm_head_bias=None,
                            teacher_lm_head_bias=None, student_logit_scale=1.0,
                            teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                            teacher_final_logit_softcapping=None, temperature=1.0):
    """TRL's _chunked_divergence_loss: (loss, entropy_sum, n_valid) over (B, K, H) hidden
    states and (V, H) lm_heads. loss = Σ over positions with completion_mask != 0 of the
    generalized JSD at `temperature` (no T²), divided by the number of those positions
    (at least 1) or by num_items_in_batch; entropy_sum = Σ of the student's entropy at T over
    them (no gradient); n_valid = their number (int64). On fused_linear_divergence: the logits
    are never materialized and dropped positions are never projected."""
    kind, b = _kind(beta)
    out = fused_linear_divergence(
        student_hidden_states, _plain(student_lm_head_weight, student_hidden_states.dtype),
        teacher_hidden_states, _plain(teacher_lm_head_weight, teacher_hidden_states.dtype),
        student_bias=_plain(student_lm_head_bias, student_hidden_states.dtype),
        teacher_bias=_plain(teacher_lm_head_bias, teacher_hidden_states.dtype),
        kind=kind, beta=b, temperature=temperature, t2_scale=False,
        mask=completion_mask.reshape(student_hidden_states.shape[:-1]) != 0,
        student_logit_scale=float(student_logit_scale),
        teacher_logit_scale=float(teacher_logit_scale),
        student_softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcapping, num_items=num_items_in_batch,
        return_components=True)
    return out.loss, out.student_entropy, out.num_kept


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """GKDTrainer.generalized_jsd_loss: the generalized JSD of (…, V) logits at `temperature`
    (no T²), over the positions whose label is not −100. Reductions as TRL's: num_items_in_batch
    given: the sum / it; "batchmean": the sum / the kept positions (at least 1), or / the
    first dim without labels; "sum"; "mean": the sum / (kept positions × V), TRL's mean over
    the element-wise terms; anything else: the element-wise terms themselves, (M, V) for the
    M kept positions (or the logits' shape without labels), which materializes them as TRL
    does (the only reduction that needs them). Gradients flow to whichever logits require
    grad, as in TRL."""
    kind, b = _kind(beta)
    if num_items_in_batch is None and reduction not in ("batchmean", "sum", "mean"):
        return _elementwise_jsd(student_logits, teacher_logits, labels, float(beta), temperature)
    common = dict(kind=kind, beta=b, temperature=temperature, t2_scale=False, labels=labels)
    if num_items_in_batch is not None:
        return divergence(student_logits, teacher_logits, reduction="mean",
                          num_items=num_items_in_batch, **common)
    if reduction == "batchmean" and labels is not None:
        return divergence(student_logits, teacher_logits, reduction="mean", **common)
    total = divergence(student_logits, teacher_logits, reduction="sum", **common)
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(student_logits.shape[0], 1)
    kept = student_logits.numel() // student_logits.shape[-1] if labels is None \
        else int((labels != -100).sum())
    return total / (max(kept, 1) * student_logits.shape[-1])


def _elementwise_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's element-wise terms (F.kl_div with log targets), in plain PyTorch."""
    ls = torch.log_softmax(student_logits / temperature, -1)
    lt = torch.log_softmax(teacher_logits / temperature, -1)
    if beta == 0.0:
        terms = _kl_terms(lt, ls)
    elif beta == 1.0:
        terms = _kl_terms(ls, lt)
    else:
        b = torch.tensor(beta, dtype=ls.dtype, device=ls.device)
        lm = torch.logaddexp(ls + torch.log1p(-b), lt + torch.log(b))
        terms = beta * _kl_terms(lt, lm) + (1 - beta) * _kl_terms(ls, lm)
    return terms if labels is None else terms[labels != -100]


def _kl_terms(log_target, log_input):
    return torch.nn.functional.kl_div(log_input, log_target, reduction="none", log_target=True)


def server_forward_kl_loss(teacher_result, student_log_probs, labels):
    """ServerDistillationTrainer._compute_server_forward_kl_loss with loss_add_tail=True: the
    forward KL over the teacher's top-k entries plus one tail entry on both sides, per position
    whose label is not −100, averaged over them (at least 1). teacher_result holds
    "topk_logprobs" and "topk_token_ids" (B, T, K), −inf = padding; student_log_probs (B, T, V)
    the trainer's log_softmax(logits / T). On sparse_divergence(tail="bucket"): the student's
    tail mass is summed directly where TRL forms 1 − Σq and clamps its log at −1e-7 (TRL's
    loss moves, and its tail gradient vanishes, when the student's top-k mass is within 1e-7
    of 1; the teacher's likewise). Since log_softmax is idempotent, the log-probs serve as
    the logits at temperature 1."""
    return sparse_divergence(student_log_probs, teacher_result["topk_logprobs"],
                             teacher_result["topk_token_ids"], kind="fkl", tail="bucket",
                             t2_scale=False, labels=labels)


def use_kdkernels(trainer):
    """Switches a TRL trainer over to kdkernels' losses and returns it:
        GKDTrainer                  trainer.generalized_jsd_loss (this instance)
        ServerDistillationTrainer   its top-k forward KL (this instance, loss_add_tail=True;
                                    with loss_add_tail=False TRL's own loss stays: it
                                    renormalizes the student over the top-k, which no
                                    kdkernels tail does)
        DistillationTrainer         trl.trainer.distillation_trainer._chunked_divergence_loss,
                                    which the trainer looks up as a module global: for every
                                    DistillationTrainer in the process (restore_trl() undoes it)
    """
    from trl.experimental.gkd.gkd_trainer import GKDTrainer  # noqa: PLC0415 (optional dependency)
    from trl.trainer import distillation_trainer  # noqa: PLC0415

    if isinstance(trainer, GKDTrainer):
        trainer.generalized_jsd_loss = generalized_jsd_loss
        return trainer
    if not isinstance(trainer, distillation_trainer.DistillationTrainer):
        raise TypeError(f"use_kdkernels takes a TRL DistillationTrainer, GKDTrainer or "
                        f"ServerDistillationTrainer, got {type(trainer).__name__}")
    if hasattr(trainer, "_compute_server_forward_kl_loss") and \
            getattr(trainer, "loss_add_tail", False):
        trainer._compute_server_forward_kl_loss = types.MethodType(
            lambda self, result, log_probs, labels: server_forward_kl_loss(result, log_probs,
                                                                           labels), trainer)
    if distillation_trainer._chunked_divergence_loss is not chunked_divergence_loss:
        _ORIGINAL.setdefault("chunked", distillation_trainer._chunked_divergence_loss)
        distillation_trainer._chunked_divergence_loss = chunked_divergence_loss
    return trainer


_ORIGINAL = {}


def restore_trl():
    """Undoes use_kdkernels' process-wide switch of DistillationTrainer's loss."""
    if "chunked" in _ORIGINAL:
        from trl.trainer import distillation_trainer  # noqa: PLC0415

        distillation_trainer._chunked_divergence_loss = _ORIGINAL.pop("chunked")
