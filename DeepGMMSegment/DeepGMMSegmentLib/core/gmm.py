"""Gaussian-mixture maths shared by every method (EM and deep).

All functions work on flattened voxels: ``x`` has shape (V, C) (V voxels, C channels) and
responsibilities / weights have shape (V, K). Everything is in the log domain so no density
underflows, and every covariance gets a floor (``reg_covar`` added to its diagonal) so no class
can collapse onto a handful of voxels.

Precision: sums over voxels (class masses, means, covariances, the mean NLL) accumulate in
float64 and the Cholesky factorisation runs in float64, whatever the voxels' dtype (a network
may produce its responsibilities in bfloat16); per-voxel densities use the voxels' dtype, at
least float32. Before factorisation every covariance is repaired (:func:`repair_covariances`),
so identical or nearly collinear channels never make a factorisation fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..options import COVARIANCE_TYPES

ACCUMULATE = torch.float64
# Smallest eigenvalue a covariance keeps, relative to the channel variances, before reg_covar is
# added: enough for a float64 Cholesky of two identical channels even with reg_covar = 0.
MIN_RELATIVE_EIGENVALUE = 1e-6
_VARIANCE_BLOCK = 1 << 16


class FitError(RuntimeError):
    """A mixture fit failed numerically; the message names what failed and what to change."""


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

    def select(self, index) -> GaussianParameters:
        """The mixture(s) ``index`` picks along a leading axis of mixtures side by side."""
        return GaussianParameters(self.means[index], self.covariances[index], self.covariance_type,
                                  self.cholesky[index])

    def covariance_matrices(self) -> torch.Tensor:
        """Covariances as (K, C, C) matrices whatever the covariance type."""
        if self.covariance_type == "full":
            return self.covariances
        return torch.diag_embed(self.covariances)


def make_parameters(means: torch.Tensor, covariances: torch.Tensor, covariance_type: str) -> GaussianParameters:
    """Wrap means and covariances, computing the Cholesky factors once (in float64).

    Raises :class:`FitError` (never a raw ``LinAlgError``) when a covariance is not finite or
    not positive definite.
    """
    cov = covariances.to(ACCUMULATE)
    if not bool(torch.isfinite(cov).all()) or not bool(torch.isfinite(means).all()):
        raise FitError(
            "The class covariances or means became NaN or infinite (the class probabilities were not finite). "
            "Try precision='float32', a smaller learning_rate, or method='em-gmm'."
        )
    if covariance_type == "full":
        cholesky, info = torch.linalg.cholesky_ex(cov)
        if bool((info > 0).any()):
            raise FitError(
                f"A class covariance is not positive definite (class {int((info > 0).nonzero()[0, -1]) + 1}). "
                "Use a larger reg_covar (e.g. 1e-3), fewer classes, or covariance_type='diag'."
            )
    else:
        if bool((cov <= 0).any()):
            raise FitError("A class variance is zero: use a larger reg_covar (e.g. 1e-3) or fewer classes.")
        cholesky = cov.sqrt()
    return GaussianParameters(means, covariances, covariance_type, cholesky)


def channel_variances(x: torch.Tensor, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Variance of each channel over all voxels (float64, (C,)), honouring voxel multiplicities.

    Sums run in float64 over blocks of voxels shifted by the first voxel (no cancellation when
    the channel's mean is far from 0), so no float64 copy of all voxels is ever made.
    """
    with torch.no_grad():
        x = x.detach()
        shift = x[0].to(ACCUMULATE)
        total = torch.zeros((), dtype=ACCUMULATE, device=x.device)
        first = torch.zeros(x.shape[1], dtype=ACCUMULATE, device=x.device)
        second = torch.zeros_like(first)
        for lo in range(0, x.shape[0], _VARIANCE_BLOCK):
            d = x[lo:lo + _VARIANCE_BLOCK].to(ACCUMULATE) - shift
            w = None if sample_weight is None else sample_weight[lo:lo + _VARIANCE_BLOCK].detach().to(ACCUMULATE)
            total += d.shape[0] if w is None else w.sum()
            first += d.sum(0) if w is None else w @ d
            second += (d * d).sum(0) if w is None else w @ (d * d)
        mean = first / total
        return second / total - mean * mean


def repair_covariances(cov: torch.Tensor, channel_var: torch.Tensor) -> torch.Tensor:
    """Symmetrise (K, C, C) covariances and floor their eigenvalues relative to the channel variances.

    With D = diag(channel_var), the smallest eigenvalue of D^-1/2 Sigma D^-1/2 is raised to
    MIN_RELATIVE_EIGENVALUE by adding a multiple of D (a shift, so gradients never go through an
    eigendecomposition). Rounding can make the covariance of identical or collinear channels
    slightly indefinite; this makes it safely positive definite.
    """
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    if not bool(torch.isfinite(cov).all()):
        return cov  # make_parameters reports it
    scale = channel_var.clamp_min(torch.finfo(ACCUMULATE).tiny).sqrt()
    with torch.no_grad():
        scaled = cov.detach() / (scale[:, None] * scale[None, :])
        lowest = torch.linalg.eigvalsh(scaled)[..., 0]  # (K,)
        shift = (MIN_RELATIVE_EIGENVALUE - lowest).clamp_min(0)
    if bool((shift > 0).any()):
        cov = cov + shift[..., None, None] * torch.diag_embed(channel_var)
    return cov


