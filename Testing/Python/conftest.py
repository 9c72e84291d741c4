"""Suite-wide: the device of the tests marked ``cuda``.

Tests marked ``@pytest.mark.cuda`` run their fits on the ``compute_device`` fixture: the CPU by default,
``cuda`` / ``cuda:N`` with ``pytest --device cuda`` or ``DEEPGMM_TEST_DEVICE=cuda`` (what
benchmarks/gpu_check.sh runs: ``pytest -m cuda --device cuda``). Asking for CUDA where PyTorch sees no
GPU stops the run at once with the reason, rather than skipping the tests it was meant to check.
"""

from __future__ import annotations

import os
import re

import pytest

DEVICE_ENV = "DEEPGMM_TEST_DEVICE"


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get(DEVICE_ENV, "cpu"),
                     help=f"device of the tests marked cuda: cpu (default), cuda or cuda:N (env {DEVICE_ENV})")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: fits on the compute_device fixture (CPU unless --device cuda); "
                                       "benchmarks/gpu_check.sh runs these on a GPU")
    device = config.getoption("--device").strip().lower()
    if device == "cpu":
        return
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise pytest.UsageError(f"--device {device!r}: use cpu, cuda or cuda:N.")
    import torch
    if not torch.cuda.is_available():
        raise pytest.UsageError(
            f"--device {device} (or {DEVICE_ENV}) asks for a GPU, but torch {torch.__version__} sees none "
            f"(CUDA build: {torch.version.cuda is not None}): install a CUDA build of torch on a machine with "
            "an NVIDIA driver, or drop the option to run these tests on the CPU.")


@pytest.fixture
def compute_device(request) -> str:
    """'cpu', 'cuda' or 'cuda:N': where a test marked cuda runs its fits."""
    if request.node.get_closest_marker("cuda") is None:
        raise pytest.UsageError(f"{request.node.nodeid} uses compute_device: mark it @pytest.mark.cuda so that "
                                "`pytest -m cuda` selects it.")
    return request.config.getoption("--device").strip().lower()

