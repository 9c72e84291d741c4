"""Gaussian-mixture maths shared by every method (EM and deep).

All functions work on flattened voxels: ``x`` has shape (V, C) (V voxels, C channels) and
responsibilities / weights have shape (V, K). Everything is in the log domain so no density
underflows, and every covariance gets a floor (``reg_covar`` added to its diagonal) so no class
can collapse onto a handful of voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COVARIANCE_TYPES = ("full", "diag")


@dataclass
class GaussianParameters:
    """Means and covariances of K Gaussians in C dimensions.

    ``covariances`` is (K, C, C) for "full" and (K, C) (variances) for "diag"; ``cholesky`` holds
    the lower Cholesky factors (full) or standard deviations (diag) used for the densities.
    """

    means: torch.Tensor
    covariances: torch.Tensor
    covariance_type: str
    cholesky: torch.Tensor

    def covariance_matrices(self) -> torch.Tensor:
        """Covariances as (K, C, C) matrices whatever the covariance type."""
        if self.covariance_type == "full":
            return self.covariances
        return torch.diag_embed(self.covariances)


def make_parameters(means: torch.Tensor, covariances: torch.Tensor, covariance_type: str) -> GaussianParameters:
    """Wrap means and covariances, computing the Cholesky factors once."""
    if covariance_type == "full":
        cholesky = torch.linalg.cholesky(covariances)
    else:
        cholesky = covariances.sqrt()
    return GaussianParameters(means, covariances, covariance_type, cholesky)


def weighted_mstep(
    x: torch.Tensor,
    resp: torch.Tensor,
    covariance_type: str = "full",
    reg_covar: float = 1e-4,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GaussianParameters]:
    """Closed-form M-step: class masses, means and covariances from soft assignments.

    Differentiable (used inside the deep loss). ``sample_weight`` (V,) multiplies every voxel's
    contribution (voxel multiplicities for EM on unique intensity tuples).
    Returns (n_k of shape (K,), parameters).
    """
    w = resp if sample_weight is None else resp * sample_weight[:, None]
    nk = w.sum(0) + 10 * torch.finfo(x.dtype).eps
    means = (w.T @ x) / nk[:, None]
    if covariance_type == "full":
        # sum_i w_ik x_i x_i^T / n_k - mu mu^T would lose precision; centre first. One einsum for
        # all classes is several times faster than a loop over them.
        c = means.shape[1]
        diff = x.unsqueeze(1) - means.unsqueeze(0)  # (V, K, C)
        cov = torch.einsum("vk,vkc,vkd->kcd", w, diff, diff) / nk[:, None, None]
        cov = cov + reg_covar * torch.eye(c, dtype=x.dtype, device=x.device)
    elif covariance_type == "diag":
        sq = (w.T @ (x * x)) / nk[:, None]
        cov = (sq - means * means).clamp_min(0) + reg_covar
    else:
        raise ValueError(f"Unknown covariance_type {covariance_type!r}: use 'full' or 'diag'.")
    return nk, make_parameters(means, cov, covariance_type)


def log_gaussian(x: torch.Tensor, params: GaussianParameters) -> torch.Tensor:
    """Log-density of every voxel under every Gaussian: (V, C) -> (V, K)."""
    c = x.shape[1]
    const = c * math.log(2 * math.pi)
    if params.covariance_type == "full":
        # Solve L y = (x - mu) for all classes at once: (K, C, V).
        diff = x.T.unsqueeze(0) - params.means.unsqueeze(-1)
        y = torch.linalg.solve_triangular(params.cholesky, diff, upper=False)
        maha = (y * y).sum(1)  # (K, V)
        logdet = 2 * torch.log(torch.diagonal(params.cholesky, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        return -0.5 * (const + logdet[:, None] + maha).T
    precision_sqrt = 1.0 / params.cholesky  # (K, C)
    # ||(x - mu) / sigma||^2 expanded so no (V, K, C) tensor is built.
    p2 = precision_sqrt**2
    maha = (x * x) @ p2.T - 2 * x @ (params.means * p2).T + (params.means**2 * p2).sum(-1)
    logdet = 2 * torch.log(params.cholesky).sum(-1)
    return -0.5 * (const + logdet + maha)


def mixture_log_likelihood(log_weights: torch.Tensor, log_dens: torch.Tensor) -> torch.Tensor:
    """Per-voxel log p(x) = logsumexp_k(log pi_k + log N_k(x)); ``log_weights`` is (K,) or (V, K)."""
    return torch.logsumexp(log_weights + log_dens, dim=-1)


def posterior(log_weights: torch.Tensor, log_dens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E-step: returns (log responsibilities (V, K), per-voxel log-likelihood (V,))."""
    joint = log_weights + log_dens
    ll = torch.logsumexp(joint, dim=-1)
    return joint - ll[:, None], ll


def weighted_mean(values: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over voxels, honouring voxel multiplicities."""
    if sample_weight is None:
        return values.mean()
    return (values * sample_weight).sum() / sample_weight.sum()
