"""kdkernels.token_relation_loss (issue 5, first increment): the reference (the spec) against a
row-by-row evaluation of the definitions, gradients, padding, keys, heads, bad input. The
tiled cpu / triton kernels come next and will be tested against this reference."""
import math

import pytest
import torch

import kdkernels
from kdkernels.reference.token_relation import token_relation_loss_rows


def feats(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def direct_rows(s, t, sk, tk, temp, t_temp, similarity, loss, causal, mask):
    """Per-row losses for (batch, T, d) inputs, one row at a time from the definitions."""
    batch, n = s.shape[0], s.shape[1]
    out = torch.zeros(batch, n, dtype=torch.float64)
    for b in range(batch):
        for i in range(n):
            if mask is not None and not mask[b, i]:
                continue
            js = [j for j in range(n) if (not causal or j <= i) and (mask is None or mask[b, j])]

            def logits(f, k, tau):
                x = f if k is None else k
                if similarity == "cosine":
                    return torch.stack([torch.dot(f[b, i], x[b, j]) / (f[b, i].norm() * x[b, j].norm())
                                        for j in js]) / tau
                return torch.stack([torch.dot(f[b, i], x[b, j]) for j in js]) / (math.sqrt(f.shape[-1]) * tau)

            q = torch.softmax(logits(s, sk, temp), 0)
            p = torch.softmax(logits(t, tk, t_temp), 0)
            out[b, i] = (p * (p.log() - q.log())).sum() if loss == "kl" else ((p - q) ** 2).sum()
    return out


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("keys", [False, True])
def test_reference_matches_definition(similarity, loss, causal, keys):
    s, t = feats(2, 7, 5, seed=1), feats(2, 7, 9, seed=2)  # d_s != d_t
    sk = feats(2, 7, 5, seed=3) if keys else None
    tk = feats(2, 7, 9, seed=4) if keys else None
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    got = token_relation_loss_rows(s, t, student_keys=sk, teacher_keys=tk, temperature=2.0,
                                   teacher_temperature=0.5, similarity=similarity, loss=loss,
                                   causal=causal, mask=mask)
    want = direct_rows(s, t, sk, tk, 2.0, 0.5, similarity, loss, causal, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_heads_and_reductions():
    s, t = feats(2, 4, 6, 8, seed=5), feats(2, 4, 6, 16, seed=6)  # R = 4 relation heads
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    rows = kdkernels.token_relation_loss(s, t, mask=mask, reduction="none")
    assert rows.shape == (2, 4, 6) and (rows[1, :, 4:] == 0).all()
    for r in range(4):
        torch.testing.assert_close(rows[:, r], token_relation_loss_rows(s[:, r], t[:, r], mask=mask))
    torch.testing.assert_close(kdkernels.token_relation_loss(s, t, mask=mask, reduction="sum"), rows.sum())
    torch.testing.assert_close(kdkernels.token_relation_loss(s, t, mask=mask), rows.sum() / (4 * 10))


def test_gradients_flow_to_student_only_and_gradcheck():
    s = feats(1, 5, 4, seed=7).requires_grad_()
    sk = feats(1, 5, 4, seed=8).requires_grad_()
    t = feats(1, 5, 6, seed=9).requires_grad_()
    tk = feats(1, 5, 6, seed=10).requires_grad_()
    for similarity in ("dot", "cosine"):
        for loss in ("kl", "mse"):
            def fn(a, b):
                return token_relation_loss_rows(a, t, student_keys=b, teacher_keys=tk,
                                                similarity=similarity, loss=loss, causal=True)
            assert torch.autograd.gradcheck(fn, (s, sk))
    kdkernels.token_relation_loss(s, t, student_keys=sk, teacher_keys=tk).backward()
    assert t.grad is None and tk.grad is None and s.grad is not None and sk.grad is not None


def test_fully_padded_sequences_give_zero_not_nan():
    s = feats(2, 5, 4, seed=11).float().requires_grad_()
    t = feats(2, 5, 4, seed=12).float()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for loss in ("kl", "mse"):
        value = kdkernels.token_relation_loss(s, t, mask=mask, loss=loss)
        value.backward()
        assert value.item() == 0 and torch.isfinite(s.grad).all() and (s.grad == 0).all()
        s.grad = None


def test_bf16_inputs_and_module():
    s, t = feats(2, 9, 8, seed=13), feats(2, 9, 12, seed=14)
    want = kdkernels.token_relation_loss(s, t, similarity="cosine")
    got = kdkernels.token_relation_loss(s.bfloat16(), t.bfloat16(), similarity="cosine")
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) < 2e-2 * want.item()
    m = kdkernels.nn.TokenRelationLoss(loss="mse", causal=True)
    assert m(s, t) == kdkernels.token_relation_loss(s, t, loss="mse", causal=True)
    assert "causal=True" in repr(m)


def test_bad_inputs():
    s, t = feats(2, 5, 4), feats(2, 5, 6)

    def bad(exc, match, **kw):
        args = dict(student_feats=s, teacher_feats=t)
        args.update({k: kw.pop(k) for k in list(kw) if k in args})
        with pytest.raises(exc, match=match):
            kdkernels.token_relation_loss(args["student_feats"], args["teacher_feats"], **kw)

    bad(ValueError, "must agree on batch", teacher_feats=feats(2, 6, 6))
    bad(ValueError, "must agree on batch", teacher_feats=feats(3, 5, 6))
    bad(ValueError, r"\(batch, T, d\)", student_feats=feats(5, 4))
    bad(TypeError, "floating", student_feats=torch.ones(2, 5, 4, dtype=torch.long))
    bad(ValueError, "both student_keys and teacher_keys", student_keys=s)
    bad(ValueError, "student_keys must have the shape", student_keys=feats(2, 5, 3), teacher_keys=t)
    bad(ValueError, "temperature", temperature=0.0)
    bad(ValueError, "teacher_temperature", teacher_temperature=-1.0)
    bad(ValueError, "similarity", similarity="l2")
    bad(ValueError, "loss", loss="js")
    bad(ValueError, r"mask must be \(batch, T\)", mask=torch.ones(2, 4, dtype=torch.bool))
    bad(TypeError, "mask must be a bool", mask=torch.ones(2, 5))
    bad(ValueError, "reduction", reduction="batchmean")
