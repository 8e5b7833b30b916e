"""Public API of the MOHAWK mixing-matrix family: mixing_matrix_loss()."""
import math

import torch

from . import _backend
from . import _plumbing as P
from .reference import mixing_matrix as ref

# The largest softmax scale accepted: the teacher's scores scale·q·k are formed in fp32 by the
# kernels, so the scale must leave them far from overflow; 1/TEMPERATURE_MIN is the sharpest
# softmax any family accepts (attention uses 1/√d ≤ 1).
SCALE_MAX = 1.0 / P.TEMPERATURE_MIN


def _check(name, x, dim, what):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(x).__name__}")
    if x.dtype not in P.INPUT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or "
                        f"float64), got dtype {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {what}, got shape {tuple(x.shape)}")


def check_options(*, scale=None, squared=False, reduction="mean", backend="auto"):
    """mixing_matrix_loss's keyword options, checked (TypeError / ValueError naming the
    argument); returns them with scale as a float (or None: 1/√d)."""
    if scale is not None:
        scale = P.check_real("scale", scale, low=0.0, high=SCALE_MAX, low_open=True)
    if not isinstance(squared, bool):
        raise TypeError(f"squared must be a bool, got {type(squared).__name__}")
    P.check_choice("reduction", reduction, P.REDUCTIONS)
    P.check_choice("backend", backend, _backend.BACKENDS)
    if backend == "cuda":
        raise ValueError("mixing_matrix_loss has no CUDA C++ kernels; use backend='triton' "
                         "(GPU), 'cpu' or 'reference'")
    return dict(scale=scale, squared=squared, reduction=reduction, backend=backend)


