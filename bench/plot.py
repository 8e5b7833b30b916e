"""Figures of benchmark results (pytest-benchmark's --benchmark-json files from bench/):
median time and peak memory against V at a fixed N, and against N at a fixed V, one line per
implementation, one panel per kind and mode (time on top, peak memory below, both log scale).

    python bench/plot.py RESULT.json [RESULT2.json ...] [--out DIR] [--fix N=8192] [--machine M]

Each input gives <stem>-vs-V.png and <stem>-vs-N.png in DIR (default bench/results/); an axis
with a single point in the file is skipped, saying so. Where one file holds several benchmarks
or dtypes with a sweep on the same axis, the name also carries them
(<stem>-<test>-<dtype>-vs-V.png). The fixed other dimensions are those with the most points on
the axis (--fix DIM=VALUE chooses). The title names the machine: the GPU (machine_info's "gpu",
else a GPU model named in the file's name, e.g. "h200", else --machine) or "CPU, n cores", with
the dtype and the run's date. Each panel notes, at the axis' largest point, how much faster and
leaner kdkernels is than eager (or the reference where there is no eager row).

Benchmark names differ per file: test_divergence[dtype-NxV-kind-impl-mode],
test_fused_linear[dtype-NxHxV-kind-impl], test_sparse[dtype-NxVxK-impl-variant], older ones
without dtype and shape (test_divergence[kind-impl-mode]) or with neither kind nor shape
(test_dac_kl[cpu-32000]): parse_name() takes what the name has and fills the rest from
extra_info's group ("fkl fwd+bwd  N=8192 V=128256 bfloat16 cuda") and the params."""
import argparse
import json
import math
import os
import re
from pathlib import Path

DTYPES = {"float32", "float16", "bfloat16", "float64", "half", "float", "double",
          "float8_e4m3fn", "float8_e5m2", "fp32", "fp16", "bf16", "tf32"}
MODES = ("fwd+bwd", "fwd", "bwd")
DEVICES = {"cpu", "cuda", "mps", "xpu", "hip", "rocm"}
# Implementations named in bench/*.py; impl names hold '-' and '.', so a name is matched against
# these (longest first) rather than split. What follows a known implementation in a name, if it
# is not a mode, is its variant (kdkernels-cpu-renorm: kdkernels-cpu, variant renorm).
KNOWN_IMPLS = sorted([
    "kdkernels", "kdkernels-auto", "kdkernels-cpu", "kdkernels-triton", "kdkernels-cuda",
    "kdkernels-cuda-cluster", "eager", "torch.compile", "liger", "liger-triton", "trl",
    "trl-topk", "bare-matmuls", "distillkit", "distillkit-compile", "reference", "compile",
    "cpu", "triton", "cuda"], key=len, reverse=True)
GPU_MODELS = re.compile(r"(?<![a-z0-9])(gb200|b200|b100|h200|h100|h800|gh200|a100|a800|a10g|a10|"
                        r"a40|a6000|l40s|l40|l4|v100|t4|mi300x|mi300|mi250x?|rtx\d{4})(?![a-z0-9])")
AXES = ("V", "N")
BASELINES = ("eager", "reference (eager)", "reference (sort, eager)", "reference", "distillkit")


def _int(s):
    try:
        return int(s)
    except ValueError:
        try:
            return float(s)
        except ValueError:
            return s


def parse_group(group):
    """extra_info's group, "fkl fwd+bwd  N=8192 V=128256 bfloat16 cuda", as a dict: kind (the
    words before the mode), mode, dims (every KEY=value), dtype, device; absent fields are None."""
    out = dict(kind=None, mode=None, dims={}, dtype=None, device=None)
    if not group:
        return out
    head = []
    for tok in group.split():
        if "=" in tok:
            key, value = tok.split("=", 1)
            out["dims"][key] = _int(value)
        elif tok in DTYPES:
            out["dtype"] = tok
        elif tok in DEVICES:
            out["device"] = tok
        elif tok in MODES:
            out["mode"] = tok
        elif not out["dims"] and out["mode"] is None:
            head.append(tok)
    out["kind"] = " ".join(head) or None
    return out


def _dims_from_shape(test, numbers):
    if len(numbers) == 2:
        names = "NV"
    elif len(numbers) == 3:
        names = "NHV" if "fused_linear" in test and not re.search("sparse|topk", test) else "NVK"
    elif len(numbers) == 4:
        names = "NHVK"
    else:
        return {}
    return dict(zip(names, numbers))


