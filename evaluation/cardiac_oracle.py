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
import torch
from scipy import ndimage

from DeepGMMSegmentLib.core import gmm

DEFAULT_SMOOTHING_PX = 1.0


def truth_posteriors(voxels: np.ndarray, truth: np.ndarray, n_classes: int, reg_covar: float = 1e-6) -> np.ndarray:
    """(V, K) posteriors under the mixture fitted on the truth: the engine's M-step on one-hot labels.

    ``voxels`` (V, C), ``truth`` (V,) in 1..K. Full covariances; each class weighs its share of the
    voxels, so a class absent from the truth gets posterior 0. float64 throughout.
    """
    x = torch.from_numpy(np.asarray(voxels, dtype=np.float64))
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(np.asarray(truth, dtype=np.int64) - 1),
                                          n_classes).to(torch.float64)
    _, params = gmm.weighted_mstep(x, one_hot, "full", reg_covar)
    log_weights = torch.log(one_hot.sum(0) / len(x))  # -inf for an absent class
    log_resp, _ = gmm.posterior(log_weights, gmm.log_gaussian(x, params))
    return log_resp.exp().numpy()


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
    posterior = truth_posteriors(voxels, truth_inside, n_classes)
    if smoothing_px > 0:
        maps = np.zeros((n_classes,) + mask.shape)
        maps[:, mask] = posterior.T
        posterior = smooth_in_plane(maps, mask, smoothing_px)[:, mask].T
    labels = np.zeros(mask.shape, dtype=np.uint8)
    labels[mask] = posterior.argmax(1) + 1
    return labels
