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
from typing import Any, Sequence

import numpy as np
import torch

from .core import bias_field, em, gmm, label_mrf, seeds as seeding
from .core.deep import fit_deep
from .core.gmm import GaussianParameters
from .core.inputs import (channel_statistics, check_prior_means, check_spacing, fine_axes, mask_values, noise_level,
                          normalize_channels, normalize_voxels, quantization_steps, resolve_device, validate_seeded_inputs)
from .options import (BIAS_FIELD_FIT_VOXELS, DEEP_METHODS, DEFAULT_SMOOTHNESS, LABEL_MRF_ITER, DeepSettings,
                      EMSettings, adaptive_smoothness, detects_bias_field, is_anchored, label_prior_exponents,
                      resolve_bias_field_order, resolve_loss_grid, resolve_options)
from .result import ProgressCallback, SegmentationCancelled, SegmentationResult

logger = logging.getLogger(__name__)

# A class holding less than this share of the mask voxels is "almost none", more than
# 1 - this share "almost all": K is probably wrong for what the image holds.
CLASS_SHARE_WARNING = 0.001
# Voxels per block where the result's maps are built or counted: nothing of the volume's size is copied.
CHUNK = 1 << 18


# ----------------------------------------------------------------------------- the entry point


def segment(
    channels: Any,
    n_classes: int | None = None,
    method: str = "deepsvg",
    mask: Any = None,
    spacing: Sequence[float] | None = None,
    device: Any = "auto",
    seed: int = 0,
    progress: ProgressCallback | None = None,
    seeds: Any = None,
    **options: Any,
) -> SegmentationResult:
    """Segment co-registered images into ``n_classes`` tissue classes without labels.

    Parameters
    ----------
    channels : array or sequence of arrays
        One image or several co-registered images of one shape, 2D (y, x) or 3D (z, y, x).
    n_classes : int, optional
        Number of classes K (>= 2); required unless ``seeds`` are given (then it defaults to the
        number of seed labels).
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
    seeds : int array, optional
        A few marked voxels per class, on the channels' grid: label k > 0 marks class k, 0 is
        unmarked (labels 1..L without gaps, all inside the mask). Class k of the result is seed
        label k; classes L+1..K (``n_classes`` > L) are free. The seed classes' mean intensities
        are the prior means (so ``prior_means`` cannot be given too), and the marked voxels keep
        their class in every method (hard constraints, see core/seeds.py). Not with ``model``.
    **options
        ``covariance_type`` ("full"/"diag"), ``max_iter``, ``tol``, ``reg_covar`` (each integer
        channel adds its step^2 / 12: core.gmm.covariance_floor), ``prior_means`` ((K, C), input
        units), ``prior_weight``, ``cancel_event``, ``n_init`` (k-means++ starts of
        the EM fit, default 10; every method starts from its winner), ``bias_field`` ("detect", the
        default: corrected when one is found / "none" / "auto" / a basis order 0..6: a smooth
        multiplicative field estimated with the mixture, returned as ``result.bias_field`` with
        ``result.corrected``; docs/bias-field.md); deep methods also ``network``, ``base_width``,
        ``depth``, ``learning_rate``, ``min_iter``, ``warm_start`` ("em"/"em-head"/"none"),
        ``warm_start_iter`` and ``warm_start_learning_rate`` (the distillation of the EM start;
        "auto": options.WARM_START_SCHEDULE), ``coarse_network_voxels``, ``max_network_voxels`` and
        ``full_resolution_iter`` (coarse-to-fine fits of crops above 2^17 voxels; None /
        "auto": options.COARSE_NETWORK_VOXELS / FULL_RESOLUTION_ITER), ``full_resolution_layers``
        (what the fine steps train, "last" / "all"; "auto": options.FULL_RESOLUTION_LAYERS),
        ``loss_grid`` (a crop above ``max_network_voxels``: "network" fits it averaged on the
        network's grid and lifts the fit to the voxels, "voxels" computes the fine phase's loss on
        every voxel; "auto": options.resolve_loss_grid), ``smoothness`` (weight of the spatial prior; deepsvg's
        default comes from the image's noise, 0.3 to 0.8, deepg's is 0; 0 = the paper's loss),
        ``edge_contrast`` (the prior's edge weighting; 0 = every pair alike), ``label_mrf`` (deepsvg's
        labels: the fitted model's posterior under a Potts prior of this strength, default 0.5;
        "off" = the network's output; docs/thin-structures.md), ``precision``
        ("auto"/"float32"/"bfloat16"), ``model``, ``fine_tune``.

    Classes are numbered by ascending mean of the first channel (class 1 = darkest), unless
    ``prior_means`` are given, in which case class k is the k-th prior row, or ``seeds``, in which
    case class k is seed label k (free classes follow, by ascending mean of the first channel).
    A trained model that stores class names returns them as ``result.class_names``.

    Anything the fit had to work around (a skipped training step, a class that emptied, a class
    holding almost all or almost none of the mask) is listed in ``result.notes``, logged and
    warned about (``RuntimeWarning``). A fit that fails numerically raises
    :class:`~DeepGMMSegmentLib.core.gmm.FitError` naming what failed and what to change.
    """
    start = time.perf_counter()
    method = method.lower() if isinstance(method, str) else method
    opts = resolve_options(method, **options)
    data, m, seed_grid, n_classes = validate_seeded_inputs(channels, n_classes, method, mask, seeds,
                                                           prior_means=opts["prior_means"], model=opts["model"])
    spacing_t = check_spacing(spacing, data.ndim - 1)
    prior = check_prior_means(opts["prior_means"], n_classes, data.shape[0])
    # Classes whose identity the request fixes (class k is prior row k / seed label k) come first.
    n_fixed = n_classes if prior is not None else (0 if seed_grid is None else int(seed_grid.max()) + 1)
    if opts["model"] is not None:
        from .trained.inference import check_model_request  # trained models are optional

        meta = check_model_request(opts["model"], n_classes, data.shape[0], data.ndim - 1)
        # A model trained with prior means outputs class k as the k-th prior row.
        n_fixed = n_classes if meta.get("prior_means") else n_fixed
    class_names = None if opts["model"] is None else meta.get("class_names")
    requested = device
    dev = resolve_device(device)
    notes: list[str] = []

    def run(device: torch.device) -> tuple[em.MixtureFit, np.ndarray, np.ndarray, BiasEstimate | None]:
        return _run_explained(data, m, n_classes, method, opts, spacing_t, prior, device, seed, progress, start,
                              seed_grid)

    try:
        fit, centre, scale, bias = run(dev)
    except torch.OutOfMemoryError:
        if not (isinstance(requested, str) and requested.strip().lower() == "auto") or dev.type == "cpu":
            raise
        torch.cuda.empty_cache()
        msg = f"CUDA ran out of memory on {dev}; retrying on the CPU (device='auto')."
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        notes.append(msg)
        dev = torch.device("cpu")
        fit, centre, scale, bias = run(dev)
    data = seed_grid = None  # the input's float32 copy is not needed for the result: free it before the maps
    notes += fit.notes  # warned about already
    result = _build_result(fit, m, centre, scale, n_classes, method, opts, n_fixed, dev, start, notes)
    result.notes += _class_share_notes(result.labels, n_classes, mask is None)
    if bias is not None:
        result.bias_field, result.corrected = bias.field, bias.corrected
        result.notes += _bias_field_note(bias)
    result.class_names = class_names
    return result