def _find(tokens, sub):
    for i in range(len(tokens) - len(sub) + 1):
        if tokens[i:i + len(sub)] == sub:
            return i
    return -1


def _variant(impl):
    """The suffix of impl past its longest known implementation, or None."""
    for known in KNOWN_IMPLS:
        if impl.startswith(known + "-") and impl not in KNOWN_IMPLS:
            return impl[len(known) + 1:]
    return None


def parse_name(name, impl=None, group=None, params=None):
    """Fields of one benchmark: test, dtype, dims ({"N": 8192, "V": 128256, ...}), kind, impl,
    mode, variant, device. From the name first; impl (extra_info's, when given) is looked for in
    the name as a whole, else the known implementations are; the group and the params fill what
    the name lacks (the group's dims win: it names them)."""
    m = re.match(r"^([^\[]+)(?:\[(.*)\])?$", name)
    test, param = (m.group(1), m.group(2) or "") if m else (name, "")
    out = dict(test=test, dtype=None, dims={}, kind=None, impl=None, mode=None, variant=None,
               device=None)
    rest = []
    for tok in param.split("-") if param else []:
        if out["dtype"] is None and not out["dims"] and not rest and tok in DTYPES:
            out["dtype"] = tok
        elif not out["dims"] and re.fullmatch(r"\d+(?:x\d+)+", tok):
            out["dims"] = _dims_from_shape(test, [int(x) for x in tok.split("x")])
        else:
            rest.append(tok)
    candidates = ([impl] if impl else []) + KNOWN_IMPLS
    for cand in candidates:
        at = _find(rest, cand.split("-"))
        if at < 0:
            continue
        before, after = rest[:at], rest[at + len(cand.split("-")):]
        out["kind"] = "-".join(before) or None
        modes = [t for t in after if t in MODES]
        others = [t for t in after if t not in MODES and not t.isdigit()]
        out["mode"] = modes[0] if modes else None
        out["impl"] = cand if cand == impl else "-".join([cand] + others)
        break
    else:  # no implementation in the name (test_dac_kl[cpu-32000]): a mode may still be there
        out["mode"] = next((t for t in rest if t in MODES), None)
    if impl:
        out["impl"] = impl
    if out["impl"]:
        out["variant"] = _variant(out["impl"])
    g = parse_group(group)
    out["dims"] = {**out["dims"], **g["dims"]}
    for key in ("kind", "mode", "dtype", "device"):
        if out[key] is None:
            out[key] = g[key]
    for key, value in (params or {}).items():
        if key.upper() in ("N", "V", "H", "K") and key.upper() not in out["dims"] \
                and isinstance(value, int):
            out["dims"][key.upper()] = value
        elif key in ("kind", "mode", "impl") and out[key] is None and isinstance(value, str):
            out[key] = value
        elif key == "dtype" and out["dtype"] is None and isinstance(value, str):
            out["dtype"] = re.sub(r"^.*torch\.|\]$", "", value)
    return out


def load(path):
    """(records, info) of one --benchmark-json file: a record per benchmark with its parsed
    fields and median_s and peak (bytes, None where not measured)."""
    with open(path) as f:
        data = json.load(f)
    records = []
    for b in data.get("benchmarks", []):
        extra = b.get("extra_info") or {}
        r = parse_name(b.get("name", ""), impl=extra.get("impl"), group=extra.get("group"),
                       params=b.get("params"))
        median = extra.get("median_s")
        if median is None:
            median = (b.get("stats") or {}).get("median")
        if median is None or r["impl"] is None:
            continue
        r.update(median_s=float(median), peak=extra.get("peak"))
        records.append(r)
    return records, dict(machine_info=data.get("machine_info") or {},
                         datetime=data.get("datetime") or
                         (data.get("commit_info") or {}).get("time"), stem=Path(path).stem)


def machine_name(info, records, override=None):
    if override:
        return override
    mi = info["machine_info"]
    for key in ("gpu", "gpu_name", "cuda_device", "cuda_device_name", "device_name"):
        g = mi.get(key)
        if isinstance(g, dict):
            g = g.get("name")
        if isinstance(g, list) and g:
            g = g[0] if isinstance(g[0], str) else (g[0] or {}).get("name")
        if isinstance(g, str) and g:
            return g
    devices = {r["device"] for r in records if r["device"]}
    if devices - {"cpu"}:
        m = GPU_MODELS.search(info["stem"].lower())
        if m:
            model = m.group(1).upper()
            return model if model.startswith("MI") else f"NVIDIA {model}"
        return "GPU"
    cpu = mi.get("cpu") or {}
    count = cpu.get("count")
    brand = re.sub(r"\((R|TM)\)|\bProcessor\b|\bCPU\b", "", cpu.get("brand_raw") or "")
    brand = " ".join(brand.split())
    return ("CPU" + (f", {count} cores" if count else "") + (f" ({brand})" if brand else ""))


