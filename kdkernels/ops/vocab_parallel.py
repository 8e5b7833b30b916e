"""Vocabulary-parallel divergences: each rank holds a contiguous vocabulary shard of both
logits (kdkernels/_distributed.py: the layout), and only per-row statistics cross ranks.

The math (kdkernels/reference/divergence.py has the kinds). With global row maxima M and
log-normalizers L = log Σ_all e^((x − M)/T) of both sides, a rank's log-probabilities are
lq = (s − M_s)/T − L_s and lp = (t − M_t)/T − L_t on its own columns, and every kind is a sum of
per-element terms of (lp, lq) (reference.rows_from_log_probs), so the row's divergence is the
sum of the ranks' partial sums D_r. Its gradient on this rank's columns is log_softmax's
backward with the row sums taken over every rank:
    dD/ds_j = (G^q_j − q_j·Σ_all G^q)/T,    dD/dt_j = λ·(G^p_j − p_j·Σ_all G^p)/T
with G = ∂D/∂(log-probabilities) per element (autograd of the reference's formulas on this
rank's columns) and λ = 1 without TAID (its target λ·t + (1−λ)·sg(s)).

Communication per forward, all on the kept rows K only (dropped rows are never read):
    1. all-reduce MAX of (K, 2) in the compute dtype: the row maxima of s and of the target
    2. all-reduce SUM of (K, 3) float64: both Σ e^((x − M)/T), and the count of NaN / +inf
    3. all-reduce SUM of (K, 3) float64: the partial divergence, Σ G^q and Σ G^p
that is 56·K bytes per rank and call for fp32/bf16/fp16 logits (64·K for float64), whatever
the vocabulary. The row sums are accumulated in float64 (they decide the gradient where
G − p·ΣG cancels). Backward communicates nothing (the forward computes the gradient and hands
it over: _hand_over.py). No rank holds more than its shard of any row.

This is the PyTorch-ops form of the vocabulary-parallel path (chunks of rows, the reference's
formulas): exact, not yet fused. TAID's target (1−λ)·sg(s) + λ·t is formed per element, on
the shard; the NaN rule holds across ranks (a NaN or +inf anywhere in a row, or no
distribution, makes the row and its gradient NaN on every rank)."""
import torch

from .. import _distributed as D
from .._plumbing import grad_dtype
from ..reference import divergence as ref
from ._hand_over import keep_for_hand_over, scale, take_handed_over

# Elements per chunk of rows and columns held at once (per intermediate; a few are alive).
CHUNK_ELEMENTS = 1 << 20


def divergence(student, teacher, weight, kept, *, group, kind, temperature, beta, skew, taid_t,
               reduce):
    """Σ_i w_i·D_i (reduce) or w_i·D_i per row, D the divergence of the full-vocabulary rows
    whose shards student / teacher (N, V_r) this rank holds; gradients to the shards. kept:
    (N,) bool or None; weight (N,) as from _plumbing.row_weights."""
    return _VocabParallel.apply(student, teacher, weight, kept, group, kind, temperature, beta,
                                skew, taid_t, reduce)


class _VocabParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, weight, kept, group, kind, temperature, beta, skew,
                taid_t, reduce):
        need = (student.requires_grad, teacher.requires_grad)
        loss, gs, gt = _forward(student, teacher, weight, kept, group, kind, temperature, beta,
                                skew, taid_t, reduce, need)
        ctx.reduce, ctx.dtypes = reduce, (student.dtype, teacher.dtype)
        keep_for_hand_over(ctx, gs, gt)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gs, gt = take_handed_over(ctx)
        return (scale(gs, grad_loss, ctx.reduce, ctx.dtypes[0]),
                scale(gt, grad_loss, ctx.reduce, ctx.dtypes[1])) + (None,) * 9


def _chunks(n, width):
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _target(s, t, taid_t):
    return t if taid_t is None else ref.taid_target(s, t, taid_t)


