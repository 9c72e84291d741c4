"""Fixtures for the trained-model tests: one trained model on the synthetic cohort (synthetic_cohort.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "DeepGMMSegment"))

import torch  # noqa: E402

# Small tensors: one thread avoids OpenMP contention on a shared 2-core machine.
torch.set_num_threads(1)

from synthetic_cohort import FAST, cohort  # noqa: E402


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """(path, TrainingResult) of a 2-channel model trained once per session on 10 synthetic cases."""
    from DeepGMMSegmentLib.trained.training import train

    images, masks, _ = cohort(10, n_channels=2)
    path = tmp_path_factory.mktemp("model") / "synthetic.pt"
    result = train(images, 3, masks=masks, spatial_dims=2, channel_names=["T1", "T2"], output=path,
                   prior_means="auto", seed=0, **FAST)
    return path, result
