"""The tiny synthetic cohort of the trained-model tests (in memory and on disk).

Each case is a 2D image of a disc (class 3) inside a ring (class 2) inside a background region
(class 1), at a random position and with a random global gain, plus Gaussian noise; the mask is a
larger disc. Channel 2 (when asked) has the class means in another order so both channels matter.
The test modules import these from here, never from ``conftest``: every folder's conftest.py is the
module ``conftest`` in turn, so ``from conftest import`` would depend on which folder was collected last.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASS_MEANS = np.array([[0.0, 2.0], [1.0, 0.0], [2.5, 1.0]])  # (K, C): rows are classes 1..3

# Training settings small enough for CI (seconds) but enough for a usable model.
FAST = dict(base_width=8, depth=2, max_epochs=12, min_epochs=12, patience=12, batch_size=4, device="cpu")


def synthetic_case(seed: int, shape=(32, 32), n_channels: int = 1, noise: float = 0.25):
    """(image (C, y, x) float32, mask bool, truth int 0..2) for one synthetic case."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = rng.uniform(0.4, 0.6, 2) * np.array(shape)
    r = np.hypot(yy - cy, xx - cx) / min(shape)
    truth = np.where(r < 0.15, 2, np.where(r < 0.28, 1, 0))
    mask = r < 0.45
    means = CLASS_MEANS[:, :n_channels]
    image = means[truth].transpose(2, 0, 1) * rng.uniform(0.8, 1.2) + 5.0
    image = image + rng.normal(0, noise, image.shape)
    return image.astype(np.float32), mask, truth


def cohort(n: int, n_channels: int = 1, first_seed: int = 0):
    cases = [synthetic_case(first_seed + i, n_channels=n_channels) for i in range(n)]
    return [c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases]


def accuracy(labels: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    return float((labels[mask].astype(int) - 1 == truth[mask]).mean())


def write_case_folders(root: Path, n: int, n_channels: int = 2, first_seed: int = 0) -> list[str]:
    """cohort/<case>/{T1,T2}.nii.gz + mask.nii.gz; returns the case ids."""
    import SimpleITK as sitk

    names = ["T1", "T2"][:n_channels]
    ids = []
    for i in range(n):
        image, mask, _ = synthetic_case(first_seed + i, n_channels=n_channels)
        folder = root / f"case{i:02d}"
        folder.mkdir(parents=True)
        for c, name in enumerate(names):
            sitk.WriteImage(sitk.GetImageFromArray(image[c]), str(folder / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(mask.astype(np.uint8)), str(folder / "mask.nii.gz"))
        ids.append(folder.name)
    return ids
