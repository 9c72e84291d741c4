"""Synthetic multi-channel phantoms with known classes for the core tests."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def blob_phantom(shape, n_classes=3, n_channels=2, noise=0.15, seed=0):
    """Piecewise-constant classes (K wavy bands of about equal size) with per-class channel contrasts + Gaussian noise.

    Returns (channels list, truth labels 1..K, per-class true means (K, C)).
    """
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    # K bands of equal size along the last axis, with wavy boundaries so classes have shape.
    width = shape[-1]
    wobble = 0.08 * width * np.sin(2 * np.pi * grid[-2] / shape[-2] * 1.5)
    position = np.clip((grid[-1] + wobble) / width, 0, 0.999)
    truth = (position * n_classes).astype(np.int64) + 1
    means = np.stack([np.linspace(0, 1, n_classes) * (1 + c) + c for c in range(n_channels)], 1)
    if n_channels > 1:
        means[:, 1] = means[::-1, 1]  # channel 2 has the opposite contrast
    channels = [means[truth - 1, c] + rng.normal(0, noise, shape) for c in range(n_channels)]
    return [c.astype(np.float32) for c in channels], truth, means


def matched_dice(labels, truth, n_classes):
    """Mean Dice after the best one-to-one matching of predicted to true classes."""
    d = np.zeros((n_classes, n_classes))
    for i in range(n_classes):
        a = labels == i + 1
        for j in range(n_classes):
            b = truth == j + 1
            denom = a.sum() + b.sum()
            d[i, j] = 2 * (a & b).sum() / denom if denom else 0.0
    r, c = linear_sum_assignment(-d)
    return float(d[r, c].mean())
