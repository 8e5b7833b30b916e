"""Shared plumbing for every op family: argument checks, row masks and reductions and dtype
rules. Written once; each op family calls into it. (Backend choice: _backend.py.)"""
import numbers

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INPUT_DTYPES = KERNEL_DTYPES + (torch.float64,)
REDUCTIONS = ("mean", "sum", "none")
# The temperatures every family accepts. As T grows, p and q approach uniform and a divergence
# (∝ 1/T² before the T² factor) is the small sum of terms ~1/T: the divergence kernels sum terms
# that are all ≥ 0 (kdkernels/reference/divergence.py kl_term), which keeps fp32 losses within
# 2e-6 of float64 at T = 100 where the plain Σ p·log(p/q) errs 5e-3 (unit-normal logits, worst
# of 64 rows; 3e-2 at T = 1000). At tiny T nothing is lost: every backend subtracts the row maximum in input
# units before dividing by T.
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-6, 100.0


def check_temperature(name, value, high=TEMPERATURE_MAX):
    """A temperature within [TEMPERATURE_MIN, high], as a Python float (high: a family whose
    losses are not cancellation-free up to TEMPERATURE_MAX accepts less)."""
    return check_real(name, value, low=TEMPERATURE_MIN, high=high)


def grad_dtype(input_dtype, per_row_scaling=False):
    """dtype in which the kernels write a gradient: the input's, but fp32 for fp16 inputs
    (backward scales it, then rounds once to fp16, as eager autograd does: rounded at the
    loss' own scale, small gradients would underflow before a GradScaler's factor), and fp32
    for bf16 inputs when backward will scale each row by its own factor (reduction="none"),
    so that they too are rounded once. Same rule in csrc/cpu/divergence.h and
    csrc/cpu/dac_kl.cpp. (The divergence family does not pass per_row_scaling yet: its CUDA
    kernels fix the gradient type at compile time; see README.)"""
    if input_dtype == torch.float16 or (per_row_scaling and input_dtype == torch.bfloat16):
        return torch.float32
    return input_dtype


# ----------------------------------------------------------------------------- checks
def check_logits(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), "
            f"got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(x.shape)}")


def check_pair(student, teacher, student_name="student_logits", teacher_name="teacher_logits"):
    check_logits(student_name, student)
    check_logits(teacher_name, teacher)
    if student.shape != teacher.shape:
        hint = ""
        if student.shape[:-1] == teacher.shape[:-1]:
            hint = (f"; if the teacher's vocabulary is padded, pass "
                    f"{teacher_name}[..., :{student.shape[-1]}] (a view, no copy)")
        raise ValueError(f"{student_name} and {teacher_name} must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}{hint}")
    if student.device != teacher.device:
        raise ValueError(f"{student_name} and {teacher_name} must be on the same device, got "
                         f"{student.device} and {teacher.device}")


def check_real(name, value, *, low=None, high=None, low_open=False, high_open=False):
    """A real number within [low, high] (open ends when asked), returned as a Python float:
    a Python or numpy int/float, or a 0-dim real tensor (read once; it is a constant of the
    loss, so one that requires grad is refused rather than silently detached)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool \
            and not value.is_complex():
        if value.requires_grad:
            raise TypeError(f"{name} is a constant of the loss: got a tensor that requires grad "
                            f"(its gradient would be silently dropped); pass {name}.detach() or "
                            f"a float")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    bad = value != value
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad or value in (float("inf"), float("-inf")):
        lo = "(" if low_open else "["
        hi = ")" if high_open or high is None else "]"
        rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"{name} must be a finite number in {rng}, got {value}")
    return value


def check_int(name, value):
    """An integer (Python, numpy or a 0-dim integer tensor; not a bool), as a Python int."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and _is_integer_dtype(value.dtype):
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_linear(side, hidden, weight, bias):
    """A model's last hidden states (..., H), lm_head weight (V, H) and bias (V,) or None, for
    the fused-linear ops (side: 'student' / 'teacher', or '' for a single model)."""
    pre = f"{side}_" if side else ""
    name = f"{pre}hidden"
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or "
                        f"float64), got dtype {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., H) with H >= 1, got {tuple(hidden.shape)}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{pre}weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"{pre}weight must be (V, H) (an lm_head), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{pre}weight (V, H) must have H = {pre}hidden's last dim "
                         f"{hidden.shape[-1]}, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{pre}weight must have {pre}hidden's dtype {hidden.dtype}, got "
                        f"{weight.dtype} (under mixed precision, pass the lm_head weight in the "
                        f"hidden states' dtype, e.g. weight.to(hidden.dtype))")
    if weight.device != hidden.device:
        raise ValueError(f"{pre}weight must be on {hidden.device}, got {weight.device}")
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        raise ValueError(f"{pre}weight must have unit stride along H (a (V, H) weight or its "
                         f"row slice), got strides {weight.stride()}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{pre}bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{pre}bias must have shape ({weight.shape[0]},) (one per row of "
                         f"{pre}weight), got {tuple(bias.shape)}")
    if bias.dtype != hidden.dtype or bias.device != hidden.device:
        raise TypeError(f"{pre}bias must be {hidden.dtype} on {hidden.device}, got "
                        f"{bias.dtype} on {bias.device}")


