"""What the console commands share: exit codes, error lines, the options several commands have,
signals, progress bars, threads.

An option that more than one command offers (``--device``, ``--seed``, ``--threads``, ``--quiet``,
``--classes``, the cohort's ``--channels`` / ``--mask-name``, the deep fit's ``--covariance`` /
``--warm-start`` / ``--smoothness`` / ``--precision`` / ``--prior-weight``, and the bias-field
options) is defined once here, in :data:`SHARED_OPTIONS` and :func:`add_bias_field_options`; a
command only chooses its default where they differ.

Progress on a terminal is drawn by tqdm; in a log (not a terminal) the commands write plain lines
instead (one per tenth of a fit, one per training epoch), so a log stays readable without
carriage returns.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
from typing import Any, TextIO

from .. import options

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports it

__all__ = [
    "BIAS_FIELD_ORDERS", "CliError", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "EXIT_USAGE",
    "Interrupts", "ProgressBar", "SHARED_OPTIONS", "Terminated", "TrainingProgressBar", "add_bias_field_options",
    "add_shared_options", "bias_field_option", "non_negative_float", "positive_int", "print_error", "set_threads",
]


class CliError(ValueError):
    """Bad input or options; reported as one line on stderr with exit code 2."""


def print_error(prog: str, message: str, stream: TextIO | None = None) -> int:
    """Write ``prog: error: message`` as one line on stderr; returns :data:`EXIT_USAGE`."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=stream or sys.stderr, flush=True)
    return EXIT_USAGE


