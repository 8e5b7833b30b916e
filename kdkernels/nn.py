"""torch.nn.Module wrappers: hold the loss options, take (student_logits, teacher_logits)."""
import torch

from .divergence import divergence
from .mixing_matrix import mixing_matrix_loss
from .token_relation import token_relation_loss


class DivergenceLoss(torch.nn.Module):
    """Module form of kdkernels.divergence; keyword arguments are the same.

    forward(student_logits, teacher_logits, labels=None, mask=None, num_items=None,
    taid_t=None): taid_t given per call overrides the module's (TAID moves λ every step)."""

    def __init__(self, kind="fkl", **options):
        super().__init__()
        for per_call in ("labels", "mask", "num_items"):
            if per_call in options:
                raise TypeError(f"{per_call} is given per call, to forward(), not to the module")
        self.kind = kind
        self.options = options
        divergence(torch.zeros(1, 2), torch.zeros(1, 2), kind=kind,
                   **{**options, "backend": "reference"})  # validate the options now, not at step 1

    def forward(self, student_logits, teacher_logits, labels=None, mask=None, num_items=None,
                taid_t=None):
        options = self.options if taid_t is None else {**self.options, "taid_t": taid_t}
        return divergence(student_logits, teacher_logits, kind=self.kind, labels=labels,
                          mask=mask, num_items=num_items, **options)

    def extra_repr(self):
        return ", ".join([f"kind={self.kind!r}"] + [f"{k}={v!r}" for k, v in self.options.items()])


class KLDivLoss(DivergenceLoss):
    """Forward KL(p‖q) (p the teacher); `reverse=True` for KL(q‖p)."""

    def __init__(self, reverse=False, **options):
        super().__init__(kind="rkl" if reverse else "fkl", **options)


class JSDLoss(DivergenceLoss):
    """Generalized JSD with weight `beta` (β=0: forward KL, β=1: reverse KL)."""

    def __init__(self, beta=0.5, **options):
        super().__init__(kind="jsd", beta=beta, **options)


class TVDLoss(DivergenceLoss):
    """Total variation distance ½Σ|p−q|."""

    def __init__(self, **options):
        super().__init__(kind="tvd", **options)


class MixingMatrixLoss(torch.nn.Module):
    """Module form of kdkernels.mixing_matrix_loss (MOHAWK stage 1); keyword options
    (scale, squared, reduction, backend) are held; forward(q, k, C, B, log_decay, D=None,
    teacher_lse=None)."""

    def __init__(self, **options):
        super().__init__()
        if "teacher_lse" in options:
            raise TypeError("teacher_lse is given per call, to forward(), not to the module")
        self.options = options

    def forward(self, q, k, C, B, log_decay, D=None, teacher_lse=None):
        return mixing_matrix_loss(q, k, C, B, log_decay, D, teacher_lse=teacher_lse,
                                  **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class TokenRelationLoss(torch.nn.Module):
    """Module form of kdkernels.token_relation_loss; keyword options are held;
    forward(student_feats, teacher_feats, student_keys=None, teacher_keys=None, mask=None)."""

    def __init__(self, **options):
        super().__init__()
        for per_call in ("student_keys", "teacher_keys", "mask"):
            if per_call in options:
                raise TypeError(f"{per_call} is given per call, to forward(), not to the module")
        self.options = options

    def forward(self, student_feats, teacher_feats, student_keys=None, teacher_keys=None,
                mask=None):
        return token_relation_loss(student_feats, teacher_feats, student_keys=student_keys,
                                   teacher_keys=teacher_keys, mask=mask, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


__all__ = ["DivergenceLoss", "JSDLoss", "KLDivLoss", "MixingMatrixLoss", "TVDLoss",
           "TokenRelationLoss"]
