"""Liger-Kernel 0.8.5's distillation losses with Liger's names, signatures and semantics, on
kdkernels' kernels: a Liger user changes one import.

    ours = Liger's class     in Liger's module             on kdkernels'
    LigerFusedLinearJSDLoss  liger_kernel.chunked_loss     fused_linear_divergence
    LigerFusedLinearJSD      liger_kernel.transformers     fused_linear_divergence(kind="jsd")
    LigerJSD                 liger_kernel.transformers     divergence(kind="jsd")
    LigerKLDIVLoss           liger_kernel.transformers     divergence(kind="fkl")
    LigerTVDLoss             liger_kernel.transformers     plain PyTorch (its docstring says why)

The contracts (Liger's code, in our words; the classes' docstrings have the details):

β. Liger's β is kdkernels' (and TRL's): β = 0 is KL(p‖q), β = 1 is KL(q‖p), otherwise
β·KL(p‖m) + (1−β)·KL(q‖m) with m = βp + (1−β)q, p the teacher's distribution (Liger's
second argument / target), q the student's. Both special-case the end points (the formula in
between tends to 0, not to a KL, as β → 0 or 1), so kind="jsd", beta=β maps exactly.

Log-probabilities in, the logits' gradient out. LigerJSD and LigerKLDIVLoss take
log-probabilities x, and Liger's kernels return the gradient with x a free variable (−y_true
for the KL, −p for β = 0). kdkernels' kernels take logits. log_softmax is idempotent, so
log-probabilities are valid logits with the same distribution, and the value is the same; the
gradient we return is Jᵀg, Liger's g projected by log_softmax's Jacobian at x (g − softmax(x)·Σg):
it differs from Liger's by a per-row multiple of softmax(x), which the caller's own
log_softmax backward (the same projection, and JᵀJᵀ = Jᵀ) removes. So the gradient w.r.t. the
logits upstream of the caller's log_softmax, the one a model sees, is identical (that is what
python_tests/test_integrations_liger.py compares); x.grad itself differs where x is a leaf.
No such caveat elsewhere: LigerKLDIVLoss(reduction="none") and LigerTVDLoss return Liger's
gradient itself, LigerFusedLinearJSD Liger's w.r.t. the hidden states and the weight.

Unnormalized inputs. We compute the divergence of the distributions softmax(x), i.e. each row
renormalized; Liger uses exp(x) as it is. For log-probabilities the two agree (bf16 ones are
normalized to bf16's rounding, and so agree to it); for anything else (raw logits, a truncated
top-k teacher) Liger's number is not a divergence of two distributions (it can be negative),
ours is that of the renormalized rows. No check is made: it would cost a log-sum-exp pass over
both inputs (as much reading as the kernel's) and a host sync, to flag what for bf16
log-probabilities is a difference within bf16's rounding.

Zero probabilities (−inf log-probabilities, a masked vocabulary) are exact here: 0·log 0 = 0
with zero gradient. Liger's kernels form 0·(−inf) there and return NaN (its JSD kernel run
under Triton's CPU interpreter confirms it): LigerJSD with β > 0 wherever the student has a
−inf entry (and a NaN gradient), with β < 1 wherever the teacher has one; LigerKLDIVLoss
wherever y_true is −inf (log_target) or y_true = 0 where y_pred = −inf.

Rows, reductions, dtypes. Inputs are (…, V) (fused: (…, H)) with shift_labels shaped like the
leading dims (Liger: 2-D inputs and (BT,) labels only). The rows whose shift_labels ==
ignore_index are dropped (never read: they may hold anything); the JSDs divide by the kept rows
(all rows without labels) and, when every row is dropped, return 0 with zero gradients, as
Liger's do (Liger's TVD raises ZeroDivisionError there for "batchmean" and "mean"; ours is 0).
Gradients reach the first argument only (log_q, y_pred, p; the student's input and weight), in
its dtype; the second is a constant even when it requires grad, as in Liger, whose backward
returns None for it. LigerJSD returns its loss in log_q's dtype (Liger casts so); the others
return float32 (float64 for float64 inputs), reduction="none" included, as Liger's do.

LigerFusedLinearJSDLoss (Liger's chunked loss): soft = Σ over rows with label != ignore_index
of the generalized JSD of softmax(z_t/T) and softmax(z_s/T), divided by the number of those
rows (at least 1), no T²; hard = the cross-entropy of the student's logits at temperature 1 on
the same rows, same division; loss = weight_hard_loss·hard + weight_soft_loss·soft.

Where Liger's semantics are a known bug, the class keeps them and says so:
LigerFusedLinearJSDLoss's teacher vocabulary larger than the student's pads the student's
logits with 0 (probability e^0/Z for columns the student cannot produce) rather than −inf; the
class does the same (a zero-padded copy of the student's weight, weight-sized), with the
cross-entropy over the student's own columns as Liger's. kdkernels.fused_linear_divergence
(vocab_size=V_s) is the correct form. Where a difference is a Liger defect with no caller
relying on it (NaN at zero probabilities, bf16-rounded logits, ZeroDivisionError), ours gives
the exact answer and the class docstring says so."""
import torch

