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
import signal
import sys
import warnings
from typing import Callable, Sequence, TextIO

import numpy as np

from .. import options
from . import images
from .common import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE,  # noqa: F401
                     CliError, Interrupts, ProgressBar, Terminated, add_bias_field_options,
                     add_shared_options, bias_field_option, non_negative_float, positive_int, print_error,
                     set_threads)

PROG = "deepgmm-segment"

_INTERRUPTS = Interrupts()


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but option errors are one line (no usage block) and exit with code 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``deepgmm-segment`` (also used to document the options)."""
    parser = _ArgumentParser(
        prog=PROG,
        description=(
            "Unsupervised tissue segmentation of one or more co-registered images into K classes "
            "with a deep Gaussian mixture model (deepg, deepsvg) or classic EM (em-gmm, em-svgmm). "
            "Classes are numbered by ascending mean intensity of the first channel "
            "(1 = darkest), unless --prior-means or --seeds fix their order."),
        epilog=(
            "Images: anything SimpleITK reads (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, ...). "
            "Channels 2..N, the mask and the seeds may lie on other grids; they are resampled onto the first "
            "channel's grid (linear for channels, nearest neighbour for the mask and the seeds). Outputs keep the "
            "first channel's geometry exactly. Example: deepgmm-segment t1.nii.gz flair.nii.gz "
            "--mask brain.nii.gz --classes 3 --output labels.nii.gz --probabilities probs.nii.gz "
            "--preview preview.png. With a model from deepgmm-train, see "
            "'deepgmm-segment --model MODEL --help' (one case or a whole cohort)."),
    )
    parser.add_argument("channels", nargs="+", metavar="CHANNEL",
                        help="input image(s), one scalar image per channel (e.g. MR sequences)")
    add_shared_options(parser, classes=dict(help="number of tissue classes K (>= 2); required unless --seeds is "
                                                  "given (default then: the number of seed labels)"))
    parser.add_argument("-m", "--method", choices=options.METHODS, default=options.DEFAULT_METHOD,
                        help=f"segmentation method (default: {options.DEFAULT_METHOD})")
    _add_file_options(parser)
    _add_fit_options(parser)
    add_shared_options(parser, "device", "seed", "threads", "quiet")
    return parser


def _add_file_options(parser: argparse.ArgumentParser) -> None:
    """What the command writes, and the mask it reads."""
    parser.add_argument("-o", "--output", required=True, metavar="LABELS",
                        help="label map to write (uint8; 0 outside the mask, classes 1..K)")
    parser.add_argument("-p", "--probabilities", metavar="PROBS",
                        help="class probabilities to write (float32 vector image, K components)")
    add_bias_field_options(parser)
    parser.add_argument("--mask", metavar="MASK",
                        help="region to segment: every non-zero voxel of this image is modelled; "
                             "voxels outside get label 0 (default: the whole image)")
    parser.add_argument("--seeds", metavar="LABELMAP",
                        help="a few painted voxels per class: label k > 0 marks class k, 0 unmarked "
                             "(labels 1..L, inside the mask). Class k of the output is seed label k, "
                             "classes beyond L are free; the painted voxels keep their class and "
                             "the seed classes' means are the prior means (not with --prior-means)")
    parser.add_argument("--preview", metavar="PNG",
                        help="write a PNG of the orthogonal mid slices with the label overlay")


def _add_fit_options(parser: argparse.ArgumentParser) -> None:
    """The per-image fit's options; unset ones take the method's own default (options.py)."""
    parser.add_argument("--max-iter", type=positive_int, metavar="N",
                        help="maximum number of iterations (default: the method's own)")
    parser.add_argument("--tol", type=non_negative_float, metavar="T",
                        help="stop when the NLL changes less than this (default: the method's own)")
    parser.add_argument("--prior-means", nargs="+", metavar="MEANS",
                        help="expected mean intensity of each class in class order, classes "
                             "separated by ';', the channel values of a class by ',' "
                             "(e.g. --prior-means '30,200; 80,120; 110,60'). Fixes which class is "
                             "which. The old spelling, one word per class (30:200 80:120 110:60), "
                             "still works for this release")
    add_shared_options(parser, "covariance", "prior_weight", "warm_start", "smoothness", "label_mrf", "precision")


def _check_output_paths(args: argparse.Namespace) -> list[tuple[str, str]]:
    outputs = [(option, path) for option, path in (
        ("--output", args.output), ("--probabilities", args.probabilities), ("--bias-field", args.bias_field),
        ("--corrected", args.corrected), ("--preview", args.preview)) if path]
    if args.preview and not args.preview.lower().endswith(".png"):
        raise CliError(f"--preview '{args.preview}' must end in .png")
    try:
        images.check_output_paths([*args.channels, *(path for path in (args.mask, args.seeds) if path)], outputs)
    except ValueError as error:
        raise CliError(str(error)) from None
    return outputs


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def _prior_means(values: Sequence[str] | None, n_classes: int, n_channels: int,
                 stderr: TextIO) -> np.ndarray | None:
    if values is None:
        return None
    text, legacy = options.legacy_prior_means_text(values)
    if legacy:
        message = (f"--prior-means with one word per class is deprecated; write "
                   f"--prior-means '{text.replace(':', ',')}' (';' between classes, ',' between channels)")
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        print(f"{PROG}: warning: {message}", file=stderr, flush=True)
    try:
        return options.parse_prior_means(text, n_classes, n_channels)
    except ValueError as error:
        raise CliError(f"--prior-means: {error}") from None


def _engine_options(args: argparse.Namespace, n_channels: int, stderr: TextIO) -> dict:
    options: dict = {}
    if args.max_iter is not None:
        options["max_iter"] = args.max_iter
    if args.tol is not None:
        options["tol"] = args.tol
    if args.covariance is not None:
        options["covariance_type"] = args.covariance
    prior_means = _prior_means(args.prior_means, args.classes, n_channels, stderr)
    if prior_means is not None:
        options["prior_means"] = prior_means
    if args.prior_weight is not None:
        if prior_means is None and args.seeds is None:
            raise CliError("--prior-weight needs --prior-means or --seeds")
        options["prior_weight"] = args.prior_weight
    for name in ("warm_start", "smoothness", "label_mrf", "precision"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    bias_field = bias_field_option(args)
    if bias_field is not None:
        options["bias_field"] = bias_field
    return options


def _summary(result, n_classes: int, channel_names: Sequence[str]) -> list[str]:
    converged = getattr(result, "converged", None)
    state = "" if converged is None else (", converged" if converged else ", not converged")
    lines = [f"{result.method} on {result.device}: {result.n_iter} iterations in "
             f"{result.seconds:.1f} s{state}"]
    counts = np.bincount(np.asarray(result.labels).ravel(), minlength=n_classes + 1)[1:n_classes + 1]
    fractions = counts / max(int(counts.sum()), 1)
    means = np.asarray(result.means)
    for k in range(n_classes):
        mean_text = ", ".join(f"{name} {means[k, c]:.4g}" for c, name in enumerate(channel_names))
        lines.append(f"  class {k + 1}: {fractions[k]:6.1%} of voxels, mean {mean_text}")
    return lines


def _check_classes(args: argparse.Namespace) -> None:
    if args.seeds and args.prior_means:
        raise CliError("--seeds and --prior-means exclude each other: the seed classes' mean intensities are "
                       "the prior means; drop one of them")
    n_classes = args.classes
    if n_classes is None:
        if args.seeds is None:
            raise CliError("--classes K is required unless --seeds gives the classes")
        return
    if n_classes < 2:
        raise CliError(f"--classes must be at least 2, got {n_classes}")
    if n_classes > 255:
        raise CliError(f"--classes {n_classes} does not fit the uint8 label map; use at most 255")


def _load_and_check(args: argparse.Namespace) -> images.LoadedInputs:
    """Read the inputs, then fail on an unwritable output before the segmentation, not after it."""
    inputs = images.load_inputs(args.channels, args.mask, args.seeds)
    dimension = inputs.reference.GetDimension()
    images.check_writable(args.output, "label map", 1, dimension)
    if args.probabilities:  # K >= 2 in every run: a vector image
        images.check_writable(args.probabilities, "probabilities", args.classes or 2, dimension)
    for path, role in ((args.bias_field, "bias field"), (args.corrected, "corrected image")):
        if path:
            images.check_writable(path, role, len(args.channels), dimension)
    if args.preview:
        images.check_writable(args.preview, "preview", None, dimension)
    return inputs


def _segment(args: argparse.Namespace, inputs: images.LoadedInputs, engine_options: dict, stderr: TextIO):
    shape, spacing = images.engine_geometry(inputs.reference)
    channels = [array.reshape(shape) for array in inputs.channels]
    mask = None if inputs.mask is None else inputs.mask.reshape(shape)
    seeds = None if inputs.seeds is None else inputs.seeds.reshape(shape)
    set_threads(args.threads)
    from .. import SegmentationCancelled, segment  # deferred: the engine loads torch

    progress = None if args.quiet else ProgressBar(stderr, args.method)
    try:
        return segment(channels, args.classes, method=args.method, mask=mask, spacing=spacing, device=args.device,
                       seed=args.seed, progress=progress, seeds=seeds, cancel_event=_INTERRUPTS.cancel,
                       **engine_options)
    except ValueError as error:
        raise CliError(f"--seeds '{args.seeds}': {error}" if args.seeds and "seed" in str(error).lower()
                       else str(error)) from None
    except SegmentationCancelled:
        raise _INTERRUPTS.stopped() from None
    finally:
        if progress is not None:
            progress.close()


def run(args: argparse.Namespace, stderr: TextIO) -> int:
    """Run a parsed command line; raises CliError for bad input."""
    say: Callable[[str], None] = (lambda text: None) if args.quiet else (
        lambda text: print(f"{PROG}: {text}", file=stderr, flush=True))
    _check_classes(args)
    outputs = _check_output_paths(args)
    engine_options = _engine_options(args, len(args.channels), stderr)
    try:
        inputs = _load_and_check(args)
        for note in inputs.notes:
            say(note)
        with images.StagedOutputs() as staging:
            result = _segment(args, inputs, engine_options, stderr)
            _write_outputs(args, inputs, result, staging)
    except CliError:
        raise
    except ValueError as error:  # a file that cannot be read or written
        raise CliError(str(error)) from None
    for note in getattr(result, "notes", None) or []:
        say(note)  # e.g. a CUDA out-of-memory retry on the CPU
    for line in _summary(result, result.n_classes, [f"channel {c + 1}" for c in range(len(args.channels))]):
        say(line)
    say("wrote " + ", ".join(path for _, path in outputs))
    return EXIT_OK


def _write_outputs(args: argparse.Namespace, inputs: images.LoadedInputs, result,
                   staging: images.StagedOutputs) -> None:
    reference = inputs.reference
    files = images.ResultFiles(args.output, args.probabilities, args.bias_field, args.corrected)
    labels = images.write_result(result, reference, files, staging, inputs.channels)
    if args.preview:
        from .preview import write_image_preview

        write_image_preview(staging.path_for(args.preview), reference, labels, result.n_classes)


def _install_signal_handlers() -> dict:
    _INTERRUPTS.reset()
    previous = {}
    try:
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _INTERRUPTS.on_terminate)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _INTERRUPTS.on_interrupt)
    except ValueError:
        pass  # not the main thread (e.g. called from a worker thread): keep the defaults
    return previous


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deepgmm-segment`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else [str(argument) for argument in argv]
    from . import segment_model  # light: imports numpy only until it runs
    if segment_model.wants_model_mode(argv):
        # Trained-model mode (one case or a cohort) has its own options: see segment_model.py.
        return segment_model.main(argv)
    args = build_parser().parse_args(argv)
    previous_handlers = _install_signal_handlers()
    try:
        return run(args, sys.stderr)
    except CliError as error:
        return print_error(PROG, str(error))
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; no output was written", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"\n{PROG}: terminated; no output was written", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    except MemoryError:
        print_error(PROG, "out of memory; use a mask, a smaller image or --method em-gmm")
        return EXIT_FAILURE
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
