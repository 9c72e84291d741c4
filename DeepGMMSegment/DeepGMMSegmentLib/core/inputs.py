"""Checked, normalised inputs: what the per-image engine and training both need before a fit.

Validation of the channels, mask, class count and seeds; the device choice; the z-score
normalisation inside the mask; the prior means and the crop to the mask's bounding box. These functions sit
below both faces (``engine.segment`` and ``training.train``), so neither face imports the other.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..options import METHODS
from .seeds import FREE

__all__ = [
    "check_prior_means", "check_spacing", "crop_box", "mask_values", "noise_level", "normalize_channels",
    "normalize_voxels", "quantization_steps", "resolve_device", "set_mask_values", "validate_inputs",
    "validate_seeded_inputs",
]

MAX_CLASSES = 255  # labels are uint8


def _as_channel_list(channels: Any) -> list[np.ndarray]:
    if isinstance(channels, (np.ndarray, torch.Tensor)):
        return [np.asarray(channels)]
    if isinstance(channels, Sequence) and not isinstance(channels, (str, bytes)):
        if len(channels) == 0:
            raise ValueError("No channels given: pass one image array or a list of co-registered arrays.")
        return [np.asarray(c) for c in channels]
    raise ValueError(
        f"channels must be an array or a sequence of arrays, got {type(channels).__name__}: "
        "pass e.g. segment(t1_array, 3) or segment([t1_array, t2_array], 3)."
    )


def mask_values(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``data[:, mask]`` (C, V), one channel at a time.

    numpy turns a mask that indexes all but the first axis into int64 coordinates (V x ndim: 45 MB
    for a 1 mm head) before it gathers; a mask of the channel's own shape takes a direct path.
    """
    out = np.empty((data.shape[0], int(np.count_nonzero(mask))), dtype=data.dtype)
    for c in range(data.shape[0]):
        out[c] = data[c][mask]
    return out


def set_mask_values(out: np.ndarray, mask: np.ndarray, values: np.ndarray) -> None:
    """``out[:, mask] = values`` for values (C, V), one channel at a time (see :func:`mask_values`)."""
    for c in range(out.shape[0]):
        out[c][mask] = values[c]


def _check_shapes(arrays: list[np.ndarray]) -> tuple[int, ...]:
    shape = arrays[0].shape
    if len(shape) not in (2, 3):
        raise ValueError(
            f"Channel 1 has {len(shape)} dimensions {shape}: images must be 2D (y, x) or 3D (z, y, x); "
            "pass several channels as a list, not as one stacked array."
        )
    for i, a in enumerate(arrays[1:], start=2):
        if a.shape != shape:
            raise ValueError(
                f"Channel {i} has shape {a.shape} but channel 1 has {shape}: resample all channels onto "
                "one grid first (the command line and the Slicer module do this for you)."
            )
    for i, a in enumerate(arrays, start=1):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or np.iscomplexobj(a):
            raise ValueError(f"Channel {i} has dtype {a.dtype}: pass real-valued intensity images.")
    return shape


def _checked_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"The mask has shape {m.shape} but the channels have {shape}: give a mask on the same grid.")
    m = np.asarray(m, dtype=bool)  # a bool mask is used as given (only read, never written)
    if not m.any():
        raise ValueError("The mask is empty: it must contain the voxels to segment (nonzero = inside).")
    return m


def _check_informative(inside: np.ndarray) -> None:
    for i in range(inside.shape[0]):
        if not np.isfinite(inside[i]).all():
            bad = int((~np.isfinite(inside[i])).sum())
            raise ValueError(
                f"Channel {i + 1} has {bad} NaN or infinite values inside the mask: replace them "
                "(e.g. np.nan_to_num) or exclude them with the mask."
            )
        if float(inside[i].max()) == float(inside[i].min()):
            raise ValueError(
                f"Channel {i + 1} is constant inside the mask (value {float(inside[i].min())}): it carries no "
                "information; remove it or check the mask and the input file."
            )


def _check_n_classes(n_classes: Any) -> None:
    if n_classes is None:
        raise ValueError("n_classes is missing: give an integer >= 2, or seeds (n_classes then defaults to the "
                         "number of seed labels).")
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)):
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}.")
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}: a mixture needs two or more classes.")
    if n_classes > MAX_CLASSES:
        raise ValueError(f"n_classes must be at most {MAX_CLASSES} (uint8 labels), got {n_classes}.")


