"""Vocabulary-parallel ops: each rank holds a contiguous vocabulary shard of the logits or of
the lm_head rows (kdkernels/_distributed.py: the layout), and only per-row statistics cross
ranks, by torch.distributed all-reduces on the caller's group, in the forward.

The divergence kinds (kdkernels/reference/divergence.py). With global row maxima M and
log-normalizers L = log Σ_all e^((x − M)/T) of both sides, a rank's log-probabilities are
lq = (s − M_s)/T − L_s and lp = (t − M_t)/T − L_t on its own columns, and every kind is a sum of
per-element terms of (lp, lq) (reference.rows_from_log_probs), so the row's divergence is the
sum of the ranks' partial sums D_r. Its gradient on this rank's columns is log_softmax's
backward with the row sums taken over every rank:
    dD/ds_j = (G^q_j − q_j·Σ_all G^q)/T,    dD/dt_j = λ·(G^p_j − p_j·Σ_all G^p)/T
with G = ∂D/∂(log-probabilities) per element (autograd of the reference's formulas on this
rank's columns) and λ = 1 without TAID (its target λ·t + (1−λ)·sg(s)). rows_into computes it
with three all-reduces over the rows it is given, K of them:
    1. MAX of (K, 2) in the compute dtype: the row maxima of s and of the target
    2. SUM of (K, 3) float64: both Σ e^((x − M)/T), and the count of NaN / +inf
    3. SUM of (K, 3) float64: the partial divergence, Σ G^q and Σ G^p
56 bytes per row for fp32/bf16/fp16 logits (64 for float64), whatever the vocabulary; row
sums in float64 (they decide the gradient where G − p·ΣG cancels). NaN rule across ranks: a
NaN or +inf anywhere in a row, or no distribution, makes the row and its gradient NaN on
every rank.

Bytes each rank hands to the collectives per call (K kept rows, H hidden size, k top-k):
    divergence                       56·K (one call of rows_into on every kept row)
    fused_linear_divergence          8 (the shard widths) + 56·K in three all-reduces per
                                     chunk of rows; + 44·K in two per chunk with labels
                                     (cross-entropy) or return_components (entropy); + 4·K·H,
                                     the hidden-state gradient summed in float32 (in the forward
                                     with a reduced loss, else in backward)
    sparse_divergence (and fused)    8 + (4 if T ≠ 1) + 4·(K_t + 1) + 16 per row, three
                                     all-reduces per chunk (SparseShardStep), + as above
    topk_logprobs (and fused)        8 + (4 + 16 + 16·k) per row: two all-reduces and one
                                     all-gather of every rank's k candidates per chunk
Chunks are the same on every rank (budgeted for the widest shard); the total is O(N) (O(N·k)
for top-k) whatever the chunking. Backward communicates nothing but the fused ops' hidden-state
gradient: the forward computes the gradients and hands them over (_hand_over.py), or, with
reduction='none', records every row statistic (RowStore) for the backward's rerun.

rows_into runs on the divergence row kernels split at those all-reduces (backend 'cpu': the
C++ kernel's passes, kdkernels::divergence_shard_rows; 'triton': its sweeps,
_divergence_shard_kernel; both in three phases over stats (N, 7) float64), or in a PyTorch-ops
form (backend 'reference': chunks of rows, autograd of the reference's formulas; float64).
The kernels use the closed forms U_P, U_Q of G (kdkernels/triton_kernels/divergence.py's
header) and their row sums in the third all-reduce, and carry NaN / +inf through the
normalizer sums themselves (the count column is 0): the same collectives and bytes.
The fused ops run it per chunk of logits inside the chunk loop of ops/fused_linear.py; the
sparse and top-k steps are ATen ops, as those families are on one device. Under
torch.compile the divergence and the reduced fused divergence on the kernels are opaque ops
(kdkernels::vocab_parallel_divergence_fwd, kdkernels::vocab_parallel_fused_linear_divergence_fwd,
the group passed by name: fullgraph=True traces them); the others (the sparse and top-k ops,
reduction='none' of the fused one, the PyTorch-ops form) run eagerly, one graph break each."""
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .. import _distributed as D
from .._plumbing import check_vocab_size, grad_dtype
from . import divergence as div_ops
from ..reference import divergence as ref
from ._hand_over import keep_for_hand_over, scale, take_handed_over
from ._register import register_fake_and_autograd
from .fused_linear import (FullRows, Side, backward_outputs, fake_forward_outputs,
                           forward_outputs, run)
from .sparse import (check_teacher, entry_math, logits_chunk, logits_loop,
                     topk_lower_index, topk_outputs)

# The vocabulary-parallel ops run eagerly under torch.compile: one graph break at each
# (Dynamo does not trace into them; their collectives and data-dependent row selection run as
# in eager mode), the rest of the caller's graph compiled around them.
_eager = torch.compiler.disable

# Elements per chunk of rows and columns held at once (per intermediate; a few are alive).
CHUNK_ELEMENTS = 1 << 20


def divergence(student, teacher, weight, *, group, kind, temperature, beta, skew, taid_t,
               reduce, backend="reference"):
    """Σ_i w_i·D_i (reduce) or w_i·D_i per row, D the divergence of the full-vocabulary rows
    whose shards student / teacher (N, V_r) this rank holds; gradients to the shards. weight
    (N,) as from _plumbing.row_weights (0: a dropped row). The kernels (backend 'cpu',
    'triton') run as one opaque op, kdkernels::vocab_parallel_divergence_fwd (torch.compile
    traces it as one node; its collectives run inside); the PyTorch-ops form ('reference',
    autograd inside) as an eager autograd function. Either way the gradients are computed in
    the forward and handed over."""
    on = torch.is_grad_enabled()
    args = (student, teacher, weight, group.group_name, kind, temperature, beta, skew, taid_t,
            reduce, on and student.requires_grad, on and teacher.requires_grad, backend)
    if backend == "reference":
        return _reference_divergence(*args)
    return torch.ops.kdkernels.vocab_parallel_divergence_fwd(*args)[0]


