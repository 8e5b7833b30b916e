"""kdkernels.integrations.trl against TRL 1.16 itself: its _chunked_divergence_loss
(DistillationTrainer), GKDTrainer.generalized_jsd_loss (every reduction) and
ServerDistillationTrainer's top-k forward KL, on the same inputs: values, the entropy and
count, and gradients. Where TRL clamps (a top-k mass within 1e-7 of 1), the float64
reference is the arbiter (test_sparse_peers.py has that case too)."""
import os
import types

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.gkd.gkd_trainer import GKDTrainer  # noqa: E402
from trl.experimental.server_distillation import server_distillation_trainer as sdt  # noqa: E402
from trl.trainer import distillation_trainer  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels.integrations import trl as drop_in  # noqa: E402

B, S, H_S, H_T, V = 2, 7, 24, 20, 97


def _close(ours, theirs, what, rtol=2e-5, atol=2e-7):
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def _chunked_inputs(seed, bias):
    g = torch.Generator().manual_seed(seed)
    t = dict(hs=torch.randn(B, S, H_S, generator=g), ws=torch.randn(V, H_S, generator=g) * 0.4,
             ht=torch.randn(B, S, H_T, generator=g), wt=torch.randn(V, H_T, generator=g) * 0.4)
    if bias:
        t["bs"], t["bt"] = torch.randn(V, generator=g), torch.randn(V, generator=g)
    mask = torch.rand(B, S, generator=g) > 0.3
    mask[0, 0] = False
    return t, mask.long()


def _run_chunked(fn, t, mask, **kw):
    leaves = {k: v.clone().requires_grad_(k in ("hs", "ws", "bs")) for k, v in t.items()}
    loss, entropy, n_valid = fn(leaves["hs"], leaves["ht"], leaves["ws"], leaves["wt"], mask,
                                student_lm_head_bias=leaves.get("bs"),
                                teacher_lm_head_bias=leaves.get("bt"), **kw)
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
    return loss.detach(), entropy.detach(), n_valid, grads


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature,scale,softcap,bias,num_items", [
    (1.0, 1.0, None, False, None), (2.0, 1.0, None, True, 11), (0.7, 0.5, 4.0, True, None),
    (1.5, 1.3, 6.0, False, torch.tensor(9))], ids=["plain", "bias-num_items", "scale-softcap",
                                                   "both-tensor_num_items"])
def test_chunked_divergence_loss_equals_trl(beta, temperature, scale, softcap, bias, num_items):
    t, mask = _chunked_inputs(int(beta * 10) + int(temperature * 10), bias)
    kw = dict(beta=beta, temperature=temperature, num_items_in_batch=num_items,
              student_logit_scale=scale, teacher_logit_scale=1.0 / scale,
              student_final_logit_softcapping=softcap, teacher_final_logit_softcapping=softcap)
    ours = _run_chunked(drop_in.chunked_divergence_loss, t, mask, **kw)
    theirs = _run_chunked(distillation_trainer._chunked_divergence_loss, t, mask, **kw)
    _close(ours[0], theirs[0], "loss")
    _close(ours[1], theirs[1], "entropy_sum")
    assert int(ours[2]) == int(theirs[2]) and ours[2].dtype == theirs[2].dtype
    assert ours[3].keys() == theirs[3].keys()
    for name in ours[3]:
        _close(ours[3][name], theirs[3][name], f"grad {name}", atol=1e-6)


def _gkd_inputs(seed, with_labels):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, S, V, generator=g) * 2
    t = torch.randn(B, S, V, generator=g) * 2
    labels = None
    if with_labels:
        labels = torch.randint(0, V, (B, S), generator=g)
        labels[0, :3] = -100
    return s, t, labels


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("reduction,num_items", [("batchmean", None), ("sum", None),
                                                 ("mean", None), ("none", None),
                                                 ("batchmean", 17), ("none", 17)])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no-labels"])
