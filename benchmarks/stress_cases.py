"""Randomised phantoms for the stress benchmark (benchmarks/stress.py) and its regression subset.

Case ``i`` is drawn from its own generator ``numpy.random.default_rng([BASE_SEED, i])``, so any case
can be rebuilt alone (``make_case(137)``) and the same seed always gives the same arrays.

Every case is a piecewise-constant tissue map with Gaussian noise and a ground-truth label map:

* layout: 2D (64..128 per side), 3D (3..24 slices of 32..64), 3D with 2 slices (48..96), or a 3D
  volume of 18..24 slices of 32..48 with a mask box of exactly 16 slices (the two shapes that once
  gave a U-Net level of depth 2);
* K = 2..8 classes, 1..4 channels;
* geometry: smooth random blobs (thresholded smoothed noise) or Voronoi cells;
* class sizes: balanced, imbalanced (Dirichlet 0.8, at least 2 %), or one tiny class (0.3..1.5 %);
* mask: none, ellipse(-oid), smooth blob, or the 16-slice box;
* storage: float32, int16, uint8 (quantised to 256 levels) or float32 with a large offset;
* channels: independent contrasts, an identical copy of channel 1, a near-collinear copy, or a
  low-variance channel (tiny amplitude, almost no class contrast).

Class means are at least ``separation`` noise standard deviations apart (3.5..7), so a Gaussian
mixture fitted well finds the truth: scikit-learn's best of 10 starts is the reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

BASE_SEED = 20249
N_CASES = 320

LAYOUTS = ("2d", "3d", "3d-2slice", "3d-box16")
GEOMETRIES = ("blobs", "voronoi")
BALANCES = ("balanced", "imbalanced", "tiny")
MASKS = ("none", "ellipse", "blob", "box16")
DTYPES = ("float32", "int16", "uint8", "offset")
CHANNEL_MODES = ("independent", "identical", "collinear", "lowvar")
CLASS_COUNTS = tuple(range(2, 9))
CHANNEL_COUNTS = (1, 2, 3, 4)

# Every value of every axis must occur among the N_CASES cases (tested).
VARIETY_AXES = {
    "layout": LAYOUTS, "geometry": GEOMETRIES, "balance": BALANCES, "mask": MASKS, "dtype": DTYPES,
    "channel_mode": CHANNEL_MODES, "n_classes": CLASS_COUNTS, "n_channels": CHANNEL_COUNTS,
}

MIN_CLASS_VOXELS = 12  # a class smaller than this is carved out again as a blob


@dataclass(frozen=True)
class CaseSpec:
    """Everything that defines one case; ``make_case`` turns it into arrays."""

    index: int
    base_seed: int
    layout: str
    shape: tuple[int, ...]
    n_classes: int
    n_channels: int
    geometry: str
    balance: str
    mask: str
    dtype: str
    channel_mode: str
    separation: float  # distance of the closest two class means, in noise standard deviations

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    def describe(self) -> str:
        size = "x".join(str(s) for s in self.shape)
        return (f"{self.layout} {size} K={self.n_classes} C={self.n_channels} {self.geometry} {self.balance} "
                f"mask={self.mask} {self.dtype} channels={self.channel_mode} sep={self.separation:.1f}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class StressCase:
    spec: CaseSpec
    channels: list[np.ndarray]
    mask: np.ndarray | None  # None: the whole image is segmented
    truth: np.ndarray  # uint8 1..K inside the mask, 0 outside

    @property
    def region(self) -> np.ndarray:
        """The voxels that are segmented (the mask, or every voxel)."""
        return np.ones(self.truth.shape, bool) if self.mask is None else self.mask


def _choice(rng: np.random.Generator, values, weights) -> str:
    weights = np.asarray(weights, dtype=float)
    return values[int(rng.choice(len(values), p=weights / weights.sum()))]


def case_spec(index: int, base_seed: int = BASE_SEED) -> CaseSpec:
    """Draw the design of case ``index`` (cheap: no arrays)."""
    rng = np.random.default_rng([base_seed, index])
    layout = _choice(rng, LAYOUTS, [0.55, 0.22, 0.09, 0.14])
    if layout == "2d":
        shape = tuple(int(v) for v in rng.choice([64, 80, 96, 112, 128], 2))
    elif layout == "3d":
        depth = int(rng.choice([3, 4, 8, 12, 16, 24]))
        side = int(rng.choice([32, 40, 48] if depth > 12 else [32, 48, 64]))
        shape = (depth, side, side)
    elif layout == "3d-2slice":
        side = int(rng.choice([48, 64, 96]))
        shape = (2, side, side)
    else:
        shape = (int(rng.choice([18, 20, 24])), int(rng.choice([32, 40, 48])), int(rng.choice([32, 40, 48])))
    n_classes = int(rng.integers(2, 9))
    n_channels = int(rng.integers(1, 5))
    geometry = _choice(rng, GEOMETRIES, [0.6, 0.4])
    balance = _choice(rng, BALANCES, [0.4, 0.35, 0.25])
    mask = "box16" if layout == "3d-box16" else _choice(rng, MASKS[:3], [0.45, 0.3, 0.25])
    dtype = _choice(rng, DTYPES, [0.3, 0.25, 0.2, 0.25])
    channel_mode = "independent" if n_channels == 1 else _choice(rng, CHANNEL_MODES, [0.55, 0.15, 0.15, 0.15])
    separation = float(np.round(rng.uniform(3.5, 7.0), 2))
    return CaseSpec(index, base_seed, layout, shape, n_classes, n_channels, geometry, balance, mask, dtype,
                    channel_mode, separation)


# ------------------------------------------------------------------------------------- geometry

def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Smoothed white noise; ``scale`` is the in-plane smoothing in voxels (z gets at most depth / 4)."""
    sigma = [scale] * len(shape)
    if len(shape) == 3:
        sigma[0] = min(scale, max(shape[0] / 4, 0.5))
    return gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")


