"""The ``deepgmm-segment`` command line: segment images on disk with the core engine.

Reads NIfTI / NRRD / MetaImage (anything SimpleITK reads), resamples further channels and the mask
onto the first channel's grid, runs :func:`DeepGMMSegmentLib.segment`, and writes the label map,
the class probabilities and an optional PNG preview with exactly the first channel's geometry.

Exit codes: 0 success, 2 bad input or options (one line on stderr starting with
``deepgmm-segment: error:``), 130 interrupted (Ctrl-C), 1 anything unexpected. Outputs are written
to a temporary directory next to their target and moved into place only after every output was
written, so a failed or interrupted run leaves no output file behind.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, TextIO

import numpy as np

PROG = "deepgmm-segment"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports it

# Kept here (not imported from the engine) so `--help` and option errors do not wait for torch.
_METHOD_CHOICES = ("em-gmm", "em-svgmm", "deepg", "deepsvg")
_DEFAULT_METHOD = "deepsvg"
# Geometry that differs by less than this (relative to the spacing) counts as the same grid.
_GRID_TOLERANCE = 1e-4


class CliError(Exception):
    """Bad input or options; reported as one line on stderr with exit code 2."""


class _Terminated(BaseException):
    """SIGTERM arrived; raised like KeyboardInterrupt so staged outputs are cleaned up."""


class _Interrupts:
    """Signals received during a run. The handlers raise at once, but Python drops an exception
    raised while a finaliser runs ("Exception ignored in ..."), so the engine also polls
    ``cancel`` (its ``cancel_event``) every iteration: a signal always stops the fit."""

    def __init__(self):
        self.cancel = threading.Event()
        self.terminated = False

    def on_interrupt(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self.cancel.set()
        raise KeyboardInterrupt

    def on_terminate(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self.terminated = True
        self.cancel.set()
        raise _Terminated()

    def stopped(self) -> BaseException:
        """The exception that ends the run after a cancelled fit."""
        return _Terminated() if self.terminated else KeyboardInterrupt()


_INTERRUPTS = _Interrupts()


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but option errors are one line (no usage block) and exit with code 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``deepgmm-segment`` (also used to document the options)."""
    parser = _ArgumentParser(
        prog=PROG,
        description=(
            "Unsupervised tissue segmentation of one or more co-registered images into K classes "
            "with a deep Gaussian mixture model (deepg, deepsvg) or classic EM (em-gmm, em-svgmm). "
            "Classes are numbered by ascending mean intensity of the first channel "
            "(1 = darkest), unless --prior-means fixes their order."),
        epilog=(
            "Images: anything SimpleITK reads (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, ...). "
            "Channels 2..N and the mask may lie on other grids; they are resampled onto the first "
            "channel's grid (linear for channels, nearest neighbour for the mask). Outputs keep the "
            "first channel's geometry exactly. Example: deepgmm-segment t1.nii.gz flair.nii.gz "
            "--mask brain.nii.gz --classes 3 --output labels.nii.gz --probabilities probs.nii.gz "
            "--preview preview.png. With a model from deepgmm-train, see "
            "'deepgmm-segment --model MODEL --help' (one case or a whole cohort)."),
    )
    parser.add_argument("channels", nargs="+", metavar="CHANNEL",
                        help="input image(s), one scalar image per channel (e.g. MR sequences)")
    parser.add_argument("-k", "--classes", type=int, required=True, metavar="K",
                        help="number of tissue classes K (>= 2)")
    parser.add_argument("-m", "--method", choices=_METHOD_CHOICES, default=_DEFAULT_METHOD,
                        help=f"segmentation method (default: {_DEFAULT_METHOD})")
    parser.add_argument("-o", "--output", required=True, metavar="LABELS",
                        help="label map to write (uint8; 0 outside the mask, classes 1..K)")
    parser.add_argument("-p", "--probabilities", metavar="PROBS",
                        help="class probabilities to write (float32 vector image, K components)")
    parser.add_argument("--mask", metavar="MASK",
                        help="region to segment: every non-zero voxel of this image is modelled; "
                             "voxels outside get label 0 (default: the whole image)")
    parser.add_argument("--preview", metavar="PNG",
                        help="write a PNG of the orthogonal mid slices with the label overlay")
    parser.add_argument("--device", default="auto",
                        help="'auto' (GPU if available, else CPU), 'cpu', 'cuda' or 'cuda:N' "
                             "(default: auto)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed gives the same result on CPU (default: 0)")
    parser.add_argument("--max-iter", type=_positive_int, metavar="N",
                        help="maximum number of iterations (default: the method's own)")
    parser.add_argument("--tol", type=_non_negative_float, metavar="T",
                        help="stop when the NLL changes less than this (default: the method's own)")
    parser.add_argument("--covariance", choices=("full", "diag"),
                        help="covariance type of the mixture (default: the method's own)")
    parser.add_argument("--prior-means", nargs="+", metavar="MEAN",
                        help="expected mean intensity of each class in class order, one value per "
                             "class; with several channels join the channel values with ':' "
                             "(e.g. --prior-means 30:200 80:120 110:60). Fixes which class is "
                             "which (deep methods)")
    parser.add_argument("--prior-weight", type=_non_negative_float, metavar="LAMBDA",
                        help="weight of the prior-means penalty (default: the method's own)")
    parser.add_argument("--warm-start", choices=("em", "none"),
                        help="deep methods: 'em' first fits the network to the EM solution, "
                             "'none' starts from random weights (default: the method's own)")
    parser.add_argument("--smoothness", type=_non_negative_float, metavar="BETA",
                        help="deep methods: weight of the spatial prior that makes neighbouring voxels "
                             "agree (default: 0.3 for deepsvg, 0 for deepg; 0 = the paper's loss, "
                             "noisier labels)")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"),
                        help="deep methods: the network's arithmetic ('auto': bfloat16 where the "
                             "hardware computes it natively, about 2x faster; default: auto)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="number of CPU threads torch may use (default: torch's choice)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print nothing but errors (no progress bar, no summary)")
    return parser


# --------------------------------------------------------------------------------------------
# Reading and resampling
# --------------------------------------------------------------------------------------------

def _sitk():
    import SimpleITK as sitk  # deferred: only needed once the options are valid
    return sitk


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # SimpleITK messages start with a file/line location; the last line says what went wrong.
    return lines[-1] if lines else type(error).__name__


def _read_image(path: str, role: str):
    sitk = _sitk()
    if not os.path.exists(path):
        raise CliError(f"{role} '{path}' does not exist; check the path")
    if os.path.isdir(path):
        raise CliError(f"{role} '{path}' is a directory; give an image file "
                       "(NIfTI, NRRD or MetaImage)")
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as error:
        raise CliError(f"cannot read {role} '{path}' as an image ({_first_line(error)}); "
                       "use NIfTI (.nii/.nii.gz), NRRD (.nrrd) or MetaImage (.mha)") from None
    if image.GetDimension() not in (2, 3):
        raise CliError(f"{role} '{path}' has {image.GetDimension()} dimensions; "
                       "only 2D and 3D images are supported")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CliError(f"{role} '{path}' has {image.GetNumberOfComponentsPerPixel()} components "
                       "per voxel; give one scalar image per channel")
    return image


def _same_grid(image, reference) -> bool:
    if image.GetSize() != reference.GetSize():
        return False
    scale = max(reference.GetSpacing())
    return (np.allclose(image.GetSpacing(), reference.GetSpacing(), rtol=_GRID_TOLERANCE, atol=0)
            and np.allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0,
                            atol=_GRID_TOLERANCE * scale)
            and np.allclose(image.GetDirection(), reference.GetDirection(), rtol=0,
                            atol=_GRID_TOLERANCE))


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
    return sitk.GetArrayFromImage(
        _resample_onto(ones, reference, sitk.sitkNearestNeighbor, sitk.sitkUInt8)).astype(bool)


