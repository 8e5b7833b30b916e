"""Ops of the sparse-teacher family: divergences against a teacher's top-k log-probabilities
(the math: kdkernels/reference/sparse.py), and the extraction of such top-k log-probabilities.

    kdkernels::sparse_divergence_fwd               student logits (N, V); gradient handed over
    kdkernels::fused_linear_sparse_divergence_fwd  from hidden states and lm_head, chunked
    kdkernels::fused_linear_sparse_divergence_bwd  (reduction='none': the loop again)
    kdkernels::topk_logprobs                       top-k of log_softmax(logits/T)
    kdkernels::fused_linear_topk_logprobs          the same from hidden states, chunked

Opaque Python ops. All of them run one row step per chunk of rows: SparseStep and TopKStep
below, inside the fused-linear chunk loop (ops/fused_linear.py run) for hidden-state inputs,
or inside logits_loop for logits. Per chunk, x = the student's logits / T in a float32 buffer:

    1. gather x at the teacher's K indices, then set x = −inf at the real ones (finite log-prob)
    2. lse_c = logsumexp of what is left (normalize_)
    3. the K-entry math, in float64 on (rows, K) tensors (entry_math): log q_k = x_k − lse,
       lse = logaddexp(lse_c, logsumexp x_I); the tail's log q_tail = lse_c − lse exactly (never
       1 − Σq); each kind's terms and G_e = ∂L/∂log q_e; and with C = Σ_e G_e, the gradient
           dL/dz_v = (G_v − q_v·C)/T                         v ∈ I (scattered)
           dL/dz_v = e^(x_v − lse_c)·(G_tail − C·q_tail)/T   v ∉ I (G_tail = 0 without a bucket)
       the second one a softmax over the others, bounded as q_tail → 0 (DistillKit #45)
    4. x ← coef·e^(x − lse_c) (gradient_, in place: x is then the gradient), + the scatter.

The full-vocabulary passes (2, 4) run as Triton kernels on backend 'triton'
(kdkernels/triton_kernels/sparse.py: one read, then one read and write) and as ATen's own
vectorized ops on 'cpu' and 'cuda' (five in-place passes over a chunk that stays in cache;
the family has no hand-written C++/CUDA kernel). Teacher inputs are constants.

Arguments in canonical form: kind ∈ reference.sparse.KINDS after canonical_kind (jsd with β
0 or 1 is fkl / rkl), tail ∈ TAILS, teacher_temperature 0.0 for None; row_weight as in the
divergence family (T², masks, 1/denominator; 0 = dropped, never read)."""
import math
import os
from typing import Optional

import torch
from torch import Tensor

from .._plumbing import grad_dtype
from ..reference import sparse as ref
from ._hand_over import keep_for_hand_over, scale, take_handed_over
from ._register import register_fake_and_autograd
from .fused_linear import (backward_outputs, fake_backward_outputs, fake_forward_outputs,
                           forward_outputs, register_autograd, run)

TAILS = ref.TAILS
KINDS = ref.KINDS
MAX_K = 1024
# How far above 1 a row's stored teacher probabilities may sum: the rounding of a bf16 cache
# (a bf16 log-prob near log(1/64) carries 2^-9 of relative error, ~1% of p), whatever dtype
# it arrives in (an upcast bf16 cache is common). Catches what is not log-probabilities of
# one distribution (logits, a temperature applied twice), not rounding.
SUM_TOLERANCE = 3e-2
POSITIVE_TOLERANCE = 1e-3
# Rows per chunk of the logits ops: one (chunk, V) float32 buffer within this budget stays in
# cache between the passes (CPU); CUDA takes larger chunks (fewer launches).
LOGITS_CHUNK_BUDGET = {"cpu": 8 << 20, "cuda": 256 << 20}


