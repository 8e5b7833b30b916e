"""The CUDA kernels' logic, run on the CPU: csrc/cuda/divergence*.cu compiled with g++ through
python_tests/cuda_emulation/ (each CUDA thread a std::thread, __syncthreads a barrier, warp
shuffles through shared memory, the blocks of a cluster concurrent with their own shared
memory), compared with the float64 reference exactly as every backend is in
test_divergence.py. Both kernels run every case: the streaming one and the cluster one (with
one rank, and with small shared-memory budgets that split rows over 2 to 16 ranks). This
covers indexing, the three sweeps, the block and cluster reductions, the vector and scalar
paths, masks, TAID, swap and dtypes; not GPU timing, the memory model, or the real compiler
(those need a GPU: bench/gpu_check.sh)."""
import os

import pytest
import torch

import kdkernels
from kdkernels._plumbing import grad_dtype
from kdkernels.ops.divergence import kernel_args
from kdkernels.reference.divergence import divergence_rows

from helpers import assert_matches
from test_divergence import KIND_SPECS, SPEC_IDS, logits

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC_CUDA = os.path.join(HERE, os.pardir, "csrc", "cuda")
pytestmark = pytest.mark.skipif(not os.path.isdir(CSRC_CUDA), reason="needs the source checkout")


@pytest.fixture(scope="module")
def emulated():
    from torch.utils.cpp_extension import load  # noqa: PLC0415

    emu = os.path.join(HERE, "cuda_emulation")
    sources = ["emulated_divergence.cpp"] + [f"emulated_{m}.cpp" for m in ("kl", "skew", "jsd", "tvd")]
    return load(name="kdk_cuda_emulated", sources=[os.path.join(emu, f) for f in sources],
                extra_include_paths=[emu, CSRC_CUDA],
                extra_cflags=["-O1", "-std=c++20", "-pthread", "-Wno-unknown-pragmas",
                              "-DKDKERNELS_CUDA_EMULATION=1"],
                extra_ldflags=["-pthread"])


def reference_outputs(s, t, w, kind, params, temperature, taid, dtype):
    """(w_i·L_i per row, d/ds, d/dt) of the reference computed in `dtype` by autograd."""
    s = s.detach().to(dtype).requires_grad_()
    t = t.detach().to(dtype).requires_grad_()
    rows = divergence_rows(s, t, kind=kind, temperature=temperature,
                           taid_t=None if taid == 1.0 else taid, **params) * w.to(dtype)
    rows.sum().backward()
    zeros = torch.zeros_like(t)  # TAID λ = 0: the reference's teacher gets no gradient at all
    return rows.detach(), s.grad, zeros if t.grad is None else t.grad


# The launcher's smem_row_budget (bytes of a row one block keeps in shared memory) for each
# kernel: the streaming kernel (0, the default); the cluster kernel at its design point (rows
# here fit one rank); and a budget that splits rows of ~1000 logits over 2 to 4 ranks, the
# last one partial.
KERNELS = {"streaming": 0, "cluster-1": 98304, "cluster-n": 2048}


def compare(emulated, s, t, w, kind, params, temperature=2.0, taid=1.0, grads=(True, True),
            kernel="streaming"):
    """The emulated CUDA kernels against the float64 reference, with the tolerance of every
    backend in test_divergence.py (helpers.assert_matches)."""
    mode, swap, mix = kernel_args(kind, params.get("beta", 0.5), params.get("skew", 0.1))
    budget = KERNELS[kernel] if isinstance(kernel, str) else kernel
    got = emulated.divergence_fwd(s, t, w, mode, swap, mix, temperature, taid, *grads, budget)
    r64 = reference_outputs(s, t, w, kind, params, temperature, taid, torch.float64)
    r32 = reference_outputs(s, t, w, kind, params, temperature, taid, torch.float32)
    assert_matches(got[0], r64[0], r32[0], torch.float32, "loss rows")
    for i, (name, want) in enumerate((("student grad", grads[0]), ("teacher grad", grads[1]))):
        g = got[1 + i]
        if not want:
            assert g.numel() == 0, name
            continue
        src = (s, t)[i]
        assert g.dtype == grad_dtype(src.dtype) and g.shape == src.shape, name
        assert_matches(g, r64[1 + i], r32[1 + i], src.dtype, name)


LAYOUTS = ["contiguous", "odd_vocab", "misaligned"]
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float16), (torch.bfloat16, torch.float32)]


def make_rows(layout, dtypes, n=5):
    v = {"contiguous": 1024, "odd_vocab": 1003, "misaligned": 1000}[layout]
    s = logits((n, v + 8), dtypes[0], "cpu", seed=50)
    t = logits((n, v + 8), dtypes[1], "cpu", seed=51)
    if layout == "misaligned":  # row starts off the 16-byte grid: the scalar path
        return s[:, 1:1 + v], t[:, 3:3 + v]
    return s[:, :v].contiguous(), t[:, :v].contiguous()