def weighted_mstep(
    x: torch.Tensor,
    resp: torch.Tensor,
    covariance_type: str = "full",
    reg_covar: float | torch.Tensor = 1e-4,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GaussianParameters]:
    """Closed-form M-step: class masses, means and covariances from soft assignments.

    Differentiable (used inside the deep loss). ``sample_weight`` (V,) multiplies every voxel's
    contribution (voxel multiplicities for EM on unique intensity tuples). Sums run in float64:
    the second moments about the overall mean (x is centred first, so nothing cancels badly) come
    from one (K, V) @ (V, C*C) product, cheaper than a centred (V, K, C) tensor per class.
    Returns (n_k of shape (K,), float64 parameters).
    """
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"Unknown covariance_type {covariance_type!r}: use 'full' or 'diag'.")
    w = (resp if sample_weight is None else resp * sample_weight[:, None]).to(ACCUMULATE)
    with torch.no_grad():
        x64 = x.detach().to(ACCUMULATE)
        total = w.detach().sum()
        centre = (w.detach().sum(1) @ x64) / total
        xc = x64 - centre
        channel_var = (w.detach().sum(1) @ xc**2) / total
    nk = w.sum(0) + 10 * torch.finfo(torch.float32).eps
    means_c = (w.T @ xc) / nk[:, None]
    c = x.shape[1]
    if covariance_type == "full":
        second = (w.T @ (xc[:, :, None] * xc[:, None, :]).reshape(-1, c * c)).reshape(-1, c, c)
        cov = second / nk[:, None, None] - means_c[:, :, None] * means_c[:, None, :]
    else:
        cov = (w.T @ xc**2) / nk[:, None] - means_c**2
    return nk, make_parameters(means_c + centre, regularize_covariances(cov, channel_var, reg_covar, covariance_type),
                               covariance_type)


def covariance_floor(reg_covar: float, steps: Sequence[float]) -> torch.Tensor:
    """What every M-step adds to the diagonal, per channel: ``reg_covar`` plus the quantisation variance.

    ``steps`` (C,) are the channels' intensity steps in the fit's units (normalised). A value stored
    as an integer stands for an interval one step wide, so a class is never narrower than a
    uniform on one step (variance step^2 / 12): that is the class covariance of the data with the
    rounding undone (dequantised). Without it, a class on a channel with few levels can shrink onto
    one or two of them and win the likelihood with a spike (robustness.md: em-gmm on the stress
    cases with an integer low-variance channel).
    """
    quantisation = torch.as_tensor(steps, dtype=ACCUMULATE) ** 2 / 12
    return float(reg_covar) + quantisation


def regularize_covariances(cov: torch.Tensor, channel_var: torch.Tensor, reg_covar: float | torch.Tensor,
                           covariance_type: str) -> torch.Tensor:
    """The M-step's last step: add ``reg_covar`` to the diagonal, then repair (:func:`repair_covariances`).

    ``reg_covar`` is one floor for every channel or (C,) floors (:func:`covariance_floor`).

    ``cov`` is (..., K, C, C) or, for "diag", (..., K, C) variances. The floor applies to the regularised
    covariance, so with the default reg_covar it changes nothing: adding it on top of reg_covar
    gave two identical channels a variance of reg_covar * 1.01 in their degenerate direction
    instead of scikit-learn's reg_covar, 0.005 nats per voxel worse on 42 of the 320 stress cases.
    """
    if isinstance(reg_covar, torch.Tensor):
        reg_covar = reg_covar.to(device=cov.device, dtype=cov.dtype)
    if covariance_type == "diag":
        return torch.maximum(cov.clamp_min(0) + reg_covar, MIN_RELATIVE_EIGENVALUE * channel_var)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return repair_covariances(cov + reg_covar * eye, channel_var)  # (C,) * eye: the floors on the diagonal


def log_gaussian(x: torch.Tensor, params: GaussianParameters) -> torch.Tensor:
    """Log-density of every voxel under every Gaussian: (V, C) -> (V, K), in x's dtype (>= float32)."""
    c = x.shape[1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    const = c * math.log(2 * math.pi)
    means = params.means.to(dtype)
    if params.covariance_type == "full":
        # Solve L y = (x - mu) for all classes at once: (K, C, V).
        diff = x.T.unsqueeze(0) - means.unsqueeze(-1)
        y = torch.linalg.solve_triangular(params.cholesky.to(dtype), diff, upper=False)
        maha = (y * y).sum(1)  # (K, V)
        logdet = 2 * torch.log(torch.diagonal(params.cholesky, dim1=-2, dim2=-1)).sum(-1).to(dtype)  # (K,)
        return -0.5 * (const + logdet[:, None] + maha).T
    # ||(x - mu) / sigma||^2 expanded so no (V, K, C) tensor is built.
    p2 = (1.0 / params.cholesky**2).to(dtype)  # (K, C)
    maha = (x * x) @ p2.T - 2 * x @ (means * p2).T + (means**2 * p2).sum(-1)
    logdet = 2 * torch.log(params.cholesky).sum(-1).to(dtype)
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
    """Mean over voxels (accumulated in float64), honouring voxel multiplicities."""
    values = values.to(ACCUMULATE)
    if sample_weight is None:
        return values.mean()
    sample_weight = sample_weight.to(ACCUMULATE)
    return (values * sample_weight).sum() / sample_weight.sum()