@dataclass
class _Inputs:
    reference: object                      # the first channel (SimpleITK image): output geometry
    channels: list[np.ndarray]             # float32 arrays on the reference grid, (z, y, x)
    mask: np.ndarray | None                # bool array or None (whole image)
    notes: list[str] = field(default_factory=list)


def _load_inputs(channel_paths: Sequence[str], mask_path: str | None) -> _Inputs:
    sitk = _sitk()
    reference = _read_image(channel_paths[0], "channel 1")
    arrays = [sitk.GetArrayFromImage(reference).astype(np.float32, copy=False)]
    notes: list[str] = []
    covered = None  # voxels of the reference grid that every channel covers
    for number, path in enumerate(channel_paths[1:], start=2):
        image = _read_image(path, f"channel {number}")
        if image.GetDimension() != reference.GetDimension():
            raise CliError(
                f"channel {number} '{path}' is {image.GetDimension()}D but channel 1 "
                f"'{channel_paths[0]}' is {reference.GetDimension()}D; all channels must have "
                "the same dimension")
        if not _same_grid(image, reference):
            fov = _field_of_view(image, reference)
            if not fov.any():
                raise CliError(
                    f"channel {number} '{path}' does not overlap channel 1 in physical space; "
                    "check that the images are co-registered (origin and direction)")
            image = _resample_onto(image, reference, sitk.sitkLinear, sitk.sitkFloat32)
            notes.append(f"resampled channel {number} '{path}' onto the grid of channel 1 "
                         "(linear interpolation)")
            if not fov.all():
                covered = fov if covered is None else covered & fov
                notes.append(f"channel {number} covers only {fov.mean():.1%} of channel 1; "
                             "voxels outside it are left unsegmented (label 0)")
        arrays.append(sitk.GetArrayFromImage(image).astype(np.float32, copy=False))

    mask = None
    if mask_path is not None:
        image = _read_image(mask_path, "mask")
        if image.GetDimension() != reference.GetDimension():
            raise CliError(
                f"mask '{mask_path}' is {image.GetDimension()}D but channel 1 is "
                f"{reference.GetDimension()}D; give a mask with the channels' dimension")
        if not _same_grid(image, reference):
            image = _resample_onto(image, reference, sitk.sitkNearestNeighbor,
                                   image.GetPixelID())
            notes.append(f"resampled mask '{mask_path}' onto the grid of channel 1 "
                         "(nearest neighbour)")
        mask = sitk.GetArrayFromImage(image) != 0
        if not mask.any():
            raise CliError(f"mask '{mask_path}' has no non-zero voxel on the grid of channel 1; "
                           "give a mask that marks the region to segment")
    if covered is not None:
        mask = covered if mask is None else mask & covered
        if not mask.any():
            raise CliError("no voxel lies inside the mask and the field of view of every channel; "
                           "check that the images are co-registered")
    return _Inputs(reference, arrays, mask, notes)