def _matrix_cases():
    """Every kind spec × dtype pair × kernel, each in one layout (vector path, scalar tail,
    misaligned rows), rotated so that every combination of any three of the four occurs:
    every template instantiation <mode, VEC, student type, teacher type> (kind × dtypes ×
    layout) runs, every kind and dtype pair on every kernel, every layout on every kernel
    with every kind and with every dtype pair. The full product (3× the cases) added only
    four-way combinations of those same paths."""
    for i, ((kind, params), spec_id) in enumerate(zip(KIND_SPECS, SPEC_IDS)):
        for d, dtypes in enumerate(DTYPE_PAIRS):
            for k, kernel in enumerate(KERNELS):
                layout = LAYOUTS[(i + d + k) % len(LAYOUTS)]
                dtype_id = f"{str(dtypes[0])[6:]}-{str(dtypes[1])[6:]}"
                yield pytest.param(kind, params, dtypes, layout, kernel,
                                   id=f"{spec_id}-{dtype_id}-{layout}-{kernel}")


@pytest.mark.parametrize("kind,params,dtypes,layout,kernel", list(_matrix_cases()))
def test_emulated_cuda_matches_cpu(emulated, kind, params, dtypes, layout, kernel):
    s, t = make_rows(layout, dtypes)
    w = torch.tensor([0.25, 0.0, 0.5, 1.0, 2.0])  # row 1 dropped
    compare(emulated, s, t, w, kind, params, kernel=kernel)


TAIDS = (1.0, 0.0, 0.4)
GRAD_CHOICES = ((True, False), (False, True), (False, False), (True, True))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", kdkernels.KINDS)
def test_emulated_cuda_taid_masks_and_grad_choices(emulated, kind, kernel):
    """Every gradient choice, each with one TAID λ, rotated so that every combination of any
    three of (kind, kernel, λ, gradient choice) occurs. λ enters in the loads only (the
    interpolated target), the gradient choice in which sweeps run and what they store; the
    full product (3× the launches) added only four-way combinations of those paths."""
    s = logits((4, 777), torch.float32, "cpu", seed=52)
    t = logits((4, 777), torch.float32, "cpu", seed=53)
    s[:, 700:] = t[:, 700:] = float("-inf")  # a masked vocabulary
    t[2, ::5] = float("-inf") if kind != "rkl" else t[2, ::5]
    w = torch.full((4,), 0.25)
    offset = kdkernels.KINDS.index(kind) + list(KERNELS).index(kernel)
    for g, grads in enumerate(GRAD_CHOICES):
        taid = TAIDS[(g + offset) % len(TAIDS)]
        compare(emulated, s, t, w, kind, {}, temperature=0.5, taid=taid, grads=grads,
                kernel=kernel)


@pytest.mark.parametrize("rows,vocab", [(2, 1), (11, 2), (11, 31), (19, 512), (9, 513),
                                         (2, 32768)])
def test_emulated_cuda_vocab_sizes(emulated, rows, vocab):
    """V = 1 (one outcome) to 32768 (512-thread blocks); V ≤ 64 vectors goes one warp per
    row, 8 rows a block: row counts that leave spare warps in the last block, dropped rows."""
    s = logits((rows, vocab), torch.bfloat16, "cpu", seed=54)
    t = logits((rows, vocab), torch.bfloat16, "cpu", seed=55)
    w = torch.rand(rows, generator=torch.Generator().manual_seed(56))
    w[::3] = 0.0
    for kind in ("fkl", "rkl", "jsd", "tvd"):
        for kernel in KERNELS:
            compare(emulated, s, t, w, kind, {"beta": 0.3}, kernel=kernel)


@pytest.mark.parametrize("vocab,budget,ranks", [(1000, 256, 16), (600, 128, 16), (4096, 4096, 4),
                                                (8000, 98304, 1), (8000, 0, 0)])
def test_emulated_cuda_cluster_splits(emulated, vocab, budget, ranks):
    """The cluster kernel's plans at their edges: 16 ranks (the most), ranks whose slices lie
    wholly past V (600 logits over 16 slices of 48), a budget just fitting 4 ranks, and no
    budget (0 ranks: the streaming kernel)."""
    assert emulated.cluster_ranks(vocab, 2, 2, 8, 1, budget) == ranks
    s = logits((3, vocab), torch.bfloat16, "cpu", seed=57)
    t = logits((3, vocab), torch.bfloat16, "cpu", seed=58)
    w = torch.tensor([1.0, 0.0, 0.5])
    for kind in ("fkl", "jsd"):
        compare(emulated, s, t, w, kind, {"beta": 0.3}, kernel=budget)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("vocab", [64, 1003])  # one warp per row / one block (or cluster) per row
