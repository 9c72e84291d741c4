"""MNI ICBM152 2009a template (T1, GM, WM) at 1 mm and 2 mm, with a tissue reference.

The template ships inside nilearn's wheel (PyPI), so it is fetched with
``pip download --no-deps nilearn==<version>`` into the repository's ``.cache/`` (PyPI is
the only network this needs) and the three 1 mm maps are extracted from it.  Everything
is cached and idempotent: a second call touches the network not at all.

Reference labels: CSF = 255 - GM - WM (clipped at 0), reference = argmax of (CSF, GM, WM)
inside the brain mask (T1 > 0; the template is already skull-stripped).  Classes are
numbered 1 = CSF, 2 = GM, 3 = WM, i.e. by ascending T1 intensity, 0 outside the brain.

The 2 mm volumes are 2x2x2 block averages (SimpleITK ``BinShrink``) rounded to uint8,
exactly as the bundled ``data/sample/mni152_2009_*_2mm.nii.gz`` (see data/sample/NOTICE.md);
``python benchmarks/mni_data.py --write-sample DIR`` rebuilds those files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache"
NILEARN_VERSION = "0.14.1"
TISSUES = ("t1", "gm", "wm")
CLASS_NAMES = ("CSF", "GM", "WM")
_MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def cache_dir() -> Path:
    """Cache folder: ``$DEEPGMM_CACHE_DIR`` if set, else ``<repo>/.cache``."""
    return Path(os.environ.get("DEEPGMM_CACHE_DIR", DEFAULT_CACHE_DIR))


def nilearn_wheel(cache: Path | None = None) -> Path:
    """Return the path of nilearn's wheel in the cache, downloading it once with pip."""
    cache = Path(cache) if cache is not None else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    existing = sorted(cache.glob(f"nilearn-{NILEARN_VERSION}-*.whl"))
    if existing:
        return existing[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet",
               f"nilearn=={NILEARN_VERSION}", "--dest", str(cache)]
    completed = subprocess.run(command, capture_output=True, text=True)
    existing = sorted(cache.glob(f"nilearn-{NILEARN_VERSION}-*.whl"))
    if completed.returncode != 0 or not existing:
        detail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(
            f"Could not download nilearn {NILEARN_VERSION}'s wheel (it holds the MNI152 template) "
            f"into {cache}: {detail[0]}. Check that PyPI is reachable (pip config, proxy), or put "
            f"nilearn-{NILEARN_VERSION}-py3-none-any.whl into {cache} by hand.")
    return existing[0]


def template_path_1mm(tissue: str, cache: Path | None = None) -> Path:
    """Path of one extracted 1 mm template file (``tissue`` in t1, gm, wm); extracts once."""
    if tissue not in TISSUES:
        raise ValueError(f"Unknown tissue map {tissue!r}; use one of {', '.join(TISSUES)}.")
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / "mni152" / f"mni152_2009_{tissue}_1mm.nii.gz"
    if target.exists():
        return target
    wheel = nilearn_wheel(cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            payload = archive.read(_MEMBER.format(tissue))
    except (zipfile.BadZipFile, KeyError) as error:
        raise RuntimeError(
            f"{wheel} is not a usable nilearn wheel ({error}); delete it and run again to "
            f"download a fresh copy.") from error
    partial = target.with_suffix(".partial")
    partial.write_bytes(payload)
    partial.replace(target)  # atomic: never a half-written cache file
    return target


def _read_1mm(tissue: str, cache: Path | None = None):
    import SimpleITK as sitk
    return sitk.ReadImage(str(template_path_1mm(tissue, cache)))


def _block_average_2mm(image):
    """2x2x2 block average rounded to uint8 (SimpleITK BinShrink averages the blocks)."""
    import SimpleITK as sitk
    shrunk = sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat64), [2, 2, 2])
    rounded = sitk.Cast(sitk.Round(shrunk), sitk.sitkUInt8)
    rounded.CopyInformation(shrunk)
    return rounded