def check_softcap(name, cap):
    """A logit softcap (> 0) or None."""
    if cap is None:
        return None
    return check_real(name, cap, low=0.0, low_open=True)



# ----------------------------------------------------------------------- rows and weights
def _check_row_tensor(name, x, lead_shape, device, is_right_dtype, expected):
    """labels / mask: a tensor of the right dtype, shaped like the logits' leading dims."""
    if not isinstance(x, torch.Tensor) or not is_right_dtype(x.dtype):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be {expected} shaped like the logits' leading dims "
                        f"{tuple(lead_shape)}, got {got}")
    if tuple(x.shape) != tuple(lead_shape):
        raise ValueError(f"{name} must have shape {tuple(lead_shape)} (the logits' leading "
                         f"dims), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")


def _is_integer_dtype(dtype):
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def kept_rows(lead_shape, device, *, labels=None, ignore_index=-100, mask=None):
    """Boolean (N,) tensor of the rows that count, or None when every row counts."""
    if labels is not None and mask is not None:
        raise ValueError("give labels (with ignore_index) or mask, not both")
    if labels is not None:
        _check_row_tensor("labels", labels, lead_shape, device, _is_integer_dtype,
                          "an integer tensor")
        ignore_index = check_int("ignore_index", ignore_index)
        return (labels != ignore_index).reshape(-1)
    if mask is not None:
        _check_row_tensor("mask", mask, lead_shape, device, lambda d: d == torch.bool,
                          "a bool tensor (True = keep the row)")
        return mask.reshape(-1)
    return None


def row_weights(n_rows, kept, *, scale, reduction, num_items, device, dtype=torch.float32):
    """(N,) weights w such that loss = Σ_rows w·loss_row (or w·loss_row per row for
    reduction='none'). Dropped rows get 0 (and a weight of 0 is how the kernels know a row is
    dropped: they never read it); 'mean' divides by the kept rows (at least 1, so all-dropped
    gives 0, not NaN) or by num_items. float32, or float64 for the float64 reference."""
    if num_items is not None and reduction != "mean":
        raise ValueError(f"num_items is only used with reduction='mean', got reduction={reduction!r}")
    if kept is None:
        w = torch.full((n_rows,), float(scale), dtype=dtype, device=device)
    else:
        w = kept.to(dtype) * float(scale)
    if reduction != "mean":
        return w
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            w = w / _num_items_tensor(num_items, device, dtype)  # NaN when it is bad ...
            return w if kept is None else torch.where(kept, w, 0.0)  # ... but dropped rows stay 0
        return w / check_real("num_items", num_items, low=0.0, low_open=True)
    if kept is None:
        return w / max(n_rows, 1)
    return w / kept.sum().clamp_min(1).to(dtype)


def _num_items_tensor(n, device, dtype):
    """A tensor num_items as a 0-dim `dtype` tensor on `device`. It must be finite and > 0: a
    CPU tensor is checked in eager mode (ValueError); a CUDA one (no host sync) and any one
    inside a compiled graph (no graph break) gives NaN instead, never a finite wrong loss."""
    if n.numel() != 1:
        raise ValueError(f"num_items must be a number or a one-element tensor, got shape "
                         f"{tuple(n.shape)}")
    if n.dtype == torch.bool or n.is_complex():
        raise TypeError(f"num_items must be a real (integer or floating) tensor, got dtype {n.dtype}")
    n = n.detach().reshape(()).to(device=device, dtype=dtype)
    if type(n) is torch.Tensor and n.device.type == "cpu" and not torch.compiler.is_compiling():
        value = n.item()
        if not (0 < value < float("inf")):
            raise ValueError(f"num_items must be a finite number > 0, got {value}")
        return n
    return nan_unless((n > 0) & torch.isfinite(n), n)


def nan_unless(ok, x):
    """x where ok, NaN elsewhere: how a bad tensor value that cannot be checked on the host
    (inside a compiled graph, or on a GPU without a sync) reaches the result: as NaN."""
    return torch.where(ok, x, float("nan"))