@_eager
def _reference_divergence(*args):
    return _ReferenceDivergence.apply(*args)


class _ReferenceDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        loss, gs, gt = _divergence_outputs(*args)
        _setup_divergence(ctx, args, (loss, gs, gt))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward_divergence(ctx, grad_loss, None, None)


@torch.library.custom_op("kdkernels::vocab_parallel_divergence_fwd", mutates_args=(),
                         device_types=None)
def vocab_parallel_divergence_fwd(
        student: Tensor, teacher: Tensor, weight: Tensor, group_name: str, kind: str,
        temperature: float, beta: float, skew: float, taid_t: Optional[float], reduce: bool,
        grad_student: bool, grad_teacher: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, grad_student, grad_teacher) of divergence above on the process group named
    group_name (gradients: (0,) placeholders where not asked)."""
    return _divergence_outputs(student, teacher, weight, group_name, kind, temperature, beta,
                               skew, taid_t, reduce, grad_student, grad_teacher, backend)


def _divergence_outputs(student, teacher, weight, group_name, kind, temperature, beta, skew,
                        taid_t, reduce, grad_student, grad_teacher, backend):
    group = D.resolve_group(group_name)
    n, width = student.shape
    kept = weight != 0
    D.all_agree(group, "the rows and options (N, kept rows, kind, temperature, beta, skew, "
                "taid_t, reduce, backend)", lambda: (
                    n, int(kept.sum()), ref.KINDS.index(ref.canonical_kind(kind, beta, skew)),
                    temperature, beta, skew, -1.0 if taid_t is None else taid_t, reduce,
                    BACKENDS.index(backend)), student.device)
    options = dict(group=group, kind=kind, temperature=temperature, beta=beta, skew=skew,
                   taid_t=taid_t)
    need = (grad_student, grad_teacher)
    if backend != "reference":  # every row at once, gradients straight into their buffers
        loss_rows = torch.empty(n, dtype=torch.float32, device=student.device)
        g = [x.new_empty(x.shape, dtype=grad_dtype(x.dtype)) if want else None
             for x, want in zip((student, teacher), need)]
        rows_into(student, teacher, None, weight, loss_out=loss_rows, g_s=g[0], g_t=g[1],
                  backend=backend, **options)
        loss = loss_rows.double().sum().float() if reduce else loss_rows
        grads = g
    else:  # the kept rows, in the compute dtype
        rows = None if bool(kept.all()) else kept.nonzero().squeeze(1)
        k = n if rows is None else rows.numel()
        cdtype = compute_dtype(student.dtype, teacher.dtype)
        loss_rows = torch.empty(k, dtype=cdtype, device=student.device)
        g = [torch.empty(k, width, dtype=cdtype, device=x.device) if want else None
             for x, want in zip((student, teacher), need)]
        w = weight if rows is None else weight[rows]
        rows_into(student.detach(), teacher.detach(), rows, w.to(cdtype), loss_out=loss_rows,
                  g_s=g[0], g_t=g[1], **options)
        out_dtype = torch.float64 if cdtype == torch.float64 else torch.float32
        if reduce:
            loss = loss_rows.sum().to(out_dtype)
        elif rows is None:
            loss = loss_rows.to(out_dtype)
        else:
            loss = loss_rows.new_zeros(n, dtype=out_dtype).index_copy_(
                0, rows, loss_rows.to(out_dtype))
        grads = []
        for x, gx in zip((student, teacher), g):
            if gx is None:
                grads.append(None)
            elif rows is None:
                grads.append(gx.to(grad_dtype(x.dtype)))
            else:
                grads.append(x.new_zeros(x.shape, dtype=grad_dtype(x.dtype)).index_copy_(
                    0, rows, gx.to(grad_dtype(x.dtype))))
    return (loss,) + tuple(x.new_empty((0,), dtype=grad_dtype(x.dtype)) if gx is None else gx
                           for x, gx in zip((student, teacher), grads))


@vocab_parallel_divergence_fwd.register_fake
def _fake_divergence(student, teacher, weight, group_name, kind, temperature, beta, skew,
                     taid_t, reduce, grad_student, grad_teacher, backend):
    out = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    return (weight.new_empty(() if reduce else (student.shape[0],), dtype=out),
            student.new_empty(student.shape if grad_student else (0,),
                              dtype=grad_dtype(student.dtype)),
            teacher.new_empty(teacher.shape if grad_teacher else (0,),
                              dtype=grad_dtype(teacher.dtype)))


def _setup_divergence(ctx, inputs, output):
    ctx.reduce, ctx.dtypes = inputs[9], (inputs[0].dtype, inputs[1].dtype)
    keep_for_hand_over(ctx, output[1], output[2])


def _backward_divergence(ctx, grad_loss, _gs, _gt):
    gs, gt = take_handed_over(ctx)
    return (scale(gs, grad_loss, ctx.reduce, ctx.dtypes[0]),
            scale(gt, grad_loss, ctx.reduce, ctx.dtypes[1])) + (None,) * 11


register_fake_and_autograd("vocab_parallel_divergence_fwd", None, _backward_divergence,
                           _setup_divergence)


def compute_dtype(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _chunks(n, width):
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


# Columns of the per-row statistics rows_into computes (and can be given back, to skip its
# all-reduces): the shifts (row maxima) and log-normalizers of the student and the target,
# whether the row has a distribution, and Σ_all G^q, Σ_all G^p.
STATS = 7


BACKENDS = ("reference", "cpu", "triton")  # what rows_into runs on (row_backend)


def row_backend(backend, device, dtypes):
    """The kernels rows_into runs for a call's `backend` on `device`: 'cpu' (the C++ row
    kernel's passes split at the all-reduces), 'triton' (the Triton sweeps, split likewise;
    CUDA tensors, or CPU ones interpreted) or 'reference' (PyTorch ops: float64, and where no
    kernel is built). The CUDA C++ kernels have no split form: CUDA tensors take Triton's."""
    resolved = _backend.resolve_backend(backend, device, dtypes)
    if resolved == "cuda":
        resolved = "triton" if _backend.triton_importable() else "reference"
    return resolved