def validate_inputs(channels: Any, n_classes: Any, method: str, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check every input and return (data (C, *spatial) float32, mask bool). Raises ValueError."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: use one of {', '.join(METHODS)}.")
    arrays = _as_channel_list(channels)
    shape = _check_shapes(arrays)
    m = _checked_mask(mask, shape)
    data = np.empty((len(arrays),) + shape, dtype=np.float32)
    for c, a in enumerate(arrays):
        data[c] = a  # one float32 copy, whatever the input's type
    inside = mask_values(data, m)
    _check_informative(inside)
    _check_n_classes(n_classes)
    _check_distinct(inside, int(n_classes))
    return data, m


_SEED_LABELS = "label k > 0 marks class k, 0 = unmarked"


def _seed_values(seeds: Any) -> tuple[np.ndarray, int]:
    """The seed label array as int64 and its number of classes L (labels 1..L, each marking voxels)."""
    s = np.asarray(seeds)
    if s.dtype == bool or not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating)):
        raise ValueError(f"seeds have dtype {s.dtype}: pass an integer label array ({_SEED_LABELS}).")
    if np.issubdtype(s.dtype, np.floating):
        bad = ~np.isfinite(s) | (s != np.round(s))
        if bad.any():
            raise ValueError(
                f"seeds hold {int(bad.sum())} non-integer value(s) (e.g. {s[bad].flat[0]:g}): pass an integer label "
                f"array ({_SEED_LABELS}); resample a label map with nearest-neighbour interpolation."
            )
    if s.size and s.min() < 0:
        raise ValueError(f"seeds hold the negative label {s.min():g}: use 0 for unmarked voxels and k > 0 for class k.")
    n_seed = int(s.max()) if s.size else 0
    if n_seed == 0:
        raise ValueError(f"The seeds mark no voxels: paint a few voxels of each class ({_SEED_LABELS}), "
                         "or pass seeds=None.")
    if n_seed > MAX_CLASSES:
        raise ValueError(f"seeds hold the label {n_seed}, but at most {MAX_CLASSES} classes are possible.")
    labels = s.astype(np.int64)
    counts = np.bincount(labels.ravel(), minlength=n_seed + 1)
    empty = [k for k in range(1, n_seed + 1) if counts[k] == 0]
    if empty:
        listed = ", ".join(str(k) for k in empty)
        raise ValueError(
            f"Seed label(s) {listed} mark no voxels, but labels up to {n_seed} are used: label k marks class k, so "
            f"number the classes 1..L without gaps (renumber the labels, or paint class {empty[0]})."
        )
    return labels, n_seed


def _seed_class_count(n_classes: Any, n_seed: int) -> int:
    """n_classes of a seeded run: the number of seed labels when not given, never fewer."""
    if n_classes is None:
        if n_seed < 2:
            raise ValueError("The seeds mark only one class (label 1): mark at least two classes, or give "
                             "n_classes >= 2 (classes beyond the seed labels are free).")
        return n_seed
    _check_n_classes(n_classes)
    if n_classes < n_seed:
        raise ValueError(f"The seeds mark {n_seed} classes (labels 1..{n_seed}) but n_classes={n_classes}: use "
                         f"n_classes >= {n_seed} (classes beyond the seed labels are free), or omit n_classes.")
    return int(n_classes)


def _seed_grid(labels: np.ndarray, m: np.ndarray) -> np.ndarray:
    """int16 class index (label - 1) of each marked voxel, FREE elsewhere; the seeds must lie in the mask."""
    if labels.shape != m.shape:
        raise ValueError(
            f"The seeds have shape {labels.shape} but the channels have {m.shape}: give seeds on the channels' grid "
            "(the command line and the Slicer module resample a label map onto it, nearest neighbour)."
        )
    outside = (labels > 0) & ~m
    if outside.any():
        raise ValueError(
            f"{int(outside.sum())} seed voxel(s) lie outside the mask (label(s) "
            f"{', '.join(str(k) for k in np.unique(labels[outside]))}): only voxels inside the mask are segmented; "
            "erase those seeds or enlarge the mask."
        )
    return (labels - 1).clip(FREE).astype(np.int16)


