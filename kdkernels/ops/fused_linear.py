"""Ops of fused linear + divergence: the loss of kdkernels.divergence computed from the last
hidden states and the lm_head weights, chunk by chunk of rows, never holding the (N, V) logits.

    kdkernels::fused_linear_divergence_fwd   loss, its parts and (reduce) every gradient
    kdkernels::fused_linear_divergence_bwd   the gradients for per-row upstream gradients

Both are opaque Python ops (one node under torch.compile) running `run` below, the chunk loop,
on a kernel backend ('cpu', 'cuda' or 'triton'; the reference materializes instead:
kdkernels/reference/fused_linear.py). The loop runs a row step on each chunk of the student's
logits (DivergenceStep here; the sparse-teacher ops bring theirs, ops/sparse.py). For each
chunk of the kept rows:

    zs = s_scale·(hs·Wsᵀ + bs)          (chunk, V) float32, never rounded to 16 bits
    zt = t_scale·(ht·Wtᵀ + bt)          likewise; then the softcaps c = cap·tanh(z/cap)
    the step, here the divergence rows (ops/divergence.py rows_into), writes dL/dzs into the
        chunk buffer, in place of zs when nothing else needs zs (no cross-entropy gradient,
        no student softcap); else into a second buffer
    G = soft·G_div + hard·ce_w·(softmax(zs) − onehot(label)),  × (1 − (zs/cap)²),  × s_scale
    dh[chunk] = G·Ws,   dWs += Gᵀ·hs,   dbs += Σ_rows G

Four vocabulary-sized matmuls in all, no recomputation when the upstream gradient is one scalar
(reduction 'mean' / 'sum'): the forward computes the gradients and backward scales them
(_hand_over.py). With reduction='none' the per-row upstream gradients arrive only in backward
and cannot be applied to an accumulated dW, so the forward computes the losses only and
backward runs the chunk loop again with row weights w_i·g_i (six matmuls in all).

Rows that are dropped (both weights 0) are gathered out first: their hidden states are never
read and their matmuls never run. Only the first `vocab` rows of either weight take part
(views, no copies); the student weight's other rows get zero gradient.

Arguments (the public function, kdkernels/fused_linear.py, builds them):
    row_weight (N,) float32   divergence weight: T² (if t2_scale) · kept / denominator
    ce_weight  (N,) float32   cross-entropy weight: kept / denominator (zeros without labels)
    labels     (N,) int64 or None, every entry in [0, vocab) (dropped rows: 0)
    mode, swap, mix, temperature, taid   the divergence kernels' canonical arguments
    soft, hard                the weights of the divergence and the cross-entropy in the loss
    s_scale, t_scale, s_cap, t_cap       logit scales and softcaps (cap 0: none)
    chunk                     rows per chunk (0: default_chunk's budget)
Outputs of _fwd: loss (() if reduce else (N,)), divergence and cross_entropy parts (same
shapes, no gradient), the student entropy summed over kept rows (() float32; 0 unless asked),
and dh (N, H_s), dWs (V_s, H_s), dbs (V_s,) or (0,) placeholders when not asked. Gradient
dtypes: dh in grad_dtype(hidden); dWs and dbs in float32 for 16-bit weights (accumulated in fp32
across chunks, rounded once in backward) unless weight_grad_fp32=False (bf16: accumulated in
bf16; fp16 stays fp32, _plumbing.grad_dtype's rule)."""
from typing import Optional

import torch
from torch import Tensor

from .._plumbing import grad_dtype
from ._hand_over import keep_for_hand_over, scale, take_handed_over
from ._register import first_order
from .divergence import rows_into

SCHEMA_ARGS = ("hs", "ws", "bs", "ht", "wt", "bt", "row_weight", "ce_weight", "labels", "vocab",
               "mode", "swap", "mix", "temperature", "taid", "soft", "hard", "s_scale", "t_scale",
               "s_cap", "t_cap", "chunk", "backend", "reduce", "grad_hidden", "grad_weight",
               "grad_bias", "entropy", "weight_grad_fp32")


def weight_grad_dtype(dtype, weight_grad_fp32):
    """dtype in which dW and db are accumulated across chunks."""
    if dtype == torch.float16 or (dtype == torch.bfloat16 and weight_grad_fp32):
        return torch.float32
    return dtype