def rows_into(student, teacher, rows, w, *, group, kind, temperature, beta, skew, taid_t,
              loss_out, g_s=None, g_t=None, stats=None, backend="reference"):
    """The vocabulary-parallel divergence rows (the module comment) of this rank's shards
    student, teacher (n, V_r). backend 'cpu' / 'triton' (row_backend): the split kernels, on
    every row (rows None; a row of weight 0 is dropped: never read, loss and gradient 0, not
    in the all-reduces), inputs in float32/bf16/fp16, outputs as below with k = n. 'reference':
    any float dtype, at rows (k,) int64 (None: all n):
    loss_out (k,) ← w·D, and g_s / g_t (k, V_r) ← d(w·D)/d(shard) where given, in the compute
    dtype (loss_out's: float32, or float64 for float64 inputs); w (k,) the row weights.
    Returns the rows' statistics (k, STATS) float64. Given `stats` (what an earlier call on the
    same rows returned), no collective runs and loss_out is not written: the gradients alone
    (a backward that reruns the rows). The launcher of every vocabulary-parallel op on the
    divergence kinds (the fused-linear step below runs it on each chunk of logits)."""
    if backend != "reference":
        assert rows is None, "the kernels take every row (weight 0: dropped)"
        return _rows_kernels(backend, student, teacher, w, group=group, kind=kind,
                             temperature=temperature, beta=beta, skew=skew, taid_t=taid_t,
                             loss_out=loss_out, g_s=g_s, g_t=g_t, stats=stats)
    n, width = student.shape
    k = n if rows is None else rows.numel()
    cdtype = loss_out.dtype
    device = student.device
    kind = ref.canonical_kind(kind, beta, skew)
    chunks = _chunks(k, width)

    def load(i, j):  # the rows i:j of both shards, in the compute dtype
        s = (student[i:j] if rows is None else student[rows[i:j]]).to(cdtype)
        t = (teacher[i:j] if rows is None else teacher[rows[i:j]]).to(cdtype)
        return s, t if taid_t is None else ref.taid_target(s, t, taid_t)

    if stats is None:
        # 1. Row maxima; NaN and +inf entries are counted apart (they make the row NaN).
        maxima = torch.empty(k, 2, dtype=cdtype, device=device)
        sums = torch.zeros(k, 3, dtype=torch.float64, device=device)  # Σe of s, t; bad
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
                sums[i:j, side] = torch.where(torch.isnan(a), 0.0, a).exp().sum(
                    -1, dtype=torch.float64)
        D.all_reduce_(sums, "sum", group)
        log_z = sums[:, :2].log()
        ok = (sums[:, 2] == 0) & torch.isfinite(log_z).all(-1)
        log_z = torch.where(ok[:, None], log_z, 0.0).to(cdtype)
        partial = torch.zeros(k, 3, dtype=torch.float64, device=device)
    else:
        shift, log_z = stats[:, 0:2].to(cdtype), stats[:, 2:4].to(cdtype)
        ok, partial = stats[:, 4] != 0, stats[:, 4:7].clone()  # (partial[:, 0] unused)
    need = (g_s is not None, g_t is not None)

    def log_probs(i, j):
        s, t = load(i, j)
        live = ok[i:j, None]
        lq = (torch.where(live, s, 0.0) - shift[i:j, 0, None]) / temperature - log_z[i:j, :1]
        lp = (torch.where(live, t, 0.0) - shift[i:j, 1, None]) / temperature - log_z[i:j, 1:]
        return lq, lp

    # 3. Partial divergences and, per element, G = ∂D/∂(log-probabilities) with their row sums.
    if stats is None or any(need):
        for i, j in chunks:
            with torch.enable_grad():
                lq, lp = (x.requires_grad_(True) for x in log_probs(i, j))
                d = ref.rows_from_log_probs(lp, lq, kind, beta, skew)
                g_q, g_p = torch.autograd.grad(d.sum(), (lq, lp))
            if stats is None:
                partial[i:j, 0] = d.detach()
                partial[i:j, 1] = g_q.sum(-1, dtype=torch.float64)
                partial[i:j, 2] = g_p.sum(-1, dtype=torch.float64)
            for gx, grad in ((g_s, g_q), (g_t, g_p)):
                if gx is not None:
                    gx[i:j] = grad
    if stats is None:
        D.all_reduce_(partial, "sum", group)
        loss_out.copy_(torch.where(ok, partial[:, 0].to(cdtype), float("nan")) * w)
    # 4. The log-softmax backward with the row sums of every rank: (G − prob·ΣG)/T, times λ
    #    for a TAID teacher (∂target/∂t = λ), the row weights, and the NaN rule.
    factor = (1.0 / temperature, (1.0 if taid_t is None else taid_t) / temperature)
    if any(need):
        for i, j in chunks:
            probs = [x.exp() for x in log_probs(i, j)]
            for side, gx in enumerate((g_s, g_t)):
                if gx is not None:
                    total = partial[i:j, 1 + side, None].to(cdtype)
                    gx[i:j] = torch.where(ok[i:j, None], (gx[i:j] - probs[side] * total) *
                                          (w[i:j, None] * factor[side]), float("nan"))
    return torch.cat([shift.double(), log_z.double(), ok[:, None].double(), partial[:, 1:]], 1)


