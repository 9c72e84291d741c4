"""Segmenting with a trained model: load and check a model file, predict, and fit the mixture once.

:func:`fit_with_model` is the one call the engine makes for ``segment(..., model=PATH)``: it reads
the model file once (cached while the file is unchanged), runs one forward pass or ``fine_tune``
per-image steps (:func:`.deep.fit_deep` from the trained weights), and fits the model's own mixture
(its method, covariance type and variance floor) in closed form to the predicted
responsibilities. :func:`predict_with_model` returns the responsibilities alone.

A network sees its training images' voxel size: the single forward pass on an image finer than
that (a model trained at 2 mm, an image at 1 mm) runs on the image averaged over blocks of the
training voxel size (:func:`model_grid_factors`), and its probabilities are interpolated back to
the voxels (:func:`.deep.lift_probabilities`), as the per-image fit of a large crop does
(docs/speed.md, "Trained-model inference on the model's grid").
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from . import model_file
from ..core.deep import DeepSettings, fit_deep, lift_probabilities, pool_in_mask, voxel_nll
from ..core.em import MixtureFit
from ..core.inputs import crop_box
from ..core.networks import UNet, resolve_precision
from ..options import FINE_TUNE_LEARNING_RATE, REG_COVAR
from ..result import SegmentationCancelled

__all__ = [
    "FINE_TUNE_LEARNING_RATE", "build_network", "check_model_request", "fit_with_model", "forward_log_resp",
    "forward_logits",
    "load_trained_model", "mixture_from_log_resp", "model_grid_factors", "predict_with_model",
]

Reporter = Callable[[int, int, float], Any]


@functools.lru_cache(maxsize=4)
def _cached_model(path: str, mtime_ns: int, size: int) -> tuple[dict, dict]:
    return model_file.load_model(path)


def load_trained_model(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state_dict, metadata) of a model file; cached while the file is unchanged (batch use)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"Model file {str(p)!r} does not exist: pass the path of a file written by deepgmm-train.")
    stat = p.stat()
    return _cached_model(str(p.resolve()), stat.st_mtime_ns, stat.st_size)


def check_model_request(model_path: str | os.PathLike, n_classes: int, n_channels: int, spatial_dims: int) -> dict:
    """Metadata of ``model_path`` after checking it against a ``segment`` call; ``ValueError`` if it does not fit."""
    _, meta = load_trained_model(model_path)
    model_file.check_compatible(meta, n_channels=n_channels, spatial_dims=spatial_dims, n_classes=n_classes)
    return meta


def build_network(metadata: dict, state_dict: dict | None = None) -> UNet:
    """The U-Net described by ``metadata["network"]``, with ``state_dict`` loaded if given."""
    config = dict(metadata["network"])
    config.pop("class", None)
    network = UNet(**config)
    if state_dict is not None:
        try:
            network.load_state_dict(state_dict)
        except RuntimeError as error:
            raise ValueError(f"The model file's weights do not fit its network description: {error}") from None
    return network


def forward_logits(network: torch.nn.Module, x: torch.Tensor, network_dims: int) -> torch.Tensor:
    """Class logits (K, *spatial) of a (C, *spatial) image; 2D networks see 3D volumes slice by slice."""
    if network_dims == 2 and x.ndim == 4:
        return network(x.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)  # slices as a batch
    return network(x.unsqueeze(0))[0]


def forward_log_resp(network: torch.nn.Module, x: torch.Tensor, network_dims: int) -> torch.Tensor:
    """Log class probabilities (K, *spatial) of a (C, *spatial) image; 2D networks see 3D volumes slice by slice."""
    return F.log_softmax(forward_logits(network, x, network_dims), dim=0)


def _check_fine_tune(fine_tune: Any) -> int:
    if isinstance(fine_tune, bool) or not isinstance(fine_tune, (int, np.integer)) or fine_tune < 0:
        raise ValueError(f"fine_tune must be an integer >= 0 (number of per-image steps), got {fine_tune!r}.")
    return int(fine_tune)


def _reporter(progress: Reporter | None, cancel: Any) -> Reporter:
    """``report(i, n, nll)`` raising :class:`SegmentationCancelled` when ``progress`` says False or ``cancel`` is set."""

    def report(iteration: int, max_iterations: int, nll: float) -> None:
        # progress first: the engine's own callback raises its cancellation for its cancel event.
        if progress is not None and progress(iteration, max_iterations, nll) is False:
            raise SegmentationCancelled("Segmentation cancelled by the progress callback.")
        if cancel is not None and (cancel() if callable(cancel) else cancel.is_set()):
            raise SegmentationCancelled("Segmentation cancelled.")

    return report


def _mask_voxels(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(V, C) view of the mask's voxels of a (C, *spatial) image (flat indexing: no (V, ndim) coordinates)."""
    return x.reshape(x.shape[0], -1)[:, mask.reshape(-1)].T


