"""Vocabulary-parallel divergences over torch.distributed (gloo, CPU): world sizes 2 and 3,
processes started here. Every rank builds the same full-vocabulary logits (same seed), keeps
its contiguous shard (uneven sizes: V = 1271 over 3 ranks), and compares the sharded op's
loss and its shard of the gradients with the single-process op on the full rows (float64
reference; the tolerance rule of helpers.assert_matches), for every kind, temperatures,
TAID, masks and labels, every reduction, −inf entries and the NaN rule; and the bytes each
rank hands to the collectives against the documented bound."""
import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdkernels
from kdkernels import _distributed

from helpers import assert_matches

V = 1271


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_bounds(world, v=V):
    """Deliberately uneven contiguous shards (the last rank the widest)."""
    cuts = [0] + [v * (r + 1) // (world + 1) for r in range(world - 1)] + [v]
    return list(zip(cuts[:-1], cuts[1:]))


def _logits(seed, n, dtype, extreme=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    if extreme:
        s[0, ::7] = float("-inf")           # a masked vocabulary on both sides...
        t[0, ::7] = float("-inf")
        t[1, V // 2:] = float("-inf")       # ... a teacher with no mass on the last shards
        s[2, :] = s[2, :] * 40              # very peaked rows
    return s.to(dtype), t.to(dtype)


CASES = [dict(kind=k, temperature=T) for k, T in itertools.product(
    kdkernels.KINDS, (1.0, 0.5, 3.0))]
OPTIONS = [dict(), dict(beta=0.2), dict(skew=0.3), dict(taid_t=0.4), dict(t2_scale=False)]
ROW_SETS = ["all", "labels", "mask", "none-kept"]
REDUCTIONS = ["mean", "sum", "none"]


def _row_args(which, n, g):
    if which == "all":
        return {}
    if which == "labels":
        labels = torch.randint(0, 5, (n,), generator=g)
        labels[::3] = -100
        return {"labels": labels}
    if which == "mask":
        return {"mask": torch.rand(n, generator=g) > 0.4}
    return {"mask": torch.zeros(n, dtype=torch.bool)}


def _check(rank, world, lo, hi, case, dtype, seed, extreme=False, backend="auto"):
    n = 6
    s_full, t_full = _logits(seed, n, dtype, extreme)
    g = torch.Generator().manual_seed(seed + 1)
    rows = _row_args(case.pop("rows"), n, g)
    kwargs = {**case, **rows}
    # The reference on the full rows: float64 (the truth) and float32 (fp32's own error).
    refs = {}
    for ref_dtype in (torch.float64, torch.float32):
        s = s_full.to(ref_dtype, copy=True).requires_grad_(True)
        t = t_full.to(ref_dtype, copy=True).requires_grad_(True)
        loss = kdkernels.divergence(s, t, backend="reference", **kwargs)
        loss.sum().backward() if loss.dim() else loss.backward()
        refs[ref_dtype] = (loss.detach(), s.grad[:, lo:hi], t.grad[:, lo:hi])
    s = s_full[:, lo:hi].clone().requires_grad_(True)
    t = t_full[:, lo:hi].clone().requires_grad_(True)
    loss = kdkernels.divergence(s, t, process_group=dist.group.WORLD, backend=backend, **kwargs)
    loss.sum().backward() if loss.dim() else loss.backward()
    what = f"rank {rank}/{world} {backend} {dtype} {kwargs}"
    out = torch.float64 if dtype == torch.float64 else torch.float32
    for got, r64, r32, name in ((loss.detach(), *[r[0] for r in refs.values()], "loss"),
                                (s.grad, *[r[1] for r in refs.values()], "student grad"),
                                (t.grad, *[r[2] for r in refs.values()], "teacher grad")):
        got = got.to(out)
        odd = ~torch.isfinite(r64)  # NaN (the NaN rule) and +inf (a KL with no support)
        assert torch.equal(torch.isnan(got), torch.isnan(r64)), f"{what}: {name} NaN pattern"
        assert torch.equal(got[odd & ~torch.isnan(r64)], r64[odd & ~torch.isnan(r64)].to(out)), \
            f"{what}: {name} infinities"
        assert_matches(torch.where(odd, 0.0, got), torch.where(odd, 0.0, r64),
                       torch.where(odd, 0.0, r32), torch.float32 if out == torch.float64
                       else (s.grad.dtype if name != "loss" else torch.float32), f"{what}: {name}")


def _worker(rank, world, port, modes):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode in modes:
            _run(rank, world, mode)
        dist.barrier()  # (no rank tears its sockets down while a peer still reads from them)
    finally:
        dist.destroy_process_group()


def _run(rank, world, mode):
    lo, hi = _shard_bounds(world)[rank]
    if mode.startswith("matrix"):
        # Every (kind, temperature, option) with 4 of the 12 (rows, reduction) pairs,
        # rotating, so that each pair meets every kind; on one backend of the sharded rows
        # ("cpu": the C++ row kernel's split passes, "triton": the Triton sweeps split
        # likewise, interpreted; "reference": the PyTorch-ops form).
        backend = mode.split("-")[1]
        pairs = list(itertools.product(ROW_SETS, REDUCTIONS))
        seed = 0
        for c, (case, options) in enumerate(itertools.product(CASES, OPTIONS)):
            if "beta" in options and case["kind"] != "jsd":
                continue
            if "skew" in options and not case["kind"].startswith("skew"):
                continue
            # (the split C++ kernels, the default: 4 pairs per case; the interpreted Triton
            # kernels and the PyTorch-ops form: one, which still meets every pair)
            per_case = 4 if backend == "cpu" else 1
            for rows, reduction in (pairs[(5 * c + i) % len(pairs)] for i in range(per_case)):
                seed += 1
                _check(rank, world, lo, hi, {**case, **options, "rows": rows,
                                             "reduction": reduction}, torch.float32, seed,
                       backend=backend)
    elif mode == "edges":
        for kind in kdkernels.KINDS:
            _check(rank, world, lo, hi, dict(kind=kind, temperature=2.0, rows="all"),
                   torch.float64, 7, extreme=True)
            for backend in ("cpu", "reference"):
                _check(rank, world, lo, hi, dict(kind=kind, temperature=2.0, rows="all"),
                       torch.float32, 7, extreme=True, backend=backend)
                for dtype in (torch.bfloat16, torch.float16):
                    _check(rank, world, lo, hi, dict(kind=kind, temperature=2.0, rows="labels",
                                                     reduction="none"), dtype, 8,
                           backend=backend)
        # The NaN rule across ranks: a NaN on one rank's shard makes the row NaN everywhere.
        s, t = _logits(9, 4, torch.float32)
        s[1, V - 1] = float("nan")  # on the last rank's shard
        t[3, 0] = float("inf")      # on the first rank's
        for backend in ("cpu", "reference"):
            out = kdkernels.divergence(s[:, lo:hi].requires_grad_(True), t[:, lo:hi],
                                       process_group=dist.group.WORLD, reduction="none",
                                       backend=backend)
            assert torch.isnan(out).tolist() == [False, True, False, True], (backend, out)
    elif mode == "dtensor":
        _check_dtensor(world)
    elif mode == "bytes":
        s, t = _logits(10, 16, torch.float32)
        mask = torch.arange(16) % 4 != 0  # 12 kept rows
        for backend in ("cpu", "reference"):
            _distributed.TRAFFIC.update(bytes=0, calls=0)
            loss = kdkernels.divergence(s[:, lo:hi].requires_grad_(True), t[:, lo:hi],
                                        kind="jsd", mask=mask, process_group=dist.group.WORLD,
                                        backend=backend)
            forward = dict(_distributed.TRAFFIC)
            loss.backward()
            # The documented bound: all-reduces of (K, 2) fp32, (K, 3) and (K, 3) float64,
            # K kept rows; backward none.
            assert forward == {"bytes": 56 * 12, "calls": 3}, (backend, forward)
            assert _distributed.TRAFFIC == forward, "backward communicated"
    elif mode == "errors":
        s, t = _logits(11, 2, torch.float32)
        with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
            kdkernels.divergence(s[:, lo:hi], t[:, lo:hi], backend="cuda",
                                 process_group=dist.group.WORLD)
        with pytest.raises(TypeError, match="process_group"):
            kdkernels.divergence(s[:, lo:hi], t[:, lo:hi], process_group="world")
        os.environ["KDKERNELS_DEBUG"] = "1"
        with pytest.raises(ValueError, match="ranks disagree"):
            kdkernels.divergence(s[:, lo:hi], t[:, lo:hi], process_group=dist.group.WORLD,
                                 temperature=1.0 + rank)
        del os.environ["KDKERNELS_DEBUG"]


def _check_dtensor(world):
    """DTensor logits (Shard(-1) and Replicate()), and a tiny column-parallel lm_head
    (ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)) against the same model
    unsharded: loss, the hidden states' gradient and the head's (gathered) weight gradient."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor  # noqa: PLC0415
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module  # noqa: PLC0415

    mesh = init_device_mesh("cpu", (world,))
    s_full, t_full = _logits(12, 5, torch.float32)
    opts = dict(kind="jsd", beta=0.3, temperature=2.0)
    s_ref = s_full.clone().requires_grad_(True)
    ref = kdkernels.divergence(s_ref, t_full, backend="reference", **opts)
    ref.backward()
    for placement in (Shard(-1), Replicate()):
        ds = distribute_tensor(s_full, mesh, [placement]).requires_grad_(True)
        dt = distribute_tensor(t_full, mesh, [placement])
        loss = kdkernels.divergence(ds, dt, **opts)
        loss.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
        assert ds.grad.placements == ds.placements, (ds.grad.placements, ds.placements)
        torch.testing.assert_close(ds.grad.full_tensor(), s_ref.grad, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="placement"):
        kdkernels.divergence(distribute_tensor(s_full, mesh, [Shard(0)]),
                             distribute_tensor(t_full, mesh, [Shard(0)]))
    with pytest.raises(TypeError, match="both be DTensors"):
        kdkernels.divergence(distribute_tensor(s_full, mesh, [Shard(-1)]), t_full)

    # A column-parallel tiny lm_head, student and teacher, against the unsharded copies.
    torch.manual_seed(0)
    heads = [torch.nn.Linear(16, V, bias=False) for _ in range(2)]
    plain = [torch.nn.Linear(16, V, bias=False) for _ in range(2)]
    for p, h in zip(plain, heads):
        p.load_state_dict(h.state_dict())
    style = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    for h in heads:
        parallelize_module(h, mesh, style)
    hidden = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    results = []
    for student, teacher in (heads, plain):
        x = hidden.clone().requires_grad_(True)
        loss = kdkernels.divergence(student(x), teacher(hidden).detach(), labels=labels,
                                    kind="fkl", temperature=1.5)
        loss.backward()
        w = student.weight.grad
        results.append((loss.detach(), x.grad, w.full_tensor() if hasattr(w, "full_tensor")
                        else w))
    for (a, b), name in zip(zip(*results), ("loss", "hidden grad", "weight grad")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


# One group per world size (starting processes costs seconds): "matrix" every kind and
# option against the full rows, "edges" extreme values, 16-bit inputs and the NaN rule across
# ranks, "dtensor" DTensor logits and a column-parallel lm_head, "bytes" the bytes per call
# against the documented bound, "errors" bad input.
@pytest.mark.parametrize("world,modes", [(2, ("matrix-cpu", "matrix-reference", "matrix-triton",
                                               "edges", "dtensor", "bytes", "errors")),
                                         (3, ("matrix-cpu", "edges", "dtensor"))],
                         ids=["world2", "world3"])
def test_vocab_parallel_divergence(world, modes):
    mp.spawn(_worker, args=(world, _free_port(), modes), nprocs=world, join=True)


def test_bad_input_without_torch_distributed():
    with pytest.raises(ValueError, match="not initialized"):
        kdkernels.divergence(torch.zeros(2, 3), torch.zeros(2, 3),
                             process_group=object())


def test_readme_example(tmp_path):
    """README's tensor-parallel script, under torchrun with two processes (gloo)."""
    import re  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    if not os.path.exists(readme):
        pytest.skip("needs the source checkout")
    blocks = re.findall(r"<!-- tp-example -->\s*```python\n(.*?)```", open(readme).read(), re.S)
    assert len(blocks) == 1
    script = tmp_path / "vocab_parallel_example.py"
    script.write_text(blocks[0])
    here = os.path.dirname(os.path.dirname(kdkernels.__file__))  # the kdkernels under test
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), str(script)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


# CUDA tensors (a GPU machine: NCCL, one rank) take the Triton split kernels ("cuda" too).
ONE_RANK = [("cpu", b) for b in ("cpu", "triton", "reference")] + (
    [("cuda", b) for b in ("triton", "cuda", "reference")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,backend", ONE_RANK, ids=[f"{d}-{b}" for d, b in ONE_RANK])
def test_world_of_one_equals_one_device(device, backend):
    """A group of one process: the vocabulary-parallel path on the whole vocabulary equals the
    single-device op (the float64 reference), every kind, with masks, TAID and a 16-bit case;
    and opcheck of the split kernels' op."""
    port = _free_port()
    dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        g = torch.Generator().manual_seed(3)
        for c, kind in enumerate(kdkernels.KINDS):
            dtype = torch.bfloat16 if c == 2 else torch.float32
            s = (torch.randn(9, 300, generator=g) * 3).to(device, dtype)
            t = (torch.randn(9, 300, generator=g) * 3).to(device, dtype)
            t[1, ::3] = float("-inf")
            opts = dict(kind=kind, temperature=(0.7, 2.0)[c % 2],
                        mask=torch.arange(9, device=device) % 4 != 1,
                        taid_t=0.6 if c == 4 else None, reduction=("mean", "none")[c % 2])
            refs = []
            for ref_dtype in (torch.float64, torch.float32):
                ss, tt = (x.to(ref_dtype, copy=True).requires_grad_(True) for x in (s, t))
                loss = kdkernels.divergence(ss, tt, backend="reference", **opts)
                loss.sum().backward()
                refs.append((loss.detach(), ss.grad, tt.grad))
            ss, tt = (x.clone().requires_grad_(True) for x in (s, t))
            loss = kdkernels.divergence(ss, tt, backend=backend, process_group=dist.group.WORLD,
                                        **opts)
            loss.sum().backward()
            for i, (name, got, out_dtype) in enumerate((("loss", loss, torch.float32),
                                                        ("student grad", ss.grad, dtype),
                                                        ("teacher grad", tt.grad, dtype))):
                # (the interpreter rounds fp32 to bf16 by truncation: helpers.assert_matches)
                assert_matches(got.detach(), refs[0][i], refs[1][i], out_dtype,
                               f"{backend} {kind} {dtype}: {name}",
                               rounding_units=2.0 if (backend, device) == ("triton", "cpu")
                               else 1.0)
        if (device, backend) == ("cpu", "cpu"):  # the ops' schemas, fake kernels, autograd
            name = dist.group.WORLD.group_name
            s = torch.randn(5, 33, requires_grad=True)
            t = torch.randn(5, 33)
            w = torch.tensor([1.0, 0.0, 0.5, 1.0, 2.0])
            for reduce in (True, False):
                torch.library.opcheck(
                    torch.ops.kdkernels.vocab_parallel_divergence_fwd.default,
                    (s, t, w, name, "jsd", 2.0, 0.3, 0.1, None, reduce, True, False, "cpu"))
            hs = torch.randn(5, 8, requires_grad=True)
            ws = torch.randn(33, 8, requires_grad=True)
            labels = torch.tensor([1, 0, 5, 32, 7])
            torch.library.opcheck(
                torch.ops.kdkernels.vocab_parallel_fused_linear_divergence_fwd.default,
                (hs, ws, None, torch.randn(5, 8), torch.randn(33, 8), None, w, w / 2, labels,
                 name, -1, "fkl", 0.5, 0.1, 1.5, None, 1.0, 0.0, "cpu", 1.0, 0.5, 1.0, 0.0, 2,
                 True, True, True, True, False))
    finally:
        dist.destroy_process_group()
    if (device, backend) == ("cpu", "cpu"):
        s, t = torch.randn(5, 33), torch.randn(5, 33)
        torch.library.opcheck(torch.ops.kdkernels.divergence_shard_rows.default,
                              (s, t, torch.ones(5), 2, False, 0.3, 2.0, 1.0, 0,
                               torch.zeros(5, 7, dtype=torch.float64), None, None))
