"""Test setup: Triton runs under its interpreter on CPU-only machines (set before triton is
imported), and the run's header says which kdkernels and which backends are being tested."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kdkernels  # noqa: E402


def pytest_report_header(config):
    info = kdkernels.backend_info()
    return [f"kdkernels {kdkernels.__version__} from {os.path.dirname(kdkernels.__file__)}",
            f"backends: {info}"]
