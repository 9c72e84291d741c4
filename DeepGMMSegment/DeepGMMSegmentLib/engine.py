"""The engine's one entry point, :func:`segment`, and everything around the fit itself.

``segment`` validates the input, normalises each channel inside the mask, picks the device,
runs one of the four methods (classic EM: ``em-gmm``, ``em-svgmm``; deep: ``deepg``,
``deepsvg``), puts the classes in a stable order, converts the mixture parameters back to the
input's intensity units and returns a :class:`SegmentationResult`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import em, gmm
from .deep import DEEP_METHODS, DEFAULT_SMOOTHNESS, DeepSettings, fit_deep, voxel_objective
from .networks import check_precision
from .gmm import COVARIANCE_TYPES, GaussianParameters

logger = logging.getLogger(__name__)

METHODS = ("deepsvg", "deepg", "em-gmm", "em-svgmm")
EM_METHODS = ("em-gmm", "em-svgmm")

# Options every method understands, with their defaults.
COMMON_OPTIONS: dict[str, Any] = {
    "covariance_type": "full",
    "max_iter": None,  # method default: EM 200, deep 150
    "tol": None,  # method default: EM 1e-5, deep 1e-4 (change of the mean NLL per voxel)
    "reg_covar": 1e-4,  # variance floor in normalised units (channels have unit variance)
    "prior_means": None,  # (K, C) in input units; fixes class identity
    "prior_weight": 1.0,  # lambda of the mean regularisation (deep methods)
    "cancel_event": None,  # anything with is_set(); checked every iteration
    "model": None,  # path of a trained model file (deep methods; see training.py)
    "fine_tune": 0,  # per-image steps after loading ``model``
    "n_init": em.DEFAULT_N_INIT,  # k-means++ starts of the EM fit; the best final NLL wins (all methods)
}
# A class holding less than this share of the mask voxels is "almost none", more than
# 1 - this share "almost all": K is probably wrong for what the image holds.
CLASS_SHARE_WARNING = 0.001
DEEP_OPTIONS = {f.name: f.default for f in dataclasses.fields(DeepSettings)}
for _name in ("covariance_type", "reg_covar", "prior_weight", "max_iter", "tol"):
    DEEP_OPTIONS.pop(_name, None)

EM_DEFAULTS = {"max_iter": 200, "tol": 1e-5}
DEEP_DEFAULTS = {"max_iter": DeepSettings.max_iter, "tol": DeepSettings.tol}


class SegmentationCancelled(Exception):
    """Raised when the progress callback returns False or the cancel event is set."""


# progress(iteration, max_iterations, nll, elapsed_seconds) -> False to cancel
ProgressCallback = Callable[[int, int, float, float], Any]


@dataclass
class SegmentationResult:
    """What :func:`segment` returns. Arrays are numpy; classes are numbered 1..K in ``labels``."""

    labels: np.ndarray  # uint8, spatial shape; 0 outside the mask
    probabilities: np.ndarray  # float32 (K, *spatial); sums to 1 inside the mask, 0 outside
    means: np.ndarray  # (K, C), input intensity units
    covariances: np.ndarray  # (K, C, C), input intensity units
    weights: np.ndarray  # (K,)
    nll_history: list[float]  # mean NLL per voxel (normalised units), one per iteration
    n_iter: int
    device: str
    seconds: float
    method: str
    converged: bool
    n_classes: int
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def nll(self) -> float:
        """Final mean negative log-likelihood per voxel (normalised units)."""
        return self.nll_history[-1] if self.nll_history else float("nan")


# ----------------------------------------------------------------------------- validation


def _as_channel_list(channels: Any) -> list[np.ndarray]:
    if isinstance(channels, (np.ndarray, torch.Tensor)):
        return [np.asarray(channels)]
    if isinstance(channels, Sequence) and not isinstance(channels, (str, bytes)):
        if len(channels) == 0:
            raise ValueError("No channels given: pass one image array or a list of co-registered arrays.")
        return [np.asarray(c) for c in channels]
    raise ValueError(
        f"channels must be an array or a sequence of arrays, got {type(channels).__name__}: "
        "pass e.g. segment(t1_array, 3) or segment([t1_array, t2_array], 3)."
    )


def validate_inputs(channels: Any, n_classes: Any, method: str, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check every input and return (data (C, *spatial) float32, mask bool). Raises ValueError."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: use one of {', '.join(METHODS)}.")
    arrays = _as_channel_list(channels)
    shape = arrays[0].shape
    if len(shape) not in (2, 3):
        raise ValueError(
            f"Channel 1 has {len(shape)} dimensions {shape}: images must be 2D (y, x) or 3D (z, y, x); "
            "pass several channels as a list, not as one stacked array."
        )
    for i, a in enumerate(arrays[1:], start=2):
        if a.shape != shape:
            raise ValueError(
                f"Channel {i} has shape {a.shape} but channel 1 has {shape}: resample all channels onto "
                "one grid first (the command line and the Slicer module do this for you)."
            )
    for i, a in enumerate(arrays, start=1):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or np.iscomplexobj(a):
            raise ValueError(f"Channel {i} has dtype {a.dtype}: pass real-valued intensity images.")
    if mask is None:
        m = np.ones(shape, dtype=bool)
    else:
        m = np.asarray(mask)
        if m.shape != shape:
            raise ValueError(f"The mask has shape {m.shape} but the channels have {shape}: give a mask on the same grid.")
        m = m.astype(bool)
    if not m.any():
        raise ValueError("The mask is empty: it must contain the voxels to segment (nonzero = inside).")
    data = np.stack([np.asarray(a, dtype=np.float32) for a in arrays])
    inside = data[:, m]
    for i in range(len(arrays)):
        if not np.isfinite(inside[i]).all():
            bad = int((~np.isfinite(inside[i])).sum())
            raise ValueError(
                f"Channel {i + 1} has {bad} NaN or infinite values inside the mask: replace them "
                "(e.g. np.nan_to_num) or exclude them with the mask."
            )
        if float(inside[i].max()) == float(inside[i].min()):
            raise ValueError(
                f"Channel {i + 1} is constant inside the mask (value {float(inside[i].min())}): it carries no "
                "information; remove it or check the mask and the input file."
            )
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)):
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}.")
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}: a mixture needs two or more classes.")
    if n_classes > 255:
        raise ValueError(f"n_classes must be at most 255 (uint8 labels), got {n_classes}.")
    _check_distinct(inside, int(n_classes))
    return data, m


def _check_distinct(inside: np.ndarray, n_classes: int) -> None:
    """At least n_classes distinct intensity tuples inside the mask (checked cheaply first)."""
    rows = inside.T
    probe = rows[:: max(1, rows.shape[0] // 20000)]
    if np.unique(probe, axis=0).shape[0] >= n_classes:
        return
    distinct = np.unique(rows, axis=0).shape[0]
    if distinct < n_classes:
        raise ValueError(
            f"Only {distinct} distinct intensity values inside the mask, fewer than the {n_classes} classes "
            f"asked for: use n_classes <= {distinct} or a larger mask."
        )


def resolve_device(device: Any) -> torch.device:
    """"auto" → CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.")
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but no CUDA GPU is available to PyTorch (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda is not None}): use device='auto' or 'cpu', or install a "
                "CUDA-enabled PyTorch."
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist: use cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}."
            )
        return dev
    raise ValueError(f"Unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'.")