from .. import _plumbing as P
from ..divergence import divergence
from ..fused_linear import fused_linear_divergence

# torch.nn.KLDivLoss's reductions, which Liger's KL and TVD take.
REDUCTIONS = ("none", "batchmean", "sum", "mean")


class LigerFusedLinearJSDLoss(torch.nn.Module):
    """Liger's LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
    ignore_index=-100, temperature=1.0, compiled=True, chunk_size=1024,
    return_soft_hard_loss=False), called as (student_input, student_weight, teacher_input,
    teacher_weight, true_labels, student_bias=None, teacher_bias=None): the loss, or
    (loss, soft_loss, hard_loss) with return_soft_hard_loss. `compiled` is accepted and has no
    effect (the kernels need no compilation); chunk_size is the rows per chunk, as Liger's."""

    def __init__(self, weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, ignore_index=-100,
                 temperature=1.0, compiled=True, chunk_size=1024, return_soft_hard_loss=False):
        super().__init__()
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if temperature == 0:
            raise ValueError("temperature must be non-zero")
        self.weight_hard_loss, self.weight_soft_loss = float(weight_hard_loss), float(weight_soft_loss)
        self.beta, self.ignore_index = float(beta), int(ignore_index)
        self.temperature, self.compiled = float(temperature), compiled
        self.chunk_size, self.return_soft_hard_loss = int(chunk_size), bool(return_soft_hard_loss)

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, true_labels,
                student_bias=None, teacher_bias=None):
        beta = self.beta
        kind, b = ("fkl", 0.5) if beta == 0.0 else ("rkl", 0.5) if beta == 1.0 else ("jsd", beta)
        with_ce = self.weight_hard_loss != 0.0 or self.return_soft_hard_loss  # (Liger skips it)
        common = dict(labels=true_labels, ignore_index=self.ignore_index, t2_scale=False,
                      chunk_size=self.chunk_size, return_components=True, kind=kind, beta=b,
                      temperature=self.temperature)
        v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
        if v_t <= v_s:  # one call (Liger itself fails for v_t < v_s; here the first v_t count)
            out = fused_linear_divergence(
                student_input, student_weight, teacher_input, teacher_weight,
                student_bias=student_bias, teacher_bias=teacher_bias,
                hard_label_weight=self.weight_hard_loss if with_ce else 0.0,
                soft_label_weight=self.weight_soft_loss, **common)
            loss, soft_loss, hard_loss = out.loss, out.divergence, out.cross_entropy
        else:  # Liger's zero padding (the module comment), and its CE over the student's columns
            pad = v_t - v_s
            weight = torch.cat([student_weight, student_weight.new_zeros(pad, student_weight.shape[1])])
            bias = None if student_bias is None else torch.cat([student_bias,
                                                                student_bias.new_zeros(pad)])
            soft = fused_linear_divergence(
                student_input, weight, teacher_input, teacher_weight, student_bias=bias,
                teacher_bias=teacher_bias, soft_label_weight=self.weight_soft_loss, **common)
            loss, soft_loss, hard_loss = soft.loss, soft.divergence, torch.zeros_like(soft.loss)
            if with_ce:
                hard = fused_linear_divergence(
                    student_input, student_weight, teacher_input, teacher_weight[:v_s],
                    student_bias=student_bias, hard_label_weight=self.weight_hard_loss,
                    soft_label_weight=0.0, **common)
                loss, hard_loss = loss + hard.loss, hard.cross_entropy
        return (loss, soft_loss, hard_loss) if self.return_soft_hard_loss else loss


