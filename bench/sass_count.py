"""Static SASS of the CUDA divergence kernels' sweeps: instructions per logit, without a GPU.

The kernels are bound by instruction issue on an H200 (bench/results/2026-11-29-h200.md): a
warp scheduler issues one instruction per cycle, so the instructions each thread executes
per logit set the time once HBM no longer does. This compiles one mode's translation unit
(csrc/cuda/divergence_<mode>.cu, nvcc -O3 as setup.py and CMake build it, plus -lineinfo),
disassembles it with the nvdisasm that Triton's package ships (this CUDA toolkit has none),
and finds the loops of the sweeps by their source lines (nvdisasm -gi: every instruction's
chain of inlined source lines): the `for` of each sweep in row_sweeps, TAID's copy by its
call in row_loss or its mixing in load_pq, the variants by the stores they make. Each loop's instructions divided by
the logits one trip handles (its 16-byte loads of P and Q, times the elements per vector)
is the count per element. Every vector is whole, so a loop body is the path each trip takes,
up to the predicated and the rarely taken branches it holds.

A count guides the work; only a GPU measures it (issue 16). Usage:

    python bench/sass_count.py [--arch 90] [--mode kl jsd ...] [--dtype bf16] [--ops] [--taid]

The cubins are cached in /tmp by the sources' hash.
"""
import argparse
import collections
import hashlib
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "csrc", "cuda", "divergence_kernels.cuh")
DEPENDS = ["csrc/cuda/divergence_kernels.cuh", "csrc/cuda/divergence.cuh", "csrc/kl_term.h"]
MODES = {"kl": 0, "skew": 1, "jsd": 2, "tvd": 3}
DTYPES = {"bf16": ("__nv_bfloat16", 8), "fp16": ("__half", 8), "fp32": ("float", 4)}


def nvdisasm():
    import triton  # noqa: PLC0415  (Triton's wheel carries the disassembler)
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(path):
        sys.exit(f"{path} not found (Triton's NVIDIA backend ships it)")
    return path


def cubin(mode, arch):
    src = os.path.join(ROOT, "csrc", "cuda", f"divergence_{mode}.cu")
    digest = hashlib.sha256(f"{arch}".encode())
    for s in [src] + [os.path.join(ROOT, d) for d in DEPENDS]:
        digest.update(open(s, "rb").read())
    out = f"/tmp/kdk-sass-{mode}-{arch}-{digest.hexdigest()[:16]}.cubin"
    if not os.path.exists(out):
        cmd = ["nvcc", "-O3", "-std=c++17", "-lineinfo", "-cubin",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-I", os.path.join(ROOT, "csrc"),
               src, "-o", out + ".tmp"]
        print(f"compiling {os.path.basename(src)} for sm_{arch} (about a minute)", file=sys.stderr)
        subprocess.run(cmd, check=True)
        os.replace(out + ".tmp", out)
    return out


def key_lines():
    """Source lines (1-based) of divergence_kernels.cuh that name a loop: each sweep's `for`
    (the first one after its '// sweep N' comment in row_sweeps), TAID's call in row_loss,
    and the stores that tell the variants apart."""
    text = open(KERNELS).read().splitlines()
    keys, sweep = {}, None
    for i, line in enumerate(text, 1):
        m = re.match(r"\s*// sweep (\d)", line)
        if m:
            sweep = m.group(1)
        elif sweep and re.match(r"\s*for \(int j = first; j < n; j \+= step\)", line):
            keys[f"sweep {sweep}"] = i
            sweep = None
        if "row_sweeps<kMode, VEC, kLeanTaid>" in line:
            keys["taid"] = i
        if "const float mixed = a.lam" in line:  # TAID's mixing in load_pq
            keys["taid mix"] = i
        for name, pattern in (("fused", "store_vec<VEC>(gq, j, g);"),
                              ("stores P", "store_vec<VEC>(gp, j, g_p);"),
                              ("stores Q", "store_vec<VEC>(gq, j, g_q);")):
            if pattern in line:
                keys[name] = i
    missing = {"sweep 1", "sweep 2", "sweep 3", "taid", "taid mix", "fused", "stores P",
               "stores Q"} - set(keys)
    if missing:
        sys.exit(f"sass_count: {sorted(missing)} not found in {KERNELS}: update key_lines()")
    return keys