def _rows_kernels(backend, student, teacher, w, *, group, kind, temperature, beta, skew, taid_t,
                  loss_out, g_s, g_t, stats):
    """rows_into on the split kernels (ops/divergence.py shard_rows; csrc/cpu/divergence.h has
    the phases and the stats columns): phase 0, all-reduce MAX of the maxima and SUM of the
    normalizers rescaled to them, phase 1, all-reduce SUM of the loss and U row sums, phase 2.
    The same collectives and bytes as the PyTorch-ops form, on the rows of nonzero weight."""
    n = student.shape[0]
    mode, swap, mix = div_ops.kernel_args(kind, beta, skew)
    taid = 1.0 if taid_t is None else taid_t
    w = w.float().contiguous()
    live = (w != 0).nonzero().squeeze(1)
    everyone = live.numel() == n

    def phase(number, st):
        div_ops.shard_rows(backend, student, teacher, w, mode, swap, mix, temperature, taid,
                           number, st, g_s if number == 2 else None, g_t if number == 2 else None)

    def live_rows(x):
        return x if everyone else x[live]

    if stats is None:
        st = torch.zeros(n, 7, dtype=torch.float64, device=student.device)
        phase(0, st)
        m, z = live_rows(st[:, 0:2]), live_rows(st[:, 2:4])
        maxima = torch.where(torch.isfinite(m), m, float("-inf")).float()
        D.all_reduce_(maxima, "max", group)
        top = maxima.double()
        sums = torch.zeros(m.shape[0], 3, dtype=torch.float64, device=m.device)
        sums[:, :2] = torch.where(m == float("-inf"), 0.0, z * ((m - top) / temperature).exp())
        D.all_reduce_(sums, "sum", group)
        log_z = sums[:, :2].log()
        ok = torch.isfinite(log_z).all(-1)
        front = torch.cat([torch.where(torch.isfinite(top), top, 0.0),
                           torch.where(ok[:, None], log_z, float("nan"))], 1)
        if everyone:
            st[:, 0:4] = front
        else:
            st[live, 0:4] = front
        phase(1, st)
        partial = live_rows(st[:, 4:7]).contiguous()
        D.all_reduce_(partial, "sum", group)
        if everyone:
            st[:, 4:7] = partial
        else:
            st[live, 4:7] = partial
        loss_out.zero_()
        rows_loss = torch.where(ok, partial[:, 0], float("nan")).to(loss_out.dtype) * live_rows(w)
        if everyone:
            loss_out.copy_(rows_loss)
        else:
            loss_out[live] = rows_loss
    else:
        st = stats.clone()
    if g_s is not None or g_t is not None:
        phase(2, st)
    return st


# --------------------------------------------------------------- fused linear + divergence
class RowStore:
    """Per-row statistics (in the rows' original order, N of them) that a vocabulary-parallel
    forward records and the backward that reruns the chunk loop (reduction='none') replays,
    so that backward runs no collective of its own but the hidden-state gradient's."""

    def __init__(self, n, device):
        self.n, self.device, self.tensors, self.replay = n, device, {}, False

    def ids(self, pick):
        """The original rows of a loop's kept rows (pick: the loop's gather of them)."""
        return pick(torch.arange(self.n, device=self.device))

    def get(self, name, ids):
        return self.tensors[name][ids] if self.replay else None

    def put(self, name, ids, value):
        if not self.replay:
            if name not in self.tensors:
                self.tensors[name] = value.new_zeros((self.n,) + tuple(value.shape[1:]))
            self.tensors[name][ids] = value