def _resolve_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    known = dict(COMMON_OPTIONS)
    if method in DEEP_METHODS:
        known.update(DEEP_OPTIONS)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(unknown)} for method {method!r}: valid options are "
            f"{', '.join(sorted(known))}."
        )
    resolved = {**known, **options}
    defaults = DEEP_DEFAULTS if method in DEEP_METHODS else EM_DEFAULTS
    for key, value in defaults.items():
        if resolved[key] is None:
            resolved[key] = value
    if resolved["covariance_type"] not in COVARIANCE_TYPES:
        raise ValueError(f"Unknown covariance_type {resolved['covariance_type']!r}: use 'full' or 'diag'.")
    if int(resolved["max_iter"]) < 1:
        raise ValueError(f"max_iter must be >= 1, got {resolved['max_iter']}.")
    if float(resolved["tol"]) < 0 or float(resolved["reg_covar"]) < 0:
        raise ValueError("tol and reg_covar must be >= 0.")
    if method in DEEP_METHODS:
        if resolved["smoothness"] is None:
            resolved["smoothness"] = DEFAULT_SMOOTHNESS[method]
        if float(resolved["smoothness"]) < 0:
            raise ValueError(f"smoothness must be >= 0 (0 turns the spatial prior off), got {resolved['smoothness']}.")
        check_precision(resolved["precision"])
        if isinstance(resolved["learning_rate"], bool) or not isinstance(resolved["learning_rate"], (int, float)) \
                or not resolved["learning_rate"] > 0:
            raise ValueError(f"learning_rate must be a number > 0, got {resolved['learning_rate']!r}.")
    n_init = resolved["n_init"]
    if isinstance(n_init, bool) or not isinstance(n_init, (int, np.integer)) or n_init < 1:
        raise ValueError(f"n_init must be an integer >= 1 (number of k-means++ starts), got {n_init!r}.")
    if resolved["model"] is not None and method not in DEEP_METHODS:
        raise ValueError(f"A trained model can only be used with the deep methods (deepg, deepsvg), not {method!r}.")
    return resolved