def model_grid_factors(meta: dict, spacing, spatial_dims: int) -> tuple[int, ...]:
    """Block size per axis that brings an image of voxel size ``spacing`` to the model's training voxel size.

    1 on every axis when either size is unknown (``spacing`` None, a model file without ``spacing``)
    or the image is not finer; otherwise the nearest whole ratio. A 2D network on a 3D volume keeps
    every slice (it sees them one at a time).
    """
    trained = meta.get("spacing")
    if spacing is None or trained is None or len(trained) != spatial_dims or len(spacing) != spatial_dims:
        return (1,) * spatial_dims
    factors = [max(1, math.floor(float(t) / float(s) + 0.5)) for t, s in zip(trained, spacing)]
    if int(meta["network"]["spatial_dims"]) == 2 and spatial_dims == 3:
        factors[0] = 1
    return tuple(factors)


def _forward_once(x, mask, network, meta, factors: tuple[int, ...]) -> torch.Tensor:
    """Log responsibilities (V, K) of the mask's voxels after one forward pass on the mask's bounding box
    (averaged over blocks of ``factors`` when any is above 1, the probabilities then lifted to the voxels)."""
    box = crop_box(mask)
    xc, mc = x[(slice(None),) + box], mask[box]
    pooled = any(f > 1 for f in factors)
    grid_x, grid_mask = pool_in_mask(xc, mc, factors) if pooled else (xc * mc, mc)  # zero outside the mask
    network.eval()
    with torch.inference_mode():
        logits = forward_logits(network, grid_x, int(meta["network"]["spatial_dims"]))
        # (voxels, K) is a view of the network's channels-last output; only the mask's voxels are
        # gathered and normalised
        per_voxel = logits.movedim(0, -1).reshape(-1, logits.shape[0])
        log_resp = F.log_softmax(per_voxel.index_select(0, grid_mask.reshape(-1).nonzero().squeeze(1)), dim=1)
        return lift_probabilities(log_resp, grid_mask, mc, factors) if pooled else log_resp


def _fine_tune_settings(meta: dict, fine_tune: int) -> DeepSettings:
    """Per-image steps from the trained weights with the model's own mixture, prior and smoothness."""
    return DeepSettings(
        network="2d" if int(meta["network"]["spatial_dims"]) == 2 else "3d", learning_rate=FINE_TUNE_LEARNING_RATE,
        max_iter=fine_tune, min_iter=fine_tune, tol=0.0, warm_start="none",
        covariance_type=meta.get("covariance_type", "full"), reg_covar=meta.get("reg_covar", REG_COVAR),
        prior_weight=float(meta.get("prior_weight") or 0.0), smoothness=float(meta.get("smoothness") or 0.0),
        edge_contrast=0.0,  # the prior the model was trained with (training weighs every pair alike)
        base_width=int(meta["network"]["base_width"]), depth=int(meta["network"]["depth"]),
    )


def _predict(x, mask, state, meta, fine_tune: int, device, seed: int, report: Reporter, spacing=None):
    """(log_resp (V, K) of the mask's voxels, NLL after each fine-tuning step) of a loaded model.

    A single forward pass (``fine_tune`` = 0) reports nothing and returns no history: its one NLL
    is the mixture's, which the caller fits next (:func:`mixture_from_log_resp`). It runs on the
    model's grid (:func:`model_grid_factors` of ``spacing``); fine-tuning runs on the image's own.
    """
    network = build_network(meta, state).to(device)
    network.autocast_dtype = resolve_precision("auto", device)
    if fine_tune == 0:
        return _forward_once(x, mask, network, meta, model_grid_factors(meta, spacing, x.ndim - 1)), []
    prior = meta.get("prior_means")
    torch.manual_seed(int(seed))
    network.train()
    fit, _ = fit_deep(
        x, mask, int(meta["n_classes"]), meta["method"], _fine_tune_settings(meta, fine_tune),
        prior_means=None if prior is None else torch.as_tensor(prior, dtype=x.dtype, device=x.device),
        report=report, network=network,
    )
    return fit.log_resp, list(fit.nll_history)


