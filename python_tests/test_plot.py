"""bench/plot.py: the benchmark-name parser on the three name formats (real names from
bench/results/), and the figures of a small synthetic pytest-benchmark JSON."""
import glob
import importlib.util
import json
import os
import re

import pytest

pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("kdk_bench_plot",
                                               os.path.join(ROOT, "bench", "plot.py"))
plot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot)

PNG = b"\x89PNG\r\n\x1a\n"

# (name, extra_info impl, extra_info group) from bench/results/*.json, and the fields expected
REAL = [
    ("test_divergence[bfloat16-8192x128256-fkl-kdkernels-triton-fwd+bwd]", "kdkernels-triton",
     "fkl fwd+bwd  N=8192 V=128256 bfloat16 cuda",
     dict(test="test_divergence", dtype="bfloat16", dims={"N": 8192, "V": 128256}, kind="fkl",
          impl="kdkernels-triton", mode="fwd+bwd", variant=None, device="cuda")),
    ("test_divergence[bfloat16-8192x262144-jsd-torch.compile-fwd+bwd]", "torch.compile",
     "jsd fwd+bwd  N=8192 V=262144 bfloat16 cuda",
     dict(test="test_divergence", dtype="bfloat16", dims={"N": 8192, "V": 262144}, kind="jsd",
          impl="torch.compile", mode="fwd+bwd", variant=None, device="cuda")),
    ("test_fused_linear[float32-2048x1024x32000-fkl-bare-matmuls]", "bare-matmuls",
     "fkl fwd+bwd  N=2048 H=1024 V=32000 float32 cpu",
     dict(test="test_fused_linear", dtype="float32", dims={"N": 2048, "H": 1024, "V": 32000},
          kind="fkl", impl="bare-matmuls", mode="fwd+bwd", variant=None, device="cpu")),
    ("test_sparse[float32-2048x151936x64-kdkernels-cpu-renorm]", "kdkernels-cpu-renorm",
     "sparse fkl fwd+bwd  N=2048 V=151936 K=64 float32 cpu",
     dict(test="test_sparse", dtype="float32", dims={"N": 2048, "V": 151936, "K": 64},
          kind="sparse fkl", impl="kdkernels-cpu-renorm", mode="fwd+bwd", variant="renorm",
          device="cpu")),
    ("test_sparse[float32-2048x151936x64-distillkit-compile]", "distillkit-compile",
     "sparse fkl fwd+bwd  N=2048 V=151936 K=64 float32 cpu",
     dict(test="test_sparse", dtype="float32", dims={"N": 2048, "V": 151936, "K": 64},
          kind="sparse fkl", impl="distillkit-compile", mode="fwd+bwd", variant=None,
          device="cpu")),
    ("test_divergence[fkl-kdkernels-auto-fwd]", "kdkernels-auto",  # older: no dtype, no shape
     "fkl fwd  N=2048 V=32000 float32 cpu",
     dict(test="test_divergence", dtype="float32", dims={"N": 2048, "V": 32000}, kind="fkl",
          impl="kdkernels-auto", mode="fwd", variant=None, device="cpu")),
]


@pytest.mark.parametrize("name,impl,group,want", REAL, ids=[r[0] for r in REAL])
def test_parse_name(name, impl, group, want):
    assert plot.parse_name(name, impl=impl, group=group) == want
    alone = plot.parse_name(name)  # the name alone: what it has is the same
    assert alone["impl"] == want["impl"] and alone["test"] == want["test"]
    assert alone["variant"] == want["variant"]
    if re.search(r"\d+x\d+", name):
        assert (alone["dtype"], alone["dims"]) == (want["dtype"], want["dims"])
    if want["test"] != "test_sparse":
        assert alone["kind"] == want["kind"]
    if want["test"] == "test_divergence":
        assert alone["mode"] == want["mode"]