def mixing_matrix_loss(q, k, C, B, log_decay, D=None, *, scale=None, squared=False,
                       teacher_lse=None, reduction="mean", backend="auto"):
    """MOHAWK's stage-1 loss: ‖M − A‖_F between each student SSM head's mixing matrix M and
    the teacher head's causal attention matrix A, without building either T×T matrix.

    Args:
        q, k: the teacher's queries and keys after RoPE, (batch, T, H, d), d ≥ 1; for a GQA
            teacher pass k expanded to H heads. Constants (the teacher is frozen).
        C, B: the student's SSD inputs, (batch, T, G, N), G ≥ 1, H divisible by G (group g
            serves heads g·H/G … (g+1)·H/G − 1).
        log_decay: (batch, T, H), values ≤ 0: the per-step log decay (Phi-Mamba/MOHAWK's
            discrete Mamba-2: −softplus(a); standard Mamba-2: dt·A_h, with B scaled by dt).
            Any size of step is exact, −inf included (the decay across it is 0).
        D: (H,) skip term on M's diagonal, or None.
        scale: the teacher's softmax scale, in (0, 1e6]; 1/√d by default.
        squared: ‖M − A‖²_F instead of ‖M − A‖_F.
        teacher_lse: (batch, H, T) row log-sum-exps of the teacher's scaled scores (e.g. from
            its flash-attention forward), reused instead of recomputed. A constant.
        reduction: "mean" over (batch, H) (0 when there is none), "sum", or "none" →
            (batch, H).
        backend: "auto", "reference" (materializes both matrices: the spec), "cpu" (tiled
            C++), "triton" (tiled; GPU, or CPU under TRITON_INTERPRET=1).

    Gradients flow to C, B, log_decay and D.

    NaN and inf: the unit is one (batch, head) loss. Unit (b, h) reads q[b, :, h],
    k[b, :, h], C[b, :, g] and B[b, :, g] (g = h's group), log_decay[b, :, h], D[h] and
    teacher_lse[b, h]; if any of them holds NaN or ±inf (for log_decay: NaN; +inf is > 0 and
    refused, −inf is a valid step), its loss is NaN (so is a mean or sum over it), and so is
    every gradient element it contributes to: C[b, :, g], B[b, :, g] (shared by the heads of
    group g), log_decay[b, :, h] and D[h] (shared by the batch). Every other unit and
    gradient element stays exact."""
    _check("q", q, 4, "(batch, T, H, d)")
    _check("k", k, 4, "(batch, T, H, d)")
    _check("C", C, 4, "(batch, T, G, N)")
    _check("B", B, 4, "(batch, T, G, N)")
    _check("log_decay", log_decay, 3, "(batch, T, H)")
    options = check_options(scale=scale, squared=squared, reduction=reduction, backend=backend)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)} "
                         "(expand a GQA teacher's keys to H heads)")
    if B.shape != C.shape:
        raise ValueError(f"B must have C's shape {tuple(C.shape)}, got {tuple(B.shape)}")
    batch, t, heads, dim = q.shape
    if dim < 1:
        raise ValueError(f"q and k must have a head dimension d >= 1, got shape {tuple(q.shape)}")
    if C.shape[:2] != (batch, t):
        raise ValueError(f"C must be (batch={batch}, T={t}, G, N) like q, got {tuple(C.shape)}")
    groups = C.shape[2]
    if groups < 1:
        raise ValueError(f"C and B must have G >= 1 groups, got shape {tuple(C.shape)}")
    if heads % groups:
        raise ValueError(f"the teacher's heads H={heads} must be divisible by the student's "
                         f"groups G={groups}")
    if tuple(log_decay.shape) != (batch, t, heads):
        raise ValueError(f"log_decay must be (batch, T, H) = {(batch, t, heads)}, got "
                         f"{tuple(log_decay.shape)}")
    if D is not None:
        _check("D", D, 1, f"(H,) = ({heads},)")
        if D.shape[0] != heads:
            raise ValueError(f"D must be (H,) = ({heads},), got {tuple(D.shape)}")
    if teacher_lse is not None:
        _check("teacher_lse", teacher_lse, 3, "(batch, H, T)")
        if tuple(teacher_lse.shape) != (batch, heads, t):
            raise ValueError(f"teacher_lse must be (batch, H, T) = {(batch, heads, t)}, got "
                             f"{tuple(teacher_lse.shape)}")
    tensors = [x for x in (q, k, C, B, log_decay, D, teacher_lse) if x is not None]
    if any(x.device != q.device for x in tensors):
        raise ValueError("all inputs must be on the same device")
    if not torch.compiler.is_compiling() and log_decay.numel():
        worst = log_decay.detach().max().item()
        if worst > 0:  # (NaN is not: it falls under the NaN rule)
            raise ValueError(f"log_decay must be <= 0 (a decay, log of a factor in (0, 1]); "
                             f"its max is {worst}")
    scale = 1.0 / math.sqrt(dim) if options["scale"] is None else options["scale"]
    backend = _backend.resolve_backend(options["backend"], q.device, [x.dtype for x in tensors],
                                family="mixing_matrix")
    if backend == "reference":
        per_head = ref.mixing_matrix_loss_per_head(q, k, C, B, log_decay, D, scale=scale,
                                                   squared=squared, teacher_lse=teacher_lse)
    else:
        # The NaN rule: the kernels get NaN in every log_decay entry of a bad unit, which
        # makes its whole matrix NaN, hence its loss and all its gradient contributions
        # (a sum, so log_decay's gradient passes through unchanged).
        bad = ref.bad_units(q, k, C, B, log_decay, D, teacher_lse)
        poison = torch.zeros(bad.shape, dtype=log_decay.dtype, device=q.device)
        log_decay = log_decay + poison.masked_fill(bad, float("nan"))[:, None, :]
        op = (torch.ops.kdkernels.mixing_matrix_fwd_triton if backend == "triton"
              else torch.ops.kdkernels.mixing_matrix_fwd)
        per_head, _, _ = op(q, k, C, B, log_decay, D, scale, squared, teacher_lse)
    if reduction == "mean":  # over nothing: 0 (with zero gradients), not NaN
        return per_head.sum() / max(per_head.numel(), 1)
    return per_head.sum() if reduction == "sum" else per_head