# ------------------------------------------------------------------- full-vocabulary passes
def normalize_(backend, x):
    """(lse, state): lse (m,) float64 = log Σ_v e^(x_v) per row of x (m, V) float32, formed
    as the row maximum + log Σ e^(x − max) in float64 (their fp32 sum would round at |lse|),
    and what gradient_ needs. Triton: one read, x unchanged. ATen ('cpu', 'cuda'): in place,
    x becomes e^(x − max): four passes over a cache-resident chunk and no temporary, where
    torch.logsumexp would allocate one. Either way x is no longer the logits afterwards for
    the caller's purposes (gradient_ takes it as normalize_ left it)."""
    if backend == "triton":
        from ..triton_kernels.sparse import row_logsumexp  # noqa: PLC0415 (imports triton)

        top, log_sum = (torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
                        for _ in range(2))
        row_logsumexp(x, top, log_sum)
        return top.double() + log_sum.double(), top
    top = x.amax(1)
    top = torch.where(torch.isfinite(top), top, 0.0)  # all −inf rows: e^(−inf) = 0, sum 0
    total = x.sub_(top[:, None]).exp_().sum(1)  # NaN / +inf rows: NaN / +inf
    return top.double() + total.double().log(), total


def gradient_(backend, x, state, coef, lse):
    """In place, x ← coef·e^(x₀ − lse) per row, x₀ the logits normalize_ saw, x and state as
    it left them; coef, lse (m,) float64 (lse = −inf only where coef = 0): the rows' softmax,
    scaled. The factor coef·e^(base − lse) is formed in float64, then rounded once."""
    if backend == "triton":
        from ..triton_kernels.sparse import scaled_exp_  # noqa: PLC0415 (imports triton)

        top = state  # the row maxima: x₀ − top is exact enough, the factor carries the rest
        factor = torch.where(coef != 0, coef * (top.double() - lse).exp(), 0.0)
        scaled_exp_(x, factor.float(), top)
        return x
    # x = e^(x₀ − max), state = Σ x: coef·e^(x₀ − lse) = x·coef/Σ
    return x.mul_(torch.where(state > 0, coef / state.double(), 0.0).float()[:, None])


def tempered_(x, temperature):
    """In place, x ← (x − max)/T per row (T ≠ 1): the maximum subtracted in the logits' own
    units before dividing, as every family does (x/T − max(x/T) would lose |x|/T·2^-24 at a
    tiny T). Log-probabilities and gradients are shift-invariant, so nothing else changes."""
    if temperature != 1.0:
        top = x.amax(1, keepdim=True)
        x.sub_(torch.where(torch.isfinite(top), top, 0.0)).div_(temperature)
    return x


# ------------------------------------------------------------------------- the K-entry math
def _terms(lp, lq, kind, beta):
    """Per-entry terms t of each kind and G = ∂t/∂log q, float64 (reference.sparse.terms,
    with the gradients written out)."""
    p, q = lp.exp(), lq.exp()
    if kind == "fkl":
        return torch.where(p > 0, p * (lp - lq), 0.0), -p
    if kind == "rkl":
        u = lq - lp
        return torch.where(q > 0, q * u, 0.0), torch.where(q > 0, q * (u + 1.0), 0.0)
    if kind == "tvd":
        return 0.5 * (p - q).abs(), 0.5 * q * torch.sign(q - p)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    g = torch.where(q > 0, (1.0 - beta) * q * (lq - lm), 0.0)
    return torch.where(p > 0, beta * p * (lp - lm), 0.0) + g, g


def entry_math(zi, lse_c, lp, *, kind, beta, tail, temperature, teacher_temperature):
    """Step 3 of the module comment, float64. zi (m, K): x at the indices; lse_c (m,):
    logsumexp of x off the real entries; lp (m, K): the teacher's log-probabilities.
    Returns the row losses (m,), the gradient at the indices (m, K) (0 at padding), and the
    coef (m,) of the gradient off them, coef·e^(x − lse_c) (0 where nothing is off them)."""
    real = lp > float("-inf")
    lse = torch.logaddexp(lse_c, torch.logsumexp(torch.where(real, zi, float("-inf")), 1))
    lq = zi - lse[:, None]
    lpk, lp_tail = ref.teacher_entries(lp, tail=tail, temperature=temperature,
                                       teacher_temperature=teacher_temperature)
    t, g = _terms(torch.where(real, lpk, 0.0), torch.where(real, lq, 0.0), kind, beta)
    loss = torch.where(real, t, 0.0).sum(1)
    g = torch.where(real, g, 0.0)
    total = g.sum(1)
    lq_tail = lse_c - lse
    g_tail = torch.zeros_like(loss)
    if lp_tail is not None:
        t_tail, g_tail = _terms(lp_tail, lq_tail, kind, beta)
        loss = loss + t_tail
        total = total + g_tail
    on = torch.where(real, (g - lq.exp() * total[:, None]) / temperature, 0.0)
    coef = (g_tail - total * lq_tail.exp()) / temperature
    empty = lse_c == float("-inf")  # no mass off the real entries: nothing to write there
    return loss, on, torch.where(empty, 0.0, coef)


