"""Triton kernels of the token-relation losses (spec: kdkernels/reference/token_relation.py;
the same math as csrc/cpu/token_relation.cpp). Batch and relation heads are flattened into S
sequences; a program owns one BLOCK-row (or -column) block of one sequence's T×T relation
plane and walks the tiles of its row (column), recomputing the student's and the teacher's
relation logits s = a_s·F_s·X_sᵀ, u = a_t·F_t·X_tᵀ (d chunked by BLOCK_K); each softmax is
saved as its row maximum and log-sum, apart (their fp32 sum would lose |m|·2⁻²⁴):
    forward     per row block, online: maxima and sums of both softmaxes, and for kl
                W = Σ e^{u − m_u}((u − m_u) − (s − m_s)): KL = W/l_u + log l_s − log l_u;
                for mse a second sweep: Σ (P − Q)², c = Σ Q(Q − P)
    backward    G = w(Q − P) (kl) or 2w·Q((Q − P) − c) (mse), w the row's incoming gradient;
                rows kernel: dF_s,i = a_s Σ_j G_ij X_s,j;  cols kernel: dX_s,j = a_s Σ_i G_ij F_s,i
                (one kernel, COLS; the cols kernel computes its tiles transposed, X_j·F_iᵀ, as
                FlashAttention-2's backward does: no register transpose)
No atomics; nothing T×T is stored. Allowed columns: j < T, j ≤ i when causal, mask_j; a padded
row (mask_i false) takes every column, like the reference, and is then dropped. Padded tokens
are never read (their loads are masked: zeros), so whatever they hold changes nothing.
NaN rule (per sequence, as the reference): the launchers flag the sequences with a non-finite
value in a real token (BAD); their programs skip the sweeps and write NaN for every kept row
and every real token's gradient row.
bf16/fp16 features stay 16-bit on GPUs (tensor-core products, exact in fp32); fp32 tiles use
IEEE fp32 dots, not TF32.
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted



@triton.jit
def _logits(F, X, base_f, base_x, rows, cols, rows_in, cols_in, scale, D: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK: tl.constexpr):
    """(rows × cols) of scale · F·Xᵀ, F and X (S, T, D) contiguous, d walked in BLOCK_K chunks;
    only the tokens rows_in, cols_in (real ones) are read, the others count as zeros."""
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        f = tl.load(F + base_f + rows[:, None] * D + kk[None, :],
                    mask=rows_in[:, None] & (kk[None, :] < D), other=0.0)
        x = tl.load(X + base_x + cols[:, None] * D + kk[None, :],
                    mask=cols_in[:, None] & (kk[None, :] < D), other=0.0)
        acc += tl.dot(f, tl.trans(x), input_precision="ieee")
    return acc * scale


@triton.jit
def _along_i(v, TRANSPOSED: tl.constexpr):
    """A per-row (i) vector broadcast over a tile: [:, None], or [None, :] when transposed."""
    if TRANSPOSED:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _along_j(v, TRANSPOSED: tl.constexpr):
    """A per-column (j) vector broadcast over a tile."""
    if TRANSPOSED:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _real(MASK, seq, idx, T, HAS_MASK: tl.constexpr):
    """Which tokens idx exist (< T) and are real (not padded)."""
    real = idx < T
    if HAS_MASK:
        real = real & (tl.load(MASK + seq * T + idx, mask=idx < T, other=0) != 0)
    return real


@triton.jit
def _tile(FS, XS, FT, XT, MASK, seq, rows, cols, T, scale_s, scale_t, DS: tl.constexpr,
          DT: tl.constexpr, BK_S: tl.constexpr, BK_T: tl.constexpr, BLOCK: tl.constexpr,
          CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Which pairs are allowed, and the student's and teacher's relation logits (−inf where
    not allowed), of the tile rows × cols; TRANSPOSED: the same tile as cols × rows, computed
    that way from the start (X_j·F_iᵀ: no register transpose)."""
    i2 = _along_i(rows, TRANSPOSED)
    j2 = _along_j(cols, TRANSPOSED)
    ok = (i2 < T) & (j2 < T)
    if CAUSAL:
        ok = ok & (j2 <= i2)
    row_in = _real(MASK, seq, rows, T, HAS_MASK)
    col_in = _real(MASK, seq, cols, T, HAS_MASK)
    if HAS_MASK:  # padded rows keep every column
        ok = ok & (_along_j(col_in, TRANSPOSED) | ~_along_i(row_in, TRANSPOSED))
    base_s, base_t = seq * T * DS, seq * T * DT
    if TRANSPOSED:
        s = _logits(XS, FS, base_s, base_s, cols, rows, col_in, row_in, scale_s, DS, BK_S, BLOCK)
        u = _logits(XT, FT, base_t, base_t, cols, rows, col_in, row_in, scale_t, DT, BK_T, BLOCK)
    else:
        s = _logits(FS, XS, base_s, base_s, rows, cols, row_in, col_in, scale_s, DS, BK_S, BLOCK)
        u = _logits(FT, XT, base_t, base_t, rows, cols, row_in, col_in, scale_t, DT, BK_T, BLOCK)
    return ok, tl.where(ok, s, float("-inf")), tl.where(ok, u, float("-inf"))