class ShardRows(FullRows):
    """The chunk loop's row statistics (ops/fused_linear.py FullRows) over a vocabulary split
    across `group`: the student's chunk holds this rank's columns (layout: _distributed.Layout).
    One call of student_terms runs two all-reduces of the chunk's rows: MAX of the row maxima
    (m,) float32, and SUM of (m, 5) float64 (Σ e^(z − M), the label's logit from the rank that
    holds it, NaN / +inf counts, and the entropy's Σ e^a, Σ e^a·a at a = (z − M)/T)."""

    def __init__(self, layout, vocab, group, store):
        self.layout, self.group, self.store = layout, group, store
        self.vocab, self.window = vocab, layout.window(vocab)  # global vocab_size; columns here

    def select(self, pick):
        self.ids = self.store.ids(pick)
        return self

    def budget_width(self, vocab):
        return max(self.layout.widths)

    def check_labels(self, labels, vocab):
        super().check_labels(labels, self.vocab)

    def student_terms(self, zs, rows, labels, temperature, scratch, *, cross_entropy, entropy):
        ids = self.ids[rows]
        saved = self.store.get("ce", ids)
        if saved is not None:  # (a backward rerun: no entropy is asked there)
            return 0.0, saved[:, 0].float(), saved[:, 1].float()
        m, width = zs.shape
        top = zs.amax(1) if width else zs.new_full((m,), float("-inf"))
        top = torch.where(torch.isfinite(top), top, float("-inf"))
        D.all_reduce_(top, "max", self.group)
        shift = torch.where(torch.isfinite(top), top, 0.0)[:, None]
        sums = torch.zeros(m, 5, dtype=torch.float64, device=zs.device)
        sums[:, 2] = (torch.isnan(zs) | (zs == float("inf"))).sum(1)
        if cross_entropy:
            sums[:, 0] = torch.sub(zs, shift, out=scratch).exp_().sum(1, dtype=torch.float64)
            cols, owned = self.onehot(labels)
            if width:
                sums[:, 1] = torch.where(owned, zs.gather(1, cols[:, None]).squeeze(1), 0.0)
        if entropy:
            a = torch.sub(zs, shift, out=scratch).div_(temperature)
            for r in range(0, m, 16):  # a few rows at a time (the chunk loop's _entropy_sum)
                blk = a[r:r + 16]
                e = blk.exp()
                sums[r:r + 16, 3] = e.sum(1, dtype=torch.float64)
                sums[r:r + 16, 4] = torch.where(e > 0, e * blk, 0.0).sum(1, dtype=torch.float64)
        D.all_reduce_(sums, "sum", self.group)
        bad = sums[:, 2] > 0
        ent = 0.0
        if entropy:
            z = sums[:, 3]
            ent = torch.where(bad, float("nan"), z.log() - sums[:, 4] / z).sum()
        if not cross_entropy:
            return ent, None, None
        lse = torch.where(bad, float("nan"), shift.squeeze(1).double() + sums[:, 0].log())
        self.store.put("ce", ids, torch.stack([lse, sums[:, 1]], 1))
        return ent, lse.float(), sums[:, 1].float()

    def onehot(self, labels):
        local = labels - self.layout.offset
        owned = (local >= 0) & (local < self.window)
        return torch.where(owned, local, 0), owned

    def hidden_grad_dtype(self, dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32  # summed, then rounded

    def reduce_hidden_grad(self, dh):
        D.all_reduce_(dh, "sum", self.group)


class DivergenceShardStep:
    """The fused-linear row step (ops/fused_linear.py DivergenceStep's protocol) on this rank's
    vocabulary shard: the teacher's shard of logits, then rows_into on `backend` (three
    all-reduces per chunk, recorded in `store` for a backward rerun). The kernels write the
    gradient in place of the logits; the PyTorch-ops form reads them after writing G."""
    buffers = 1

    def __init__(self, ht, wt, bt, *, vocab, t_scale, t_cap, options, group, store, backend):
        self.teacher = (ht, wt, bt, vocab, t_scale, t_cap)
        self.options, self.group, self.store = options, group, store
        self.backend, self.in_place = backend, backend != "reference"

    def select(self, pick):
        ht, wt, bt, vocab, t_scale, t_cap = self.teacher
        self.side = Side(pick(ht), wt, bt, vocab, t_scale, t_cap)
        self.ids = self.store.ids(pick)
        return self

    def __call__(self, zs, rows, w, loss_out, g, bufs):
        zt = self.side.logits_into(bufs[0][:zs.shape[0]], rows)
        ids = self.ids[rows]
        stats = rows_into(zs, zt, None, w, group=self.group, loss_out=loss_out, g_s=g,
                          stats=self.store.get("div", ids), backend=self.backend,
                          **self.options)
        self.store.put("div", ids, stats)


def fused_linear(hs, ws, bs, step, rows, loop):
    """The chunk loop (ops/fused_linear.py run) with a vocabulary-parallel step and ShardRows,
    as an autograd function of hs, ws, bs: (loss, divergence, cross-entropy, entropy) as
    forward_outputs gives them. loop: run's other arguments (row_weight, ce_weight, labels,
    reduce, and the keywords). reduce: the forward computes the gradients (dh all-reduced
    there) and backward scales them; else backward reruns the loop with the recorded
    statistics (dh all-reduced then)."""
    on = torch.is_grad_enabled()
    need = dict(grad_hidden=on and hs.requires_grad, grad_weight=on and ws.requires_grad,
                grad_bias=on and bs is not None and bs.requires_grad)
    return _FusedLinear.apply(hs, ws, bs, step, rows, need, loop)


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, step, rows, need, loop):
        loop = dict(loop)
        row_weight, ce_weight, labels = (loop.pop(k) for k in ("row_weight", "ce_weight",
                                                                 "labels"))
        out = forward_outputs(hs.detach(), ws.detach(), None if bs is None else bs.detach(), step,
                              row_weight, ce_weight, labels, vocab_rows=rows, **need, **loop)
        loss, div, ce, ent = out[:4]
        ctx.mark_non_differentiable(div, ce, ent)
        ctx.reduce, ctx.dtypes = loop["reduce"], (hs.dtype, ws.dtype)
        if ctx.reduce:
            keep_for_hand_over(ctx, *out[4:])
        else:
            rows.store.replay = True
            ctx.save_for_backward(hs, ws, bs)
            ctx.rerun = (step, rows, row_weight, ce_weight, labels, need,
                         {k: v for k, v in loop.items() if k not in ("reduce", "entropy")})
        return loss, div, ce, ent

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        if ctx.reduce:
            dh, dw, db = take_handed_over(ctx)
            return (scale(dh, grad_loss, True, ctx.dtypes[0]),
                    scale(dw, grad_loss, True, ctx.dtypes[1]),
                    scale(db, grad_loss, True, ctx.dtypes[1])) + (None,) * 4
        hs, ws, bs = ctx.saved_tensors
        step, rows, row_weight, ce_weight, labels, need, loop = ctx.rerun
        grads = backward_outputs(grad_loss, hs.detach(), ws.detach(),
                                 None if bs is None else bs.detach(), step, row_weight,
                                 ce_weight, labels, vocab_rows=rows, **need, **loop)
        return tuple(None if g.dim() == 1 and g.shape[0] == 0 else g for g in grads) + \
            (None,) * 4


def fused_linear_divergence(hs, ws, bs, ht, wt, bt, row_weight, ce_weight, labels, *, group,
                            vocab_size, kind, beta, skew, temperature, taid_t, t_scale, t_cap,
                            backend, reduce, soft, hard, s_scale, s_cap, chunk, entropy,
                            weight_grad_fp32):
    """kdkernels.fused_linear_divergence with vocabulary-sharded lm_heads: ws, bs, wt, bt are
    this rank's rows of the heads (the same columns on both sides), hs, ht (N, H) replicated.
    vocab_size: the global columns that take part (None: all); backend: rows_into's
    (row_backend); the rest: the chunk loop's. Returns (loss, divergence, cross_entropy,
    entropy). A reduced loss on the kernels runs as one opaque op,
    kdkernels::vocab_parallel_fused_linear_divergence_fwd (torch.compile traces it whole), its
    gradients handed over; reduction='none' or the PyTorch-ops form, as an eager autograd
    function (the rerun in backward replays the recorded statistics)."""
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(f"student_weight and teacher_weight must hold the same vocabulary rows "
                         f"on each rank (one shard of the same columns), got {ws.shape[0]} and "
                         f"{wt.shape[0]} rows")
    on = torch.is_grad_enabled()
    args = (hs, ws, bs, ht.detach(), wt.detach(), None if bt is None else bt.detach(),
            row_weight, ce_weight, labels, group.group_name, -1 if vocab_size is None
            else vocab_size, kind, beta, skew, temperature, taid_t, t_scale, t_cap or 0.0,
            backend, soft, hard, s_scale, s_cap or 0.0, chunk, entropy, weight_grad_fp32,
            on and hs.requires_grad, on and ws.requires_grad,
            on and bs is not None and bs.requires_grad)
    if reduce and backend != "reference":
        return torch.ops.kdkernels.vocab_parallel_fused_linear_divergence_fwd(*args)[:4]
    return _fused_eager(reduce, *args)


