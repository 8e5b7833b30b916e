"""kdkernels.integrations.hf on tiny random Gemma 2 (final-logit softcapping) and Cohere
(logit scale) causal LMs built from configs, with a tokenizer built in code (no downloads):
the fused loss from hidden states and the configs' logit post-processing equals the loss of the
models' own logits (float64 reference), and TRL's _chunked_divergence_loss on the same batch,
also inside a running transformers.Trainer (dense and cached top-k teachers)."""
import tempfile

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels.integrations import hf  # noqa: E402

from helpers import assert_matches  # noqa: E402
import tiny_hf  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_hf.tokenizer()


def test_lm_head_reads_the_configs():
    student, _ = tiny_hf.pair("gemma2")
    head = hf.lm_head(student)
    assert head.weight is student.lm_head.weight and head.bias is None
    assert (head.logit_scale, head.softcap) == (1.0, 5.0)
    student, _ = tiny_hf.pair("cohere")
    assert (hf.lm_head(student).logit_scale, hf.lm_head(student).softcap) == (0.25, None)
    # The other names TRL reads (config objects only: no model needed).
    cfg = transformers.LlamaConfig()
    assert hf.logit_scale(cfg) == 1.0
    cfg.logits_scaling = 4.0  # Granite / MiniCPM3 divide by it
    assert hf.logit_scale(cfg) == 0.25
    cfg.lm_head_multiplier = 3.0  # Falcon-H1 (read before logits_scaling)
    assert hf.logit_scale(cfg) == 3.0