def _run_explained(data, m, n_classes, method, opts, spacing, prior, dev, seed, progress, start, seed_grid=None):
    """:func:`_run`, turning a numerical failure into a :class:`gmm.FitError` that says what to change."""
    try:
        return _run(data, m, n_classes, method, opts, spacing, prior, dev, seed, progress, start, seed_grid)
    except gmm.FitError as error:
        raise gmm.FitError(f"The {method} fit with {n_classes} classes failed: {error}") from None
    except torch.linalg.LinAlgError as error:
        raise gmm.FitError(
            f"The {method} fit with {n_classes} classes failed in a linear-algebra step ({error}). Use a larger "
            "reg_covar (e.g. 1e-3), fewer classes, covariance_type='diag', or precision='float32'."
        ) from None


def _class_share_notes(labels: np.ndarray, n_classes: int, no_mask: bool) -> list[str]:
    """Warnings for classes that hold almost none or almost all of the mask voxels (K is probably wrong)."""
    flat = labels.reshape(-1)
    counts = sum(np.bincount(flat[start:start + CHUNK], minlength=n_classes + 1)  # in blocks: no int64 copy
                 for start in range(0, flat.size, CHUNK))[1:n_classes + 1]  # label 0: outside the mask
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


@dataclasses.dataclass
class BiasEstimate:
    """The bias field of a run and what it gives: see :func:`_estimate_bias`."""

    field: np.ndarray  # (C, *spatial) float32, multiplicative, mean 1 in the mask, 1 outside
    corrected: np.ndarray  # (C, *spatial) float32, the input divided by the field
    fit: em.MixtureFit  # the joint GMM fit, normalised by ``centre`` / ``scale`` (corrected-image units)
    centre: np.ndarray
    scale: np.ndarray
    detection: bias_field.FieldDetection | None = None  # bias_field="detect": why the field was corrected


