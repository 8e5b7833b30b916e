"""kdkernels.nn: every module checks its options when it is built, not at the first step."""
import pytest
import torch

from kdkernels import nn

BAD = [
    (lambda: nn.KLDivLoss(backend="bogus"), ValueError, "backend"),
    (lambda: nn.JSDLoss(beta=2.0), ValueError, "beta"),
    (lambda: nn.TVDLoss(temperature=0), ValueError, "temperature"),
    (lambda: nn.DivergenceLoss("kl"), ValueError, "kind"),
    (lambda: nn.KLDivLoss(bogus=1), TypeError, "bogus"),
    (lambda: nn.KLDivLoss(labels=torch.zeros(1)), TypeError, "per call"),
    (lambda: nn.MixingMatrixLoss(reduction="bad"), ValueError, "reduction"),
    (lambda: nn.MixingMatrixLoss(backend="bogus"), ValueError, "backend"),
    (lambda: nn.MixingMatrixLoss(scale=-1.0), ValueError, "scale"),
    (lambda: nn.MixingMatrixLoss(squared=1), TypeError, "squared"),
    (lambda: nn.TokenRelationLoss(temperature=-1), ValueError, "temperature"),
    (lambda: nn.TokenRelationLoss(similarity="l2"), ValueError, "similarity"),
    (lambda: nn.TokenRelationLoss(reduction="batchmean"), ValueError, "reduction"),
    (lambda: nn.TokenRelationLoss(backend="gpu"), ValueError, "backend"),
    (lambda: nn.DACKLLoss(temperature=0), ValueError, "temperature"),
    (lambda: nn.DACKLLoss(backend="bogus"), ValueError, "backend"),
    (lambda: nn.DACKLLoss(t2_scale=1), TypeError, "t2_scale"),
    (lambda: nn.DACBoundsHead(temperature=0), ValueError, "temperature"),
    (lambda: nn.DACBoundsHead(k=0), ValueError, "k"),
    (lambda: nn.DACKLLoss(backend="cuda"), ValueError, "no CUDA"),
    (lambda: nn.TokenRelationLoss(backend="cuda"), ValueError, "no CUDA"),
    (lambda: nn.MixingMatrixLoss(backend="cuda"), ValueError, "no CUDA"),
    (lambda: nn.TokenRelationLoss(temperature=20.0), ValueError, "temperature"),
]


@pytest.mark.parametrize("build,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_options_raise_at_construction(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_good_options_construct_and_run():
    s, t = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    for module in (nn.KLDivLoss(temperature=2.0, backend="cpu"), nn.JSDLoss(beta=0.3),
                   nn.TVDLoss(reduction="sum"), nn.DACKLLoss(temperature=2.0, k=4)):
        module(s, t).backward()
    assert s.grad is not None
    nn.TokenRelationLoss(temperature=2.0, similarity="cosine")(torch.randn(2, 5, 4),
                                                                torch.randn(2, 5, 6))
    nn.MixingMatrixLoss(squared=True, reduction="none")


def test_dac_kl_loss_with_a_nan_teacher_row():
    """A NaN teacher row is a row without a distribution: DACKLLoss gives NaN for that row (the
    NaN rule), not an error blaming the bounds, and the head's bounds stay finite for the
    other rows; a dropped all −inf (padding) row changes nothing, gradients included."""
    torch.manual_seed(0)
    s, t = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16)
    t[1, 3] = float("nan")
    t[3] = float("-inf")
    mask = torch.tensor([True, True, True, False])
    loss_fn = nn.DACKLLoss(k=4, reduction="none", backend="cpu")
    rows = loss_fn(s, t, mask=mask)
    assert rows[1].isnan() and torch.isfinite(rows[[0, 2, 3]]).all() and rows[3] == 0
    lower, upper = loss_fn.last_bounds
    assert torch.isfinite(lower[[0, 2, 3]]).all() and torch.isfinite(upper[[0, 2, 3]]).all()
    t[1, 3] = 0.0  # without the NaN: a dropped padding row leaves the head's gradients finite
    loss_fn(s, t, mask=mask).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in loss_fn.head.parameters())