def validate_seeded_inputs(channels: Any, n_classes: Any, method: str, mask: Any, seeds: Any, *,
                           prior_means: Any = None, model: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """:func:`validate_inputs` with optional seeds: (data, mask, seed grid or None, n_classes). Raises ValueError.

    seeds: label array on the channels' grid (label k > 0 marks class k, 0 = unmarked). The seed grid (int16) holds the class
    index 0..L-1 of each marked voxel and FREE (-1) elsewhere; n_classes defaults to L.
    """
    if seeds is None:
        data, m = validate_inputs(channels, n_classes, method, mask)
        return data, m, None, int(n_classes)
    if prior_means is not None:
        raise ValueError("Give seeds or prior_means, not both: the seed classes' mean intensities are the prior means.")
    if model is not None:
        raise ValueError("seeds cannot be combined with a trained model (its classes are fixed by its training): "
                         "drop the model for a per-image fit with seeds, or drop the seeds.")
    labels, n_seed = _seed_values(seeds)
    n_classes = _seed_class_count(n_classes, n_seed)
    data, m = validate_inputs(channels, n_classes, method, mask)
    return data, m, _seed_grid(labels, m), n_classes


def _check_distinct(inside: np.ndarray, n_classes: int) -> None:
    """At least n_classes distinct intensity tuples inside the mask (checked cheaply first)."""
    rows = inside.T
    probe = rows[:: max(1, rows.shape[0] // 20000)]
    if np.unique(probe, axis=0).shape[0] >= n_classes:
        return
    distinct = np.unique(rows, axis=0).shape[0]
    if distinct < n_classes:
        raise ValueError(
            f"Only {distinct} distinct intensity values inside the mask, fewer than the {n_classes} classes "
            f"asked for: use n_classes <= {distinct} or a larger mask."
        )


def check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    """Voxel size as ``ndim`` positive floats in (z, y, x) order, or None."""
    if spacing is None:
        return None
    s = tuple(float(v) for v in spacing)
    if len(s) != ndim or not all(np.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing must be {ndim} positive numbers in (z, y, x) order, got {spacing!r}.")
    return s


def check_prior_means(prior: Any, n_classes: int, n_channels: int, units: str = "input units") -> np.ndarray | None:
    """Prior class means as a finite (K, C) float array (a 1-D array is fine for one channel), or None."""
    if prior is None:
        return None
    p = np.asarray(prior, dtype=np.float64)
    if p.ndim == 1 and n_channels == 1:
        p = p[:, None]
    if p.shape != (n_classes, n_channels) or not np.isfinite(p).all():
        raise ValueError(
            f"prior_means must be a finite ({n_classes}, {n_channels}) array (one row per class, one column "
            f"per channel, {units}), got shape {p.shape}."
        )
    return p


# ----------------------------------------------------------------------------- device


def _checked_cuda(name: str, device: Any) -> torch.device:
    if not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} but no CUDA GPU is available to PyTorch (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda is not None}): use device='auto' or 'cpu', or install a "
            "CUDA-enabled PyTorch."
        )
    dev = torch.device(name)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist: use cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1}."
        )
    return dev


def resolve_device(device: Any) -> torch.device:
    """"auto" → CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.")
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        return _checked_cuda(name, device)
    raise ValueError(f"Unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'.")


# ----------------------------------------------------------------------------- normalisation


def channel_statistics(inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, scale) of each channel from its voxels inside the mask, (C, V): mean and standard deviation.

    Both are rounded to float32, the precision the z-scores are computed in, so that mapping the
    mixture back to intensities (``means * scale + centre``) undoes exactly the normalisation the
    fit saw: with a float64 centre, a channel of intensities around 3e4 varying by 0.01 came back
    with its class means shifted by a third of the channel's standard deviation.
    """
    inside = inside.astype(np.float64)
    return (inside.mean(1).astype(np.float32).astype(np.float64),
            inside.std(1).astype(np.float32).astype(np.float64))


