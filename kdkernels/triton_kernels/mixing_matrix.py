"""Triton kernels of MOHAWK's mixing-matrix loss (spec: kdkernels/reference/mixing_matrix.py;
the same tiling as csrc/cpu/mixing_matrix.cpp). Batch and heads are flattened to BH; a program
owns one BLOCK-row (or -column) tile of the causal T×T plane of one (b, h) and walks the
tiles of its row (column), recomputing A, E = exp(segment sums) and M' = (C Bᵀ)⊙E:
    forward      per row block: lse (skipped with teacher_lse), Σ_j (M − A)²
    backward     rows kernel: dC_i = Σ_j (G⊙E) B_j, dcs_i += Σ_j G⊙M', dD += diag G
                 cols kernel: dB_j = Σ_i (G⊙E)ᵀ C_i, dcs_j −= Σ_i G⊙M'
with G = (M − A)·coef, coef = 2 (squared) or 1/‖M − A‖_F, times the incoming gradient. No
atomics; nothing T×T is stored. Segment sums are differences of float64 cumulative sums
of log_decay clamped at −DECAY_FLOOR (see there), so a huge or −inf step cancels nothing.
bf16/fp16 inputs keep their dtype on GPUs, so q·kᵀ and C·Bᵀ run on tensor cores (their
products are exact in fp32); fp32 tiles (and the gradient products, whose left operand is an
fp32 tile) use IEEE fp32 dots, not TF32: exact first.
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted

# Steps of log_decay below −DECAY_FLOOR are clamped to it (as in csrc/cpu/mixing_matrix.cpp):
# every segment that crosses such a step sums to ≤ −DECAY_FLOOR, whose exp is exactly 0 in
# float64 and float32 alike, so no decay changes, while the float64 cumulative sums stay
# small enough that their differences keep every segment exact (a step of −1e30 would wipe
# out the later ones; a −inf step would make them −inf − (−inf) = NaN).
DECAY_FLOOR = 1024.0


@triton.jit
def _tile(q, c, cs_i, lse_i, d_h, rows, K, Bm, CS, kv_base, cs_base, j0, T, scale,
          HEAD_D: tl.constexpr, N: tl.constexpr, DP: tl.constexpr, NP: tl.constexpr,
          BLOCK: tl.constexpr):
    """One tile (rows × cols j0…j0+BLOCK): validity mask, A, E, M' and M."""
    cols = j0 + tl.arange(0, BLOCK)
    cmask = cols < T
    dd = tl.arange(0, DP)
    dn = tl.arange(0, NP)
    k = tl.load(K + kv_base * HEAD_D + cols[:, None] * HEAD_D + dd[None, :],
                mask=cmask[:, None] & (dd[None, :] < HEAD_D), other=0.0)
    b = tl.load(Bm + kv_base * N + cols[:, None] * N + dn[None, :],
                mask=cmask[:, None] & (dn[None, :] < N), other=0.0)
    cs_j = tl.load(CS + cs_base + cols, mask=cmask, other=0.0)
    valid = (cols[None, :] <= rows[:, None]) & cmask[None, :] & (rows[:, None] < T)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    a = tl.where(valid, tl.exp(tl.where(valid, s - lse_i[:, None], float("-inf"))), 0.0)
    seg = (cs_i[:, None] - cs_j[None, :]).to(tl.float32)
    e = tl.where(valid, tl.exp(tl.where(valid, seg, float("-inf"))), 0.0)
    mp = tl.dot(c, tl.trans(b), input_precision="ieee") * e
    m = mp + tl.where((rows[:, None] == cols[None, :]) & valid, d_h, 0.0)
    return valid, a, e, mp, m, b, cols, cmask