# --------------------------------------------------------------------------------------------
# Writing (all outputs staged next to their targets, moved into place together)
# --------------------------------------------------------------------------------------------

def _staging_directory(final_path: str) -> str:
    """A new hidden temporary directory beside ``final_path`` (same file system: atomic move)."""
    directory = os.path.dirname(os.path.abspath(final_path))
    if not os.path.isdir(directory):
        raise CliError(f"output directory '{directory}' does not exist; create it first")
    try:
        return tempfile.mkdtemp(prefix=f".{PROG}-", dir=directory)
    except OSError as error:
        raise CliError(f"cannot write into '{directory}' ({error.strerror}); "
                       "choose a writable output directory") from None


class _StagedOutputs:
    """Write files into hidden temporary directories beside their targets; commit moves them.

    Writing ``name`` into a private directory (instead of a temporary file name) keeps formats
    with a separate data file (.mhd + .raw, .nhdr + .raw) consistent after the move.
    """

    def __init__(self) -> None:
        self._staged: list[str] = []  # temporary directories, in the target directories
        self._committed: list[str] = []

    def path_for(self, final_path: str) -> str:
        temporary = _staging_directory(final_path)
        self._staged.append(temporary)
        return os.path.join(temporary, os.path.basename(final_path))

    def commit(self) -> None:
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


