"""The ``deepgmm-train`` command line: train a deep GMM model on a folder or CSV of cases.

``deepgmm-train COHORT --classes K --output model.pt`` reads every case (layouts in
:mod:`.cohort`), trains one network (:func:`.training.train`), writes the model file and a PNG of
the training curve (``model_curve.png`` beside it unless ``--curve`` says otherwise). The same
command runs under ``torchrun --nproc_per_node N -m DeepGMMSegmentLib.cli.train ...`` (or
``torchrun ... $(which deepgmm-train) ...``): each process reads the cohort, takes its share of
every batch, and only rank 0 prints and writes files.

Exit codes: 0 success, 2 bad input or options, 130 interrupted (the best model so far is kept),
1 anything unexpected.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

from .. import options
from .common import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, TrainingProgressBar,  # noqa: F401
                     add_shared_options, print_error, set_threads)

PROG = "deepgmm-train"


def build_parser() -> argparse.ArgumentParser:
    default = options.TrainingSettings()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train one deep Gaussian mixture network (deepSVG / deepG) on many cases, for one-pass "
                    "segmentation of new cases (deepgmm-segment --model, Python segment(model=...), Slicer).",
        epilog="COHORT: a CSV with a header (case,<channel>...,mask), a folder of case folders "
               "(<case>/<channel>.nii.gz + mask.nii.gz) or a flat folder (<case>.nii.gz + <case>_mask.nii.gz). "
               "Distributed: torchrun --nproc_per_node N -m DeepGMMSegmentLib.cli.train COHORT ...",
    )
    parser.add_argument("cohort", metavar="COHORT", help="folder or CSV of training cases")
    add_shared_options(parser, classes=dict(required=True))
    parser.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (.pt)")
    parser.add_argument("-m", "--method", choices=options.DEEP_METHODS, default=default.method,
                        help=f"deep GMM variant (default {default.method})")
    add_shared_options(parser, "channels", "mask_name")
    parser.add_argument("--prior-means", metavar="MEANS",
                        help="class means in normalised units (z-scores inside the mask): 'auto' (EM on the pooled "
                             "training voxels), a .npy/.csv file with K rows and C columns, or classes separated by "
                             "';' with the channel values of a class separated by ',' (e.g. '-1.2; 0.1; 1.0')")
    parser.add_argument("--class-names", metavar="NAMES",
                        help="comma-separated class names in class order, stored in the model and given to its "
                             "output segments (e.g. 'blood,myocardium,edema,scar'; with --prior-means, class k = "
                             "row k)")
    _add_schedule_options(parser, default)
    _add_network_options(parser, default)
    add_shared_options(parser, prior_weight=dict(default=default.prior_weight),
                       smoothness=dict(help="weight of the spatial prior that makes neighbouring voxels agree "
                                            f"(default: {options.DEFAULT_SMOOTHNESS['deepsvg']:g} for deepsvg, "
                                            f"{options.DEFAULT_SMOOTHNESS['deepg']:g} for deepg; 0 = the paper's loss)"),
                       covariance=dict(default=default.covariance_type),
                       warm_start=dict(default=default.warm_start), precision=dict(default=default.precision),
                       device=dict(default=default.device), seed=dict(default=default.seed))
    add_shared_options(parser, "threads")
    parser.add_argument("--curve", metavar="PNG", help="training-curve image (default: <model>_curve.png)")
    add_shared_options(parser, "quiet")
    return parser


def _add_schedule_options(parser: argparse.ArgumentParser, default: options.TrainingSettings) -> None:
    """Epochs, early stopping, batches, learning rate, held-out share, augmentation, patches."""
    parser.add_argument("--epochs", type=int, default=default.max_epochs,
                        help=f"maximum number of epochs (default {default.max_epochs})")
    parser.add_argument("--min-epochs", type=int, default=default.min_epochs,
                        help=f"minimum number of epochs (default {default.min_epochs})")
    parser.add_argument("--patience", type=int, default=default.patience,
                        help=f"stop after this many epochs without held-out improvement (default {default.patience})")
    parser.add_argument("--batch-size", type=int, default=default.batch_size,
                        help=f"cases per optimiser step, all processes (default {default.batch_size})")
    parser.add_argument("--lr", type=float, default=default.learning_rate,
                        help=f"learning rate (AdamW, default {default.learning_rate:g})")
    parser.add_argument("--val-fraction", type=float, default=default.val_fraction,
                        help=f"share of cases held out (default {default.val_fraction:g})")
    parser.add_argument("--no-augment", action="store_true", help="no flips / intensity / noise augmentation")
    parser.add_argument("--patch-size", metavar="SIZE",
                        help="train on random patches of this size, e.g. 32,96,96 (saves memory and time)")


def _add_network_options(parser: argparse.ArgumentParser, default: options.TrainingSettings) -> None:
    """The U-Net's kind, width and depth."""
    parser.add_argument("--network", choices=options.NETWORKS, default=default.network,
                        help=f"U-Net kind (default {default.network})")
    parser.add_argument("--base-width", type=int, default=default.base_width,
                        help=f"filters at full resolution (default {default.base_width})")
    parser.add_argument("--depth", type=int, default=default.depth, help=f"number of poolings (default {default.depth})")


