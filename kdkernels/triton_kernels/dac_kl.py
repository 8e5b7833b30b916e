"""Triton kernel of DAC-KL (spec: kdkernels/reference/dac_kl.py; the same math as
csrc/cpu/dac_kl.cpp). One program per row, no sort and no scratch memory: the teacher's
probabilities p = exp(t/T − m)/z are recomputed in every sweep (identically, so equal logits
stay equal probabilities), and the two boundary groups are found by a radix-16 search over
the probabilities' bit patterns (positive floats order as their bits): for each 4-bit digit,
from the top, one sweep sums the mass at or above 16 candidate thresholds (16 reductions per
block, so registers stay few), for l and for u at once; 8 sweeps pin both groups' values. Then one sweep for each group's mass above it
and size, and one for the loss, the gradient (q − p̃)/T and the boundary groups' Σ log q.
Masses are summed in fp64. The band is measured in the masses as computed ([l, u] times the
row's fp32 total), so p̃ sums to 1 even for the narrowest band.
A kept row whose logits hold NaN or +inf or are all −inf (no distribution), or whose weight
is NaN, gives NaN loss, gradient row and bound derivatives; rows of weight 0 are never read.
Groups: l's is the one with c_lo ≤ l < c_hi, u's the one with c_lo < u ≤ c_hi (one-sided
derivatives on group boundaries; inward at l = 0 and u = 1), as on the CPU.
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .._plumbing import grad_dtype
from ._math import kl_term


@triton.jit
def _probs(t_ptr, cols, V, inv_temp, m_t, inv_z):
    t = tl.load(t_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    return tl.exp((t - m_t) * inv_temp) * inv_z


@triton.jit
def _dac_kl_fwd_kernel(S, T, LO, HI, W, LOSS, GS, GB, N, V, s_stride, t_stride, gs_stride,
                       inv_temp, BLOCK: tl.constexpr, GRAD_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(W + row)
    s_ptr = S + row * s_stride
    t_ptr = T + row * t_stride
    g_ptr = GS + row * gs_stride
    offs = tl.arange(0, BLOCK)
    if w == 0.0:  # a dropped row: never read
        if GRAD_S:
            for v0 in range(0, V, BLOCK):
                tl.store(g_ptr + v0 + offs, tl.zeros((BLOCK,), tl.float32).to(GS.dtype.element_ty),
                         mask=v0 + offs < V)
    else:
        lower = tl.load(LO + row).to(tl.float64)
        upper = tl.load(HI + row).to(tl.float64)
        # maxima (in logit units: subtracted before the division by T, since at a tiny T
        # x/T − max(x/T) keeps only the rounding of the large quotients), then sums
        mt_vec = tl.full((BLOCK,), float("-inf"), tl.float32)
        ms_vec = tl.full((BLOCK,), float("-inf"), tl.float32)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            t = tl.load(t_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            s = tl.load(s_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            mt_vec = tl.maximum(mt_vec, t)
            ms_vec = tl.maximum(ms_vec, s)
        m_t = tl.max(mt_vec, 0)
        m_s = tl.max(ms_vec, 0)
        z_t = tl.zeros((), tl.float64)
        z_s = tl.zeros((), tl.float64)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            t = tl.load(t_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            s = tl.load(s_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            z_t += tl.sum(tl.exp((t - m_t) * inv_temp), 0).to(tl.float64)
            z_s += tl.sum(tl.exp((s - m_s) * inv_temp), 0).to(tl.float64)
        # A row whose logits hold NaN or +inf, or are all −inf, has no distribution: z is NaN
        # then (NaN compares false). Its weight becomes NaN, which every output is multiplied
        # by, as a NaN weight from the caller (a band it could not check) is.
        good = (z_t > 0.0) & (z_t < float("inf")) & (z_s > 0.0) & (z_s < float("inf"))
        w = tl.where(good, w, float("nan"))
        inv_z = (1.0 / z_t).to(tl.float32)
        # log q = (s − m_s)/T − log z_s: small terms added to differences, never to maxima
        log_zs = tl.log(z_s).to(tl.float32)
        # targets, in the masses as computed (the fp32 probabilities sum to `total`, not
        # exactly 1): l·total with "mass at or above > x", u·total with "≥ x". The total is the
        # first sweep's sum above threshold 0, summed exactly as every later threshold's sum
        # (the same reduction), so the search's invariant f(prefix) ≥ x holds bit for bit.
        # u = 1 clips no tail: its group is dropped below (as on the CPU).
        x_l = lower
        x_u = upper
        total = tl.zeros((), tl.float64)
        digits = tl.arange(0, 16)
        pre_l = tl.zeros((), tl.int32)
        pre_u = tl.zeros((), tl.int32)
        for d in tl.static_range(8):
            shift = 28 - 4 * d
            f_l = tl.zeros((16,), tl.float64)
            f_u = tl.zeros((16,), tl.float64)
            for v0 in range(0, V, BLOCK):
                p = _probs(t_ptr, v0 + offs, V, inv_temp, m_t, inv_z)
                bits = p.to(tl.int32, bitcast=True)
                p64 = p.to(tl.float64)
                # one reduction per candidate, not a (BLOCK, 16) tile: few registers on a GPU
                for c in tl.static_range(16):
                    th_l = pre_l | (c << shift)
                    th_u = pre_u | (c << shift)
                    f_l += tl.where(digits == c, tl.sum(tl.where(bits >= th_l, p64, 0.0), 0), 0.0)
                    f_u += tl.where(digits == c, tl.sum(tl.where(bits >= th_u, p64, 0.0), 0), 0.0)
            if d == 0:
                total = tl.sum(tl.where(digits == 0, f_u, 0.0), 0)
                x_l = lower * total
                x_u = upper * total
            valid = digits < 8 if d == 0 else digits >= 0  # the sign bit is 0
            ok_l = valid & (f_l > x_l)
            ok_u = valid & (f_u >= x_u)
            pre_l = pre_l | (tl.max(tl.where(ok_l, digits, 0), 0) << shift)
            pre_u = pre_u | (tl.max(tl.where(ok_u, digits, 0), 0) << shift)
        # each group: the mass strictly above it, its size
        lo_l = tl.zeros((), tl.float64)
        lo_u = tl.zeros((), tl.float64)
        n_l = tl.zeros((), tl.int32)
        n_u = tl.zeros((), tl.int32)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            p = _probs(t_ptr, cols, V, inv_temp, m_t, inv_z)
            bits = p.to(tl.int32, bitcast=True)
            lo_l += tl.sum(tl.where(bits > pre_l, p.to(tl.float64), 0.0), 0)
            lo_u += tl.sum(tl.where(bits > pre_u, p.to(tl.float64), 0.0), 0)
            n_l += tl.sum(((bits == pre_l) & (cols < V)).to(tl.int32), 0)
            n_u += tl.sum(((bits == pre_u) & (cols < V)).to(tl.int32), 0)
        tail = upper < 1.0
        pre_u = tl.where(tail, pre_u, 0)  # no tail clipped: the "group" of zeros, never used
        v_l = pre_l.to(tl.float32, bitcast=True)
        v_u = pre_u.to(tl.float32, bitcast=True)
        width = upper - lower
        norm = total * width  # p̃ = overlap / (count · norm)
        ov_l = tl.minimum(lo_l + n_l.to(tl.float64) * v_l.to(tl.float64), x_u) - tl.maximum(lo_l, x_l)
        ov_u = tl.minimum(lo_u + n_u.to(tl.float64) * v_u.to(tl.float64), x_u) - tl.maximum(lo_u, x_l)
        share_l = tl.maximum(ov_l, 0.0) / (n_l.to(tl.float64) * norm)
        share_u = tl.where(tail, tl.maximum(ov_u, 0.0) / (tl.maximum(n_u, 1).to(tl.float64) * norm), 0.0)
        log_share_l = tl.log(tl.maximum(share_l, 1e-300))
        log_share_u = tl.log(tl.maximum(share_u, 1e-300))
        inv_norm = (1.0 / norm).to(tl.float32)
        log_rest = (tl.log(z_t) + tl.log(norm)).to(tl.float32)  # log p̃ = (t − m_t)/T − this
        # the loss, the gradient, Σ log q over each boundary group
        loss = tl.zeros((), tl.float64)
        lq_l = tl.zeros((), tl.float64)
        lq_u = tl.zeros((), tl.float64)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            live = cols < V
            t = tl.load(t_ptr + cols, mask=live, other=float("-inf")).to(tl.float32)
            s = tl.load(s_ptr + cols, mask=live, other=0.0).to(tl.float32)
            p = tl.exp((t - m_t) * inv_temp) * inv_z  # as in _probs, bit for bit
            lq = (s - m_s) * inv_temp - log_zs
            in_l = (p == v_l) & live
            in_u = tl.where(tail, (p == v_u) & live & ~in_l, False)
            inner = (p < v_l) & (p > v_u)
            pc = tl.where(in_l, share_l.to(tl.float32),
                          tl.where(in_u, share_u.to(tl.float32), tl.where(inner, p * inv_norm, 0.0)))
            log_pc = tl.where(in_l, log_share_l.to(tl.float32),
                              tl.where(in_u, log_share_u.to(tl.float32),
                                       (t - m_t) * inv_temp - log_rest))
            q = tl.where(live, tl.exp(lq), 0.0)
            # Σ p̃·(log p̃ − log q) as Σ q·φ(log p̃ − log q) (kl_term): no cancellation at large T
            loss += tl.sum(kl_term(pc, q, log_pc - lq), 0).to(tl.float64)
            lq_l += tl.sum(tl.where(in_l, lq, 0.0), 0).to(tl.float64)
            lq_u += tl.sum(tl.where(in_u, lq, 0.0), 0).to(tl.float64)
            if GRAD_S:
                g = (w * inv_temp) * (tl.exp(lq) - pc)
                tl.store(g_ptr + cols, g.to(GS.dtype.element_ty), mask=live)
        lq_u = tl.where(tail & (pre_l == pre_u), lq_l, lq_u)  # one group holds both bounds
        k = loss + 1.0
        mean_l = log_share_l + 1.0 - lq_l / n_l.to(tl.float64)
        mean_u = tl.where(tail, log_share_u + 1.0 - lq_u / tl.maximum(n_u, 1).to(tl.float64), 0.0)
        tl.store(LOSS + row, (w * loss).to(tl.float32))
        flat = tail & (pre_l == pre_u)  # p̃ = 1/count on one group whatever l and u
        tl.store(GB + row, (w * tl.where(flat, 0.0, (k - mean_l) / width)).to(tl.float32))
        tl.store(GB + N + row, (w * tl.where(flat, 0.0, (mean_u - k) / width)).to(tl.float32))


def dac_kl_fwd(student, teacher, lower, upper, row_weight, temperature, reduce, grad_student,
               grad_bounds):
    """Launcher behind kdkernels::dac_kl_fwd_triton (see kdkernels/ops/dac_kl.py)."""
    n, v = student.shape
    gs = torch.empty((n, v) if grad_student else (0,), device=student.device,
                     dtype=grad_dtype(student.dtype, per_row_scaling=not reduce))
    rows = torch.zeros(n, device=student.device, dtype=torch.float32)
    gb = torch.zeros(2, n, device=student.device, dtype=torch.float32)
    if n and v:
        block = min(triton.next_power_of_2(v), 1024 if triton_interpreted() else 2048)
        _dac_kl_fwd_kernel[(n,)](
            student, teacher, lower.contiguous(), upper.contiguous(),
            row_weight.float().contiguous(), rows, gs if grad_student else rows, gb, n, v,
            student.stride(0), teacher.stride(0), v if grad_student else 0, 1.0 / temperature,
            BLOCK=block, GRAD_S=grad_student)
    loss = rows.double().sum().float() if reduce else rows
    if not grad_bounds:
        gb.zero_()
    return loss, gs, gb