class _NanRows(torch.autograd.Function):
    """value with NaN at the rows `bad`, and NaN in those rows of every input's gradient."""

    @staticmethod
    def forward(ctx, value, bad, *inputs):
        ctx.save_for_backward(bad)
        ctx.meta = [(x.shape, x.dtype, x.device) for x in inputs]
        return value.masked_fill(bad, float("nan"))

    @staticmethod
    def backward(ctx, grad):
        (bad,) = ctx.saved_tensors
        grads = [grad, None]
        for (shape, dtype, device), needed in zip(ctx.meta, ctx.needs_input_grad[2:]):
            if not needed:
                grads.append(None)
                continue
            rows = bad.reshape(bad.shape + (1,) * (len(shape) - bad.dim()))
            grads.append(torch.zeros(shape, dtype=dtype, device=device).masked_fill(rows, float("nan")))
        return tuple(grads)


def nan_rows(value, bad, *inputs):
    """The NaN rule of the reference backends (README: "NaN and inf"): per-row losses `value`
    are NaN where `bad`, and so is every gradient row of `inputs` there (each input's leading
    dims are bad's shape). The other rows are untouched, values and gradients alike."""
    return _NanRows.apply(value, bad, *inputs)


def live_rows(x, kept):
    """(..., V) → (N, V) for the reference backends, dropped rows replaced by zeros: they may
    hold anything (all −inf, say), and the reference computes every row."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if kept is None else torch.where(kept[:, None], rows, 0.0)


def as_rows(x):
    """(..., V) → (N, V) without a copy whenever the leading dims merge (slices included);
    the kernels take a row stride but need unit stride along V."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[-1] > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def cross_entropy_rows(n_rows, kept, labels, *, reduction, num_items, device, dtype):
    """(labels (N,) int64 or None, weights (N,)) of the fused-linear ops' cross-entropy: the
    flattened labels (dropped rows: 0, any valid index; the ops check the range) and their row
    weights (the reduction's, without T²), or (None, zeros) when labels is None."""
    if labels is None:
        return None, torch.zeros(n_rows, dtype=dtype, device=device)
    flat = labels.reshape(-1).long()
    if kept is not None:
        flat = torch.where(kept, flat, 0)
    return flat, row_weights(n_rows, kept, scale=1.0, reduction=reduction, num_items=num_items,
                             device=device, dtype=dtype)


def check_vocab_size(vocab_size, rows, what="the weight's rows"):
    """The vocabulary columns that take part: vocab_size in [1, rows], or rows if None."""
    if vocab_size is None:
        return rows
    vocab = check_int("vocab_size", vocab_size)
    if not 1 <= vocab <= rows:
        raise ValueError(f"vocab_size must be in [1, {rows}] ({what}), got {vocab}")
    return vocab


def check_chunk_size(chunk_size):
    """Rows per chunk of the chunked ops: an int >= 1, or None (0: the op's default)."""
    if chunk_size is None:
        return 0
    chunk = check_int("chunk_size", chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    return chunk


def check_fused_options(*, t2_scale, return_components, weight_grad_fp32, reduction,
                        hard_label_weight, soft_label_weight, student_logit_scale,
                        student_softcap, labels):
    """The student-side options every fused-linear op takes, checked: (hard, soft, scale, cap)
    as Python floats (cap None: no softcap)."""
    for name, flag in (("t2_scale", t2_scale), ("return_components", return_components),
                       ("weight_grad_fp32", weight_grad_fp32)):
        check_bool(name, flag)
    check_choice("reduction", reduction, REDUCTIONS)
    hard = check_real("hard_label_weight", hard_label_weight, low=0.0)
    soft = check_real("soft_label_weight", soft_label_weight, low=0.0)
    scale = check_real("student_logit_scale", student_logit_scale, low=0.0, low_open=True)
    cap = check_softcap("student_softcap", student_softcap)
    if hard > 0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels (the cross-entropy's targets)")
    return hard, soft, scale, cap


def fused_rows(n_rows, kept, labels, *, t2, cross_entropy, reduction, num_items, device, dtype):
    """(row_weight, labels, ce_weight) of a fused-linear op: the divergence's row weights (T²
    when t2 is that factor), and the cross-entropy's labels and weights when cross_entropy
    (cross_entropy_rows; else None and zeros)."""
    row_weight = row_weights(n_rows, kept, scale=t2, reduction=reduction, num_items=num_items,
                             device=device, dtype=dtype)
    flat, ce_weight = cross_entropy_rows(n_rows, kept, labels if cross_entropy else None,
                                         reduction=reduction, num_items=num_items,
                                         device=device, dtype=dtype)
    return row_weight, flat, ce_weight