def _fused_parts(hs, ws, bs, ht, wt, bt, row_weight, ce_weight, labels, group_name, vocab_size,
                 kind, beta, skew, temperature, taid_t, t_scale, t_cap, backend, soft, hard,
                 s_scale, s_cap, chunk, entropy, weight_grad_fp32, grad_hidden, grad_weight,
                 grad_bias, *, reduce):
    """The step, the row statistics and the chunk loop's arguments of one call."""
    group = D.resolve_group(group_name)
    device = hs.device
    lay = D.layout(group, ws.shape[0], device)
    vocab = check_vocab_size(None if vocab_size < 0 else vocab_size, lay.vocab,
                             f"the vocabulary of the shards, {lay.vocab}")
    D.all_agree(group, "the rows and options (N, vocab_size, kind, temperature, beta, skew, "
                "taid_t, reduce, backend, chunk_size)", lambda: (
                    hs.shape[0], vocab, ref.KINDS.index(ref.canonical_kind(kind, beta, skew)),
                    temperature, beta, skew, -1.0 if taid_t is None else taid_t, reduce,
                    BACKENDS.index(backend), chunk), device)
    store = RowStore(hs.shape[0], device)
    rows = ShardRows(lay, vocab, group, store)
    step = DivergenceShardStep(
        ht, wt, bt, vocab=rows.window, t_scale=t_scale, t_cap=t_cap, group=group, store=store,
        backend=backend,
        options=dict(kind=kind, beta=beta, skew=skew, temperature=temperature, taid_t=taid_t))
    loop = dict(row_weight=row_weight, ce_weight=ce_weight, labels=labels, vocab=rows.window,
                temperature=temperature, reduce=reduce, soft=soft, hard=hard, s_scale=s_scale,
                s_cap=s_cap, chunk=chunk, entropy=entropy, weight_grad_fp32=weight_grad_fp32)
    need = dict(grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias)
    return step, rows, need, loop


@_eager
def _fused_eager(reduce, hs, ws, bs, *args):
    step, rows, need, loop = _fused_parts(hs, ws, bs, *args, reduce=reduce)
    return _FusedLinear.apply(hs, ws, bs, step, rows, need, loop)


@torch.library.custom_op("kdkernels::vocab_parallel_fused_linear_divergence_fwd", mutates_args=(),
                         device_types=None)
