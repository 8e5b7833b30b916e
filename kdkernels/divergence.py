"""Public API of the logit-divergence family: divergence() and its aliases."""
import torch

from . import _backend, _distributed
from . import _plumbing as P
from .ops import divergence as ops
from .ops import vocab_parallel
from .reference import divergence as ref

KINDS = ref.KINDS


def divergence(student_logits, teacher_logits, *, kind="fkl", temperature=1.0, beta=0.5,
               skew=0.1, taid_t=None, t2_scale=True, labels=None, ignore_index=-100, mask=None,
               reduction="mean", num_items=None, backend="auto", process_group=None):
    """Divergence between the student's and the teacher's next-token distributions.

    Args:
        student_logits, teacher_logits: (..., V) float32/bfloat16/float16 (float64 on the
            reference backend); same shape. A teacher with a padded vocabulary is passed as
            teacher[..., :V] (a view: the kernels take row strides, no copy is made).
        kind: "fkl" KL(p‖q) · "rkl" KL(q‖p) · "jsd" β·KL(p‖m)+(1−β)·KL(q‖m), m=βp+(1−β)q ·
            "tvd" ½Σ|p−q| · "skew_fkl" KL(p‖αp+(1−α)q) · "skew_rkl" KL(q‖αq+(1−α)p);
            p = softmax(teacher/T), q = softmax(student/T).
        temperature: T in [1e-6, 100], divides both logits (README: "Edge semantics" says why).
        beta: β in [0, 1] for "jsd"; β=0 is exactly "fkl", β=1 exactly "rkl" (TRL's convention).
        skew: α in [0, 1) for the skew kinds (α = 0 is the plain KL).
        taid_t: TAID's λ in [0, 1]; the target becomes softmax(((1−λ)·sg(s) + λ·t)/T).
        t2_scale: multiply each row's loss by T² (Hinton), so gradients keep their scale.
        labels, ignore_index: drop rows whose label == ignore_index. mask: bool, True = keep.
            Give one or the other; shaped like the leading dims.
        reduction: "mean" (Σ kept rows / #kept, or / num_items), "sum", or "none" (per row,
            shaped like the leading dims, 0 at dropped rows).
        num_items: the mean's denominator (e.g. tokens over all gradient-accumulation steps).
        backend: "auto", "reference", "cpu", "triton" or "cuda" (see README: Backends).
        process_group: a torch.distributed ProcessGroup for vocabulary-parallel logits: both
            tensors are this rank's contiguous shard of the vocabulary (shards in rank order,
            any sizes, the same on both sides); everything else is the same on every rank.
            The result is the loss of the full rows, on every rank; gradients reach the
            shards. Only per-row statistics are exchanged (kdkernels/ops/vocab_parallel.py):
            backend "cpu" and "triton" run the row kernels split at the all-reduces ("cuda"
            runs Triton's), "reference" PyTorch ops; "auto" as without a group.
            DTensor logits sharded Shard(-1) on a 1-D mesh take this path with the mesh's
            group (no process_group needed); Replicate() ones the ordinary one.

    Returns a float32 loss (float64 for float64 inputs). Gradients flow to whichever of the
    logits requires grad, in its own dtype.
    """
    (student_logits, teacher_logits), process_group = _distributed.from_dtensors(
        (student_logits, teacher_logits), ("student_logits", "teacher_logits"), process_group)
    labels, mask = _distributed.local(labels), _distributed.local(mask)
    P.check_pair(student_logits, teacher_logits)
    temperature, beta, skew, taid_t = check_options(kind, temperature, beta, skew, taid_t)
    if not isinstance(t2_scale, bool):
        raise TypeError(f"t2_scale must be a bool, got {type(t2_scale).__name__}")
    P.check_choice("reduction", reduction, P.REDUCTIONS)

    lead_shape = student_logits.shape[:-1]
    n_rows = student_logits.numel() // student_logits.shape[-1]
    device = student_logits.device
    kept = P.kept_rows(lead_shape, device, labels=labels, ignore_index=ignore_index, mask=mask)
    fp64 = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
    if process_group is not None:
        group = _distributed.check_group(process_group)
        rows_backend = vocab_parallel.row_backend(backend, device, (student_logits.dtype,
                                                                    teacher_logits.dtype))
        weight = P.row_weights(n_rows, kept, scale=temperature ** 2 if t2_scale else 1.0,
                               reduction=reduction, num_items=num_items, device=device,
                               dtype=torch.float64 if fp64 else torch.float32)
        loss = vocab_parallel.divergence(
            P.as_rows(student_logits), P.as_rows(teacher_logits), weight, group=group,
            kind=kind, temperature=temperature, beta=beta, skew=skew, taid_t=taid_t,
            reduce=reduction != "none", backend=rows_backend)
        return loss if reduction != "none" else loss.reshape(lead_shape)
    backend = _backend.resolve_backend(backend, device, (student_logits.dtype, teacher_logits.dtype))
    weight = P.row_weights(n_rows, kept, scale=temperature ** 2 if t2_scale else 1.0,
                           reduction=reduction, num_items=num_items, device=device,
                           dtype=torch.float64 if backend == "reference" and fp64 else torch.float32)

    if backend == "reference":
        loss = _reference(student_logits, teacher_logits, weight, kept, kind=kind,
                          temperature=temperature, beta=beta, skew=skew, taid_t=taid_t)
        if reduction != "none":
            loss = loss.sum()
    else:
        mode, swap, mix = ops.kernel_args(kind, beta, skew)
        grad_on = torch.is_grad_enabled()
        op = torch.ops.kdkernels.divergence_fwd_triton if backend == "triton" \
            else torch.ops.kdkernels.divergence_fwd
        loss, _, _ = op(P.as_rows(student_logits), P.as_rows(teacher_logits), weight, mode, swap,
                        mix, temperature, 1.0 if taid_t is None else taid_t, reduction != "none",
                        grad_on and student_logits.requires_grad,
                        grad_on and teacher_logits.requires_grad)
    return loss if reduction != "none" else loss.reshape(lead_shape)


