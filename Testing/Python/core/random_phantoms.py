"""Randomly generated phantoms of the kinds a new user brings (test support, not a test).

``random_case(seed)`` draws one case: 2D or 3D, K 2..7 classes, 1..4 channels, smooth tissue
blobs with imbalanced sizes (sometimes a tiny class), Gaussian noise, offset / integer intensities,
nearly collinear channels, with or without a mask (no mask: the background is one of the K classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class RandomCase:
    seed: int
    channels: list[np.ndarray]
    truth: np.ndarray  # int labels 1..K inside the mask, 0 outside
    mask: np.ndarray | None
    n_classes: int
    description: str


def _label_map(rng: np.random.Generator, shape: tuple[int, ...], n_classes: int, tiny: bool) -> np.ndarray:
    """Labels 1..K from smoothed random fields with random biases (imbalanced blobs), maybe a tiny ball."""
    fields = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma=max(2.0, min(shape) / 8))
                       for _ in range(n_classes)])
    fields /= fields.std(axis=tuple(range(1, fields.ndim)), keepdims=True)
    fields += rng.uniform(-1.0, 1.0, n_classes).reshape((-1,) + (1,) * len(shape))
    labels = fields.argmax(0) + 1
    counts = np.bincount(labels.ravel(), minlength=n_classes + 1)[1:]
    for k in np.flatnonzero(counts < 0.01 * labels.size):  # every class keeps at least 1 % of the image
        order = np.argsort((fields[k] - fields.max(0)).ravel())[::-1][: int(0.01 * labels.size) + 1]
        labels.ravel()[order] = k + 1
    if tiny:
        centre = [rng.integers(s // 4, 3 * s // 4) for s in shape]
        grid = np.indices(shape)
        radius = max(1.5, 0.06 * min(s for s in shape if s > 4))
        ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
        labels[ball] = n_classes  # the last class becomes (mostly) a small ball
        labels[(labels == n_classes) & ~ball] = 1
    return labels


def random_case(seed: int) -> RandomCase:
    rng = np.random.default_rng(seed)
    three_d = rng.random() < 0.5
    shape = (int(rng.integers(6, 20)), int(rng.integers(32, 56)), int(rng.integers(32, 56))) if three_d \
        else (int(rng.integers(48, 112)), int(rng.integers(48, 112)))
    n_classes = int(rng.integers(2, 8))
    n_channels = int(rng.integers(1, 5))
    use_mask = rng.random() < 0.5
    tiny = n_classes >= 3 and rng.random() < 0.3
    tissue_classes = n_classes if use_mask else n_classes - 1
    if not use_mask and tissue_classes < 2:
        tissue_classes, n_classes = 2, 3
    labels = _label_map(rng, shape, tissue_classes, tiny and tissue_classes >= 3)
    grid = np.indices(shape).astype(float)
    radii = [s * rng.uniform(0.3, 0.45) for s in shape]
    inside = sum(((g - s / 2) / r) ** 2 for g, s, r in zip(grid, shape, radii)) <= 1
    if three_d:  # every slice keeps some tissue
        inside |= sum(((g - s / 2) / r) ** 2 for g, s, r in zip(grid[1:], shape[1:], radii[1:])) <= 1
    truth = np.where(inside, labels, 0)
    noise = rng.uniform(0.05, 0.15)
    # Class means: a random layout in channel space, scaled so the closest two classes are
    # 4..7 noise sd apart (separable, but not trivially).
    collinear = n_channels >= 2 and rng.random() < 0.3
    means = rng.uniform(0, 1, (n_classes, n_channels))
    if collinear:  # channel 2 mirrors channel 1 (identical up to scale, offset and noise)
        means[:, 1] = 2.0 * means[:, 0] + 0.1
    closest = (np.linalg.norm(means[:, None] - means[None], axis=-1) + np.eye(n_classes) * 1e9).min()
    means *= rng.uniform(4, 7) * noise / max(closest, 1e-6)
    channels = []
    scale, offset = (rng.choice([1.0, 300.0, 1000.0]), rng.choice([0.0, 0.0, 500.0, -200.0]))
    as_uint8 = rng.random() < 0.2
    as_int16 = not as_uint8 and rng.random() < 0.3
    for c in range(n_channels):
        class_of_voxel = np.where(truth > 0, truth - 1, 0) if use_mask else np.where(truth > 0, truth, 0)
        img = means[class_of_voxel, c] + rng.normal(0, noise, shape)
        if as_uint8:
            img = np.clip(img * 200 + 20, 0, 255).astype(np.uint8)
        elif as_int16:
            img = np.round(img * scale + offset).astype(np.int16)
        else:
            img = (img * scale + offset).astype(np.float32)
        channels.append(img)
    if use_mask:
        mask, full_truth = inside, truth
    else:
        mask, full_truth = None, np.where(truth > 0, truth + 1, 1)  # background = class 1
    kind = "uint8" if as_uint8 else "int16" if as_int16 else "float"
    desc = (f"seed={seed} {'3D' if three_d else '2D'} {shape} K={n_classes} C={n_channels} "
            f"{'mask' if use_mask else 'no mask'}{' tiny' if tiny else ''}{' collinear' if collinear else ''} "
            f"{kind} noise={noise:.2f}")
    return RandomCase(seed, channels, full_truth, mask, n_classes, desc)
