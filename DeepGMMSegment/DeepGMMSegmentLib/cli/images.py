"""Images on disk for the commands: read and put every channel on channel 1's grid, write results.

Reading uses SimpleITK (NIfTI, NRRD, MetaImage, ...); channels 2..N, the mask and the seeds are
resampled onto the first channel's grid by SimpleITK (linear for channels, nearest neighbour for
the label maps: mask and seeds), so
the geometry (origin, spacing, direction) is handled by the library. Writing is staged: every
output goes into a hidden temporary directory beside its target and is moved into place only when
all outputs of a run were written, so a failed or interrupted run leaves no output file behind and
an existing output is always complete.

Every problem raises ``ValueError`` naming the file and the fix; each command maps it to its own
exit code. Phase 2 of issue 13 moves this file to ``cli/images.py``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = [
    "LoadedInputs", "ResultFiles", "StagedOutputs", "channels_image", "check_output_paths", "check_writable",
    "engine_geometry", "label_image", "load_inputs", "probability_image", "read_image", "write_image",
    "write_result",
]

# Geometry that differs by less than this (relative to the spacing) counts as the same grid.
GRID_TOLERANCE = 1e-4
# Prefix of the hidden staging directories (tests and users can recognise leftovers by it).
STAGING_PREFIX = ".deepgmm-segment-"


def _sitk():
    import SimpleITK as sitk  # deferred: `--help` and option errors do not wait for it
    return sitk


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # SimpleITK messages start with a file/line location; the last line says what went wrong.
    return lines[-1] if lines else type(error).__name__


def read_image(path: str, role: str):
    """One scalar 2D or 3D image (SimpleITK); ``role`` (e.g. "channel 2") names it in errors."""
    sitk = _sitk()
    if not os.path.exists(path):
        raise ValueError(f"{role} '{path}' does not exist; check the path")
    if os.path.isdir(path):
        raise ValueError(f"{role} '{path}' is a directory; give an image file (NIfTI, NRRD or MetaImage)")
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as error:
        raise ValueError(f"cannot read {role} '{path}' as an image ({_first_line(error)}); "
                         "use NIfTI (.nii/.nii.gz), NRRD (.nrrd) or MetaImage (.mha)") from None
    if image.GetDimension() not in (2, 3):
        raise ValueError(f"{role} '{path}' has {image.GetDimension()} dimensions; only 2D and 3D images are supported")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{role} '{path}' has {image.GetNumberOfComponentsPerPixel()} components "
                         "per voxel; give one scalar image per channel")
    return image


def _same_grid(image, reference) -> bool:
    if image.GetSize() != reference.GetSize():
        return False
    scale = max(reference.GetSpacing())
    return (np.allclose(image.GetSpacing(), reference.GetSpacing(), rtol=GRID_TOLERANCE, atol=0)
            and np.allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=GRID_TOLERANCE * scale)
            and np.allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=GRID_TOLERANCE))


def _resample_onto(image, reference, interpolator, output_type):
    sitk = _sitk()
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, output_type)


def _field_of_view(image, reference) -> np.ndarray:
    """Boolean (z, y, x) array: which voxels of ``reference`` lie inside ``image``'s extent."""
    sitk = _sitk()
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    ones.CopyInformation(image)
    ones = ones + 1
    # A copy, not a view: a view would outlive the temporary image that owns its buffer.
    return sitk.GetArrayFromImage(_resample_onto(ones, reference, sitk.sitkNearestNeighbor, sitk.sitkUInt8)).astype(bool)


@dataclass
class LoadedInputs:
    """The channels and mask of one run on the grid of channel 1."""

    reference: object                      # the first channel (SimpleITK image): output geometry
    channels: list[np.ndarray]             # float32 arrays on the reference grid, (z, y, x)
    mask: np.ndarray | None                # bool array or None (whole image)
    notes: list[str] = field(default_factory=list)
    seeds: np.ndarray | None = None        # the seed label map's values on the reference grid, or None


def _check_dimension(image, reference, what: str) -> None:
    if image.GetDimension() != reference.GetDimension():
        raise ValueError(f"{what} is {image.GetDimension()}D but channel 1 is {reference.GetDimension()}D; "
                         "all channels and the mask must have the same dimension")


def _channel_on_grid(path: str, number: int, reference, notes: list[str]):
    """(float32 array on the reference grid, field-of-view mask or None) of channel ``number``."""
    sitk = _sitk()
    image = read_image(path, f"channel {number}")
    _check_dimension(image, reference, f"channel {number} '{path}'")
    fov = None
    if not _same_grid(image, reference):
        fov = _field_of_view(image, reference)
        if not fov.any():
            raise ValueError(f"channel {number} '{path}' does not overlap channel 1 in physical space; "
                             "check that the images are co-registered (origin and direction)")
        image = _resample_onto(image, reference, sitk.sitkLinear, sitk.sitkFloat32)
        notes.append(f"resampled channel {number} '{path}' onto the grid of channel 1 (linear interpolation)")
        if fov.all():
            fov = None
        else:
            notes.append(f"channel {number} covers only {fov.mean():.1%} of channel 1; "
                         "voxels outside it are left unsegmented (label 0)")
    return sitk.GetArrayFromImage(image).astype(np.float32, copy=False), fov