def quantization_steps(data: np.ndarray, mask: np.ndarray, sample: int = 1 << 16) -> np.ndarray:
    """The intensity step of each channel of (C, *spatial) data inside the mask, (C,) float64.

    The smallest gap between distinct values in an even sample of at most ``sample`` mask voxels:
    1 for integers, the slope for rescaled integers, about 0 for continuous data. A sample that
    misses some levels can only overestimate the step when the channel has about as many levels
    as the sample has voxels, and then the step is negligible against the channel's spread.
    """
    steps = np.zeros(data.shape[0])
    for c in range(data.shape[0]):
        inside = data[c][mask]
        levels = np.unique(inside[::max(1, inside.size // sample)].astype(np.float64))
        gaps = np.diff(levels[np.isfinite(levels)])
        steps[c] = float(gaps.min()) if gaps.size else 0.0
    return steps


# An axis whose spacing is within this factor of the finest is a "fine" axis: neighbours along it
# see the same anatomy (thick slices' neighbours do not).
FINE_AXIS_RATIO = 1.5


def fine_axes(shape: Sequence[int], spacing: Sequence[float] | None) -> tuple[int, ...]:
    """Spatial axes with more than one voxel whose spacing is within FINE_AXIS_RATIO of the finest."""
    steps = tuple(spacing) if spacing is not None and len(spacing) == len(shape) else (1.0,) * len(shape)
    return tuple(a for a in range(len(shape)) if shape[a] > 1 and steps[a] <= FINE_AXIS_RATIO * min(steps))


def noise_level(norm: np.ndarray, mask: np.ndarray, spacing: Sequence[float] | None = None,
                max_pairs: int = 1 << 20) -> float:
    """Noise of the least noisy channel, in units of its standard deviation inside the mask.

    ``norm`` (C, *spatial) z-scored inside ``mask``. Per channel, a robust estimate of the voxel
    noise from differences of neighbouring voxels inside the mask: median |x_i - x_j| / (0.6745 *
    sqrt 2), which edges barely move. Only the fine axes count (:func:`fine_axes`),
    so thick slices' anatomy is not taken for noise; at most ``max_pairs`` pairs per channel, an even
    subsample. 0 for a mask without neighbours (or quantised intensities whose median difference is 0).
    """
    pairs = []
    for axis in fine_axes(mask.shape, spacing):
        ahead = tuple(slice(1, None) if a == axis else slice(None) for a in range(mask.ndim))
        behind = tuple(slice(None, -1) if a == axis else slice(None) for a in range(mask.ndim))
        pairs.append((ahead, behind, mask[ahead] & mask[behind]))
    levels = []
    for channel in norm:
        diffs = np.concatenate([np.abs(channel[a][both] - channel[b][both]) for a, b, both in pairs] or [np.zeros(0)])
        if diffs.size == 0:
            return 0.0
        diffs = diffs[:: max(1, diffs.size // max_pairs)]
        levels.append(float(np.median(diffs)) / (0.6745 * math.sqrt(2.0)))
    return min(levels)


def normalize_channels(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score each channel with the mean and standard deviation inside the mask.

    Returns (normalised data (C, *spatial) float32 with 0 outside the mask, centre (C,), scale (C,)).
    One float32 copy of the volume, normalised in place (the input is never modified).
    """
    centre, scale = channel_statistics(mask_values(data, mask))
    shape = (-1,) + (1,) * (data.ndim - 1)
    out = np.array(data, dtype=np.float32, copy=True)
    out -= centre.reshape(shape).astype(np.float32)
    out /= scale.reshape(shape).astype(np.float32)
    np.copyto(out, 0.0, where=~mask)  # 0 outside the mask (also where the input is NaN there)
    return out, centre, scale


def normalize_voxels(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same z-scores as :func:`normalize_channels`, for the mask voxels only: ((V, C) float32, centre, scale).

    EM needs no image grid, so it never holds a normalised copy of the whole volume.
    """
    inside = mask_values(data, mask)
    centre, scale = channel_statistics(inside)
    voxels = (inside.T - centre.astype(np.float32)) / scale.astype(np.float32)
    return np.ascontiguousarray(voxels, dtype=np.float32), centre, scale


def crop_box(mask: torch.Tensor, margin: int = 2) -> tuple[slice, ...]:
    """The bounding box of the mask's voxels, ``margin`` voxels wider on each side (clipped to the grid)."""
    idx = mask.nonzero()
    lo = (idx.min(0).values - margin).clamp_min(0)
    hi = idx.max(0).values + 1 + margin
    return tuple(slice(int(a), int(min(b, s))) for a, b, s in zip(lo, hi, mask.shape))
