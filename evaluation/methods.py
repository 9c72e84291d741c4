"""The methods compared, each behind one signature.

``run(name, channels, mask, spacing, n_classes, seed) -> MethodOutput``; ``channels`` is
(C, *spatial) float32, ``mask`` bool.  Heavy libraries are imported lazily by
:func:`prepare` so that a worker process loads only what its method needs (peak memory is
measured against the baseline after :func:`prepare`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINE_DIR = REPO_ROOT / "DeepGMMSegment"
# The modules segment() runs for our methods here (no trained models, CLI or Slicer code): a
# change to one of them can change our figures, a change elsewhere cannot. The vocabulary
# (options, result), the engine and the numerics (core/).
ENGINE_FILES = tuple(f"DeepGMMSegment/DeepGMMSegmentLib/{name}" for name in
                     ("__init__.py", "options.py", "result.py", "engine.py", "core/__init__.py", "core/inputs.py",
                      "core/em.py", "core/gmm.py", "core/deep.py", "core/networks.py", "core/bias_field.py",
                      "core/seeds.py"))


@dataclasses.dataclass
class MethodOutput:
    labels: np.ndarray              # uint8, spatial shape, 0 outside the mask, 1..K inside
    nll: float = float("nan")       # mean NLL per voxel, normalised (z-scored) units
    nll_note: str = ""
    n_iter: int | None = None
    converged: bool | None = None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    label: str                      # how the report names it
    identity_from_method: bool      # class order fixed by the method itself (no matching)
    modules: tuple                  # imported by prepare()
    multichannel: bool = True
    needs_bias_condition: bool = False
    description: str = ""


OURS = ("em-gmm", "em-svgmm", "deepg", "deepsvg", "deepsvg-paper")
# Our methods with the joint bias field (issue 11), {method: its evaluation name with the field}: run
# where a field is, and on the clean image to show what the field model costs where there is none.
BIAS_VARIANTS = {"em-gmm": "em-gmm-bias", "deepsvg": "deepsvg-bias"}
OURS_BIAS = tuple(BIAS_VARIANTS.values())
# evaluation name -> (segment() method, options that define it)
_OUR_VARIANTS = {"deepsvg-paper": ("deepsvg", {"smoothness": 0.0}),
                 **{name: (method, {"bias_field": "auto"}) for method, name in BIAS_VARIANTS.items()}}
ALL_OURS = OURS + OURS_BIAS

SPECS = {spec.name: spec for spec in (
    MethodSpec("em-gmm", "ours: em-gmm", True, ("torch", "DeepGMMSegmentLib"),
               description="DeepGMMSegmentLib.segment, classic EM, full covariance, k-means++ init; "
                           "defaults (a bias field corrected when detected)"),
    MethodSpec("em-svgmm", "ours: em-svgmm", True, ("torch", "DeepGMMSegmentLib"),
               description="DeepGMMSegmentLib.segment, EM for the spatially variant GMM"),
    MethodSpec("deepg", "ours: deepg", True, ("torch", "DeepGMMSegmentLib"),
               description="DeepGMMSegmentLib.segment, deep GMM (global weights), defaults "
                           "(smoothness = 0, no explicit spatial prior)"),
    MethodSpec("deepsvg", "ours: deepsvg", True, ("torch", "DeepGMMSegmentLib"),
               description="DeepGMMSegmentLib.segment, deep SVGMM (per-voxel weights), defaults "
                           "(explicit spatial prior, smoothness chosen from the image's noise: 0.3 to 0.8; a "
                           "bias field corrected when detected: bias_field='detect')"),
    MethodSpec("deepsvg-paper", "ours: deepsvg, β = 0", True, ("torch", "DeepGMMSegmentLib"),
               description="the same with smoothness = 0: the paper's loss, the deep image prior alone"),
    MethodSpec("em-gmm-bias", "ours: em-gmm + bias field", True, ("torch", "DeepGMMSegmentLib"),
               description="em-gmm with bias_field='auto': a smooth multiplicative field estimated "
                           "jointly with the mixture (core/bias_field.py) on every image"),
    MethodSpec("deepsvg-bias", "ours: deepsvg + bias field", True, ("torch", "DeepGMMSegmentLib"),
               description="deepsvg with bias_field='auto' (the joint em-gmm field, then the deep fit "
                           "on the corrected image) on every image"),
    MethodSpec("sklearn-gmm", "scikit-learn GMM", False, ("sklearn.mixture",),
               description="sklearn GaussianMixture(covariance_type='full', random_state=seed), "
                           "k-means init, on the brain voxels"),
    MethodSpec("atropos", "Atropos (no MRF)", True, ("ants",),
               description="ants.atropos(i='kmeans[K]', m='[0,1x1x1]', c='[5,0]'), brain mask"),
    MethodSpec("atropos-mrf", "Atropos + MRF", True, ("ants",),
               description="ants.atropos(i='kmeans[K]', m='[0.2,1x1x1]', c='[5,0]'), brain mask"),
    MethodSpec("n4-gmm", "N4 + scikit-learn GMM", False, ("ants", "sklearn.mixture"),
               needs_bias_condition=True,
               description="ants.n4_bias_field_correction(mask=brain) on channel 1, then the "
                           "scikit-learn GMM above"),
    MethodSpec("n4-atropos-mrf", "N4 + Atropos + MRF", True, ("ants",),
               needs_bias_condition=True,
               description="ants.n4_bias_field_correction(mask=brain) on channel 1, then Atropos + MRF "
                           "above (the ANTs pipeline)"),
    MethodSpec("sitk-kmeans", "SimpleITK k-means", True, ("SimpleITK",), multichannel=False,
               description="sitk.ScalarImageKmeans on the brain voxels, initial means at the "
                           "1/6, 3/6, 5/6 intensity quantiles (for K=3)"),
    MethodSpec("sitk-otsu", "SimpleITK Otsu (2 thresholds)", True, ("SimpleITK",), multichannel=False,
               description="sitk.OtsuMultipleThresholds(K-1 thresholds, 256 bins) on the brain voxels"),
)}


def engine_on_path() -> None:
    """Put this tree's engine first on the import path (not whatever copy is installed)."""
    if str(ENGINE_DIR) not in sys.path:
        sys.path.insert(0, str(ENGINE_DIR))


