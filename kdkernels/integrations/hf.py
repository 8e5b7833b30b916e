"""Hugging Face transformers: distilling with the fused-linear losses in a `transformers.Trainer`
or a plain loop, from the models' last hidden states and output embeddings (the (N, V) logits
are never built):

    lm_head(model)                 the output projection and the logit post-processing its config
                                   declares (logit scale, final-logit softcap), read as TRL's
                                   DistillationTrainer reads them
    last_hidden_state(model, ...)  the backbone's last hidden state (after the final norm),
                                   without the logits model(...) would compute
    DistillationTrainer            a transformers.Trainer whose compute_loss runs a frozen
                                   teacher and calls kdkernels.fused_linear_divergence, or
                                   fused_linear_sparse_divergence for a cached top-k teacher

How the configs are read (the names differ per architecture; TRL reads the same ones): the
logits are scale·(h·Wᵀ + b), then softcap·tanh(·/softcap) where final_logit_softcapping is set
(Gemma 2/3). The scale is `logit_scale` (Cohere), else `output_multiplier`, else
`lm_head_multiplier` (Falcon-H1), else 1/`logits_scaling` (Granite, MiniCPM3; times it for
HyperCLOVA X), else 1. These are the models' own forward passes' semantics: the tests compare
the loss with one computed from model(...).logits."""
from typing import NamedTuple, Optional

import torch

from ..fused_linear import fused_linear_divergence
from ..sparse import fused_linear_sparse_divergence


class LMHead(NamedTuple):
    """A causal LM's output projection: logits = softcap(logit_scale·(h·weightᵀ + bias))."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    logit_scale: float
    softcap: Optional[float]


def logit_scale(config):
    """The factor a model's forward multiplies its logits by (see the module docstring)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(config, "model_type", None) == "hyperclovax" \
            else 1.0 / float(scaling)
    return 1.0


def lm_head(model):
    """LMHead of a transformers causal LM: get_output_embeddings()'s weight and bias, the
    config's logit scale and final-logit softcap."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"model: expected a causal LM with output embeddings, got "
                        f"{type(model).__name__}")
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    return LMHead(head.weight, getattr(head, "bias", None), logit_scale(config),
                  None if softcap is None else float(softcap))


def last_hidden_state(model, **inputs):
    """The last hidden state (B, T, H) of model.base_model (the backbone without the lm_head,
    as TRL uses it), for input_ids / attention_mask / ... given as keywords."""
    backbone = model.base_model
    if backbone is model:
        raise TypeError(f"model: {type(model).__name__} has no separate backbone "
                        f"(base_model is the model itself)")
    return backbone(**inputs, use_cache=False).last_hidden_state


def distillation_loss(student, teacher, inputs, labels, *, teacher_topk=None, num_items=None,
                      **options):
    """The next-token distillation loss of `student` from `teacher` on one batch.

    inputs: the models' keyword inputs (input_ids, attention_mask, ...); labels (B, T), −100
    at positions to drop; position t's hidden state predicts token t + 1, as in the models' own
    loss. teacher_topk: None for a dense teacher (run here, under no_grad), or a cached top-k
    teacher (logprobs, indices), each (B, T, K), for fused_linear_sparse_divergence (the teacher
    is then not run and may be None). options: the keyword options of fused_linear_divergence /
    fused_linear_sparse_divergence (kind, temperature, beta, hard_label_weight, vocab_size, ...);
    the heads' logit scales and softcaps come from the configs."""
    hidden = last_hidden_state(student, **inputs)[:, :-1]
    head = lm_head(student)
    common = dict(labels=labels[:, 1:], num_items=num_items, student_bias=head.bias,
                  student_logit_scale=head.logit_scale, student_softcap=head.softcap)
    if teacher_topk is not None:
        logprobs, indices = teacher_topk
        return fused_linear_sparse_divergence(hidden, head.weight, logprobs[:, :-1],
                                              indices[:, :-1], **common, **options)
    with torch.no_grad():
        teacher_hidden = last_hidden_state(teacher, **inputs)[:, :-1]
    t_head = lm_head(teacher)
    return fused_linear_divergence(
        hidden, head.weight, teacher_hidden, t_head.weight, teacher_bias=t_head.bias,
        teacher_logit_scale=t_head.logit_scale, teacher_softcap=t_head.softcap, **common,
        **options)


def _make_trainer():
    import transformers  # noqa: PLC0415 (optional dependency)

    class DistillationTrainer(transformers.Trainer):
        """transformers.Trainer distilling the model from a frozen teacher with kdkernels'
        fused-linear losses: DistillationTrainer(model=student, teacher_model=teacher,
        loss_options=dict(kind="jsd", beta=0.5, temperature=2.0, hard_label_weight=0.1), args,
        train_dataset, ...). Each batch has input_ids, attention_mask, labels (−100 = no loss)
        and, for a cached top-k teacher, teacher_topk_logprobs and teacher_topk_ids (B, T, K)
        (the teacher is then not run; teacher_model may be None). The loss is
        distillation_loss(...) with the Trainer's num_items_in_batch as the mean's
        denominator (exact under gradient accumulation). One process: the student is called
        through its unwrapped module (DDP/FSDP wrappers are not run)."""

        def __init__(self, *args, teacher_model=None, loss_options=None, **kwargs):
            super().__init__(*args, **kwargs)
            if teacher_model is not None:
                teacher_model.eval().requires_grad_(False)
                teacher_model.to(self.args.device)
            self.teacher_model = teacher_model
            self.loss_options = dict(loss_options or {})

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            logprobs = inputs.pop("teacher_topk_logprobs", None)
            indices = inputs.pop("teacher_topk_ids", None)
            if (logprobs is None) != (indices is None):
                raise ValueError("inputs: teacher_topk_logprobs and teacher_topk_ids come "
                                 "together")
            if logprobs is None and self.teacher_model is None:
                raise ValueError("teacher_model is None and the batch has no cached top-k "
                                 "teacher (teacher_topk_logprobs, teacher_topk_ids)")
            loss = distillation_loss(
                self.accelerator.unwrap_model(model), self.teacher_model, inputs, labels,
                teacher_topk=None if logprobs is None else (logprobs, indices),
                num_items=num_items_in_batch, **self.loss_options)
            return (loss, {"loss": loss}) if return_outputs else loss

    return DistillationTrainer


def __getattr__(name):  # DistillationTrainer needs transformers: built when first asked for
    if name == "DistillationTrainer":
        cls = _make_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
