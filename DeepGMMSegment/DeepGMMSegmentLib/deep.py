"""Deep Gaussian mixture segmentation (deepG / deepSVG), fitted per image (deep image prior).

A U-Net maps the normalised channels to per-voxel class probabilities y. The mixture's means,
covariances (and, for deepG, global weights) follow from y in closed form (a differentiable
M-step), and the network is trained by gradient descent on the mixture's negative
log-likelihood (Schwab, Mayr, Haltmeier 2024):

* deepG:   NLL = -mean_i log sum_k pi_k N(x_i | mu_k, Sigma_k),  pi_k = mean_i y_ik
* deepSVG: NLL = -mean_i log sum_k y_ik N(x_i | mu_k, Sigma_k)   (per-voxel mixing weights)

An optional prior on the class means (weight lambda, the paper's mean regularisation) also fixes
which network output is which class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from . import gmm
from .em import MixtureFit
from .networks import UNet, resolve_precision

DEEP_METHODS = ("deepg", "deepsvg")
# Weight of the explicit spatial prior when the caller gives none. deepsvg: 0.3, measured on the
# 2 mm MNI T1 at learning rate 3e-3 (mean Dice 0.904 clean / 0.858 at noise 0.10, against
# 0.873 / 0.730 without it; 0.878 / 0.863 at the current 1e-2;
# docs/evaluation.md has the current figures). deepg: 0, because its per-voxel probabilities enter
# the likelihood only through the M-step, so the prior alone pulls them towards one spatially
# constant mixture (measured: mean Dice 0.43 on the clean 2 mm T1 with 0.3).
DEFAULT_SMOOTHNESS = {"deepsvg": 0.3, "deepg": 0.0}


@dataclass
class DeepSettings:
    """Tunable settings of the per-image deep fit (defaults measured on the MNI sample, see docs)."""

    network: str = "auto"  # "auto" (2D images: 2d; volumes: 3d) | "2d" | "3d"
    base_width: int = 8
    depth: int = 3
    # Adam's step size. 1e-2 for both networks, measured with the spatial prior on the 2 mm MNI:
    # with 3e-3 or 5e-3 the 3D network stalled on the three-channel phantom (NLL 0.88/0.77 vs 0.57,
    # mean Dice 0.65/0.66 vs 0.86) for +0.01..0.025 Dice on the clean T1 (0.903/0.887 vs 0.878).
    learning_rate: float = 1e-2
    max_iter: int = 100
    min_iter: int = 20
    tol: float = 1e-4
    warm_start: str = "em"  # "em" | "none"
    warm_start_iter: int = 30
    covariance_type: str = "full"
    reg_covar: float = 1e-4
    prior_weight: float = 1.0
    # beta of the explicit spatial prior (neighbouring voxels' class probabilities agree); 0 is the
    # paper's loss; None: DEFAULT_SMOOTHNESS of the method
    smoothness: float | None = None
    precision: str = "auto"  # the network's convolutions: "auto" | "float32" | "bfloat16"


def deep_gmm_loss(
    x: torch.Tensor,
    log_resp: torch.Tensor,
    mask: torch.Tensor,
    method: str,
    covariance_type: str = "full",
    prior_means: torch.Tensor | None = None,
    prior_weight: float = 0.0,
    reg_covar: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, gmm.GaussianParameters]]]:
    """Mixture NLL of each image at the M-step implied by its responsibilities, averaged over the batch.

    x: (N, C, *spatial) normalised; log_resp: (N, K, *spatial) = log_softmax(logits); mask:
    (N, *spatial) bool. Returns (loss, nll, [(weights, params) per image]); loss = nll +
    prior_weight * mean_b ||mu_b - prior_means||^2 when prior means are given.
    """
    if method not in DEEP_METHODS:
        raise ValueError(f"Unknown deep method {method!r}: use one of {DEEP_METHODS}.")
    nlls, penalties, fitted = [], [], []
    for b in range(x.shape[0]):
        m = mask[b]
        xv = x[b][:, m].T  # (V, C)
        lr = log_resp[b][:, m].T  # (V, K)
        resp = lr.exp()
        nk, params = gmm.weighted_mstep(xv, resp, covariance_type, reg_covar)
        log_dens = gmm.log_gaussian(xv, params)
        if method == "deepg":
            log_w = torch.log(nk / nk.sum())
            ll = torch.logsumexp(log_w + log_dens, dim=1)
            weights = nk / nk.sum()
        else:
            ll = torch.logsumexp(lr + log_dens, dim=1)
            weights = resp.mean(0)
        nlls.append(-ll.mean())
        if prior_means is not None:
            penalties.append(((params.means - prior_means) ** 2).sum())
        fitted.append((weights, params))
    nll = torch.stack(nlls).mean()
    loss = nll
    if penalties and prior_weight > 0:
        loss = nll + prior_weight * torch.stack(penalties).mean()
    return loss, nll, fitted


def smoothness_penalty(
    log_resp: torch.Tensor, mask: torch.Tensor, spacing: tuple[float, ...] | None = None
) -> torch.Tensor:
    """Mean squared difference of neighbouring voxels' class probabilities, summed over the axes.

    log_resp: (N, K, *spatial); mask: (N, *spatial) bool. Only pairs of neighbours that are both
    inside the mask count. Each axis is weighted by (smallest spacing / its spacing)^2, so thick
    slices couple less across slices. This is the explicit spatial prior beta * sum_{i~j}
    ||y_i - y_j||^2 (a quadratic MRF on the probabilities) that the method note suggests adding to
    the deep image prior; it is 0 for piecewise-constant label maps.
    """
    prob = log_resp.exp()
    n_spatial = prob.ndim - 2
    steps = spacing if spacing is not None and len(spacing) == n_spatial else (1.0,) * n_spatial
    finest = min(steps)
    total = prob.new_zeros(())
    for axis in range(n_spatial):
        size = prob.shape[2 + axis]
        if size < 2:
            continue
        diff = (prob.narrow(2 + axis, 1, size - 1) - prob.narrow(2 + axis, 0, size - 1)).pow(2).sum(1)
        both = mask.narrow(1 + axis, 1, size - 1) & mask.narrow(1 + axis, 0, size - 1)
        pairs = both.sum()
        if pairs > 0:
            total = total + (finest / steps[axis]) ** 2 * diff[both].sum() / pairs
    return total


def choose_network(shape: tuple[int, ...], spacing: tuple[float, ...] | None, network: str,
                   method: str = "deepsvg") -> tuple[int, bool]:
    """(spatial_dims, pool_in_plane_only) for an image of ``shape`` (z, y, x) or (y, x).

    "auto" uses the 3D network for deepsvg volumes: before the spatial prior existed, on the MNI
    2 mm sample with noise (sigma = 10 % of the range) it reached a mean Dice of 0.782 against 0.712
    for the per-slice 2D network, at the same Dice on the clean image (0.846 vs 0.850), for about
    twice the time per iteration. deepg gets the 2D network: on the clean 2 mm MNI T1 its 3D fit
    ended at mean Dice 0.801 against 0.847 per slice (learning rate 1e-2; 0.69 at 3e-3).
    Volumes of 1 or 2 slices always get the 2D network.
    """
    if len(shape) == 2 or network == "2d" or (network == "auto" and method == "deepg"):
        return 2, False
    if network in ("auto", "3d") and shape[0] <= 2:
        return 2, False  # a 3D level 2 slices thick is what broke oneDNN's bfloat16 backward (networks.py)
    if network not in ("auto", "3d"):
        raise ValueError(f"Unknown network {network!r}: use 'auto', '2d' or '3d'.")
    thick = False
    if spacing is not None:
        in_plane = min(spacing[1], spacing[2])
        thick = spacing[0] > 2.0 * in_plane
    return 3, thick or shape[0] < 16


def _bounding_box(mask: torch.Tensor, margin: int = 2) -> tuple[slice, ...]:
    idx = mask.nonzero()
    lo = (idx.min(0).values - margin).clamp_min(0)
    hi = idx.max(0).values + 1 + margin
    return tuple(slice(int(a), int(min(b, s))) for a, b, s in zip(lo, hi, mask.shape))


def fit_deep(
    x: torch.Tensor,
    mask: torch.Tensor,
    n_classes: int,
    method: str,
    settings: DeepSettings,
    *,
    spacing: tuple[float, ...] | None = None,
    prior_means: torch.Tensor | None = None,
    warm_start_log_resp: torch.Tensor | None = None,
    report: Callable[[int, int, float], None] | None = None,
    network: torch.nn.Module | None = None,
) -> tuple[MixtureFit, torch.nn.Module]:
    """Fit a fresh network (or continue ``network``) to one image.

    x: (C, *spatial) normalised channels; mask: (*spatial) bool. Seeding is the caller's job.
    ``warm_start_log_resp`` (V, K) over the mask voxels (e.g. the EM posterior) is first distilled
    into the network; those steps count as iterations (``report`` and the NLL history include them). Returns the fit over the mask voxels and the trained network.
    """
    box = _bounding_box(mask)
    xc = x[(slice(None),) + box] * mask[box]  # zero (the normalised mean) outside the mask
    mc = mask[box]
    dims, in_plane_only = choose_network(tuple(mc.shape), spacing, settings.network, method)
    if dims == 2 and mc.ndim == 3:
        net_in = xc.permute(1, 0, 2, 3)  # slices as a batch: (Z, C, Y, X)
    else:
        net_in = xc.unsqueeze(0)
    if network is None:
        network = UNet(dims, x.shape[0], n_classes, settings.base_width, settings.depth, in_plane_only)
        network = network.to(x.device)
    network.autocast_dtype = resolve_precision(settings.precision, x.device)

    def forward() -> torch.Tensor:
        """Log responsibilities on the cropped grid, as (1, K, *spatial)."""
        logits = network(net_in)
        if dims == 2 and mc.ndim == 3:
            logits = logits.permute(1, 0, 2, 3).unsqueeze(0)
        return F.log_softmax(logits, dim=1)

    smoothness = DEFAULT_SMOOTHNESS[method] if settings.smoothness is None else float(settings.smoothness)
    optimiser = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
    xb, mb = xc.unsqueeze(0), mc.unsqueeze(0)
    warm_iter = settings.warm_start_iter if warm_start_log_resp is not None else 0
    total = warm_iter + settings.max_iter
    # Warm-start steps count as iterations (and report their NLL) so progress moves from the start.
    history: list[float] = []
    n_iter = 0
    if warm_iter > 0:
        target = warm_start_log_resp.exp().T  # (K, V)
        for n_iter in range(1, warm_iter + 1):
            optimiser.zero_grad(set_to_none=True)
            log_resp = forward()
            loss = -(target * log_resp[0][:, mc]).sum(0).mean()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                _, nll, _ = deep_gmm_loss(xb, log_resp.detach(), mb, method, settings.covariance_type, None, 0.0,
                                          settings.reg_covar)
            history.append(nll.item())
            if report is not None:
                report(n_iter, total, history[-1])

    converged = False
    for step in range(1, settings.max_iter + 1):
        n_iter = warm_iter + step
        optimiser.zero_grad(set_to_none=True)
        log_resp = forward()
        loss, nll, _ = deep_gmm_loss(
            xb, log_resp, mb, method, settings.covariance_type, prior_means, settings.prior_weight, settings.reg_covar
        )
        if smoothness > 0:
            loss = loss + smoothness * smoothness_penalty(log_resp, mb, spacing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
        optimiser.step()
        history.append(nll.item())
        if report is not None:
            report(n_iter, total, history[-1])
        if step >= max(2, settings.min_iter) and abs(history[-2] - history[-1]) < settings.tol:
            converged = True
            break
    with torch.no_grad():
        log_resp = forward()
        _, nll, fitted = deep_gmm_loss(
            xb, log_resp, mb, method, settings.covariance_type, None, 0.0, settings.reg_covar
        )
    history.append(nll.item())
    weights, params = fitted[0]
    fit = MixtureFit(log_resp[0][:, mc].T.contiguous(), params, weights, history, n_iter, converged)
    return fit, network
