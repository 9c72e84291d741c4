"""Trained models: train one network on many images, segment new images in one forward pass.

:func:`train` fits one U-Net to a cohort of multi-channel images with the deep GMM loss of
:mod:`..deep` (per-image closed-form M-step, mixture NLL averaged over the images of a batch,
optional prior class means that fix class identity), keeps a held-out split for early stopping
and model selection, and writes the best network with its metadata to one model file
(:mod:`.model_file`). :func:`predict_with_model` is what ``segment(..., model=PATH)`` calls: one
forward pass, or ``fine_tune`` steps of the per-image fit (:func:`..deep.fit_deep`) started from
the trained weights.

Scale-out: the same :func:`train` call runs on one CPU, one GPU or under ``torchrun`` (one process
per CPU group / GPU, ``DistributedDataParallel``). Every process sees the same global batches; each
takes its share of the images of a batch, and the per-image losses are weighted so that the
gradient DDP averages equals the single-process gradient of the same batch. Augmentation is
seeded per (seed, epoch, image), not per process, so 1 and N processes train the same model up to
floating-point summation order. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core import em
from ..core.deep import choose_network, deep_gmm_loss, smoothness_penalty
from ..core.inputs import check_prior_means, crop_box, normalize_channels, resolve_device, validate_inputs
from ..core.networks import UNet, resolve_precision
from ..options import (COVARIANCE_TYPES, DEEP_METHODS, DEFAULT_SMOOTHNESS, EMSettings, TrainingSettings,
                       check_class_names, check_value)
from ..result import SegmentationCancelled
from . import model_file
from .distributed import Distributed, training_device
from .inference import (FINE_TUNE_LEARNING_RATE, build_network, check_model_request, forward_log_resp,  # noqa: F401
                        load_trained_model, predict_with_model)

_EM = EMSettings()
NORMALIZATION = {"kind": "zscore-in-mask", "description": "per image and channel: (x - mean) / std over the mask voxels; 0 outside the mask"}


class TrainingCancelled(SegmentationCancelled):
    """Raised when training is cancelled (progress returned False or the cancel event was set)."""


@dataclass
class TrainingProgress:
    """What the ``progress`` callback of :func:`train` receives after every step and every epoch."""

    epoch: int
    max_epochs: int
    step: int  # step within the epoch (1-based)
    n_steps: int  # steps per epoch
    train_loss: float  # mean loss of the steps so far in this epoch (NLL + prior penalty)
    val_loss: float | None = None  # held-out loss; set only at the end of an epoch
    best_epoch: int = 0
    elapsed_seconds: float = 0.0
    end_of_epoch: bool = False


@dataclass
class TrainingResult:
    """What :func:`train` returns: the best network (CPU, eval mode), its metadata and the curves."""

    network: torch.nn.Module
    metadata: dict
    history: list[dict] = field(default_factory=list)  # one dict per epoch
    path: Path | None = None  # model file written (rank 0 with ``output``), else None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model file (weights + metadata) to ``path``."""
        self.path = model_file.save_model(path, self.network.state_dict(), self.metadata)
        return self.path


# ----------------------------------------------------------------------------- input handling


@dataclass
class _Case:
    x: torch.Tensor  # (C, *crop) normalised channels, 0 outside the mask
    mask: torch.Tensor  # (*crop) bool
    target: torch.Tensor | None = None  # (K, *crop) EM responsibilities for the warm-start epochs


def _case_channels(image: Any, spatial_dims: int | None, index: int) -> list[np.ndarray]:
    """One case as a list of channel arrays; see :func:`train` for the accepted forms."""
    if isinstance(image, (list, tuple)):
        return [np.asarray(c) for c in image]
    array = np.asarray(image)
    if array.ndim == 2:
        return [array]
    if array.ndim == 4:
        return list(array)
    if array.ndim == 3:
        if spatial_dims == 2:
            return list(array)
        if spatial_dims == 3:
            return [array]
        raise ValueError(
            f"Case {index + 1} is a 3D array {array.shape}, which is ambiguous: pass spatial_dims=2 if it is "
            "(channels, y, x), spatial_dims=3 if it is a single-channel (z, y, x) volume, or give each case "
            "as a list of channel arrays."
        )
    raise ValueError(
        f"Case {index + 1} has shape {array.shape}: give (channels, *spatial) arrays or lists of 2D/3D "
        "channel arrays."
    )