def _estimate_bias(data, m, n_classes, order, opts, spacing, prior, dev, generator, seed, report,
                   steps) -> BiasEstimate:
    """GMM + smooth bias field (core/bias_field.py) on the mask voxels, in the corrected image's units.

    ``steps``: the channels' intensity steps (:func:`quantization_steps`) in input units. A mask of
    more than BIAS_FIELD_FIT_VOXELS voxels has its field estimated on that many of them, drawn at
    random from ``seed``; the mixture is then fitted on every corrected voxel, started from the sample's.
    """
    inside = mask_values(data, m)
    bias_field.check_positive_channels(inside)
    centre, scale = channel_statistics(inside)  # normalize_voxels' z-scores, without the copy
    basis = torch.from_numpy(bias_field.bias_basis(m, order, spacing)).to(dev)
    intensities = torch.from_numpy(np.ascontiguousarray(inside.T)).to(dev)
    pick = bias_field.voxel_sample(basis.shape[0], BIAS_FIELD_FIT_VOXELS, seed)
    sample = None if pick is None else torch.from_numpy(pick).to(dev)
    prior_norm = None if prior is None else torch.as_tensor((prior - centre) / scale, dtype=torch.float32, device=dev)
    centre_t, scale_t = torch.as_tensor(centre, device=dev), torch.as_tensor(scale, device=dev)
    reg_covar = gmm.covariance_floor(opts["reg_covar"], steps / scale)
    joint = bias_field.fit_mixture_with_bias(
        intensities if sample is None else intensities[sample], basis if sample is None else basis[sample],
        n_classes, centre=centre_t, scale=scale_t, generator=generator,
        covariance_type=opts["covariance_type"], reg_covar=reg_covar,
        tol=float(opts["tol"]), means_init=prior_norm, n_init=int(opts["n_init"]), report=report)
    log_bias_t = bias_field.log_field(basis, joint.coefficients)
    fit = dataclasses.replace(joint.mixture, nll_history=list(joint.nll_history), n_iter=max(joint.n_outer, 1),
                              converged=joint.converged)
    if sample is not None:  # the mixture of every corrected voxel, from the sample's
        rounds = fit.n_iter  # progress continues after the sample's rounds
        z = bias_field.corrected_voxels(intensities, log_bias_t, centre_t, scale_t)
        full = em.fit_gmm(z, n_classes, covariance_type=opts["covariance_type"], reg_covar=reg_covar,
                          tol=float(opts["tol"]), max_iter=EMSettings().max_iter, generator=generator,
                          init=(torch.log(joint.mixture.weights), joint.mixture.params), compress=False,
                          report=lambda i, total, nll: report(rounds + i, rounds + total, nll))
        fit = dataclasses.replace(full, nll_history=fit.nll_history + full.nll_history,
                                  n_iter=rounds + full.n_iter, converged=joint.converged and full.converged,
                                  notes=fit.notes + full.notes)
    log_bias = log_bias_t.cpu().numpy()
    field = bias_field.field_image(m, log_bias)
    # The mixture models I * exp(-log_bias); the corrected image is I / field = that times the
    # field's mean gain in the mask, so the same gain turns the mixture into corrected-image units.
    gain = np.exp(log_bias).mean(0)
    return BiasEstimate(field, bias_field.apply_bias(data, m, field), fit, centre * gain, scale * gain)


