"""Test setup: Triton runs under its interpreter on CPU-only machines (set before triton is
imported), and the run's header says which kdkernels and which backends are being tested."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kdkernels  # noqa: E402
from helpers import CUDA_CLUSTER  # noqa: E402


@pytest.fixture(autouse=True)
def _cuda_cluster_kernel(request, monkeypatch):
    """Cases with the id `cuda-cluster` run the CUDA backend with its opt-in cluster kernel
    (csrc/cuda/divergence_glue.cpp's knob; sm_90+), where the others get the streaming one."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and CUDA_CLUSTER in callspec.id:
        monkeypatch.setenv("KDKERNELS_CUDA_SMEM_ROW_BUDGET", "98304")


def pytest_report_header(config):
    info = kdkernels.backend_info()
    return [f"kdkernels {kdkernels.__version__} from {os.path.dirname(kdkernels.__file__)}",
            f"backends: {info}"]