def _prepare_cases(images, masks, n_classes, method, spatial_dims) -> tuple[list[_Case], int, int]:
    if isinstance(images, (str, os.PathLike)):
        raise ValueError(
            "images must be a list of arrays; to train on a folder or CSV of cases use the command line "
            "(deepgmm-train) or DeepGMMSegmentLib.cohort (discover_cases, then load_case for each case)."
        )
    images = list(images)
    if not images:
        raise ValueError("No training images given: pass a list of (channels, *spatial) arrays.")
    if masks is not None:
        masks = list(masks)
        if len(masks) != len(images):
            raise ValueError(f"{len(masks)} masks for {len(images)} images: give one mask (or None) per image.")
    cases, n_channels, dims = [], None, None
    for i, image in enumerate(images):
        channels = _case_channels(image, spatial_dims, i)
        mask = None if masks is None else masks[i]
        try:
            data, m = validate_inputs(channels, n_classes, method, mask)
        except ValueError as error:
            raise ValueError(f"Training case {i + 1}: {error}") from None
        if n_channels is None:
            n_channels, dims = data.shape[0], data.ndim - 1
        elif data.shape[0] != n_channels or data.ndim - 1 != dims:
            raise ValueError(
                f"Training case {i + 1} has {data.shape[0]} channel(s) of {data.ndim - 1}D but case 1 has "
                f"{n_channels} of {dims}D: every case needs the same channels in the same order."
            )
        norm, _, _ = normalize_channels(data, m)
        x, mt = torch.from_numpy(norm), torch.from_numpy(m)
        box = crop_box(mt)
        cases.append(_Case(x[(slice(None),) + box].contiguous(), mt[box].contiguous()))
    return cases, int(n_channels), int(dims)


def _check_prior(prior_means, n_classes, n_channels, cases, covariance_type, seed) -> np.ndarray | None:
    if prior_means is None:
        return None
    if isinstance(prior_means, str):
        if prior_means != "auto":
            raise ValueError(f"prior_means must be None, 'auto' or a ({n_classes}, {n_channels}) array, got {prior_means!r}.")
        return pooled_class_means(cases, n_classes, covariance_type, seed)
    return check_prior_means(prior_means, n_classes, n_channels,
                             units="normalised units: z-scores inside the mask")


def _attach_em_targets(cases: Sequence[_Case], n_classes: int, means: np.ndarray, covariance_type: str,
                       seed: int) -> None:
    """Per-case EM posteriors, started from the pooled class means so class k means the same everywhere."""
    init = torch.as_tensor(means, dtype=torch.float64)
    for case in cases:
        xv = case.x[:, case.mask].T.double()
        fit = em.fit_gmm(xv, n_classes, covariance_type=covariance_type, max_iter=_EM.warm_start_max_iter,
                         tol=_EM.warm_start_tol, generator=torch.Generator().manual_seed(seed), means_init=init)
        target = torch.zeros((n_classes,) + tuple(case.mask.shape))
        target[:, case.mask] = fit.log_resp.exp().T.float()
        case.target = target


def pooled_class_means(cases: Sequence[_Case], n_classes: int, covariance_type: str = "full", seed: int = 0,
                       max_voxels: int = 200_000) -> np.ndarray:
    """Class means (K, C) of one GMM fitted by EM to the pooled normalised voxels of ``cases``.

    Rows are sorted by the first channel's mean (class 1 = darkest), so a network trained with
    these as prior means numbers its classes like the per-image methods do.
    """
    voxels = torch.cat([c.x[:, c.mask].T for c in cases])
    if voxels.shape[0] > max_voxels:
        pick = torch.randperm(voxels.shape[0], generator=torch.Generator().manual_seed(seed))[:max_voxels]
        voxels = voxels[pick]
    fit = em.fit_gmm(voxels.double(), n_classes, covariance_type=covariance_type, max_iter=_EM.pooled_max_iter,
                     tol=_EM.pooled_tol, generator=torch.Generator().manual_seed(seed))
    means = fit.params.means.detach().cpu().numpy()
    return means[np.argsort(means[:, 0], kind="stable")]


