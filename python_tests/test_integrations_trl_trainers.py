"""TRL 1.16's DistillationTrainer end to end with kdkernels switched in (use_kdkernels): a few
on-policy steps on CPU (the student generates its completions) with tiny random Gemma 2
(final-logit softcapping) and Cohere (logit scale) models, which TRL reads from the configs,
and a tokenizer built in code. At every step, TRL's own _chunked_divergence_loss runs on the
very arguments the trainer passed: the loss, entropy, count and gradients must agree. The same
for GKDTrainer (its generalized_jsd_loss on the same logits)."""
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


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {{ eos_token }} "
                 "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}")


def test_gkd_trainer_with_kdkernels():
    """TRL's GKDTrainer (on-policy with probability lmbda, else the dataset's completions) with
    use_kdkernels: at every step TRL's own generalized_jsd_loss on the same logits agrees."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: PLC0415

    tok = tiny_hf.tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    student, teacher = tiny_hf.pair("cohere")
    words = tiny_hf.sentences(16, seed=5)
    data = datasets.Dataset.from_dict({"messages": [
        [{"role": "user", "content": words[2 * i]},
         {"role": "assistant", "content": words[2 * i + 1]}] for i in range(8)]})
    args = GKDConfig(
        output_dir=tempfile.mkdtemp(), max_steps=3, per_device_train_batch_size=2, lmbda=0.5,
        beta=0.3, max_new_tokens=4, learning_rate=1e-3, report_to=[], use_cpu=True, bf16=False,
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=1)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                         processing_class=tok)
    trl_fn = type(trainer).generalized_jsd_loss
    assert kd_trl.use_kdkernels(trainer) is trainer
    ours_fn = trainer.generalized_jsd_loss
    assert ours_fn is kd_trl.generalized_jsd_loss
    seen = []

    def spy(student_logits, teacher_logits, **kw):
        pairs = []
        for fn in (ours_fn, trl_fn):
            s = student_logits.detach().clone().requires_grad_(True)
            loss = fn(s, teacher_logits.detach(), **kw)
            pairs.append((loss.detach(), torch.autograd.grad(loss, s)[0]))
        seen.append(pairs)
        return ours_fn(student_logits, teacher_logits, **kw)

    trainer.generalized_jsd_loss = spy
    result = trainer.train()
    assert len(seen) == 3
    for (ours, g_ours), (trl, g_trl) in seen:
        torch.testing.assert_close(ours.double(), trl.double(), rtol=2e-5, atol=2e-7)
        torch.testing.assert_close(g_ours.double(), g_trl.double(), rtol=2e-5, atol=1e-8)
    assert torch.isfinite(torch.tensor(result.training_loss))
