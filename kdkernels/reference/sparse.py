"""Reference (specification) of the sparse-teacher family, in plain PyTorch: divergences
between a student's full-vocabulary distribution and a teacher known only by its top-k
log-probabilities, and the extraction of such top-k log-probabilities. Differentiable by
autograd and float64-capable, like every reference; it materializes the (N, V) log-softmax,
which the kernels never do.

Per row, with z the student's logits (V,), T the temperature, and the teacher's K entries
(ℓ_k, i_k), ℓ_k a log-probability (−inf: padding, which contributes nothing):
    log q_v = log_softmax(z/T)_v                     over the whole vocabulary
    I = {i_k : ℓ_k > −inf}                           the teacher's real entries
    a_k = ℓ_k·(T_gen/T)                              re-tempering (teacher_temperature = T_gen);
                                                     a_k = ℓ_k when it is None (or equals T)
and the tails, each a distribution pair (p_e, q_e) over entries e:
    renormalize  e ∈ I: log p_k = a_k − logsumexp_I(a),   log q_k as gathered (not renormalized)
    none         e ∈ I: log p_k = ℓ_k as given, log q_k as gathered (re-tempered entries
                 are renormalized, which is "renormalize": the API rejects re-tempering here)
    bucket       e ∈ I ∪ {tail}: log p_k = ℓ_k, log p_tail = log(1 − Σ_I e^ℓ),
                 log q_k as gathered, log q_tail = logsumexp_{v ∉ I}(log q_v): the mass outside
                 I, summed directly (never 1 − Σ q, which is 0 in floating point when the
                 student's top-k mass rounds to 1). Re-tempering is not defined here (the mass
                 outside the top-k at another temperature is unknown): the API rejects it.
The kinds sum over those entries (0·log 0 = 0):
    fkl   Σ p (log p − log q)       rkl   Σ q (log q − log p)       tvd   ½ Σ |p − q|
    jsd   β Σ p log(p/m) + (1−β) Σ q log(q/m),  m = βp + (1−β)q   (β = 0: fkl, β = 1: rkl)
With K = V and tail "renormalize" every kind is the dense kernels.divergence of the same
logits (kdkernels/reference/divergence.py). T², masks and reductions are the caller's.

top-k extraction: the k largest log_softmax(z/T) values of a row, sorted descending, ties
broken by the lower vocabulary index, with their indices."""
import torch

from .divergence import canonical_kind

TAILS = ("renormalize", "bucket", "none")
KINDS = ("fkl", "rkl", "jsd", "tvd")


def log1mexp(x):
    """log(1 − e^x) for x ≤ 0, accurate at both ends (Mächler): log(−expm1(x)) near 0,
    log1p(−e^x) below −log 2. x = 0 gives −inf, x = −inf gives 0."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def teacher_entries(teacher_logprobs, *, tail, temperature, teacher_temperature):
    """log p over the K entries (−inf at padding), and for tail='bucket' log p_tail (N,)."""
    lp = teacher_logprobs
    real = lp > float("-inf")
    if tail == "bucket":
        # Σ e^ℓ may exceed 1 by rounding (the API allows 1e-3): its tail is then empty.
        lse = torch.logsumexp(lp, -1).clamp_max(0.0)
        return lp, log1mexp(lse)
    retemper = teacher_temperature is not None and teacher_temperature != temperature
    if tail == "none" and not retemper:
        return lp, None
    a = lp * (teacher_temperature / temperature) if retemper else lp
    lse = torch.logsumexp(a, -1, keepdim=True)
    # A row of padding only has no entry: everything stays −inf and contributes nothing.
    return torch.where(real, a - torch.where(real.any(-1, keepdim=True), lse, 0.0), a), None


def student_entries(student_logits, teacher_logprobs, teacher_indices, *, tail, temperature):
    """log q at the K indices, and for tail='bucket' log q_tail (N,) (the mass outside I)."""
    log_q = torch.log_softmax(student_logits / temperature, -1)
    lq = log_q.gather(-1, teacher_indices)
    if tail != "bucket":
        return lq, None
    real = teacher_logprobs > float("-inf")
    in_i = torch.zeros_like(log_q, dtype=torch.bool).scatter_(
        -1, teacher_indices, real) if real.all() else _in_i(log_q, teacher_indices, real)
    return lq, torch.logsumexp(log_q.masked_fill(in_i, float("-inf")), -1)


def _in_i(log_q, indices, real):
    """(N, V) bool: v ∈ I. A padding entry's index may repeat a real one: or, never overwrite."""
    hit = torch.zeros_like(log_q).scatter_add_(-1, indices, real.to(log_q.dtype))
    return hit > 0


def terms(lp, lq, *, kind, beta):
    """Per-entry terms of each kind for log-probabilities lp (teacher) and lq (student)."""
    p, q = lp.exp(), lq.exp()
    lp0 = torch.where(p > 0, lp, 0.0)  # finite stand-ins where a probability is 0 (no NaN
    lq0 = torch.where(q > 0, lq, 0.0)  # through the unselected branches of torch.where)
    if kind == "fkl":
        return torch.where(p > 0, p * (lp0 - lq), 0.0)
    if kind == "rkl":
        return torch.where(q > 0, q * (lq0 - lp), 0.0)
    if kind == "tvd":
        return 0.5 * (p - q).abs()
    lm = torch.logaddexp(lp + torch.log(torch.tensor(beta, dtype=lp.dtype)),
                         lq + torch.log(torch.tensor(1.0 - beta, dtype=lq.dtype)))
    return (torch.where(p > 0, beta * p * (lp0 - lm), 0.0)
            + torch.where(q > 0, (1.0 - beta) * q * (lq0 - lm), 0.0))


def sparse_divergence_rows(student_logits, teacher_logprobs, teacher_indices, *, kind="fkl",
                           tail="renormalize", temperature=1.0, teacher_temperature=None,
                           beta=0.5):
    """Per-row divergence (N,) for (N, V) student logits and (N, K) teacher entries
    (indices int64). Differentiable with respect to the student logits."""
    kind = canonical_kind(kind, beta, 0.0)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    z = student_logits.to(dtype)
    lp_in = teacher_logprobs.detach().to(dtype)
    idx = teacher_indices.long()
    lp, lp_tail = teacher_entries(lp_in, tail=tail, temperature=temperature,
                                  teacher_temperature=teacher_temperature)
    lq, lq_tail = student_entries(z, lp_in, idx, tail=tail, temperature=temperature)
    real = lp_in > float("-inf")
    # Padding entries get finite stand-ins (no gradient, no NaN through torch.where), then 0.
    per_entry = torch.where(real, terms(torch.where(real, lp, 0.0), torch.where(real, lq, 0.0),
                                        kind=kind, beta=beta), 0.0)
    loss = per_entry.sum(-1)
    if lp_tail is not None:
        loss = loss + terms(lp_tail, lq_tail, kind=kind, beta=beta)
    return loss


def topk_logprobs(logits, k, *, temperature=1.0):
    """(values, indices) of the k largest log_softmax(logits/T) per row, sorted descending,
    ties broken by the lower index (a stable sort of the whole row: the spec, not fast)."""
    log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32))
                              / temperature, -1)
    values, indices = torch.sort(log_p, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]