def vocab_parallel_fused_linear_divergence_fwd(
        hs: Tensor, ws: Tensor, bs: Optional[Tensor], ht: Tensor, wt: Tensor,
        bt: Optional[Tensor], row_weight: Tensor, ce_weight: Tensor, labels: Optional[Tensor],
        group_name: str, vocab_size: int, kind: str, beta: float, skew: float,
        temperature: float, taid_t: Optional[float], t_scale: float, t_cap: float, backend: str,
        soft: float, hard: float, s_scale: float, s_cap: float, chunk: int, entropy: bool,
        weight_grad_fp32: bool, grad_hidden: bool, grad_weight: bool,
        grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A reduced loss: (loss, divergence, cross_entropy, entropy, dh, dWs, dbs) as
    forward_outputs gives them (dh float32: summed over the ranks)."""
    step, rows, need, loop = _fused_parts(
        hs, ws, bs, ht, wt, bt, row_weight, ce_weight, labels, group_name, vocab_size, kind,
        beta, skew, temperature, taid_t, t_scale, t_cap, backend, soft, hard, s_scale, s_cap,
        chunk, entropy, weight_grad_fp32, grad_hidden, grad_weight, grad_bias, reduce=True)
    loop = dict(loop)
    lw, cw, lab = (loop.pop(k) for k in ("row_weight", "ce_weight", "labels"))
    return forward_outputs(hs, ws, bs, step, lw, cw, lab, vocab_rows=rows, **need, **loop)


@vocab_parallel_fused_linear_divergence_fwd.register_fake
def _fake_fused(hs, ws, bs, ht, wt, bt, row_weight, ce_weight, labels, group_name, vocab_size,
                kind, beta, skew, temperature, taid_t, t_scale, t_cap, backend, soft, hard,
                s_scale, s_cap, chunk, entropy, weight_grad_fp32, grad_hidden, grad_weight,
                grad_bias):
    out = list(fake_forward_outputs(hs, ws, reduce=True, grad_hidden=grad_hidden,
                                    grad_weight=grad_weight, grad_bias=grad_bias,
                                    weight_grad_fp32=weight_grad_fp32))
    if grad_hidden:  # (summed over the ranks in float32: ShardRows.hidden_grad_dtype)
        out[4] = hs.new_empty(hs.shape, dtype=torch.float32)
    return tuple(out)


def _setup_fused(ctx, inputs, output):
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    keep_for_hand_over(ctx, *output[4:])


def _backward_fused(ctx, grad_loss, *_unused):
    dh, dw, db = take_handed_over(ctx)
    return (scale(dh, grad_loss, True, ctx.dtypes[0]), scale(dw, grad_loss, True, ctx.dtypes[1]),
            scale(db, grad_loss, True, ctx.dtypes[1])) + (None,) * 26


register_fake_and_autograd("vocab_parallel_fused_linear_divergence_fwd", None, _backward_fused,
                           _setup_fused)


# ----------------------------------------------------------- sparse teachers and top-k
class SparseShardStep:
    """The sparse-teacher row step (ops/sparse.py SparseStep, the same math: entry_math) on this
    rank's vocabulary shard; the teacher's (N, K) entries carry global ids. Per chunk:
        1. all-reduce MAX (m,) float32: the row maxima, the tempering shift (T ≠ 1 only)
        2. all-reduce MAX (m, K + 1) float32: the maximum off the teacher's real entries, and
           x at each entry from the rank that holds its column (−inf elsewhere)
        3. all-reduce SUM (m, 2) float64: Σ e^(x − max) off the real entries, NaN / +inf counts
    then entry_math on the (m, K) entries, the same on every rank, and the gradient on this
    rank's columns. The statistics are recorded in `store` for a backward rerun."""
    buffers = 0
    in_place = True

    def __init__(self, lp, idx, *, layout, group, store, kind, beta, tail, temperature,
                 teacher_temperature):
        self.teacher = (lp, idx)
        self.math = dict(kind=kind, beta=beta, tail=tail, temperature=temperature,
                         teacher_temperature=teacher_temperature or None)
        self.temperature, self.layout, self.group, self.store = temperature, layout, group, store

    def select(self, pick):  # (again for a backward rerun: from the teacher as given)
        self.lp, self.idx = pick(self.teacher[0]), pick(self.teacher[1]).long()
        self.ids = self.store.ids(pick)
        return self

    def __call__(self, zs, rows, w, loss_out, g, bufs):
        lp, ids = self.lp[rows].double(), self.ids[rows]
        x = zs if g is None or g is zs else g.copy_(zs)
        m, width = x.shape
        local = self.idx[rows] - self.layout.offset
        own = (local >= 0) & (local < width)
        cols = torch.where(own, local, 0)
        real = lp > float("-inf")
        saved = self.store.get("sparse", ids)
        if saved is None:
            shift = torch.zeros(m, dtype=torch.float32, device=x.device)
            if self.temperature != 1.0:  # (ops/sparse.py tempered_: the shift, then / T)
                top = x.amax(1) if width else x.new_full((m,), float("-inf"))
                shift = D.all_reduce_(torch.where(torch.isfinite(top), top, float("-inf")),
                                      "max", self.group)
                shift = torch.where(torch.isfinite(shift), shift, 0.0)
        else:
            shift = saved[:, 0].float()
        x.sub_(shift[:, None]).div_(self.temperature)
        bad = (torch.isnan(x) | (x == float("inf"))).sum(1)
        zi = torch.where(own, x.gather(1, cols) if width else float("-inf"), float("-inf"))
        if width:  # −inf at the real entries held here (a padding entry changes nothing)
            x.scatter_reduce_(1, cols, torch.where(real & own, float("-inf"),
                                                   float("inf")).float(), "amin")
        if saved is None:
            top = x.amax(1) if width else x.new_full((m,), float("-inf"))
            maxima = D.all_reduce_(torch.cat([torch.where(torch.isfinite(top), top, float(
                "-inf"))[:, None], zi], 1), "max", self.group)
            off_max = torch.where(torch.isfinite(maxima[:, 0]), maxima[:, 0], 0.0)
            sums = torch.stack([(x - off_max[:, None]).exp().sum(1, dtype=torch.float64),
                                bad.double()], 1)
            D.all_reduce_(sums, "sum", self.group)
            lse_c = torch.where(sums[:, 1] > 0, float("nan"), off_max.double() + sums[:, 0].log())
            zi = maxima[:, 1:].double()
            self.store.put("sparse", ids, torch.cat([shift.double()[:, None], lse_c[:, None],
                                                      off_max.double()[:, None], zi], 1))
        else:
            lse_c, off_max, zi = saved[:, 1], saved[:, 2].float(), saved[:, 3:]
        loss, on, coef = entry_math(zi, lse_c, lp, **self.math)
        w = w.double()
        live = w != 0
        if saved is None:
            loss_out.copy_(torch.where(live, loss * w, 0.0))
        if g is None:
            return
        # coef·e^(x − lse_c) off the real entries (0 at them: x = −inf there), as
        # e^(x − max)·(coef·e^(max − lse_c)), the factor formed in float64 (ops/sparse.py
        # gradient_), then the entries
        factor = torch.where(live & (coef != 0),
                             coef * w * (off_max.double() - lse_c).exp(), 0.0)
        x.sub_(off_max[:, None]).exp_()
        x.mul_(factor.float()[:, None])
        if width:
            x.scatter_add_(1, cols, torch.where(live[:, None] & own, on * w[:, None],
                                                0.0).float())


class TopKShardStep:
    """The extractor's row step (ops/sparse.py TopKStep) on this rank's vocabulary shard: per
    chunk, all-reduce MAX (m,) float32 of the row maxima, all-reduce SUM (m, 2) float64 of
    Σ e^((z − M)/T) and NaN / +inf counts, then this rank's k best candidates, all-gathered
    ((m, 2k) float64: values and global ids, O(N·k) per rank) and merged: the k largest,
    ties to the lower id, as on one device."""
    buffers = 0
    in_place = True

    def __init__(self, k, *, temperature, layout, group, values, indices):
        self.k, self.temperature, self.layout, self.group = k, temperature, layout, group
        self.values, self.indices = values, indices

    def select(self, pick):
        return self

    def __call__(self, zs, rows, w, loss_out, g, bufs):
        m, width = zs.shape
        top = zs.amax(1) if width else zs.new_full((m,), float("-inf"))
        top = D.all_reduce_(torch.where(torch.isfinite(top), top, float("-inf")), "max",
                            self.group)
        x = zs.sub_(torch.where(torch.isfinite(top), top, 0.0)[:, None]).div_(self.temperature)
        sums = torch.stack([x.exp().sum(1, dtype=torch.float64),
                            (torch.isnan(x) | (x == float("inf"))).sum(1).double()], 1)
        D.all_reduce_(sums, "sum", self.group)
        lse = sums[:, 0].log()
        bad = (sums[:, 1] > 0) | ~torch.isfinite(lse)
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0]) + rows.start
            raise ValueError(f"logits row {r} has no distribution (it holds NaN or +inf, or "
                             f"is all −inf): its top-k log-probabilities are undefined")
        # This rank's candidates (padding: value −inf, id +inf, after every real one).
        mine = torch.full((m, 2 * self.k), float("-inf"), dtype=torch.float64, device=x.device)
        mine[:, self.k:] = float("inf")
        j = min(self.k, width)
        if j:
            vals, ids = topk_lower_index(x, j)
            mine[:, :j], mine[:, self.k:self.k + j] = vals.double(), ids + self.layout.offset
        every = D.all_gather(mine, self.group)  # (world, m, 2k)
        cand = every[:, :, :self.k].permute(1, 0, 2).reshape(m, -1)
        cand_ids = every[:, :, self.k:].permute(1, 0, 2).reshape(m, -1)
        # The k largest, ties to the lower id: by id, then stably by value.
        order = cand_ids.argsort(dim=1, stable=True)
        cand, cand_ids = cand.gather(1, order), cand_ids.gather(1, order)
        vals, order = cand.sort(dim=1, descending=True, stable=True)
        self.values[rows] = (vals[:, :self.k] - lse[:, None]).to(self.values.dtype)
        self.indices[rows] = cand_ids.gather(1, order[:, :self.k]).long()
        loss_out.zero_()