# ----------------------------------------------------------------------------- network helpers


# ----------------------------------------------------------------------------- augmentation


def _augment(case: _Case, rng: np.random.Generator, patch_size: Sequence[int] | None, enabled: bool = True,
             noise_probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random in-plane flips, an optional random patch, small per-channel gain/offset and noise.

    Returns (x, mask, target); target is the case's warm-start target transformed alike (or empty).

    Only transforms that keep a plausible image and need no interpolation: the loss is the
    image's own likelihood, so there are no labels to keep aligned, but large geometric or
    contrast changes would teach the network images it never sees.
    """
    x, mask = case.x, case.mask
    c = x.shape[0]
    if case.target is not None:  # transform the warm-start target with the image
        x = torch.cat([x, case.target])
    if patch_size is not None:
        x, mask = _random_patch(x, mask, patch_size, rng)
    spatial = x.ndim - 1
    if not enabled:
        return x[:c], mask, x[c:]
    for axis in range(max(0, spatial - 2), spatial):  # the two in-plane axes
        if rng.random() < 0.5:
            x, mask = x.flip(axis + 1), mask.flip(axis)
    x, target = x[:c], x[c:]
    shape = (c,) + (1,) * spatial
    gain = torch.from_numpy(rng.uniform(0.9, 1.1, c).astype(np.float32)).reshape(shape)
    offset = torch.from_numpy(rng.normal(0.0, 0.05, c).astype(np.float32)).reshape(shape)
    x = x * gain + offset
    if rng.random() < noise_probability:
        sigma = float(rng.uniform(0.0, 0.1))
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x = x + sigma * torch.randn(x.shape, generator=generator)
    return x * mask, mask, target


def _random_patch(x, mask, patch_size, rng):
    size = [min(int(p), s) for p, s in zip(patch_size, mask.shape)]
    inside = mask.nonzero()
    centre = inside[int(rng.integers(len(inside)))]
    starts = [int(min(max(int(c) - p // 2, 0), s - p)) for c, p, s in zip(centre, size, mask.shape)]
    box = tuple(slice(a, a + p) for a, p in zip(starts, size))
    return x[(slice(None),) + box], mask[box]


# ----------------------------------------------------------------------------- training


def train(
    images: Sequence[Any],
    n_classes: int,
    method: str | None = None,
    masks: Sequence[Any] | None = None,
    *,
    settings: TrainingSettings | None = None,
    channel_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    spatial_dims: int | None = None,
    spacing: Sequence[float] | None = None,
    output: str | os.PathLike | None = None,
    progress: Callable[[TrainingProgress], Any] | None = None,
    cancel_event: Any = None,
    log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> TrainingResult:
    """Train one deep GMM network on many images; returns (and optionally writes) the best model.

    Parameters
    ----------
    images : sequence
        The cases. Each is a list of co-registered channel arrays (2D (y, x) or 3D (z, y, x)), or
        one array (C, y, x) / (C, z, y, x) with the channel axis first (a 3D array needs
        ``spatial_dims`` to say which). Every case has the same channels in the same order; sizes
        may differ. Inputs are never modified.
    n_classes : int
        K >= 2.
    method : {"deepsvg", "deepg"}, optional
        Overrides ``settings.method`` (default deepsvg).
    masks : sequence of bool arrays (or None entries), optional
        Region modelled in each case (default: the whole image).
    settings : TrainingSettings, optional
        Every tunable setting with its default (:class:`.options.TrainingSettings`); any of its
        fields can also be given as a keyword (``max_epochs=20``), which overrides it.
    output : path, optional
        Model file; written when the held-out loss improves (so an interrupted run still leaves
        the best model so far) and at the end (always, even if early stopping never fires).
    channel_names, spatial_dims, spacing
        Names stored in the model (default channel1..N); how to read 3D arrays; voxel size (z, y, x).
    class_names : sequence of str, optional
        One name per class, in class order (e.g. blood, myocardium, edema, scar), stored in the
        model; ``segment(..., model=...)`` returns them as ``result.class_names`` for the output
        segments. Meaningful with ``prior_means`` (class k = prior row k); without them classes
        are ordered per image by the first channel's mean.
    progress : callable, optional
        Receives a :class:`TrainingProgress` after every step; returning False cancels
        (:class:`TrainingCancelled`), as does ``cancel_event.is_set()``.
    log : callable, optional
        Receives one line of text per epoch (rank 0 only).

    The settings (see :class:`.options.TrainingSettings` and docs/training.md):

    * ``prior_means`` ((K, C) in **normalised units**, "auto" or None) and ``prior_weight``: with
      prior means, output k of the network is class k (row k); the penalty is
      ``prior_weight * mean_b ||mu_b - prior||^2``; "auto" takes them from one EM fit of the pooled
      training voxels (sorted by channel 1).
    * ``val_fraction``: share of the cases held out (at least one when there are two or more) for
      early stopping and model selection; with one case the training loss is used.
    * ``max_epochs``, ``min_epochs``, ``patience``, ``min_delta``: stop after ``patience`` epochs
      (and at least ``min_epochs``) without the held-out loss improving by more than
      ``min_delta``, or at ``max_epochs``.
    * ``batch_size``, ``learning_rate``, ``weight_decay``, ``grad_clip``: global batch (over all
      processes), AdamW with polynomial (0.9) decay, gradient-norm clip.
    * ``smoothness``: weight of the spatial prior, as the per-image option (None: 0.3 for
      deepsvg, 0 for deepg); stored in the model and used again when fine-tuning.
    * ``precision``: the network's convolutions ("auto": bfloat16 where the hardware computes it natively).
    * ``augment``, ``patch_size``: random in-plane flips, small per-channel gain/offset and noise;
      random patches (e.g. a slab of slices) to save memory and time on large volumes.
    * ``warm_start``, ``warm_start_steps``: "em" first teaches the network each case's EM
      posterior for ``warm_start_steps`` optimiser steps (rounded up to whole epochs), which makes
      the NLL epochs converge much faster; "none" skips this. Warm-start epochs do not count for
      early stopping or model selection.
    * ``network``, ``base_width``, ``depth``: U-Net choice as for the per-image fit.
    * ``device`` ("auto" | "cpu" | "cuda" | "cuda:N"; under torchrun the GPU of LOCAL_RANK), ``seed``.
    """
    start = time.perf_counter()
    if method is not None:
        overrides["method"] = method
    config = _checked_settings((settings or TrainingSettings()).replace(**overrides))
    cases, n_channels, dims = _prepare_cases(images, masks, n_classes, config.method, spatial_dims)
    names = _channel_names(channel_names, n_channels)
    classes = check_class_names(class_names, int(n_classes))
    if config.patch_size is not None and len(config.patch_size) != dims:
        raise ValueError(f"patch_size needs {dims} values for {dims}D images, got {tuple(config.patch_size)}.")
    prior = _check_prior(config.prior_means, int(n_classes), n_channels, cases, config.covariance_type, config.seed)
    if config.warm_start_steps:
        start_means = prior if prior is not None else pooled_class_means(cases, int(n_classes),
                                                                        config.covariance_type, config.seed)
        _attach_em_targets(cases, int(n_classes), start_means, config.covariance_type, config.seed)
    dev = training_device(config.device)
    dist = Distributed(dev)
    try:
        run = _TrainingRun(cases, config, prior, dist, dev, output, progress, cancel_event, log, start)
        return run.fit(_ModelConfig(int(n_classes), n_channels, dims, names, spacing, classes))
    finally:
        dist.close()


def _checked_settings(settings: TrainingSettings) -> TrainingSettings:
    """The settings with the method's smoothness filled in; ``ValueError`` for a bad value."""
    method = settings.method.lower() if isinstance(settings.method, str) else settings.method
    if method not in DEEP_METHODS:
        raise ValueError(f"Only the deep methods can be trained ({', '.join(DEEP_METHODS)}), not {method!r}.")
    if settings.covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"Unknown covariance_type {settings.covariance_type!r}: use 'full' or 'diag'.")
    for name in ("max_epochs", "min_epochs", "patience", "batch_size", "base_width", "depth", "val_fraction",
                 "learning_rate", "prior_weight", "smoothness", "precision", "warm_start", "warm_start_steps",
                 "network", "min_delta", "weight_decay", "grad_clip"):
        check_value(name, getattr(settings, name))
    smoothness = DEFAULT_SMOOTHNESS[method] if settings.smoothness is None else settings.smoothness
    if settings.warm_start == "em-head":
        raise ValueError("warm_start='em-head' is for per-image fits (one network per image); training teaches "
                         "one network every case's EM posterior: use warm_start='em' or 'none'.")
    steps = 0 if settings.warm_start == "none" else settings.warm_start_steps
    return settings.replace(method=method, smoothness=smoothness, warm_start_steps=steps)


