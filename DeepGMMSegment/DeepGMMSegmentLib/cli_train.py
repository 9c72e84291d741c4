"""The ``deepgmm-train`` command line: train a deep GMM model on a folder or CSV of cases.

``deepgmm-train COHORT --classes K --output model.pt`` reads every case (layouts in
:mod:`.cohort`), trains one network (:func:`.training.train`), writes the model file and a PNG of
the training curve (``model_curve.png`` beside it unless ``--curve`` says otherwise). The same
command runs under ``torchrun --nproc_per_node N -m DeepGMMSegmentLib.cli_train ...`` (or
``torchrun ... $(which deepgmm-train) ...``): each process reads the cohort, takes its share of
every batch, and only rank 0 prints and writes files.

Exit codes: 0 success, 2 bad input or options, 130 interrupted (the best model so far is kept),
1 anything unexpected.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

PROG = "deepgmm-train"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train one deep Gaussian mixture network (deepSVG / deepG) on many cases, for one-pass "
                    "segmentation of new cases (deepgmm-segment --model, Python segment(model=...), Slicer).",
        epilog="COHORT: a CSV with a header (case,<channel>...,mask), a folder of case folders "
               "(<case>/<channel>.nii.gz + mask.nii.gz) or a flat folder (<case>.nii.gz + <case>_mask.nii.gz). "
               "Distributed: torchrun --nproc_per_node N -m DeepGMMSegmentLib.cli_train COHORT ...",
    )
    parser.add_argument("cohort", metavar="COHORT", help="folder or CSV of training cases")
    parser.add_argument("-k", "--classes", type=int, required=True, metavar="K", help="number of classes K (>= 2)")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (.pt)")
    parser.add_argument("-m", "--method", choices=("deepsvg", "deepg"), default="deepsvg",
                        help="deep GMM variant (default deepsvg)")
    parser.add_argument("--channels", metavar="NAMES",
                        help="comma-separated channel names (case-folder file stems) in channel order")
    parser.add_argument("--mask-name", default="mask", help="file name (stem) of the masks (default: mask)")
    parser.add_argument("--prior-means", metavar="MEANS",
                        help="class means in normalised units (z-scores inside the mask): 'auto' (EM on the pooled "
                             "training voxels), a .npy/.csv file with K rows and C columns, or rows separated by ';' "
                             "with channel values joined by ':' (e.g. '-1.2;0.1;1.0')")
    parser.add_argument("--prior-weight", type=float, default=1.0, metavar="LAMBDA",
                        help="weight of the prior-means penalty (default 1)")
    parser.add_argument("--epochs", type=int, default=100, help="maximum number of epochs (default 100)")
    parser.add_argument("--min-epochs", type=int, default=10, help="minimum number of epochs (default 10)")
    parser.add_argument("--patience", type=int, default=10,
                        help="stop after this many epochs without held-out improvement (default 10)")
    parser.add_argument("--batch-size", type=int, default=4, help="cases per optimiser step, all processes (default 4)")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate (AdamW, default 1e-2)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out (default 0.2)")
    parser.add_argument("--no-augment", action="store_true", help="no flips / intensity / noise augmentation")
    parser.add_argument("--patch-size", metavar="SIZE",
                        help="train on random patches of this size, e.g. 32,96,96 (saves memory and time)")
    parser.add_argument("--warm-start", choices=("em", "none"), default="em",
                        help="first teach the network each case's EM posterior (default em)")
    parser.add_argument("--network", choices=("auto", "2d", "3d"), default="auto", help="U-Net kind (default auto)")
    parser.add_argument("--base-width", type=int, default=8, help="filters at full resolution (default 8)")
    parser.add_argument("--depth", type=int, default=3, help="number of poolings (default 3)")
    parser.add_argument("--covariance", choices=("full", "diag"), default="full", help="covariance type (default full)")
    parser.add_argument("--smoothness", type=float, default=None, metavar="BETA",
                        help="weight of the spatial prior (neighbouring voxels agree); default as deepgmm-segment "
                             "(0.3 for deepsvg, 0 for deepg; 0 = the paper's training loss); stored in the model "
                             "and used when fine-tuning")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="the network's arithmetic (default auto: bfloat16 where the hardware computes it natively)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads per process")
    parser.add_argument("--curve", metavar="PNG", help="training-curve image (default: <model>_curve.png)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return parser


def parse_prior_means(text: str | None, n_classes: int):
    """--prior-means: None, "auto", a .npy / .csv file, or "a:b;c:d" rows. Returns None, "auto" or an array."""
    if text is None or text == "auto":
        return text
    path = Path(text)
    if path.suffix.lower() in (".npy", ".csv"):
        if not path.is_file():
            raise ValueError(f"--prior-means file {text!r} does not exist")
        values = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else np.loadtxt(path, delimiter=",", ndmin=2)
    else:
        try:
            values = np.array([[float(v) for v in row.split(":")] for row in text.split(";") if row.strip()])
        except ValueError:
            raise ValueError(f"--prior-means {text!r} is not 'auto', a file or rows like '-1.2;0.1;1.0'") from None
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    if values.shape[0] != n_classes:
        raise ValueError(f"--prior-means has {values.shape[0]} rows but --classes is {n_classes}: give one row per class")
    return values


class TrainingProgressBar:
    """One line per epoch, and on a terminal a live bar for the steps of the current epoch."""

    def __init__(self, stream: TextIO, width: int = 24):
        self.stream, self.width = stream, width
        self.live = hasattr(stream, "isatty") and stream.isatty()

    def __call__(self, info) -> bool:
        if info.end_of_epoch:
            if self.live:
                self.stream.write("\r\033[K")
            held = "" if info.val_loss is None else f"  held-out {info.val_loss:.4f}"
            star = " *" if info.best_epoch == info.epoch else ""
            self.stream.write(f"{PROG}: epoch {info.epoch}/{info.max_epochs}  train {info.train_loss:.4f}{held}"
                              f"  ({info.elapsed_seconds:.0f} s){star}\n")
        elif self.live:
            done = int(self.width * info.step / max(info.n_steps, 1))
            label = f"epoch {info.epoch}" if info.epoch > 0 else "warm-start"
            self.stream.write(f"\r{PROG}: {label} [{'#' * done}{'.' * (self.width - done)}] "
                              f"step {info.step}/{info.n_steps} loss {info.train_loss:.4f}")
        self.stream.flush()
        return True


def render_curve(history: Sequence[dict], best_epoch: int, size: tuple[int, int] = (320, 480)) -> np.ndarray:
    """RGB image of the training (blue) and held-out (orange) loss per epoch; grey line at the best epoch."""
    height, width = size
    image = np.full((height, width, 3), 255, np.uint8)
    margin = 24
    epochs = [h["epoch"] for h in history]
    series = [([h["train_loss"] for h in history], (31, 119, 180)),
              ([h["val_loss"] for h in history], (255, 127, 14))]
    values = [v for s, _ in series for v in s if v is not None and math.isfinite(v)]
    image[height - margin, margin:width - margin] = (0, 0, 0)  # axes
    image[margin:height - margin + 1, margin] = (0, 0, 0)
    if not epochs or not values:
        return image
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    e_hi = max(max(epochs), 2)

    def to_pixel(epoch, value):
        col = margin + (epoch - 1) / (e_hi - 1) * (width - 2 * margin - 1)
        row = (height - margin) - (value - lo) / (hi - lo) * (height - 2 * margin - 1)
        return row, col

    if best_epoch >= 1:
        _, col = to_pixel(best_epoch, lo)
        image[margin:height - margin, int(round(col))] = (190, 190, 190)
    for ys, colour in series:
        points = [to_pixel(e, v) for e, v in zip(epochs, ys) if v is not None and math.isfinite(v)]
        for (r0, c0), (r1, c1) in zip(points, points[1:] or points):
            n = int(max(abs(r1 - r0), abs(c1 - c0))) * 2 + 2
            rows = np.clip(np.round(np.linspace(r0, r1, n)).astype(int), 0, height - 2)
            cols = np.clip(np.round(np.linspace(c0, c1, n)).astype(int), 0, width - 2)
            for dr in (0, 1):  # two pixels thick
                for dc in (0, 1):
                    image[rows + dr, cols + dc] = colour
    return image


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    rank0 = _rank() == 0
    say = (lambda text: None) if (args.quiet or not rank0) else (lambda text: print(f"{PROG}: {text}", file=stderr, flush=True))
    if args.classes < 2:
        raise ValueError(f"--classes must be at least 2, got {args.classes}")
    prior = parse_prior_means(args.prior_means, args.classes)
    patch = None
    if args.patch_size:
        try:
            patch = [int(v) for v in args.patch_size.split(",")]
        except ValueError:
            raise ValueError(f"--patch-size {args.patch_size!r} must be integers separated by commas, e.g. 32,96,96") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from .cohort import discover_cases, load_case
    from .training import TrainingCancelled, train

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

    progress = TrainingProgressBar(stderr) if (rank0 and not args.quiet) else None
    try:
        result = train(
            images, args.classes, args.method, masks=masks, prior_means=prior, prior_weight=args.prior_weight,
            channel_names=channel_names, spacing=spacing, output=args.output, covariance_type=args.covariance,
            network=args.network, base_width=args.base_width, depth=args.depth, val_fraction=args.val_fraction,
            max_epochs=args.epochs, min_epochs=args.min_epochs, patience=args.patience, batch_size=args.batch_size,
            learning_rate=args.lr, smoothness=args.smoothness, precision=args.precision, augment=not args.no_augment, patch_size=patch, warm_start=args.warm_start,
            device=args.device, seed=args.seed, progress=progress,
            log=None if progress is not None else (lambda text: say(text)),
        )
    except TrainingCancelled:
        raise KeyboardInterrupt from None
    if rank0:
        curve = Path(args.curve) if args.curve else Path(args.output).with_name(Path(args.output).stem + "_curve.png")
        from .preview import write_png

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
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.output} holds the best model so far (if any epoch finished)",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
