"""The demo (python -m kdkernels.demo), run in-process with --quick: each model path ends with
finite losses, kdkernels agreeing with the eager formula, a student closer to its teacher, and
the plot written when matplotlib is installed."""
import importlib.util
import math

import pytest
import torch

import kdkernels
from kdkernels import demo

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def check_results(results, plot):
    assert all(math.isfinite(v) for v in results["distill_losses"])
    assert results["student_kd_after"] < results["student_kd_before"]  # distillation helped
    assert math.isfinite(results["teacher_ce"])
    names = [r["name"].split()[0] for r in results["bench"]]
    assert names == ["eager", "kdkernels.fused_linear_divergence", "F.linear"]
    for row in results["bench"]:
        assert math.isfinite(row["loss"]) and row["ms"] > 0
        assert row["loss_rel_diff"] < 1e-5, row
        assert row["grad_rel_diff"] < 1e-4, row
    if HAS_MATPLOTLIB:
        assert results["plot"] == str(plot)
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert results["plot"] is None and not plot.exists()


@pytest.mark.skipif(not demo.HAS_TRANSFORMERS, reason="needs transformers")
def test_quick_run_transformers_models(tmp_path, capsys):
    plot = tmp_path / "d.png"
    results = demo.main(["--quick", "--plot", str(plot)])  # the default: hf when installed
    assert results["model"] == "hf"
    check_results(results, plot)
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "total" in out


def test_quick_run_without_transformers(tmp_path, monkeypatch):
    """Without transformers the default is the pure-PyTorch models, and --model hf is refused."""
    monkeypatch.setattr(demo, "HAS_TRANSFORMERS", False)
    with pytest.raises(SystemExit):
        demo.main(["--model", "hf"])
    plot = tmp_path / "d.png"
    results = demo.main(["--quick", "--kind", "jsd", "--plot", str(plot)])
    assert results["model"] == "char" and results["kind"] == "jsd"
    check_results(results, plot)


@pytest.mark.parametrize("kind", kdkernels.KINDS)
def test_eager_formula_matches_kdkernels(kind):
    """The demo's eager baseline computes the same loss as kdkernels for every --kind."""
    gen = torch.Generator().manual_seed(0)
    student, teacher = (3 * torch.randn(4, 6, 50, generator=gen, dtype=torch.float64)
                        for _ in range(2))
    labels = torch.randint(0, 50, (4, 6), generator=gen).masked_fill(
        torch.rand(4, 6, generator=gen) < 0.3, demo.IGNORE)
    kd = dict(kind=kind, temperature=2.0, beta=0.3, skew=0.2, ignore_index=demo.IGNORE)
    expected = kdkernels.divergence(student, teacher, labels=labels, backend="reference", **kd)
    torch.testing.assert_close(demo.eager_loss(student, teacher, labels, **kd), expected)