def _bias_field_note(bias: BiasEstimate | None) -> list[str]:
    """What ``bias_field="detect"`` did, when it corrected a field (the user did not ask for one explicitly)."""
    if bias is None or bias.detection is None:
        return []
    return [f"bias_field='detect': {bias.detection.reason} (bias_field='none' turns this off, 'auto' always "
            "corrects)."]


def _run(data, m, n_classes, method, opts, spacing, prior, dev, seed, progress, start, seed_grid=None):
    """Normalise, fit on ``dev`` and return (fit in normalised units, centre, scale, bias estimate or None).

    With a bias field, em-gmm is the joint fit itself (unless seeds constrain it); the other
    methods run on the corrected image.
    """
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
    steps = quantization_steps(data, m)  # of the input: a corrected image is no longer on its steps
    bias = None
    order = resolve_bias_field_order(opts["bias_field"])
    detection = None
    if order > 0 and detects_bias_field(opts["bias_field"]):
        detection = bias_field.detect_bias_field(data, m, n_classes, spacing=spacing, seed=int(seed), order=order,
                                                 covariance_type=opts["covariance_type"],
                                                 reg_covar=float(opts["reg_covar"]))
        logger.info("bias_field='detect': %s", detection.reason)
        check_cancel()
        order = order if detection.detected else 0
    if order > 0:
        bias = _estimate_bias(data, m, n_classes, order, opts, spacing, prior, dev, generator, int(seed),
                              report if method == "em-gmm" else lambda *_: check_cancel(), steps)
        bias.detection = detection
        if method == "em-gmm" and seed_grid is None:
            return bias.fit, bias.centre, bias.scale, bias
        data = bias.corrected
    noise = None
    labels_by_posterior = _labels_by_posterior(method, opts)
    if method in DEEP_METHODS:  # the network needs the image grid
        norm, centre, scale = normalize_channels(data, m)
        per_image_deepsvg = method == "deepsvg" and opts["model"] is None
        if per_image_deepsvg or labels_by_posterior:
            # chooses the default smoothness, the labels' prior and the loss grid of a pooled network
            # (0.14 s on the 1 mm brain: cheaper than deciding whether an explicit option makes it unneeded)
            noise = noise_level(norm, m, spacing)
            logger.info("Noise level %.3f (least noisy channel, z-units).", noise)
        if per_image_deepsvg:
            opts["loss_grid"] = resolve_loss_grid(opts["loss_grid"], method, noise)
        if opts["smoothness"] is None and opts["model"] is None:  # deepsvg's default
            opts["smoothness"] = _default_smoothness(noise, is_anchored(prior, seed_grid))
        x_all = torch.from_numpy(norm).to(dev)
        mask_t = torch.from_numpy(m).to(dev)
        xv = x_all[:, mask_t].T.contiguous()  # (V, C)
    else:
        voxels, centre, scale = normalize_voxels(data, m)
        xv = torch.from_numpy(voxels).to(dev)
    prior_norm = None if prior is None else torch.as_tensor((prior - centre) / scale, dtype=torch.float32, device=dev)
    means_init, fixed = prior_norm, None
    if seed_grid is not None:
        prior_norm, means_init, fixed = _seed_start(xv, seed_grid, m, n_classes, generator)
    floor = gmm.covariance_floor(opts["reg_covar"], steps / scale)
    em_kwargs = dict(
        covariance_type=opts["covariance_type"], reg_covar=floor, generator=generator,
        means_init=means_init, n_init=int(opts["n_init"]), check_cancel=check_cancel, fixed_labels=fixed,
    )
    if method == "em-gmm":
        fit = em.fit_gmm(xv, n_classes, max_iter=int(opts["max_iter"]), tol=float(opts["tol"]), report=report,
                         **em_kwargs)
        return fit, centre, scale, bias
    if method == "em-svgmm":
        fit = em.fit_svgmm(xv, n_classes, max_iter=int(opts["max_iter"]), tol=float(opts["tol"]), report=report,
                           **em_kwargs)
        return fit, centre, scale, bias

    settings = DeepSettings(**{f.name: opts[f.name] for f in dataclasses.fields(DeepSettings) if f.name in opts})
    settings = dataclasses.replace(settings, reg_covar=floor)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(int(seed))
        if opts["model"] is not None:
            from .trained.inference import fit_with_model  # trained models are optional

            fit = fit_with_model(x_all, mask_t, opts["model"], int(opts["fine_tune"]), dev, int(seed), report,
                                 spacing=spacing)
        else:
            warm = None
            if settings.warm_start != "none":
                # em-gmm's own fit (same starts, same winner), so the deep fit can be held to its NLL
                em_defaults = EMSettings()
                warm_fit = em.fit_gmm(xv, n_classes, max_iter=em_defaults.max_iter, tol=em_defaults.tol,
                                      report=lambda *_: check_cancel(), **em_kwargs)
                warm = warm_fit.log_resp
            fit, _ = fit_deep(x_all, mask_t, n_classes, method, settings, spacing=spacing, prior_means=prior_norm,
                              warm_start_log_resp=warm, report=report,
                              fixed_labels=None if seed_grid is None else torch.from_numpy(seed_grid).long().to(dev))
    if labels_by_posterior:
        fit = _labels_under_mrf(fit, xv, mask_t, spacing, float(settings.label_mrf), label_prior_exponents(noise),
                                fixed)
    return fit, centre, scale, bias


