"""Worker process: runs the core engine on a job folder and reports on stdout.

Started by :mod:`DeepGMMSegmentLib.slicer_adapter.runner` with the running Python (``PythonSlicer`` inside
Slicer) as ``python worker.py <jobFolder>``, so the heavy torch work never blocks Slicer's GUI
and a cancel can end the whole process. It needs only numpy, torch and the core engine, never
``slicer``.

Job folder (written by the runner, read here):
  ``job.json``   ``{"numberOfClasses", "method", "device", "seed", "spacing", "options"}``
  ``input.npz``  ``channels`` (C, z, y, x) float32, optionally ``mask`` (z, y, x) bool and ``seeds``
                 (z, y, x) uint8 (the engine's ``seeds``: k marks class k, 0 unmarked)
Results (written here), the fields of :class:`DeepGMMSegmentLib.result.SegmentationResult` (the
one result type of a run; the runner rebuilds it from these two files):
  ``result.npz`` ``labels``, ``probabilities``, ``means``, ``covariances``, ``weights``, ``nll_history``
                 (and ``bias_field``, ``corrected`` when the run estimated a bias field)
  ``result.json`` ``{"n_iter", "device", "seconds", "method", "converged", "n_classes", "options", "notes",
                 "class_names"}`` (class_names: a trained model's class names, or null)
  ``error.json`` ``{"type", "message", "traceback"}`` when the engine failed

Every stdout line starting with :data:`MESSAGE_PREFIX` is a JSON event:
  ``{"event": "stage", "stage": "loading" | "fitting" | "saving"}``
  ``{"event": "progress", "iteration", "maxIterations", "nll", "elapsedSeconds"}``
  ``{"event": "done"}`` / ``{"event": "error", "type", "message"}`` / ``{"event": "cancelled"}``
Exit codes: :data:`EXIT_OK`, :data:`EXIT_ERROR`, :data:`EXIT_CANCELLED`.

Progress events are throttled to at most one per :data:`PROGRESS_INTERVAL_SECONDS` (plus the
first and the last iteration). Inside Slicer the parent's reader thread only gets the GIL while
Slicer runs Python code, so one line per iteration of a fast EM fit would fill the pipe and slow
the worker down; 10 lines a second is all a progress bar can show.

When the parent is gone (Slicer crashed or was killed), writing the next event fails with a
broken pipe; the fit is then cancelled, so no worker outlives Slicer by more than one iteration.

``python worker.py --devices`` prints one ``{"event": "devices", ...}`` line (see
:func:`deviceFacts`): the GPU question is answered here, so torch and CUDA are never initialised
in Slicer's GUI process.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Callable

MESSAGE_PREFIX = "DEEPGMMSEGMENT "
EXIT_OK = 0
EXIT_ERROR = 2
EXIT_CANCELLED = 3

JOB_FILE = "job.json"
INPUT_FILE = "input.npz"
RESULT_FILE = "result.npz"
RESULT_INFO_FILE = "result.json"
ERROR_FILE = "error.json"
DEVICES_OPTION = "--devices"

#: Shortest time between two progress events (seconds).
PROGRESS_INTERVAL_SECONDS = 0.1

_parentGone = False


def emit(event: str, **fields) -> bool:
    """Print one machine-readable event line and flush it at once (the parent reads it live).

    Returns False once the parent has closed the pipe (it crashed or was killed)."""
    global _parentGone
    if _parentGone:
        return False
    fields["event"] = event
    try:
        sys.stdout.write(MESSAGE_PREFIX + json.dumps(fields) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError):  # OSError: Windows reports a closed pipe as EINVAL
        _parentGone = True
        # Nothing can be printed any more; route stdout to the null device so that the
        # interpreter's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return False
    return True


class ProgressThrottle:
    """Decides which iterations are reported: the first, the last, and then at most one per
    ``intervalSeconds`` (``clock`` is injectable for tests)."""

    def __init__(self, intervalSeconds: float = PROGRESS_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.intervalSeconds = intervalSeconds
        self.clock = clock
        self._lastReport: float | None = None

    def due(self, iteration: int, maxIterations: int) -> bool:
        now = self.clock()
        if (self._lastReport is None or iteration >= maxIterations
                or now - self._lastReport >= self.intervalSeconds):
            self._lastReport = now
            return True
        return False


def _plainJson(value):
    """JSON for what ``json`` cannot write itself (numpy arrays and scalars in the result's options)."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _writeJson(path: str, data: dict) -> None:
    temporaryPath = path + ".partial"
    with open(temporaryPath, "w", encoding="utf-8") as file:
        json.dump(data, file, default=_plainJson)
    os.replace(temporaryPath, path)


def moduleFolder() -> str:
    """The Slicer module folder that holds the ``DeepGMMSegmentLib`` package this file belongs to
    (``<moduleFolder>/DeepGMMSegmentLib/slicer_adapter/worker.py``). The runner puts it first on the
    worker's ``PYTHONPATH`` and the worker first on ``sys.path``, so the worker imports this copy
    of the package, never another installed one. Defined here because the worker runs as a script
    and cannot import the package before it knows this folder."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def runJob(jobFolder: str) -> int:
    """Run the job in ``jobFolder``; returns the process exit code."""
    emit("stage", stage="loading")
    try:
        with open(os.path.join(jobFolder, JOB_FILE), encoding="utf-8") as file:
            job = json.load(file)
        import numpy as np

        # The module folder comes first so this copy of the package is used, not another install.
        if moduleFolder() not in sys.path:
            sys.path.insert(0, moduleFolder())
        from DeepGMMSegmentLib import SegmentationCancelled, segment

        with np.load(os.path.join(jobFolder, INPUT_FILE)) as data:
            channels = [np.asarray(channel) for channel in data["channels"]]
            mask = np.asarray(data["mask"]) if "mask" in data.files else None
            # Passed only when given, like every option the job does not set.
            seeds = {"seeds": np.asarray(data["seeds"])} if "seeds" in data.files else {}
    except Exception as error:  # noqa: BLE001 - everything is reported to the parent
        return _reportError(jobFolder, error)

    throttle = ProgressThrottle()
    skipped = []  # the newest report the throttle held back (sent when the fit ends early)

    def progress(iteration, maxIterations, nll, elapsedSeconds):
        report = {"iteration": int(iteration), "maxIterations": int(maxIterations),
                  "nll": None if nll is None else float(nll), "elapsedSeconds": float(elapsedSeconds)}
        if not throttle.due(iteration, maxIterations):
            skipped[:] = [report]
            return not _parentGone
        skipped.clear()
        # False (parent gone) makes the engine raise SegmentationCancelled: the worker ends.
        return emit("progress", **report)

    options = dict(job.get("options") or {})
    if options.get("prior_means") is not None:
        options["prior_means"] = np.asarray(options["prior_means"], dtype=float)
    emit("stage", stage="fitting")
    try:
        result = segment(
            channels if len(channels) > 1 else channels[0],
            int(job["numberOfClasses"]),
            method=job["method"],
            mask=mask,
            spacing=tuple(job["spacing"]) if job.get("spacing") else None,
            device=job.get("device", "auto"),
            seed=int(job.get("seed", 0)),
            progress=progress,
            **seeds,
            **options,
        )
    except SegmentationCancelled:
        emit("cancelled")
        return EXIT_CANCELLED
    except Exception as error:  # noqa: BLE001 - everything is reported to the parent
        return _reportError(jobFolder, error)

    if skipped:  # converged before the next due report: the last iteration is still shown
        emit("progress", **skipped[0])
    emit("stage", stage="saving")
    try:
        resultPath = os.path.join(jobFolder, RESULT_FILE)
        with open(resultPath + ".partial", "wb") as file:
            biasArrays = {name: np.asarray(getattr(result, name), dtype=np.float32)
                          for name in ("bias_field", "corrected") if getattr(result, name) is not None}
            np.savez(file,
                     labels=np.asarray(result.labels, dtype=np.uint8),
                     probabilities=np.asarray(result.probabilities, dtype=np.float32),
                     means=np.asarray(result.means, dtype=np.float64),
                     covariances=np.asarray(result.covariances, dtype=np.float64),
                     weights=np.asarray(result.weights, dtype=np.float64),
                     nll_history=np.asarray(result.nll_history, dtype=np.float64),
                     **biasArrays)
        os.replace(resultPath + ".partial", resultPath)
        _writeJson(os.path.join(jobFolder, RESULT_INFO_FILE), {
            "n_iter": int(result.n_iter),
            "device": str(result.device),
            "seconds": float(result.seconds),
            "method": str(result.method),
            "converged": bool(result.converged),
            "n_classes": int(result.n_classes),
            "options": result.options,
            "notes": [str(note) for note in result.notes],
            "class_names": None if result.class_names is None else [str(name) for name in result.class_names],
        })
    except Exception as error:  # noqa: BLE001
        return _reportError(jobFolder, error)
    emit("done")
    return EXIT_OK


def _reportError(jobFolder: str, error: BaseException) -> int:
    message = str(error) or type(error).__name__
    _writeJson(os.path.join(jobFolder, ERROR_FILE), {
        "type": type(error).__name__,
        "message": message,
        "traceback": traceback.format_exc(),
    })
    emit("error", type=type(error).__name__, message=message)
    return EXIT_ERROR


def deviceFacts() -> dict:
    """What torch sees: ``{"torchVersion", "cudaAvailable", "cuda": [{"name", "totalMemoryBytes"}]}``."""
    import torch

    facts = {"torchVersion": str(torch.__version__), "cudaAvailable": bool(torch.cuda.is_available()), "cuda": []}
    if facts["cudaAvailable"]:
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            facts["cuda"].append({"name": str(properties.name), "totalMemoryBytes": int(properties.total_memory)})
    return facts


def reportDevices() -> int:
    """``worker.py --devices``: one "devices" event (or an "error" event when torch cannot be used)."""
    try:
        facts = deviceFacts()
    except Exception as error:  # noqa: BLE001 - e.g. a broken torch or CUDA install: reported to the parent
        emit("error", type=type(error).__name__, message=str(error) or type(error).__name__)
        return EXIT_ERROR
    emit("devices", **facts)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python worker.py <jobFolder>`` or ``python worker.py --devices``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == [DEVICES_OPTION]:
        return reportDevices()
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        sys.stderr.write(f"usage: worker.py <jobFolder> | worker.py {DEVICES_OPTION}\n")
        return EXIT_ERROR
    return runJob(argv[0])


if __name__ == "__main__":
    # Run as a script, Python puts this file's folder first on sys.path, where module names such as
    # "logic" or "cli" would shadow other packages; the package is imported from its parent instead.
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    sys.exit(main())
