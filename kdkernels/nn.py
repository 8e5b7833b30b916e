"""torch.nn.Module wrappers: hold the loss options, take the tensors per call."""
import torch

from . import _backend
from . import _plumbing as P
from .dac_kl import dac_kl
from .divergence import divergence
from .fused_linear import fused_linear_divergence
from .mixing_matrix import check_options as check_mixing_matrix_options
from .mixing_matrix import mixing_matrix_loss
from .sparse import fused_linear_sparse_divergence, sparse_divergence
from .token_relation import token_relation_loss


def _validate_now(fn, *example, has_cuda=True, **options):
    """Modules check their options at construction, not at the first step: one call of the
    loss on a tiny example on the reference backend (unknown or bad options raise there), and
    the backend choice itself (has_cuda: whether the family has CUDA C++ kernels)."""
    backend = P.check_choice("backend", options.get("backend", "auto"), _backend.BACKENDS)
    if backend == "cuda" and not has_cuda:
        raise ValueError(f"{fn.__name__} has no CUDA C++ kernels; use backend='triton' (GPU), "
                         f"'cpu' or 'reference'")
    fn(*example, **{**options, "backend": "reference"})


def _fused_options(fn, per_call, options, example):
    """The options of a fused-linear module, checked now: none of the per-call arguments, and
    one call of fn on a tiny example (weights of 3 rows: vocab_size is checked against the real
    weights per call, here only for being an int >= 1)."""
    for name in per_call:
        if name in options:
            raise TypeError(f"{name} is given per call, to forward(), not to the module")
    labels = torch.zeros(1, dtype=torch.long) if options.get("hard_label_weight") else None
    vocab = options.get("vocab_size")
    if vocab is not None and P.check_int("vocab_size", vocab) < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab}")
    _validate_now(fn, *example, labels=labels, **{**options, "vocab_size": None})
    return options


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
        _validate_now(divergence, torch.zeros(1, 2), torch.zeros(1, 2), kind=kind, **options)

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


