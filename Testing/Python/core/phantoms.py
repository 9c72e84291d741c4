"""Synthetic multi-channel phantoms with known classes for the core tests."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
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


# ----------------------------------------------------------------------------- bias fields


def smooth_field(shape, amplitude, seed, mask=None):
    """A random quadratic multiplicative field spanning [1 - amplitude, 1 + amplitude] in ``mask`` (as evaluation/conditions.py)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    terms = list(grids) + [grids[i] * grids[j] for i in range(len(grids)) for j in range(i, len(grids))]
    coefficients = rng.normal(size=len(terms))
    coefficients[:len(grids)] *= 2.0
    smooth = sum(c * t for c, t in zip(coefficients, terms))
    inside = smooth if mask is None else smooth[mask]
    unit = 2 * (smooth - inside.min()) / (inside.max() - inside.min()) - 1
    return (1 + amplitude * unit).astype(np.float32)


def ellipse_mask(shape):
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return sum(g * g for g in grids) < 0.9


def positive_phantom(shape, n_channels=1, seed=0):
    """Three interleaved classes (tertiles of smoothed noise, so each class spans the whole field of view).

    Class means 1, 1.35, 1.7 on channel 1 (reversed on channel 2), noise sigma 0.06: returns ((C, *shape), truth 1..3).
    """
    rng = np.random.default_rng(seed)
    smooth = gaussian_filter(rng.normal(size=shape), 2.0)
    truth = 1 + np.searchsorted(np.quantile(smooth, [1 / 3, 2 / 3]), smooth)
    means = np.array([[1.0, 1.7], [1.35, 1.35], [1.7, 1.0]])[:, :n_channels]
    data = means[truth - 1].transpose((-1,) + tuple(range(len(shape)))) + rng.normal(0, 0.06, (n_channels,) + shape)
    return data.astype(np.float32), truth


def field_agreement(estimated, true, mask):
    """(Pearson r, mean relative error) inside the mask, the true field rescaled to mean 1 like the estimate."""
    truth = true[mask] / true[mask].mean()
    r = np.corrcoef(estimated[mask], truth)[0, 1]
    return r, float(np.mean(np.abs(estimated[mask] - truth) / truth))