def _date(info):
    dt = info.get("datetime")
    if dt:
        return str(dt)[:10]
    m = re.match(r"\d{4}-\d{2}-\d{2}", info["stem"])
    return m.group(0) if m else "undated"


def _fmt(x):
    return str(x) if isinstance(x, int) else f"{x:g}"


def _ratio_text(ours, base, what):
    r = base / ours
    if what == "time":
        return f"{r:.1f}× faster" if r >= 1 else f"{1 / r:.1f}× slower"
    return f"{r:.1f}× less memory" if r >= 1 else f"{1 / r:.1f}× more memory"


def figure_specs(records, fixed=None):
    """The figures one file gives: per (test, dtype) and axis, the records of the fixed other
    dims with the most points on the axis. Returns (specs, skipped), skipped as messages."""
    fixed = fixed or {}
    specs, skipped = [], []
    by_td = {}
    for r in records:
        by_td.setdefault((r["test"], r["dtype"]), []).append(r)
    for (test, dtype), rows in by_td.items():
        for axis in AXES:
            on_axis = [r for r in rows if axis in r["dims"]
                       and all(r["dims"].get(k) == v for k, v in fixed.items() if k != axis)]
            slices = {}
            for r in on_axis:
                key = tuple(sorted((k, v) for k, v in r["dims"].items() if k != axis))
                slices.setdefault(key, []).append(r)
            if not slices:
                continue
            key, sel = max(slices.items(), key=lambda kv: (
                len({r["dims"][axis] for r in kv[1]}), len(kv[1]), [v for _, v in kv[0]]))
            points = sorted({r["dims"][axis] for r in sel})
            label = f"{test} {dtype or ''}".strip()
            if len(points) < 2:
                at = ", ".join(f"{k}={_fmt(v)}" for k, v in key)
                skipped.append(f"{label}: one {axis} point only ({axis}={_fmt(points[0])}"
                               + (f" at {at}" if at else "") + f"), no vs-{axis} figure")
                continue
            specs.append(dict(test=test, dtype=dtype, axis=axis, fixed=dict(key),
                              points=points, records=sel))
    return specs, skipped


def _impl_order(impls):
    """kdkernels first, then the baselines, then the peers, alphabetically within each."""
    def rank(i):
        if i.startswith("kdkernels"):
            return 0
        if i in BASELINES or "eager" in i:
            return 1
        return 2
    return sorted(impls, key=lambda i: (rank(i), i))


def _baseline(impls):
    for b in BASELINES:
        if b in impls:
            return b
    return next((i for i in impls if "eager" in i), None)


# fixed colours and markers for the implementations of bench/*.py, so that a line keeps its
# look from figure to figure; others take the rest of the palette in turn
STYLES = {
    "kdkernels-triton": ("#d62728", "o"), "kdkernels-cuda": ("#8c1515", "s"),
    "kdkernels-cuda-cluster": ("#e377c2", "D"), "kdkernels-auto": ("#d62728", "o"),
    "kdkernels-cpu": ("#d62728", "o"), "kdkernels-cpu-renorm": ("#d62728", "o"),
    "kdkernels-cpu-bucket": ("#8c1515", "s"), "kdkernels-auto-renorm": ("#d62728", "o"),
    "kdkernels-auto-bucket": ("#8c1515", "s"), "eager": ("#555555", "v"),
    "torch.compile": ("#1f77b4", "^"), "liger": ("#2ca02c", "P"),
    "liger-triton": ("#9acd32", "X"), "trl": ("#ff7f0e", "h"), "trl-topk": ("#ff7f0e", "h"),
    "bare-matmuls": ("#000000", "."), "distillkit": ("#8c564b", "<"),
    "distillkit-compile": ("#17becf", ">"),
}
SPARE = [("#9467bd", "p"), ("#bcbd22", "*"), ("#17becf", "d"), ("#7f7f7f", "1"),
         ("#e377c2", "x"), ("#8c564b", "+")]


def _styles(impls):
    colors, markers, spare = {}, {}, iter(SPARE * 4)
    for impl in impls:
        colors[impl], markers[impl] = STYLES.get(impl) or next(spare)
    return colors, markers