def _make_mask(rng: np.random.Generator, spec: CaseSpec) -> np.ndarray | None:
    shape = spec.shape
    if spec.mask == "none":
        return None
    if spec.mask == "box16":
        mask = np.zeros(shape, bool)
        z0 = int(rng.integers(0, shape[0] - 16 + 1))
        y0, x0 = (int(rng.integers(2, s // 6 + 3)) for s in shape[1:])
        y1, x1 = (s - int(rng.integers(2, s // 6 + 3)) for s in shape[1:])
        mask[z0:z0 + 16, y0:y1, x0:x1] = True
        return mask
    if spec.mask == "ellipse":
        grid = np.indices(shape).astype(float)
        radii = [s / 2 * rng.uniform(0.7, 0.95) for s in shape]
        if len(shape) == 3 and shape[0] <= 4:
            radii[0] = np.inf  # few slices: an elliptic cylinder, so every slice keeps voxels
        dist = sum(((g - (s - 1) / 2) / r) ** 2 for g, s, r in zip(grid, shape, radii))
        return dist <= 1.0
    field = _smooth_field(rng, shape, min(shape[-2:]) * 0.12)  # "blob": the top 55..75 % of a smooth field
    return field >= np.quantile(field, 1 - rng.uniform(0.55, 0.75))


def _fractions(rng: np.random.Generator, spec: CaseSpec) -> tuple[np.ndarray, int | None]:
    """Target class fractions and the tiny class (or None)."""
    k = spec.n_classes
    if spec.balance == "balanced":
        return rng.dirichlet(np.full(k, 30.0)), None
    if spec.balance == "imbalanced":
        p = np.maximum(rng.dirichlet(np.full(k, 0.8)), 0.02)
        return p / p.sum(), None
    tiny = int(rng.integers(k))
    p = rng.dirichlet(np.full(k, 10.0))
    p[tiny] = 0.0
    p = p / p.sum() * (1 - rng.uniform(0.003, 0.015))
    p[tiny] = 1 - p.sum()
    return p, tiny


def _carve(labels: np.ndarray, region: np.ndarray, k: int, count: int, field: np.ndarray) -> None:
    """Give class k the ``count`` voxels of the currently largest class where ``field`` is highest."""
    sizes = np.bincount(labels[region], minlength=labels.max() + 2)
    donor = int(np.argmax(sizes[1:]) + 1)
    candidates = np.flatnonzero((labels == donor) & region)
    count = min(count, candidates.size - MIN_CLASS_VOXELS)
    chosen = candidates[np.argsort(field.ravel()[candidates])[::-1][:count]]
    labels.ravel()[chosen] = k


def _make_labels(rng: np.random.Generator, spec: CaseSpec, region: np.ndarray) -> np.ndarray:
    """Truth 1..K inside ``region`` (every class at least MIN_CLASS_VOXELS voxels), 0 outside."""
    shape, k = spec.shape, spec.n_classes
    fractions, tiny = _fractions(rng, spec)
    n_inside = int(region.sum())
    counts = np.maximum(np.round(fractions * n_inside).astype(int), MIN_CLASS_VOXELS)
    scale = min(shape[-2:]) * rng.uniform(0.04, 0.1)
    labels = np.zeros(shape, np.int64)
    if spec.geometry == "blobs":
        # Classes in random order claim the top of their own smooth field among the voxels still free;
        # the last class gets the rest.
        free = region.copy()
        order = [c for c in rng.permutation(k) if c != tiny]
        for position, c in enumerate(order[:-1]):
            field = np.where(free, _smooth_field(rng, shape, scale), -np.inf)
            still_to_come = len(order) - 1 - position
            count = min(counts[c], int(free.sum()) - still_to_come * MIN_CLASS_VOXELS)
            chosen = np.argsort(field.ravel())[::-1][:count]
            labels.ravel()[chosen] = c + 1
            free.ravel()[chosen] = False
        labels[free] = order[-1] + 1
    else:
        n_cells = int(rng.integers(2 * k, 5 * k + 1))
        points = rng.uniform(0, 1, (n_cells, len(shape))) * np.array(shape)
        grid = np.indices(shape).reshape(len(shape), -1).T + 0.5
        _, cell = cKDTree(points).query(grid)
        p = fractions.copy()
        if tiny is not None:
            p[tiny] = 0.0
        p /= p.sum()
        kept = [c for c in range(k) if c != tiny]
        cell_class = rng.choice(k, n_cells, p=p)
        cell_class[:len(kept)] = rng.permutation(kept)  # every class owns at least one cell
        labels = (cell_class[cell] + 1).reshape(shape)
        labels[~region] = 0
    if tiny is not None:
        _carve(labels, region, tiny + 1, counts[tiny], _smooth_field(rng, shape, scale))
    for c in range(1, k + 1):  # a Voronoi class whose cells fell outside the mask
        if (labels[region] == c).sum() < MIN_CLASS_VOXELS:
            _carve(labels, region, c, max(MIN_CLASS_VOXELS, int(0.02 * n_inside)), _smooth_field(rng, shape, scale))
    return labels


# ------------------------------------------------------------------------------------- intensities

def _class_means(rng: np.random.Generator, k: int, c: int, separation: float) -> np.ndarray:
    """K points in C dimensions, the closest two ``separation`` apart (noise sd = 1)."""
    side = separation * k ** (1 / c) * 1.3
    for attempt in range(400):
        means = rng.uniform(0, side, (k, c))
        gaps = np.linalg.norm(means[:, None] - means[None], axis=-1) + np.eye(k) * 1e9
        if gaps.min() >= separation:
            return means
        if attempt % 40 == 39:
            side *= 1.15
    # Rarely reached: evenly spaced along a random direction.
    direction = rng.normal(size=c)
    direction /= np.linalg.norm(direction)
    return np.arange(k)[:, None] * separation * direction[None] + rng.normal(0, 0.05, (k, c))


def _store(rng: np.random.Generator, z: np.ndarray, dtype: str, low_variance: bool) -> np.ndarray:
    """Map a channel in noise units to its stored intensities and dtype."""
    lo, hi = np.percentile(z, [0.5, 99.5])
    unit = (z - lo) / (hi - lo)  # about 0..1
    if dtype == "uint8":
        span = 12.0 if low_variance else 255.0
        return np.clip(np.round(unit * span), 0, 255).astype(np.uint8)
    if dtype == "int16":
        span = 6.0 if low_variance else rng.uniform(500, 4000)
        return np.clip(np.round(unit * span + rng.uniform(-1024, 500)), -32768, 32767).astype(np.int16)
    if dtype == "offset":
        gain, offset = (1e-2, rng.uniform(1e3, 3e4)) if low_variance else (rng.uniform(1, 50), rng.uniform(1e3, 3e4))
    else:
        gain, offset = (1e-3, rng.uniform(0, 10)) if low_variance else (rng.uniform(0.5, 200), rng.uniform(-50, 50))
    return (unit * gain + offset).astype(np.float32)


def _make_channels(rng: np.random.Generator, spec: CaseSpec, labels: np.ndarray, region: np.ndarray) -> list:
    k, c, mode = spec.n_classes, spec.n_channels, spec.channel_mode
    informative = c - 1 if mode in ("identical", "collinear", "lowvar") else c
    means = _class_means(rng, k, informative, spec.separation)
    noise_sd = rng.uniform(0.7, 1.3, (k, informative))  # heteroscedastic classes
    index = np.clip(labels, 1, k) - 1
    noise_units = [means[index, j] + noise_sd[index, j] * rng.standard_normal(spec.shape) for j in range(informative)]
    if mode == "collinear":
        noise_units.append(rng.uniform(0.5, 2) * noise_units[0] + rng.uniform(-5, 5)
                           + 0.02 * rng.standard_normal(spec.shape))
    elif mode == "lowvar":
        weak = rng.uniform(0, 0.3, k)
        noise_units.append(weak[index] + rng.standard_normal(spec.shape))
    stored = [_store(rng, z, spec.dtype, low_variance=(mode == "lowvar" and j == len(noise_units) - 1))
              for j, z in enumerate(noise_units)]
    if mode == "identical":
        stored.append(stored[0].copy())
    for s in stored:
        s[~region] = 0  # outside the mask: background, as after skull stripping
    return stored


def make_case(index: int, base_seed: int = BASE_SEED) -> StressCase:
    """Build case ``index``: channels, mask (or None) and truth, all from one seeded generator."""
    spec = case_spec(index, base_seed)
    rng = np.random.default_rng([base_seed, index, 1])
    mask = _make_mask(rng, spec)
    region = np.ones(spec.shape, bool) if mask is None else mask
    labels = _make_labels(rng, spec, region)
    channels = _make_channels(rng, spec, labels, region)
    return StressCase(spec, channels, mask, labels.astype(np.uint8))


def all_specs(n_cases: int = N_CASES, base_seed: int = BASE_SEED) -> list[CaseSpec]:
    return [case_spec(i, base_seed) for i in range(n_cases)]