def _reference(student, teacher, inputs, labels, hard, dtype, **options):
    """The loss from the models' own logits (their forward applies the scale and the softcap)
    in `dtype`, and the student parameters' gradients."""
    student.zero_grad()
    s = student(**inputs).logits[:, :-1].to(dtype)
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1].to(dtype)
    lab = labels[:, 1:]
    loss = kdkernels.divergence(s, t, labels=lab, backend="reference", **options)
    if hard:
        loss = loss + hard * torch.nn.functional.cross_entropy(s.reshape(-1, s.shape[-1]),
                                                               lab.reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("arch", list(tiny_hf.ARCHS))
@pytest.mark.parametrize("kind,beta,hard", [("fkl", 0.5, 0.0), ("jsd", 0.3, 0.2),
                                            ("rkl", 0.5, 0.0)])
def test_distillation_loss_equals_the_models_logits(tok, arch, kind, beta, hard):
    student, teacher = tiny_hf.pair(arch)
    inputs, labels = tiny_hf.batch(tok, seed=1)
    options = dict(kind=kind, beta=beta, temperature=2.0)
    ref64, grads64 = _reference(student, teacher, inputs, labels, hard, torch.float64, **options)
    ref32, grads32 = _reference(student, teacher, inputs, labels, hard, torch.float32, **options)
    student.zero_grad()
    ours = hf.distillation_loss(student, teacher, inputs, labels, hard_label_weight=hard,
                                backend="cpu", **options)
    ours.backward()
    assert_matches(ours.detach(), ref64, ref32, torch.float32, "loss")
    for name, p in student.named_parameters():
        assert_matches(p.grad, grads64[name], grads32[name], torch.float32, name)


def test_distillation_loss_cached_topk_teacher(tok):
    """A cached top-k teacher (its top-k log-probs of the softcapped logits) against
    sparse_divergence of the student's own logits."""
    student, teacher = tiny_hf.pair("gemma2")
    inputs, labels = tiny_hf.batch(tok, seed=2)
    with torch.no_grad():
        logprobs, ids = torch.log_softmax(teacher(**inputs).logits, -1).topk(8, dim=-1)
    options = dict(kind="fkl", tail="bucket", temperature=1.0)
    s = student(**inputs).logits[:, :-1]
    ref = kdkernels.sparse_divergence(s.double(), logprobs[:, :-1].double(), ids[:, :-1],
                                      labels=labels[:, 1:], backend="reference", **options)
    ref.backward()
    ref_grad = student.lm_head.weight.grad.clone()
    student.zero_grad()
    ours = hf.distillation_loss(student, None, inputs, labels, teacher_topk=(logprobs, ids),
                                **options)
    ours.backward()
    torch.testing.assert_close(ours.double(), ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(student.lm_head.weight.grad, ref_grad.float(), rtol=1e-4,
                               atol=1e-6)


def _trl_loss(student, teacher, inputs, labels, beta, temperature, num_items=None):
    """TRL's own _chunked_divergence_loss on the same batch (no T², β convention), fed the
    way TRL's DistillationTrainer feeds it (shifted hidden states, loss mask, heads)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: PLC0415

    hs = hf.last_hidden_state(student, **inputs)[:, :-1]
    with torch.no_grad():
        ht = hf.last_hidden_state(teacher, **inputs)[:, :-1]
    sh, th = hf.lm_head(student), hf.lm_head(teacher)
    loss, _, _ = _chunked_divergence_loss(
        hs, ht, sh.weight, th.weight, (labels[:, 1:] != -100).long(), beta,
        num_items_in_batch=num_items, student_logit_scale=sh.logit_scale,
        teacher_logit_scale=th.logit_scale, student_final_logit_softcapping=sh.softcap,
        teacher_final_logit_softcapping=th.softcap, temperature=temperature)
    return loss


def _dataset(tok, n):
    enc = tok(tiny_hf.sentences(n, seed=3))
    return [{"input_ids": ids} for ids in enc["input_ids"]]


@pytest.mark.parametrize("arch", list(tiny_hf.ARCHS))
def test_trainer_runs_and_matches_trl(tok, arch):
    """A few steps of transformers.Trainer with kdkernels' DistillationTrainer; at every step
    the loss it trains on equals TRL's loss on the same batch and parameters."""
    pytest.importorskip("trl")
    student, teacher = tiny_hf.pair(arch)
    beta, temperature = 0.5, 2.0
    seen = []

    class Checked(hf.DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                trl = _trl_loss(model, self.teacher_model, model_inputs, inputs["labels"], beta,
                                temperature, num_items_in_batch)
            seen.append((loss.detach(), trl, num_items_in_batch))
            return loss

    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=3, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = Checked(model=student, teacher_model=teacher, args=args,
                      train_dataset=_dataset(tok, 24),
                      data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False),
                      loss_options=dict(kind="jsd", beta=beta, temperature=temperature,
                                        t2_scale=False))
    result = trainer.train()
    assert len(seen) == 6 and all(n is not None for _, _, n in seen)  # 3 steps × 2 micro-batches
    for ours, trl, _ in seen:
        torch.testing.assert_close(ours, trl, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(torch.tensor(result.training_loss)) and result.training_loss > 0


def test_trainer_cached_topk_teacher(tok):
    """The cached top-k path in a running Trainer: the batches carry the teacher's top-k."""
    student, teacher = tiny_hf.pair("cohere")
    data = _dataset(tok, 16)
    for row in data:
        with torch.no_grad():
            lp = torch.log_softmax(teacher(input_ids=torch.tensor([row["input_ids"]])).logits, -1)
        values, ids = lp[0].topk(8, dim=-1)
        row.update(teacher_topk_logprobs=values, teacher_topk_ids=ids,
                   labels=torch.tensor(row["input_ids"]))
        row["input_ids"] = torch.tensor(row["input_ids"])

    def collate(rows):  # right padding of every field; labels −100 there
        def pad(key, value):
            return torch.nn.utils.rnn.pad_sequence([r[key] for r in rows], batch_first=True,
                                                   padding_value=value)
        out = {"input_ids": pad("input_ids", 0), "labels": pad("labels", -100),
               "teacher_topk_logprobs": pad("teacher_topk_logprobs", float("-inf")),
               "teacher_topk_ids": pad("teacher_topk_ids", 0)}
        out["attention_mask"] = (out["labels"] != -100).long()
        return out

    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False)
    trainer = hf.DistillationTrainer(model=student, args=args, train_dataset=data,
                                     data_collator=collate,
                                     loss_options=dict(kind="fkl", tail="bucket"))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss)) and result.training_loss > 0


def test_trainer_bad_inputs(tok):
    student, _ = tiny_hf.pair("gemma2")
    args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[],
                                          use_cpu=True)
    trainer = hf.DistillationTrainer(model=student, args=args)
    inputs, labels = tiny_hf.batch(tok)
    with pytest.raises(ValueError, match="teacher_model is None"):
        trainer.compute_loss(student, {**inputs, "labels": labels})
    with pytest.raises(ValueError, match="come together"):
        trainer.compute_loss(student, {**inputs, "labels": labels,
                                       "teacher_topk_ids": labels.clamp(min=0)[..., None]})
    with pytest.raises(TypeError, match="output embeddings"):
        hf.lm_head(student.model)


def test_readme_trainer_models_example(monkeypatch):
    """README's 'Use it with your trainer' blocks: models, transformers.Trainer, TRL."""
    pytest.importorskip("trl")
    from helpers import run_readme_examples  # noqa: PLC0415

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        run_readme_examples("trainer-models-example", 3, shared=True)
    finally:
        from kdkernels.integrations import trl as kd_trl  # noqa: PLC0415

        kd_trl.restore_trl()
