"""Triton kernels of the divergence family: one program per row, three sweeps over it (and
the same sweeps split at the all-reduces of the vocabulary-parallel path: _divergence_shard_kernel).

    sweep 1  online log-sum-exp of both rows (each block: one max, one rescale), in input
             units: every exponent is (logit − row max)/T
    sweep 2  per-element terms U_P, U_Q and the loss; their row sums
    sweep 3  the gradients   g_P = c_P·(U_P − P·ΣU_P),   g_Q = c_Q·(U_Q − Q·ΣU_Q)
             (for KL with only the Q side wanted, the usual case, g_Q = Q − P is written
             in sweep 2 and sweep 3 is skipped)
The row is read from HBM in sweep 1 and mostly from L2 after. P is the teacher's
distribution and Q the student's (swapped when SWAP), so the four modes below cover every
kind; see kdkernels/ops/divergence.py for the mapping and kdkernels/reference for the math.

Why U: for any per-row loss L(P, Q) the softmax Jacobian gives d L / d x_j = P_j·(g_j − Σ_k
P_k g_k) with g = ∂L/∂P; U_P = c_P⁻¹·P⊙g in closed form, per mode:
    KL    U_P = P(lP − lQ)                       U_Q = −P                 c = (1, 1)
    SKEW  U_P = P(lP − lR) − α·P²/R              U_Q = Q·P/R              c = (1, −(1−α))
    JSD   U_P = P(lP − lM)                       U_Q = Q(lQ − lM)         c = (β, 1−β)
    TVD   U_P = P·sign(P−Q)                      U_Q = Q·sign(P−Q)        c = (½, −½)
The loss sums KL terms in the form y·φ(log x − log y) ≥ 0 (kl_term, in _math.py), which does not cancel
as P and Q approach each other. Every x·log-ratio term is 0 where x == 0, so −inf logits and
underflow never give NaN.
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .._plumbing import grad_dtype
from ._math import kl_term

MODE_KL, MODE_SKEW, MODE_JSD, MODE_TVD = 0, 1, 2, 3
# Logits per block of a row: on a GPU 4096; interpreted, whole rows up to 65536 (each block
# costs the interpreter far more than its width). Tests lower the interpreter's to cover the
# multi-block sweeps.
MAX_BLOCK = {"gpu": 4096, "interpreted": 65536}


@triton.jit
def _load_pq(S, T, cols, v_live, live, lam, SWAP: tl.constexpr, TAID: tl.constexpr):
    """Logits of P and Q at `cols` in input units, fp32 (−inf past V). v_live is V for a kept
    row and 0 for a dropped one, which is then never read."""
    s = tl.load(S + cols, mask=cols < v_live, other=float("-inf")).to(tl.float32)
    t = tl.load(T + cols, mask=cols < v_live, other=float("-inf")).to(tl.float32)
    if TAID:  # TAID target λ·t + (1−λ)·s (0 < λ < 1: −inf entries stay −inf); λ = 0: s
        t = tl.where(lam == 0.0, s, lam * t + (1.0 - lam) * s)
    s = tl.where(live, s, 0.0)  # a dropped row is never read; keep its math finite
    t = tl.where(live, t, 0.0)
    if SWAP:
        return s, t
    return t, s


@triton.jit
def _lse_update(m, z, x, inv_t):
    """Online log-sum-exp of x/T in input units: m the running maximum of x, z = Σ e^((x−m)/T).
    Differences to the maximum are taken before the division by T, so no precision is lost
    at tiny T; NaN and +inf make z NaN."""
    m_new = tl.maximum(m, tl.max(x, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    z = z * tl.exp((m - shift) * inv_t) + tl.sum(tl.exp((x - shift) * inv_t), 0)
    return m_new, z


@triton.jit
def _xlr(x, lx, ly):
    """x·(lx − ly), 0 where x == 0."""
    return tl.where(x > 0.0, x * (lx - ly), 0.0)


@triton.jit
def _log_mix(log_w, log_1mw, lx, ly):
    """log(w·x + (1−w)·y) from log x, log y, in log space (no underflow to log 0)."""
    u = lx + log_w
    v = ly + log_1mw
    hi = tl.maximum(u, v)
    lo = tl.minimum(u, v)
    safe_hi = tl.where(hi == float("-inf"), 0.0, hi)
    e = tl.exp(lo - safe_hi)  # in [0, 1]
    # log1p(e) to a few ulp without a log1p: log(u)·e/(u − 1), u = 1 + e (Goldberg's trick)
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(hi == float("-inf"), hi, hi + log1p_e)


@triton.jit
def _terms(x, y, m_x, m_y, inv_t, log_z_x, log_z_y, inv_z_x, inv_z_y, mix, log_w, log_1mw,
           MODE: tl.constexpr):
    """P, Q, U_P, U_Q and the loss terms of one block of logits x (P's), y (Q's) in input
    units. With a = (x − max)/T: log P = a − log Z and P = e^a/Z rather than e^(log P): the
    exponent stays near 0 where P is large, so tl.exp is exact there."""
    a_x = (x - m_x) * inv_t
    a_y = (y - m_y) * inv_t
    lp = a_x - log_z_x
    lq = a_y - log_z_y
    p = tl.exp(a_x) * inv_z_x
    q = tl.exp(a_y) * inv_z_y
    if MODE == 0:  # KL(P‖Q)
        up = _xlr(p, lp, lq)
        uq = -p
        el = kl_term(p, q, lp - lq)
    elif MODE == 1:  # KL(P ‖ αP + (1−α)Q)
        lr = _log_mix(log_w, log_1mw, lp, lq)
        el = kl_term(p, mix * p + (1.0 - mix) * q, lp - lr)
        p_over_r = tl.where(p > 0.0, tl.exp(lp - lr), 0.0)  # ≤ 1/α
        up = _xlr(p, lp, lr) - mix * p * p_over_r
        uq = q * p_over_r
    elif MODE == 2:  # β·KL(P‖M) + (1−β)·KL(Q‖M)
        lm = _log_mix(log_w, log_1mw, lp, lq)
        up = _xlr(p, lp, lm)
        uq = _xlr(q, lq, lm)
        m = mix * p + (1.0 - mix) * q
        el = mix * kl_term(p, m, lp - lm) + (1.0 - mix) * kl_term(q, m, lq - lm)
    else:  # ½Σ|P − Q|
        sg = tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
        up = p * sg
        uq = q * sg
        el = 0.5 * tl.abs(p - q)
    return p, q, up, uq, el


@triton.jit
def _gradient_sweep(S, T, GP, GQ, V, offs, v_live, live, lam, m_x, m_y, inv_t, log_z_x, log_z_y,
                    inv_z_x, inv_z_y, mix, log_w, log_1mw, c_p, c_q, sum_up, sum_uq, p_factor,
                    q_factor, MODE: tl.constexpr, SWAP: tl.constexpr, TAID: tl.constexpr,
                    NEED_P: tl.constexpr, NEED_Q: tl.constexpr, BLOCK: tl.constexpr):
    """Sweep 3 over one row: g_P = c_P·(U_P − P·ΣU_P), g_Q = c_Q·(U_Q − Q·ΣU_Q), each times
    its factor (w·d(logits/T)/d(logits)), into GP / GQ in their dtype."""
    for start in range(0, V, BLOCK):
        cols = start + offs
        msk = cols < V
        x, y = _load_pq(S, T, cols, v_live, live, lam, SWAP, TAID)
        p, q, up, uq, el = _terms(x, y, m_x, m_y, inv_t, log_z_x, log_z_y, inv_z_x, inv_z_y,
                                  mix, log_w, log_1mw, MODE)
        if NEED_P:
            g = tl.where(live, c_p * (up - p * sum_up) * p_factor, 0.0)
            tl.store(GP + cols, g.to(GP.dtype.element_ty), mask=msk)
        if NEED_Q:
            g = tl.where(live, c_q * (uq - q * sum_uq) * q_factor, 0.0)
            tl.store(GQ + cols, g.to(GQ.dtype.element_ty), mask=msk)


@triton.jit
def _divergence_fwd_kernel(
    S, T, W, LOSS, GS, GT,
    s_stride, t_stride, gs_stride, gt_stride, V,
    inv_t, mix, lam, c_p, c_q, gs_factor, gt_factor,
    MODE: tl.constexpr, SWAP: tl.constexpr, TAID: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, FUSED_Q: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    S += row * s_stride
    T += row * t_stride
    w = tl.load(W + row)
    live = w != 0.0
    v_live = tl.where(live, V, 0)
    offs = tl.arange(0, BLOCK)
    NEED_P: tl.constexpr = (GRAD_S and SWAP) or (GRAD_T and not SWAP)
    NEED_Q: tl.constexpr = (GRAD_S and not SWAP) or (GRAD_T and SWAP)
    log_w = tl.log(mix)
    log_1mw = tl.log(1.0 - mix)

    # sweep 1: log-sum-exp of both rows
    m_x = tl.full((), float("-inf"), tl.float32)
    z_x = tl.zeros((), tl.float32)
    m_y = tl.full((), float("-inf"), tl.float32)
    z_y = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x, y = _load_pq(S, T, cols, v_live, live, lam, SWAP, TAID)
        m_x, z_x = _lse_update(m_x, z_x, x, inv_t)
        m_y, z_y = _lse_update(m_y, z_y, y, inv_t)
    # The NaN rule: a kept row whose inputs hold NaN or +inf (z is NaN) or that has no
    # distribution (all −inf: z = 0) gets NaN loss and NaN gradients, through its weight.
    w = tl.where(live & ~((z_x > 0.0) & (z_y > 0.0)), float("nan"), w)
    log_z_x = tl.log(z_x)
    log_z_y = tl.log(z_y)
    m_x = tl.where(m_x == float("-inf"), 0.0, m_x)
    m_y = tl.where(m_y == float("-inf"), 0.0, m_y)
    inv_z_x = 1.0 / z_x
    inv_z_y = 1.0 / z_y

    # Gradient destinations: which of GS / GT receives the P side and the Q side.
    if SWAP:
        GP = GS + row * gs_stride
        GQ = GT + row * gt_stride
        p_factor = gs_factor * w
        q_factor = gt_factor * w
    else:
        GP = GT + row * gt_stride
        GQ = GS + row * gs_stride
        p_factor = gt_factor * w
        q_factor = gs_factor * w

    # sweep 2: the loss and the row sums of U
    loss = tl.zeros((), tl.float32)
    sum_up = tl.zeros((), tl.float32)
    sum_uq = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        msk = cols < V
        x, y = _load_pq(S, T, cols, v_live, live, lam, SWAP, TAID)
        p, q, up, uq, el = _terms(x, y, m_x, m_y, inv_t, log_z_x, log_z_y, inv_z_x, inv_z_y,
                                  mix, log_w, log_1mw, MODE)
        loss += tl.sum(el, 0)
        sum_up += tl.sum(up, 0)
        sum_uq += tl.sum(uq, 0)
        if FUSED_Q:  # KL, Q side only: g_Q = Q − P needs no row sum
            g = tl.where(live, (q - p) * q_factor, 0.0)
            tl.store(GQ + cols, g.to(GQ.dtype.element_ty), mask=msk)
    tl.store(LOSS + row, tl.where(live, loss * w, 0.0))

    # sweep 3: the gradients
    if (NEED_P or NEED_Q) and not FUSED_Q:
        _gradient_sweep(S, T, GP, GQ, V, offs, v_live, live, lam, m_x, m_y, inv_t, log_z_x,
                        log_z_y, inv_z_x, inv_z_y, mix, log_w, log_1mw, c_p, c_q, sum_up, sum_uq,
                        p_factor, q_factor, MODE, SWAP, TAID, NEED_P, NEED_Q, BLOCK)


@triton.jit
def _divergence_shard_kernel(
    S, T, W, STATS, GS, GT,
    s_stride, t_stride, gs_stride, gt_stride, V,
    inv_t, mix, lam, c_p, c_q, gs_factor, gt_factor,
    MODE: tl.constexpr, SWAP: tl.constexpr, TAID: tl.constexpr, PHASE: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr,
):
    """The sweeps above split at the all-reduces of the vocabulary-parallel path, on this
    rank's shard (csrc/cpu/divergence.h has the phases and the STATS (N, 7) float64 columns
    [m_s, m_t, z_s, z_t, loss, ΣU_P, ΣU_Q]): PHASE 0 sweep 1 (this shard's maxima and
    normalizers), 1 sweep 2 given the global ones (the loss and ΣU of this shard), 2 sweep 3
    given every row sum (the gradients)."""
    row = tl.program_id(0).to(tl.int64)
    S += row * s_stride
    T += row * t_stride
    STATS += row * 7
    w = tl.load(W + row)
    live = w != 0.0
    v_live = tl.where(live, V, 0)
    offs = tl.arange(0, BLOCK)
    if PHASE == 0:
        m_x = tl.full((), float("-inf"), tl.float32)
        z_x = tl.zeros((), tl.float32)
        m_y = tl.full((), float("-inf"), tl.float32)
        z_y = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            x, y = _load_pq(S, T, start + offs, v_live, live, lam, SWAP, TAID)
            m_x, z_x = _lse_update(m_x, z_x, x, inv_t)
            m_y, z_y = _lse_update(m_y, z_y, y, inv_t)
        m_x = tl.where(live, m_x, float("-inf"))
        m_y = tl.where(live, m_y, float("-inf"))
        z_x = tl.where(live, z_x, 0.0)
        z_y = tl.where(live, z_y, 0.0)
        if SWAP:  # (x is the student's side)
            tl.store(STATS + 0, m_x.to(tl.float64))
            tl.store(STATS + 1, m_y.to(tl.float64))
            tl.store(STATS + 2, z_x.to(tl.float64))
            tl.store(STATS + 3, z_y.to(tl.float64))
        else:
            tl.store(STATS + 0, m_y.to(tl.float64))
            tl.store(STATS + 1, m_x.to(tl.float64))
            tl.store(STATS + 2, z_y.to(tl.float64))
            tl.store(STATS + 3, z_x.to(tl.float64))
    else:
        m_s = tl.load(STATS + 0).to(tl.float32)
        m_t = tl.load(STATS + 1).to(tl.float32)
        lz_s = tl.load(STATS + 2).to(tl.float32)
        lz_t = tl.load(STATS + 3).to(tl.float32)
        if SWAP:
            m_x, m_y, log_z_x, log_z_y = m_s, m_t, lz_s, lz_t
            GP = GS + row * gs_stride
            GQ = GT + row * gt_stride
            p_factor = gs_factor * w
            q_factor = gt_factor * w
        else:
            m_x, m_y, log_z_x, log_z_y = m_t, m_s, lz_t, lz_s
            GP = GT + row * gt_stride
            GQ = GS + row * gs_stride
            p_factor = gt_factor * w
            q_factor = gs_factor * w
        inv_z_x = tl.exp(-log_z_x)
        inv_z_y = tl.exp(-log_z_y)
        log_w = tl.log(mix)
        log_1mw = tl.log(1.0 - mix)
        NEED_P: tl.constexpr = (GRAD_S and SWAP) or (GRAD_T and not SWAP)
        NEED_Q: tl.constexpr = (GRAD_S and not SWAP) or (GRAD_T and SWAP)
        if PHASE == 1:  # (the sums in float64, as the C++ kernel's: they meet other ranks')
            loss = tl.zeros((), tl.float64)
            sum_up = tl.zeros((), tl.float64)
            sum_uq = tl.zeros((), tl.float64)
            for start in range(0, V, BLOCK):
                x, y = _load_pq(S, T, start + offs, v_live, live, lam, SWAP, TAID)
                p, q, up, uq, el = _terms(x, y, m_x, m_y, inv_t, log_z_x, log_z_y, inv_z_x,
                                          inv_z_y, mix, log_w, log_1mw, MODE)
                loss += tl.sum(el.to(tl.float64), 0)
                sum_up += tl.sum(up.to(tl.float64), 0)
                sum_uq += tl.sum(uq.to(tl.float64), 0)
            tl.store(STATS + 4, tl.where(live, loss, 0.0))
            tl.store(STATS + 5, tl.where(live, sum_up, 0.0))
            tl.store(STATS + 6, tl.where(live, sum_uq, 0.0))
        else:
            sum_up = tl.load(STATS + 5).to(tl.float32)
            sum_uq = tl.load(STATS + 6).to(tl.float32)
            _gradient_sweep(S, T, GP, GQ, V, offs, v_live, live, lam, m_x, m_y, inv_t, log_z_x,
                            log_z_y, inv_z_x, inv_z_y, mix, log_w, log_1mw, c_p, c_q, sum_up,
                            sum_uq, p_factor, q_factor, MODE, SWAP, TAID, NEED_P, NEED_Q, BLOCK)


def divergence_shard_rows(student, teacher, row_weight, mode, swap, mix, temperature, taid, phase,
                          stats, grad_student=None, grad_teacher=None):
    """The launcher of the split sweeps (_divergence_shard_kernel; the CPU twin is
    kdkernels::divergence_shard_rows): (N, V_r) shards of the logits, stats (N, 7) float64
    read and written in place; the gradients (phase 2) into the caller's buffers, as
    divergence_rows."""
    n, v = student.shape
    if n == 0:
        return
    want_s, want_t = grad_student is not None and phase == 2, grad_teacher is not None and phase == 2
    c_p, c_q = _coefficients(mode, mix)
    block = min(triton.next_power_of_2(max(v, 1)),
                MAX_BLOCK["interpreted" if triton_interpreted() else "gpu"])
    w = row_weight.float().contiguous()
    _divergence_shard_kernel[(n,)](
        student, teacher, w, stats, grad_student if want_s else w, grad_teacher if want_t else w,
        student.stride(0), teacher.stride(0), grad_student.stride(0) if want_s else 0,
        grad_teacher.stride(0) if want_t else 0, v,
        1.0 / float(temperature), float(mix), float(taid), c_p, c_q,
        1.0 / temperature, float(taid) / temperature,
        MODE=mode, SWAP=bool(swap), TAID=taid != 1.0, PHASE=int(phase), GRAD_S=want_s,
        GRAD_T=want_t, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )


def _coefficients(mode, mix):
    if mode == MODE_KL:
        return 1.0, 1.0
    if mode == MODE_SKEW:
        return 1.0, -(1.0 - mix)
    if mode == MODE_JSD:
        return mix, 1.0 - mix
    return 0.5, -0.5


def divergence_rows(student, teacher, row_weight, mode, swap, mix, temperature, taid, loss_rows,
                    grad_student=None, grad_teacher=None):
    """The row launcher other ops reuse (kdkernels/ops/divergence.py: rows_into): (N, V) logits
    (any row stride, unit column stride) → loss_rows (N,) float32 and the gradients asked for,
    into the caller's (N, V) buffers (unit column stride, dtype grad_dtype(input)). A gradient
    buffer may be its own logits: each block of a row is loaded before its gradient is stored."""
    n, v = student.shape
    if n == 0:
        return
    want_s, want_t = grad_student is not None, grad_teacher is not None
    need_q = (want_s and not swap) or (want_t and swap)
    need_p = (want_s and swap) or (want_t and not swap)
    c_p, c_q = _coefficients(mode, mix)
    block = min(triton.next_power_of_2(v), MAX_BLOCK["interpreted" if triton_interpreted() else "gpu"])
    _divergence_fwd_kernel[(n,)](
        student, teacher, row_weight, loss_rows,
        grad_student if want_s else loss_rows, grad_teacher if want_t else loss_rows,
        student.stride(0), teacher.stride(0), grad_student.stride(0) if want_s else 0,
        grad_teacher.stride(0) if want_t else 0, v,
        1.0 / float(temperature), float(mix), float(taid), c_p, c_q,
        1.0 / temperature, float(taid) / temperature,
        MODE=mode, SWAP=bool(swap), TAID=taid != 1.0, GRAD_S=want_s, GRAD_T=want_t,
        FUSED_Q=mode == MODE_KL and need_q and not need_p,
        BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )


def divergence_fwd(student, teacher, row_weight, mode, swap, mix, temperature, taid, reduce,
                   grad_student, grad_teacher):
    """Launcher behind kdkernels::divergence_fwd_triton (see kdkernels/ops/divergence.py)."""
    n, v = student.shape
    loss_rows = torch.empty(n, dtype=torch.float32, device=student.device)
    gs = student.new_empty((n, v) if grad_student else (0,), dtype=grad_dtype(student.dtype))
    gt = teacher.new_empty((n, v) if grad_teacher else (0,), dtype=grad_dtype(teacher.dtype))
    divergence_rows(student, teacher, row_weight, mode, swap, mix, temperature, taid, loss_rows,
                    gs if grad_student else None, gt if grad_teacher else None)
    loss = loss_rows.sum() if reduce else loss_rows
    return loss, gs, gt
