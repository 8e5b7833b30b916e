"""Benchmark of the vocabulary-parallel divergence (kdkernels.divergence(process_group=...))
on the split C++ kernels ("auto") and in its PyTorch-ops form ("reference"), against gathering
the logits (all_gather of both shards, then the ordinary op on the full rows and the local
slice of its gradient): forward+backward time of one step (the slowest rank),
the bytes each rank hands to the collectives, and each rank's peak memory.

CPU, gloo: 2 processes × 1 thread (KDK_TP_WORLD), fp32, T=2, N=2048 and V = 32000 / 128256
(KDK_TP_CASES="2048x32000,2048x128256"), kinds fkl and jsd (KDK_TP_KINDS). Run from bench/:
    pytest bench_tensor_parallel.py --benchmark-only
The workers stay up for a case; pytest-benchmark times one step as the main process sees it
(a command to every rank, all ranks done), which adds a pipe round trip (~0.1 ms)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import cpu_peak_bytes

WORLD = int(os.environ.get("KDK_TP_WORLD", "2"))
CASES = [tuple(map(int, c.split("x"))) for c in
         os.environ.get("KDK_TP_CASES", "2048x32000,2048x128256").split(",")]
KINDS = os.environ.get("KDK_TP_KINDS", "fkl,jsd").split(",")
IMPLS = ["kdkernels-vocab-parallel", "kdkernels-vocab-parallel-reference", "all_gather+kdkernels"]
TEMPERATURE = 2.0


def _step(impl, s, t, group, kind):
    import torch.distributed as dist  # noqa: PLC0415

    import kdkernels  # noqa: PLC0415

    if impl.startswith("kdkernels-vocab-parallel"):  # the split C++ kernels, or PyTorch ops
        s = s.detach().requires_grad_(True)
        kdkernels.divergence(s, t, kind=kind, temperature=TEMPERATURE, process_group=group,
                             backend="reference" if impl.endswith("reference") else "auto"
                             ).backward()
        return s.grad
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    parts = [[torch.empty_like(x) for _ in range(world)] for x in (s, t)]
    dist.all_gather(parts[0], s.contiguous(), group=group)
    dist.all_gather(parts[1], t.contiguous(), group=group)
    full_s = torch.cat(parts[0], -1).requires_grad_(True)
    kdkernels.divergence(full_s, torch.cat(parts[1], -1), kind=kind,
                         temperature=TEMPERATURE).backward()
    width = s.shape[-1]
    return full_s.grad[:, rank * width:(rank + 1) * width]


def _worker(rank, world, port, n, v, kind, impl, commands, replies):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist  # noqa: PLC0415

    from kdkernels import _distributed  # noqa: PLC0415

    dist.init_process_group("gloo", rank=rank, world_size=world)
    width = v // world
    g = torch.Generator().manual_seed(rank)
    s, t = torch.randn(n, width, generator=g), torch.randn(n, width, generator=g) * 2
    _step(impl, s, t, dist.group.WORLD, kind)  # warm-up
    while (cmd := commands[rank].get()) != "stop":
        if cmd == "step":
            _step(impl, s, t, dist.group.WORLD, kind)
            replies.put(rank)
        elif cmd == "measure":
            _distributed.TRAFFIC.update(bytes=0, calls=0)
            peak = cpu_peak_bytes(lambda: _step(impl, s, t, dist.group.WORLD, kind))
            sent = _distributed.TRAFFIC["bytes"] if impl.startswith("kdkernels-vocab") \
                else 2 * s.numel() * s.element_size()  # the two all_gathers' shards
            replies.put((rank, peak, sent))
    dist.barrier()
    dist.destroy_process_group()


class Pool:
    def __init__(self, n, v, kind, impl):
        ctx = mp.get_context("spawn")
        self.commands = [ctx.Queue() for _ in range(WORLD)]
        self.replies = ctx.Queue()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.procs = [ctx.Process(target=_worker, args=(r, WORLD, port, n, v, kind, impl,
                                                        self.commands, self.replies))
                      for r in range(WORLD)]
        for p in self.procs:
            p.start()

    def run(self, cmd):
        for q in self.commands:
            q.put(cmd)
        return [self.replies.get(timeout=600) for _ in range(WORLD)]

    def close(self):
        for q in self.commands:
            q.put("stop")
        for p in self.procs:
            p.join(timeout=60)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,v", CASES, ids=[f"{n}x{v}" for n, v in CASES])
def test_tensor_parallel(benchmark, record, n, v, kind, impl):
    pool = Pool(n, v, kind, impl)
    try:
        measured = pool.run("measure")
        benchmark.pedantic(lambda: pool.run("step"), rounds=5, iterations=1, warmup_rounds=0)
    finally:
        pool.close()
    peak = max(p for _, p, _ in measured if p is not None) if all(
        p is not None for _, p, _ in measured) else None
    sent = max(b for _, _, b in measured)
    group = f"{kind} fwd+bwd  N={n} V={v} fp32, TP={WORLD} (gloo, 1 thread per rank)"
    info = dict(group=group, impl=impl, median_s=benchmark.stats.stats.median, peak=peak,
                grad_bytes=n * (v // WORLD) * 4, bytes=None, sent_bytes_per_rank=sent)
    benchmark.extra_info.update(info)
    record(info)
    print(f"\n{group} | {impl}: {info['median_s'] * 1e3:.1f} ms, peak/rank "
          f"{'n/a' if peak is None else f'{peak / 2**20:.0f} MiB'}, sent/rank {sent / 2**20:.3f} MiB")