@triton.jit
def _tr_fwd_kernel(FS, XS, FT, XT, MASK, BAD, ROWS, STATS, T, scale_s, scale_t, DS: tl.constexpr,
                   DT: tl.constexpr, BK_S: tl.constexpr, BK_T: tl.constexpr,
                   BLOCK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                   MSE: tl.constexpr):
    ib = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    rows = ib * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < T
    bad = tl.load(BAD + seq) != 0  # a poisoned sequence: no sweeps, NaN rows
    n_cols = ib + 1 if CAUSAL else tl.cdiv(T, BLOCK)
    n_cols = tl.where(bad, 0, n_cols)
    m_s = tl.full((BLOCK,), -3.0e38, tl.float32)
    m_u = tl.full((BLOCK,), -3.0e38, tl.float32)
    l_s = tl.zeros((BLOCK,), tl.float32)
    l_u = tl.zeros((BLOCK,), tl.float32)
    w = tl.zeros((BLOCK,), tl.float32)
    for jb in range(0, n_cols):
        cols = jb * BLOCK + tl.arange(0, BLOCK)
        ok, s, u = _tile(FS, XS, FT, XT, MASK, seq, rows, cols, T, scale_s, scale_t, DS, DT,
                         BK_S, BK_T, BLOCK, CAUSAL, HAS_MASK, False)
        ms_new = tl.maximum(m_s, tl.max(s, 1))
        mu_new = tl.maximum(m_u, tl.max(u, 1))
        s_rel = s - ms_new[:, None]
        u_rel = u - mu_new[:, None]
        e_u = tl.exp(u_rel)
        alpha_u = tl.exp(m_u - mu_new)
        if not MSE:  # old W was relative to the old maxima
            shift = (mu_new - m_u) - (ms_new - m_s)
            w = alpha_u * (w - shift * l_u) + tl.sum(tl.where(ok, e_u * (u_rel - s_rel), 0.0), 1)
        l_s = l_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(s_rel), 1)
        l_u = l_u * alpha_u + tl.sum(e_u, 1)
        m_s = ms_new
        m_u = mu_new
    ll_s = tl.log(l_s)
    ll_u = tl.log(l_u)
    c = tl.zeros((BLOCK,), tl.float32)
    if MSE:  # second sweep with the final normalizers
        loss = tl.zeros((BLOCK,), tl.float32)
        for jb in range(0, n_cols):
            cols = jb * BLOCK + tl.arange(0, BLOCK)
            ok, s, u = _tile(FS, XS, FT, XT, MASK, seq, rows, cols, T, scale_s, scale_t, DS, DT,
                             BK_S, BK_T, BLOCK, CAUSAL, HAS_MASK, False)
            q = tl.exp((s - m_s[:, None]) - ll_s[:, None])
            d = q - tl.exp((u - m_u[:, None]) - ll_u[:, None])
            loss += tl.sum(d * d, 1)
            c += tl.sum(q * d, 1)
    else:
        loss = w / l_u + ll_s - ll_u
    loss = tl.where(bad, float("nan"), loss)
    loss = tl.where(_real(MASK, seq, rows, T, HAS_MASK), loss, 0.0)
    tl.store(ROWS + seq * T + rows, loss, mask=rmask)
    base = STATS + seq * 5 * T + rows  # (m_s, log l_s, m_u, log l_u, c): see the ops module
    tl.store(base, m_s, mask=rmask)
    tl.store(base + T, ll_s, mask=rmask)
    tl.store(base + 2 * T, m_u, mask=rmask)
    tl.store(base + 3 * T, ll_u, mask=rmask)
    tl.store(base + 4 * T, c, mask=rmask)