# ------------------------------------------------------------------------------ row steps
class SparseStep:
    """The row step of the sparse divergences (see ops/fused_linear.py DivergenceStep for the
    protocol): the teacher is (N, K) log-probabilities and indices."""
    buffers = 0
    in_place = True

    def __init__(self, lp, idx, *, kind, beta, tail, temperature, teacher_temperature, backend):
        self.lp, self.idx = lp, idx
        self.math = dict(kind=kind, beta=beta, tail=tail, temperature=temperature,
                         teacher_temperature=teacher_temperature or None)
        self.temperature, self.backend = temperature, backend

    def select(self, pick):
        self.lp, self.idx = pick(self.lp), pick(self.idx).long()
        return self

    def __call__(self, zs, rows, w, loss_out, g, bufs):
        lp, idx = self.lp[rows].double(), self.idx[rows]
        x = zs if g is None or g is zs else g.copy_(zs)
        tempered_(x, self.temperature)
        zi = x.gather(1, idx).double()
        real = lp > float("-inf")
        # −inf at the real entries; a padding entry (+inf here) leaves its column as it was,
        # even where its index repeats a real one (min, not an ordered write).
        x.scatter_reduce_(1, idx, torch.where(real, float("-inf"), float("inf")).float(), "amin")
        lse_c, state = normalize_(self.backend, x)
        loss, on, coef = entry_math(zi, lse_c, lp, **self.math)
        w = w.double()
        live = w != 0  # (the loop keeps rows with a cross-entropy weight too: 0·inf is not 0)
        loss_out.copy_(torch.where(live, loss * w, 0.0))
        if g is None:
            return
        gradient_(self.backend, x, state, torch.where(live, coef * w, 0.0), lse_c)
        x.scatter_add_(1, idx, torch.where(live[:, None], on * w[:, None], 0.0).float())


class TopKStep:
    """The row step of the extractors: the k largest log-probabilities of softmax(z/T) per
    row and their indices, into values / indices (N, k)."""
    buffers = 0
    in_place = True

    def __init__(self, k, *, temperature, backend, values, indices):
        self.k, self.temperature, self.backend = k, temperature, backend
        self.values, self.indices = values, indices

    def select(self, pick):
        return self

    def __call__(self, zs, rows, w, loss_out, g, bufs):
        tempered_(zs, self.temperature)
        vals, ids = topk_lower_index(zs, self.k)  # (a NaN row: ranked first, caught below)
        lse, _ = normalize_(self.backend, zs)  # (zs is not needed after this)
        bad = ~torch.isfinite(lse)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0]) + rows.start
            raise ValueError(f"logits row {r} has no distribution (it holds NaN or +inf, or "
                             f"is all −inf): its top-k log-probabilities are undefined")
        self.values[rows] = (vals.double() - lse[:, None]).to(self.values.dtype)
        self.indices[rows] = ids
        loss_out.zero_()


def topk_lower_index(x, k):
    """(values, indices) of the k largest entries of each row of x (no NaN), sorted
    descending, ties broken by the lower index: torch.topk of k + 1 (a row whose (k+1)-th
    value equals its k-th has a tie across the boundary: re-picked exactly), then a stable
    sort of the k."""
    if k < x.shape[1]:
        vals, ids = torch.topk(x, k + 1, dim=1)
        ambiguous = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1)
        vals, ids = vals[:, :k].contiguous(), ids[:, :k].contiguous()
    else:  # the whole row: no boundary
        vals, ids = torch.topk(x, k, dim=1)
        ambiguous = ids.new_empty(0)
    if ambiguous.numel():  # those rows: every value above the k-th, then the lowest-index ties
        xa, kth = x[ambiguous], vals[ambiguous, -1:]
        above, tie = xa > kth, xa == kth
        take = above | (tie & (tie.cumsum(1) <= k - above.sum(1, keepdim=True)))
        ids[ambiguous] = take.nonzero()[:, 1].reshape(-1, k)  # k per row, in index order
        vals[ambiguous] = xa.gather(1, ids[ambiguous])
    ids, order = ids.sort(1)  # by index, then stably by value: ties in index order
    vals, order = vals.gather(1, order).sort(dim=1, descending=True, stable=True)
    return vals, ids.gather(1, order)


