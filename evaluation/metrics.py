"""Dice, Hungarian matching of clusters to reference classes, and mixture NLL in common units."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion_matrix(labels: np.ndarray, reference: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts C[i, j] of voxels with label i+1 and reference j+1 (labels and reference in 1..K).

    Voxels whose label or reference is 0 (outside the mask) are ignored.
    """
    labels = np.asarray(labels).ravel().astype(np.int64)
    reference = np.asarray(reference).ravel().astype(np.int64)
    if labels.shape != reference.shape:
        raise ValueError(f"labels ({labels.size} voxels) and reference ({reference.size}) differ in size.")
    inside = (labels > 0) & (reference > 0)
    if labels.max(initial=0) > n_classes or reference.max(initial=0) > n_classes:
        raise ValueError(f"labels or reference hold values above n_classes={n_classes}.")
    index = (labels[inside] - 1) * n_classes + (reference[inside] - 1)
    return np.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def hungarian_mapping(labels: np.ndarray, reference: np.ndarray, n_classes: int) -> np.ndarray:
    """Map cluster label -> reference class maximising total overlap (Hungarian method).

    Returns an int array ``mapping`` of length K+1 with mapping[0] = 0, so that
    ``mapping[labels]`` renumbers the clusters into reference classes.
    """
    counts = confusion_matrix(labels, reference, n_classes)
    rows, cols = linear_sum_assignment(-counts)
    mapping = np.zeros(n_classes + 1, dtype=np.int64)
    mapping[rows + 1] = cols + 1
    return mapping


def dice_per_class(labels: np.ndarray, reference: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice of each class 1..K over the voxels; a class absent from both gets NaN."""
    labels = np.asarray(labels).ravel()
    reference = np.asarray(reference).ravel()
    scores = np.full(n_classes, np.nan)
    for k in range(1, n_classes + 1):
        in_label = labels == k
        in_reference = reference == k
        total = int(in_label.sum()) + int(in_reference.sum())
        if total:
            scores[k - 1] = 2.0 * int((in_label & in_reference).sum()) / total
    return scores


def matched_dice(labels: np.ndarray, reference: np.ndarray, n_classes: int,
                 identity_from_method: bool) -> tuple[np.ndarray, np.ndarray]:
    """Dice per reference class, after Hungarian matching unless the method fixes class identity.

    Returns (dice per class, mapping used: label -> reference class, identity if none).
    """
    if identity_from_method:
        mapping = np.arange(n_classes + 1)
    else:
        mapping = hungarian_mapping(labels, reference, n_classes)
    return dice_per_class(mapping[np.asarray(labels, dtype=np.int64)], reference, n_classes), mapping


def pairwise_agreement(labels_a: np.ndarray, labels_b: np.ndarray, mask: np.ndarray,
                       n_classes: int) -> float:
    """Mean Dice between two label maps inside ``mask`` after Hungarian matching of b onto a."""
    a = np.asarray(labels_a)[mask]
    b = np.asarray(labels_b)[mask]
    mapping = hungarian_mapping(b, a, n_classes)
    return float(np.nanmean(dice_per_class(mapping[b.astype(np.int64)], a, n_classes)))


def gmm_nll(x: np.ndarray, weights: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> float:
    """Mean negative log-likelihood per voxel of a Gaussian mixture; x (V, C), covariances (K, C, C)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    log_terms = []
    for w, mu, cov in zip(weights, means, covariances):
        cov = np.atleast_2d(cov)
        chol = np.linalg.cholesky(cov)
        solved = np.linalg.solve(chol, (x - mu).T)  # (C, V)
        log_det = 2.0 * np.log(np.diag(chol)).sum()
        log_terms.append(np.log(w) - 0.5 * ((solved ** 2).sum(0) + log_det + x.shape[1] * np.log(2 * np.pi)))
    stacked = np.stack(log_terms)
    top = stacked.max(0)
    return float(-(top + np.log(np.exp(stacked - top).sum(0))).mean())


def to_normalised_units(nll_input_units: float, x: np.ndarray) -> float:
    """Convert a mean NLL per voxel of data ``x`` (V, C) to the engine's units.

    The engine z-scores each channel inside the mask; a density of z = (x - mean) / std has
    NLL_z = NLL_x - sum_c log std_c (change of variables), so the two are directly comparable.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    return float(nll_input_units - np.log(x.std(0)).sum())


def best_threshold_split(values: np.ndarray, reference: np.ndarray, bins: int = 256) -> tuple[float, tuple]:
    """Oracle: the best mean Dice any split of ``values`` by two thresholds reaches (3 classes).

    ``reference`` holds classes 1..3 ordered by intensity. Intensities are binned into ``bins``
    equal-width bins; every pair of bin edges is tried. Returns (mean Dice, (low, high) thresholds).
    An upper bound for every voxel-wise intensity method on a single channel.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    reference = np.asarray(reference).ravel()
    edges = np.linspace(values.min(), values.max(), bins + 1)
    index = np.clip(np.digitize(values, edges[1:-1]), 0, bins - 1)
    counts = np.stack([np.bincount(index[reference == k], minlength=bins) for k in (1, 2, 3)])
    cumulative = np.concatenate([np.zeros((3, 1)), np.cumsum(counts, axis=1)], axis=1)  # (3, bins+1)
    totals = cumulative[:, -1]
    a = np.arange(bins + 1)[:, None]  # class 1 = bins [0, a), class 2 = [a, b), class 3 = [b, bins)
    b = np.arange(bins + 1)[None, :]
    size1 = cumulative.sum(0)[a]
    size3 = cumulative.sum(0)[-1] - cumulative.sum(0)[b]
    size2 = cumulative.sum(0)[-1] - size1 - size3
    hit1 = cumulative[0][a]
    hit2 = cumulative[1][b] - cumulative[1][a]
    hit3 = totals[2] - cumulative[2][b]
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = (2 * hit1 / (size1 + totals[0]) + 2 * hit2 / (size2 + totals[1])
                + 2 * hit3 / (size3 + totals[2])) / 3
    dice = np.where(b >= a, dice, -np.inf)
    i, j = np.unravel_index(np.nanargmax(dice), dice.shape)
    return float(dice[i, j]), (float(edges[i]), float(edges[j]))
