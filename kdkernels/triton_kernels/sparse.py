"""Triton kernels of the sparse-teacher family: the student's full-vocabulary passes, one
program per row, each a sweep over the row in column blocks.

The teacher is known only at K entries per row, but the student's distribution is over the
whole vocabulary, so two passes read all V of its logits x:
    row_logsumexp   lse = log Σ_v e^(x_v), the normalizer: log q = x − lse, which the caller
                    gathers at the teacher's indices (as the row maximum and log Σ e^(x − max))
    scaled_exp_     x_v ← coef·e^(x_v − base), in place over the logits: the gradient's part
                    outside the top-k entries, which the caller completes at those entries
−inf logits are entries of probability 0: log-sum-exp ignores them and scaled_exp_ writes
exactly 0 there, never NaN.
"""
import triton
import triton.language as tl

from .._backend import triton_interpreted

# Logits per block of a row, as in divergence.py: on a GPU 4096; interpreted, whole rows up
# to 65536. Tests lower the interpreter's to cover the multi-block sweeps.
MAX_BLOCK = {"gpu": 4096, "interpreted": 65536}


def _block(v):
    cap = MAX_BLOCK["interpreted" if triton_interpreted() else "gpu"]
    return min(triton.next_power_of_2(v), cap)


@triton.jit
def _row_logsumexp_kernel(X, OUT_MAX, OUT, x_stride, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * x_stride
    offs = tl.arange(0, BLOCK)
    # Online log-sum-exp: m the running maximum, z = Σ e^(x − m); each block one max and one
    # rescale. NaN and +inf make z NaN.
    m = tl.full((), float("-inf"), tl.float32)
    z = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(X + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all −inf so far: z stays 0
        z = z * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
    # The maximum and log z apart (the caller adds them in float64: rounding their sum to
    # fp32 would cost |lse|·2^-24 of relative error in every e^(x − lse)). An all −inf row:
    # maximum 0 (a finite base for scaled_exp_), log 0 = −inf.
    tl.store(OUT_MAX + row, tl.where(m == float("-inf"), 0.0, m))
    tl.store(OUT + row, tl.log(z))


@triton.jit
def _scaled_exp_kernel(X, COEF, BASE, x_stride, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * x_stride
    coef = tl.load(COEF + row)
    base = tl.load(BASE + row)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + offs
        msk = cols < V
        x = tl.load(X + cols, mask=msk, other=float("-inf")).to(tl.float32)
        # −inf is probability 0: exactly 0, also when coef is ±inf or NaN
        y = tl.where(x == float("-inf"), 0.0, coef * tl.exp(x - base))
        tl.store(X + cols, y.to(X.dtype.element_ty), mask=msk)


def row_logsumexp(x, out_max, out):
    """log Σ_j e^(x[i, j]) = out_max[i] + out[i] for x (m, V) float32 (any row stride, unit
    column stride), out_max and out (m,) float32 contiguous: out_max the row maximum (0 for an
    all −inf row), out the log of Σ e^(x − max) (≥ 0; −inf for an all −inf row; NaN for rows
    holding NaN or +inf). One read of x."""
    m, v = x.shape
    if m == 0:
        return out_max, out
    block = _block(v)
    _row_logsumexp_kernel[(m,)](x, out_max, out, x.stride(0), v, BLOCK=block,
                                num_warps=8 if block >= 2048 else 4)
    return out_max, out


def scaled_exp_(x, coef, base):
    """In place: x[i, j] ← coef[i]·e^(x[i, j] − base[i]) for x (m, V) float32 (any row stride,
    unit column stride), coef and base (m,) float32 contiguous, base finite. −inf entries of x
    become exactly 0."""
    m, v = x.shape
    if m == 0:
        return x
    block = _block(v)
    _scaled_exp_kernel[(m,)](x, coef, base, x.stride(0), v, BLOCK=block,
                             num_warps=8 if block >= 2048 else 4)
    return x
