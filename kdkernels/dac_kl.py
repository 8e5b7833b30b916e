"""Public API of the DAC-KL family: dac_kl()."""
import numbers

import torch

from . import _backend
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


def _check_band_on_host(lower, upper, lo, hi, kept):
    """ValueError for a band outside 0 ≤ l < u ≤ 1, wherever no device sync is needed:
    Python numbers always (NaN included), tensors on their kept rows when on the CPU. A NaN in
    a tensor is not an error but the NaN rule's: its row comes out NaN (as do the rows of a
    CUDA tensor, never read back here, with a bad band: see the weights in dac_kl)."""
    numbers = {name: float(x) for name, x in (("lower", lower), ("upper", upper))
               if not isinstance(x, torch.Tensor)}
    for name, x in numbers.items():
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {x}")
    if len(numbers) == 2:
        if not numbers["lower"] < numbers["upper"]:
            raise ValueError(f"lower must be < upper, got lower = {numbers['lower']} and "
                             f"upper = {numbers['upper']}")
        return
    if lo.device.type != "cpu":
        return
    live = slice(None) if kept is None else kept
    lo, hi = lo.detach()[live], hi.detach()[live]
    if bool(((lo < 0) | (lo > 1) | (hi < 0) | (hi > 1)).any()):  # (NaN compares false)
        raise ValueError(f"lower and upper must lie in [0, 1]; got lower in "
                         f"[{lo.min().item()}, {lo.max().item()}] and upper in "
                         f"[{hi.min().item()}, {hi.max().item()}] on the kept rows")
    if bool((lo >= hi).any()):
        raise ValueError(f"lower must be < upper on every kept row; the smallest upper − lower "
                         f"is {(hi - lo).nan_to_num(float('inf')).min().item()}")


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
            receive their exact derivatives. A kept row's band outside that range is a
            ValueError where the host can see it without a device sync (Python numbers; CPU
            tensors in eager mode); elsewhere (inside torch.compile, CUDA tensors) that row's
            loss and gradients are NaN, as they are for a NaN in a tensor bound (the NaN rule
            below). Dropped rows' bands are never read.
        temperature: T in [1e-6, 100], divides both logits; t2_scale multiplies each row's loss
            by T².
        labels/ignore_index, mask, reduction, num_items: as in kdkernels.divergence.
        backend: "auto", "reference" (sorts each row: the spec), "cpu" (C++, no sort),
            "triton" (GPU, or CPU under TRITON_INTERPRET=1).

    Gradients flow to the student logits (T·(q − p̃) with T²) and to tensor bounds; the teacher
    is a constant. (lower, upper) = (0, 1) is exactly the forward KL.

    NaN rule (every backend): a kept row whose student or teacher logits hold NaN or +inf, or
    are all −inf (no softmax exists), or whose tensor bound is NaN, has a NaN loss
    (reduction="none": that row; "mean"/"sum": the total) and NaN in its whole gradient row of
    the student and in its derivatives of the tensor bounds (a 0-dim bound, shared by every
    row, then gets a NaN gradient); −inf entries alone are a masked vocabulary. Other rows
    stay exact; dropped rows give 0 and zero gradients whatever they hold."""
    P.check_pair(student_logits, teacher_logits)
    temperature = P.check_temperature("temperature", temperature)
    if not isinstance(t2_scale, bool):
        raise TypeError(f"t2_scale must be a bool, got {type(t2_scale).__name__}")
    P.check_choice("reduction", reduction, P.REDUCTIONS)
    P.check_choice("backend", backend, _backend.BACKENDS)
    lead_shape = student_logits.shape[:-1]
    n_rows = student_logits.numel() // max(student_logits.shape[-1], 1)
    device = student_logits.device
    lo = _bounds("lower", lower, lead_shape, n_rows, device)
    hi = _bounds("upper", upper, lead_shape, n_rows, device)
    kept = P.kept_rows(lead_shape, device, labels=labels, ignore_index=ignore_index, mask=mask)
    if not torch.compiler.is_compiling():
        _check_band_on_host(lower, upper, lo, hi, kept)
    if backend == "cuda":
        raise ValueError("dac_kl has no CUDA C++ kernels; use backend='triton' (GPU), 'cpu' "
                         "or 'reference'")
    backend = _backend.resolve_backend(backend, device, (student_logits.dtype, teacher_logits.dtype),
                                family="dac_kl")
    fp64 = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
    weight = P.row_weights(n_rows, kept, scale=temperature ** 2 if t2_scale else 1.0,
                           reduction=reduction, num_items=num_items, device=device,
                           dtype=torch.float64 if backend == "reference" and fp64 else torch.float32)
    if kept is not None:  # dropped rows may hold any band (and any logits): a valid stand-in
        lo = torch.where(kept, lo, 0.0)
        hi = torch.where(kept, hi, 1.0)
    # A band the host could not check (inside a compiled graph, or on a GPU) that is outside
    # 0 ≤ l < u ≤ 1 (NaN included) makes its row's weight NaN, hence its loss and gradients.
    weight = P.nan_unless((lo >= 0) & (lo < hi) & (hi <= 1), weight)
    if backend == "reference":
        s, t = P.live_rows(student_logits, kept), P.live_rows(teacher_logits, kept)
        # a NaN weight (a band or num_items that could not be checked) is a NaN row, gradients
        # included (the product alone would pass a zero gradient where p̃ is 0)
        loss = P.nan_rows(ref.dac_kl_rows(s, t, lo, hi, temperature=temperature) * weight,
                          torch.isnan(weight), s, lo, hi)
        loss = loss.sum() if reduction != "none" else loss
    else:
        grad_on = torch.is_grad_enabled()
        op = torch.ops.kdkernels.dac_kl_fwd_triton if backend == "triton" \
            else torch.ops.kdkernels.dac_kl_fwd
        loss, _, _ = op(P.as_rows(student_logits), P.as_rows(teacher_logits), lo, hi, weight,
                        temperature, reduction != "none", grad_on and student_logits.requires_grad,
                        grad_on and (lo.requires_grad or hi.requires_grad))
    return loss if reduction != "none" else loss.reshape(lead_shape)
