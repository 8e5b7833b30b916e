"""kdkernels.sparse_divergence against its peers, through the adapters of bench/sparse_peers.py
(their docstrings give each peer's contract): TRL 1.16's ServerDistillationTrainer top-k loss
(TRL's own method) and its pieces at any β, and a DistillKit-style sparse KL. Where a peer
clamps and we do not (a teacher or student top-k mass within 1e-7 of 1), the float64
reference (kdkernels/reference/sparse.py, exact tails) is the arbiter: the tests show ours
agrees with it and the peer does not."""
import os
import sys

import pytest
import torch

pytest.importorskip("trl")

import kdkernels  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))
from sparse_peers import (distillkit_sparse_kl, trl_server_topk_kl,  # noqa: E402
                          trl_sparse_divergence)

N, V, K = 13, 97, 6
OURS = [pytest.param("cpu", torch.float32, id="cpu-fp32"),
        pytest.param("reference", torch.float64, id="reference-fp64")]


def _case(seed, dtype, pad=False, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    lp, idx = torch.topk(torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64)
                                           * 2, -1), K)
    if pad:  # padding: −inf log-prob, its index repeating a real entry's
        lp[1, 4:], idx[1, 4:] = float("-inf"), idx[1, 0]
    z.scatter_add_(1, idx, torch.full(idx.shape, offset, dtype=torch.float64))
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 7]] = -100
    return z.to(dtype), lp.to(dtype), idx, labels


def _ours(backend, z, lp, idx, labels, **kw):
    z = z.clone().requires_grad_()
    loss = kdkernels.sparse_divergence(z, lp, idx, labels=labels, backend=backend, **kw)
    loss.backward()
    return loss.detach().double(), z.grad.double()


def _peer(fn, z, lp, idx, labels, **kw):
    z = z.clone().requires_grad_()
    loss = fn(z, lp, idx, labels=labels, **kw)
    loss.backward()
    return loss.detach().double(), z.grad.double()


def _close(a, b, dtype):
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert abs(float(a[0] - b[0])) <= tol * (1 + abs(float(b[0]))), (float(a[0]), float(b[0]))
    assert float((a[1] - b[1]).abs().max()) <= tol * (1 + float(b[1].abs().max()))


@pytest.mark.parametrize("backend,dtype", OURS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("pad", [False, True], ids=["dense-k", "padded"])
def test_trl_server_topk_kl(backend, dtype, temperature, pad):
    """fkl with the tail bucket is TRL's loss_add_tail (no T² on its side)."""
    z, lp, idx, labels = _case(1, dtype, pad)
    ours = _ours(backend, z, lp, idx, labels, kind="fkl", tail="bucket", temperature=temperature,
                 t2_scale=False)
    _close(ours, _peer(trl_server_topk_kl, z, lp, idx, labels, temperature=temperature), dtype)


@pytest.mark.parametrize("backend,dtype", OURS)
@pytest.mark.parametrize("kind,beta,peer_beta", [("rkl", 0.5, 1.0), ("jsd", 0.3, 0.3),
                                                  ("jsd", 0.8, 0.8)])
def test_trl_divergence_pieces(backend, dtype, kind, beta, peer_beta):
    """rkl and jsd on the same K + 1 support, TRL's β convention."""
    z, lp, idx, labels = _case(2, dtype, pad=True)
    ours = _ours(backend, z, lp, idx, labels, kind=kind, beta=beta, tail="bucket",
                 temperature=1.5, t2_scale=False)
    _close(ours, _peer(trl_sparse_divergence, z, lp, idx, labels, beta=peer_beta,
                       temperature=1.5), dtype)


@pytest.mark.parametrize("backend,dtype", OURS)
@pytest.mark.parametrize("temperature,teacher_temperature", [(1.0, None), (2.0, None),
                                                             (2.0, 1.0), (0.7, 1.3)])
def test_distillkit_sparse_kl(backend, dtype, temperature, teacher_temperature):
    """fkl, tail 'renormalize', re-tempered by T_gen/T and renormalized; T² on both sides."""
    z, lp, idx, labels = _case(3, dtype)
    kw = dict(temperature=temperature, teacher_temperature=teacher_temperature)
    ours = _ours(backend, z, lp, idx, labels, kind="fkl", tail="renormalize", **kw)
    _close(ours, _peer(distillkit_sparse_kl, z, lp, idx, labels, **kw), dtype)


def test_student_topk_mass_near_one_trl_clamps_ours_exact():
    """The student puts all but ~1e-11 of its mass on the teacher's top-k (DistillKit #45,
    TRL's clamp of the log-sum at −1e-7): TRL pins the student's tail at 1e-7 and drops its
    gradient; ours (fp32) matches the exact float64 reference, the peer does not."""
    z, lp, idx, labels = _case(4, torch.float64, offset=30.0)
    exact = _ours("reference", z, lp, idx, labels, kind="fkl", tail="bucket", t2_scale=False)
    ours = _ours("cpu", z.float(), lp.float(), idx, labels, kind="fkl", tail="bucket",
                 t2_scale=False)
    peer = _peer(trl_server_topk_kl, z, lp, idx, labels)
    assert torch.isfinite(ours[0]) and torch.isfinite(ours[1]).all()
    assert abs(float(ours[0] - exact[0])) <= 1e-5 * float(exact[0])
    assert float((ours[1] - exact[1]).abs().max()) <= 1e-5 * float(exact[1].abs().max())
    assert abs(float(peer[0] - exact[0])) > 1.0  # the clamp moves the loss by ~7 here
