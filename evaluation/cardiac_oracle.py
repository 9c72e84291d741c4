"""Supervised oracle for the cardiac phantom: the ceiling of a voxel-wise Gaussian mixture.

Each class's Gaussian (mean, full covariance, weight = its share of the mask) is fitted on the
truth itself, then every mask voxel takes the class of highest posterior. With ``smoothing_px``
> 0 the posterior maps are first blurred in-plane by a Gaussian of that many pixels (normalised
inside the mask; thick slices are not mixed), a light spatial prior: the same kind of help the
spatial methods get. No unsupervised method with one Gaussian per class should beat the smoothed
oracle except by chance.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.special import logsumexp

DEFAULT_SMOOTHING_PX = 1.0


def truth_gaussians(voxels: np.ndarray, truth: np.ndarray, n_classes: int,
                    reg_covar: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights (K,), means (K, C), covariances (K, C, C)) of each class's voxels; absent classes weigh 0."""
    voxels = np.asarray(voxels, dtype=np.float64)
    n_channels = voxels.shape[1]
    weights = np.zeros(n_classes)
    means = np.zeros((n_classes, n_channels))
    covariances = np.tile(np.eye(n_channels), (n_classes, 1, 1))
    for k in range(n_classes):
        members = voxels[truth == k + 1]
        if len(members) == 0:
            continue
        weights[k] = len(members) / len(voxels)
        means[k] = members.mean(0)
        if len(members) > n_channels:
            covariances[k] = np.cov(members, rowvar=False).reshape(n_channels, n_channels)
        covariances[k] += reg_covar * np.eye(n_channels)
    return weights, means, covariances


def log_posteriors(voxels: np.ndarray, weights: np.ndarray, means: np.ndarray,
                   covariances: np.ndarray) -> np.ndarray:
    """(V, K) log posterior of each voxel under the mixture; classes of weight 0 get -inf."""
    voxels = np.asarray(voxels, dtype=np.float64)
    log_joint = np.full((len(voxels), len(weights)), -np.inf)
    for k, (w, mu, cov) in enumerate(zip(weights, means, covariances)):
        if w <= 0:
            continue
        chol = np.linalg.cholesky(cov)
        solved = np.linalg.solve(chol, (voxels - mu).T)
        log_det = 2.0 * np.log(np.diag(chol)).sum()
        log_joint[:, k] = np.log(w) - 0.5 * ((solved ** 2).sum(0) + log_det + voxels.shape[1] * np.log(2 * np.pi))
    return log_joint - logsumexp(log_joint, axis=1, keepdims=True)


def smooth_in_plane(maps: np.ndarray, mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Blur (K, z, y, x) maps in-plane inside ``mask`` (normalised convolution); 0 outside."""
    sigma = (0.0,) * (mask.ndim - 2) + (sigma_px, sigma_px)
    weight = ndimage.gaussian_filter(mask.astype(np.float64), sigma)
    out = np.stack([ndimage.gaussian_filter(np.where(mask, m, 0.0), sigma) for m in maps])
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(mask, out / weight, 0.0)
    return out


def oracle_labels(channels: np.ndarray, truth: np.ndarray, mask: np.ndarray, n_classes: int,
                  smoothing_px: float = 0.0) -> np.ndarray:
    """uint8 labels (0 outside ``mask``) of the supervised oracle on (C, *spatial) ``channels``."""
    mask = np.asarray(mask, dtype=bool)
    voxels = np.asarray(channels, dtype=np.float64)[:, mask].T
    centre, scale = voxels.mean(0), voxels.std(0)  # z-scoring changes nothing but the conditioning
    voxels = (voxels - centre) / np.where(scale > 0, scale, 1.0)
    truth_inside = np.asarray(truth)[mask]
    posterior = np.exp(log_posteriors(voxels, *truth_gaussians(voxels, truth_inside, n_classes)))
    if smoothing_px > 0:
        maps = np.zeros((n_classes,) + mask.shape)
        maps[:, mask] = posterior.T
        posterior = smooth_in_plane(maps, mask, smoothing_px)[:, mask].T
    labels = np.zeros(mask.shape, dtype=np.uint8)
    labels[mask] = posterior.argmax(1) + 1
    return labels