@triton.jit
def _grad_tile(FS, XS, FT, XT, MASK, STATS, GRAD, seq, rows, cols, T, scale_s, scale_t,
               DS: tl.constexpr, DT: tl.constexpr, BK_S: tl.constexpr, BK_T: tl.constexpr,
               BLOCK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               MSE: tl.constexpr, TRANSPOSED: tl.constexpr):
    """G = ∂(Σ_i w_i L_i)/∂s of the tile rows × cols (times a_s), 0 where not allowed or the
    row dropped; TRANSPOSED: Gᵀ, cols × rows."""
    rmask = rows < T
    ok, s, u = _tile(FS, XS, FT, XT, MASK, seq, rows, cols, T, scale_s, scale_t, DS, DT, BK_S,
                     BK_T, BLOCK, CAUSAL, HAS_MASK, TRANSPOSED)
    base = STATS + seq * 5 * T + rows
    m_s = _along_i(tl.load(base, mask=rmask, other=0.0), TRANSPOSED)
    ll_s = _along_i(tl.load(base + T, mask=rmask, other=0.0), TRANSPOSED)
    m_u = _along_i(tl.load(base + 2 * T, mask=rmask, other=0.0), TRANSPOSED)
    ll_u = _along_i(tl.load(base + 3 * T, mask=rmask, other=0.0), TRANSPOSED)
    wgt = tl.load(GRAD + seq * T + rows, mask=rmask, other=0.0) * scale_s
    wgt = tl.where(_real(MASK, seq, rows, T, HAS_MASK), wgt, 0.0)  # dropped rows
    q = tl.exp((s - m_s) - ll_s)
    g = q - tl.exp((u - m_u) - ll_u)
    if MSE:
        c = _along_i(tl.load(base + 4 * T, mask=rmask, other=0.0), TRANSPOSED)
        g = 2.0 * q * (g - c)
    return tl.where(ok, g * _along_i(wgt, TRANSPOSED), 0.0)


@triton.jit
def _tr_bwd_kernel(FS, XS, FT, XT, MASK, BAD, STATS, GRAD, OUT, T, scale_s, scale_t,
                   DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, BK_S: tl.constexpr,
                   BK_T: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_MASK: tl.constexpr, MSE: tl.constexpr, COLS: tl.constexpr):
    """The rows kernel (COLS false): dF_s of this program's rows = Σ_j G·X_s,j, over the
    column blocks; the columns kernel (COLS true): dX_s of its columns = Σ_i Gᵀ·F_s,i, over
    the row blocks, with the tiles computed transposed. A poisoned sequence (BAD): NaN rows
    for the real tokens, nothing computed."""
    own_block = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    own = own_block * BLOCK + tl.arange(0, BLOCK)
    dd = tl.arange(0, DSP)
    acc = tl.zeros((BLOCK, DSP), tl.float32)
    n_blocks = tl.cdiv(T, BLOCK)
    first = own_block if (CAUSAL and COLS) else 0  # causal: only j ≤ i
    last = own_block + 1 if (CAUSAL and not COLS) else n_blocks
    bad = tl.load(BAD + seq) != 0
    last = tl.where(bad, first, last)
    for other_block in range(first, last):
        other = other_block * BLOCK + tl.arange(0, BLOCK)
        other_in = _real(MASK, seq, other, T, HAS_MASK)  # padded tokens are never read
        if COLS:  # own = columns j, other = rows i
            g = _grad_tile(FS, XS, FT, XT, MASK, STATS, GRAD, seq, other, own, T, scale_s,
                           scale_t, DS, DT, BK_S, BK_T, BLOCK, CAUSAL, HAS_MASK, MSE, True)
            y = tl.load(FS + seq * T * DS + other[:, None] * DS + dd[None, :],
                        mask=other_in[:, None] & (dd[None, :] < DS), other=0.0)
        else:
            g = _grad_tile(FS, XS, FT, XT, MASK, STATS, GRAD, seq, own, other, T, scale_s,
                           scale_t, DS, DT, BK_S, BK_T, BLOCK, CAUSAL, HAS_MASK, MSE, False)
            y = tl.load(XS + seq * T * DS + other[:, None] * DS + dd[None, :],
                        mask=other_in[:, None] & (dd[None, :] < DS), other=0.0)
        acc += tl.dot(g, y.to(tl.float32), input_precision="ieee")
    acc = tl.where(bad & _real(MASK, seq, own, T, HAS_MASK)[:, None], float("nan"), acc)
    tl.store(OUT + seq * T * DS + own[:, None] * DS + dd[None, :], acc,
             mask=(own[:, None] < T) & (dd[None, :] < DS))


def _tile_dtype(*xs):
    """bf16/fp16 features stay in their dtype on a GPU (tensor-core products, exact in fp32);
    anything else, and the interpreter (no bf16 math), works in fp32."""
    xs = [x for x in xs if x is not None]
    dtypes = {x.dtype for x in xs}
    if len(dtypes) == 1 and xs[0].dtype in (torch.bfloat16, torch.float16) and not triton_interpreted():
        return xs[0].dtype
    return torch.float32