def _tick(y, _pos=None):
    return f"{y:.0f}" if y >= 1 and abs(y - round(y)) < 1e-6 * y else f"{y:.3g}"


def _log_ticks(ax):
    """Plain-number ticks on a log y axis (1, 2, 5, 10, ... for a span of a few decades), with
    room at the top for the ratio note."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: PLC0415
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if not ys:
        return
    lo, hi = min(ys), max(ys)
    decades = math.log10(hi / lo) if hi > lo else 0.0
    subs = ((1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades < 0.8 else (1.0, 2.0, 5.0) if decades < 2.6
            else (1.0, 3.0) if decades < 4 else (1.0,))
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(_tick))
    ax.yaxis.set_minor_formatter(NullFormatter())
    span = max(decades, 0.3)
    ax.set_ylim(lo / 10 ** (0.06 * span), hi * 10 ** (0.38 * span))


def draw(spec, info, out_path, machine):
    """Writes one figure; returns its one-line summary."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import NullFormatter, NullLocator  # noqa: PLC0415

    axis, rows = spec["axis"], spec["records"]
    panels = sorted({(r["kind"] or spec["test"], r["mode"] or "") for r in rows},
                    key=lambda km: (km[1] != "fwd+bwd", km))
    impls = _impl_order({r["impl"] for r in rows})
    base = _baseline(impls)
    peaks = [r["peak"] for r in rows if isinstance(r["peak"], (int, float)) and r["peak"] > 0]
    unit, scale = ("GiB", 2 ** 30) if peaks and max(peaks) >= 2 * 2 ** 30 else ("MiB", 2 ** 20)
    nrows = 2 if peaks else 1
    ncols = len(panels)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(max(4.3 * ncols + 0.6, 7.0), 3.6 * nrows + 1.2),
                             layout="constrained")
    colors, markers = _styles(impls)
    handles = {}
    notes = {}
    for col, (kind, mode) in enumerate(panels):
        prow = [r for r in rows
                if (r["kind"] or spec["test"]) == kind and (r["mode"] or "") == mode]
        series = {}
        for r in prow:
            series.setdefault(r["impl"], {})[r["dims"][axis]] = r
        for row, what in enumerate(("time", "peak")[:nrows]):
            ax = axes[row][col]
            for impl in impls:
                pts = series.get(impl, {})
                xs = sorted(pts)
                if what == "time":
                    ys = [pts[x]["median_s"] * 1e3 for x in xs]
                else:
                    xs = [x for x in xs if isinstance(pts[x]["peak"], (int, float))
                          and pts[x]["peak"] > 0]
                    ys = [pts[x]["peak"] / scale for x in xs]
                if not xs:
                    continue
                ours = impl.startswith("kdkernels")
                (h,) = ax.plot(xs, ys, marker=markers[impl], color=colors[impl], label=impl,
                               linewidth=2.6 if ours else 1.5, markersize=7 if ours else 5,
                               linestyle="--" if impl == "bare-matmuls" else "-",
                               zorder=2 if ours else 3)  # a peer on a par stays visible
                handles.setdefault(impl, h)
            ax.set_xscale("log")
            ax.set_yscale("log")
            _log_ticks(ax)
            ax.set_xticks(spec["points"])
            ax.set_xticklabels([_fmt(p) for p in spec["points"]])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            lo, hi = spec["points"][0], spec["points"][-1]
            ax.set_xlim(lo / (hi / lo) ** 0.08, hi * (hi / lo) ** 0.08)
            ax.grid(True, which="major", alpha=0.35)
            ax.grid(True, which="minor", axis="y", alpha=0.12)
            if row == 0:
                absent = [i for i in impls if i not in series]
                ax.set_title(f"{kind} {mode}".strip(), fontsize=11, fontweight="bold")
                if absent:  # say so, rather than leave a missing line unexplained
                    ax.set_title(f"no {', '.join(absent)} row", fontsize=8, loc="right",
                                 color="0.4")
            if row == nrows - 1:
                ax.set_xlabel(f"{axis} ({'vocabulary' if axis == 'V' else 'rows'})")
            if col == 0:
                ax.set_ylabel("median time (ms)" if what == "time"
                              else f"peak extra memory ({unit})")
            # ratio of kdkernels against the baseline at the largest point both have
            text, used = [], set()
            for ours in (i for i in impls if i.startswith("kdkernels") and i in series):
                if base is None or base not in series:
                    break
                key = "median_s" if what == "time" else "peak"
                common = [x for x in series[ours] if x in series[base]
                          and isinstance(series[ours][x][key], (int, float))
                          and isinstance(series[base][x][key], (int, float))
                          and series[ours][x][key] > 0]
                if not common:
                    continue
                x = max(common)
                t = _ratio_text(series[ours][x][key], series[base][x][key], what)
                text.append((ours, t, x))
                used.add(x)
                notes.setdefault((kind, mode, ours, x), []).append(t)
            if text:
                lines = [f"{o}: {t}" + ("" if len(used) == 1 else f" ({axis}={_fmt(x)})")
                         for o, t, x in text]
                lines.append(f"than {base}" + (f" at {axis}={_fmt(used.pop())}"
                                               if len(used) == 1 else ""))
                ax.text(0.03, 0.97, "\n".join(lines), transform=ax.transAxes, va="top",
                        ha="left", fontsize=8,
                        bbox=dict(boxstyle="round,pad=0.3", facecolor="white", alpha=0.85,
                                  edgecolor="0.7"))
    fixed = ", ".join(f"{k}={_fmt(v)}" for k, v in spec["fixed"].items())
    bench = re.sub(r"^test_", "", spec["test"]).replace("_", " ")
    fig.suptitle(f"{bench}: median time{' and peak memory' if peaks else ''} vs {axis}"
                 + (f" at {fixed}" if fixed else "")
                 + f"\n{machine} · {spec['dtype'] or 'dtype n/a'} · {_date(info)}", fontsize=12)
    order = [i for i in impls if i in handles]
    try:
        fig.legend([handles[i] for i in order], order, loc="outside lower center",
                   ncol=min(len(order), 6), frameon=False)
    except (ValueError, TypeError):  # matplotlib < 3.7: no "outside" placement
        axes[0][0].legend(fontsize=8)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    kinds = ", ".join(f"{k} {m}".strip() for k, m in panels)
    pts = "/".join(_fmt(p) for p in spec["points"])
    ratio = ""
    if notes:
        many = len({o for (_, _, o, _) in notes}) > 1
        ratio = f"; vs {base}: " + ", ".join(
            f"{k}{' ' + m if len({mm for (_, mm, _, _) in notes}) > 1 else ''}"
            f"{' ' + o if many else ''} {' & '.join(ts)} at {axis}={_fmt(x)}"
            for (k, m, o, x), ts in notes.items())
    return (f"{out_path}: {spec['test']} {spec['dtype']}, time/peak vs {axis}={pts}"
            + (f" at {fixed}" if fixed else "") + f", panels [{kinds}], {len(order)} impls "
            f"({', '.join(order)}), {machine}, {_date(info)}{ratio}")