def _label_map_on_grid(path: str, role: str, reference, notes: list[str]) -> np.ndarray:
    """The values of a label map (mask, seeds) on the reference grid, resampled nearest neighbour."""
    sitk = _sitk()
    image = read_image(path, role)
    _check_dimension(image, reference, f"{role} '{path}'")
    if not _same_grid(image, reference):
        image = _resample_onto(image, reference, sitk.sitkNearestNeighbor, image.GetPixelID())
        notes.append(f"resampled {role} '{path}' onto the grid of channel 1 (nearest neighbour)")
    return sitk.GetArrayFromImage(image)


def _mask_on_grid(path: str, reference, notes: list[str]) -> np.ndarray:
    mask = _label_map_on_grid(path, "mask", reference, notes) != 0
    if not mask.any():
        raise ValueError(f"mask '{path}' has no non-zero voxel on the grid of channel 1; "
                         "give a mask that marks the region to segment")
    return mask


def load_inputs(channel_paths: Sequence[str], mask_path: str | None, seeds_path: str | None = None) -> LoadedInputs:
    """Read the channels, the mask and the seeds onto channel 1's grid; voxels some channel misses leave the mask.

    The seeds keep their label values (the engine checks them: integer labels 1..L inside the mask).
    """
    sitk = _sitk()
    reference = read_image(channel_paths[0], "channel 1")
    arrays = [sitk.GetArrayFromImage(reference).astype(np.float32, copy=False)]
    notes: list[str] = []
    covered = None  # voxels of the reference grid that every channel covers
    for number, path in enumerate(channel_paths[1:], start=2):
        array, fov = _channel_on_grid(path, number, reference, notes)
        arrays.append(array)
        if fov is not None:
            covered = fov if covered is None else covered & fov
    mask = None if mask_path is None else _mask_on_grid(mask_path, reference, notes)
    seeds = None if seeds_path is None else _label_map_on_grid(seeds_path, "seeds", reference, notes)
    if covered is not None:
        mask = covered if mask is None else mask & covered
        if not mask.any():
            raise ValueError("no voxel lies inside the mask and the field of view of every channel; "
                             "check that the images are co-registered")
    return LoadedInputs(reference, arrays, mask, notes, seeds)


def engine_geometry(reference) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Array shape and (z, y, x)-ordered spacing the engine sees for the reference image.

    A 3D image with a single slice is segmented as 2D (the 3D networks need depth); the results
    are reshaped back to the image's own shape when written.
    """
    size = reference.GetSize()
    spacing = reference.GetSpacing()
    if len(size) == 3 and size[2] == 1:
        return (size[1], size[0]), (spacing[1], spacing[0])
    return tuple(reversed(size)), tuple(reversed(spacing))


# ----------------------------------------------------------------------------- writing


def label_image(labels: np.ndarray, reference):
    """The uint8 label map as a SimpleITK image with exactly the reference's geometry."""
    sitk = _sitk()
    shape = tuple(reversed(reference.GetSize()))
    image = sitk.GetImageFromArray(np.asarray(labels, dtype=np.uint8).reshape(shape))
    image.CopyInformation(reference)
    return image


def probability_image(probabilities: np.ndarray, reference):
    """(K, *spatial) probabilities as a float32 vector image (K components) on the reference's geometry."""
    sitk = _sitk()
    shape = tuple(reversed(reference.GetSize()))
    values = np.asarray(probabilities, dtype=np.float32)
    values = np.moveaxis(values.reshape((values.shape[0],) + shape), 0, -1)
    image = sitk.GetImageFromArray(np.ascontiguousarray(values), isVector=True)
    image.CopyInformation(reference)
    return image


