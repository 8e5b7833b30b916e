"""The vocabulary-parallel fused-linear and sparse-teacher ops over torch.distributed (gloo,
CPU), world sizes 2 and 3, processes started here: fused_linear_divergence,
fused_linear_sparse_divergence, sparse_divergence, topk_logprobs and
fused_linear_topk_logprobs with process_group (each rank holds its contiguous, deliberately
uneven, shard of the lm_head rows or logits, V = 1271) against the single-process reference on
the full vocabulary (float64 the truth, float32 the fp32 formula's own error: the tolerance
rule of helpers.assert_matches): loss, its components, the hidden-state gradient (all-reduced)
and this rank's rows of the weight and bias gradients. Also DTensor lm_heads
(ColwiseParallel), torch.compile around the ops, the bytes each rank hands to the collectives
against the bounds documented in kdkernels/ops/vocab_parallel.py, and bad input."""
import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdkernels
from kdkernels import _distributed

from helpers import assert_matches
from test_vocab_parallel import V, _free_port, _shard_bounds

N, H, K = 6, 8, 7


def _tensors(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = dict(hs=torch.randn(N, H, generator=g), ws=torch.randn(V, H, generator=g) / 2,
             bs=torch.randn(V, generator=g), ht=torch.randn(N, H, generator=g),
             wt=torch.randn(V, H, generator=g), bt=torch.randn(V, generator=g))
    t = {k: v.to(dtype) for k, v in t.items()}
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    # A teacher's top-K log-probabilities (global ids < 1150), with one padding entry.
    zt = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    zt[:, 1150:] = float("-inf")
    lp, idx = kdkernels.topk_logprobs(zt, K)
    lp[1, -1] = float("-inf")
    return t, labels, lp, idx


def _compare(what, got, refs, dtype):
    r64, r32 = refs
    got = got.double()
    odd = ~torch.isfinite(r64)
    assert torch.equal(torch.isnan(got), torch.isnan(r64)), f"{what}: NaN pattern"
    assert torch.equal(got[odd & ~torch.isnan(r64)], r64[odd & ~torch.isnan(r64)]), \
        f"{what}: infinities"
    assert_matches(torch.where(odd, 0.0, got), torch.where(odd, 0.0, r64),
                   torch.where(odd, 0.0, r32.double()), dtype, what)


def _fused_call(fn, tensors, lo, hi, sharded, kwargs, teacher=True):
    """fn's loss, components and the gradients (hidden, this shard's weight and bias rows)."""
    hs = tensors["hs"].clone().requires_grad_(True)
    ws = (tensors["ws"][lo:hi] if sharded else tensors["ws"]).clone().requires_grad_(True)
    bs = (tensors["bs"][lo:hi] if sharded else tensors["bs"]).clone().requires_grad_(True)
    args = (hs, ws)
    extra = dict(student_bias=bs)
    if teacher:
        wt, bt = ((tensors[k][lo:hi] if sharded else tensors[k]) for k in ("wt", "bt"))
        args += (tensors["ht"], wt)
        extra["teacher_bias"] = bt
    else:
        args += kwargs.pop("teacher")
    if sharded:
        extra["process_group"] = dist.group.WORLD
    out = fn(*args, return_components=True, **extra, **kwargs)
    out.loss.sum().backward()
    rows = slice(None) if sharded else slice(lo, hi)
    return dict(loss=out.loss.detach(), divergence=out.divergence,
                cross_entropy=out.cross_entropy, entropy=out.student_entropy,
                dh=hs.grad, dw=ws.grad[rows], db=bs.grad[rows])


def _check_fused(rank, lo, hi, fn, kwargs, dtype, seed, teacher=True):
    tensors, labels, lp, idx = _tensors(seed, dtype)
    kwargs = dict(kwargs)
    if kwargs.pop("labels", False):
        kwargs["labels"] = labels
    if not teacher:
        kwargs["teacher"] = (lp, idx)
    refs = {}
    for ref_dtype in (torch.float64, torch.float32):  # (backend: the reference's own)
        t = {k: v.to(ref_dtype) for k, v in tensors.items()}
        refs[ref_dtype] = _fused_call(fn, t, lo, hi, False, dict(kwargs, backend="reference"),
                                      teacher)
    got = _fused_call(fn, tensors, lo, hi, True, dict(kwargs), teacher)
    for name, value in got.items():
        out_dtype = dtype if name in ("dh", "dw", "db") else torch.float32
        _compare(f"rank {rank} {fn.__name__} {dtype} {kwargs}: {name}", value,
                 (refs[torch.float64][name], refs[torch.float32][name]), out_dtype)


FUSED_OPTIONS = [dict(), dict(labels=True, hard_label_weight=0.4), dict(student_softcap=4.0),
                 dict(labels=True, reduction="none", teacher_logit_scale=0.7),
                 dict(vocab_size=1000, labels=False, reduction="sum", taid_t=0.3),
                 dict(labels=True, hard_label_weight=1.0, soft_label_weight=0.5,
                      teacher_softcap=5.0, num_items=11, chunk_size=2)]


def _run_fused(rank, world, lo, hi):
    # The row step on the C++ split kernels and on the PyTorch-ops form, every case; on the
    # interpreted Triton kernels, one option set per kind.
    seed = 100
    for (kind, temperature), (o, options) in itertools.product(
            itertools.product(kdkernels.KINDS, (1.0, 2.0)), enumerate(FUSED_OPTIONS)):
        seed += 1
        if "taid_t" in options and kind == "tvd":
            options = {k: v for k, v in options.items() if k != "taid_t"}
        triton = temperature == 2.0 and o == kdkernels.KINDS.index(kind) % len(FUSED_OPTIONS)
        backends = ("cpu", "reference") + (("triton",) if triton else ())
        for backend in backends:
            _check_fused(rank, lo, hi, kdkernels.fused_linear_divergence,
                         dict(kind=kind, temperature=temperature, backend=backend, **options),
                         torch.float32, seed)
    for kind in ("fkl", "jsd"):  # 16-bit hidden states and heads
        _check_fused(rank, lo, hi, kdkernels.fused_linear_divergence,
                     dict(kind=kind, labels=True, hard_label_weight=0.2), torch.bfloat16, 7)


SPARSE_CASES = [dict(kind=k, tail=t) for k, t in itertools.product(
    ("fkl", "rkl", "jsd", "tvd"), ("renormalize", "bucket", "none"))]


def _run_sparse(rank, world, lo, hi):
    seed = 200
    for c, case in enumerate(SPARSE_CASES):
        seed += 1
        temperature = (1.0, 0.7, 2.0)[c % 3]
        extra = [dict(), dict(labels=True, hard_label_weight=0.3, reduction="none"),
                 dict(student_softcap=3.0, vocab_size=1200, chunk_size=4)][c % 3]
        if case["tail"] == "renormalize" and c % 2:
            extra = dict(extra, teacher_temperature=1.5)
        _check_fused(rank, lo, hi, kdkernels.fused_linear_sparse_divergence,
                     dict(case, temperature=temperature, **extra), torch.float32, seed,
                     teacher=False)
        # sparse_divergence on the logits of the same shard
        tensors, labels, lp, idx = _tensors(seed)
        z = tensors["hs"].double() @ tensors["ws"].double().T
        opts = dict(case, temperature=temperature, reduction=("mean", "none", "sum")[c % 3])
        if c % 2:
            opts["mask"] = labels != -100
        refs = []
        for ref_dtype in (torch.float64, torch.float32):
            s = z.to(ref_dtype, copy=True).requires_grad_(True)
            loss = kdkernels.sparse_divergence(s, lp, idx, backend="reference", **opts)
            loss.sum().backward()
            refs.append((loss.detach(), s.grad[:, lo:hi]))
        s = z.float()[:, lo:hi].clone().requires_grad_(True)
        loss = kdkernels.sparse_divergence(s, lp, idx, process_group=dist.group.WORLD, **opts)
        loss.sum().backward()
        for i, (name, value) in enumerate((("loss", loss.detach()), ("grad", s.grad))):
            _compare(f"rank {rank} sparse_divergence {opts}: {name}", value,
                     (refs[0][i], refs[1][i]), torch.float32)
    _run_topk(rank, world, lo, hi)


def _run_topk(rank, world, lo, hi):
    tensors, _, _, _ = _tensors(300)
    z = tensors["hs"] @ tensors["ws"].T
    # Ties across the shard boundaries: the lower id wins, as on one device.
    z[0, :] = -50.0
    edges = sorted({c for bounds in _shard_bounds(world) for c in (bounds[0], bounds[1] - 1)})
    z[0, [3] + edges] = 9.0  # (every rank's first and last column)
    z[1, ::2] = float("-inf")
    for temperature, k in ((1.0, 4), (0.5, K), (2.0, 1)):
        want_v, want_i = kdkernels.topk_logprobs(z.double(), k, temperature=temperature,
                                                  backend="reference")
        v32, _ = kdkernels.topk_logprobs(z, k, temperature=temperature, backend="reference")
        got_v, got_i = kdkernels.topk_logprobs(z[:, lo:hi], k, temperature=temperature,
                                                process_group=dist.group.WORLD)
        assert torch.equal(got_i, want_i), (rank, got_i, want_i)
        _compare(f"rank {rank} topk T={temperature}", got_v, (want_v, v32), torch.float32)
    for dtype in (torch.float32, torch.float64):
        ref = kdkernels.fused_linear_topk_logprobs(
            tensors["hs"].to(dtype), tensors["ws"].to(dtype), K, bias=tensors["bs"].to(dtype),
            softcap=3.0, vocab_size=1100, temperature=1.5, backend="reference")
        if dtype == torch.float64:
            want = ref
        else:
            v32 = ref[0]
    got_v, got_i = kdkernels.fused_linear_topk_logprobs(
        tensors["hs"], tensors["ws"][lo:hi], K, bias=tensors["bs"][lo:hi], softcap=3.0,
        vocab_size=1100, temperature=1.5, process_group=dist.group.WORLD, chunk_size=4)
    assert torch.equal(got_i, want[1]), (rank, got_i, want[1])
    _compare(f"rank {rank} fused topk", got_v, (want[0], v32), torch.float32)


def _run_dtensor(rank, world):
    """A column-parallel tiny lm_head (ColwiseParallel: the weight a DTensor Shard(0)) for each
    fused op, against the same heads unsharded: loss, the trunk's gradient through the hidden
    states, the head's (gathered) weight gradient; top-k from the sharded head."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.tensor import DTensor, Replicate  # noqa: PLC0415
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module  # noqa: PLC0415

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    trunk = torch.nn.Linear(H, H)
    student = torch.nn.Linear(H, V, bias=False)
    teacher = torch.nn.Linear(H, V, bias=False)
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1, -100, 1200], [3, 4, -100]])
    _, _, lp, idx = _tensors(5)
    lp, idx = lp[:6].reshape(2, 3, K), idx[:6].reshape(2, 3, K)
    runs = {}
    for sharded in (False, True):
        t, s, tr = (m if not sharded else type(m)(m.in_features, m.out_features,
                                                   bias=m.bias is not None)
                    for m in (teacher, student, trunk))
        if sharded:
            for a, b in ((t, teacher), (s, student), (tr, trunk)):
                a.load_state_dict(b.state_dict())
            for head in (s, t):
                parallelize_module(head, mesh, ColwiseParallel())
            assert s.weight.placements[0].is_shard(0)
        out = {}
        for name, call in (
                ("divergence", lambda h: kdkernels.fused_linear_divergence(
                    h, s.weight, x, t.weight, labels=labels, kind="jsd", temperature=2.0,
                    hard_label_weight=0.5)),
                ("sparse", lambda h: kdkernels.fused_linear_sparse_divergence(
                    h, s.weight, lp, idx, labels=labels, tail="bucket")),
                ("replicated hidden", lambda h: kdkernels.fused_linear_divergence(
                    DTensor.from_local(h, mesh, [Replicate()]) if sharded else h, s.weight, x,
                    t.weight, kind="fkl"))):
            tr.zero_grad()
            s.zero_grad()
            loss = call(tr(x))
            loss.backward()
            w = s.weight.grad
            out[name] = (loss.detach(), tr.weight.grad.clone(),
                         (w.full_tensor() if hasattr(w, "full_tensor") else w).clone())
        out["topk"] = kdkernels.fused_linear_topk_logprobs(x, t.weight, 5)
        runs[sharded] = out
    for name in runs[False]:
        for a, b in zip(runs[False][name], runs[True][name]):
            if a.dtype == torch.int64:
                assert torch.equal(a, b), name
            else:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"rank {rank} {name}: {m}")


def _run_bytes(rank, world, lo, hi):
    tensors, labels, lp, idx = _tensors(400)
    hs = tensors["hs"].requires_grad_(True)
    ws = tensors["ws"][lo:hi].clone().requires_grad_(True)
    group = dist.group.WORLD
    k_rows = int((labels != -100).sum())
    T = _distributed.TRAFFIC

    def count(call, backward=True):
        T.update(bytes=0, calls=0)
        loss = call()
        forward = dict(T)
        if backward:
            loss.sum().backward()
        return forward, {k: T[k] - forward[k] for k in T}

    # Documented: 8 B (the shard widths), 56 B per kept row per chunk's three divergence
    # all-reduces, 44 B per row for cross-entropy (MAX (m,) fp32, SUM (m, 5) float64), and the
    # hidden-state gradient (K·H float32) in forward (reduce) or backward (reduction='none').
    fwd, bwd = count(lambda: kdkernels.fused_linear_divergence(
        hs, ws, tensors["ht"], tensors["wt"][lo:hi], labels=labels, process_group=group))
    assert fwd == {"bytes": 8 + 56 * k_rows + 4 * H * k_rows, "calls": 1 + 3 + 1}, fwd
    assert bwd == {"bytes": 0, "calls": 0}, bwd
    fwd, bwd = count(lambda: kdkernels.fused_linear_divergence(
        hs, ws, tensors["ht"], tensors["wt"][lo:hi], labels=labels, hard_label_weight=0.5,
        reduction="none", chunk_size=2, process_group=group))
    chunks = -(-k_rows // 2)
    assert fwd == {"bytes": 8 + (56 + 44) * k_rows, "calls": 1 + 5 * chunks}, fwd
    assert bwd == {"bytes": 4 * H * k_rows, "calls": 1}, bwd  # statistics replayed
    # Sparse: (T ≠ 1) 4 B, then 4·(K + 1) B and 16 B per kept row; no backward traffic.
    s = (hs.detach() @ ws.detach().T).requires_grad_(True)
    fwd, bwd = count(lambda: kdkernels.sparse_divergence(s, lp, idx, labels=labels,
                                                         temperature=2.0, process_group=group))
    assert fwd == {"bytes": 8 + (4 + 4 * (K + 1) + 16) * k_rows, "calls": 4}, fwd
    assert bwd == {"bytes": 0, "calls": 0}, bwd
    # Top-k: 4 + 16 B per row, then the candidates, 16·k B per row.
    fwd, _ = count(lambda: kdkernels.topk_logprobs(s.detach(), 3, process_group=group)[0],
                   backward=False)
    assert fwd == {"bytes": 8 + (4 + 16 + 16 * 3) * N, "calls": 4}, fwd


def _run_compile(rank, world, lo, hi):
    """torch.compile of a step that calls the vocabulary-parallel ops: the sparse ones (and
    the fused one with reduction='none') run eagerly, a graph break at each, the rest compiled;
    the divergence and the reduced fused divergence on the kernels are traced whole
    (fullgraph=True); loss and gradients equal eager mode's."""
    tensors, labels, lp, idx = _tensors(600)
    group = dist.group.WORLD
    ht, wt = tensors["ht"], tensors["wt"][lo:hi]

    def same_as_eager(eager, compiled):  # loss and gradients of a step, both ways
        results = []
        for fn in (eager, compiled):
            hs = tensors["hs"].clone().requires_grad_(True)
            ws = tensors["ws"][lo:hi].clone().requires_grad_(True)
            loss = fn(hs, ws)
            loss.backward()
            results.append((loss.detach(), hs.grad, ws.grad))
        for x, y in zip(*results):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)

    def step(hs, ws):
        h = torch.tanh(hs)
        return (kdkernels.fused_linear_divergence(h, ws, ht, wt, labels=labels, kind="jsd",
                                                  hard_label_weight=0.3, process_group=group,
                                                  reduction="none").sum()
                + kdkernels.divergence(h @ ws.T, ht @ wt.T, temperature=2.0, process_group=group)
                + kdkernels.fused_linear_sparse_divergence(h, ws, lp, idx, process_group=group))

    same_as_eager(step, torch.compile(step))

    # The divergence and the reduced fused one on the split kernels are opaque ops:
    # fullgraph=True traces them.
    def logits_step(hs, ws):
        h = torch.tanh(hs)
        return (kdkernels.divergence(h @ ws.T, ht @ wt.T, kind="jsd", labels=labels,
                                     temperature=2.0, process_group=group)
                + kdkernels.fused_linear_divergence(h, ws, ht, wt, labels=labels,
                                                    hard_label_weight=0.5, kind="rkl",
                                                    student_softcap=5.0, process_group=group))

    same_as_eager(logits_step, torch.compile(logits_step, fullgraph=True))