def template_images(resolution_mm: int = 1, cache: Path | None = None, offset_mm: int = 0) -> dict:
    """SimpleITK uint8 images {'t1', 'gm', 'wm'} at 1 or 2 mm (geometry kept).

    ``offset_mm`` (2 mm only): drop that many 1 mm slices at the start of every axis before the block
    average, so the 2 mm grid is shifted (offset 1: the same anatomy, resampled differently).
    """
    if resolution_mm not in (1, 2):
        raise ValueError(f"resolution_mm must be 1 or 2, got {resolution_mm!r}.")
    if offset_mm not in (0, 1) or (offset_mm and resolution_mm != 2):
        raise ValueError(f"offset_mm must be 0, or 1 with resolution_mm=2; got {offset_mm!r}.")
    images = {tissue: _read_1mm(tissue, cache) for tissue in TISSUES}
    if offset_mm:
        images = {tissue: image[offset_mm:, offset_mm:, offset_mm:] for tissue, image in images.items()}
    if resolution_mm == 2:
        images = {tissue: _block_average_2mm(image) for tissue, image in images.items()}
    return images


@dataclasses.dataclass(frozen=True)
class MniVolume:
    """One resolution of the template as numpy arrays in (z, y, x) order."""

    t1: np.ndarray              # float32 T1 intensities (0..255 scale)
    mask: np.ndarray            # bool brain mask, T1 > 0
    reference: np.ndarray       # uint8, 0 outside, 1 CSF, 2 GM, 3 WM
    tissue_maps: np.ndarray     # float32 (3, z, y, x) CSF, GM, WM fractions in [0, 1]
    spacing: tuple              # (sz, sy, sx) in mm
    resolution_mm: int

    @property
    def n_brain_voxels(self) -> int:
        return int(self.mask.sum())


def reference_from_maps(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray):
    """Brain mask, CSF/GM/WM fractions and argmax reference from uint8-scale maps."""
    gm = gm.astype(np.float32)
    wm = wm.astype(np.float32)
    csf = np.clip(255.0 - gm - wm, 0.0, None)
    mask = t1 > 0
    tissue_maps = np.stack([csf, gm, wm]) / 255.0
    reference = np.zeros(t1.shape, dtype=np.uint8)
    # argmax ties go to the first class (CSF < GM < WM), as numpy does
    reference[mask] = (np.argmax(tissue_maps[:, mask], axis=0) + 1).astype(np.uint8)
    return mask, tissue_maps.astype(np.float32), reference


def load_mni(resolution_mm: int = 1, cache: Path | None = None, offset_mm: int = 0) -> MniVolume:
    """T1, brain mask and CSF/GM/WM reference of the MNI152 2009a template at 1 or 2 mm (``offset_mm``: see
    :func:`template_images`)."""
    import SimpleITK as sitk
    images = template_images(resolution_mm, cache, offset_mm)
    arrays = {tissue: sitk.GetArrayFromImage(image) for tissue, image in images.items()}
    mask, tissue_maps, reference = reference_from_maps(arrays["t1"], arrays["gm"], arrays["wm"])
    spacing = tuple(float(s) for s in reversed(images["t1"].GetSpacing()))
    return MniVolume(t1=arrays["t1"].astype(np.float32), mask=mask, reference=reference,
                     tissue_maps=tissue_maps, spacing=spacing, resolution_mm=resolution_mm)


def write_sample(directory: Path, cache: Path | None = None) -> list:
    """Write the 2 mm sample files (T1, GM, WM, brain mask) as in data/sample/."""
    import SimpleITK as sitk
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images = template_images(2, cache)
    written = []
    for tissue, image in images.items():
        path = directory / f"mni152_2009_{tissue}_2mm.nii.gz"
        sitk.WriteImage(image, str(path), useCompression=True)
        written.append(path)
    brain_mask = sitk.Cast(images["t1"] > 0, sitk.sitkUInt8)
    path = directory / "mni152_2009_brainmask_2mm.nii.gz"
    sitk.WriteImage(brain_mask, str(path), useCompression=True)
    written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-sample", metavar="DIR", type=Path,
                        help="write the 2 mm T1/GM/WM/brain-mask files into DIR")
    args = parser.parse_args(argv)
    for resolution in (1, 2):
        volume = load_mni(resolution)
        counts = np.bincount(volume.reference[volume.mask], minlength=4)[1:]
        print(f"{resolution} mm: shape {volume.t1.shape}, {volume.n_brain_voxels} brain voxels, "
              f"reference CSF/GM/WM = {counts.tolist()}")
    if args.write_sample:
        for path in write_sample(args.write_sample):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
