"""Registers and spills of kdkernels' Triton kernels on a GPU architecture, without a GPU:
each kernel is compiled to PTX by the real Triton compiler, then assembled by Triton's own
ptxas with -v. Spill stores mean the kernel's tiles do not fit its threads' registers (pick
more warps or smaller blocks). Usage: `python bench/triton_registers.py [arch]` (default 90)."""
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from kdkernels.triton_kernels import token_relation as tr
from kdkernels.triton_kernels.dac_kl import _dac_kl_fwd_kernel


def report(fn, signature, consts, arch, warps):
    src = ASTSource(fn=fn, constexprs=consts,
                    signature={**signature, **{c: "constexpr" for c in consts}})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", f.name,
                              "-o", "/dev/null"], capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores", out)
    return f"{regs[0] if regs else '?'} registers, {spills[0] if spills else '?'} B spill stores"


def main(arch):
    feats = {n: "*bf16" for n in ("FS", "XS", "FT", "XT")}
    scalars = {"T": "i32", "scale_s": "fp32", "scale_t": "fp32"}
    grads = {"MASK": "*i8", "STATS": "*fp32", "GRAD": "*fp32"}
    for ds, dt in ((64, 64), (384, 768)):
        meta, dsp = tr._meta_for(ds, dt, False, True, False)
        fake = type("F", (), {"shape": (ds,)})
        bwd = {**meta, "DSP": dsp}
        for name, fn, extra, consts, backward in (
                ("token_relation fwd", tr._tr_fwd_kernel, {"MASK": "*i8", "ROWS": "*fp32", "STATS": "*fp32"}, meta, False),
                ("token_relation bwd rows", tr._tr_bwd_kernel, {**grads, "OUT": "*fp32"}, {**bwd, "COLS": False}, True),
                ("token_relation bwd cols", tr._tr_bwd_kernel, {**grads, "OUT": "*fp32"}, {**bwd, "COLS": True}, True)):
            warps = tr._warps(fake, backward)
            print(f"{name:<26} d_s={ds:<4} {warps} warps: "
                  f"{report(fn, {**feats, **extra, **scalars}, consts, arch, warps)}")
    sig = {"S": "*bf16", "T": "*bf16", "LO": "*fp64", "HI": "*fp64", "W": "*fp32", "LOSS": "*fp32",
           "GS": "*bf16", "GB": "*fp32", "N": "i32", "V": "i32", "s_stride": "i64",
           "t_stride": "i64", "gs_stride": "i64", "inv_temp": "fp32"}
    print(f"{'dac_kl fwd':<26} BLOCK=2048  4 warps: "
          f"{report(_dac_kl_fwd_kernel, sig, dict(BLOCK=2048, GRAD_S=True), arch, 4)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