def test_parse_every_stored_result():
    """Every divergence / fused-linear / sparse row in bench/results: the name alone gives
    extra_info's impl, and the shape in the name is the group's."""
    seen = 0
    for path in glob.glob(os.path.join(ROOT, "bench", "results", "*.json")):
        with open(path) as f:
            data = json.load(f)
        for b in data["benchmarks"]:
            if not b["name"].startswith(("test_divergence[", "test_fused_linear[",
                                         "test_sparse[")):
                continue
            extra = b["extra_info"]
            alone = plot.parse_name(b["name"])
            full = plot.parse_name(b["name"], impl=extra["impl"], group=extra["group"])
            assert alone["impl"] == extra["impl"], b["name"]
            group = plot.parse_group(extra["group"])
            if alone["dims"]:
                assert alone["dims"] == group["dims"], b["name"]
            assert full["mode"] == group["mode"] and full["dtype"] == group["dtype"]
            seen += 1
    if seen == 0:
        pytest.skip("no stored results")


def _bench(name, impl, group, median_s, peak):
    return dict(name=name, fullname=f"bench_x.py::{name}", group=None, params={},
                extra_info=dict(group=group, impl=impl, median_s=median_s, peak=peak),
                stats=dict(median=median_s, rounds=3))


def _divergence_json(path, ns, vs, impls=("kdkernels-triton", "eager", "torch.compile", "liger")):
    rows = []
    for n in ns:
        for v in vs:
            for kind in ("fkl", "jsd"):
                for j, impl in enumerate(impls):
                    cost = n * v * (1 + 3 * j) * (2 if kind == "jsd" else 1)
                    rows.append(_bench(
                        f"test_divergence[bfloat16-{n}x{v}-{kind}-{impl}-fwd+bwd]", impl,
                        f"{kind} fwd+bwd  N={n} V={v} bfloat16 cuda", cost * 1e-12,
                        n * v * 2 * (1 + j)))
    data = dict(machine_info=dict(cpu=dict(count=16, brand_raw="Test CPU")),
                datetime="2026-11-30T10:00:00+00:00", benchmarks=rows)
    path.write_text(json.dumps(data))
    return path


def test_figures(tmp_path, capsys):
    grid = _divergence_json(tmp_path / "2026-11-30-h200-grid.json", [1024, 2048], [32000, 128256])
    onen = _divergence_json(tmp_path / "2026-11-30-h200-oneN.json", [4096], [32000, 65536])
    out = tmp_path / "png"
    written = plot.main([str(grid), str(onen), "--out", str(out)])
    printed = capsys.readouterr().out
    want = {out / "2026-11-30-h200-grid-vs-V.png", out / "2026-11-30-h200-grid-vs-N.png",
            out / "2026-11-30-h200-oneN-vs-V.png"}
    assert {os.path.abspath(p) for p in written} == {str(p) for p in want}
    assert sorted(os.listdir(out)) == sorted(p.name for p in want)  # the one-N axis: skipped
    for p in want:
        blob = p.read_bytes()
        assert blob[:8] == PNG and len(blob) > 20_000, p
        assert str(p) in printed  # a summary line per figure
    assert "skipped" in printed and "one N point only" in printed
    line = next(s for s in printed.splitlines() if "grid-vs-V" in s)
    assert "NVIDIA H200" in line and "2026-11-30" in line and "faster" in line
    # vs V at N=2048 (the largest of the tied N): kdkernels 4x faster than eager (1 vs 1 + 3)
    assert "4.0× faster" in line and "2.0× less memory" in line


def test_machine_name():
    info = dict(machine_info=dict(cpu=dict(count=2, brand_raw="Intel(R) Xeon(R) Processor")),
                stem="2026-12-01-cpu-2core-sweep", datetime=None)
    cpu_rows = [dict(device="cpu")]
    assert plot.machine_name(info, cpu_rows) == "CPU, 2 cores (Intel Xeon)"
    assert plot.machine_name(dict(info, stem="2026-11-29-h200-divergence"),
                             [dict(device="cuda")]) == "NVIDIA H200"
    assert plot.machine_name(dict(info, machine_info=dict(gpu="NVIDIA A100-SXM4-80GB")),
                             [dict(device="cuda")]) == "NVIDIA A100-SXM4-80GB"