def _write_image(image, path: str, role: str) -> None:
    sitk = _sitk()
    try:
        sitk.WriteImage(image, path, useCompression=True)
    except RuntimeError as error:
        raise CliError(f"cannot write {role} '{os.path.basename(path)}' ({_first_line(error)}); "
                       "use a NIfTI (.nii.gz), NRRD (.nrrd) or MetaImage (.mha) file name") from None


def _check_writable(path: str, role: str, n_components: int | None, dimension: int) -> None:
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
            _write_image(probe, os.path.join(probe_directory, os.path.basename(path)), role)
    finally:
        shutil.rmtree(probe_directory, ignore_errors=True)


def _check_output_paths(args: argparse.Namespace) -> list[tuple[str, str]]:
    inputs = {os.path.realpath(path) for path in args.channels}
    if args.mask:
        inputs.add(os.path.realpath(args.mask))
    outputs = [("--output", args.output)]
    if args.probabilities:
        outputs.append(("--probabilities", args.probabilities))
    if args.preview:
        outputs.append(("--preview", args.preview))
        if not args.preview.lower().endswith(".png"):
            raise CliError(f"--preview '{args.preview}' must end in .png")
    seen: dict[str, str] = {}
    for option, path in outputs:
        if os.path.isdir(path):
            raise CliError(f"{option} '{path}' is a directory; give a file name")
        real = os.path.realpath(path)
        if real in inputs:
            raise CliError(f"{option} '{path}' is also an input; choose another output file "
                           "(inputs are never overwritten)")
        if real in seen:
            raise CliError(f"{option} and {seen[real]} both name '{path}'; give different files")
        seen[real] = option
    return outputs


# --------------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------------