@triton.jit
def _load_rows(Q, C, CS, LSE, DV, bh, i0, T, HEAD_D: tl.constexpr, N: tl.constexpr,
               DP: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr, LOAD_LSE: tl.constexpr):
    rows = i0 + tl.arange(0, BLOCK)
    rmask = rows < T
    dd = tl.arange(0, DP)
    dn = tl.arange(0, NP)
    q = tl.load(Q + bh * T * HEAD_D + rows[:, None] * HEAD_D + dd[None, :],
                mask=rmask[:, None] & (dd[None, :] < HEAD_D), other=0.0)
    c = tl.load(C + bh * T * N + rows[:, None] * N + dn[None, :],
                mask=rmask[:, None] & (dn[None, :] < N), other=0.0)
    cs_i = tl.load(CS + bh * T + rows, mask=rmask, other=0.0)
    d_h = tl.load(DV + bh)
    lse_i = tl.zeros((BLOCK,), tl.float32)
    if LOAD_LSE:
        lse_i = tl.load(LSE + bh * T + rows, mask=rmask, other=0.0)
    return rows, rmask, q, c, cs_i, d_h, lse_i


@triton.jit
def _mm_fwd_kernel(Q, K, C, Bm, CS, DV, LSE, PART, T, scale, HEAD_D: tl.constexpr,
                   N: tl.constexpr, DP: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
                   HAS_LSE: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    ib = tl.program_id(1)
    i0 = ib * BLOCK
    rows, rmask, q, c, cs_i, d_h, lse_i = _load_rows(Q, C, CS, LSE, DV, bh, i0, T, HEAD_D, N,
                                                     DP, NP, BLOCK, HAS_LSE)
    if not HAS_LSE:  # online log-sum-exp of the causal scores of these rows
        m_run = tl.full((BLOCK,), float("-inf"), tl.float32)
        z_run = tl.zeros((BLOCK,), tl.float32)
        dd = tl.arange(0, DP)
        for jb in range(0, ib + 1):
            cols = jb * BLOCK + tl.arange(0, BLOCK)
            k = tl.load(K + bh * T * HEAD_D + cols[:, None] * HEAD_D + dd[None, :],
                        mask=(cols[:, None] < T) & (dd[None, :] < HEAD_D), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            s = tl.where((cols[None, :] <= rows[:, None]) & (cols[None, :] < T), s, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(s, 1))
            z_run = z_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_run = m_new
        lse_i = m_run + tl.log(z_run)
        tl.store(LSE + bh * T + rows, lse_i, mask=rmask)
    acc = tl.zeros((BLOCK,), tl.float32)
    for jb in range(0, ib + 1):
        valid, a, e, mp, m, b, cols, cmask = _tile(q, c, cs_i, lse_i, d_h, rows, K, Bm, CS,
                                                   bh * T, bh * T, jb * BLOCK, T, scale,
                                                   HEAD_D, N, DP, NP, BLOCK)
        r = tl.where(valid, m - a, 0.0)
        acc += tl.sum(r * r, 1)
    tl.store(PART + bh * T + rows, acc, mask=rmask)


@triton.jit
def _mm_bwd_rows_kernel(Q, K, C, Bm, CS, DV, LSE, COEF, DC, DCS, DDP, T, n_blocks, scale,
                        HEAD_D: tl.constexpr, N: tl.constexpr, DP: tl.constexpr,
                        NP: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    ib = tl.program_id(1)
    rows, rmask, q, c, cs_i, d_h, lse_i = _load_rows(Q, C, CS, LSE, DV, bh, ib * BLOCK, T,
                                                     HEAD_D, N, DP, NP, BLOCK, True)
    coef = tl.load(COEF + bh)
    dc = tl.zeros((BLOCK, NP), tl.float32)
    dcs = tl.zeros((BLOCK,), tl.float32)
    ddiag = tl.zeros((BLOCK,), tl.float32)
    for jb in range(0, ib + 1):
        valid, a, e, mp, m, b, cols, cmask = _tile(q, c, cs_i, lse_i, d_h, rows, K, Bm, CS,
                                                   bh * T, bh * T, jb * BLOCK, T, scale,
                                                   HEAD_D, N, DP, NP, BLOCK)
        g = tl.where(valid, (m - a) * coef, 0.0)
        dc += tl.dot(g * e, b.to(tl.float32), input_precision="ieee")
        dcs += tl.sum(g * mp, 1)
        ddiag += tl.sum(tl.where(rows[:, None] == cols[None, :], g, 0.0), 1)
    dn = tl.arange(0, NP)
    tl.store(DC + bh * T * N + rows[:, None] * N + dn[None, :], dc,
             mask=rmask[:, None] & (dn[None, :] < N))
    tl.store(DCS + bh * T + rows, dcs, mask=rmask)
    tl.store(DDP + bh * n_blocks + ib, tl.sum(ddiag, 0))


@triton.jit
def _mm_bwd_cols_kernel(Q, K, C, Bm, CS, DV, LSE, COEF, DB, DCS, T, n_blocks, scale,
                        HEAD_D: tl.constexpr, N: tl.constexpr, DP: tl.constexpr,
                        NP: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    jb = tl.program_id(1)
    coef = tl.load(COEF + bh)
    db = tl.zeros((BLOCK, NP), tl.float32)
    dcs = tl.zeros((BLOCK,), tl.float32)
    for ib in range(jb, n_blocks):
        rows, rmask, q, c, cs_i, d_h, lse_i = _load_rows(Q, C, CS, LSE, DV, bh, ib * BLOCK, T,
                                                         HEAD_D, N, DP, NP, BLOCK, True)
        valid, a, e, mp, m, b, cols, cmask = _tile(q, c, cs_i, lse_i, d_h, rows, K, Bm, CS,
                                                   bh * T, bh * T, jb * BLOCK, T, scale,
                                                   HEAD_D, N, DP, NP, BLOCK)
        g = tl.where(valid, (m - a) * coef, 0.0)
        db += tl.dot(tl.trans(g * e), c.to(tl.float32), input_precision="ieee")
        dcs -= tl.sum(g * mp, 0)
    cols = jb * BLOCK + tl.arange(0, BLOCK)
    dn = tl.arange(0, NP)
    tl.store(DB + bh * T * N + cols[:, None] * N + dn[None, :], db,
             mask=(cols[:, None] < T) & (dn[None, :] < N))
    tl.store(DCS + bh * T + cols, dcs, mask=cols < T)


def _tile_dtype(x, y):
    """bf16/fp16 pairs stay in their dtype on a GPU: their tile products (q·kᵀ, C·Bᵀ) then run
    on tensor cores and are exact in fp32 all the same. Anything else (and the interpreter,
    which has no bf16 math) works in fp32."""
    if x.dtype == y.dtype and x.dtype in (torch.bfloat16, torch.float16) and not triton_interpreted():
        return x.dtype
    return torch.float32


def _flatten(q, k, C, B, log_decay, D):
    """(BH, T, ·) copies, heads flattened with the batch; C, B per head; float64 cs."""
    batch, t, heads, _ = q.shape
    per_group = heads // C.shape[2]
    bh = batch * heads
    qk_dtype, cb_dtype = _tile_dtype(q, k), _tile_dtype(C, B)

    def heads_first(x):
        dtype = qk_dtype if x is q or x is k else cb_dtype
        return x.to(dtype).permute(0, 2, 1, 3).reshape(bh, t, x.shape[-1]).contiguous()

    cs = log_decay.double().clamp_min(-DECAY_FLOOR).cumsum(1)  # NaN stays NaN
    cs = cs.permute(0, 2, 1).reshape(bh, t).contiguous()
    d = D.float().repeat(batch) if D is not None else q.new_zeros(bh, dtype=torch.float32)
    c = heads_first(C.repeat_interleave(per_group, 2))
    b = heads_first(B.repeat_interleave(per_group, 2))
    return heads_first(q), heads_first(k), c, b, cs, d.contiguous()


def _meta(q, C):
    head_d, n = q.shape[-1], C.shape[-1]
    block = 64 if triton_interpreted() else 64
    return dict(HEAD_D=head_d, N=n, DP=max(16, triton.next_power_of_2(head_d)),
                NP=max(16, triton.next_power_of_2(n)), BLOCK=block)


def mixing_matrix_fwd(q, k, C, B, log_decay, D, scale, squared, teacher_lse):
    """Launcher behind kdkernels::mixing_matrix_fwd_triton (see kdkernels/ops/mixing_matrix.py)."""
    batch, t, heads, _ = q.shape
    fq, fk, fc, fb, cs, d = _flatten(q, k, C, B, log_decay, D)
    meta = _meta(q, C)
    n_blocks = triton.cdiv(t, meta["BLOCK"])
    lse = (teacher_lse.float().reshape(batch * heads, t).clone() if teacher_lse is not None
           else torch.empty(batch * heads, t, device=q.device, dtype=torch.float32))
    part = torch.zeros(batch * heads, t, device=q.device, dtype=torch.float32)
    if t > 0 and batch * heads > 0:
        _mm_fwd_kernel[(batch * heads, n_blocks)](fq, fk, fc, fb, cs, d, lse, part, t,
                                                 float(scale), HAS_LSE=teacher_lse is not None,
                                                 **meta)
    sq = part.double().sum(1)
    loss = (sq if squared else sq.sqrt()).float().view(batch, heads)
    return loss, lse.view(batch, heads, t), sq.float().view(batch, heads)


def mixing_matrix_bwd(grad_loss, q, k, C, B, log_decay, D, scale, squared, lse, sq):
    """Launcher behind kdkernels::mixing_matrix_bwd_triton."""
    batch, t, heads, _ = q.shape
    groups, n = C.shape[2], C.shape[3]
    bh = batch * heads
    fq, fk, fc, fb, cs, d = _flatten(q, k, C, B, log_decay, D)
    meta = _meta(q, C)
    n_blocks = triton.cdiv(t, meta["BLOCK"])
    s = sq.float().reshape(bh)
    coef = torch.full_like(s, 2.0) if squared else torch.where(s > 0, s.rsqrt(), torch.zeros_like(s))
    coef = (coef * grad_loss.float().reshape(bh)).contiguous()
    lse = lse.float().reshape(bh, t).contiguous()
    dc = torch.zeros(bh, t, n, device=q.device, dtype=torch.float32)
    db = torch.zeros_like(dc)
    dcs_rows = torch.zeros(bh, t, device=q.device, dtype=torch.float32)
    dcs_cols = torch.zeros_like(dcs_rows)
    dd_part = torch.zeros(bh, max(n_blocks, 1), device=q.device, dtype=torch.float32)
    if t > 0 and bh > 0:
        _mm_bwd_rows_kernel[(bh, n_blocks)](fq, fk, fc, fb, cs, d, lse, coef, dc, dcs_rows,
                                           dd_part, t, n_blocks, float(scale), **meta)
        _mm_bwd_cols_kernel[(bh, n_blocks)](fq, fk, fc, fb, cs, d, lse, coef, db, dcs_cols,
                                           t, n_blocks, float(scale), **meta)
    per_group = heads // groups

    def to_groups(x, like):
        return x.view(batch, groups, per_group, t, n).sum(2).permute(0, 2, 1, 3).to(like.dtype).contiguous()

    dcs = dcs_rows + dcs_cols
    dld = dcs.flip(1).cumsum(1).flip(1).view(batch, heads, t).permute(0, 2, 1).to(log_decay.dtype)
    d_d = dd_part.sum(1).view(batch, heads).sum(0).to(D.dtype) if D is not None \
        else q.new_empty((0,))
    return to_groups(dc, C), to_groups(db, B), dld.contiguous(), d_d