def _channel_names(channel_names: Sequence[str] | None, n_channels: int) -> list[str]:
    if channel_names is None:
        return [f"channel{i + 1}" for i in range(n_channels)]
    names = [str(n) for n in channel_names]
    if len(names) != n_channels:
        raise ValueError(f"{len(names)} channel names for {n_channels} channels: give one name per channel.")
    return names


@dataclass
class _ModelConfig:
    """What the model file says about the data the network was trained for."""

    n_classes: int
    n_channels: int
    spatial_dims: int
    channel_names: list[str]
    spacing: Sequence[float] | None
    class_names: list[str] | None = None


@dataclass
class _Best:
    """The best epoch so far (by held-out loss, or training loss without a held-out split)."""

    loss: float = math.inf
    epoch: int = 0
    state: dict | None = None


class _TrainingRun:
    """One call of :func:`train`: split, build, then epochs (run, evaluate, keep best, stop)."""

    def __init__(self, cases, settings: TrainingSettings, prior, dist: Distributed, dev: torch.device, output,
                 progress, cancel_event, log, start: float):
        self.cases, self.settings, self.prior, self.dist, self.dev = cases, settings, prior, dist, dev
        self.output, self.progress, self.cancel_event, self.start = output, progress, cancel_event, start
        self.say = (lambda text: None) if (log is None or dist.rank != 0) else log
        self.history: list[dict] = []
        self.best = _Best()
        self.lam = float(settings.prior_weight) if prior is not None else 0.0
        self.prior_t = None if prior is None else torch.as_tensor(prior, dtype=torch.float32, device=dev)

    # -- the steps, in the order fit() runs them

    def fit(self, data: _ModelConfig) -> TrainingResult:
        self.data = data
        self.val_idx, self.train_idx = self._split()
        self._build_model()
        s = self.settings
        self.steps_per_epoch = math.ceil(len(self.train_idx) / s.batch_size)
        self.warm_start_epochs = math.ceil(s.warm_start_steps / self.steps_per_epoch)
        epoch, stop_reason = 0, "max_epochs"
        try:
            for run_epoch in range(1, self.warm_start_epochs + s.max_epochs + 1):
                # Epochs are numbered from the first NLL epoch (warm-start epochs are -w+1 .. 0).
                epoch = run_epoch - self.warm_start_epochs
                if self._run_warm_start_or_epoch(run_epoch, epoch) and self._should_stop(epoch):
                    stop_reason = "early_stopping"
                    break
        except (TrainingCancelled, FloatingPointError, KeyboardInterrupt):
            if self.best.state is not None:  # keep what was learnt: the file holds the best model so far
                self._save(f"interrupted at epoch {epoch}")
            raise
        return self._finish(epoch, stop_reason)

    def _split(self) -> tuple[list[int], list[int]]:
        """Held-out and training cases: the same on every process (seeded); held-out cases never train."""
        n_cases, fraction = len(self.cases), self.settings.val_fraction
        order = np.random.default_rng([self.settings.seed, 0]).permutation(n_cases)
        n_val = min(max(1, int(round(fraction * n_cases))), n_cases - 1) if n_cases >= 2 and fraction > 0 else 0
        return sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())

    def _build_model(self) -> None:
        s, dims = self.settings, self.data.spatial_dims
        smallest = tuple(min(c.mask.shape[d] for c in self.cases) for d in range(dims))
        spacing = None if self.data.spacing is None else tuple(self.data.spacing)
        self.net_dims, in_plane_only = choose_network(smallest, spacing, s.network, s.method)
        torch.manual_seed(s.seed)
        self.net = UNet(self.net_dims, self.data.n_channels, self.data.n_classes, s.base_width, s.depth,
                        in_plane_only).to(self.dev)
        self.net.autocast_dtype = resolve_precision(s.precision, self.dev)
        self.model = self.net
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.net, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)
        self.optimiser = torch.optim.AdamW(self.net.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay)

    def _run_warm_start_or_epoch(self, run_epoch: int, epoch: int) -> bool:
        """One epoch; True when it was an NLL epoch (warm-start epochs neither evaluate nor stop)."""
        warming = run_epoch <= self.warm_start_epochs
        s = self.settings
        lr = s.learning_rate if warming else s.learning_rate * (1 - (epoch - 1) / s.max_epochs) ** 0.9
        for group in self.optimiser.param_groups:
            group["lr"] = lr
        train_loss, train_nll = self._run_epoch(run_epoch, epoch, warming)
        if warming:
            self.say(f"warm-start epoch {run_epoch}/{self.warm_start_epochs}: cross-entropy to EM {train_loss:.4f}")
            self._check_cancelled(False, f"Training cancelled in warm-start epoch {run_epoch}.")
            return False
        val_loss, val_nll = self._evaluate()
        self._keep_best(epoch, val_loss if val_loss is not None else train_loss)
        self._record(epoch, train_loss, train_nll, val_loss, val_nll)
        self._report(TrainingProgress(epoch, s.max_epochs, self.steps_per_epoch, self.steps_per_epoch, train_loss,
                                      val_loss, self.best.epoch, time.perf_counter() - self.start, True),
                     f"Training cancelled after epoch {epoch}.")
        return True

    def _run_epoch(self, run_epoch: int, epoch: int, warming: bool) -> tuple[float, float]:
        """Optimiser steps over a seeded permutation of the training cases; (mean loss, mean NLL)."""
        self.net.train()
        permutation = np.random.default_rng([self.settings.seed, run_epoch]).permutation(self.train_idx).tolist()
        totals = [0.0, 0.0, 0]  # loss, NLL, images of this process
        size = self.settings.batch_size
        for step in range(self.steps_per_epoch):
            self._step(permutation[step * size:(step + 1) * size], run_epoch, epoch, warming, totals)
            self._report(TrainingProgress(epoch, self.settings.max_epochs, step + 1, self.steps_per_epoch,
                                          totals[0] / max(totals[2], 1), None, self.best.epoch,
                                          time.perf_counter() - self.start),
                         f"Training cancelled at epoch {epoch}.")
        loss, nll = (v / len(self.train_idx) for v in self.dist.sum(totals[:2], self.dev))
        return loss, nll

    def _step(self, batch: list[int], run_epoch: int, epoch: int, warming: bool, totals: list) -> None:
        """One optimiser step on a global batch; this process takes its share of the images."""
        rank, world = self.dist.rank, self.dist.world
        mine = batch[rank::world]
        # Each image weighs world/len(batch): DDP divides the summed gradients by world, so
        # the step is the single-process mean over the batch whatever the split.
        weight = world / len(batch)
        self.optimiser.zero_grad(set_to_none=True)
        work = mine if mine else batch[:1]  # a process with no image still joins the all-reduce
        for j, index in enumerate(work):
            rng = np.random.default_rng([self.settings.seed, run_epoch, index, 1])
            x, m, target = _augment(self.cases[index], rng, self.settings.patch_size, self.settings.augment)
            sync = self.dist.enabled and j < len(work) - 1
            with self.model.no_sync() if sync else contextlib.nullcontext():
                loss, nll = self._loss(x, m, self.model, target if warming else None)
                (loss * (weight if mine else 0.0)).backward()
            if mine:
                _check_finite(loss, epoch)
                totals[0] += loss.item()
                totals[1] += nll.item()
                totals[2] += 1
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.settings.grad_clip)
        self.optimiser.step()

    def _evaluate(self) -> tuple[float | None, float | None]:
        """Mean held-out (loss, NLL) over all processes, or (None, None) without held-out cases."""
        if not self.val_idx:
            return None, None
        self.net.eval()
        v_loss = v_nll = 0.0
        with torch.no_grad():
            for index in self.val_idx[self.dist.rank::self.dist.world]:
                loss, nll = self._loss(self.cases[index].x, self.cases[index].mask, self.net)
                v_loss, v_nll = v_loss + loss.item(), v_nll + nll.item()
        val_loss, val_nll = (v / len(self.val_idx) for v in self.dist.sum([v_loss, v_nll], self.dev))
        return val_loss, val_nll

    def _keep_best(self, epoch: int, criterion: float) -> None:
        """Remember this epoch's weights if its loss improved by more than ``min_delta`` (and save them)."""
        improved = math.isfinite(criterion) and criterion < self.best.loss - self.settings.min_delta
        if improved or self.best.state is None and math.isfinite(criterion):
            self.best = _Best(criterion, epoch, copy.deepcopy(self.net.state_dict()))

    def _should_stop(self, epoch: int) -> bool:
        """Early stopping: ``patience`` epochs without improvement, after at least ``min_epochs``."""
        s = self.settings
        return epoch >= max(s.min_epochs, 1) and epoch - self.best.epoch >= s.patience

    def _finish(self, epoch: int, stop_reason: str) -> TrainingResult:
        if self.best.state is None:  # every loss was non-finite; keep the last weights so something is saved
            self.best = _Best(self.best.loss, epoch, copy.deepcopy(self.net.state_dict()))
        self.net.load_state_dict(self.best.state)
        net = self.net.cpu().eval()
        meta = self._metadata(stop_reason)
        path = None
        if self.output is not None and self.dist.rank == 0:
            path = model_file.save_model(self.output, net.state_dict(), meta)
            self.say(f"saved the model of epoch {self.best.epoch} to {path} ({stop_reason.replace('_', ' ')})")
        return TrainingResult(net, meta, self.history, path)

    # -- helpers of the steps

    def _loss(self, x: torch.Tensor, m: torch.Tensor, module: torch.nn.Module,
              target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, NLL) of one image: deep GMM loss + spatial prior, or cross-entropy to the EM target."""
        s = self.settings
        x, m = x.to(self.dev), m.to(self.dev)
        log_resp = forward_log_resp(module, x, self.net_dims)
        if target is not None:  # warm start: cross-entropy to the EM posterior inside the mask
            ce = -(target.to(self.dev) * log_resp).sum(0)[m].mean()
            return ce, ce.detach()
        loss, nll, _ = deep_gmm_loss(x[None], log_resp[None], m[None], s.method, s.covariance_type, self.prior_t,
                                     self.lam, s.reg_covar)
        if s.smoothness > 0:
            spacing = None if self.data.spacing is None else tuple(self.data.spacing)
            loss = loss + float(s.smoothness) * smoothness_penalty(log_resp[None], m[None], spacing)
        return loss, nll

    def _record(self, epoch, train_loss, train_nll, val_loss, val_nll) -> None:
        self.history.append(dict(epoch=epoch, train_loss=train_loss, train_nll=train_nll, val_loss=val_loss,
                                 val_nll=val_nll, lr=self.optimiser.param_groups[0]["lr"],
                                 seconds=time.perf_counter() - self.start))
        self.say(f"epoch {epoch}/{self.settings.max_epochs}: train loss {train_loss:.4f} (NLL {train_nll:.4f})"
                 + ("" if val_loss is None else f", held-out loss {val_loss:.4f} (NLL {val_nll:.4f})")
                 + (" *" if self.best.epoch == epoch else ""))
        if self.best.epoch == epoch:
            self._save(f"training (best so far: epoch {epoch})")

    def _report(self, info: TrainingProgress, cancel_message: str) -> None:
        """Tell ``progress`` (rank 0), then stop every process if it or the cancel event says so."""
        local_stop = self.progress is not None and self.dist.rank == 0 and self.progress(info) is False
        self._check_cancelled(local_stop, cancel_message)

    def _check_cancelled(self, local: bool, message: str) -> None:
        flag = local or (self.cancel_event is not None and self.cancel_event.is_set())
        if self.dist.enabled:
            flag = self.dist.sum([1.0 if flag else 0.0], self.dev)[0] > 0
        if flag:
            raise TrainingCancelled(message)

    def _save(self, status: str) -> Path | None:
        if self.output is None or self.dist.rank != 0:
            return None
        state = self.best.state if self.best.state is not None else self.net.state_dict()
        return model_file.save_model(self.output, state, self._metadata(status))

    def _metadata(self, status: str) -> dict:
        """The model file's metadata: what the network is for and how it was built, then how training went."""
        return {**self._model_description(), "training": self._training_record(status)}

    def _model_description(self) -> dict:
        """What a user of the model needs: the data it expects, its mixture, network and class identity."""
        s, data, prior = self.settings, self.data, self.prior
        return dict(
            n_classes=data.n_classes, method=s.method, covariance_type=s.covariance_type, reg_covar=s.reg_covar,
            smoothness=float(s.smoothness), channel_names=data.channel_names, n_channels=data.n_channels,
            spatial_dims=data.spatial_dims, class_names=data.class_names,
            # the voxel size (z, y, x) it was trained at: inference on a finer grid runs on blocks of it
            spacing=None if data.spacing is None else [float(v) for v in data.spacing],
            format=model_file.FORMAT_NAME, format_version=model_file.FORMAT_VERSION,
            package_version=model_file.package_version(), torch_version=torch.__version__,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            normalization=dict(NORMALIZATION), network={"class": "UNet", **self.net.config},
            prior_means=None if prior is None else np.asarray(prior, dtype=float).tolist(), prior_weight=self.lam,
            class_identity="fixed by the prior means (class k = row k)" if prior is not None
            else "ordered per image by the first channel's mean",
        )

    def _training_record(self, status: str) -> dict:
        """How training went (cases, epochs, the best epoch, the curves) and the settings it ran with."""
        s, history, best, n_val = self.settings, self.history, self.best, len(self.val_idx)
        return dict(
            status=status, n_train=len(self.train_idx), n_val=n_val, epochs=len(history), best_epoch=best.epoch,
            best_val_loss=best.loss if n_val else None,
            best_val_nll=next((h["val_nll"] for h in history if h["epoch"] == best.epoch), None),
            train_loss_history=[h["train_loss"] for h in history], val_loss_history=[h["val_loss"] for h in history],
            train_nll_history=[h["train_nll"] for h in history], val_nll_history=[h["val_nll"] for h in history],
            seconds=round(time.perf_counter() - self.start, 3), world_size=self.dist.world, device=self.dev.type,
            seed=s.seed, batch_size=s.batch_size, learning_rate=s.learning_rate, weight_decay=s.weight_decay,
            grad_clip=s.grad_clip, precision=s.precision, max_epochs=s.max_epochs, min_epochs=s.min_epochs,
            patience=s.patience, min_delta=s.min_delta, val_fraction=s.val_fraction, augment=bool(s.augment),
            warm_start_steps=s.warm_start_steps,
            patch_size=None if s.patch_size is None else [int(p) for p in s.patch_size],
        )


def _check_finite(loss: torch.Tensor, epoch: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"The training loss became {loss.item()} at epoch {epoch}: lower the learning rate "
            "or check the images (constant or tiny masks)."
        )


__all__ = [
    "TrainingCancelled", "TrainingProgress", "TrainingResult", "TrainingSettings", "build_network", "forward_log_resp",
    "check_model_request", "load_trained_model", "pooled_class_means", "predict_with_model", "train",
]