def set_threads(threads: int | None) -> None:
    """Let torch use ``threads`` CPU threads (``None``: torch's own choice)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Options several commands share


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def label_mrf_value(text: str) -> float | str:
    """argparse type of --label-mrf: 'off' or a number >= 0."""
    if text.strip().lower() == "off":
        return "off"
    try:
        return non_negative_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'off' or a number >= 0, got {text!r}") from None


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


# name -> (flags, argparse keywords). "{default}" in a help text shows the command's default
# (None: "the method's own"). A command overrides a keyword (default, required, help) by name.
SHARED_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "classes": (("-k", "--classes"), dict(type=int, metavar="K", help="number of tissue classes K (>= 2)")),
    "device": (("--device",), dict(
        default="auto", help="'auto' (GPU if available, else CPU), 'cpu', 'cuda' or 'cuda:N' (default: {default})")),
    "seed": (("--seed",), dict(
        type=int, default=0, help="random seed; the same seed gives the same result on CPU (default: {default})")),
    "threads": (("--threads",), dict(
        type=positive_int, metavar="N", help="number of CPU threads torch may use, per process (default: torch's choice)")),
    "quiet": (("-q", "--quiet"), dict(
        action="store_true", help="print nothing but errors and failed cases (no progress bar, no summary)")),
    "channels": (("--channels",), dict(
        metavar="NAMES", help="comma-separated channel names (case-folder file stems) in channel order")),
    "mask_name": (("--mask-name",), dict(
        default="mask", help="file name (stem) of the masks in a cohort (default: {default})")),
    "covariance": (("--covariance",), dict(
        choices=options.COVARIANCE_TYPES, help="covariance type of the mixture (default: {default})")),
    "prior_weight": (("--prior-weight",), dict(
        type=non_negative_float, metavar="LAMBDA", help="weight of the prior-means penalty (default: {default})")),
    "warm_start": (("--warm-start",), dict(
        choices=options.WARM_STARTS, help="deep methods: 'em' first fits the network to the EM solution "
                                          "(of each image), 'em-head' (per-image fits only) starts the network's "
                                          "output at the smoothed EM solution without that step, 'none' starts "
                                          "from random weights (default: {default})")),
    "smoothness": (("--smoothness",), dict(
        type=non_negative_float, metavar="BETA",
        help="deep methods: weight of the spatial prior that makes neighbouring voxels agree (default: "
             f"for deepsvg chosen from the image's noise, {options.DEFAULT_SMOOTHNESS['deepsvg']:g} on clean images "
             f"and up to {options.MAX_ADAPTIVE_SMOOTHNESS:g} on noisy ones; {options.DEFAULT_SMOOTHNESS['deepg']:g} "
             "for deepg; 0 = the paper's loss, noisier labels; a trained model keeps its own for fine-tuning)")),
    "label_mrf": (("--label-mrf",), dict(
        type=label_mrf_value, metavar="STRENGTH",
        help="deepsvg (per image or a trained model): the labels and probability maps are the fitted model's "
             f"posterior under a Potts prior of this strength per neighbour (default: {options.LABEL_MRF:g}); "
             "'off' = the network's output (docs/thin-structures.md)")),
    "precision": (("--precision",), dict(
        choices=options.PRECISIONS, help="deep methods: the network's arithmetic ('auto': bfloat16 where the "
                                         "hardware computes it natively, about 2x faster; default: "
                                         f"{options.DeepSettings.precision})")),
}


def add_shared_options(parser: argparse.ArgumentParser, *names: str, **overrides: dict[str, Any]) -> None:
    """Add the :data:`SHARED_OPTIONS` ``names`` (and those in ``overrides``) to ``parser``.

    ``overrides`` maps an option's name to the argparse keywords this command changes, e.g.
    ``seed=dict(default=settings.seed)`` or ``classes=dict(required=True)``.
    """
    for name in dict.fromkeys((*names, *overrides)):
        flags, keywords = SHARED_OPTIONS[name]
        keywords = {**keywords, **overrides.get(name, {})}
        default = keywords.get("default")
        keywords["help"] = keywords["help"].format(default="the method's own" if default is None else default)
        parser.add_argument(*flags, **keywords)


# --bias-field-order values: the named ones, then every basis order.
BIAS_FIELD_ORDERS = (*options.BIAS_FIELD_CHOICES, *(str(order) for order in range(options.MAX_BIAS_FIELD_ORDER + 1)))


def add_bias_field_options(parser: argparse.ArgumentParser, cohort: bool = False) -> None:
    """``--bias-field-order``, ``--bias-field FIELD`` and ``--corrected IMAGE`` (docs/bias-field.md).

    ``cohort``: the command also segments cohorts, where the two files are flags naming
    ``<case>_bias_field.nii.gz`` / ``<case>_corrected.nii.gz`` in the output folder.
    """
    parser.add_argument("--bias-field-order", choices=BIAS_FIELD_ORDERS, metavar="{none,auto,detect,0..6}",
                        help="estimate a smooth multiplicative bias field (MR coil inhomogeneity) together "
                             f"with the mixture: 'auto' = always, basis order {options.DEFAULT_BIAS_FIELD_ORDER}; "
                             "'detect' = that order only when the image shows a field (looked for in masks of "
                             f"{options.BIAS_FIELD_DETECTION_MIN_EXTENT_MM:g} mm and more along two axes); or an "
                             f"order 0..{options.MAX_BIAS_FIELD_ORDER}; needs positive intensities (default: "
                             f"{options.DEFAULT_BIAS_FIELD}, or auto with --bias-field / --corrected)")
    files = dict(nargs="?", const=True) if cohort else {}
    in_cohort = "; in a cohort a flag: <case>_{}.nii.gz in the output folder" if cohort else ""
    parser.add_argument("--bias-field", metavar="FIELD", **files,
                        help="estimated multiplicative bias field to write (float32; mean 1 in the mask, "
                             "1 outside; a vector image for several channels)" + in_cohort.format("bias_field"))
    parser.add_argument("--corrected", metavar="IMAGE", **files,
                        help="bias-corrected input to write (float32; input / field; a vector image for "
                             "several channels)" + in_cohort.format("corrected"))


def bias_field_option(args: argparse.Namespace) -> str | int | None:
    """The engine's ``bias_field`` option these arguments ask for (None: the engine's default).

    ``--bias-field`` / ``--corrected`` alone imply ``auto``; with an order that estimates no field
    they are a :class:`CliError`.
    """
    order = args.bias_field_order
    wants_field = bool(args.bias_field or args.corrected)
    if order is None and wants_field:
        order = "auto"
    if order is None:
        return None
    value = int(order) if order.isdigit() else order
    if wants_field and value in ("none", 0):
        raise CliError(f"--bias-field / --corrected need a bias field, but --bias-field-order is {order}; "
                       "drop --bias-field-order or use --bias-field-order auto")
    return value


# --------------------------------------------------------------------------------------------
# Signals


class Terminated(BaseException):
    """SIGTERM arrived; raised like KeyboardInterrupt so staged outputs are cleaned up."""


class Interrupts:
    """Signals received during a run. The handlers raise at once, but Python drops an exception
    raised while a finaliser runs ("Exception ignored in ..."), so the engine also polls
    ``cancel`` (its ``cancel_event``) every iteration: a signal always stops the fit."""

    def __init__(self):
        self.cancel = threading.Event()
        self.terminated = False

    def reset(self) -> None:
        self.cancel.clear()
        self.terminated = False

    def on_interrupt(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self.cancel.set()
        raise KeyboardInterrupt

    def on_terminate(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self.terminated = True
        self.cancel.set()
        raise Terminated()

    def stopped(self) -> BaseException:
        """The exception that ends the run after a cancelled fit."""
        return Terminated() if self.terminated else KeyboardInterrupt()


def _is_terminal(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def _bar(stream: TextIO, total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, file=stream, mininterval=0.1, dynamic_ncols=True, leave=True)


class ProgressBar:
    """Progress of one fit, fed by the engine's ``progress`` callback.

    On a terminal a tqdm bar; otherwise (logs, CI) one line per 10 % of the iterations.
    """

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.interactive = _is_terminal(stream)
        self._bar = None
        self._last_decile = -1

    def __call__(self, iteration: int, max_iterations: int, nll: float, elapsed_seconds: float) -> bool:
        total = max(int(max_iterations), 1)
        if self.interactive:
            if self._bar is None:
                self._bar = _bar(self.stream, total, self.label)
            self._bar.set_postfix_str(f"NLL {nll:.5g}", refresh=False)
            self._bar.update(min(iteration, total) - self._bar.n)
            return True
        decile = int(min(max(iteration / total, 0.0), 1.0) * 10)
        if decile != self._last_decile:
            self._last_decile = decile
            self.stream.write(f"{self.label}: iteration {iteration}/{total}, NLL {nll:.5g}, {elapsed_seconds:.1f} s\n")
            self.stream.flush()
        return True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TrainingProgressBar:
    """One line per epoch; on a terminal also a tqdm bar over the steps of the current epoch."""

    def __init__(self, stream: TextIO, prog: str = "deepgmm-train"):
        self.stream, self.prog = stream, prog
        self.live = _is_terminal(stream)
        self._bar = None

    def __call__(self, info) -> bool:
        if info.end_of_epoch:
            self.close()
            held = "" if info.val_loss is None else f"  held-out {info.val_loss:.4f}"
            star = " *" if info.best_epoch == info.epoch else ""
            self.stream.write(f"{self.prog}: epoch {info.epoch}/{info.max_epochs}  train {info.train_loss:.4f}{held}"
                              f"  ({info.elapsed_seconds:.0f} s){star}\n")
            self.stream.flush()
        elif self.live:
            if self._bar is None or info.step == 1:
                self.close()
                label = f"{self.prog}: " + (f"epoch {info.epoch}" if info.epoch > 0 else "warm-start")
                self._bar = _bar(self.stream, max(info.n_steps, 1), label)
            self._bar.set_postfix_str(f"loss {info.train_loss:.4f}", refresh=False)
            self._bar.update(info.step - self._bar.n)
        return True

    def close(self) -> None:
        """Remove the step bar (the epoch line replaces it)."""
        if self._bar is not None:
            self._bar.leave = False
            self._bar.close()
            self._bar = None