@pytest.mark.parametrize("kind", kdkernels.KINDS)
def test_emulated_cuda_nan_rule(emulated, kind, vocab, kernel):
    """Rows with a NaN or +inf logit, or with no distribution, are NaN (loss and gradient
    rows); clean rows are what the kernel gives for them alone; a dropped row is 0."""
    from test_divergence import poisoned  # noqa: PLC0415

    s, t, bad, mask = poisoned("cpu", v=vocab, seed=66)
    s[0, :16] = float("nan")  # a whole leading vector of NaN (fmaxf passes NaN over)
    bad[0] = True
    w = mask.float() * 0.5
    mode, swap, mix = kernel_args(kind, 0.3, 0.1)
    budget = KERNELS[kernel]
    loss, gs, gt = emulated.divergence_fwd(s, t, w, mode, swap, mix, 2.0, 1.0, True, True, budget)
    assert loss[bad].isnan().all() and gs[bad].isnan().all() and gt[bad].isnan().all()
    assert loss[8] == 0 and (gs[8] == 0).all() and (gt[8] == 0).all()
    clean = (~bad & mask).nonzero().flatten()
    alone = emulated.divergence_fwd(s[clean].contiguous(), t[clean].contiguous(), w[clean], mode,
                                    swap, mix, 2.0, 1.0, True, True, budget)
    for got, want in zip((loss, gs, gt), alone):
        assert torch.equal(got[clean], want)
    compare(emulated, s[clean].contiguous(), t[clean].contiguous(), w[clean], kind,
            {"beta": 0.3, "skew": 0.1}, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("end", ["min", "max"])
@pytest.mark.parametrize("kind,params", KIND_SPECS, ids=SPEC_IDS)
def test_emulated_cuda_temperature_range_ends(emulated, kind, params, end, kernel):
    if end == "min":  # logits ~T apart: the maximum must be subtracted before dividing by T
        temperature = kdkernels._plumbing.TEMPERATURE_MIN
        s = 3.0 + logits((4, 1003), torch.float32, "cpu", seed=67, scale=2e-6)
        t = 3.0 + logits((4, 1003), torch.float32, "cpu", seed=68, scale=2e-6)
    else:
        temperature = kdkernels._plumbing.TEMPERATURE_MAX
        s = logits((4, 1003), torch.float32, "cpu", seed=67, scale=1.0)
        t = logits((4, 1003), torch.float32, "cpu", seed=68, scale=1.0)
    compare(emulated, s, t, torch.full((4,), 0.5), kind, params, temperature=temperature,
            kernel=kernel)


PRECISION_CASES = [pytest.param(kind, params, case, id=f"{spec_id}-{case}")
                   for (kind, params), spec_id in zip(KIND_SPECS, SPEC_IDS)
                   for case in ("extreme", "extreme_max_t", "near", "identical")
                   if not (kind == "tvd" and case == "extreme_max_t")]


@pytest.mark.parametrize("kind,params,case", PRECISION_CASES)
def test_emulated_cuda_precision_edges(emulated, kind, params, case):
    """The cases where the kernels' arithmetic is shortest, against the reference: |logits| up
    to 1e4 (at T = 0.5 and at the largest T), distributions close to each other (T = 10:
    terms that would cancel), and identical ones (every loss and gradient 0). TVD is left
    out at the largest T (as in test_divergence's test_large_logits_at_large_temperature):
    both rows are then nearly one-hot, its gradient is c·P·(±1 − ΣU_P) with ΣU_P = 1 − 1e-14,
    and which fp32 summation order lands ΣU_P on 1.0 exactly is luck (the reference's does;
    an ulp off is 3e-10 where the tolerance, scaled by the 1e-16 gradient, is 1e-12)."""
    if case == "identical":
        s = logits((3, 333), torch.float32, "cpu", seed=71)
        mode, swap, mix = kernel_args(kind, params.get("beta", 0.5), params.get("skew", 0.1))
        loss, gs, gt = emulated.divergence_fwd(s, s.clone(), torch.ones(3), mode, swap, mix, 1.0,
                                               1.0, True, True, 0)
        assert loss.abs().max() < 1e-6 and gs.abs().max() < 1e-6 and gt.abs().max() < 1e-6
        return
    scale, temperature = {"extreme": (3000.0, 0.5), "extreme_max_t": (3000.0, None),
                          "near": (1.0, 10.0)}[case]
    temperature = temperature or kdkernels._plumbing.TEMPERATURE_MAX
    s = logits((4, 600), torch.float32, "cpu", seed=72, scale=scale).clamp(-1e4, 1e4)
    t = logits((4, 600), torch.float32, "cpu", seed=73, scale=scale).clamp(-1e4, 1e4)
    if case == "near":
        t = s + 0.05 * t
    compare(emulated, s, t, torch.full((4,), 0.5), kind, params, temperature=temperature)