def test_generalized_jsd_loss_equals_trl(beta, reduction, num_items, with_labels):
    s, t, labels = _gkd_inputs(3, with_labels)
    out = []
    for fn in (drop_in.generalized_jsd_loss, GKDTrainer.generalized_jsd_loss):
        s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
        loss = fn(s1, t1, labels=labels, beta=beta, temperature=1.7, reduction=reduction,
                  num_items_in_batch=num_items)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward()
        out.append((loss.detach(), s1.grad, t1.grad))
    for a, b, what in zip(out[0], out[1], ("loss", "grad student", "grad teacher")):
        _close(a, b, what, atol=1e-6)


def _server_inputs(seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2
    lp, idx = torch.topk(torch.log_softmax(torch.randn(B, S, V, generator=g,
                                                       dtype=torch.float64) * 2, -1), 5)
    lp[1, 2, 3:] = float("-inf")  # padding
    z.scatter_add_(-1, idx, torch.full(idx.shape, offset, dtype=torch.float64))
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[1, :2] = -100
    return z, {"topk_logprobs": lp, "topk_token_ids": idx}, labels


def _trl_server(result, log_probs, labels):
    stand_in = types.SimpleNamespace(
        loss_add_tail=True,
        _reduce_divergence_loss=sdt.ServerDistillationTrainer._reduce_divergence_loss)
    return sdt.ServerDistillationTrainer._compute_server_forward_kl_loss(stand_in, result,
                                                                         log_probs, labels)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_server_forward_kl_loss_equals_trl(temperature):
    z, result, labels = _server_inputs(5)
    z = z.float()
    result = {k: v.float() if v.is_floating_point() else v for k, v in result.items()}
    out = []
    for fn in (drop_in.server_forward_kl_loss, _trl_server):
        z1 = z.clone().requires_grad_()
        loss = fn(result, torch.log_softmax(z1 / temperature, -1), labels)
        loss.backward()
        out.append((loss.detach(), z1.grad))
    _close(out[0][0], out[1][0], "loss")
    _close(out[0][1], out[1][1], "grad", atol=1e-7)


def test_server_forward_kl_loss_exact_where_trl_clamps():
    """The student's top-5 mass within ~1e-11 of 1: TRL's clamp moves its loss by ~1; ours
    (fp32) matches the float64 reference (sparse_divergence on the exact log-probs)."""
    z, result, labels = _server_inputs(6, offset=30.0)
    exact = kdkernels.sparse_divergence(z, result["topk_logprobs"], result["topk_token_ids"],
                                        tail="bucket", t2_scale=False, labels=labels,
                                        backend="reference")
    f32 = {k: v.float() if v.is_floating_point() else v for k, v in result.items()}
    ours = drop_in.server_forward_kl_loss(f32, torch.log_softmax(z.float(), -1), labels)
    theirs = _trl_server(f32, torch.log_softmax(z.float(), -1), labels)
    assert abs(float(ours) - float(exact)) <= 1e-5 * float(exact)
    assert abs(float(theirs) - float(exact)) > 0.1


def test_use_kdkernels_switches():
    gkd = object.__new__(GKDTrainer)
    assert drop_in.use_kdkernels(gkd).generalized_jsd_loss is drop_in.generalized_jsd_loss
    server = object.__new__(sdt.ServerDistillationTrainer)
    server.loss_add_tail = True
    original = distillation_trainer._chunked_divergence_loss
    try:
        drop_in.use_kdkernels(server)
        assert distillation_trainer._chunked_divergence_loss is drop_in.chunked_divergence_loss
        z, result, labels = _server_inputs(7)
        lp = torch.log_softmax(z.float(), -1)
        f32 = {k: v.float() if v.is_floating_point() else v for k, v in result.items()}
        assert float(server._compute_server_forward_kl_loss(f32, lp, labels)) == \
            float(drop_in.server_forward_kl_loss(f32, lp, labels))
    finally:
        drop_in.restore_trl()
    assert distillation_trainer._chunked_divergence_loss is original
    with pytest.raises(TypeError, match="use_kdkernels takes"):
        drop_in.use_kdkernels(object())


def test_readme_trainer_example():
    from helpers import run_readme_examples  # noqa: PLC0415

    pytest.importorskip("liger_kernel")
    run_readme_examples("trainer-example", 1)
