"""TRL 1.16's DistillationTrainer end to end with kdkernels switched in (use_kdkernels): a few
on-policy steps on CPU (the student generates its completions) with tiny random Gemma 2
(final-logit softcapping) and Cohere (logit scale) models, which TRL reads from the configs,
and a tokenizer built in code. At every step, TRL's own _chunked_divergence_loss runs on the
very arguments the trainer passed: the loss, entropy, count and gradients must agree."""
import os
import tempfile

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import datasets  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.trainer import distillation_trainer  # noqa: E402

from kdkernels.integrations import trl as kd_trl  # noqa: E402

import tiny_hf  # noqa: E402


def _compare(ours_fn, trl_fn, args, kwargs):
    """Both losses on detached copies of the trainer's arguments, with their gradients with
    respect to the student's hidden states and lm_head weight."""
    hs, ht, ws, wt = (a.detach().clone() for a in args[:4])
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    results = []
    for fn in (ours_fn, trl_fn):
        loss, entropy, n_valid = fn(hs, ht, ws, wt, *args[4:], **kwargs)
        g_hs, g_ws = torch.autograd.grad(loss, (hs, ws))
        results.append((loss.detach(), entropy.detach(), n_valid, g_hs, g_ws))
    return results


@pytest.mark.parametrize("arch,beta", [("gemma2", 0.0), ("gemma2", 0.5), ("cohere", 0.3),
                                       ("cohere", 1.0)])
def test_distillation_trainer_with_kdkernels(arch, beta):
    tok = tiny_hf.tokenizer()
    student, teacher = tiny_hf.pair(arch)
    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_completion_length=6, beta=beta, temperature=1.5,
        learning_rate=1e-3, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
        logging_steps=1, activation_checkpointing=False, disable_tqdm=True)
    data = datasets.Dataset.from_dict({"prompt": tiny_hf.sentences(8, seed=4)})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=data, processing_class=tok)
    original = distillation_trainer._chunked_divergence_loss
    seen = []
    try:
        assert kd_trl.use_kdkernels(trainer) is trainer
        ours_fn = distillation_trainer._chunked_divergence_loss
        assert ours_fn is kd_trl.chunked_divergence_loss

        def spy(*a, **k):
            seen.append(_compare(ours_fn, original, a, k))
            return ours_fn(*a, **k)

        distillation_trainer._chunked_divergence_loss = spy
        result = trainer.train()
    finally:
        kd_trl.restore_trl()
    assert distillation_trainer._chunked_divergence_loss is original
    assert len(seen) == 4  # 2 steps × 2 micro-batches
    for ours, trl in seen:
        for what, a, b in zip(("loss", "entropy", "n_valid", "d hidden", "d lm_head"), ours, trl):
            torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(),
                                       rtol=2e-5, atol=2e-7, msg=lambda m: f"{what}: {m}")
        assert int(ours[2]) > 0  # completions were generated and trained on
    assert torch.isfinite(torch.tensor(result.training_loss))
