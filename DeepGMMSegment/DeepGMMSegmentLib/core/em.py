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
            data, log_w, params, max_iter=min(max_iter, START_MAX_ITER), tol=max(tol, START_TOL),
            reg_covar=reg_covar, counts=weight, report=report,
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


# Voxels per block of the fused E/M sweep: the block's (n, K * C) work arrays stay in the CPU's
# cache, and each block's sums are added to float64 totals. Measured on MNI 1 mm + noise (K = 3,
# C = 1) and a 4-channel K = 8 phantom: 16k-64k voxels per block are within a few per cent of each
# other; 4k is slower (per-call overhead), a single block of all voxels much slower (memory traffic).
BLOCK_VOXELS = 1 << 15
LOG2_E, LOG_2 = 1.0 / math.log(2.0), math.log(2.0)


@dataclass
class Statistics:
    """What one E-step sweep leaves for the M-step, per class in its own whitened coordinates.

    With y = L_k^-1 (x - mu_k) (L_k the Cholesky factor of the class's current covariance):
    ``mass`` sum_i r_ik, ``first`` sum_i r_ik y_i (K, C), ``second`` sum_i r_ik y_i y_i^T (K, C, C)
    (its diagonal (K, C) for "diag"); ``log_likelihood`` sum_i log p(x_i) and ``total`` the number
    of voxels (all sums weighted by the voxel counts of compressed data). Whitened coordinates have
    unit scale whatever the class, so float32 block sums lose nothing to cancellation.
    """

    mass: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    log_likelihood: float
    total: float

    @property
    def mean_nll(self) -> float:
        return -self.log_likelihood / self.total