def _run_errors(rank, world, lo, hi):
    tensors, labels, lp, idx = _tensors(500)
    group = dist.group.WORLD
    hs, ws, ht, wt = (tensors[k] for k in ("hs", "ws", "ht", "wt"))
    with pytest.raises(ValueError, match="same vocabulary rows"):
        kdkernels.fused_linear_divergence(hs, ws[lo:hi], ht, wt[lo:hi + 1] if rank == 0
                                          else wt[lo:hi - 1], process_group=group)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        kdkernels.fused_linear_divergence(hs, ws[lo:hi], ht, wt[lo:hi], backend="cuda",
                                          process_group=group)
    with pytest.raises(TypeError, match="float64"):
        kdkernels.fused_linear_divergence(hs.double(), ws[lo:hi].double(), ht.double(),
                                          wt[lo:hi].double(), process_group=group)
    with pytest.raises(ValueError, match="vocab_size"):
        kdkernels.fused_linear_divergence(hs, ws[lo:hi], ht, wt[lo:hi], vocab_size=V + 1,
                                          process_group=group)
    bad = idx.clone()
    bad[0, 0] = V  # beyond the global vocabulary
    with pytest.raises(ValueError, match="teacher_indices"):
        kdkernels.sparse_divergence(tensors["hs"] @ ws[lo:hi].T, lp, bad, process_group=group)
    with pytest.raises(ValueError, match="labels"):
        kdkernels.fused_linear_divergence(hs, ws[lo:hi], ht, wt[lo:hi],
                                          labels=torch.full((N,), V), hard_label_weight=1.0,
                                          process_group=group)
    z = hs @ ws[lo:hi].T
    z[2, 0] = float("nan") if rank == world - 1 else z[2, 0]
    with pytest.raises(ValueError, match="row 2 has no distribution"):
        kdkernels.topk_logprobs(z, 3, process_group=group)
    os.environ["KDKERNELS_DEBUG"] = "1"
    with pytest.raises(ValueError, match="ranks disagree"):
        kdkernels.fused_linear_divergence(hs, ws[lo:hi], ht, wt[lo:hi], process_group=group,
                                          temperature=1.0 + rank)
    del os.environ["KDKERNELS_DEBUG"]


def _worker(rank, world, port, modes):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lo, hi = _shard_bounds(world)[rank]
    try:
        for mode in modes:
            if mode == "fused":
                _run_fused(rank, world, lo, hi)
            elif mode == "sparse":
                _run_sparse(rank, world, lo, hi)
            elif mode == "dtensor":
                _run_dtensor(rank, world)
            elif mode == "bytes":
                _run_bytes(rank, world, lo, hi)
            elif mode == "compile":
                _run_compile(rank, world, lo, hi)
            elif mode == "errors":
                _run_errors(rank, world, lo, hi)
        dist.barrier()  # (no rank tears its sockets down while a peer still reads from them)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,modes", [(2, ("fused", "sparse", "dtensor", "bytes", "compile",
                                               "errors")),
                                         (3, ("fused", "sparse", "dtensor"))],
                         ids=["world2", "world3"])
def test_vocab_parallel_ops(world, modes):
    mp.spawn(_worker, args=(world, _free_port(), modes), nprocs=world, join=True)