def predict_with_model(
    x: torch.Tensor,
    mask: torch.Tensor,
    model_path: str | os.PathLike,
    fine_tune: int,
    device: torch.device,
    seed: int,
    progress: Reporter | None = None,
    cancel: Any = None,
    spacing=None,
) -> tuple[torch.Tensor, list[float]]:
    """Log responsibilities (K, *spatial) of a trained model for one normalised image.

    x: (C, *spatial) float32 normalised as in training (``inputs.normalize_channels``) on
    ``device``; mask: bool (*spatial). ``fine_tune`` = 0: one forward pass (on the model's grid when
    ``spacing``, the voxel size, is finer than the model's); N > 0: N per-image steps from the
    trained weights (the model's own method, covariance type and prior). Returns
    (log_resp, nll_history) where the history holds the NLL after every step (one value for a
    single forward pass). Voxels outside the mask get uniform probabilities (the engine ignores them).
    """
    fine_tune = _check_fine_tune(fine_tune)
    state, meta = load_trained_model(model_path)
    model_file.check_compatible(meta, n_channels=int(x.shape[0]), spatial_dims=x.ndim - 1)
    report = _reporter(progress, cancel)
    voxel_log_resp, history = _predict(x, mask, state, meta, fine_tune, device, seed, report, spacing)
    if fine_tune == 0:
        history = mixture_from_log_resp(_mask_voxels(x, mask), voxel_log_resp, meta, [], 1).nll_history
        report(1, 1, history[0])
    n_classes = int(meta["n_classes"])
    full = torch.full((n_classes,) + tuple(mask.shape), -math.log(n_classes), dtype=x.dtype, device=x.device)
    full[:, mask] = voxel_log_resp.T.to(full.dtype)
    return full, history


def mixture_from_log_resp(xv: torch.Tensor, log_resp: torch.Tensor, meta: dict, history: list[float],
                          n_iter: int) -> MixtureFit:
    """Closed-form M-step and NLL of the model's mixture for responsibilities (V, K) of voxels (V, C)."""
    with torch.no_grad():
        nll, _, weights, params = voxel_nll(xv, log_resp, meta["method"], meta.get("covariance_type") or "full",
                                            meta.get("reg_covar", REG_COVAR))
    return MixtureFit(log_resp, params, weights, list(history) + [nll.item()], n_iter, True)


def fit_with_model(x: torch.Tensor, mask: torch.Tensor, model: str | os.PathLike, fine_tune: int,
                   device: torch.device, seed: int, report: Reporter | None = None, spacing=None) -> MixtureFit:
    """The whole trained-model branch of ``segment``: predict, then fit the model's mixture once.

    x: (C, *spatial) normalised channels on ``device``; mask: bool (*spatial). ``report(i, n, nll)``
    is called after every step and cancels by raising (or by returning False); ``spacing``: the voxel
    size (see :func:`predict_with_model`). The model's method,
    covariance type and variance floor apply, whatever the request's defaults; ``n_iter`` counts a
    single forward pass as one iteration. Returns the fit over the mask voxels (normalised units).
    """
    fine_tune = _check_fine_tune(fine_tune)
    state, meta = load_trained_model(model)
    model_file.check_compatible(meta, n_channels=int(x.shape[0]), spatial_dims=x.ndim - 1)
    reporter = _reporter(report, None)
    voxel_log_resp, history = _predict(x, mask, state, meta, fine_tune, device, seed, reporter, spacing)
    fit = mixture_from_log_resp(_mask_voxels(x, mask), voxel_log_resp, meta, history, max(fine_tune, 1))
    if fine_tune == 0:
        reporter(1, 1, fit.nll_history[-1])
    return fit
