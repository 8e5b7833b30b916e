"""Benchmark helpers: peak-memory measurement and the closing ratio table."""
import ctypes
import os
import platform

import pytest
import torch

RESULTS = []


def cpu_peak_bytes(fn):
    """Physical memory peak of one fn() call above the RSS before it (Linux VmHWM, reset
    through /proc/self/clear_refs), or None where that is not possible."""
    def read(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return None
    try:  # give freed heap back first, or memory kept from an earlier case hides this peak
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = read("VmRSS:")
    fn()
    return read("VmHWM:") - before


def cuda_peak_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("kdkernels: time and peak memory, side by side")
    cpu = platform.processor() or platform.machine()
    tr.write_line(f"machine: {cpu}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                  f"threads {torch.get_num_threads()}"
                  + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    groups = {}
    for r in RESULTS:
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        ours = [r for r in rows if r["impl"].startswith("kdkernels")]
        base = min(r["median_s"] for r in ours) if ours else None
        tr.write_line(f"\n{group}")
        tr.write_line(f"  {'impl':<22}{'median ms':>11}{'vs kdkernels':>14}{'peak extra MiB':>16}"
                      f"{'× one grad':>12}{'GB/s':>9}{'% of HBM':>10}")
        for r in sorted(rows, key=lambda r: r["median_s"]):
            ratio = f"{r['median_s'] / base:.2f}x" if base else "-"
            peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**20:.0f}"
            grads = "n/a" if r["peak"] is None else f"{r['peak'] / r['grad_bytes']:.2f}"
            gbs = f"{r['bytes'] / r['median_s'] / 1e9:.0f}" if r.get("bytes") else "-"
            hbm = os.environ.get("KDK_HBM_GBPS")  # the bytes the math must move / peak
            pct = f"{100 * r['bytes'] / r['median_s'] / 1e9 / float(hbm):.0f}%" \
                if hbm and r.get("bytes") else "-"
            tr.write_line(f"  {r['impl']:<22}{r['median_s'] * 1e3:>11.2f}{ratio:>14}{peak:>16}"
                          f"{grads:>12}{gbs:>9}{pct:>10}")


def _record(r):
    """Keeps a result for the closing table and, where KDK_BENCH_RECORD names a file, appends it
    there at once: a run cut short by a timeout still leaves its numbers."""
    RESULTS.append(r)
    path = os.environ.get("KDK_BENCH_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(f"  {r['group']} | {r['impl']}: {r['median_s'] * 1e3:.3f} ms"
                    + ("" if r.get("peak") is None else f", peak {r['peak'] / 2**20:.0f} MiB")
                    + (f", {r['bytes'] / r['median_s'] / 1e9:.0f} GB/s" if r.get("bytes") else "")
                    + "\n")


@pytest.fixture
def record():
    return _record
