"""Trained models: train one network on many images, segment new images in one forward pass.

:func:`train` fits one U-Net to a cohort of multi-channel images with the deep GMM loss of
:mod:`.deep` (per-image closed-form M-step, mixture NLL averaged over the images of a batch,
optional prior class means that fix class identity), keeps a held-out split for early stopping
and model selection, and writes the best network with its metadata to one model file
(:mod:`.model_io`). :func:`predict_with_model` is what ``segment(..., model=PATH)`` calls: one
forward pass, or ``fine_tune`` steps of the per-image fit (:func:`.deep.fit_deep`) started from
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
import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from . import model_io
from .deep import DEEP_METHODS, DEFAULT_SMOOTHNESS, DeepSettings, _bounding_box, choose_network, deep_gmm_loss, fit_deep, smoothness_penalty
from .engine import SegmentationCancelled, check_prior_means, normalize_channels, resolve_device, validate_inputs
from .gmm import COVARIANCE_TYPES
from .networks import UNet, check_precision, resolve_precision

NORMALIZATION = {"kind": "zscore-in-mask", "description": "per image and channel: (x - mean) / std over the mask voxels; 0 outside the mask"}
# Learning rate of the per-image steps of ``fine_tune`` (smaller than a fresh fit's: the trained
# weights are already close to a good solution).
FINE_TUNE_LEARNING_RATE = 1e-3


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
        self.path = model_io.save_model(path, self.network.state_dict(), self.metadata)
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
            "(deepgmm-train) or DeepGMMSegmentLib.cohort.load_cohort()."
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
        box = _bounding_box(mt)
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
    from . import em

    init = torch.as_tensor(means, dtype=torch.float64)
    for case in cases:
        xv = case.x[:, case.mask].T.double()
        fit = em.fit_gmm(xv, n_classes, covariance_type=covariance_type, max_iter=100, tol=1e-4,
                         generator=torch.Generator().manual_seed(seed), means_init=init)
        target = torch.zeros((n_classes,) + tuple(case.mask.shape))
        target[:, case.mask] = fit.log_resp.exp().T.float()
        case.target = target


def pooled_class_means(cases: Sequence[_Case], n_classes: int, covariance_type: str = "full", seed: int = 0,
                       max_voxels: int = 200_000) -> np.ndarray:
    """Class means (K, C) of one GMM fitted by EM to the pooled normalised voxels of ``cases``.

    Rows are sorted by the first channel's mean (class 1 = darkest), so a network trained with
    these as prior means numbers its classes like the per-image methods do.
    """
    from . import em

    voxels = torch.cat([c.x[:, c.mask].T for c in cases])
    if voxels.shape[0] > max_voxels:
        pick = torch.randperm(voxels.shape[0], generator=torch.Generator().manual_seed(seed))[:max_voxels]
        voxels = voxels[pick]
    fit = em.fit_gmm(voxels.double(), n_classes, covariance_type=covariance_type, max_iter=200, tol=1e-6,
                     generator=torch.Generator().manual_seed(seed))
    means = fit.params.means.detach().cpu().numpy()
    return means[np.argsort(means[:, 0], kind="stable")]


# ----------------------------------------------------------------------------- network helpers


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


def forward_log_resp(network: torch.nn.Module, x: torch.Tensor, network_dims: int) -> torch.Tensor:
    """Log class probabilities (K, *spatial) of a (C, *spatial) image; 2D networks see 3D volumes slice by slice."""
    if network_dims == 2 and x.ndim == 4:
        logits = network(x.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)  # slices as a batch
    else:
        logits = network(x.unsqueeze(0))[0]
    return F.log_softmax(logits, dim=0)


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


# ----------------------------------------------------------------------------- distributed


class _Distributed:
    """Rank / world size, and the process group if this call had to create it (torchrun)."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.owned = False
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        elif dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owned = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        self.enabled = self.world > 1
        self.backend = dist.get_backend() if self.enabled else None

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Sum of ``values`` over all processes (identical result on every rank)."""
        if not self.enabled:
            return [float(v) for v in values]
        on = device if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=on)
        self.dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _training_device(device: Any) -> torch.device:
    dev = resolve_device(device)
    local_rank = os.environ.get("LOCAL_RANK")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(local_rank) if local_rank is not None else 0)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s): start at most that many "
                "processes per machine (torchrun --nproc_per_node)."
            )
    return dev


# ----------------------------------------------------------------------------- training


def train(
    images: Sequence[Any],
    n_classes: int,
    method: str = "deepsvg",
    masks: Sequence[Any] | None = None,
    prior_means: Any = None,
    prior_weight: float = 1.0,
    *,
    channel_names: Sequence[str] | None = None,
    spatial_dims: int | None = None,
    spacing: Sequence[float] | None = None,
    output: str | os.PathLike | None = None,
    covariance_type: str = "full",
    reg_covar: float = 1e-4,
    network: str = "auto",
    base_width: int = 8,
    depth: int = 3,
    val_fraction: float = 0.2,
    max_epochs: int = 100,
    min_epochs: int = 10,
    patience: int = 10,
    min_delta: float = 1e-3,
    batch_size: int = 4,
    learning_rate: float = 1e-2,
    weight_decay: float = 1e-3,
    grad_clip: float = 12.0,
    smoothness: float | None = None,
    precision: str = "auto",
    augment: bool = True,
    patch_size: Sequence[int] | None = None,
    warm_start: str = "em",
    warm_start_steps: int = 30,
    device: Any = "auto",
    seed: int = 0,
    progress: Callable[[TrainingProgress], Any] | None = None,
    cancel_event: Any = None,
    log: Callable[[str], None] | None = None,
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
    method : {"deepsvg", "deepg"}
    masks : sequence of bool arrays (or None entries), optional
        Region modelled in each case (default: the whole image).
    prior_means : (K, C) array, "auto" or None
        Expected class means in **normalised units** (per-channel z-scores inside the mask), e.g.
        averaged over a few labelled cases; "auto" takes them from one EM fit of the pooled
        training voxels (sorted by channel 1). With prior means, output k of the network is class
        k (row k); the penalty is ``prior_weight * mean_b ||mu_b - prior||^2``.
    output : path, optional
        Model file; written when the held-out loss improves (so an interrupted run still leaves
        the best model so far) and at the end (always, even if early stopping never fires).
    val_fraction : float
        Share of the cases held out (at least one when there are two or more cases) for early
        stopping and model selection; with one case the training loss is used.
    max_epochs, min_epochs, patience, min_delta
        Stop after ``patience`` epochs (and at least ``min_epochs``) without the held-out loss
        improving by more than ``min_delta``, or at ``max_epochs``.
    batch_size, learning_rate, weight_decay, grad_clip
        Global batch (over all processes), AdamW with polynomial (0.9) decay, gradient-norm clip.
    smoothness : float, optional
        Weight of the explicit spatial prior (neighbouring voxels' class probabilities agree), as
        the per-image ``smoothness`` option and with the same default (None: 0.3 for deepsvg, 0
        for deepg); 0 trains the paper's loss. Stored in the model and used again when fine-tuning.
    precision : {"auto", "float32", "bfloat16"}
        The network's convolutions ("auto": bfloat16 where the hardware computes it natively).
    augment, patch_size
        Random in-plane flips, small per-channel gain/offset and noise; ``patch_size`` trains on
        random patches (e.g. a slab of slices) to save memory and time on large volumes.
    warm_start, warm_start_steps
        "em": the first ``warm_start_steps`` optimiser steps (rounded up to whole epochs) teach the network each case's EM posterior
        (EM started from the pooled class means, or the prior means), which makes the NLL epochs
        converge much faster than from random weights; "none" skips this. Warm-start epochs do
        not count for early stopping or model selection.
    network, base_width, depth, spacing
        U-Net choice as for the per-image fit ("auto": 2D for 2D images, 3D for volumes, in-plane
        pooling only for thick slices).
    device : "auto" | "cpu" | "cuda" | "cuda:N"
        Under torchrun "auto"/"cuda" use the GPU of LOCAL_RANK.
    progress : callable, optional
        Receives a :class:`TrainingProgress` after every step; returning False cancels
        (:class:`TrainingCancelled`), as does ``cancel_event.is_set()``.
    log : callable, optional
        Receives one line of text per epoch (rank 0 only).
    """
    start = time.perf_counter()
    method = method.lower() if isinstance(method, str) else method
    if method not in DEEP_METHODS:
        raise ValueError(f"Only the deep methods can be trained ({', '.join(DEEP_METHODS)}), not {method!r}.")
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"Unknown covariance_type {covariance_type!r}: use 'full' or 'diag'.")
    for name, value, low in (("max_epochs", max_epochs, 1), ("min_epochs", min_epochs, 0), ("patience", patience, 1),
                             ("batch_size", batch_size, 1), ("base_width", base_width, 1), ("depth", depth, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if smoothness is None:
        smoothness = DEFAULT_SMOOTHNESS[method]
    if float(learning_rate) <= 0 or float(prior_weight) < 0 or float(smoothness) < 0:
        raise ValueError("learning_rate must be > 0, prior_weight and smoothness >= 0.")
    check_precision(precision)

    cases, n_channels, dims = _prepare_cases(images, masks, n_classes, method, spatial_dims)
    n_classes = int(n_classes)
    if channel_names is None:
        channel_names = [f"channel{i + 1}" for i in range(n_channels)]
    channel_names = [str(n) for n in channel_names]
    if len(channel_names) != n_channels:
        raise ValueError(f"{len(channel_names)} channel names for {n_channels} channels: give one name per channel.")
    if patch_size is not None and len(patch_size) != dims:
        raise ValueError(f"patch_size needs {dims} values for {dims}D images, got {tuple(patch_size)}.")
    prior = _check_prior(prior_means, n_classes, n_channels, cases, covariance_type, seed)
    if warm_start not in ("em", "none"):
        raise ValueError(f"Unknown warm_start {warm_start!r}: use 'em' or 'none'.")
    if isinstance(warm_start_steps, bool) or not isinstance(warm_start_steps, (int, np.integer)) or warm_start_steps < 0:
        raise ValueError(f"warm_start_steps must be an integer >= 0, got {warm_start_steps!r}.")
    if warm_start == "none":
        warm_start_steps = 0
    if warm_start_steps:
        start_means = prior if prior is not None else pooled_class_means(cases, n_classes, covariance_type, seed)
        _attach_em_targets(cases, n_classes, start_means, covariance_type, seed)

    dev = _training_device(device)
    dist = _Distributed(dev)
    try:
        return _train_loop(**locals())
    finally:
        dist.close()


def _train_loop(*, cases, n_classes, method, prior, prior_weight, channel_names, n_channels, dims, spacing, output,
                covariance_type, reg_covar, network, base_width, depth, val_fraction, max_epochs, min_epochs,
                patience, min_delta, batch_size, learning_rate, weight_decay, grad_clip, smoothness, precision,
                augment, patch_size, warm_start_steps, dev, dist, seed, progress, cancel_event, log, start, **_unused) -> TrainingResult:
    rank, world = dist.rank, dist.world
    say = (lambda text: None) if (log is None or rank != 0) else log

    # Split: the same on every process (seeded), validation cases never seen in training.
    order = np.random.default_rng([seed, 0]).permutation(len(cases))
    n_val = 0
    if len(cases) >= 2 and val_fraction > 0:
        n_val = min(max(1, int(round(val_fraction * len(cases)))), len(cases) - 1)
    val_idx, train_idx = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())

    smallest = tuple(min(c.mask.shape[d] for c in cases) for d in range(dims))
    net_dims, in_plane_only = choose_network(smallest, None if spacing is None else tuple(spacing), network, method)
    torch.manual_seed(seed)
    net = UNet(net_dims, n_channels, n_classes, base_width, depth, in_plane_only).to(dev)
    net.autocast_dtype = resolve_precision(precision, dev)
    model = net
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimiser = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
    prior_t = None if prior is None else torch.as_tensor(prior, dtype=torch.float32, device=dev)
    lam = float(prior_weight) if prior is not None else 0.0

    def loss_of(x: torch.Tensor, m: torch.Tensor, module: torch.nn.Module,
                target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, m = x.to(dev), m.to(dev)
        log_resp = forward_log_resp(module, x, net_dims)
        if target is not None:  # warm start: cross-entropy to the EM posterior inside the mask
            ce = -(target.to(dev) * log_resp).sum(0)[m].mean()
            return ce, ce.detach()
        loss, nll, _ = deep_gmm_loss(x[None], log_resp[None], m[None], method, covariance_type, prior_t, lam, reg_covar)
        if smoothness > 0:
            loss = loss + float(smoothness) * smoothness_penalty(log_resp[None], m[None], None if spacing is None else tuple(spacing))
        return loss, nll

    def cancelled(local: bool) -> bool:
        flag = local or (cancel_event is not None and cancel_event.is_set())
        return dist.sum([1.0 if flag else 0.0], dev)[0] > 0 if dist.enabled else flag

    config = dict(
        n_classes=n_classes, method=method, covariance_type=covariance_type, reg_covar=reg_covar,
        smoothness=float(smoothness), channel_names=channel_names, n_channels=n_channels, spatial_dims=dims,
    )
    settings = dict(
        seed=seed, batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay,
        grad_clip=grad_clip, precision=precision, max_epochs=max_epochs, min_epochs=min_epochs, patience=patience,
        min_delta=min_delta, val_fraction=val_fraction, augment=bool(augment),
        warm_start_steps=warm_start_steps,
        patch_size=None if patch_size is None else [int(p) for p in patch_size],
    )
    history: list[dict] = []
    best = {"loss": math.inf, "epoch": 0, "state": None}
    stop_reason = "max_epochs"
    batches_per_epoch = math.ceil(len(train_idx) / batch_size)
    warm_start_epochs = math.ceil(warm_start_steps / batches_per_epoch)
    total_epochs = warm_start_epochs + max_epochs

    def metadata(status: str) -> dict:
        return _metadata(config, net.config, prior, lam, settings, history, best, len(train_idx), len(val_idx),
                         world, dev, time.perf_counter() - start, status)

    def save(status: str) -> Path | None:
        if output is None or rank != 0:
            return None
        state = best["state"] if best["state"] is not None else net.state_dict()
        return model_io.save_model(output, state, metadata(status))

    epoch = 0
    try:
        for run_epoch in range(1, total_epochs + 1):
            warming = run_epoch <= warm_start_epochs
            # Epochs are numbered from the first NLL epoch (warm-start epochs are -w+1 .. 0).
            epoch = run_epoch - warm_start_epochs
            if warming:
                lr_now = learning_rate
            else:
                lr_now = learning_rate * (1 - (epoch - 1) / max_epochs) ** 0.9
            for group in optimiser.param_groups:
                group["lr"] = lr_now
            net.train()
            permutation = np.random.default_rng([seed, run_epoch]).permutation(train_idx).tolist()
            loss_sum = nll_sum = 0.0
            n_seen = 0
            for step in range(batches_per_epoch):
                batch = permutation[step * batch_size:(step + 1) * batch_size]
                mine = batch[rank::world]
                # Each image weighs world/len(batch): DDP divides the summed gradients by world, so
                # the step is the single-process mean over the batch whatever the split.
                weight = world / len(batch)
                optimiser.zero_grad(set_to_none=True)
                work = mine if mine else batch[:1]  # a process with no image still joins the all-reduce
                for j, index in enumerate(work):
                    rng = np.random.default_rng([seed, run_epoch, index, 1])
                    x, m, target = _augment(cases[index], rng, patch_size, augment)
                    sync = dist.enabled and j < len(work) - 1
                    with model.no_sync() if sync else contextlib.nullcontext():
                        loss, nll = loss_of(x, m, model, target if warming else None)
                        (loss * (weight if mine else 0.0)).backward()
                    if mine:
                        if not torch.isfinite(loss):
                            raise FloatingPointError(
                                f"The training loss became {loss.item()} at epoch {epoch}: lower the learning rate "
                                "or check the images (constant or tiny masks)."
                            )
                        loss_sum += loss.item()
                        nll_sum += nll.item()
                        n_seen += 1
                torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
                optimiser.step()
                local_stop = False
                if progress is not None and rank == 0:
                    # Running mean of this process's images (no extra all-reduce per step).
                    info = TrainingProgress(epoch, max_epochs, step + 1, batches_per_epoch,
                                            loss_sum / max(n_seen, 1), None, best["epoch"],
                                            time.perf_counter() - start)
                    local_stop = progress(info) is False
                if cancelled(local_stop):
                    raise TrainingCancelled(f"Training cancelled at epoch {epoch}.")
            train_loss, train_nll = (v / len(train_idx) for v in dist.sum([loss_sum, nll_sum], dev))
            if warming:
                say(f"warm-start epoch {run_epoch}/{warm_start_epochs}: cross-entropy to EM {train_loss:.4f}")
                if cancelled(False):
                    raise TrainingCancelled(f"Training cancelled in warm-start epoch {run_epoch}.")
                continue

            val_loss = val_nll = None
            if val_idx:
                net.eval()
                v_loss = v_nll = 0.0
                with torch.no_grad():
                    for index in val_idx[rank::world]:
                        loss, nll = loss_of(cases[index].x, cases[index].mask, net)
                        v_loss, v_nll = v_loss + loss.item(), v_nll + nll.item()
                val_loss, val_nll = (v / len(val_idx) for v in dist.sum([v_loss, v_nll], dev))
            criterion = val_loss if val_loss is not None else train_loss
            improved = math.isfinite(criterion) and criterion < best["loss"] - min_delta
            if improved or best["state"] is None and math.isfinite(criterion):
                best.update(loss=criterion, epoch=epoch, state=copy.deepcopy(net.state_dict()))
            history.append(dict(epoch=epoch, train_loss=train_loss, train_nll=train_nll, val_loss=val_loss,
                                val_nll=val_nll, lr=optimiser.param_groups[0]["lr"],
                                seconds=time.perf_counter() - start))
            say(f"epoch {epoch}/{max_epochs}: train loss {train_loss:.4f} (NLL {train_nll:.4f})"
                + ("" if val_loss is None else f", held-out loss {val_loss:.4f} (NLL {val_nll:.4f})")
                + (" *" if best["epoch"] == epoch else ""))
            if best["epoch"] == epoch:
                save(f"training (best so far: epoch {epoch})")
            local_stop = False
            if progress is not None and rank == 0:
                local_stop = progress(TrainingProgress(epoch, max_epochs, batches_per_epoch, batches_per_epoch,
                                                       train_loss, val_loss, best["epoch"],
                                                       time.perf_counter() - start, True)) is False
            if cancelled(local_stop):
                raise TrainingCancelled(f"Training cancelled after epoch {epoch}.")
            if epoch >= max(min_epochs, 1) and epoch - best["epoch"] >= patience:
                stop_reason = "early_stopping"
                break
    except (TrainingCancelled, FloatingPointError, KeyboardInterrupt):
        # Keep what was learnt: the file holds the best model so far.
        if best["state"] is not None:
            save(f"interrupted at epoch {epoch}")
        raise

    if best["state"] is None:  # every loss was non-finite; keep the last weights so something is saved
        best["state"] = copy.deepcopy(net.state_dict())
        best["epoch"] = epoch
    net.load_state_dict(best["state"])
    net = net.cpu().eval()
    meta = metadata(stop_reason)
    path = None
    if output is not None and rank == 0:
        path = model_io.save_model(output, net.state_dict(), meta)
        say(f"saved the model of epoch {best['epoch']} to {path} ({stop_reason.replace('_', ' ')})")
    return TrainingResult(net, meta, history, path)


def _metadata(config, network_config, prior, lam, settings, history, best, n_train, n_val, world, dev, seconds,
              status) -> dict:
    meta = dict(config)
    meta.update(
        format=model_io.FORMAT_NAME,
        format_version=model_io.FORMAT_VERSION,
        package_version=model_io.package_version(),
        torch_version=torch.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        normalization=dict(NORMALIZATION),
        network={"class": "UNet", **network_config},
        prior_means=None if prior is None else np.asarray(prior, dtype=float).tolist(),
        prior_weight=lam,
        class_identity="fixed by the prior means (class k = row k)" if prior is not None
        else "ordered per image by the first channel's mean",
        training=dict(
            status=status,
            n_train=n_train, n_val=n_val, epochs=len(history), best_epoch=best["epoch"],
            best_val_loss=best["loss"] if n_val else None,
            best_val_nll=next((h["val_nll"] for h in history if h["epoch"] == best["epoch"]), None),
            train_loss_history=[h["train_loss"] for h in history],
            val_loss_history=[h["val_loss"] for h in history],
            train_nll_history=[h["train_nll"] for h in history],
            val_nll_history=[h["val_nll"] for h in history],
            seconds=round(seconds, 3), world_size=world, device=dev.type, **settings,
        ),
    )
    return meta


# ----------------------------------------------------------------------------- inference


@functools.lru_cache(maxsize=4)
def _cached_model(path: str, mtime_ns: int, size: int) -> tuple[dict, dict]:
    return model_io.load_model(path)


def load_trained_model(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state_dict, metadata) of a model file; cached while the file is unchanged (batch use)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"Model file {str(p)!r} does not exist: pass the path of a file written by deepgmm-train.")
    stat = p.stat()
    return _cached_model(str(p.resolve()), stat.st_mtime_ns, stat.st_size)


def check_model_request(model_path: str | os.PathLike, n_classes: int, n_channels: int, spatial_dims: int) -> dict:
    """Metadata of ``model_path`` after checking it against a ``segment`` call; ``ValueError`` if it does not fit.

    For the engine to call before :func:`predict_with_model`, which does not know the requested K.
    """
    _, meta = load_trained_model(model_path)
    model_io.check_compatible(meta, n_channels=n_channels, spatial_dims=spatial_dims, n_classes=n_classes)
    return meta


def predict_with_model(
    x: torch.Tensor,
    mask: torch.Tensor,
    model_path: str | os.PathLike,
    fine_tune: int,
    device: torch.device,
    seed: int,
    progress: Callable[[int, int, float], Any] | None = None,
    cancel: Any = None,
) -> tuple[torch.Tensor, list[float]]:
    """Log responsibilities (K, *spatial) of a trained model for one normalised image.

    x: (C, *spatial) float32 normalised as in training (``engine.normalize_channels``) on
    ``device``; mask: bool (*spatial). ``fine_tune`` = 0: one forward pass; N > 0: N per-image
    steps from the trained weights (the model's own method, covariance type and prior). Returns
    (log_resp, nll_history) where the history holds the NLL after every step (one value for a
    single forward pass). Voxels outside the mask get uniform probabilities (the engine ignores them).
    """
    if isinstance(fine_tune, bool) or not isinstance(fine_tune, (int, np.integer)) or fine_tune < 0:
        raise ValueError(f"fine_tune must be an integer >= 0 (number of per-image steps), got {fine_tune!r}.")
    state, meta = load_trained_model(model_path)
    model_io.check_compatible(meta, n_channels=int(x.shape[0]), spatial_dims=x.ndim - 1)
    n_classes = int(meta["n_classes"])
    net_dims = int(meta["network"]["spatial_dims"])
    network = build_network(meta, state).to(device)
    network.autocast_dtype = resolve_precision("auto", device)

    def report(iteration: int, max_iterations: int, nll: float) -> None:
        if cancel is not None and (cancel() if callable(cancel) else cancel.is_set()):
            raise SegmentationCancelled("Segmentation cancelled.")
        if progress is not None and progress(iteration, max_iterations, nll) is False:
            raise SegmentationCancelled("Segmentation cancelled by the progress callback.")

    full = torch.full((n_classes,) + tuple(mask.shape), -math.log(n_classes), dtype=x.dtype, device=x.device)
    if fine_tune == 0:
        box = _bounding_box(mask)
        xc, mc = x[(slice(None),) + box] * mask[box], mask[box]
        network.eval()
        with torch.inference_mode():
            log_resp = forward_log_resp(network, xc, net_dims)
            _, nll, _ = deep_gmm_loss(xc[None], log_resp[None], mc[None], meta["method"],
                                      meta.get("covariance_type", "full"), None, 0.0, meta.get("reg_covar", 1e-4))
        full[(slice(None),) + box] = log_resp
        history = [nll.item()]
        report(1, 1, history[0])
        return full, history

    prior = meta.get("prior_means")
    settings = DeepSettings(
        network="2d" if net_dims == 2 else "3d", learning_rate=FINE_TUNE_LEARNING_RATE,
        max_iter=int(fine_tune), min_iter=int(fine_tune), tol=0.0, warm_start="none",
        covariance_type=meta.get("covariance_type", "full"), reg_covar=meta.get("reg_covar", 1e-4),
        prior_weight=float(meta.get("prior_weight") or 0.0),
        smoothness=float(meta.get("smoothness") or 0.0),
        base_width=int(meta["network"]["base_width"]), depth=int(meta["network"]["depth"]),
    )
    torch.manual_seed(int(seed))
    network.train()
    fit, _ = fit_deep(
        x, mask, n_classes, meta["method"], settings,
        prior_means=None if prior is None else torch.as_tensor(prior, dtype=x.dtype, device=x.device),
        report=report, network=network,
    )
    full[:, mask] = fit.log_resp.T.to(full.dtype)
    return full, list(fit.nll_history)


__all__ = [
    "TrainingCancelled", "TrainingProgress", "TrainingResult", "build_network", "forward_log_resp",
    "check_model_request", "load_trained_model", "pooled_class_means", "predict_with_model", "train",
]