def _labels_by_posterior(method: str, opts: dict[str, Any]) -> bool:
    """Whether the labels come from the fitted deepsvg model's posterior (``label_mrf``), per-image or trained:
    the model file's method decides for a trained model."""
    if opts.get("label_mrf", "off") == "off":  # the EM methods have no such option
        return False
    if opts["model"] is not None:
        from .trained.inference import load_trained_model  # trained models are optional

        return load_trained_model(opts["model"])[1]["method"] == "deepsvg"
    return method == "deepsvg"


def _labels_under_mrf(fit: em.MixtureFit, xv: torch.Tensor, mask: torch.Tensor, spacing, strength: float,
                      exponents: tuple[float, float], fixed: torch.Tensor | None) -> em.MixtureFit:
    """deepsvg's fit with its responsibilities replaced by the fitted model's posterior under a Potts
    prior (core.label_mrf; options.LABEL_MRF has the measurements)."""
    log_q, note = label_mrf.relabel(fit.log_resp, fit.weights, fit.params, xv, mask,
                                    fine_axes(tuple(mask.shape), spacing), strength, exponents, LABEL_MRF_ITER, fixed)
    if note is not None:
        logger.info(note)
        return dataclasses.replace(fit, notes=[*fit.notes, note])
    return dataclasses.replace(fit, log_resp=log_q)