# ----------------------------------------------------------------------------- normalisation


def _channel_statistics(inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, scale) of each channel from its voxels inside the mask, (C, V): mean and standard deviation."""
    inside = inside.astype(np.float64)
    return inside.mean(1), inside.std(1)


def normalize_channels(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score each channel with the mean and standard deviation inside the mask.

    Returns (normalised data (C, *spatial) float32 with 0 outside the mask, centre (C,), scale (C,)).
    One float32 copy of the volume, normalised in place (the input is never modified).
    """
    centre, scale = _channel_statistics(data[:, mask])
    shape = (-1,) + (1,) * (data.ndim - 1)
    out = np.array(data, dtype=np.float32, copy=True)
    out -= centre.reshape(shape).astype(np.float32)
    out /= scale.reshape(shape).astype(np.float32)
    out[:, ~mask] = 0
    return out, centre, scale


def normalize_voxels(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same z-scores as :func:`normalize_channels`, for the mask voxels only: ((V, C) float32, centre, scale).

    EM needs no image grid, so it never holds a normalised copy of the whole volume.
    """
    inside = data[:, mask]
    centre, scale = _channel_statistics(inside)
    voxels = (inside.T - centre.astype(np.float32)) / scale.astype(np.float32)
    return np.ascontiguousarray(voxels, dtype=np.float32), centre, scale


# ----------------------------------------------------------------------------- the entry point


def segment(
    channels: Any,
    n_classes: int,
    method: str = "deepsvg",
    mask: Any = None,
    spacing: Sequence[float] | None = None,
    device: Any = "auto",
    seed: int = 0,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> SegmentationResult:
    """Segment co-registered images into ``n_classes`` tissue classes without labels.

    Parameters
    ----------
    channels : array or sequence of arrays
        One image or several co-registered images of one shape, 2D (y, x) or 3D (z, y, x).
    n_classes : int
        Number of classes K (>= 2).
    method : {"deepsvg", "deepg", "em-gmm", "em-svgmm"}
        Deep GMM with per-voxel (deepsvg) or global (deepg) mixing weights, fitted per image; or
        classic EM for a GMM / spatially variant GMM.
    mask : bool array, optional
        Voxels to model; everything outside gets label 0 and probability 0.
    spacing : sequence of float, optional
        Voxel size in (z, y, x) order; thick slices make the 3D network pool in-plane only.
    device : {"auto", "cpu", "cuda", "cuda:N"}
        "auto" uses CUDA when available and falls back to the CPU (also after CUDA runs out of memory).
    seed : int
        Same seed, same input, same device → same result.
    progress : callable, optional
        ``progress(iteration, max_iterations, nll, elapsed_seconds)`` every iteration; return False
        to cancel (raises :class:`SegmentationCancelled`).
    **options
        ``covariance_type`` ("full"/"diag"), ``max_iter``, ``tol``, ``reg_covar``, ``prior_means``
        ((K, C), input units), ``prior_weight``, ``cancel_event``, ``n_init`` (k-means++ starts of
        the EM fit, default 5; every method starts from its winner); deep methods also ``network``,
        ``base_width``, ``depth``, ``learning_rate``, ``min_iter``, ``warm_start`` ("em"/"none"),
        ``warm_start_iter``, ``smoothness`` (weight of the spatial prior; default 0.3 for deepsvg,
        0 for deepg; 0 = the paper's loss), ``precision`` ("auto"/"float32"/"bfloat16"), ``model``, ``fine_tune``.

    Classes are numbered by ascending mean of the first channel (class 1 = darkest), unless
    ``prior_means`` are given, in which case class k is the k-th prior row.

    Anything the fit had to work around (a skipped training step, a class that emptied, a class
    holding almost all or almost none of the mask) is listed in ``result.notes``, logged and
    warned about (``RuntimeWarning``). A fit that fails numerically raises
    :class:`~DeepGMMSegmentLib.gmm.FitError` naming what failed and what to change.
    """
    start = time.perf_counter()
    method = method.lower() if isinstance(method, str) else method
    data, m = validate_inputs(channels, n_classes, method, mask)
    n_classes = int(n_classes)
    opts = _resolve_options(method, options)
    spacing_t = _check_spacing(spacing, data.ndim - 1)
    prior = check_prior_means(opts["prior_means"], n_classes, data.shape[0])
    fixed_identity = prior is not None
    if opts["model"] is not None:
        from .trained.inference import check_model_request  # trained models are optional

        meta = check_model_request(opts["model"], n_classes, data.shape[0], data.ndim - 1)
        # A model trained with prior means outputs class k as the k-th prior row.
        fixed_identity = fixed_identity or bool(meta.get("prior_means"))
    requested = device
    dev = resolve_device(device)
    notes: list[str] = []
    run = lambda device: _run_explained(data, m, n_classes, method, opts, spacing_t, prior, device, seed,  # noqa: E731
                                        progress, start)
    try:
        fit, centre, scale = run(dev)
    except torch.OutOfMemoryError:
        if not (isinstance(requested, str) and requested.strip().lower() == "auto") or dev.type == "cpu":
            raise
        torch.cuda.empty_cache()
        msg = f"CUDA ran out of memory on {dev}; retrying on the CPU (device='auto')."
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        notes.append(msg)
        dev = torch.device("cpu")
        fit, centre, scale = run(dev)
    notes += fit.notes + _class_share_notes(fit, n_classes, mask is None)  # fit notes were warned about already
    return _build_result(fit, m, centre, scale, n_classes, method, opts, fixed_identity, dev, start, notes)


def _run_explained(data, m, n_classes, method, opts, spacing, prior, dev, seed, progress, start):
    """:func:`_run`, turning a numerical failure into a :class:`gmm.FitError` that says what to change."""
    try:
        return _run(data, m, n_classes, method, opts, spacing, prior, dev, seed, progress, start)
    except gmm.FitError as error:
        raise gmm.FitError(f"The {method} fit with {n_classes} classes failed: {error}") from None
    except torch.linalg.LinAlgError as error:
        raise gmm.FitError(
            f"The {method} fit with {n_classes} classes failed in a linear-algebra step ({error}). Use a larger "
            "reg_covar (e.g. 1e-3), fewer classes, covariance_type='diag', or precision='float32'."
        ) from None


def _class_share_notes(fit: em.MixtureFit, n_classes: int, no_mask: bool) -> list[str]:
    """Warnings for classes that hold almost none or almost all of the mask voxels (K is probably wrong)."""
    counts = torch.bincount(fit.log_resp.argmax(1), minlength=n_classes).cpu().numpy()
    shares = counts / max(counts.sum(), 1)
    hint = (" Without a mask the background is a class too: count it in n_classes or give a mask."
            if no_mask else "")
    notes = []
    if shares.max() > 1 - CLASS_SHARE_WARNING:
        notes.append(f"One class holds {100 * shares.max():.2f} % of the mask voxels: n_classes={n_classes} may be "
                     f"too large for what the image holds (try fewer classes), or the classes differ too little.{hint}")
    elif shares.min() < CLASS_SHARE_WARNING:
        n_small = int((shares < CLASS_SHARE_WARNING).sum())
        notes.append(f"{n_small} class(es) hold less than {100 * CLASS_SHARE_WARNING:g} % of the mask voxels "
                     f"(smallest: {int(counts.min())} voxels): n_classes={n_classes} may be too large for what "
                     f"the image holds (try n_classes={n_classes - n_small}).{hint}")
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=3)
        logger.warning(note)
    return notes


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    s = tuple(float(v) for v in spacing)
    if len(s) != ndim or not all(np.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing must be {ndim} positive numbers in (z, y, x) order, got {spacing!r}.")
    return s


def check_prior_means(prior: Any, n_classes: int, n_channels: int, units: str = "input units") -> np.ndarray | None:
    """Prior class means as a finite (K, C) float array (a 1-D array is fine for one channel), or None."""
    if prior is None:
        return None
    p = np.asarray(prior, dtype=np.float64)
    if p.ndim == 1 and n_channels == 1:
        p = p[:, None]
    if p.shape != (n_classes, n_channels) or not np.isfinite(p).all():
        raise ValueError(
            f"prior_means must be a finite ({n_classes}, {n_channels}) array (one row per class, one column "
            f"per channel, {units}), got shape {p.shape}."
        )
    return p


def _run(data, m, n_classes, method, opts, spacing, prior, dev, seed, progress, start):
    """Normalise, fit on ``dev`` and return (fit in normalised units, centre, scale)."""
    if method in DEEP_METHODS:  # the network needs the image grid
        norm, centre, scale = normalize_channels(data, m)
        x_all = torch.from_numpy(norm).to(dev)
        mask_t = torch.from_numpy(m).to(dev)
        xv = x_all[:, mask_t].T.contiguous()  # (V, C)
    else:
        voxels, centre, scale = normalize_voxels(data, m)
        xv = torch.from_numpy(voxels).to(dev)
    prior_norm = None if prior is None else torch.as_tensor((prior - centre) / scale, dtype=torch.float32, device=dev)
    cancel_event = opts["cancel_event"]

    def report(iteration: int, max_iterations: int, nll: float) -> None:
        if cancel_event is not None and cancel_event.is_set():
            raise SegmentationCancelled("Segmentation cancelled.")
        if progress is not None and progress(iteration, max_iterations, nll, time.perf_counter() - start) is False:
            raise SegmentationCancelled("Segmentation cancelled by the progress callback.")

    def check_cancel() -> None:
        if cancel_event is not None and cancel_event.is_set():
            raise SegmentationCancelled("Segmentation cancelled.")

    generator = torch.Generator().manual_seed(int(seed))
    em_kwargs = dict(
        covariance_type=opts["covariance_type"], reg_covar=float(opts["reg_covar"]), generator=generator,
        means_init=prior_norm, n_init=int(opts["n_init"]), check_cancel=check_cancel,
    )
    if method == "em-gmm":
        fit = em.fit_gmm(xv, n_classes, max_iter=int(opts["max_iter"]), tol=float(opts["tol"]), report=report,
                         **em_kwargs)
        return fit, centre, scale
    if method == "em-svgmm":
        fit = em.fit_svgmm(xv, n_classes, max_iter=int(opts["max_iter"]), tol=float(opts["tol"]), report=report,
                           **em_kwargs)
        return fit, centre, scale

    settings = DeepSettings(**{
        k: opts[k] for k in (f.name for f in dataclasses.fields(DeepSettings)) if k in opts
    })
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(int(seed))
        if opts["model"] is not None:
            from .trained.inference import load_trained_model, predict_with_model  # trained models are optional

            # The final M-step uses the mixture the model was trained for, not the request's defaults.
            _, meta = load_trained_model(opts["model"])
            method = meta.get("method", method)
            settings.covariance_type = meta.get("covariance_type") or settings.covariance_type
            log_resp_full, history = predict_with_model(
                x_all, mask_t, opts["model"], int(opts["fine_tune"]), dev, int(seed),
                lambda i, n, nll: (report(i, n, nll), True)[1], cancel_event,
            )
            n_iter = max(int(opts["fine_tune"]), 1)  # one forward pass counts as one iteration
            fit = _fit_from_log_resp(xv, log_resp_full[:, mask_t].T, method, settings, history, n_iter)
            return fit, centre, scale
        warm = None
        if settings.warm_start == "em":
            # em-gmm's own fit (same starts, same winner), so the deep fit can be held to its NLL
            warm_fit = em.fit_gmm(xv, n_classes, max_iter=EM_DEFAULTS["max_iter"], tol=EM_DEFAULTS["tol"],
                                  report=lambda *_: check_cancel(), **em_kwargs)
            warm = warm_fit.log_resp
        elif settings.warm_start not in ("em", "none"):
            raise ValueError(f"Unknown warm_start {settings.warm_start!r}: use 'em' or 'none'.")
        fit, _ = fit_deep(x_all, mask_t, n_classes, method, settings, spacing=spacing, prior_means=prior_norm,
                          warm_start_log_resp=warm, report=report)
    return fit, centre, scale


def _fit_from_log_resp(xv: torch.Tensor, log_resp: torch.Tensor, method: str, settings: DeepSettings,
                       history: list[float], n_iter: int) -> em.MixtureFit:
    """Closed-form M-step and NLL for responsibilities predicted by a trained network."""
    with torch.no_grad():
        _, nll, (weights, params) = voxel_objective(xv, log_resp, method, settings)
    hist = list(history) + [nll.item()]
    return em.MixtureFit(log_resp, params, weights, hist, n_iter, True)


def _build_result(fit: em.MixtureFit, m: np.ndarray, centre: np.ndarray, scale: np.ndarray, n_classes: int,
                  method: str, opts: dict[str, Any], fixed_identity: bool, dev: torch.device, start: float,
                  notes: list[str]) -> SegmentationResult:
    params: GaussianParameters = fit.params
    means_n = params.means.detach().double().cpu().numpy()
    covs_n = params.covariance_matrices().detach().double().cpu().numpy()
    weights = fit.weights.detach().double().cpu().numpy()
    resp = fit.log_resp.detach().float().exp().cpu().numpy()  # (V, K)
    order = np.arange(n_classes) if fixed_identity else np.argsort(means_n[:, 0], kind="stable")
    means = means_n[order] * scale + centre
    covs = covs_n[order] * np.outer(scale, scale)
    resp = resp[:, order]
    resp /= resp.sum(1, keepdims=True)
    probabilities = np.zeros((n_classes,) + m.shape, dtype=np.float32)
    probabilities[:, m] = resp.T
    labels = np.zeros(m.shape, dtype=np.uint8)
    labels[m] = (resp.argmax(1) + 1).astype(np.uint8)
    public_opts = {k: v for k, v in opts.items() if k != "cancel_event"}
    return SegmentationResult(
        labels=labels, probabilities=probabilities, means=means, covariances=covs, weights=weights[order],
        nll_history=list(fit.nll_history), n_iter=fit.n_iter, device=str(dev), seconds=time.perf_counter() - start,
        method=method, converged=fit.converged, n_classes=n_classes, options=public_opts, notes=notes,
    )


__all__ = [
    "METHODS", "SegmentationCancelled", "SegmentationResult", "check_prior_means", "normalize_channels",
    "resolve_device", "segment", "validate_inputs",
]