def check_options(kind, temperature, beta, skew, taid_t):
    """The family's options, checked (ValueError / TypeError naming the argument), as Python
    floats: (temperature, beta, skew, taid_t). Shared by the ops built on this family."""
    P.check_choice("kind", kind, KINDS)
    temperature = P.check_temperature("temperature", temperature)
    beta = P.check_real("beta", beta, low=0.0, high=1.0)
    skew = P.check_real("skew", skew, low=0.0, high=1.0, high_open=True)
    if taid_t is not None:
        taid_t = P.check_real("taid_t", taid_t, low=0.0, high=1.0)
    return temperature, beta, skew, taid_t


def _reference(student, teacher, weight, kept, **kw):
    s, t = P.live_rows(student, kept), P.live_rows(teacher, kept)
    return ref.divergence_rows(s, t, **kw) * weight


def kl_div(student_logits, teacher_logits, **kwargs):
    """Forward KL(p‖q), p the teacher's distribution: divergence(kind="fkl")."""
    return divergence(student_logits, teacher_logits, kind="fkl", **kwargs)


def reverse_kl(student_logits, teacher_logits, **kwargs):
    """Reverse KL(q‖p), q the student's distribution: divergence(kind="rkl")."""
    return divergence(student_logits, teacher_logits, kind="rkl", **kwargs)


def jsd(student_logits, teacher_logits, **kwargs):
    """Generalized Jensen–Shannon divergence with weight beta: divergence(kind="jsd")."""
    return divergence(student_logits, teacher_logits, kind="jsd", **kwargs)


def tvd(student_logits, teacher_logits, **kwargs):
    """Total variation distance ½Σ|p−q|: divergence(kind="tvd")."""
    return divergence(student_logits, teacher_logits, kind="tvd", **kwargs)