class ProgressBar:
    """Text progress bar on a stream, fed by the engine's ``progress`` callback.

    On a terminal the bar is redrawn in place (at most 10 times per second); otherwise (logs, CI)
    one line is written per 10 % of the iterations so the log stays readable.
    """

    def __init__(self, stream: TextIO, label: str, width: int = 30) -> None:
        self.stream = stream
        self.label = label
        self.width = width
        self.interactive = bool(getattr(stream, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._last_decile = -1
        self._drawn = False

    def __call__(self, iteration: int, max_iterations: int, nll: float,
                 elapsed_seconds: float) -> bool:
        total = max(int(max_iterations), 1)
        fraction = min(max(iteration / total, 0.0), 1.0)
        if self.interactive:
            now = time.monotonic()
            if now - self._last_draw < 0.1 and iteration < total:
                return True
            self._last_draw = now
            filled = int(round(fraction * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {iteration}/{total}  NLL {nll:.5g}  "
                              f"{elapsed_seconds:.1f} s ")
            self._drawn = True
        else:
            decile = int(fraction * 10)
            if decile == self._last_decile:
                return True
            self._last_decile = decile
            self.stream.write(f"{self.label}: iteration {iteration}/{total}, NLL {nll:.5g}, "
                              f"{elapsed_seconds:.1f} s\n")
        self.stream.flush()
        return True

    def close(self) -> None:
        if self.interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def _parse_prior_means(values: Sequence[str] | None, n_classes: int,
                       n_channels: int) -> np.ndarray | None:
    if values is None:
        return None
    if len(values) != n_classes:
        raise CliError(f"--prior-means has {len(values)} entries but --classes is {n_classes}; "
                       "give one mean per class")
    rows = []
    for value in values:
        parts = value.split(":")
        if len(parts) != n_channels:
            raise CliError(f"--prior-means entry '{value}' has {len(parts)} value(s) but there "
                           f"are {n_channels} channel(s); join one value per channel with ':'")
        try:
            rows.append([float(part) for part in parts])
        except ValueError:
            raise CliError(f"--prior-means entry '{value}' is not a number") from None
    return np.asarray(rows, dtype=np.float64)


def _engine_options(args: argparse.Namespace, n_channels: int) -> dict:
    options: dict = {}
    if args.max_iter is not None:
        options["max_iter"] = args.max_iter
    if args.tol is not None:
        options["tol"] = args.tol
    if args.covariance is not None:
        options["covariance_type"] = args.covariance
    prior_means = _parse_prior_means(args.prior_means, args.classes, n_channels)
    if prior_means is not None:
        options["prior_means"] = prior_means
    if args.prior_weight is not None:
        if prior_means is None:
            raise CliError("--prior-weight needs --prior-means")
        options["prior_weight"] = args.prior_weight
    for name in ("warm_start", "smoothness", "precision"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def _engine_geometry(reference) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Array shape and (z, y, x)-ordered spacing the engine sees for the reference image.

    A 3D image with a single slice is segmented as 2D (the 3D networks need depth); the results
    are reshaped back to the image's own shape when written.
    """
    size = reference.GetSize()
    spacing = reference.GetSpacing()
    if len(size) == 3 and size[2] == 1:
        return (size[1], size[0]), (spacing[1], spacing[0])
    return tuple(reversed(size)), tuple(reversed(spacing))


def _summary(result, n_classes: int, channel_names: Sequence[str]) -> list[str]:
    labels = np.asarray(result.labels)
    counts = np.bincount(labels.ravel(), minlength=n_classes + 1)[1:n_classes + 1]
    total = max(int(counts.sum()), 1)
    converged = getattr(result, "converged", None)
    state = "" if converged is None else (", converged" if converged else ", not converged")
    lines = [f"{result.method} on {result.device}: {result.n_iter} iterations in "
             f"{result.seconds:.1f} s{state}"]
    means = np.asarray(result.means)
    for k in range(n_classes):
        mean_text = ", ".join(f"{name} {means[k, c]:.4g}" for c, name in enumerate(channel_names))
        lines.append(f"  class {k + 1}: {counts[k] / total:6.1%} of voxels, mean {mean_text}")
    return lines


def run(args: argparse.Namespace, stderr: TextIO) -> int:
    """Run a parsed command line; raises CliError for bad input."""
    say: Callable[[str], None] = (lambda text: None) if args.quiet else (
        lambda text: print(f"{PROG}: {text}", file=stderr, flush=True))

    if args.classes < 2:
        raise CliError(f"--classes must be at least 2, got {args.classes}")
    if args.classes > 255:
        raise CliError(f"--classes {args.classes} does not fit the uint8 label map; use at most 255")
    outputs = _check_output_paths(args)
    options = _engine_options(args, len(args.channels))

    inputs = _load_inputs(args.channels, args.mask)
    for note in inputs.notes:
        say(note)
    # Fail on an unwritable output before the segmentation, not after it.
    dimension = inputs.reference.GetDimension()
    _check_writable(args.output, "label map", 1, dimension)
    if args.probabilities:
        _check_writable(args.probabilities, "probabilities", args.classes, dimension)
    if args.preview:
        _check_writable(args.preview, "preview", None, dimension)

    staging = _StagedOutputs()
    try:
        shape, spacing = _engine_geometry(inputs.reference)
        channels = [array.reshape(shape) for array in inputs.channels]
        mask = None if inputs.mask is None else inputs.mask.reshape(shape)

        if args.threads is not None:
            import torch
            torch.set_num_threads(args.threads)
        from . import SegmentationCancelled, segment  # deferred: the engine loads torch

        progress = None if args.quiet else ProgressBar(stderr, args.method)
        try:
            result = segment(channels, args.classes, method=args.method, mask=mask,
                             spacing=spacing, device=args.device, seed=args.seed,
                             progress=progress, cancel_event=_INTERRUPTS.cancel, **options)
        except ValueError as error:
            raise CliError(str(error)) from None
        except SegmentationCancelled:
            raise _INTERRUPTS.stopped() from None
        finally:
            if progress is not None:
                progress.close()

        _write_outputs(args, inputs.reference, result, staging)
        staging.commit()
    except BaseException:
        staging.discard()
        raise

    for note in getattr(result, "notes", None) or []:
        say(note)  # e.g. a CUDA out-of-memory retry on the CPU
    for line in _summary(result, args.classes, [f"channel {c + 1}" for c in
                                                range(len(args.channels))]):
        say(line)
    say("wrote " + ", ".join(path for _, path in outputs))
    return EXIT_OK


def _write_outputs(args: argparse.Namespace, reference, result, staging: _StagedOutputs) -> None:
    sitk = _sitk()
    image_shape = tuple(reversed(reference.GetSize()))
    labels = np.asarray(result.labels, dtype=np.uint8).reshape(image_shape)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(reference)
    _write_image(label_image, staging.path_for(args.output), "label map")

    if args.probabilities:
        probabilities = np.asarray(result.probabilities, dtype=np.float32)
        probabilities = np.moveaxis(probabilities.reshape((args.classes,) + image_shape), 0, -1)
        probability_image = sitk.GetImageFromArray(np.ascontiguousarray(probabilities),
                                                   isVector=True)
        probability_image.CopyInformation(reference)
        _write_image(probability_image, staging.path_for(args.probabilities), "probabilities")

    if args.preview:
        from .preview import write_preview
        background, label_view = reference, label_image
        if reference.GetDimension() == 3 and reference.GetSize()[2] > 1:
            # Show the views in radiological LPS orientation (superior up) whatever the file's
            # axis order; DICOMOrient only permutes and flips axes, it never resamples.
            background = sitk.DICOMOrient(reference, "LPS")
            label_view = sitk.DICOMOrient(label_image, "LPS")
        background_array = sitk.GetArrayFromImage(background)
        label_array = sitk.GetArrayFromImage(label_view)
        spacing = tuple(reversed(background.GetSpacing()))
        if background_array.ndim == 3 and background_array.shape[0] == 1:
            background_array, label_array, spacing = background_array[0], label_array[0], \
                spacing[1:]
        try:
            write_preview(staging.path_for(args.preview), background_array, label_array,
                          spacing=spacing, n_classes=args.classes)
        except OSError as error:
            raise CliError(f"cannot write preview '{args.preview}' ({error.strerror})") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deepgmm-segment`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else [str(argument) for argument in argv]
    from . import batch  # light: imports numpy only until it runs
    if batch.wants_model_mode(argv):
        # Trained-model mode (one case or a cohort) has its own options: see batch.py.
        return batch.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    previous_handlers = {}
    _INTERRUPTS.cancel.clear()
    _INTERRUPTS.terminated = False
    try:
        previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _INTERRUPTS.on_terminate)
        previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, _INTERRUPTS.on_interrupt)
    except ValueError:
        pass  # not the main thread (e.g. called from a worker thread): keep the defaults
    try:
        return run(args, sys.stderr)
    except CliError as error:
        message = " ".join(str(error).split())
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; no output was written", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except _Terminated:
        print(f"\n{PROG}: terminated; no output was written", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    except MemoryError:
        print(f"{PROG}: error: out of memory; use a mask, a smaller image or --method em-gmm",
              file=sys.stderr, flush=True)
        return EXIT_FAILURE
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
