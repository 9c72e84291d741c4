"""Classic EM for Gaussian mixtures (GMM) and spatially variant mixtures (SVGMM), in torch.

These are the baselines the deep variants are compared with, so they are written to be fast and
exact rather than short: everything runs on the chosen device, densities are in the log domain,
and a GMM over quantised images (few distinct intensity tuples, as in most MR scans) is fitted on
the unique tuples weighted by their counts, which gives the same likelihood at a fraction of the
cost. (An SVGMM has per-voxel weights, so it always works voxel by voxel.)

One EM iteration is one sweep over the voxels in blocks (:func:`e_step`: posteriors,
log-likelihood and the M-step's sums in each class's whitened coordinates) and a small closed-form
update (:func:`m_step`); the loop (:func:`_iterate`) stops on scikit-learn's rule. The k-means++
starts and their EM runs (:func:`best_start`) run side by side, so ten starts on a small region
cost little more than one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..options import EMSettings
from . import gmm
from .seeds import FREE, fix_responsibilities

# report(iteration, max_iterations, nll) is called once per iteration; it may raise to cancel.
Reporter = Callable[[int, int, float], None]

# Rows the starts run on: the unique intensity tuples when there are no more, else a subsample.
START_SAMPLES = 20_000
# Each start's EM (and the GMM that em-svgmm starts from) runs at most this long, whatever the
# final run's max_iter and tol: a caller asking for max_iter=10**7, tol=0 still sees progress.
START_MAX_ITER, START_TOL = 200, 1e-5
# Lloyd stops when no centre moves by more than this share of the mean channel variance
# (squared), scikit-learn's KMeans tolerance: on case 190 of the stress benchmark "until no point
# changes cluster" took 94 steps for the same starts' outcome.
LLOYD_TOL = 1e-4
# Direct calls of fit_gmm / fit_svgmm start once unless asked (n_init=...); segment() passes the
# user's n_init, EMSettings.n_init by default.
ONE_START = EMSettings(n_init=1)


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
    max_samples: int = START_SAMPLES,
    max_lloyd: int = 300,
    greedy: bool = True,
) -> torch.Tensor:
    """k-means++ seeding, then Lloyd to convergence; returns (K, C) centres.

    One start of :func:`kmeans_starts` (which see) on a weighted subsample of ``max_samples`` rows.
    """
    sample, w = _start_sample(x, sample_weight, max_samples, generator)
    return kmeans_starts(sample, n_classes, torch.tensor([greedy]), generator, w, max_lloyd)[0]


def kmeans_starts(
    sample: torch.Tensor,
    n_classes: int,
    greedy: torch.Tensor,
    generator: torch.Generator,
    sample_weight: torch.Tensor | None = None,
    max_lloyd: int = 300,
) -> torch.Tensor:
    """S k-means++ starts side by side (S = len(greedy)), each run by Lloyd to convergence: (S, K, C) centres.

    Greedy seeding (as in scikit-learn): each new centre is the best of 2 + ln K candidates drawn
    by D^2 weighting, the one that lowers the total squared distance most; plain D^2 seeding
    (``greedy[s]`` False, one candidate) often splits a large class and merges a small one, but it
    varies more from start to start, which :func:`best_start` uses. Side by side, ten starts on a
    small sample cost little more than one.
    """
    n_starts, n = len(greedy), sample.shape[0]
    rows = torch.arange(n_starts, device=sample.device)
    w = torch.ones(n, dtype=torch.float64, device=sample.device) if sample_weight is None \
        else sample_weight.to(torch.float64)
    plain = (~greedy).to(sample.device)
    first = torch.multinomial(w.cpu().expand(n_starts, n), 1, generator=generator)[:, 0].to(sample.device)
    centres = [sample[first]]  # (S, C) each
    closest = _squared_distances(sample, centres[0][:, None])[:, 0]  # (S, n)
    for _ in range(1, n_classes):
        scores = (closest * w).cpu()
        settled = scores.sum(1) <= 0  # every sample sits on a centre already
        scores[settled] = w.cpu()
        candidates = torch.multinomial(scores, 2 + int(math.log(n_classes)), replacement=True,
                                       generator=generator).to(sample.device)
        candidates[plain, 1:] = candidates[plain, :1]
        trial_closest = torch.minimum(closest[:, None], _squared_distances(sample, sample[candidates]))
        best = (trial_closest * w).sum(-1).argmin(1)  # the candidate that lowers the total most
        centres.append(sample[candidates[rows, best]])
        closest = trial_closest[rows, best]
    centres = torch.stack(centres, 1)
    # Lloyd, each start until none of its centres moves by more than LLOYD_TOL
    sample64 = sample.double()
    tolerance = LLOYD_TOL * float(gmm.channel_variances(sample, sample_weight).mean())
    running = rows
    for _ in range(max_lloyd):
        current = centres[running]
        members = nearest(sample, current).to(torch.float64)  # (R, K, n)
        if sample_weight is not None:
            members *= w
        mass = members.sum(-1)
        new = ((members @ sample64) / mass.clamp_min(1e-12)[..., None]).to(sample.dtype)
        new = torch.where(mass[..., None] > 0, new, current)  # keep an empty cluster's centre
        centres[running] = new
        running = running[((new - current) ** 2).sum((1, 2)) > tolerance]
        if len(running) == 0:
            break
    return centres


def _squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """||x_i - c_sj||^2 for x (n, C) and centres (S, J, C): (S, J, n) float64, from one batched product."""
    x64, c64 = x.double(), centres.double()
    cross = torch.baddbmm((c64 * c64).sum(-1)[..., None], c64, x64.T[None].expand(len(c64), -1, -1), alpha=-2)
    return cross.add_((x64 * x64).sum(-1)).clamp_min_(0)


def nearest(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """One-hot nearest centre of every row of x (V, C) for S sets of centres (S, K, C): (S, K, V) bool.

    argmin_k ||c_k||^2 - 2 c_k.x (||x||^2 is the same for every k) from one batched matrix
    product, class-major so every reduction runs along the voxels (torch's argmin over a short
    axis is 50x slower than this); a tie goes to the first class.
    """
    centres = centres.to(x.dtype)
    dist = torch.baddbmm((centres * centres).sum(-1)[:, :, None], centres, x.T[None].expand(len(centres), -1, -1),
                         alpha=-2)
    onehot = dist == dist.amin(1, keepdim=True)
    taken = onehot[:, 0].clone()
    for k in range(1, onehot.shape[1]):
        onehot[:, k] &= ~taken
        taken |= onehot[:, k]
    return onehot


def hard_assignment_parameters(
    x: torch.Tensor,
    centres: torch.Tensor,
    covariance_type: str,
    reg_covar: float | torch.Tensor,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, gmm.GaussianParameters]:
    """(log weights, parameters) of the classes of the nearest centre; ``centres`` (K, C) or (S, K, C).

    An M-step whose responsibilities are the one-hot assignments: :func:`m_step` from the identity
    whitening about the data's mean, with sums in float64.
    """
    k, c = centres.shape[-2:]
    resp = nearest(x, centres.reshape(-1, k, c)).to(gmm.ACCUMULATE)  # (S, K, V)
    if sample_weight is not None:
        resp = resp * sample_weight.to(gmm.ACCUMULATE)
    x64 = x.to(gmm.ACCUMULATE)
    centre = (resp[0].sum(0) @ x64) / resp[0].sum()  # the data's (weighted) mean: each voxel is in one class
    xc = x64 - centre
    outer = (xc[:, :, None] * xc[:, None, :]).reshape(len(x), c * c) if covariance_type == "full" else xc**2
    shape = centres.shape[:-1]
    second = (resp @ outer).reshape(*shape, c, c) if covariance_type == "full" else (resp @ outer).reshape(*shape, c)
    stats = Statistics(resp.sum(-1).reshape(shape), (resp @ xc).reshape(*shape, c), second, torch.zeros(()), 1.0)
    identity = torch.eye(c, dtype=gmm.ACCUMULATE, device=x.device) if covariance_type == "full" \
        else torch.ones(c, dtype=gmm.ACCUMULATE, device=x.device)
    identity = identity.expand(*shape, *identity.shape)
    origin = gmm.GaussianParameters(centre.expand(*shape, c), identity, covariance_type, identity)
    mass, params = m_step(stats, origin, reg_covar, gmm.channel_variances(x, sample_weight))
    # An empty class would get weight 0 (log -inf); give it a small share instead.
    weights = (mass / mass.sum(-1, keepdim=True)).clamp_min(1e-6)
    return torch.log(weights / weights.sum(-1, keepdim=True)), params


def initial_parameters(
    x: torch.Tensor,
    n_classes: int,
    covariance_type: str,
    reg_covar: float | torch.Tensor,
    generator: torch.Generator,
    sample_weight: torch.Tensor | None = None,
    means_init: torch.Tensor | None = None,
    greedy: bool = True,
) -> tuple[torch.Tensor, gmm.GaussianParameters]:
    """Initial (log weights, parameters): hard assignment to k-means++ centres (or given means)."""
    centres = (means_init if means_init is not None
               else kmeans_plus_plus(x, n_classes, generator, sample_weight, greedy=greedy))
    log_w, params = hard_assignment_parameters(x, centres, covariance_type, reg_covar, sample_weight)
    if means_init is not None:
        params = gmm.make_parameters(means_init.to(params.means.dtype), params.covariances, covariance_type)
    return log_w, params


def best_start(
    x: torch.Tensor,
    n_classes: int,
    settings: EMSettings,
    generator: torch.Generator,
    sample_weight: torch.Tensor | None = None,
    check_cancel: Callable[[], None] | None = None,
    max_samples: int = START_SAMPLES,
) -> tuple[torch.Tensor, gmm.GaussianParameters]:
    """The (log weights, parameters) of the best of ``settings.n_init`` k-means++ starts, each run by EM to convergence.

    "Best" is the lowest final mean NLL. Starts alternate greedy and plain k-means++ seeding (the
    first is greedy): greedy starts are good but alike, so several of them often end in the same
    local optimum; plain ones add variety (figures at ``options.EMSettings.n_init``). The starts
    run on at most ``max_samples`` rows (the unique tuples with their counts when few enough, else a
    subsample), so their cost does not grow with the volume, and side by side
    (:func:`kmeans_starts`, :func:`race_starts`); the caller refines the winner on all voxels. Each
    start's EM stops after min(max_iter, START_MAX_ITER) iterations or a change below max(tol, START_TOL).
    """
    data, weight = _start_sample(x, sample_weight, max_samples, generator)
    centres = kmeans_starts(data, n_classes, torch.arange(settings.n_init) % 2 == 0, generator, weight)
    log_w, params = hard_assignment_parameters(data, centres, settings.covariance_type, settings.reg_covar, weight)
    report = None if check_cancel is None else (lambda *_: check_cancel())
    nll, log_w, params = race_starts(data, log_w, params, _start_settings(settings), weight, report)
    best = int(torch.argmin(nll))
    return log_w[best], params.select(best)


def _start_settings(settings: EMSettings) -> EMSettings:
    """The starts' EM (and em-svgmm's GMM): capped so that max_iter=10**7, tol=0 still shows progress."""
    return settings.replace(max_iter=min(settings.max_iter, START_MAX_ITER), tol=max(settings.tol, START_TOL))


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


# Size of a block of the fused E/M sweep, in elements of its (S*K*C, n) whitened voxels: the
# block's work arrays stay in the CPU's cache, and each block's sums are added to float64 totals.
# A block holds BLOCK_ELEMENTS // (S*K*C) voxels, at least MIN_BLOCK_VOXELS (per-call overhead).
# Measured (CPU time of one sweep, one thread) with budgets 2^15 / 2^16 / 2^17 / 2^18 / 2^19: MNI
# 1 mm + noise (1.9 M voxels, K = 3, C = 1) 24.8 / 19.0 / 15.5 / 13.9 / 14.1 ms; 20 starts side by
# side on 20,000 voxels, K = 8, C = 4: 29.2 / 32.5 / 28.2 / 27.6 / 30.1 ms; 400,000 voxels, K = 8,
# C = 4: 42.4 / 39.9 / 30.9 / 28.3 / 25.3 ms. A single block of 20,000 voxels for the 20 starts
# (640 rows, 51 MB per array) was several times slower.
BLOCK_ELEMENTS, MIN_BLOCK_VOXELS = 1 << 18, 2048
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
    log_likelihood: torch.Tensor  # one per mixture: () or (S,) for S starts side by side
    total: float

    @property
    def mean_nll(self) -> torch.Tensor:
        return -self.log_likelihood / self.total


def whitening(params: gmm.GaussianParameters, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(matrix (K*C, C), offset (K*C, 1), log normaliser (K,)): matrix @ x + offset stacks y_1 .. y_K.

    y_k = L_k^-1 (x - mu_k) (L_k: the Cholesky factor of class k's covariance), so one matrix
    product whitens a block of voxels for every class at once, and the log density of class k is
    log normaliser_k - ||y_k||^2 / 2.
    """
    c = params.means.shape[-1]
    chol = params.cholesky.to(gmm.ACCUMULATE).reshape(-1, *params.cholesky.shape[-2 if params.covariance_type == "full" else -1:])
    k = chol.shape[0]  # all classes of all mixtures
    if params.covariance_type == "full":
        eye = torch.eye(c, dtype=chol.dtype, device=chol.device).expand(k, c, c)
        inverse = torch.linalg.solve_triangular(chol, eye, upper=False)
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    else:
        inverse = torch.diag_embed(1.0 / chol)
        log_det = 2 * torch.log(chol).sum(-1)
    offset = inverse @ params.means.to(gmm.ACCUMULATE).reshape(k, c, 1)
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
    fixed_labels: torch.Tensor | None = None,
) -> Statistics:
    """One pass over the voxels in blocks: posteriors, log-likelihood and the M-step's sums together.

    ``channels`` holds the voxels channel by channel, (C, V) contiguous (``x.T.contiguous()``).
    ``params`` is one mixture (K classes) or S mixtures side by side (a leading axis, as
    :func:`race_starts` uses); ``log_weights`` is (K,) or (S, K), or per voxel (V, K) for one
    mixture. The posterior (V, K) of one mixture is kept only when ``log_resp_out`` is given (it may
    be ``log_weights`` itself: each block is read before it is written). Inside a block the work is
    class-major, (S*K, n), so every operation runs along the voxels (vectorised) in the data's dtype
    (at least float32); block sums are float32 (pairwise) and are added up in float64.
    ``fixed_labels`` (V,) long, one mixture only: a seeded voxel (core/seeds.py) enters the sums and
    ``log_resp_out`` with its class's responsibility 1; its log-likelihood stays the mixture's.
    """
    dtype = channels.dtype
    matrix, offset, log_norm = whitening(params, dtype)
    batch, (k, c) = params.means.shape[:-2], params.means.shape[-2:]
    mixtures = math.prod(batch)
    per_voxel = log_weights.shape[:-1] != batch
    # Base-2 logarithms inside the block: torch's exp2 is vectorised on CPU, exp is not (6x slower here).
    prior = log_norm if per_voxel else log_norm + log_weights.to(gmm.ACCUMULATE).reshape(-1)
    log2_prior = (prior * LOG2_E).to(dtype)[:, None]
    acc = dict(dtype=gmm.ACCUMULATE, device=channels.device)
    mass, first = torch.zeros(mixtures, k, **acc), torch.zeros(mixtures * k, c, **acc)
    second = torch.zeros(mixtures * k, c, c, **acc)
    log_likelihood = torch.zeros(mixtures, **acc)
    n_voxels = channels.shape[1]
    step = max(MIN_BLOCK_VOXELS, BLOCK_ELEMENTS // (mixtures * k * c))
    for lo in range(0, n_voxels, step):
        block = slice(lo, lo + step)
        y = torch.addmm(offset, matrix, channels[:, block]).view(mixtures * k, c, -1)  # whitened voxels
        joint = torch.addcmul(log2_prior, y[:, 0], y[:, 0], value=-0.5 * LOG2_E)  # log2 pi_k N_k(x), (S*K, n)
        for j in range(1, c):
            joint.addcmul_(y[:, j], y[:, j], value=-0.5 * LOG2_E)
        if per_voxel:
            joint.add_(log_weights[block].T, alpha=LOG2_E)
        joint = joint.view(mixtures, k, -1)
        top = joint.amax(1, keepdim=True)  # log-sum-exp over the classes, each exponential computed once
        joint -= top
        resp = joint.exp2()
        norm = resp.sum(1, keepdim=True)
        log2_norm = norm.log2()
        if log_resp_out is not None:
            log_resp_out[block] = fix_responsibilities(((joint[0] - log2_norm[0]) * LOG_2).T,
                                                       None if fixed_labels is None else fixed_labels[block])
        if fixed_labels is not None and statistics:
            seeded = fixed_labels[block] != FREE
            if bool(seeded.any()):  # one-hot scaled by norm, so resp / norm below is exactly one-hot
                one_hot = torch.nn.functional.one_hot(fixed_labels[block][seeded], k).T.to(dtype)
                resp[0][:, seeded] = one_hot * norm[0][:, seeded]
        ll = log2_norm.add_(top)[:, 0]  # log2 p(x), (S, n)
        weight = None if counts is None else counts[block].to(dtype)
        log_likelihood += (ll if weight is None else ll * weight).sum(-1).to(gmm.ACCUMULATE) * LOG_2
        if not statistics:
            continue
        resp /= norm if weight is None else norm / weight
        mass += resp.sum(-1).to(gmm.ACCUMULATE)
        weighted = resp.view(mixtures * k, 1, -1) * y  # (S*K, C, n)
        first += weighted.sum(-1).to(gmm.ACCUMULATE)
        second += torch.bmm(weighted, y.transpose(1, 2)).to(gmm.ACCUMULATE)
    if params.covariance_type == "diag":
        second = torch.diagonal(second, dim1=-2, dim2=-1)
    total = float(n_voxels if counts is None else counts.sum(dtype=gmm.ACCUMULATE))
    return Statistics(mass.reshape(*batch, k), first.reshape(*batch, k, c), second.reshape(*batch, k, *second.shape[1:]),
                      log_likelihood.reshape(batch), total)


def m_step(
    stats: Statistics,
    params: gmm.GaussianParameters,
    reg_covar: float | torch.Tensor,
    channel_var: torch.Tensor,
) -> tuple[torch.Tensor, gmm.GaussianParameters]:
    """Closed-form update from whitened sums: (class masses (..., K), new float64 parameters).

    With m_k = first_k / mass_k: mu_k' = mu_k + L_k m_k and Sigma_k' = L_k (second_k / mass_k -
    m_k m_k^T) L_k^T, then reg_covar and the repair of :func:`gmm.regularize_covariances`.
    """
    mass = stats.mass + 10 * torch.finfo(torch.float32).eps  # an empty class keeps finite parameters
    shift = stats.first / mass[..., None]
    chol = params.cholesky.to(gmm.ACCUMULATE)
    if params.covariance_type == "full":
        spread = stats.second / mass[..., None, None] - shift[..., :, None] * shift[..., None, :]
        cov = chol @ spread @ chol.transpose(-1, -2)
        moved = (chol @ shift[..., None])[..., 0]
    else:
        cov = chol**2 * (stats.second / mass[..., None] - shift**2)
        moved = chol * shift
    cov = gmm.regularize_covariances(cov, channel_var, reg_covar, params.covariance_type)
    return mass, gmm.make_parameters(params.means.to(gmm.ACCUMULATE) + moved, cov, params.covariance_type)


def _iterate(data: torch.Tensor, log_w: torch.Tensor, params: gmm.GaussianParameters, settings: EMSettings,
             counts: torch.Tensor | None, report: Reporter | None, fixed_labels: torch.Tensor | None = None):
    """The EM loop shared by GMM (global log weights (K,)) and SVGMM (per-voxel log weights (V, K)).

    Each iteration is one fused sweep (:func:`e_step`) and a small M-step (:func:`m_step`). It
    stops when the mean NLL per voxel (measured in the E-step, i.e. for the parameters before the
    M-step) changes by less than ``settings.tol`` (scikit-learn's rule: its lower bound is the mean
    log-likelihood per sample, for a GMM), or after ``settings.max_iter`` iterations. Returns (final log responsibilities, parameters, log
    weights, NLL history, iterations, converged); the history ends with the NLL of the returned
    parameters. ``fixed_labels`` (V,): seeded voxels keep their class in every E-step (core/seeds.py).
    """
    per_voxel = log_w.dim() == 2
    max_iter, tol = settings.max_iter, settings.tol
    channel_var = gmm.channel_variances(data, counts)
    channels = data.T.to(torch.promote_types(data.dtype, torch.float32)).contiguous()  # no copy for one channel
    history: list[float] = []
    converged = False
    n_iter = 0
    floor = -30.0  # keeps per-voxel log weights finite once a posterior becomes one-hot
    for n_iter in range(1, max_iter + 1):
        # SVGMM: the new per-voxel weights are this E-step's posterior, written over the old ones
        stats = e_step(channels, log_w, params, counts, log_resp_out=log_w if per_voxel else None,
                       fixed_labels=fixed_labels)
        history.append(float(stats.mean_nll))
        mass, params = m_step(stats, params, settings.reg_covar, channel_var)
        log_w = log_w.clamp_min_(floor) if per_voxel else torch.log(mass / mass.sum())
        if report is not None:
            report(n_iter, max_iter, history[-1])
        if len(history) > 1 and abs(history[-2] - history[-1]) < tol:
            converged = True
            break
    log_resp = torch.empty(data.shape[0], params.means.shape[0], dtype=channels.dtype, device=data.device)
    history.append(float(e_step(channels, log_w, params, counts, log_resp_out=log_resp, statistics=False,
                                fixed_labels=fixed_labels).mean_nll))
    return log_resp, params, log_w, history, n_iter, converged


def race_starts(data: torch.Tensor, log_w: torch.Tensor, params: gmm.GaussianParameters, settings: EMSettings,
                counts: torch.Tensor | None, report: Reporter | None,
                ) -> tuple[torch.Tensor, torch.Tensor, gmm.GaussianParameters]:
    """EM on S starts side by side: (S, K) log weights, parameters with a leading start axis.

    Each iteration is one sweep for all starts still running; a start stops, as in
    :func:`_iterate`, when its mean NLL changes by less than ``settings.tol``. Returns each start's final
    mean NLL (S,), log weights and parameters.
    """
    channel_var = gmm.channel_variances(data, counts)
    channels = data.T.to(torch.promote_types(data.dtype, torch.float32)).contiguous()
    done_log_w, done_means, done_cov = log_w.clone(), params.means.clone(), params.covariances.clone()
    running = torch.arange(len(log_w), device=log_w.device)
    previous = None
    for n_iter in range(1, settings.max_iter + 1):
        stats = e_step(channels, log_w, params, counts)
        mass, params = m_step(stats, params, settings.reg_covar, channel_var)
        log_w = torch.log(mass / mass.sum(-1, keepdim=True))
        done_log_w[running], done_means[running], done_cov[running] = log_w, params.means, params.covariances
        nll = stats.mean_nll
        if report is not None:
            report(n_iter, settings.max_iter, float(nll.min()))
        if previous is not None:
            going = (previous - nll).abs() >= settings.tol
            if not bool(going.any()):
                break
            running, nll, log_w, params = running[going], nll[going], log_w[going], params.select(going)
        previous = nll
    params = gmm.make_parameters(done_means, done_cov, params.covariance_type)
    return e_step(channels, done_log_w, params, counts, statistics=False).mean_nll, done_log_w, params


def fit_gmm(
    x: torch.Tensor,
    n_classes: int,
    settings: EMSettings = ONE_START,
    *,
    generator: torch.Generator,
    means_init: torch.Tensor | None = None,
    init: tuple[torch.Tensor, gmm.GaussianParameters] | None = None,
    report: Reporter | None = None,
    compress: bool = True,
    check_cancel: Callable[[], None] | None = None,
    fixed_labels: torch.Tensor | None = None,
    **overrides,
) -> MixtureFit:
    """EM for a Gaussian mixture with global weights.

    ``fixed_labels`` (V,) long: class index of each seeded voxel, -1 elsewhere (core/seeds.py);
    seeded voxels keep their class in every E-step (and the fit runs voxel by voxel).

    ``settings`` (:class:`~DeepGMMSegmentLib.options.EMSettings`: covariance_type, max_iter, tol,
    reg_covar, n_init), with any of its fields overridden by keyword (``tol=1e-3``). ``init`` =
    (log weights, parameters) starts from given parameters (used to compare with scikit-learn);
    ``means_init`` starts from given means; otherwise the best of ``n_init`` k-means++ starts
    (:func:`best_start`) does. Stops when the mean NLL changes by less than ``tol`` or after
    ``max_iter`` iterations (:func:`_iterate`); ``report`` sees the iterations of this final run.
    """
    settings = settings.replace(**overrides)
    packed = _compress(x) if compress and fixed_labels is None else None
    data, inverse, counts = (x, None, None) if packed is None else packed
    if init is not None:
        log_w, params = init
    elif means_init is not None or settings.n_init <= 1:
        log_w, params = initial_parameters(data, n_classes, settings.covariance_type, settings.reg_covar, generator,
                                           counts, means_init)
    else:
        log_w, params = best_start(data, n_classes, settings, generator, counts, check_cancel)
    log_resp, params, log_w, history, n_iter, converged = _iterate(data, log_w, params, settings, counts, report,
                                                                   fixed_labels)
    if inverse is not None:
        log_resp = log_resp[inverse]
    return MixtureFit(log_resp, params, log_w.exp(), history, n_iter, converged)


def fit_svgmm(
    x: torch.Tensor,
    n_classes: int,
    settings: EMSettings = ONE_START,
    *,
    generator: torch.Generator,
    means_init: torch.Tensor | None = None,
    report: Reporter | None = None,
    check_cancel: Callable[[], None] | None = None,
    start: MixtureFit | None = None,
    fixed_labels: torch.Tensor | None = None,
    **overrides,
) -> MixtureFit:
    """EM for the spatially variant GMM (one weight vector per voxel, no spatial prior).

    Maximum-likelihood SVGMM as in the paper's baseline: the per-voxel weights start at the
    posterior of the GMM that em-gmm fits (``start``, or fitted here with the same starts), and
    each iteration sets them to the current posterior. Its NLL is -mean_i log sum_k pi_ik N_k(x_i).
    Settings and ``fixed_labels`` as :func:`fit_gmm`.
    """
    settings = settings.replace(**overrides)
    if start is None:
        start = fit_gmm(x, n_classes, _start_settings(settings), generator=generator, means_init=means_init,
                        check_cancel=check_cancel, report=None if check_cancel is None else (lambda *_: check_cancel()),
                        fixed_labels=fixed_labels)
    log_resp, params, _, history, n_iter, converged = _iterate(x, start.log_resp.clamp_min(-30.0), start.params,
                                                               settings, None, report, fixed_labels)
    return MixtureFit(log_resp, params, log_resp.exp().mean(0), history, n_iter, converged)