def _default_smoothness(noise: float | None, anchored: bool) -> float:
    """deepsvg's spatial-prior weight when the request gives none: from the image's ``noise``, unless
    prior means or seeds anchor the classes (then the constant ``DEFAULT_SMOOTHNESS``).

    Measured on the cardiac phantom (docs/thin-structures.md, "Smoothness from the noise"): the
    noise-chosen weight (about 0.5 there) helped the free fit and lowered the anchored ones.
    """
    if anchored or noise is None:
        return DEFAULT_SMOOTHNESS["deepsvg"]
    smoothness = adaptive_smoothness(noise)
    logger.info("Smoothness %.3f from the noise level.", smoothness)
    return smoothness


def _seed_start(xv: torch.Tensor, seed_grid: np.ndarray, m: np.ndarray, n_classes: int, generator: torch.Generator):
    """(prior means (L, C), starting means (K, C), fixed labels (V,)) of a seeded run, in normalised units."""
    fixed = torch.from_numpy(seed_grid[m]).long().to(xv.device)
    n_seed = int(seed_grid.max()) + 1
    prior = seeding.class_means(xv, fixed, n_seed)
    centres = None if n_classes == n_seed else em.kmeans_plus_plus(xv, n_classes, generator)
    return prior, seeding.initial_means(prior, n_classes, centres), fixed


def _build_result(fit: em.MixtureFit, m: np.ndarray, centre: np.ndarray, scale: np.ndarray, n_classes: int,
                  method: str, opts: dict[str, Any], n_fixed: int, dev: torch.device, start: float,
                  notes: list[str]) -> SegmentationResult:
    """The result in input units; classes 1..n_fixed keep their order, the rest by ascending mean of channel 1."""
    params: GaussianParameters = fit.params
    means_n = params.means.detach().double().cpu().numpy()
    covs_n = params.covariance_matrices().detach().double().cpu().numpy()
    weights = fit.weights.detach().double().cpu().numpy()
    order = np.concatenate([np.arange(n_fixed), n_fixed + np.argsort(means_n[n_fixed:, 0], kind="stable")])
    probabilities, labels = _probability_maps(fit.log_resp.detach(), order, m)
    public_opts = {k: v for k, v in opts.items() if k != "cancel_event"}
    return SegmentationResult(
        labels=labels, probabilities=probabilities, means=means_n[order] * scale + centre,
        covariances=covs_n[order] * np.outer(scale, scale), weights=weights[order],
        nll_history=list(fit.nll_history), n_iter=fit.n_iter, device=str(dev), seconds=time.perf_counter() - start,
        method=method, converged=fit.converged, n_classes=n_classes, options=public_opts, notes=notes,
    )


def _probability_maps(log_resp: torch.Tensor, order: np.ndarray, m: np.ndarray,
                      chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (K, *spatial) float32, labels uint8) of log responsibilities (V, K) in class ``order``.

    Built a block of the grid at a time (``chunk`` voxels, C order, as the mask's voxels are), so
    nothing of size (V, K) is made beside the maps themselves, the result's largest part (104 MB for
    K = 3 on a 1 mm head). Each voxel's probabilities are renormalised to sum to 1 in float32; its
    label is the first class of largest probability.
    """
    n_classes = len(order)
    probabilities = np.zeros((n_classes,) + m.shape, dtype=np.float32)
    labels = np.zeros(m.shape, dtype=np.uint8)
    flat_mask, flat_probabilities, flat_labels = m.reshape(-1), probabilities.reshape(n_classes, -1), labels.reshape(-1)
    columns = torch.as_tensor(order, device=log_resp.device)
    first = 0  # the block's first row of log_resp
    for start in range(0, flat_mask.size, chunk):
        inside = flat_mask[start:start + chunk]
        n = int(np.count_nonzero(inside))
        if n == 0:
            continue
        block = log_resp[first:first + n].index_select(1, columns).float().exp().cpu().numpy()  # (n, K)
        first += n
        block /= block.sum(1, keepdims=True)
        flat_probabilities[:, start:start + chunk][:, inside] = block.T
        flat_labels[start:start + chunk][inside] = block.argmax(1) + 1
    return probabilities, labels


__all__ = ["SegmentationCancelled", "SegmentationResult", "segment"]