def logits_chunk(vocab, device):
    """Rows per chunk of logits_loop: one (chunk, vocab) float32 buffer in LOGITS_CHUNK_BUDGET."""
    budget = LOGITS_CHUNK_BUDGET["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // (4 * max(vocab, 1)))


def logits_loop(logits, step, row_weight, *, chunk, grad, out_dtype=None):
    """The chunk loop of the ops that take logits (N, V): each chunk of kept rows copied into
    one float32 buffer (cache-sized: LOGITS_CHUNK_BUDGET), the step run on it, its gradient
    (grad) copied out in out_dtype. Returns the row losses (N,) and the gradient."""
    n, vocab = logits.shape
    device = logits.device
    kept = row_weight != 0
    idx = None if bool(kept.all()) else kept.nonzero().squeeze(1)
    k = n if idx is None else idx.numel()
    loss = torch.zeros(n, dtype=torch.float32, device=device)
    out = None
    if grad:
        out = logits.new_empty(logits.shape, dtype=out_dtype) if idx is None \
            else logits.new_zeros(logits.shape, dtype=out_dtype)
    if k == 0:
        return loss, out
    pick = (lambda x: x) if idx is None else (lambda x: x.index_select(0, idx))
    step = step.select(pick)
    w_k = pick(row_weight).float()
    loss_k = loss if idx is None else torch.empty(k, dtype=torch.float32, device=device)
    chunk = min(chunk or logits_chunk(vocab, device), k)
    buf = torch.empty((chunk, vocab), dtype=torch.float32, device=device)
    for a in range(0, k, chunk):
        rows = slice(a, min(a + chunk, k))
        x = buf[:rows.stop - a]
        x.copy_(logits[rows] if idx is None else logits.index_select(0, idx[rows]))
        step(x, rows, w_k[rows], loss_k[rows], x if grad else None, ())
        if grad:
            if idx is None:
                out[rows].copy_(x)
            else:
                out.index_copy_(0, idx[rows], x.to(out.dtype))
    if idx is not None:
        loss.index_copy_(0, idx, loss_k)
    return loss, out


# ------------------------------------------------------------------------ teacher checks
def check_teacher(lp, idx, vocab, row_weight, vocab_name="V"):
    """The value checks of a teacher's (N, K) log-probabilities and indices at the kept rows
    (row_weight != 0; a dropped row's entries may hold anything) (ValueError), inside the ops
    so that compiled calls get them too."""
    kept = row_weight != 0
    if not bool(kept.all()):
        lp, idx = lp[kept], idx[kept]
    if lp.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= vocab:
        raise ValueError(f"teacher_indices must be in [0, {vocab_name}={vocab}), got values in "
                         f"[{lo}, {hi}]")
    if bool(torch.isnan(lp).any()):
        raise ValueError("teacher_logprobs hold NaN (padding entries are −inf)")
    top = float(lp.max())
    if top > POSITIVE_TOLERANCE:
        raise ValueError(f"teacher_logprobs must be log-probabilities (≤ 0; −inf for padding), "
                         f"got a value {top:.4g}")
    tol = SUM_TOLERANCE
    mass = float(torch.logsumexp(lp.double(), -1).max().exp())
    if mass > 1.0 + tol:
        raise ValueError(f"a row's teacher probabilities exp(teacher_logprobs) sum to {mass:.6g}"
                         f" > 1 (beyond a bf16 cache's rounding, {tol:g}): not top-k "
                         f"log-probabilities of one distribution (temperature applied twice?)")
    if os.environ.get("KDKERNELS_DEBUG") == "1":
        _check_unique(lp, idx)


def _check_unique(lp, idx):
    real = lp > float("-inf")
    # Padding gets distinct negative stand-ins, so only repeats among real entries show.
    pad = -1 - torch.arange(idx.shape[-1], device=idx.device).expand_as(idx)
    s = torch.where(real, idx.long(), pad).sort(-1).values
    dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
    if bool(dup.any()):
        r = int(dup.reshape(-1, dup.shape[-1]).any(-1).nonzero()[0, 0])
        raise ValueError(f"teacher_indices repeat a vocabulary id within row {r} "
                         f"(KDKERNELS_DEBUG=1 check): each real entry's index must be unique")


# --------------------------------------------------------------------------------- the ops
@torch.library.custom_op("kdkernels::sparse_divergence_fwd", mutates_args=(), device_types=None)
def sparse_divergence_fwd(student: Tensor, lp: Tensor, idx: Tensor, row_weight: Tensor,
                          kind: str, beta: float, tail: str, temperature: float,
                          teacher_temperature: float, chunk: int, backend: str, reduce: bool,
                          grad_student: bool) -> tuple[Tensor, Tensor]:
    """loss (() if reduce else (N,)) and, when asked, the gradient (N, V) of the weighted
    losses for student logits (N, V), in grad_dtype(student) (fp32 for 16-bit logits with
    per-row upstream gradients, reduce=False: rounded once, after backward's scaling)."""
    check_teacher(lp, idx, student.shape[1], row_weight)
    step = SparseStep(lp, idx, kind=kind, beta=beta, tail=tail, temperature=temperature,
                      teacher_temperature=teacher_temperature, backend=backend)
    with torch.autocast(device_type=student.device.type, enabled=False):
        loss, grad = logits_loop(student, step, row_weight, chunk=chunk, grad=grad_student,
                                 out_dtype=grad_dtype(student.dtype, not reduce))
    loss = loss.double().sum().float() if reduce else loss
    return loss, student.new_empty((0,)) if grad is None else grad


@sparse_divergence_fwd.register_fake
def _fake(student, lp, idx, row_weight, kind, beta, tail, temperature, teacher_temperature,
          chunk, backend, reduce, grad_student):
    loss = row_weight.new_empty(() if reduce else (student.shape[0],), dtype=torch.float32)
    g = student.new_empty(student.shape if grad_student else (0,),
                          dtype=grad_dtype(student.dtype, not reduce))
    return loss, g


def _setup_context(ctx, inputs, output):
    ctx.reduce, ctx.dtype = inputs[11], inputs[0].dtype
    keep_for_hand_over(ctx, output[1])


def _backward(ctx, grad_loss, _unused):
    (g,) = take_handed_over(ctx)
    return (scale(g, grad_loss, ctx.reduce, ctx.dtype),) + (None,) * 12


register_fake_and_autograd("sparse_divergence_fwd", _fake, _backward, _setup_context)


FUSED_ARGS = ("hs", "ws", "bs", "lp", "idx", "row_weight", "ce_weight", "labels", "vocab", "kind",
              "beta", "tail", "temperature", "teacher_temperature", "soft", "hard", "s_scale",
              "s_cap", "chunk", "backend", "reduce", "grad_hidden", "grad_weight", "grad_bias",
              "entropy", "weight_grad_fp32")


def _fused_step(lp, idx, kind, beta, tail, temperature, teacher_temperature, backend):
    return SparseStep(lp, idx, kind=kind, beta=beta, tail=tail, temperature=temperature,
                      teacher_temperature=teacher_temperature, backend=backend)


@torch.library.custom_op("kdkernels::fused_linear_sparse_divergence_fwd", mutates_args=(),
                         device_types=None)
def fused_linear_sparse_divergence_fwd(
        hs: Tensor, ws: Tensor, bs: Optional[Tensor], lp: Tensor, idx: Tensor,
        row_weight: Tensor, ce_weight: Tensor, labels: Optional[Tensor], vocab: int, kind: str,
        beta: float, tail: str, temperature: float, teacher_temperature: float, soft: float,
        hard: float, s_scale: float, s_cap: float, chunk: int, backend: str, reduce: bool,
        grad_hidden: bool, grad_weight: bool, grad_bias: bool, entropy: bool,
        weight_grad_fp32: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The outputs of fused_linear_divergence_fwd (ops/fused_linear.py), for a top-k teacher."""
    check_teacher(lp, idx, vocab, row_weight, "vocab_size")
    step = _fused_step(lp, idx, kind, beta, tail, temperature, teacher_temperature, backend)
    return forward_outputs(
        hs, ws, bs, step, row_weight, ce_weight, labels, reduce=reduce, vocab=vocab,
        temperature=temperature, soft=soft, hard=hard, s_scale=s_scale, s_cap=s_cap, chunk=chunk,
        grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias, entropy=entropy,
        weight_grad_fp32=weight_grad_fp32)


@torch.library.custom_op("kdkernels::fused_linear_sparse_divergence_bwd", mutates_args=(),
                         device_types=None)
def fused_linear_sparse_divergence_bwd(
        grad_rows: Tensor, hs: Tensor, ws: Tensor, bs: Optional[Tensor], lp: Tensor, idx: Tensor,
        row_weight: Tensor, ce_weight: Tensor, labels: Optional[Tensor], vocab: int, kind: str,
        beta: float, tail: str, temperature: float, teacher_temperature: float, soft: float,
        hard: float, s_scale: float, s_cap: float, chunk: int, backend: str, grad_hidden: bool,
        grad_weight: bool, grad_bias: bool, weight_grad_fp32: bool
) -> tuple[Tensor, Tensor, Tensor]:
    step = _fused_step(lp, idx, kind, beta, tail, temperature, teacher_temperature, backend)
    return backward_outputs(
        grad_rows, hs, ws, bs, step, row_weight, ce_weight, labels, vocab=vocab,
        temperature=temperature, soft=soft, hard=hard, s_scale=s_scale, s_cap=s_cap, chunk=chunk,
        grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias,
        weight_grad_fp32=weight_grad_fp32)


@fused_linear_sparse_divergence_fwd.register_fake
def _fake_fused_fwd(*args):
    kw = dict(zip(FUSED_ARGS, args))
    return fake_forward_outputs(kw["hs"], kw["ws"], **{name: kw[name] for name in (
        "reduce", "grad_hidden", "grad_weight", "grad_bias", "weight_grad_fp32")})


@fused_linear_sparse_divergence_bwd.register_fake
def _fake_fused_bwd(grad_rows, *args):
    kw = dict(zip(FUSED_ARGS, args))
    return fake_backward_outputs(kw["hs"], kw["ws"], grad_hidden=kw["grad_hidden"],
                                 grad_weight=kw["grad_weight"], grad_bias=kw["grad_bias"])


register_autograd("fused_linear_sparse_divergence_fwd", "fused_linear_sparse_divergence_bwd",
                  FUSED_ARGS, 8)


@torch.library.custom_op("kdkernels::topk_logprobs", mutates_args=(), device_types=None)
def topk_logprobs(logits: Tensor, k: int, temperature: float, chunk: int, backend: str,
                  logprob_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(N, k) log-probabilities (logprob_dtype) and int64 indices of logits (N, V)."""
    values, indices = topk_outputs(logits.shape[0], k, logits.device, logprob_dtype)
    step = TopKStep(k, temperature=temperature, backend=backend, values=values, indices=indices)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits_loop(logits, step, torch.ones(logits.shape[0], device=logits.device), chunk=chunk,
                    grad=False)
    return values, indices


@torch.library.custom_op("kdkernels::fused_linear_topk_logprobs", mutates_args=(),
                         device_types=None)
def fused_linear_topk_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], k: int,
                               vocab: int, logit_scale: float, softcap: float, temperature: float,
                               chunk: int, backend: str,
                               logprob_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The same for the logits logit_scale·(hidden·weightᵀ + bias), softcapped (cap 0: none)."""
    n = hidden.shape[0]
    values, indices = topk_outputs(n, k, hidden.device, logprob_dtype)
    step = TopKStep(k, temperature=temperature, backend=backend, values=values, indices=indices)
    ones, zeros = (torch.full((n,), v, device=hidden.device) for v in (1.0, 0.0))
    run(hidden, weight, bias, step, ones, zeros, None, vocab=vocab, temperature=temperature,
        soft=1.0, hard=0.0, s_scale=logit_scale, s_cap=softcap, chunk=chunk, grad_hidden=False,
        grad_weight=False, grad_bias=False, entropy=False, weight_grad_fp32=True)
    return values, indices


def topk_outputs(n, k, device, dtype):
    return (torch.empty((n, k), dtype=dtype, device=device),
            torch.empty((n, k), dtype=torch.int64, device=device))


@topk_logprobs.register_fake
def _fake_topk(logits, k, temperature, chunk, backend, logprob_dtype):
    return topk_outputs(logits.shape[0], k, logits.device, logprob_dtype)


@fused_linear_topk_logprobs.register_fake
def _fake_fused_topk(hidden, weight, bias, k, vocab, logit_scale, softcap, temperature, chunk,
                     backend, logprob_dtype):
    return topk_outputs(hidden.shape[0], k, hidden.device, logprob_dtype)
