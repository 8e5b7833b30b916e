"""Public API of the DAC-KL family: dac_kl()."""
import numbers

import torch

from . import _plumbing as P
from .reference import dac_kl as ref


def _bounds(name, x, lead_shape, n_rows, device):
    """A bound as (N,) float64 on device (autograd reaches the caller's tensor)."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor shaped like the leading dims "
                        f"{tuple(lead_shape)}, got {type(x).__name__}")
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
        if x.dim() != 0 and tuple(x.shape) != tuple(lead_shape):
            raise ValueError(f"{name} must be a float, a 0-dim tensor or shaped like the leading "
                             f"dims {tuple(lead_shape)}, got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} must be on {device}, got {x.device}")
        return x.to(torch.float64).reshape(-1).expand(n_rows)
    return torch.full((n_rows,), float(x), dtype=torch.float64, device=device)


def dac_kl(student_logits, teacher_logits, lower, upper, *, temperature=1.0, t2_scale=True,
           labels=None, ignore_index=-100, mask=None, reduction="mean", num_items=None,
           backend="auto"):
    """DAC-KL: KL(p̃‖q) to the teacher distribution clipped to the cumulative-mass band
    [lower, upper] (see README: DAC-KL, and kdkernels/reference/dac_kl.py for the definition).

    Args:
        student_logits, teacher_logits: (..., V), same shape; float32/bfloat16/float16 (float64
            on the reference backend).
        lower, upper: the band, 0 ≤ lower < upper ≤ 1: floats, or tensors shaped like the
            leading dims (one band per row, e.g. from kdkernels.nn.DACBoundsHead); tensors
            receive their exact derivatives.
        temperature: T, divides both logits; t2_scale multiplies each row's loss by T².
        labels/ignore_index, mask, reduction, num_items: as in kdkernels.divergence.
        backend: "auto", "reference" (sorts each row: the spec), "cpu" (C++, no sort),
            "triton" (GPU, or CPU under TRITON_INTERPRET=1).

    Gradients flow to the student logits (T·(q − p̃) with T²) and to tensor bounds; the teacher
    is a constant. (lower, upper) = (0, 1) is exactly the forward KL."""
    P.check_pair(student_logits, teacher_logits)
    temperature = P.check_real("temperature", temperature, low=1e-6, high=1e6)
    if not isinstance(t2_scale, bool):
        raise TypeError(f"t2_scale must be a bool, got {type(t2_scale).__name__}")
    P.check_choice("reduction", reduction, P.REDUCTIONS)
    P.check_choice("backend", backend, P.BACKENDS)
    lead_shape = student_logits.shape[:-1]
    n_rows = student_logits.numel() // max(student_logits.shape[-1], 1)
    device = student_logits.device
    lo = _bounds("lower", lower, lead_shape, n_rows, device)
    hi = _bounds("upper", upper, lead_shape, n_rows, device)
    kept = P.kept_rows(lead_shape, device, labels=labels, ignore_index=ignore_index, mask=mask)
    if not torch.compiler.is_compiling() and n_rows:
        live = slice(None) if kept is None else kept
        lo_live, hi_live = lo.detach()[live], hi.detach()[live]
        if lo_live.numel():
            if bool((lo_live < 0).any()) or bool((hi_live > 1).any()):
                raise ValueError(f"lower and upper must lie in [0, 1]; got lower in "
                                 f"[{lo_live.min().item()}, {lo_live.max().item()}], upper in "
                                 f"[{hi_live.min().item()}, {hi_live.max().item()}]")
            if not bool((lo_live < hi_live).all()):
                worst = (hi_live - lo_live).min().item()
                raise ValueError(f"lower must be < upper on every kept row; the smallest "
                                 f"upper − lower is {worst}")
    if backend == "cuda":
        raise ValueError("dac_kl has no CUDA C++ kernels; use backend='triton' (GPU), 'cpu' "
                         "or 'reference'")
    backend = P.resolve_backend(backend, device, (student_logits.dtype, teacher_logits.dtype),
                                family="dac_kl")
    fp64 = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
    weight = P.row_weights(n_rows, kept, scale=temperature ** 2 if t2_scale else 1.0,
                           reduction=reduction, num_items=num_items, device=device,
                           dtype=torch.float64 if backend == "reference" and fp64 else torch.float32)
    if kept is not None:  # dropped rows may hold any band (and any logits): a valid stand-in
        lo = torch.where(kept, lo, 0.0)
        hi = torch.where(kept, hi, 1.0)
    if backend == "reference":
        s, t = P.live_rows(student_logits, kept), P.live_rows(teacher_logits, kept)
        loss = ref.dac_kl_rows(s, t, lo, hi, temperature=temperature) * weight
        loss = loss.sum() if reduction != "none" else loss
    else:
        grad_on = torch.is_grad_enabled()
        op = torch.ops.kdkernels.dac_kl_fwd_triton if backend == "triton" \
            else torch.ops.kdkernels.dac_kl_fwd
        loss, _, _ = op(P.as_rows(student_logits), P.as_rows(teacher_logits), lo, hi, weight,
                        temperature, reduction != "none", grad_on and student_logits.requires_grad,
                        grad_on and (lo.requires_grad or hi.requires_grad))
    return loss if reduction != "none" else loss.reshape(lead_shape)
