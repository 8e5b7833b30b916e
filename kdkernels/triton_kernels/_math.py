"""Triton device functions shared by the kernel families."""
import triton
import triton.language as tl


@triton.jit
def kl_term(x, y, v):
    """y·φ(v) = x·v − x + y, v = log x − log y: the term of KL(x‖y) that is ≥ 0, so a row's KL
    sums without cancellation (csrc/kl_term.h says why; the spec is
    kdkernels/reference/divergence.py kl_term): the series for |v| < 1/2, else x·(v − 1) + y;
    y where x == 0."""
    small = tl.abs(v) < 0.5
    vs = tl.where(small, v, 0.0)
    poly = vs * (1.0 / 45360.0) + 1.0 / 5760.0
    poly = poly * vs + 1.0 / 840.0
    poly = poly * vs + 1.0 / 144.0
    poly = poly * vs + 1.0 / 30.0
    poly = poly * vs + 1.0 / 8.0
    poly = poly * vs + 1.0 / 3.0
    poly = poly * vs + 0.5
    big = x * (tl.where(small, 0.0, v) - 1.0) + y
    return tl.where(x > 0.0, tl.where(small, y * poly * vs * vs, big), y)