def _check_shift_labels(shift_labels, inputs):
    """shift_labels: None, or an integer tensor shaped like inputs' leading dims."""
    if shift_labels is not None:
        P._check_row_tensor("shift_labels", shift_labels, inputs.shape[:-1], inputs.device,
                            P._is_integer_dtype, "an integer tensor")


def _compute_dtype(*tensors):
    """float32, or float64 if any input is."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class LigerJSD(torch.nn.Module):
    """Liger's LigerJSD(beta=0.5, ignore_index=-100), called as (log_q, log_p, shift_labels=None)
    with log_q the student's and log_p the teacher's log-probabilities (…, V): the generalized
    JSD (the module docstring's β) summed over the rows whose shift_labels != ignore_index (all
    rows without labels) and divided by their number; 0 when there are none. Returned in
    log_q's dtype, as Liger's; the gradient reaches log_q only. On kdkernels.divergence
    (kind="jsd", beta, t2_scale=False): log-probabilities serve as the logits."""

    def __init__(self, beta=0.5, ignore_index=-100):
        super().__init__()
        self.beta = P.check_real("beta", beta, low=0.0, high=1.0)
        self.ignore_index = P.check_int("ignore_index", ignore_index)

    def forward(self, log_q, log_p, shift_labels=None):
        P.check_pair(log_q, log_p, "log_q", "log_p")
        _check_shift_labels(shift_labels, log_q)
        loss = divergence(log_q, log_p.detach(), kind="jsd", beta=self.beta, t2_scale=False,
                          labels=shift_labels, ignore_index=self.ignore_index)
        return loss.to(log_q.dtype)


class LigerKLDIVLoss(torch.nn.KLDivLoss):
    """Liger's LigerKLDIVLoss(eps=1e-10, *args, **kwargs), torch.nn.KLDivLoss's contract (a
    subclass: size_average, reduce, reduction="mean", log_target=False), called as
    (y_pred, y_true): KL(y_true‖exp(y_pred)) per row, y_pred log-probabilities, y_true
    probabilities (log-probabilities with log_target). Reductions: "sum"; "batchmean" the sum /
    size(0) (torch's rule; for Liger's 2-D inputs, the rows); "mean" the sum / numel (torch's
    and Liger's mean over elements); these on kdkernels.divergence(kind="fkl") with the teacher
    y_true (log_target) or log(y_true) in fp32 (a (…, V) fp32 copy that Liger does not make:
    its kernel takes probabilities). "none": the elementwise terms
    y_true·(log max(y_true, eps) − y_pred) (log_target: e^y_true·(y_true − y_pred)), Liger's
    formula in plain PyTorch (the result is (…, V) itself), 0 where the target probability is 0.

    eps enters "none" only: the reduced values are the exact KL (torch.nn.KLDivLoss's value on
    the same inputs), where Liger's replace log y by log eps for 0 < y < eps, which moves a row
    by at most eps/e per such entry (3.7e-11 at the default eps). Output float32 (float64 for
    float64 inputs), as Liger's; the gradient reaches y_pred only."""

    def __init__(self, eps=1e-10, *args, **kwargs):
        super().__init__(*args, **kwargs)
        P.check_choice("reduction", self.reduction, REDUCTIONS)
        P.check_bool("log_target", self.log_target)
        self.eps = P.check_real("eps", eps, low=0.0)

    def forward(self, y_pred, y_true):
        P.check_pair(y_pred, y_true, "y_pred", "y_true")
        reduction = P.check_choice("reduction", self.reduction, REDUCTIONS)
        log_target = P.check_bool("log_target", self.log_target)
        eps = P.check_real("eps", self.eps, low=0.0)
        y_true = y_true.detach()
        if reduction == "none":
            return _kl_terms(y_pred, y_true, log_target, eps)
        teacher = y_true if log_target else y_true.to(_compute_dtype(y_true)).log()
        if reduction == "sum":
            return divergence(y_pred, teacher, kind="fkl", t2_scale=False, reduction="sum")
        n = y_pred.shape[0] if reduction == "batchmean" else y_pred.numel()
        return divergence(y_pred, teacher, kind="fkl", t2_scale=False, reduction="mean",
                          num_items=n)


def _kl_terms(y_pred, y_true, log_target, eps):
    """Liger's elementwise KL terms (reduction="none"), in float32 (float64), 0·anything = 0."""
    dtype = _compute_dtype(y_pred, y_true)
    x, t = y_pred.to(dtype), y_true.to(dtype)
    prob, log_prob = (t.exp(), t) if log_target else (t, t.clamp_min(eps).log())
    return torch.where(prob != 0, prob * (log_prob - x), 0.0)


class LigerTVDLoss(torch.nn.Module):
    """Liger's LigerTVDLoss(reduction="batchmean", ignore_index=-100), called as
    (p, q, shift_labels=None) on PROBABILITIES (…, V): the elementwise ½|p − q| over the rows
    whose shift_labels != ignore_index (all rows without labels), reduced as Liger does:
    "batchmean" the sum / the kept rows, "mean" the sum / (kept rows · V), "sum", "none" the
    (…, V) terms with 0 in dropped rows; 0 when every row is dropped (Liger: ZeroDivisionError
    for "batchmean" / "mean"). The gradient reaches p only: ½·sign(p − q) times the reduction's
    factor, 0 where p == q (Liger #1374's fix) and in dropped rows. Output float32 (float64 for
    float64 inputs), as Liger's.

    Why plain PyTorch and not kdkernels' tvd kernel (which takes logits): over probabilities
    the loss is elementwise, there is no softmax to fuse, and the log-probability route would
    not be exact: log 0 = −inf makes log's backward 0/0 = NaN at every zero probability, rows
    that do not sum to 1 exactly would be renormalized, and it needs a log copy of both inputs.
    _TotalVariation computes in fp32 from one read of p and q, keeps nothing but the inputs for
    backward, and gives Liger's loss and gradient exactly, normalized inputs or not (Liger
    subtracts in the input dtype; ours rounds once, in fp32)."""

    def __init__(self, reduction="batchmean", ignore_index=-100):
        super().__init__()
        self.reduction = P.check_choice("reduction", reduction, REDUCTIONS)
        self.ignore_index = P.check_int("ignore_index", ignore_index)

    def forward(self, p, q, shift_labels=None):
        P.check_pair(p, q, "p", "q")
        _check_shift_labels(shift_labels, p)
        reduction = P.check_choice("reduction", self.reduction, REDUCTIONS)
        n_rows, vocab = p.numel() // p.shape[-1], p.shape[-1]
        kept = P.kept_rows(p.shape[:-1], p.device, labels=shift_labels,
                           ignore_index=self.ignore_index)
        if reduction == "none":
            weight = torch.ones(n_rows, dtype=_compute_dtype(p, q), device=p.device)
            if kept is not None:
                weight = weight * kept
        else:
            weight = P.row_weights(n_rows, kept, scale=1.0 / vocab if reduction == "mean" else 1.0,
                                   reduction="sum" if reduction == "sum" else "mean",
                                   num_items=None, device=p.device, dtype=_compute_dtype(p, q))
        return _TotalVariation.apply(p, q.detach(), weight, reduction == "none")


class _TotalVariation(torch.autograd.Function):
    """Σ_rows w_row·Σ ½|p − q| (elementwise: w_row·½|p − q|, shaped like p), computed in w's
    dtype; rows with w = 0 are never read (they give 0, whatever they hold). Gradient to p
    only: ½·sign(p − q)·w_row·upstream, recomputed from the saved inputs."""

    @staticmethod
    def forward(ctx, p, q, weight, elementwise):
        ctx.save_for_backward(p, q, weight)
        ctx.elementwise = elementwise
        live = (weight != 0)[:, None]
        terms = (_rows(p, weight.dtype) - _rows(q, weight.dtype)).abs_().mul_(0.5)
        if elementwise:
            return torch.where(live, terms * weight[:, None], 0.0).reshape(p.shape)
        return torch.where(live[:, 0], terms.sum(-1) * weight, 0.0).sum()

    @staticmethod
    def backward(ctx, grad):
        p, q, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        live = (weight != 0)[:, None]
        sign = (_rows(p, weight.dtype) - _rows(q, weight.dtype)).sign_()
        if ctx.elementwise:
            g = sign.mul_(0.5 * weight[:, None]).mul_(grad.reshape(sign.shape))
        else:
            g = sign.mul_((0.5 * grad.to(weight.dtype)) * weight[:, None])
        g = torch.where(live, g, 0.0)
        return g.reshape(p.shape).to(p.dtype), None, None, None


def _rows(x, dtype):
    return x.reshape(-1, x.shape[-1]).to(dtype)


def _renamed(error, names):
    """error again, its message with kdkernels' argument names replaced by the caller's."""
    message = str(error)
    for ours, theirs in names:
        message = message.replace(ours, theirs)
    return type(error)(message)


class LigerFusedLinearJSD(torch.nn.Module):
    """Liger's LigerFusedLinearJSD(jsd_beta=0.5, ignore_index=-100, temperature=1.0,
    accum_dtype=None), called as (student_input, student_weight, teacher_input, teacher_weight,
    shift_labels=None): the generalized JSD (the module docstring's β) of softmax(teacher_input
    ·teacher_weightᵀ/T) and softmax(student_input·student_weightᵀ/T), no T², summed over the rows
    whose shift_labels != ignore_index and divided by their number (0 when there are none), as
    float32. On kdkernels.fused_linear_divergence: the logits are fp32 and never rounded to 16
    bits (Liger's CPU path and its GPU path before sm_80 / torch 2.8 round bf16 logits first,
    #1432); gradients reach student_input and student_weight in their dtypes, the weight's
    accumulated in fp32 across chunks and rounded once (what Liger's accum_dtype=torch.float32
    asks for; accum_dtype is accepted, a torch.dtype or None, and changes nothing here).
    Differences in what is accepted: temperature must be in [1e-6, 100] (Liger: any non-zero,
    negative ones too), and the two vocabularies must be equal, as Liger's shapes say (for a
    padded teacher pass teacher_weight[:V], or use fused_linear_divergence's vocab_size)."""

    def __init__(self, jsd_beta=0.5, ignore_index=-100, temperature=1.0, accum_dtype=None):
        super().__init__()
        self.jsd_beta = P.check_real("jsd_beta", jsd_beta, low=0.0, high=1.0)
        self.ignore_index = P.check_int("ignore_index", ignore_index)
        self.temperature = P.check_temperature("temperature", temperature)
        if accum_dtype is not None and not isinstance(accum_dtype, torch.dtype):
            raise TypeError(f"accum_dtype must be a torch.dtype or None, got "
                            f"{type(accum_dtype).__name__}")
        self.accum_dtype = accum_dtype

    def forward(self, student_input, student_weight, teacher_input, teacher_weight,
                shift_labels=None):
        names = (("student_hidden", "student_input"), ("teacher_hidden", "teacher_input"))
        try:
            P.check_linear("student", student_input, student_weight, None)
            P.check_linear("teacher", teacher_input, teacher_weight, None)
        except (TypeError, ValueError) as e:
            raise _renamed(e, names) from None
        if teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(f"teacher_weight must have student_weight's vocabulary "
                             f"{student_weight.shape[0]} rows, got {tuple(teacher_weight.shape)} "
                             f"(for a padded vocabulary pass the first rows, "
                             f"teacher_weight[:{student_weight.shape[0]}])")
        _check_shift_labels(shift_labels, student_input)
        try:
            return fused_linear_divergence(
                student_input, student_weight, teacher_input, teacher_weight, kind="jsd",
                beta=self.jsd_beta, temperature=self.temperature, t2_scale=False,
                labels=shift_labels, ignore_index=self.ignore_index)
        except (TypeError, ValueError) as e:
            raise _renamed(e, names) from None
