"""Worker process: runs the core engine on a job folder and reports on stdout.

Started by :mod:`DeepGMMSegmentLib.runner` with the running Python (``PythonSlicer`` inside
Slicer) as ``python worker.py <jobFolder>``, so the heavy torch work never blocks Slicer's GUI
and a cancel can end the whole process. It needs only numpy, torch and the core engine, never
``slicer``.

Job folder (written by the runner, read here):
  ``job.json``   ``{"numberOfClasses", "method", "device", "seed", "spacing", "options"}``
  ``input.npz``  ``channels`` (C, z, y, x) float32 and optionally ``mask`` (z, y, x) bool
Results (written here):
  ``result.npz`` ``labels``, ``probabilities``, ``means``, ``covariances``, ``weights``, ``nllHistory``
  ``result.json`` ``{"numberOfIterations", "device", "seconds", "method", "converged"}``
  ``error.json`` ``{"type", "message", "traceback"}`` when the engine failed

Every stdout line starting with :data:`MESSAGE_PREFIX` is a JSON event:
  ``{"event": "stage", "stage": "loading" | "fitting" | "saving"}``
  ``{"event": "progress", "iteration", "maxIterations", "nll", "elapsedSeconds"}``
  ``{"event": "done"}`` / ``{"event": "error", "type", "message"}`` / ``{"event": "cancelled"}``
Exit codes: :data:`EXIT_OK`, :data:`EXIT_ERROR`, :data:`EXIT_CANCELLED`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

MESSAGE_PREFIX = "DEEPGMMSEGMENT "
EXIT_OK = 0
EXIT_ERROR = 2
EXIT_CANCELLED = 3

JOB_FILE = "job.json"
INPUT_FILE = "input.npz"
RESULT_FILE = "result.npz"
RESULT_INFO_FILE = "result.json"
ERROR_FILE = "error.json"


def emit(event: str, **fields) -> None:
    """Print one machine-readable event line and flush it at once (the parent reads it live)."""
    fields["event"] = event
    sys.stdout.write(MESSAGE_PREFIX + json.dumps(fields) + "\n")
    sys.stdout.flush()


def _writeJson(path: str, data: dict) -> None:
    temporaryPath = path + ".partial"
    with open(temporaryPath, "w", encoding="utf-8") as file:
        json.dump(data, file)
    os.replace(temporaryPath, path)


def _moduleFolder() -> str:
    """The Slicer module folder that holds the DeepGMMSegmentLib package."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runJob(jobFolder: str) -> int:
    """Run the job in ``jobFolder``; returns the process exit code."""
    emit("stage", stage="loading")
    try:
        with open(os.path.join(jobFolder, JOB_FILE), encoding="utf-8") as file:
            job = json.load(file)
        import numpy as np

        # The module folder comes first so this copy of the package is used, not another install.
        if _moduleFolder() not in sys.path:
            sys.path.insert(0, _moduleFolder())
        from DeepGMMSegmentLib import SegmentationCancelled, segment

        with np.load(os.path.join(jobFolder, INPUT_FILE)) as data:
            channels = [np.asarray(channel) for channel in data["channels"]]
            mask = np.asarray(data["mask"]) if "mask" in data.files else None
    except Exception as error:  # noqa: BLE001 - everything is reported to the parent
        return _reportError(jobFolder, error)

    def progress(iteration, maxIterations, nll, elapsedSeconds):
        emit("progress", iteration=int(iteration), maxIterations=int(maxIterations),
             nll=None if nll is None else float(nll), elapsedSeconds=float(elapsedSeconds))
        return True

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
            **options,
        )
    except SegmentationCancelled:
        emit("cancelled")
        return EXIT_CANCELLED
    except Exception as error:  # noqa: BLE001 - everything is reported to the parent
        return _reportError(jobFolder, error)

    emit("stage", stage="saving")
    try:
        resultPath = os.path.join(jobFolder, RESULT_FILE)
        with open(resultPath + ".partial", "wb") as file:
            np.savez(file,
                     labels=np.asarray(result.labels, dtype=np.uint8),
                     probabilities=np.asarray(result.probabilities, dtype=np.float32),
                     means=np.asarray(result.means, dtype=np.float64),
                     covariances=np.asarray(result.covariances, dtype=np.float64),
                     weights=np.asarray(result.weights, dtype=np.float64),
                     nllHistory=np.asarray(result.nll_history, dtype=np.float64))
        os.replace(resultPath + ".partial", resultPath)
        _writeJson(os.path.join(jobFolder, RESULT_INFO_FILE), {
            "numberOfIterations": int(result.n_iter),
            "device": str(result.device),
            "seconds": float(result.seconds),
            "method": str(result.method),
            "converged": bool(result.converged),
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python worker.py <jobFolder>``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        sys.stderr.write("usage: worker.py <jobFolder>\n")
        return EXIT_ERROR
    return runJob(argv[0])


if __name__ == "__main__":
    # Run as a script, Python puts this file's folder first on sys.path, where module names such as
    # "logic" or "cli" would shadow other packages; the package is imported from its parent instead.
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    sys.exit(main())