def _logits_chunk(chunk, lay, device):
    """Rows per chunk of the logits ops, the same on every rank (the widest shard's budget)."""
    return chunk or logits_chunk(max(lay.widths), device)


@_eager
def sparse_divergence(student, lp, idx, row_weight, *, group, layout, chunk, reduce, **math):
    """kdkernels.sparse_divergence of vocabulary-sharded student logits (N, V_r), the teacher's
    (N, K) entries with global ids; SparseShardStep per chunk, gradient handed over."""
    check_teacher(lp, idx, layout.vocab, row_weight)
    on = torch.is_grad_enabled() and student.requires_grad
    step = SparseShardStep(lp, idx, layout=layout, group=group,
                           store=RowStore(student.shape[0], student.device), **math)
    return _SparseLogits.apply(student, step, row_weight, _logits_chunk(chunk, layout,
                                                                          student.device),
                               reduce, on)


class _SparseLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, step, row_weight, chunk, reduce, grad):
        with torch.autocast(device_type=student.device.type, enabled=False):
            loss, g = logits_loop(student.detach(), step, row_weight, chunk=chunk, grad=grad,
                                  out_dtype=grad_dtype(student.dtype, not reduce))
        ctx.reduce, ctx.dtype = reduce, student.dtype
        keep_for_hand_over(ctx, student.new_empty((0,)) if g is None else g)
        return loss.double().sum().float() if reduce else loss

    @staticmethod
    def backward(ctx, grad_loss):
        (g,) = take_handed_over(ctx)
        return (scale(g, grad_loss, ctx.reduce, ctx.dtype),) + (None,) * 5


@_eager
def fused_linear_sparse_divergence(hs, ws, bs, lp, idx, row_weight, ce_weight, labels, *, group,
                                   layout, vocab, kind, beta, tail, temperature,
                                   teacher_temperature, **loop):
    """kdkernels.fused_linear_sparse_divergence with a vocabulary-sharded lm_head (ws, bs: this
    rank's rows; layout: theirs), hs replicated; the teacher's ids and vocab are global."""
    lay = layout
    check_teacher(lp, idx, vocab, row_weight, "vocab_size")
    store = RowStore(hs.shape[0], hs.device)
    rows = ShardRows(lay, vocab, group, store)
    step = SparseShardStep(lp, idx, layout=lay, group=group, store=store, kind=kind, beta=beta,
                           tail=tail, temperature=temperature,
                           teacher_temperature=teacher_temperature)
    return fused_linear(hs, ws, bs, step, rows, dict(
        row_weight=row_weight, ce_weight=ce_weight, labels=labels, vocab=rows.window,
        temperature=temperature, **loop))


@_eager
def topk_logprobs(logits, k, *, group, layout, temperature, chunk, logprob_dtype):
    """kdkernels.topk_logprobs of vocabulary-sharded logits (N, V_r): global ids."""
    n = logits.shape[0]
    values, indices = topk_outputs(n, k, logits.device, logprob_dtype)
    step = TopKShardStep(k, temperature=temperature, layout=layout, group=group, values=values,
                         indices=indices)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits_loop(logits, step, torch.ones(n, device=logits.device),
                    chunk=_logits_chunk(chunk, layout, logits.device), grad=False)
    return values, indices


@_eager
def fused_linear_topk_logprobs(hidden, weight, bias, k, *, group, layout, vocab, logit_scale,
                               softcap, temperature, chunk, logprob_dtype):
    """kdkernels.fused_linear_topk_logprobs with a vocabulary-sharded lm_head: global ids."""
    n = hidden.shape[0]
    values, indices = topk_outputs(n, k, hidden.device, logprob_dtype)
    step = TopKShardStep(k, temperature=temperature, layout=layout, group=group, values=values,
                         indices=indices)
    ones, zeros = (torch.full((n,), v, device=hidden.device) for v in (1.0, 0.0))
    rows = ShardRows(layout, vocab, group, RowStore(n, hidden.device))
    run(hidden, weight, bias, step, ones, zeros, None, vocab=rows.window,
        temperature=temperature, soft=1.0, hard=0.0, s_scale=logit_scale, s_cap=softcap,
        chunk=chunk, grad_hidden=False, grad_weight=False, grad_bias=False, entropy=False,
        weight_grad_fp32=True, vocab_rows=rows)
    return values, indices
