"""Fixtures for the command-line and preview tests: small phantoms on real files with geometry,
and real trained-model files (``trainedModelFile``, see ../trained_models.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli_phantoms import decode_png, make_image, phantom_truth, trained_models

trainedModelFile = trained_models().trainedModelFile  # fixture


@pytest.fixture
def phantom(tmp_path: Path) -> dict:
    """One-channel 3D phantom on an oblique, anisotropic grid, written as NRRD; and its mask."""
    rng = np.random.default_rng(7)
    truth = phantom_truth()
    intensities = np.array([0.0, 20.0, 60.0, 100.0], np.float32)
    channel = intensities[truth] + rng.normal(0.0, 4.0, truth.shape).astype(np.float32)
    channel_path = tmp_path / "t1.nrrd"
    sitk.WriteImage(make_image(channel), str(channel_path))
    mask = np.zeros(truth.shape, np.uint8)
    mask[1:-1, 2:-2, 3:-3] = 1
    mask_path = tmp_path / "mask.nii.gz"
    sitk.WriteImage(make_image(mask), str(mask_path))
    return {"truth": truth, "channel": channel, "channel_path": channel_path,
            "mask": mask.astype(bool), "mask_path": mask_path, "dir": tmp_path}


@pytest.fixture
def png_decoder():
    return decode_png
