"""Classic EM for Gaussian mixtures (GMM) and spatially variant mixtures (SVGMM), in torch.

These are the baselines the deep variants are compared with, so they are written to be fast and
exact rather than short: everything runs on the chosen device, densities are in the log domain,
and a GMM over quantised images (few distinct intensity tuples, as in most MR scans) is fitted on
the unique tuples weighted by their counts, which gives the same likelihood at a fraction of the
cost. (An SVGMM has per-voxel weights, so it always works voxel by voxel.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import gmm
from .seeds import fix_responsibilities

# report(iteration, max_iterations, nll) is called once per iteration; it may raise to cancel.
Reporter = Callable[[int, int, float], None]

# Rows the starts run on: the unique intensity tuples when there are no more, else a subsample.
START_SAMPLES = 20_000
# Each start's EM (and the GMM that em-svgmm starts from) runs at most this long, whatever the
# final run's max_iter and tol: a caller asking for max_iter=10**7, tol=0 still sees progress.
START_MAX_ITER, START_TOL = 200, 1e-5


@dataclass
class MixtureFit:
    """Result of fitting a mixture to flattened voxels (normalised units)."""

    log_resp: torch.Tensor  # (V, K) log responsibilities
    params: gmm.GaussianParameters
    weights: torch.Tensor  # (K,) global mixing weights (mean per-voxel weight for SVGMM)
    nll_history: list[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    notes: list[str] = field(default_factory=list)  # what the fit did that the user should know


def _start_sample(
    x: torch.Tensor, sample_weight: torch.Tensor | None, max_samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """At most ``max_samples`` rows of x (drawn by weight when weighted) and their weights."""
    v = x.shape[0]
    if v <= max_samples:
        return x, sample_weight
    if sample_weight is None:
        idx = torch.randperm(v, generator=generator)[:max_samples]
    else:
        idx = torch.multinomial(sample_weight.detach().cpu().double(), max_samples, replacement=True,
                                generator=generator)
    return x[idx.to(x.device)], None


def kmeans_plus_plus(
    x: torch.Tensor,
    n_classes: int,
    generator: torch.Generator,
    sample_weight: torch.Tensor | None = None,
    max_samples: int = 20_000,
    max_lloyd: int = 300,
    greedy: bool = True,
) -> torch.Tensor:
    """k-means++ seeding, then Lloyd until no point changes cluster; returns (K, C) centres.

    Greedy seeding (as in scikit-learn): each new centre is the best of 2 + ln K candidates drawn
    by D^2 weighting, the one that lowers the total squared distance most; plain D^2 seeding
    (``greedy=False``, one candidate) often splits a large class and merges a small one, but it
    varies more from start to start, which :func:`best_start` uses. Runs on a weighted subsample
    of ``max_samples``.
    """
    sample, w = _start_sample(x, sample_weight, max_samples, generator)
    w = torch.ones(sample.shape[0], dtype=torch.float64, device=x.device) if w is None else w.to(torch.float64)
    n_trials = 2 + int(math.log(n_classes)) if greedy else 1
    first = torch.multinomial(w.cpu(), 1, generator=generator).item()
    centres = [sample[first]]
    closest = ((sample - centres[0]) ** 2).sum(1).double()
    for _ in range(1, n_classes):
        scores = (closest * w).cpu()
        if scores.sum() <= 0:  # every sample sits on a centre already
            scores = w.cpu()
        candidates = torch.multinomial(scores, n_trials, replacement=True, generator=generator).to(x.device)
        dist = torch.cdist(sample[candidates], sample).double() ** 2  # (trials, S)
        trial_closest = torch.minimum(closest[None], dist)
        best = int((trial_closest * w).sum(1).argmin())
        centres.append(sample[candidates[best]])
        closest = trial_closest[best]
    c = torch.stack(centres)
    assign = None
    for _ in range(max_lloyd):
        new_assign = torch.cdist(sample, c).argmin(1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        onehot = torch.nn.functional.one_hot(assign, n_classes).to(torch.float64) * w[:, None]
        mass = onehot.sum(0)
        new = ((onehot.T @ sample.double()) / mass.clamp_min(1e-12)[:, None]).to(x.dtype)
        c = torch.where(mass[:, None] > 0, new, c)  # keep an empty cluster's centre
    return c


def initial_parameters(
    x: torch.Tensor,
    n_classes: int,
    covariance_type: str,
    reg_covar: float,
    generator: torch.Generator,
    sample_weight: torch.Tensor | None = None,
    means_init: torch.Tensor | None = None,
    greedy: bool = True,
) -> tuple[torch.Tensor, gmm.GaussianParameters]:
    """Initial (log weights, parameters): hard assignment to k-means++ centres (or given means)."""
    centres = (means_init if means_init is not None
               else kmeans_plus_plus(x, n_classes, generator, sample_weight, greedy=greedy))
    assign = torch.cdist(x, centres.to(x.dtype)).argmin(1)
    resp = torch.nn.functional.one_hot(assign, n_classes).to(x.dtype)
    nk, params = gmm.weighted_mstep(x, resp, covariance_type, reg_covar, sample_weight)
    if means_init is not None:
        params = gmm.make_parameters(means_init.to(params.means.dtype), params.covariances, covariance_type)
    # An empty class would get weight 0 (log -inf); give it a small share instead.
    weights = (nk / nk.sum()).clamp_min(1e-6)
    return torch.log(weights / weights.sum()), params


def best_start(
    x: torch.Tensor,
    n_classes: int,
    *,
    n_init: int,
    covariance_type: str,
    reg_covar: float,
    max_iter: int,
    tol: float,
    generator: torch.Generator,
    sample_weight: torch.Tensor | None = None,
    max_samples: int = START_SAMPLES,
    check_cancel: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, gmm.GaussianParameters]:
    """The (log weights, parameters) of the best of ``n_init`` k-means++ starts, each run by EM to convergence.

    "Best" is the lowest final mean NLL. Starts alternate greedy and plain k-means++ seeding (the
    first is greedy): greedy starts are good but alike, so several of them often end in the same
    local optimum; plain ones add variety (figures at ``options.EMSettings.n_init``). The starts run on at most ``max_samples`` rows (the
    unique tuples with their counts when few enough, else a subsample), so the cost of extra starts
    does not grow with the volume; the caller refines the winner on all voxels. Each start's EM
    stops after min(max_iter, START_MAX_ITER) iterations or a change below max(tol, START_TOL).
    """
    data, weight = _start_sample(x, sample_weight, max_samples, generator)
    report = None if check_cancel is None else (lambda *_: check_cancel())
    best: tuple[float, torch.Tensor, gmm.GaussianParameters] | None = None
    for start in range(n_init):
        log_w, params = initial_parameters(data, n_classes, covariance_type, reg_covar, generator, weight,
                                           greedy=start % 2 == 0)
        _, params, log_w, history, _, _ = _iterate(
            data, log_w, params, per_voxel_weights=False, covariance_type=covariance_type,
            max_iter=min(max_iter, START_MAX_ITER), tol=max(tol, START_TOL), reg_covar=reg_covar, counts=weight,
            report=report,
        )
        if best is None or history[-1] < best[0]:
            best = (history[-1], log_w, params)
    return best[1], best[2]


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
    fixed_labels: torch.Tensor | None = None,
):
    """The EM loop shared by GMM (global log weights (K,)) and SVGMM (per-voxel log weights (V, K)).

    ``fixed_labels`` (V,): seeded voxels keep their class in every E-step (core/seeds.py).
    Returns (final log responsibilities, parameters, log weights, NLL history, iterations, converged).
    """
    history: list[float] = []
    converged = False
    n_iter = 0
    floor = -30.0  # keeps per-voxel log weights finite once a posterior becomes one-hot
    for n_iter in range(1, max_iter + 1):
        log_resp, ll = gmm.posterior(log_w, gmm.log_gaussian(data, params))
        log_resp = fix_responsibilities(log_resp, fixed_labels)
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
    return fix_responsibilities(log_resp, fixed_labels), params, log_w, history, n_iter, converged


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
    n_init: int = 1,
    check_cancel: Callable[[], None] | None = None,
    fixed_labels: torch.Tensor | None = None,
) -> MixtureFit:
    """EM for a Gaussian mixture with global weights.

    ``fixed_labels`` (V,) long: class index of each seeded voxel, -1 elsewhere (core/seeds.py);
    seeded voxels keep their class in every E-step (and the fit runs voxel by voxel).

    ``init`` = (log weights, parameters) starts from given parameters (used to compare with
    scikit-learn); ``means_init`` starts from given means; otherwise the best of ``n_init``
    k-means++ starts (:func:`best_start`) does. Stops when the mean NLL changes by less than
    ``tol`` or after ``max_iter`` iterations; ``report`` sees the iterations of this final run.
    """
    packed = _compress(x) if compress and fixed_labels is None else None
    data, inverse, counts = (x, None, None) if packed is None else packed
    if init is not None:
        log_w, params = init
    elif means_init is not None or n_init <= 1:
        log_w, params = initial_parameters(data, n_classes, covariance_type, reg_covar, generator, counts, means_init)
    else:
        log_w, params = best_start(data, n_classes, n_init=n_init, covariance_type=covariance_type,
                                   reg_covar=reg_covar, max_iter=max_iter, tol=tol, generator=generator,
                                   sample_weight=counts, check_cancel=check_cancel)
    log_resp, params, log_w, history, n_iter, converged = _iterate(
        data, log_w, params, per_voxel_weights=False, covariance_type=covariance_type, max_iter=max_iter, tol=tol,
        reg_covar=reg_covar, counts=counts, report=report, fixed_labels=fixed_labels,
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
    n_init: int = 1,
    check_cancel: Callable[[], None] | None = None,
    start: MixtureFit | None = None,
    fixed_labels: torch.Tensor | None = None,
) -> MixtureFit:
    """EM for the spatially variant GMM (one weight vector per voxel, no spatial prior).

    Maximum-likelihood SVGMM as in the paper's baseline: the per-voxel weights start at the
    posterior of the GMM that em-gmm fits (``start``, or fitted here with the same starts), and
    each iteration sets them to the current posterior. Its NLL is -mean_i log sum_k pi_ik N_k(x_i).
    """
    if start is None:
        start = fit_gmm(x, n_classes, covariance_type=covariance_type, max_iter=min(max_iter, START_MAX_ITER),
                        tol=max(tol, START_TOL),
                        reg_covar=reg_covar, generator=generator, means_init=means_init, n_init=n_init,
                        check_cancel=check_cancel, fixed_labels=fixed_labels,
                        report=None if check_cancel is None else (lambda *_: check_cancel()))
    log_resp, params, _, history, n_iter, converged = _iterate(
        x, start.log_resp.clamp_min(-30.0), start.params, per_voxel_weights=True, covariance_type=covariance_type,
        max_iter=max_iter, tol=tol, reg_covar=reg_covar, counts=None, report=report, fixed_labels=fixed_labels,
    )
    return MixtureFit(log_resp, params, log_resp.exp().mean(0), history, n_iter, converged)
