"""Reference (specification) of fused linear + divergence, in plain PyTorch: it materializes
both (N, V) logit tensors, which the kernels never do. Differentiable by autograd and
float64-capable, like every reference.

For each model, from its last hidden states h (N, H) and its lm_head W (V_m, H), bias b:
    z = scale·(h·Wᵀ + b)                          the logits (only the first `vocab` columns)
    z ← cap·tanh(z / cap)                          when a softcap is given (Gemma)
and per row, with the divergence of kdkernels/reference/divergence.py at temperature T,
    divergence_i = D(student_i, teacher_i)          (T² and the row weights: the caller's)
    cross_entropy_i = logsumexp(s_i) − s_i[label_i]  (the student at temperature 1)
    entropy_i = −Σ q log q,  q = softmax(s_i / T)   (logged, no gradient)
The teacher side is a constant (detached)."""
import torch

from .divergence import divergence_rows, log_softmax


def logits(hidden, weight, bias, *, vocab, scale, softcap):
    """(N, vocab) logits of one model: scale·(h·W[:vocab]ᵀ + b[:vocab]), then the softcap;
    16-bit inputs are multiplied in float32 (the logits are never rounded to 16 bits)."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(dtype) @ weight[:vocab].to(dtype).t()
    if bias is not None:
        z = z + bias[:vocab].to(dtype)
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def fused_linear_rows(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                      student_bias=None, teacher_bias=None, labels=None, vocab, kind, temperature,
                      beta, skew, taid_t, student_logit_scale=1.0, teacher_logit_scale=1.0,
                      student_softcap=None, teacher_softcap=None):
    """Per-row (divergence, cross_entropy or None, entropy) for (N, H) hidden states; labels
    (N,) int64 with every entry in [0, vocab) (dropped rows: any valid index) or None."""
    s = logits(student_hidden, student_weight, student_bias, vocab=vocab,
               scale=student_logit_scale, softcap=student_softcap)
    with torch.no_grad():
        t = logits(teacher_hidden.detach(), teacher_weight.detach(),
                   None if teacher_bias is None else teacher_bias.detach(), vocab=vocab,
                   scale=teacher_logit_scale, softcap=teacher_softcap)
    div = divergence_rows(s, t, kind=kind, temperature=temperature, beta=beta, skew=skew,
                          taid_t=taid_t)
    ce = None
    if labels is not None:
        ce = torch.logsumexp(s, -1) - s.gather(-1, labels[:, None]).squeeze(-1)
    with torch.no_grad():
        lq, _ = log_softmax(s.detach(), temperature)
        entropy = -(lq.exp() * torch.where(lq > float("-inf"), lq, 0.0)).sum(-1)
    return div, ce, entropy