_PROBE = {}


def _cuda_out_dtype_matmuls():
    """Whether this torch's CUDA matmuls take bf16 inputs with out_dtype=float32, the
    accumulator included (addmm into a float32 out); probed once on a tiny case."""
    if "ok" not in _PROBE:
        try:
            a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
            acc = torch.zeros(2, 2, device="cuda")
            torch.mm(a, a, out_dtype=torch.float32, out=acc)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _PROBE["ok"] = bool((acc == 4).all())
        except (RuntimeError, TypeError):
            _PROBE["ok"] = False
    return _PROBE["ok"]


class Side:
    """One model's operands: the first `vocab` rows of the weight (and bias). Products are
    fp32: fp32 inputs, or bf16 on CUDA through the matmuls' out_dtype (16-bit products
    accumulated in fp32); every other 16-bit weight is multiplied as an fp32 copy made once per
    call (weight-sized: CPU matmuls have no fp32 output for 16-bit inputs, and fp16 gradients
    must stay fp32 until backward has applied the upstream factor, _plumbing.grad_dtype)."""

    def __init__(self, hidden, weight, bias, vocab, logit_scale, softcap):
        self.h = hidden
        self.w = weight[:vocab]
        self.b = None if bias is None else bias[:vocab].float()
        self.native16 = (self.w.dtype == torch.bfloat16 and self.w.is_cuda
                         and _cuda_out_dtype_matmuls())
        self.mm_w = self.w if self.w.dtype == torch.float32 or self.native16 else self.w.float()
        self.scale, self.cap = logit_scale, softcap

    def hidden(self, rows):
        h = self.h[rows]
        return h if self.native16 or h.dtype == torch.float32 else h.float()

    def logits_into(self, out, rows):
        """out (rows, vocab) float32 ← the capped, scaled logits of hidden rows `rows`."""
        if self.native16:
            torch.mm(self.h[rows], self.w.t(), out_dtype=torch.float32, out=out)
        else:
            torch.mm(self.hidden(rows), self.mm_w.t(), out=out)
        if self.b is not None:
            out.add_(self.b)
        if self.scale != 1.0:
            out.mul_(self.scale)
        if self.cap:
            out.div_(self.cap).tanh_().mul_(self.cap)
        return out


