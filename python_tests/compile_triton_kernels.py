"""Compile kdkernels' Triton kernels with the real compiler for GPU architectures given on the
command line (e.g. `python compile_triton_kernels.py 80 90`), without a GPU. Used by
test_divergence.py::test_triton_kernels_compile_for_gpus (TRITON_INTERPRET must be unset)."""
import itertools
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kdkernels.triton_kernels import mixing_matrix as mm
from kdkernels.triton_kernels import token_relation as tr
from kdkernels.triton_kernels.dac_kl import _dac_kl_fwd_kernel
from kdkernels.triton_kernels.divergence import _divergence_fwd_kernel

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET"

PTRS = {"S": "*bf16", "T": "*fp16", "W": "*fp32", "LOSS": "*fp32", "GS": "*bf16", "GT": "*fp16"}
INTS = {n: "i64" for n in ("s_stride", "t_stride", "gs_stride", "gt_stride")} | {"V": "i32"}
FLOATS = {n: "fp32" for n in ("inv_t", "mix", "lam", "c_p", "c_q", "gs_factor", "gt_factor")}


def variants():
    for mode, swap, taid, (gs, gt) in itertools.product(
            range(4), (False, True), (False, True), ((True, False), (True, True), (False, False))):
        need_q = (gs and not swap) or (gt and swap)
        need_p = (gs and swap) or (gt and not swap)
        yield dict(MODE=mode, SWAP=swap, TAID=taid, GRAD_S=gs, GRAD_T=gt,
                   FUSED_Q=mode == 0 and need_q and not need_p, BLOCK=4096)


MM_COMMON = {"Q": "*fp32", "K": "*fp32", "C": "*fp32", "Bm": "*fp32", "CS": "*fp64", "DV": "*fp32",
             "LSE": "*fp32"}
MM_KERNELS = [  # (kernel, its other arguments' types, extra constexprs)
    (mm._mm_fwd_kernel, {"PART": "*fp32", "T": "i32", "scale": "fp32"}, ({"HAS_LSE": False}, {"HAS_LSE": True})),
    (mm._mm_bwd_rows_kernel, {"COEF": "*fp32", "DC": "*fp32", "DCS": "*fp32", "DDP": "*fp32", "T": "i32",
                              "n_blocks": "i32", "scale": "fp32"}, ({},)),
    (mm._mm_bwd_cols_kernel, {"COEF": "*fp32", "DB": "*fp32", "DCS": "*fp32", "T": "i32",
                              "n_blocks": "i32", "scale": "fp32"}, ({},)),
]


TR_KERNELS = [  # (kernel, its other pointers, COLS for the backward kernel or None)
    (tr._tr_fwd_kernel, {"MASK": "*i8", "BAD": "*i8", "ROWS": "*fp32", "STATS": "*fp32"}, None),
    (tr._tr_bwd_kernel, {"MASK": "*i8", "BAD": "*i8", "STATS": "*fp32", "GRAD": "*fp32",
                         "OUT": "*fp32"}, False),
    (tr._tr_bwd_kernel, {"MASK": "*i8", "BAD": "*i8", "STATS": "*fp32", "GRAD": "*fp32",
                         "OUT": "*fp32"}, True),
]


def tr_variants():
    """(dtype, d_s, d_t, causal, mask, mse): GPU-like and issue-5-CPU-like widths."""
    yield "bf16", 64, 64, False, False, False
    yield "bf16", 64, 64, True, True, True
    yield "fp32", 384, 768, False, True, False
    yield "fp16", 48, 80, True, False, True


def compile_one(fn, signature, consts, arch):
    src = ASTSource(fn=fn, constexprs=consts,
                    signature={**signature, **{c: "constexpr" for c in consts}})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
    assert "ld.global" in compiled.asm["ptx"] and compiled.asm["cubin"], (fn, consts)


for arch in map(int, sys.argv[1:]):
    n = 0
    for consts in variants():
        compile_one(_divergence_fwd_kernel, {**PTRS, **INTS, **FLOATS}, consts, arch)
        n += 1
    print(f"compiled {n} variants for sm_{arch}")
    m = 0
    for fn, extra, variants_mm in MM_KERNELS:
        for more in variants_mm:
            for head_d, n_state, dt in ((16, 16, "fp32"), (64, 64, "bf16"), (48, 24, "fp16")):
                consts = dict(HEAD_D=head_d, N=n_state, DP=max(16, triton.next_power_of_2(head_d)),
                              NP=max(16, triton.next_power_of_2(n_state)), BLOCK=64, **more)
                tiles = {name: f"*{dt}" for name in ("Q", "K", "C", "Bm")}
                compile_one(fn, {**MM_COMMON, **tiles, **extra}, consts, arch)
                m += 1
    print(f"compiled {m} mixing-matrix kernels for sm_{arch}")
    k = 0
    for fn, extra, cols in TR_KERNELS:
        for dt, ds, dtt, causal, mask, mse in tr_variants():
            meta, dsp = tr._meta_for(ds, dtt, causal, mask, mse)
            consts = {**meta, **({"DSP": dsp, "COLS": cols} if cols is not None else {})}
            feats = {name: f"*{dt}" for name in ("FS", "XS", "FT", "XT")}
            scalars = {"T": "i32", "scale_s": "fp32", "scale_t": "fp32"}
            compile_one(fn, {**feats, **extra, **scalars}, consts, arch)
            k += 1
    print(f"compiled {k} token-relation kernels for sm_{arch}")
    j = 0
    for s_t, t_t, g_t, grad in (("*bf16", "*bf16", "*bf16", True), ("*fp32", "*fp16", "*fp32", True),
                                ("*fp16", "*fp32", "*fp32", False)):
        sig = {"S": s_t, "T": t_t, "LO": "*fp64", "HI": "*fp64", "W": "*fp32", "LOSS": "*fp32",
               "GS": g_t, "GB": "*fp32", "N": "i32", "V": "i32", "s_stride": "i64",
               "t_stride": "i64", "gs_stride": "i64", "inv_temp": "fp32"}
        compile_one(_dac_kl_fwd_kernel, sig, dict(BLOCK=2048, GRAD_S=grad), arch)
        j += 1
    print(f"compiled {j} dac-kl kernels for sm_{arch}")
