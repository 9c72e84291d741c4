"""Classic EM for Gaussian mixtures (GMM) and spatially variant mixtures (SVGMM), in torch.

These are the baselines the deep variants are compared with, so they are written to be fast and
exact rather than short: everything runs on the chosen device, densities are in the log domain,
and a GMM over quantised images (few distinct intensity tuples, as in most MR scans) is fitted on
the unique tuples weighted by their counts, which gives the same likelihood at a fraction of the
cost. (An SVGMM has per-voxel weights, so it always works voxel by voxel.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import gmm

# report(iteration, max_iterations, nll) is called once per iteration; it may raise to cancel.
Reporter = Callable[[int, int, float], None]


@dataclass
class MixtureFit:
    """Result of fitting a mixture to flattened voxels (normalised units)."""

    log_resp: torch.Tensor  # (V, K) log responsibilities
    params: gmm.GaussianParameters
    weights: torch.Tensor  # (K,) global mixing weights (mean per-voxel weight for SVGMM)
    nll_history: list[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False


def kmeans_plus_plus(
    x: torch.Tensor,
    n_classes: int,
    generator: torch.Generator,
    sample_weight: torch.Tensor | None = None,
    max_samples: int = 100_000,
    lloyd_iterations: int = 20,
) -> torch.Tensor:
    """k-means++ seeding followed by a few Lloyd steps on a weighted subsample; returns (K, C) centres."""
    v = x.shape[0]
    probs = torch.ones(v, device=x.device) if sample_weight is None else sample_weight.float()
    if v > max_samples:
        idx = torch.multinomial(probs.cpu(), max_samples, replacement=True, generator=generator).to(x.device)
        sample, w = x[idx], torch.ones(max_samples, dtype=x.dtype, device=x.device)
    else:
        sample, w = x, probs.to(x.dtype)
    first = torch.multinomial(w.cpu().float(), 1, generator=generator).item()
    centres = [sample[first]]
    closest = ((sample - centres[0]) ** 2).sum(1)
    for _ in range(1, n_classes):
        scores = (closest * w).cpu().double()
        if scores.sum() <= 0:  # every sample sits on a centre already
            scores = w.cpu().double()
        nxt = torch.multinomial(scores, 1, generator=generator).item()
        centres.append(sample[nxt])
        closest = torch.minimum(closest, ((sample - sample[nxt]) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(lloyd_iterations):
        assign = torch.cdist(sample, c).argmin(1)
        onehot = torch.nn.functional.one_hot(assign, n_classes).to(x.dtype) * w[:, None]
        mass = onehot.sum(0)
        new = (onehot.T @ sample) / mass.clamp_min(1e-12)[:, None]
        new = torch.where(mass[:, None] > 0, new, c)  # keep an empty cluster's centre
        if torch.allclose(new, c, atol=1e-6):
            c = new
            break
        c = new
    return c


def initial_parameters(
    x: torch.Tensor,
    n_classes: int,
    covariance_type: str,
    reg_covar: float,
    generator: torch.Generator,
    sample_weight: torch.Tensor | None = None,
    means_init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, gmm.GaussianParameters]:
    """Initial (log weights, parameters): hard assignment to k-means++ centres (or given means)."""
    centres = means_init if means_init is not None else kmeans_plus_plus(x, n_classes, generator, sample_weight)
    assign = torch.cdist(x, centres.to(x.dtype)).argmin(1)
    resp = torch.nn.functional.one_hot(assign, n_classes).to(x.dtype)
    nk, params = gmm.weighted_mstep(x, resp, covariance_type, reg_covar, sample_weight)
    if means_init is not None:
        params = gmm.make_parameters(means_init.to(x.dtype), params.covariances, covariance_type)
    # An empty class would get weight 0 (log -inf); give it a small share instead.
    weights = (nk / nk.sum()).clamp_min(1e-6)
    return torch.log(weights / weights.sum()), params


def _compress(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Unique intensity tuples with counts, or None when compression would not pay off."""
    v = x.shape[0]
    if v < 20_000:
        return None
    probe = x[:: max(1, v // 5000)]
    if torch.unique(probe, dim=0).shape[0] > 0.5 * probe.shape[0]:
        return None
    if x.shape[1] == 1:  # a flat unique is several times faster than unique over rows
        uniq, inverse, counts = torch.unique(x[:, 0], return_inverse=True, return_counts=True)
        uniq = uniq[:, None]
    else:
        uniq, inverse, counts = torch.unique(x, dim=0, return_inverse=True, return_counts=True)
    if uniq.shape[0] > v // 4:
        return None
    return uniq, inverse, counts.to(x.dtype)


def _iterate(
    data: torch.Tensor,
    log_w: torch.Tensor,
    params: gmm.GaussianParameters,
    *,
    per_voxel_weights: bool,
    covariance_type: str,
    max_iter: int,
    tol: float,
    reg_covar: float,
    counts: torch.Tensor | None,
    report: Reporter | None,
):
    """The EM loop shared by GMM (global log weights (K,)) and SVGMM (per-voxel log weights (V, K)).

    Returns (final log responsibilities, parameters, log weights, NLL history, iterations, converged).
    """
    history: list[float] = []
    converged = False
    n_iter = 0
    floor = -30.0  # keeps per-voxel log weights finite once a posterior becomes one-hot
    for n_iter in range(1, max_iter + 1):
        log_resp, ll = gmm.posterior(log_w, gmm.log_gaussian(data, params))
        nll = -gmm.weighted_mean(ll, counts).item()
        history.append(nll)
        nk, params = gmm.weighted_mstep(data, log_resp.exp(), covariance_type, reg_covar, counts)
        log_w = log_resp.clamp_min(floor) if per_voxel_weights else torch.log(nk / nk.sum())
        if report is not None:
            report(n_iter, max_iter, nll)
        if len(history) > 1 and abs(history[-2] - history[-1]) < tol:
            converged = True
            break
    log_resp, ll = gmm.posterior(log_w, gmm.log_gaussian(data, params))
    history.append(-gmm.weighted_mean(ll, counts).item())
    return log_resp, params, log_w, history, n_iter, converged


def fit_gmm(
    x: torch.Tensor,
    n_classes: int,
    *,
    covariance_type: str = "full",
    max_iter: int = 200,
    tol: float = 1e-5,
    reg_covar: float = 1e-4,
    generator: torch.Generator,
    means_init: torch.Tensor | None = None,
    init: tuple[torch.Tensor, gmm.GaussianParameters] | None = None,
    report: Reporter | None = None,
    compress: bool = True,
) -> MixtureFit:
    """EM for a Gaussian mixture with global weights.

    ``init`` = (log weights, parameters) starts from given parameters (used to compare with
    scikit-learn); otherwise k-means++ (or ``means_init``) initialises. Stops when the mean NLL
    changes by less than ``tol`` or after ``max_iter`` iterations.
    """
    packed = _compress(x) if compress else None
    data, inverse, counts = (x, None, None) if packed is None else packed
    if init is None:
        log_w, params = initial_parameters(data, n_classes, covariance_type, reg_covar, generator, counts, means_init)
    else:
        log_w, params = init
    log_resp, params, log_w, history, n_iter, converged = _iterate(
        data, log_w, params, per_voxel_weights=False, covariance_type=covariance_type, max_iter=max_iter, tol=tol,
        reg_covar=reg_covar, counts=counts, report=report,
    )
    if inverse is not None:
        log_resp = log_resp[inverse]
    return MixtureFit(log_resp, params, log_w.exp(), history, n_iter, converged)


def fit_svgmm(
    x: torch.Tensor,
    n_classes: int,
    *,
    covariance_type: str = "full",
    max_iter: int = 200,
    tol: float = 1e-5,
    reg_covar: float = 1e-4,
    generator: torch.Generator,
    means_init: torch.Tensor | None = None,
    report: Reporter | None = None,
) -> MixtureFit:
    """EM for the spatially variant GMM (one weight vector per voxel, no spatial prior).

    Maximum-likelihood SVGMM as in the paper's baseline: the per-voxel weights are initialised
    with the posterior of the initial GMM, and each iteration sets them to the current posterior.
    Its NLL is -mean_i log sum_k pi_ik N_k(x_i).
    """
    log_w, params = initial_parameters(x, n_classes, covariance_type, reg_covar, generator, None, means_init)
    log_pi, _ = gmm.posterior(log_w, gmm.log_gaussian(x, params))
    log_resp, params, _, history, n_iter, converged = _iterate(
        x, log_pi, params, per_voxel_weights=True, covariance_type=covariance_type, max_iter=max_iter, tol=tol,
        reg_covar=reg_covar, counts=None, report=report,
    )
    return MixtureFit(log_resp, params, log_resp.exp().mean(0), history, n_iter, converged)