def default_chunk(n_rows, vocab, buffers, device):
    """Rows per chunk: the `buffers` chunk buffers ((chunk, V) float32 each: see run) within
    CHUNK_BUDGET bytes (CPU 128 MiB: chunks of 512 rows at V = 32000 with two buffers; CUDA
    1 GiB), a multiple of 64 rows where that is ≥ 64, and at most the number of rows."""
    budget = CHUNK_BUDGET["cuda" if device.type == "cuda" else "cpu"]
    rows = max(1, budget // (4 * vocab * buffers))
    if rows >= 64:
        rows = rows // 64 * 64
    return max(1, min(rows, n_rows))


CHUNK_BUDGET = {"cpu": 128 << 20, "cuda": 1 << 30}


def run(hs, *args, **kwargs):
    """The chunk loop (_run), with autocast off: its matmuls choose their own precision."""
    with torch.autocast(device_type=hs.device.type, enabled=False):
        return _run(hs, *args, **kwargs)


class DivergenceStep:
    """The row step of fused_linear_divergence: the teacher's logits per chunk (its own lm_head),
    then the divergence rows of `backend` (ops/divergence.py rows_into).

    A row step is what the chunk loop (_run) runs on each chunk of the student's logits; the
    ops built on the loop bring their own (ops/sparse.py: a top-k teacher, top-k extraction):
        buffers             how many extra (chunk, V) float32 buffers it needs (bufs below)
        select(pick)        the step restricted to the kept rows (pick gathers them)
        __call__(zs, rows, w, loss_out, g, bufs)
            zs (m, V) float32, the chunk's student logits (capped and scaled); rows: its slice of
            the kept rows; w (m,) the row weights; writes loss_out (m,) ← w·L and, when g is
            given, g (m, V) ← d(w·L)/dzs. g may be zs itself (in place) when in_place is True;
            zs may be overwritten when g is zs or None (the loop has no further use for it).
        in_place            whether g may be zs (else the loop gives g a buffer of its own)"""
    buffers = 1

    def __init__(self, ht, wt, bt, *, vocab, t_scale, t_cap, mode, swap, mix, temperature, taid,
                 backend):
        self.teacher = (ht, wt, bt, vocab, t_scale, t_cap)
        self.args = (mode, swap, mix, temperature, taid)
        self.backend = backend

    in_place = True

    def select(self, pick):
        ht, wt, bt, vocab, t_scale, t_cap = self.teacher
        self.side = Side(pick(ht), wt, bt, vocab, t_scale, t_cap)
        return self

    def __call__(self, zs, rows, w, loss_out, g, bufs):
        zt = self.side.logits_into(bufs[0][:zs.shape[0]], rows)
        rows_into(self.backend, zs, zt, w, *self.args, loss_out, g)


class FullRows:
    """The chunk loop's own row statistics (the cross-entropy's log-sum-exp and label logit,
    the entropy) when a chunk's columns are the whole vocabulary: this device's. The
    vocabulary-parallel loop brings ShardRows instead (ops/vocab_parallel.py: the same
    statistics summed over the ranks' shards)."""

    def select(self, pick):
        return self

    def budget_width(self, vocab):
        """The width default_chunk budgets for (the same chunks on every rank under TP)."""
        return vocab

    def check_labels(self, labels, vocab):
        if labels is not None and labels.numel():
            lo, hi = (int(x) for x in torch.aminmax(labels))
            if lo < 0 or hi >= vocab:
                raise ValueError(f"labels of kept rows must be in [0, vocab_size={vocab}) for "
                                 f"the cross-entropy, got values in [{lo}, {hi}]")

    def student_terms(self, zs, rows, labels, temperature, scratch, *, cross_entropy, entropy):
        """(entropy summed over the chunk's rows or 0, lse (m,) of zs, zs at the labels (m,)),
        the last two None unless cross_entropy."""
        ent = _entropy_sum(zs, temperature, scratch) if entropy else 0.0
        if not cross_entropy:
            return ent, None, None
        return ent, _lse(zs, scratch), zs.gather(1, labels[:, None]).squeeze(1)

    def onehot(self, labels):
        """(the labels' columns in this chunk, which rows own theirs: None = every row)."""
        return labels, None

    def hidden_grad_dtype(self, dtype):
        return grad_dtype(dtype)

    def reduce_hidden_grad(self, dh):
        """dh (kept rows, H) of this chunk loop's columns → of every column (here: as is)."""


def _run(hs, ws, bs, step, row_weight, ce_weight, labels, *, vocab, temperature, soft, hard,
         s_scale, s_cap, chunk, grad_hidden, grad_weight, grad_bias, entropy, weight_grad_fp32,
         vocab_rows=None):
    """The chunk loop (see the module comment) around a row step (DivergenceStep's comment);
    chunk 0: default_chunk; vocab_rows: the row statistics (FullRows by default). Returns the
    per-row weighted loss of the step and cross-entropy (N,) float32, the entropy sum, and dh,
    dWs, dbs (None where not asked)."""
    vocab_rows = FullRows() if vocab_rows is None else vocab_rows
    n, device = hs.shape[0], hs.device
    div_rows = torch.zeros(n, dtype=torch.float32, device=device)
    ce_rows = torch.zeros(n, dtype=torch.float32, device=device)
    entropy_sum = torch.zeros((), dtype=torch.float64, device=device)
    any_grad = grad_hidden or grad_weight or grad_bias
    acc = weight_grad_dtype(ws.dtype, weight_grad_fp32)
    dh = dw = db = None
    if grad_weight:  # rows < vocab are written by the first chunk's matmul; the others are 0
        dw = ws.new_empty(ws.shape, dtype=acc)
        dw[vocab:].zero_()
    if grad_bias:
        db = ws.new_zeros(ws.shape[0], dtype=acc)
    vocab_rows.check_labels(labels, vocab)

    # Kept rows only: dropped rows are never read (nor multiplied).
    kept = (row_weight != 0) | (ce_weight != 0)
    idx = None if bool(kept.all()) else kept.nonzero().squeeze(1)
    if grad_hidden:  # every kept row is written; dropped ones are 0
        dh_dtype = vocab_rows.hidden_grad_dtype(hs.dtype)
        dh = hs.new_empty(hs.shape, dtype=dh_dtype) if idx is None \
            else hs.new_zeros(hs.shape, dtype=dh_dtype)
    pick = (lambda x: x) if idx is None else (lambda x: x.index_select(0, idx))
    k = n if idx is None else idx.numel()
    if k == 0:
        if dw is not None:
            dw.zero_()
        return div_rows, ce_rows, entropy_sum, dh, dw, db
    s_side = Side(pick(hs), ws, bs, vocab, s_scale, s_cap)
    step, vocab_rows = step.select(pick), vocab_rows.select(pick)
    w_k, cew_k = pick(row_weight).float().contiguous(), pick(ce_weight).float()
    lab_k = None if labels is None else pick(labels)
    use_ce = lab_k is not None and (hard != 0.0 or entropy)
    ce_grad = lab_k is not None and hard != 0.0 and any_grad
    separate = any_grad and (ce_grad or bool(s_cap) or not step.in_place)  # g ≠ zs
    div_k = torch.empty(k, dtype=torch.float32, device=device)
    ce_k = torch.zeros(k, dtype=torch.float32, device=device)
    dh_k = None
    if grad_hidden:
        dh_k = dh if idx is None else torch.empty((k, hs.shape[1]), dtype=dh.dtype, device=device)
    dw_v = None if dw is None else dw[:vocab]
    db_v = None if db is None else db[:vocab]

    # The (chunk, V) float32 buffers: the student's logits (then, in place, their gradient),
    # the step's own (the teacher's logits), the gradient's where the logits are still needed
    # after the step, and a scratch for the cross-entropy's and the entropy's exponentials.
    scratch = use_ce or entropy
    n_bufs = 1 + step.buffers + separate + scratch
    chunk = min(chunk or default_chunk(k, vocab_rows.budget_width(vocab), n_bufs, device), k)
    bufs = [torch.empty((chunk, vocab), dtype=torch.float32, device=device)
            for _ in range(n_bufs)]
    zs_buf, step_bufs = bufs[0], bufs[1:1 + step.buffers]
    g_buf = bufs[1 + step.buffers] if separate else None
    sc_buf = bufs[-1] if scratch else None
    for a in range(0, k, chunk):
        rows = slice(a, min(a + chunk, k))
        m = rows.stop - a
        zs = s_side.logits_into(zs_buf[:m], rows)
        lse = None
        if entropy or use_ce:
            ent, lse, z_label = vocab_rows.student_terms(
                zs, rows, None if lab_k is None else lab_k[rows], temperature, sc_buf[:m],
                cross_entropy=use_ce, entropy=entropy)
            entropy_sum += ent
            if use_ce:
                ce_k[rows] = (lse - z_label) * cew_k[rows]
        g = None
        if any_grad:
            g = g_buf[:m] if separate else zs
        step(zs, rows, w_k[rows], div_k[rows], g, step_bufs)
        if not any_grad:
            continue
        _epilogue(g, zs, lse, None if lab_k is None else vocab_rows.onehot(lab_k[rows]),
                  cew_k[rows], None if sc_buf is None else sc_buf[:m], soft=soft,
                  hard=hard if ce_grad else 0.0, s_scale=s_scale, s_cap=s_cap)
        _backward_matmuls(g, s_side, rows, dh_k, dw_v, db_v, first=a == 0)

    if dh_k is not None:
        vocab_rows.reduce_hidden_grad(dh_k)
    div_rows = div_k if idx is None else div_rows.index_copy_(0, idx, div_k)
    ce_rows = ce_k if idx is None else ce_rows.index_copy_(0, idx, ce_k)
    if dh is not None and idx is not None:
        dh.index_copy_(0, idx, dh_k)
    return div_rows, ce_rows, entropy_sum, dh, dw, db


def _finite_max(zs):
    m = zs.amax(1, keepdim=True)
    return torch.where(torch.isfinite(m), m, 0.0)  # all −inf, NaN or +inf rows show in the sums


def _lse(zs, scratch):
    """Row log-sum-exp of zs; scratch (zs's shape) is the only temporary."""
    m = _finite_max(zs)
    torch.sub(zs, m, out=scratch).exp_()
    return scratch.sum(1).log_().add_(m.squeeze(1))


def _entropy_sum(zs, temperature, scratch, rows_per_step=16):
    """Σ over the chunk's rows of the entropy of softmax(zs/T) (logging only):
    log Z − Σ e^a·a / Z with a = (zs − max)/T in scratch, then a few rows at a time."""
    a = torch.sub(zs, _finite_max(zs), out=scratch).div_(temperature)
    total = torch.zeros((), dtype=torch.float64, device=zs.device)
    for r in range(0, a.shape[0], rows_per_step):
        blk = a[r:r + rows_per_step]
        e = blk.exp()
        z = e.sum(1)
        total += (z.log() - torch.where(e > 0, e * blk, 0.0).sum(1) / z).double().sum()
    return total


def _epilogue(g, zs, lse, onehot, ce_w, scratch, *, soft, hard, s_scale, s_cap):
    """g (the divergence rows' dL/dzs) → dL/d(hs·Wsᵀ + bs), in place (see the module comment).
    zs holds the capped logits unless g overwrote them (then there is no CE and no cap);
    onehot: the labels' columns and which rows own theirs (FullRows.onehot)."""
    if soft == 0.0:
        g.zero_()  # not 0·G: G may be inf where the divergence is (rkl with −inf teacher logits)
    elif soft != 1.0:
        g.mul_(soft)
    if hard != 0.0:
        w = (ce_w * hard)[:, None]
        g.addcmul_(torch.sub(zs, lse[:, None], out=scratch).exp_(), w)  # + w·softmax(zs)
        cols, owned = onehot
        if g.shape[1]:  # (a vocabulary shard may have no column below vocab_size)
            g.scatter_add_(1, cols[:, None], -w if owned is None else -w * owned[:, None])
    if s_cap:
        g.mul_(zs.div_(s_cap).square_().neg_().add_(1.0))  # 1 − tanh², zs no longer needed
    if s_scale != 1.0:
        g.mul_(s_scale)


def _backward_matmuls(g, side, rows, dh, dw, db, first):
    """dh[rows] = g·W, dW += gᵀ·h (dW = gᵀ·h for the first chunk), db += Σ g, g float32. bf16
    on CUDA (side.native16): g rounded once to bf16, products accumulated in fp32 (dW in fp32
    across chunks unless weight_grad_fp32=False). Otherwise fp32 products (16-bit weights:
    their fp32 copy); a bf16 accumulator (weight_grad_fp32=False) adds bf16 products."""
    if db is not None:
        db.add_(g.sum(0))
    if side.native16:
        g, w, h = g.to(side.w.dtype), side.w, side.h[rows]
    else:
        w, h = side.mm_w, side.hidden(rows)
    if dh is not None:
        if dh.dtype == g.dtype:
            torch.mm(g, w, out=dh[rows])
        elif dh.dtype == torch.float32:
            torch.mm(g, w, out_dtype=torch.float32, out=dh[rows])
        else:
            dh[rows] = g @ w  # fp32 products, rounded once to the hidden states' bf16
    if dw is not None:
        if dw.dtype != g.dtype and dw.dtype != torch.float32:  # bf16 accumulator, fp32 g
            g, h = g.to(dw.dtype), side.h[rows]
        if dw.dtype == g.dtype:
            torch.mm(g.t(), h, out=dw) if first else dw.addmm_(g.t(), h)
        elif first:  # CUDA bf16 products accumulated in fp32
            torch.mm(g.t(), h, out_dtype=torch.float32, out=dw)
        else:
            torch.addmm(dw, g.t(), h, out_dtype=torch.float32, out=dw)


# --------------------------------------------------------------------------------- the ops
@torch.library.custom_op("kdkernels::fused_linear_divergence_fwd", mutates_args=(),
                         device_types=None)
def fused_linear_divergence_fwd(
        hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor, bt: Optional[Tensor],
        row_weight: Tensor, ce_weight: Tensor, labels: Optional[Tensor], vocab: int, mode: int,
        swap: bool, mix: float, temperature: float, taid: float, soft: float, hard: float,
        s_scale: float, t_scale: float, s_cap: float, t_cap: float, chunk: int, backend: str,
        reduce: bool, grad_hidden: bool, grad_weight: bool, grad_bias: bool, entropy: bool,
        weight_grad_fp32: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    step = DivergenceStep(ht, wt, bt, vocab=vocab, t_scale=t_scale, t_cap=t_cap, mode=mode,
                          swap=swap, mix=mix, temperature=temperature, taid=taid, backend=backend)
    return forward_outputs(
        hs, ws, bs, step, row_weight, ce_weight, labels, reduce=reduce, vocab=vocab,
        temperature=temperature, soft=soft, hard=hard, s_scale=s_scale, s_cap=s_cap, chunk=chunk,
        grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias, entropy=entropy,
        weight_grad_fp32=weight_grad_fp32)


@torch.library.custom_op("kdkernels::fused_linear_divergence_bwd", mutates_args=(),
                         device_types=None)
def fused_linear_divergence_bwd(
        grad_rows: Tensor, hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor,
        bt: Optional[Tensor], row_weight: Tensor, ce_weight: Tensor, labels: Optional[Tensor],
        vocab: int, mode: int, swap: bool, mix: float, temperature: float, taid: float,
        soft: float, hard: float, s_scale: float, t_scale: float, s_cap: float, t_cap: float,
        chunk: int, backend: str, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
        weight_grad_fp32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of Σ_i grad_rows_i·loss_i (reduction='none'): the chunk loop again, with
    row weights w_i·g_i, in the inputs' dtypes."""
    step = DivergenceStep(ht, wt, bt, vocab=vocab, t_scale=t_scale, t_cap=t_cap, mode=mode,
                          swap=swap, mix=mix, temperature=temperature, taid=taid, backend=backend)
    return backward_outputs(
        grad_rows, hs, ws, bs, step, row_weight, ce_weight, labels, vocab=vocab,
        temperature=temperature, soft=soft, hard=hard, s_scale=s_scale, s_cap=s_cap, chunk=chunk,
        grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias,
        weight_grad_fp32=weight_grad_fp32)


def forward_outputs(hs, ws, bs, step, row_weight, ce_weight, labels, *, reduce, grad_hidden,
                    grad_weight, grad_bias, soft, hard, **loop):
    """The forward op's outputs for a row step (also ops/sparse.py's): loss, divergence and
    cross-entropy parts, entropy, and (reduce) dh, dWs, dbs or their placeholders."""
    div, ce, ent, dh, dw, db = run(
        hs, ws, bs, step, row_weight, ce_weight, labels, soft=soft, hard=hard,
        grad_hidden=grad_hidden and reduce, grad_weight=grad_weight and reduce,
        grad_bias=grad_bias and reduce, **loop)
    if reduce:
        div, ce = div.double().sum(), ce.double().sum()
    loss = combine(soft, div, hard, ce).float()
    return (loss, div.float(), ce.float(), ent.float()) + _or_placeholders(hs, dh, dw, db)


def backward_outputs(grad_rows, hs, ws, bs, step, row_weight, ce_weight, labels, **loop):
    """The backward op's outputs (reduction='none'): the chunk loop again with row weights
    w_i·g_i, gradients in the inputs' dtypes."""
    g = grad_rows.float()  # (a dropped row stays dropped, whatever its upstream gradient)
    _, _, _, dh, dw, db = run(
        hs, ws, bs, step, torch.where(row_weight != 0, row_weight * g, 0.0),
        torch.where(ce_weight != 0, ce_weight * g, 0.0), labels, entropy=False, **loop)
    return _or_placeholders(hs, *(None if g is None else g.to(x.dtype)
                                  for g, x in ((dh, hs), (dw, ws), (db, ws))))


def combine(soft, div, hard, ce):
    """soft·div + hard·ce, a term with weight 0 left out (not 0·inf = NaN); the reference's
    too (kdkernels/fused_linear.py)."""
    loss = torch.zeros_like(div)
    if soft != 0.0:
        loss = loss + soft * div
    if hard != 0.0:
        loss = loss + hard * ce
    return loss


def _or_placeholders(like, *grads):
    """The gradients, with a (0,) placeholder of its own (outputs may not alias) for each
    gradient not asked for."""
    return tuple(like.new_empty((0,)) if g is None else g for g in grads)


def fake_forward_outputs(hs, ws, *, reduce, grad_hidden, grad_weight, grad_bias,
                         weight_grad_fp32):
    """Shapes and dtypes of forward_outputs (the fake kernels of the ops built on the loop)."""
    shape = () if reduce else (hs.shape[0],)
    f32 = dict(dtype=torch.float32)
    acc = weight_grad_dtype(ws.dtype, weight_grad_fp32)
    dh = hs.new_empty(hs.shape if grad_hidden and reduce else (0,), dtype=grad_dtype(hs.dtype)
                      if grad_hidden and reduce else hs.dtype)
    dw = hs.new_empty(ws.shape if grad_weight and reduce else (0,),
                      dtype=acc if grad_weight and reduce else hs.dtype)
    db = hs.new_empty((ws.shape[0],) if grad_bias and reduce else (0,),
                      dtype=acc if grad_bias and reduce else hs.dtype)
    return (hs.new_empty(shape, **f32), hs.new_empty(shape, **f32), hs.new_empty(shape, **f32),
            hs.new_empty((), **f32), dh, dw, db)


def fake_backward_outputs(hs, ws, *, grad_hidden, grad_weight, grad_bias):
    """Shapes and dtypes of backward_outputs."""
    return (hs.new_empty(hs.shape if grad_hidden else (0,)),
            hs.new_empty(ws.shape if grad_weight else (0,), dtype=ws.dtype),
            hs.new_empty((ws.shape[0],) if grad_bias else (0,), dtype=ws.dtype))


@fused_linear_divergence_fwd.register_fake
def _fake_fwd(*args):
    kw = dict(zip(SCHEMA_ARGS, args))
    return fake_forward_outputs(kw["hs"], kw["ws"], **{name: kw[name] for name in (
        "reduce", "grad_hidden", "grad_weight", "grad_bias", "weight_grad_fp32")})


@fused_linear_divergence_bwd.register_fake
def _fake_bwd(grad_rows, *args):
    kw = dict(zip(SCHEMA_ARGS, args))
    return fake_backward_outputs(kw["hs"], kw["ws"], grad_hidden=kw["grad_hidden"],
                                 grad_weight=kw["grad_weight"], grad_bias=kw["grad_bias"])


def register_autograd(fwd, bwd, schema_args, n_tensors):
    """Autograd of a forward/backward op pair built on the chunk loop: its schema is
    schema_args, the first n_tensors of them tensors (hs, ws, bs first), the backward op's
    (grad_rows, those tensors, the constants but reduce and entropy). reduce: the forward's
    gradients handed over and scaled; else the backward op reruns the loop."""
    constants = [name for name in schema_args[n_tensors:] if name not in ("reduce", "entropy")]

    def setup_context(ctx, inputs, output):
        kw = dict(zip(schema_args, inputs))
        ctx.reduce = kw["reduce"]
        ctx.dtypes = (kw["hs"].dtype, kw["ws"].dtype)
        if ctx.reduce:
            keep_for_hand_over(ctx, *output[4:])
        else:
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(*inputs[:n_tensors])
            ctx.scalars = {name: kw[name] for name in constants}

    def backward(ctx, grad_loss, *_unused):
        if ctx.reduce:
            dh, dw, db = take_handed_over(ctx)
            grads = (scale(dh, grad_loss, True, ctx.dtypes[0]),
                     scale(dw, grad_loss, True, ctx.dtypes[1]),
                     scale(db, grad_loss, True, ctx.dtypes[1]))
        elif grad_loss is None:
            grads = (None, None, None)
        else:
            out = getattr(torch.ops.kdkernels, bwd)(grad_loss, *ctx.saved_tensors, **ctx.scalars)
            grads = tuple(None if g.dim() == 1 and g.shape[0] == 0 else g for g in out)
        return grads + (None,) * (len(schema_args) - 3)  # hs, ws, bs, then constants

    torch.library.register_autograd(f"kdkernels::{fwd}", first_order(fwd, backward),
                                    setup_context=setup_context)


register_autograd("fused_linear_divergence_fwd", "fused_linear_divergence_bwd", SCHEMA_ARGS, 9)