def _settings(args: argparse.Namespace) -> options.TrainingSettings:
    """The training settings a parsed command line asks for."""
    patch = None
    if args.patch_size:
        try:
            patch = tuple(int(v) for v in args.patch_size.split(","))
        except ValueError:
            raise ValueError(f"--patch-size {args.patch_size!r} must be integers separated by commas, e.g. 32,96,96") from None
    return options.TrainingSettings(
        method=args.method, prior_means=parse_prior_means(args.prior_means, args.classes),
        prior_weight=args.prior_weight, covariance_type=args.covariance, network=args.network,
        base_width=args.base_width, depth=args.depth, val_fraction=args.val_fraction, max_epochs=args.epochs,
        min_epochs=args.min_epochs, patience=args.patience, batch_size=args.batch_size, learning_rate=args.lr,
        smoothness=args.smoothness, precision=args.precision, augment=not args.no_augment, patch_size=patch,
        warm_start=args.warm_start, device=args.device, seed=args.seed,
    )


def _read_cohort(args: argparse.Namespace, say):
    """(images, masks, spacing of the first case, channel names) of the cohort."""
    from .cohort import discover_cases, load_case

    names = args.channels.split(",") if args.channels else None
    cases, channel_names = discover_cases(args.cohort, names, args.mask_name)
    if not cases:
        raise ValueError(f"no cases found in {args.cohort!r}")
    images, masks, spacing = [], [], None
    start = time.perf_counter()
    for case in cases:
        try:
            loaded = load_case(case)
        except ValueError as error:
            raise ValueError(f"case {case.case_id!r}: {error}") from None
        images.append(loaded.channels)
        masks.append(loaded.mask)
        spacing = spacing or loaded.spacing
    say(f"read {len(cases)} case(s) with channels {', '.join(channel_names)} in {time.perf_counter() - start:.1f} s")
    return images, masks, spacing, channel_names


def parse_prior_means(text: str | None, n_classes: int):
    """--prior-means: None, "auto", a .npy / .csv file, or rows "a,b; c,d" (:func:`.options.parse_prior_means`)."""
    return options.parse_prior_means(text, n_classes, allow_auto=True, allow_files=True)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    rank0 = _rank() == 0
    say = (lambda text: None) if (args.quiet or not rank0) else (lambda text: print(f"{PROG}: {text}", file=stderr, flush=True))
    if args.classes < 2:
        raise ValueError(f"--classes must be at least 2, got {args.classes}")
    settings = _settings(args)
    class_names = options.check_class_names(args.class_names, args.classes)
    set_threads(args.threads)
    from ..trained.training import TrainingCancelled, train

    images, masks, spacing, channel_names = _read_cohort(args, say)
    progress = TrainingProgressBar(stderr, PROG) if (rank0 and not args.quiet) else None
    try:
        result = train(images, args.classes, masks=masks, settings=settings, channel_names=channel_names,
                       class_names=class_names,
                       spacing=spacing, output=args.output, progress=progress,
                       log=None if progress is not None else (lambda text: say(text)))
    except TrainingCancelled:
        raise KeyboardInterrupt from None
    if rank0:
        curve = Path(args.curve) if args.curve else Path(args.output).with_name(Path(args.output).stem + "_curve.png")
        from .preview import render_curve, write_png

        training = result.metadata["training"]
        write_png(curve, render_curve(result.history, training["best_epoch"]))
        losses = [v for h in result.history for v in (h["train_loss"], h["val_loss"]) if v is not None]
        say(f"{training['status'].replace('_', ' ')} after {training['epochs']} epochs; best epoch "
            f"{training['best_epoch']} (held-out loss {training['best_val_loss'] if training['best_val_loss'] is not None else float('nan'):.4f}); "
            f"{training['seconds']:.0f} s on {training['world_size']} process(es)")
        say(f"wrote {args.output} and {curve} (blue: training loss, orange: held-out loss, grey: best epoch; "
            f"loss axis {min(losses):.3f} .. {max(losses):.3f})")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``deepgmm-train``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return run(args, sys.stdout, sys.stderr)
    except (ValueError, FloatingPointError) as error:
        return print_error(PROG, str(error))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.output} holds the best model so far (if any epoch finished)",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