def whitening(params: gmm.GaussianParameters, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(matrix (K*C, C), offset (K*C, 1), log normaliser (K,)): matrix @ x + offset stacks y_1 .. y_K.

    y_k = L_k^-1 (x - mu_k) (L_k: the Cholesky factor of class k's covariance), so one matrix
    product whitens a block of voxels for every class at once, and the log density of class k is
    log normaliser_k - ||y_k||^2 / 2.
    """
    chol = params.cholesky.to(gmm.ACCUMULATE)
    k, c = params.means.shape
    if params.covariance_type == "full":
        eye = torch.eye(c, dtype=chol.dtype, device=chol.device).expand(k, c, c)
        inverse = torch.linalg.solve_triangular(chol, eye, upper=False)
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    else:
        inverse = torch.diag_embed(1.0 / chol)
        log_det = 2 * torch.log(chol).sum(-1)
    offset = inverse @ params.means.to(gmm.ACCUMULATE)[:, :, None]  # (K, C, 1)
    log_norm = -0.5 * (c * math.log(2 * math.pi) + log_det)
    return inverse.reshape(k * c, c).to(dtype), -offset.reshape(k * c, 1).to(dtype), log_norm


def e_step(
    channels: torch.Tensor,
    log_weights: torch.Tensor,
    params: gmm.GaussianParameters,
    counts: torch.Tensor | None = None,
    *,
    log_resp_out: torch.Tensor | None = None,
    statistics: bool = True,
) -> Statistics:
    """One pass over the voxels in blocks: posteriors, log-likelihood and the M-step's sums together.

    ``channels`` holds the voxels channel by channel, (C, V) contiguous (``x.T.contiguous()``);
    ``log_weights`` is (K,) or per voxel (V, K). The posterior (V, K) is kept only when
    ``log_resp_out`` is given (it may be ``log_weights`` itself: each block is read before it is
    written). Inside a block the work is class-major, (K, n), so every operation runs along the
    voxels (vectorised) in the data's dtype (at least float32); block sums are float32 (pairwise)
    and are added up in float64.
    """
    dtype = channels.dtype
    matrix, offset, log_norm = whitening(params, dtype)
    k, c = params.means.shape
    per_voxel = log_weights.dim() == 2
    # Base-2 logarithms inside the block: torch's exp2 is vectorised on CPU, exp is not (6x slower here).
    log2_prior = ((log_norm if per_voxel else log_norm + log_weights.to(gmm.ACCUMULATE)) * LOG2_E).to(dtype)[:, None]
    acc = dict(dtype=gmm.ACCUMULATE, device=channels.device)
    mass, first, second = torch.zeros(k, **acc), torch.zeros(k, c, **acc), torch.zeros(k, c, c, **acc)
    log_likelihood = torch.zeros((), **acc)
    n_voxels = channels.shape[1]
    for lo in range(0, n_voxels, BLOCK_VOXELS):
        block = slice(lo, lo + BLOCK_VOXELS)
        y = torch.addmm(offset, matrix, channels[:, block]).view(k, c, -1)  # (K, C, n) whitened voxels
        joint = torch.addcmul(log2_prior, y[:, 0], y[:, 0], value=-0.5 * LOG2_E)  # (K, n): log2 pi_k N_k(x)
        for j in range(1, c):
            joint.addcmul_(y[:, j], y[:, j], value=-0.5 * LOG2_E)
        if per_voxel:
            joint.add_(log_weights[block].T, alpha=LOG2_E)
        top = joint.amax(0)  # log-sum-exp over the classes, each exponential computed once
        joint -= top
        resp = joint.exp2()
        norm = resp.sum(0)
        log2_norm = norm.log2()
        if log_resp_out is not None:
            log_resp_out[block] = ((joint - log2_norm) * LOG_2).T
        ll = log2_norm.add_(top)  # log2 p(x), per voxel
        weight = None if counts is None else counts[block].to(dtype)
        log_likelihood += (ll if weight is None else ll * weight).sum().to(gmm.ACCUMULATE) * LOG_2
        if not statistics:
            continue
        resp /= norm if weight is None else norm / weight
        mass += resp.sum(1).to(gmm.ACCUMULATE)
        weighted = resp[:, None, :] * y  # (K, C, n)
        first += weighted.sum(2).to(gmm.ACCUMULATE)
        second += torch.bmm(weighted, y.transpose(1, 2)).to(gmm.ACCUMULATE)
    if params.covariance_type == "diag":
        second = torch.diagonal(second, dim1=-2, dim2=-1)
    total = float(n_voxels if counts is None else counts.sum(dtype=gmm.ACCUMULATE))
    return Statistics(mass, first, second, float(log_likelihood), total)


def m_step(
    stats: Statistics,
    params: gmm.GaussianParameters,
    reg_covar: float,
    channel_var: torch.Tensor,
) -> tuple[torch.Tensor, gmm.GaussianParameters]:
    """Closed-form update from whitened sums: (class masses (K,), new float64 parameters).

    With m_k = first_k / mass_k: mu_k' = mu_k + L_k m_k and Sigma_k' = L_k (second_k / mass_k -
    m_k m_k^T) L_k^T, then reg_covar and the repair of :func:`gmm.regularize_covariances`.
    """
    mass = stats.mass + 10 * torch.finfo(torch.float32).eps  # an empty class keeps finite parameters
    shift = stats.first / mass[:, None]
    chol = params.cholesky.to(gmm.ACCUMULATE)
    if params.covariance_type == "full":
        spread = stats.second / mass[:, None, None] - shift[:, :, None] * shift[:, None, :]
        cov = chol @ spread @ chol.transpose(-1, -2)
        moved = (chol @ shift[:, :, None])[..., 0]
    else:
        cov = chol**2 * (stats.second / mass[:, None] - shift**2)
        moved = chol * shift
    means = params.means.to(gmm.ACCUMULATE) + moved
    cov = gmm.regularize_covariances(cov, channel_var, reg_covar)
    return mass, gmm.make_parameters(means, cov, params.covariance_type)


def _iterate(
    data: torch.Tensor,
    log_w: torch.Tensor,
    params: gmm.GaussianParameters,
    *,
    max_iter: int,
    tol: float,
    reg_covar: float,
    counts: torch.Tensor | None,
    report: Reporter | None,
):
    """The EM loop shared by GMM (global log weights (K,)) and SVGMM (per-voxel log weights (V, K)).

    Each iteration is one fused sweep (:func:`e_step`) and a small M-step (:func:`m_step`). It
    stops when the mean NLL per voxel (measured in the E-step, i.e. for the parameters before the
    M-step) changes by less than ``tol``: scikit-learn's rule with its lower bound, the mean
    log-likelihood per sample, for a GMM. Returns (final log responsibilities, parameters, log
    weights, NLL history, iterations, converged); the history ends with the NLL of the returned
    parameters.
    """
    per_voxel = log_w.dim() == 2
    channel_var = gmm.channel_variances(data, counts)
    channels = data.T.to(torch.promote_types(data.dtype, torch.float32)).contiguous()  # no copy for one channel
    history: list[float] = []
    converged = False
    n_iter = 0
    floor = -30.0  # keeps per-voxel log weights finite once a posterior becomes one-hot
    for n_iter in range(1, max_iter + 1):
        # SVGMM: the new per-voxel weights are this E-step's posterior, written over the old ones
        stats = e_step(channels, log_w, params, counts, log_resp_out=log_w if per_voxel else None)
        history.append(stats.mean_nll)
        mass, params = m_step(stats, params, reg_covar, channel_var)
        log_w = log_w.clamp_min_(floor) if per_voxel else torch.log(mass / mass.sum())
        if report is not None:
            report(n_iter, max_iter, history[-1])
        if len(history) > 1 and abs(history[-2] - history[-1]) < tol:
            converged = True
            break
    log_resp = torch.empty(data.shape[0], params.means.shape[0], dtype=channels.dtype, device=data.device)
    history.append(e_step(channels, log_w, params, counts, log_resp_out=log_resp, statistics=False).mean_nll)
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
    n_init: int = 1,
    check_cancel: Callable[[], None] | None = None,
) -> MixtureFit:
    """EM for a Gaussian mixture with global weights.

    ``init`` = (log weights, parameters) starts from given parameters (used to compare with
    scikit-learn); ``means_init`` starts from given means; otherwise the best of ``n_init``
    k-means++ starts (:func:`best_start`) does. Stops when the mean NLL changes by less than
    ``tol`` or after ``max_iter`` iterations; ``report`` sees the iterations of this final run.
    """
    packed = _compress(x) if compress else None
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
        data, log_w, params, max_iter=max_iter, tol=tol, reg_covar=reg_covar, counts=counts, report=report,
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
                        check_cancel=check_cancel,
                        report=None if check_cancel is None else (lambda *_: check_cancel()))
    log_resp, params, _, history, n_iter, converged = _iterate(
        x, start.log_resp.clamp_min(-30.0), start.params, max_iter=max_iter, tol=tol, reg_covar=reg_covar,
        counts=None, report=report,
    )
    return MixtureFit(log_resp, params, log_resp.exp().mean(0), history, n_iter, converged)