def engine_revision() -> str:
    """Commit of the tree the engine was imported from, and whether the engine had local edits."""
    def git(*command):
        return subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", *ENGINE_FILES)
    return commit + (" with uncommitted engine edits" if dirty else "")


def prepare(name: str) -> None:
    """Import what method ``name`` needs (so its cost is not counted as the method's)."""
    engine_on_path()
    for module in SPECS[name].modules:
        importlib.import_module(module)


def _labels_from_voxels(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    labels = np.zeros(mask.shape, dtype=np.uint8)
    labels[mask] = values
    return labels


def _voxels(channels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return channels[:, mask].T.astype(np.float64)  # (V, C)


def _ours(name, channels, mask, spacing, n_classes, seed, **options):
    from DeepGMMSegmentLib import segment
    method, defining = _OUR_VARIANTS.get(name, (name, {}))
    result = segment(list(channels), n_classes, method=method, mask=mask, spacing=spacing,
                     device="cpu", seed=seed, **{**options, **defining})
    note = "engine's own final NLL" + (" (per-voxel weights)" if method in ("em-svgmm", "deepsvg") else "")
    return MethodOutput(result.labels, float(result.nll), note, int(result.n_iter), bool(result.converged))


def _sklearn_gmm(x, n_classes, seed):
    from sklearn.mixture import GaussianMixture
    from .metrics import to_normalised_units
    model = GaussianMixture(n_classes, covariance_type="full", random_state=seed).fit(x)
    nll = to_normalised_units(-model.score(x), x)
    return model.predict(x) + 1, nll, int(model.n_iter_), bool(model.converged_)


def _sklearn(name, channels, mask, spacing, n_classes, seed, **options):
    x = _voxels(channels, mask)
    values, nll, n_iter, converged = _sklearn_gmm(x, n_classes, seed)
    return MethodOutput(_labels_from_voxels(values, mask), nll, "global-weight GMM", n_iter, converged)


def _to_ants(array: np.ndarray, spacing):
    import ants
    # ANTs images are (x, y, z); our arrays are (z, y, x)
    return ants.from_numpy(np.ascontiguousarray(array.T), spacing=tuple(reversed(spacing)))


def _atropos(name, channels, mask, spacing, n_classes, seed, **options):
    import ants
    ndim = mask.ndim
    radius = "x".join(["1"] * ndim)
    smoothing = 0.2 if name == "atropos-mrf" else 0.0
    images = [_to_ants(c.astype(np.float32), spacing) for c in channels]
    ants_mask = _to_ants(mask.astype(np.float32), spacing)
    result = ants.atropos(a=images if len(images) > 1 else images[0], x=ants_mask,
                          i=f"kmeans[{n_classes}]", m=f"[{smoothing},{radius}]", c="[5,0]")
    labels = np.ascontiguousarray(result["segmentation"].numpy().T).astype(np.uint8)
    labels[~mask] = 0
    return MethodOutput(labels)


def _n4_corrected(channels, mask, spacing) -> np.ndarray:
    """The channels with channel 1 corrected by N4 inside the mask (the others as they are)."""
    import ants
    corrected = ants.n4_bias_field_correction(_to_ants(channels[0].astype(np.float32), spacing),
                                              mask=_to_ants(mask.astype(np.float32), spacing))
    fixed = channels.copy()
    fixed[0] = np.ascontiguousarray(corrected.numpy().T)
    return fixed


def _n4_atropos(name, channels, mask, spacing, n_classes, seed, **options):
    return _atropos("atropos-mrf", _n4_corrected(channels, mask, spacing), mask, spacing, n_classes, seed)


def _n4_gmm(name, channels, mask, spacing, n_classes, seed, **options):
    x = _voxels(_n4_corrected(channels, mask, spacing), mask)
    values, nll, n_iter, converged = _sklearn_gmm(x, n_classes, seed)
    return MethodOutput(_labels_from_voxels(values, mask), nll,
                        "on the N4-corrected image (not comparable)", n_iter, converged)


def _voxel_image(values: np.ndarray):
    """The brain voxels as a 1-row SimpleITK image: these filters take no mask."""
    import SimpleITK as sitk
    return sitk.GetImageFromArray(values.astype(np.float32)[None, :])


def _sitk_kmeans(name, channels, mask, spacing, n_classes, seed, **options):
    import SimpleITK as sitk
    values = channels[0][mask]
    quantiles = (2 * np.arange(n_classes) + 1) / (2 * n_classes)
    initial = [float(q) for q in np.quantile(values, quantiles)]
    labelled = sitk.ScalarImageKmeans(_voxel_image(values), initial, False)
    order = sitk.GetArrayFromImage(labelled)[0].astype(np.int64)
    return MethodOutput(_labels_from_voxels(order + 1, mask))


def _sitk_otsu(name, channels, mask, spacing, n_classes, seed, **options):
    import SimpleITK as sitk
    values = channels[0][mask]
    labelled = sitk.OtsuMultipleThresholds(_voxel_image(values), n_classes - 1, 0, 256, False)
    classes = sitk.GetArrayFromImage(labelled)[0].astype(np.int64)
    return MethodOutput(_labels_from_voxels(classes + 1, mask))


_RUNNERS = {
    "em-gmm": _ours, "em-svgmm": _ours, "deepg": _ours, "deepsvg": _ours, "deepsvg-paper": _ours,
    "em-gmm-bias": _ours, "deepsvg-bias": _ours,
    "sklearn-gmm": _sklearn, "atropos": _atropos, "atropos-mrf": _atropos, "n4-gmm": _n4_gmm,
    "n4-atropos-mrf": _n4_atropos,
    "sitk-kmeans": _sitk_kmeans, "sitk-otsu": _sitk_otsu,
}


def run(name: str, channels: np.ndarray, mask: np.ndarray, spacing, n_classes: int,
        seed: int = 0, **options) -> MethodOutput:
    """Run method ``name`` on (C, *spatial) ``channels`` inside ``mask``.

    ``options`` go to ``DeepGMMSegmentLib.segment`` for our methods (peers take none).
    """
    if options and name not in ALL_OURS:
        raise ValueError(f"{name} takes no options, got {sorted(options)}.")
    if name not in _RUNNERS:
        raise ValueError(f"Unknown method {name!r}: use one of {', '.join(_RUNNERS)}.")
    if channels.shape[0] > 1 and not SPECS[name].multichannel:
        raise ValueError(f"{name} handles one channel only, got {channels.shape[0]}.")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    return _RUNNERS[name](name, np.asarray(channels, dtype=np.float32), np.asarray(mask, dtype=bool),
                          tuple(spacing), int(n_classes), int(seed), **options)
