"""What the console commands share: exit codes, error lines, signals, progress bars, threads.

Progress on a terminal is drawn by tqdm; in a log (not a terminal) the commands write plain lines
instead (one per tenth of a fit, one per training epoch), so a log stays readable without
carriage returns. Phase 2 of issue 13 moves this file to ``cli/common.py``.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports it

__all__ = [
    "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "EXIT_USAGE", "Interrupts", "ProgressBar",
    "Terminated", "TrainingProgressBar", "print_error", "set_threads",
]


def print_error(prog: str, message: str, stream: TextIO | None = None) -> int:
    """Write ``prog: error: message`` as one line on stderr; returns :data:`EXIT_USAGE`."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=stream or sys.stderr, flush=True)
    return EXIT_USAGE


def set_threads(threads: int | None) -> None:
    """Let torch use ``threads`` CPU threads (``None``: torch's own choice)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


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