class FusedLinearDivergenceLoss(torch.nn.Module):
    """Module form of kdkernels.fused_linear_divergence; keyword options are the same.

    forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
    mask=None, num_items=None, student_bias=None, teacher_bias=None, taid_t=None): the weights
    are given per call (the models own them: lm_head.weight, tied embeddings)."""

    PER_CALL = ("labels", "mask", "num_items", "student_bias", "teacher_bias")

    def __init__(self, **options):
        super().__init__()
        self.options = _fused_options(
            fused_linear_divergence, self.PER_CALL, options,
            (torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, 2), torch.zeros(3, 2)))

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight,
                labels=None, mask=None, num_items=None, student_bias=None, teacher_bias=None,
                taid_t=None):
        options = self.options if taid_t is None else {**self.options, "taid_t": taid_t}
        return fused_linear_divergence(student_hidden, student_weight, teacher_hidden,
                                       teacher_weight, labels=labels, mask=mask,
                                       num_items=num_items, student_bias=student_bias,
                                       teacher_bias=teacher_bias, **options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class SparseDivergenceLoss(torch.nn.Module):
    """Module form of kdkernels.sparse_divergence (a top-k teacher); keyword options are the
    same. forward(student_logits, teacher_logprobs, teacher_indices, labels=None, mask=None,
    num_items=None)."""

    def __init__(self, kind="fkl", **options):
        super().__init__()
        for per_call in ("labels", "mask", "num_items"):
            if per_call in options:
                raise TypeError(f"{per_call} is given per call, to forward(), not to the module")
        self.kind, self.options = kind, options
        _validate_now(sparse_divergence, torch.zeros(1, 2), torch.zeros(1, 1),
                      torch.zeros(1, 1, dtype=torch.long), kind=kind, **options)

    def forward(self, student_logits, teacher_logprobs, teacher_indices, labels=None, mask=None,
                num_items=None):
        return sparse_divergence(student_logits, teacher_logprobs, teacher_indices,
                                 kind=self.kind, labels=labels, mask=mask, num_items=num_items,
                                 **self.options)

    def extra_repr(self):
        return ", ".join([f"kind={self.kind!r}"] + [f"{k}={v!r}" for k, v in self.options.items()])


class FusedLinearSparseDivergenceLoss(torch.nn.Module):
    """Module form of kdkernels.fused_linear_sparse_divergence; keyword options are the same.
    forward(student_hidden, student_weight, teacher_logprobs, teacher_indices, labels=None,
    mask=None, num_items=None, student_bias=None)."""

    PER_CALL = ("labels", "mask", "num_items", "student_bias")

    def __init__(self, **options):
        super().__init__()
        self.options = _fused_options(
            fused_linear_sparse_divergence, self.PER_CALL, options,
            (torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, 1),
             torch.zeros(1, 1, dtype=torch.long)))

    def forward(self, student_hidden, student_weight, teacher_logprobs, teacher_indices,
                labels=None, mask=None, num_items=None, student_bias=None):
        return fused_linear_sparse_divergence(
            student_hidden, student_weight, teacher_logprobs, teacher_indices, labels=labels,
            mask=mask, num_items=num_items, student_bias=student_bias, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class MixingMatrixLoss(torch.nn.Module):
    """Module form of kdkernels.mixing_matrix_loss (MOHAWK stage 1); keyword options
    (scale, squared, reduction, backend) are held; forward(q, k, C, B, log_decay, D=None,
    teacher_lse=None)."""

    def __init__(self, **options):
        super().__init__()
        if "teacher_lse" in options:
            raise TypeError("teacher_lse is given per call, to forward(), not to the module")
        check_mixing_matrix_options(**options)
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
        _validate_now(token_relation_loss, torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), has_cuda=False,
                      **options)
        self.options = options

    def forward(self, student_feats, teacher_feats, student_keys=None, teacher_keys=None,
                mask=None):
        return token_relation_loss(student_feats, teacher_feats, student_keys=student_keys,
                                   teacher_keys=teacher_keys, mask=mask, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class DACBoundsHead(torch.nn.Module):
    """DAC-KL's bounds sub-network: a small MLP over each teacher row's top-k probabilities
    (sorted, from softmax(teacher/T)) and its entropy, returning per-row bounds (lower, upper)
    with 0 ≤ lower < upper ≤ 1 by construction:
        upper = ε + (1 − ε)·σ(b),   lower = upper·(1 − ε)·σ(a),   ε = min_width
    so upper − lower ≥ ε² > 0 always. Initialized near (0, 1), i.e. near plain forward KL.
    forward(teacher_logits) → (lower, upper), each shaped like the leading dims; the inputs
    are computed without gradient (the teacher is a constant), the MLP trains through the
    bounds' exact derivatives in kdkernels.dac_kl."""

    def __init__(self, k=16, width=64, temperature=1.0, min_width=0.05):
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        if not 0 < min_width < 1:
            raise ValueError(f"min_width must be in (0, 1), got {min_width!r}")
        temperature = P.check_temperature("temperature", temperature)
        self.k, self.temperature, self.min_width = k, temperature, float(min_width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(k + 1, width), torch.nn.GELU(),
                                       torch.nn.Linear(width, 2))
        with torch.no_grad():  # start at lower ≈ 0.02, upper ≈ 0.98
            self.mlp[-1].weight.mul_(0.1)
            self.mlp[-1].bias.copy_(torch.tensor([-4.0, 4.0]))

    def features(self, teacher_logits):
        with torch.no_grad():
            t = teacher_logits.float()
            m = t.amax(-1, keepdim=True)
            # A row without a distribution (all −inf padding, NaN, +inf) gets a uniform row's
            # features, so the head's bounds and gradients stay finite: dac_kl never reads a
            # dropped row and makes a kept one NaN by its own rule. The maximum is subtracted
            # before dividing by T.
            logp = torch.log_softmax(torch.where(torch.isfinite(m), t - m, 0.0) / self.temperature,
                                     dim=-1)
            k = min(self.k, logp.shape[-1])
            top = logp.topk(k, dim=-1).values.exp()
            if k < self.k:
                top = torch.nn.functional.pad(top, (0, self.k - k))
            entropy = -(logp.exp() * logp.clamp_min(-1e30)).sum(-1, keepdim=True)
            return torch.cat([top, entropy], dim=-1)

    def forward(self, teacher_logits):
        a, b = self.mlp(self.features(teacher_logits).to(self.mlp[0].weight.dtype)).unbind(-1)
        eps = self.min_width
        upper = eps + (1 - eps) * torch.sigmoid(b)
        lower = upper * (1 - eps) * torch.sigmoid(a)
        return lower, upper

    def extra_repr(self):
        return f"k={self.k}, temperature={self.temperature}, min_width={self.min_width}"


class DACKLLoss(torch.nn.Module):
    """DAC-KL with learnable bounds: a DACBoundsHead (given, or built from k/width) predicts
    each row's band from the teacher logits, and kdkernels.dac_kl computes the loss; the head
    trains jointly with the student. Options (temperature, t2_scale, reduction, backend) are
    held; forward(student_logits, teacher_logits, labels=None, mask=None, num_items=None).
    The last bounds are kept in .last_bounds (detached) for logging."""

    def __init__(self, head=None, k=16, width=64, **options):
        super().__init__()
        for per_call in ("labels", "mask", "num_items", "lower", "upper"):
            if per_call in options:
                raise TypeError(f"{per_call} is given per call (or by the head), not to the module")
        _validate_now(dac_kl, torch.zeros(1, 2), torch.zeros(1, 2), 0.0, 1.0, has_cuda=False,
                      **options)
        self.head = head if head is not None else DACBoundsHead(
            k=k, width=width, temperature=options.get("temperature", 1.0))
        self.options = options
        self.last_bounds = None

    def forward(self, student_logits, teacher_logits, labels=None, mask=None, num_items=None):
        lower, upper = self.head(teacher_logits)
        self.last_bounds = (lower.detach(), upper.detach())
        return dac_kl(student_logits, teacher_logits, lower, upper, labels=labels, mask=mask,
                      num_items=num_items, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


__all__ = ["DACBoundsHead", "DACKLLoss", "DivergenceLoss", "JSDLoss", "KLDivLoss", "MixingMatrixLoss", "TVDLoss",
           "TokenRelationLoss"]