def channels_image(values: np.ndarray, reference):
    """(C, *spatial) float values (a bias field, a corrected image) on the reference's geometry:
    a float32 scalar image for one channel, a C-component vector image for several."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape[0] > 1:
        return probability_image(values, reference)
    sitk = _sitk()
    image = sitk.GetImageFromArray(values[0].reshape(tuple(reversed(reference.GetSize()))))
    image.CopyInformation(reference)
    return image


def write_image(image, path: str, role: str) -> None:
    """Write a SimpleITK image (compressed where the format allows); ``ValueError`` if it cannot be."""
    sitk = _sitk()
    try:
        sitk.WriteImage(image, path, useCompression=True)
    except RuntimeError as error:
        raise ValueError(f"cannot write {role} '{os.path.basename(path)}' ({_first_line(error)}); "
                         "use a NIfTI (.nii.gz), NRRD (.nrrd) or MetaImage (.mha) file name") from None


@dataclass(frozen=True)
class ResultFiles:
    """Where the outputs of one segmentation go; ``None``: not written."""

    labels: str
    probabilities: str | None = None
    bias_field: str | None = None
    corrected: str | None = None

    def paths(self) -> list[str]:
        return [path for path in (self.labels, self.probabilities, self.bias_field, self.corrected) if path]


def write_result(result, reference, files: ResultFiles, staging: StagedOutputs, channels: Sequence[np.ndarray] = ()):
    """Stage every output ``files`` asks for on the reference's geometry; returns the label image.

    A run that corrected no field (``bias_field="detect"`` found none) writes a field of ones and
    the input ``channels`` as the corrected image: the correction it applied was the identity.

    The label map is staged last, so it is moved into place last: its existence marks a
    complete set (the batch mode skips a case whose label map exists).
    """
    if files.probabilities:
        write_image(probability_image(result.probabilities, reference), staging.path_for(files.probabilities),
                    "probabilities")
    field, corrected = result.bias_field, result.corrected
    if field is None and (files.bias_field or files.corrected):
        corrected = np.stack([np.asarray(c, dtype=np.float32).reshape(result.labels.shape) for c in channels])
        field = np.ones_like(corrected)
    for path, values, role in ((files.bias_field, field, "bias field"),
                               (files.corrected, corrected, "corrected image")):
        if path:
            write_image(channels_image(values, reference), staging.path_for(path), role)
    labels = label_image(result.labels, reference)
    write_image(labels, staging.path_for(files.labels), "label map")
    return labels


def check_output_paths(inputs: Sequence[str], outputs: Sequence[tuple[str, str]]) -> None:
    """``ValueError`` when an output (option, path) is a directory, an input, or named twice.

    Inputs are never overwritten, and two outputs never share a file.
    """
    inputs = {os.path.realpath(path) for path in inputs}
    seen: dict[str, str] = {}
    for option, path in outputs:
        if os.path.isdir(path):
            raise ValueError(f"{option} '{path}' is a directory; give a file name")
        real = os.path.realpath(path)
        if real in inputs:
            raise ValueError(f"{option} '{path}' is also an input; choose another output file "
                             "(inputs are never overwritten)")
        if real in seen:
            raise ValueError(f"{option} and {seen[real]} both name '{path}'; give different files")
        seen[real] = option


def _staging_directory(final_path: str) -> str:
    """A new hidden temporary directory beside ``final_path`` (same file system: atomic move)."""
    directory = os.path.dirname(os.path.abspath(final_path))
    if not os.path.isdir(directory):
        raise ValueError(f"output directory '{directory}' does not exist; create it first")
    try:
        return tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
    except OSError as error:
        raise ValueError(f"cannot write into '{directory}' ({error.strerror}); "
                         "choose a writable output directory") from None


class StagedOutputs:
    """Write files into hidden temporary directories beside their targets; commit moves them.

    Writing ``name`` into a private directory (instead of a temporary file name) keeps formats
    with a separate data file (.mhd + .raw, .nhdr + .raw) consistent after the move. Files are
    moved in the order they were staged, so the last one staged marks a complete set.
    """

    def __init__(self) -> None:
        self._staged: list[str] = []  # temporary directories, in the target directories
        self._committed: list[str] = []

    def path_for(self, final_path: str) -> str:
        """Where to write the file that ``commit`` moves to ``final_path``."""
        temporary = _staging_directory(final_path)
        self._staged.append(temporary)
        return os.path.join(temporary, os.path.basename(final_path))

    def commit(self) -> None:
        """Move every staged file into place."""
        for temporary in self._staged:
            directory = os.path.dirname(temporary)
            for name in sorted(os.listdir(temporary)):
                target = os.path.join(directory, name)
                os.replace(os.path.join(temporary, name), target)
                self._committed.append(target)
            os.rmdir(temporary)
        self._staged.clear()
        self._committed.clear()

    def discard(self) -> None:
        """Remove staged files, and outputs already moved if a commit failed half way."""
        for temporary in self._staged:
            shutil.rmtree(temporary, ignore_errors=True)
        for path in self._committed:
            try:
                os.remove(path)
            except OSError:
                pass
        self._staged.clear()
        self._committed.clear()

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Commit when the block succeeded, discard otherwise (also on Ctrl-C)."""
        if kind is None:
            self.commit()
        else:
            self.discard()


def check_writable(path: str, role: str, n_components: int | None, dimension: int) -> None:
    """Fail before the (long) segmentation if ``path`` cannot be written.

    With ``n_components`` a tiny image of that kind is written in the file's format, so an
    extension SimpleITK cannot write is reported now; ``None`` only checks the directory.
    """
    sitk = _sitk()
    probe_directory = _staging_directory(path)
    try:
        if n_components is not None:
            pixel_type = sitk.sitkVectorFloat32 if n_components > 1 else sitk.sitkUInt8
            probe = sitk.Image([2] * dimension, pixel_type, n_components)
            write_image(probe, os.path.join(probe_directory, os.path.basename(path)), role)
    finally:
        shutil.rmtree(probe_directory, ignore_errors=True)