def _prepare(fs, xs, ft, xt, mask):
    ds_dtype, dt_dtype = _tile_dtype(fs, xs), _tile_dtype(ft, xt)
    fs_, ft_ = fs.to(ds_dtype).contiguous(), ft.to(dt_dtype).contiguous()
    xs_ = fs_ if xs is None else xs.to(ds_dtype).contiguous()
    xt_ = ft_ if xt is None else xt.to(dt_dtype).contiguous()
    m = mask.to(torch.int8).contiguous() if mask is not None else fs_.new_empty(1, dtype=torch.int8)
    return fs_, xs_, ft_, xt_, m, _poisoned(fs, xs, ft, xt, mask)


def _poisoned(fs, xs, ft, xt, mask):
    """(S,) int8: 1 for the sequences with a NaN or ±inf in a real token's features or keys."""
    bad = None
    for x in (fs, xs, ft, xt):
        if x is not None:
            b = ~torch.isfinite(x).all(-1)
            bad = b if bad is None else bad | b
    if mask is not None:
        bad = bad & mask
    return bad.any(-1).to(torch.int8)


def _meta(fs, ft, causal, mask, mse):
    return _meta_for(fs.shape[-1], ft.shape[-1], causal, mask is not None, mse)


def _meta_for(ds, dt, causal, has_mask, mse):
    """Compile-time parameters (and the padded student width DSP of the gradient kernels)."""
    dsp = max(16, triton.next_power_of_2(ds))
    block = 64 if dsp <= 256 else 32  # the (BLOCK, d_s) gradient accumulator lives in registers
    return dict(DS=ds, DT=dt, BK_S=min(64, max(16, triton.next_power_of_2(ds))),
                BK_T=min(64, max(16, triton.next_power_of_2(dt))), BLOCK=block, CAUSAL=causal,
                HAS_MASK=has_mask, MSE=mse), dsp


def _warps(fs, backward):
    """Warps per program, from ptxas' register reports for sm_90a (bf16 tiles): the backward's
    (BLOCK, d_s) accumulators spill with 4 warps (d_s = 384: ~2.1 KB of spill stores per
    thread in each kernel; d_s = 64: 120 B in the columns kernel) and hardly at all with 8
    (0 / 8 B); the forward needs 8 only for wide students."""
    return 8 if backward or fs.shape[-1] > 128 else 4


def token_relation_fwd(fs, xs, ft, xt, mask, scale_s, scale_t, causal, mse):
    """Launcher behind kdkernels::token_relation_fwd_triton (see kdkernels/ops/token_relation.py)."""
    seqs, t = fs.shape[0], fs.shape[1]
    meta, _ = _meta(fs, ft, causal, mask, mse)
    fs_, xs_, ft_, xt_, m, bad = _prepare(fs, xs, ft, xt, mask)
    rows = torch.zeros(seqs, t, device=fs.device, dtype=torch.float32)
    stats = torch.zeros(seqs, 5, t, device=fs.device, dtype=torch.float32)
    if t > 0 and seqs > 0:
        _tr_fwd_kernel[(triton.cdiv(t, meta["BLOCK"]), seqs)](
            fs_, xs_, ft_, xt_, m, bad, rows, stats, t, float(scale_s), float(scale_t),
            num_warps=_warps(fs, backward=False), **meta)
    return rows, stats


def token_relation_bwd(grad_rows, fs, xs, ft, xt, mask, scale_s, scale_t, causal, mse, stats):
    """Launcher behind kdkernels::token_relation_bwd_triton."""
    seqs, t = fs.shape[0], fs.shape[1]
    meta, dsp = _meta(fs, ft, causal, mask, mse)
    fs_, xs_, ft_, xt_, m, bad = _prepare(fs, xs, ft, xt, mask)
    grad = grad_rows.float().contiguous()
    stats = stats.float().contiguous()
    dfs = torch.zeros(seqs, t, fs.shape[-1], device=fs.device, dtype=torch.float32)
    dxs = torch.zeros_like(dfs)
    if t > 0 and seqs > 0:
        grid = (triton.cdiv(t, meta["BLOCK"]), seqs)
        args = (fs_, xs_, ft_, xt_, m, bad, stats, grad)
        warps = _warps(fs, backward=True)
        for out, cols in ((dfs, False), (dxs, True)):
            _tr_bwd_kernel[grid](*args, out, t, float(scale_s), float(scale_t), DSP=dsp,
                                 COLS=cols, num_warps=warps, **meta)
    if xs is None:  # the features are their own keys: both sides are their gradient
        return dfs.add_(dxs).to(fs.dtype), fs.new_empty((0,))
    return dfs.to(fs.dtype), dxs.to(xs.dtype)