def functions(path):
    """{demangled kernel name: [(lines of the inline chain, label or None, instruction)]}."""
    sass = subprocess.run([nvdisasm(), "-gi", "-c", path], check=True, capture_output=True,
                          text=True).stdout
    funcs, name, chain, fresh = {}, None, set(), False
    for line in sass.splitlines():
        m = re.match(r"\.text\.(\S+):", line)
        if m:
            name = subprocess.run(["c++filt"], input=m.group(1), capture_output=True,
                                  text=True).stdout.strip()
            funcs[name], chain = [], set()
            continue
        if name is None:
            continue
        m = re.match(r"\s*//## File \"(.*?)\", line (\d+)(?: inlined at \"(.*?)\", line (\d+))?", line)
        if m:
            if not fresh:
                chain, fresh = set(), True
            for f, n in ((m.group(1), m.group(2)), (m.group(3), m.group(4))):
                if f and f.endswith("divergence_kernels.cuh"):
                    chain.add(int(n))
            continue
        fresh = False
        m = re.match(r"(\.L_x_\d+):", line)
        if m:
            funcs[name].append((chain, m.group(1), None))
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if m:
            funcs[name].append((chain, None, m.group(1)))
    return funcs


def opcode(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def loops(insts):
    """Innermost loops as (first, last) indices: a branch back to a label before it, holding
    no other such loop."""
    where = {label: i for i, (_, label, _) in enumerate(insts) if label}
    spans = []
    for i, (_, _, text) in enumerate(insts):
        if text and opcode(text) == "BRA":
            m = re.search(r"\(\s*(\.L_x_\d+)\s*\)", text)
            if m and m.group(1) in where and where[m.group(1)] < i:
                spans.append((where[m.group(1)], i))
    return [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]


def classify(body, keys):
    lines = set().union(*(c for c, _, _ in body))
    sweeps = [k for k in ("sweep 1", "sweep 2", "sweep 3") if keys[k] in lines]
    if len(sweeps) != 1:
        return None
    parts = [sweeps[0]]
    if sweeps[0] == "sweep 2" and keys["fused"] in lines:
        parts.append("fused: writes g_Q")
    if sweeps[0] == "sweep 3":
        parts.append("+".join(s[-1] for s in ("stores P", "stores Q") if keys[s] in lines) + " side")
    if keys["taid"] in lines or keys["taid mix"] in lines:
        parts.append("TAID")
    return ", ".join(parts)


def report(mode, dtype, kind, funcs, keys, show_ops, show_taid):
    t, vec = DTYPES[dtype]
    prefix = (f"divergence_fwd_kernel<{MODES[mode]}, {vec}, {t}, {t}, false>" if kind == "streaming"
              else f"divergence_fwd_cluster_kernel<{MODES[mode]}, {vec}, {t}, {t}>")
    names = [n for n in funcs if prefix in n]
    if not names:
        print(f"{mode} {dtype} {kind}: no kernel {prefix}")
        return {}
    insts = [i for i in funcs[names[0]] if i[2] is not None or i[1]]
    rows = {}
    for lo, hi in loops(insts):
        body = [b for b in insts[lo:hi + 1] if b[2] is not None]
        what = classify(body, keys)
        if what is None or ("TAID" in what and not show_taid):
            continue
        ops = collections.Counter(opcode(t) for _, _, t in body)
        loads = sum(c for o, c in ops.items() if o in ("LDG.E.128", "LDG.E.128.CONSTANT", "LDS.128"))
        if loads == 0:
            continue
        elems = loads / 2 * vec
        mufu = sum(c for o, c in ops.items() if o.startswith("MUFU"))
        rows[what] = len(body) / elems
        print(f"  {what:34s} {len(body):4d} instructions / {elems:3g} logits = "
              f"{len(body) / elems:5.1f} per logit (MUFU {mufu / elems:.2f})")
        if show_ops:
            print("      " + ", ".join(f"{o} {c}" for o, c in ops.most_common()))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90")
    ap.add_argument("--mode", nargs="*", default=["kl", "jsd", "tvd", "skew"], choices=list(MODES))
    ap.add_argument("--dtype", nargs="*", default=["bf16"], choices=list(DTYPES))
    ap.add_argument("--cluster", action="store_true", help="the cluster kernel too")
    ap.add_argument("--taid", action="store_true", help="TAID's copies of the sweeps too")
    ap.add_argument("--ops", action="store_true", help="opcode histogram per loop")
    args = ap.parse_args()
    keys = key_lines()
    for mode in args.mode:
        funcs = functions(cubin(mode, args.arch))
        for dtype in args.dtype:
            for kind in ["streaming"] + (["cluster"] if args.cluster else []):
                print(f"{mode} {dtype} {kind} kernel (sm_{args.arch}):")
                report(mode, dtype, kind, funcs, keys, args.ops, args.taid)


if __name__ == "__main__":
    main()