def _forward(student, teacher, weight, kept, group, kind, temperature, beta, skew, taid_t,
             reduce, need):
    n, width = student.shape
    cdtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    rows = torch.arange(n, device=student.device) if kept is None else kept.nonzero().squeeze(1)
    k = rows.numel()
    kind = ref.canonical_kind(kind, beta, skew)
    D.all_agree(group, "the rows and options (N, kept rows, kind, temperature, beta, skew, "
                "taid_t, reduce)", (n, k, ref.KINDS.index(kind), temperature, beta, skew,
                                   -1.0 if taid_t is None else taid_t, reduce), student.device)
    chunks = _chunks(k, width)

    def load(i, j):  # the kept rows i:j of both shards, in the compute dtype
        idx = rows[i:j]
        s = student.detach()[idx].to(cdtype)
        return s, _target(s, teacher.detach()[idx].to(cdtype), taid_t)

    # 1. Row maxima; NaN and +inf entries are counted apart (they make the row NaN).
    maxima = torch.empty(k, 2, dtype=cdtype, device=student.device)
    sums = torch.zeros(k, 3, dtype=torch.float64, device=student.device)  # Σe of s, t; bad
    for i, j in chunks:
        for side, x in enumerate(load(i, j)):
            m = x.amax(-1) if width else x.new_full((j - i,), float("-inf"))
            maxima[i:j, side] = torch.where(torch.isfinite(m), m, float("-inf"))
            sums[i:j, 2] += (torch.isnan(x) | (x == float("inf"))).sum(-1)
    D.all_reduce_(maxima, "max", group)
    shift = torch.where(torch.isfinite(maxima), maxima, 0.0)
    # 2. The normalizers Σ e^((x − M)/T) and the bad-entry counts, summed over ranks.
    for i, j in chunks:
        for side, x in enumerate(load(i, j)):
            a = (x - shift[i:j, side, None]) / temperature
            sums[i:j, side] = torch.where(torch.isnan(a), 0.0, a).exp().sum(-1, dtype=torch.float64)
    D.all_reduce_(sums, "sum", group)
    log_z = sums[:, :2].log()
    ok = (sums[:, 2] == 0) & torch.isfinite(log_z).all(-1)
    log_z = torch.where(ok[:, None], log_z, 0.0).to(cdtype)
    # 3. Partial divergences and, per element, G = ∂D/∂(log-probabilities) with their row sums.
    partial = torch.zeros(k, 3, dtype=torch.float64, device=student.device)
    g = [torch.empty(k, width, dtype=cdtype, device=student.device) if need[i] else None
         for i in range(2)]

    def log_probs(i, j):
        s, t = load(i, j)
        live = ok[i:j, None]
        lq = (torch.where(live, s, 0.0) - shift[i:j, 0, None]) / temperature - log_z[i:j, :1]
        lp = (torch.where(live, t, 0.0) - shift[i:j, 1, None]) / temperature - log_z[i:j, 1:]
        return lq, lp

    for i, j in chunks:
        with torch.enable_grad():
            lq, lp = (x.requires_grad_(True) for x in log_probs(i, j))
            d = ref.rows_from_log_probs(lp, lq, kind, beta, skew)
            g_q, g_p = torch.autograd.grad(d.sum(), (lq, lp))
        partial[i:j, 0] = d.detach()
        partial[i:j, 1] = g_q.sum(-1, dtype=torch.float64)
        partial[i:j, 2] = g_p.sum(-1, dtype=torch.float64)
        for side, grad in enumerate((g_q, g_p)):
            if need[side]:
                g[side][i:j] = grad
    D.all_reduce_(partial, "sum", group)
    # 4. The log-softmax backward with the row sums of every rank: (G − prob·ΣG)/T, times λ
    #    for a TAID teacher (∂target/∂t = λ), the row weights, and the NaN rule.
    w = weight[rows].to(cdtype)
    loss_rows = torch.where(ok, partial[:, 0].to(cdtype), float("nan")) * w
    factor = [1.0 / temperature, (1.0 if taid_t is None else taid_t) / temperature]
    for i, j in chunks:
        probs = [x.exp() for x in log_probs(i, j)]
        for side in range(2):
            if g[side] is not None:
                total = partial[i:j, 1 + side, None].to(cdtype)
                g[side][i:j] = torch.where(
                    ok[i:j, None], (g[side][i:j] - probs[side] * total) * (w[i:j, None] *
                                                                             factor[side]),
                    float("nan"))
    out_dtype = torch.float64 if cdtype == torch.float64 else torch.float32
    loss = loss_rows.sum().to(out_dtype) if reduce else \
        torch.zeros(n, dtype=out_dtype, device=student.device).index_copy_(
            0, rows, loss_rows.to(out_dtype))
    grads = []
    for side, x in enumerate((student, teacher)):
        if g[side] is None:
            grads.append(x.new_empty((0,), dtype=grad_dtype(x.dtype)))
            continue
        full = torch.zeros(n, width, dtype=grad_dtype(x.dtype), device=x.device)
        grads.append(full.index_copy_(0, rows, g[side].to(full.dtype)))
    return loss, grads[0], grads[1]