def _names(specs, stem):
    """File name per spec: <stem>-vs-<axis>.png, with the test and dtype added where the file
    has more than one figure on that axis."""
    names = []
    for s in specs:
        same = [o for o in specs if o["axis"] == s["axis"]]
        parts = [stem]
        if len({o["test"] for o in same}) > 1:
            parts.append(re.sub(r"^test_", "", s["test"]).replace("_", "-"))
        if len({o["dtype"] for o in same}) > 1:
            parts.append(str(s["dtype"]))
        names.append("-".join(parts) + f"-vs-{s['axis']}.png")
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="pytest-benchmark --benchmark-json files")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder for the PNGs (default: bench/results/)")
    p.add_argument("--fix", action="append", default=[], metavar="DIM=VALUE",
                   help="hold a dimension at this value (e.g. N=8192); repeatable")
    p.add_argument("--machine", help="the machine for the titles (default: from the JSON)")
    args = p.parse_args(argv)
    fixed = {}
    for f in args.fix:
        k, _, v = f.partition("=")
        fixed[k] = _int(v)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for path in args.results:
        records, info = load(path)
        if not records:
            print(f"{path}: no benchmarks with a median, nothing drawn")
            continue
        specs, skipped = figure_specs(records, fixed)
        if not specs and not skipped:
            print(f"{path}: no N or V dimension in its benchmarks, nothing drawn")
        for msg in skipped:
            print(f"{path}: skipped {msg}")
        machine = machine_name(info, records, args.machine)
        for spec, name in zip(specs, _names(specs, info["stem"])):
            out = os.path.join(args.out, name)
            if not os.path.relpath(out).startswith(".."):
                out = os.path.relpath(out)
            print(draw(spec, info, out, machine))
            written.append(out)
    return written


if __name__ == "__main__":
    main()
