"""Run the core engine in a separate process: job files, progress events, cancel.

The engine runs in a child process started with the running Python (``sys.executable``, which is
the ``PythonSlicer`` launcher inside Slicer), so Slicer's GUI never blocks and a cancel can end
the computation at once. Inputs and results travel through a temporary job folder (``.npz`` and
``.json``, see :mod:`.worker`); progress arrives as JSON lines on stdout.

Cancel ends the whole process tree: the child is started in its own session (POSIX) or process
group (Windows) and the group is killed (``os.killpg`` / ``taskkill /F /T``); ``psutil`` is used in
addition when installed. Nothing here imports ``slicer``, ``qt`` or ``torch``.

Progress is read by a daemon thread into a queue that the caller polls (MONAIAuto3DSeg's
pattern), not by ``qt.QProcess`` (SlicerNNUnet's): the same code then runs in pytest, in
``PythonSlicer`` and in a headless Slicer without Qt. Slicer's main thread holds the GIL while Qt
idles, so the thread reads mostly during the caller's polls; the worker therefore throttles its
progress lines (``worker.PROGRESS_INTERVAL_SECONDS``), which keeps the pipe far from full.

Workers are detached from the caller (own session / process group, so a cancel can kill the
tree). They still end with it: an ``atexit`` hook cancels the workers still running when Python
exits normally, and a worker whose parent crashed stops at its next progress line (broken pipe,
see ``worker.emit``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..result import SegmentationResult
from . import worker as workerProtocol

#: How long :meth:`WorkerProcess.cancel` may take before it reports failure, in seconds.
CANCEL_TIMEOUT_SECONDS = 2.0

#: Windows ``CREATE_NO_WINDOW`` (``subprocess`` defines it on Windows only): child processes of
#: the GUI get no console window, as Slicer's own ``slicer.util`` launches do.
CREATE_NO_WINDOW = 0x08000000

#: Workers started by this process and not finished yet (cancelled at interpreter exit).
_runningWorkers: "weakref.WeakSet[WorkerProcess]" = weakref.WeakSet()


class WorkerError(RuntimeError):
    """The engine failed in the worker; ``str(error)`` is the engine's own message."""

    def __init__(self, message: str, errorType: str = "", details: str = ""):
        super().__init__(message)
        self.errorType = errorType
        self.details = details


class ProcessingCancelled(Exception):
    """The user cancelled the segmentation; nothing was written to the scene."""


@dataclass
class ProgressInfo:
    """One progress report.

    ``stage`` is "starting", "loading", "fitting", "saving" or "writing"; iteration counts and
    NLL are set during "fitting". ``remainingSeconds`` is a linear estimate (None until known).
    """

    stage: str
    iteration: int = 0
    maxIterations: int = 0
    nll: float | None = None
    elapsedSeconds: float = 0.0
    remainingSeconds: float | None = None

    @property
    def fraction(self) -> float:
        """Fraction of the iterations done (0..1), for a progress bar."""
        return min(1.0, self.iteration / self.maxIterations) if self.maxIterations > 0 else 0.0


#: The Slicer module folder that holds this copy of the ``DeepGMMSegmentLib`` package (one
#: function, shared with the worker, which needs it before it can import the package).
moduleFolder = workerProtocol.moduleFolder


def workerEnvironment(baseEnvironment: dict | None = None) -> dict:
    """Environment for the worker: Slicer's startup environment inside Slicer (what
    ``slicer.util.startupEnvironment()`` gives, so the ``PythonSlicer`` launcher sets up its own
    paths), ``os.environ`` elsewhere, with the module folder on ``PYTHONPATH``."""
    if baseEnvironment is None:
        baseEnvironment = dict(os.environ)
        slicerModule = sys.modules.get("slicer")
        if slicerModule is not None and getattr(slicerModule, "app", None) is not None:
            try:
                baseEnvironment = dict(slicerModule.util.startupEnvironment())
            except Exception:  # noqa: BLE001 - fall back to the current environment
                logging.debug("DeepGMMSegment: slicer.util.startupEnvironment() failed", exc_info=True)
    environment = dict(baseEnvironment)
    paths = [moduleFolder()] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def workerPython(pythonExecutable: str | None = None) -> str:
    """The Python that runs the worker: ``pythonExecutable`` when given, else ``sys.executable``
    (the ``PythonSlicer`` launcher inside Slicer), else ``PythonSlicer`` found on PATH.

    Raises :class:`WorkerError` naming the fix when none exists (Slicer sets ``sys.executable``
    to an empty string when it cannot find PythonSlicer next to itself)."""
    if pythonExecutable:
        return pythonExecutable
    for candidate in (sys.executable, shutil.which("PythonSlicer")):
        if candidate and os.path.isfile(candidate):
            return candidate
    raise WorkerError(
        f"Cannot start the segmentation process: no Python executable found (sys.executable is "
        f"{sys.executable!r} and PythonSlicer is not on PATH). Reinstall Slicer, or make sure the PythonSlicer "
        "program next to the Slicer program can be run.", "ProcessError")


def jobParentFolder() -> str | None:
    """Where job folders go: Slicer's temporary folder (Application Settings) inside Slicer, the
    system's temporary folder elsewhere (None)."""
    application = getattr(sys.modules.get("slicer"), "app", None)
    folder = getattr(application, "temporaryPath", None) if application is not None else None
    if folder:
        os.makedirs(folder, exist_ok=True)
        return folder
    return None


def _cancelRunningWorkers() -> None:
    """atexit: end the workers this process started and left running (e.g. a console run with
    ``waitForCompletion=False`` when Slicer is closed)."""
    for workerProcess in list(_runningWorkers):
        if workerProcess.process is not None and workerProcess.process.poll() is None:
            workerProcess.cancel(timeout=1.0)


atexit.register(_cancelRunningWorkers)


def _optionalPsutil():
    """psutil when installed (not bundled with Slicer); it also finds children that left the group."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _isAlive(psutilProcess) -> bool:
    try:
        return psutilProcess.status() != "zombie"
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess and friends: gone
        return False


def _groupAlive(processGroupId: int) -> bool:
    """True while a process of the group is alive (zombies do not count)."""
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as file:
                    fields = file.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            # Fields after the command name: state, ppid, pgrp, ...
            if int(fields[2]) == processGroupId and fields[0] != b"Z":
                return True
        return False
    try:
        os.killpg(processGroupId, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def killProcessTree(process: subprocess.Popen, timeout: float = CANCEL_TIMEOUT_SECONDS) -> bool:
    """Kill ``process`` and every process it started; True when all are gone within ``timeout``."""
    descendants = []
    psutil = _optionalPsutil()
    if psutil is not None:
        try:
            descendants = psutil.Process(process.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False,
                       creationflags=CREATE_NO_WINDOW)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for child in descendants:
        try:
            child.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    deadline = time.monotonic() + timeout
    try:
        process.kill()
    except OSError:
        pass
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    # Killed processes may linger as zombies until init reaps them; they are dead already.
    while any(_isAlive(child) for child in descendants) or (os.name != "nt" and _groupAlive(process.pid)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class WorkerProcess:
    """A child process whose stdout is parsed into events on a background thread.

    ``poll()`` never blocks: it returns the events received so far (dicts; lines without the
    protocol prefix arrive as ``{"event": "log", "line": ...}``). ``cancel()`` kills the tree.
    """

    def __init__(self, command: Sequence[str], environment: dict | None = None, workingFolder: str | None = None,
                 stderrPath: str | None = None):
        self.command = list(command)
        self.environment = environment
        self.workingFolder = workingFolder
        self.stderrPath = stderrPath
        self.process: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._readerThread: threading.Thread | None = None
        self._stderrFile = None
        self.cancelled = False

    def start(self) -> None:
        """Start the process in its own session / process group."""
        self._stderrFile = open(self.stderrPath, "wb") if self.stderrPath else subprocess.DEVNULL
        options = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
        else:
            options["start_new_session"] = True
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderrFile,
            env=self.environment, cwd=self.workingFolder, **options)
        _runningWorkers.add(self)
        self._readerThread = threading.Thread(target=self._readStdout, name="DeepGMMSegmentWorkerReader",
                                              daemon=True)
        self._readerThread.start()

    def _readStdout(self) -> None:
        stream = self.process.stdout
        for rawLine in iter(stream.readline, b""):
            line = rawLine.decode("utf-8", errors="replace").rstrip("\r\n")
            if line.startswith(workerProtocol.MESSAGE_PREFIX):
                try:
                    self._events.put(json.loads(line[len(workerProtocol.MESSAGE_PREFIX):]))
                    continue
                except json.JSONDecodeError:
                    pass
            self._events.put({"event": "log", "line": line})
        stream.close()

    def poll(self) -> list[dict]:
        """Events received since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def isRunning(self) -> bool:
        """True until the process has exited and all its output was read."""
        if self.process is None:
            return False
        if self.process.poll() is None:
            return True
        return self._readerThread is not None and self._readerThread.is_alive()

    @property
    def returnCode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit and its output to be read; returns the exit code."""
        if self.process is None:
            return None
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if self._readerThread is not None:
            self._readerThread.join(timeout=timeout)
        self._closeStderr()
        return self.process.returncode

    def cancel(self, timeout: float = CANCEL_TIMEOUT_SECONDS) -> bool:
        """Kill the process and all its descendants; True when they are all gone."""
        self.cancelled = True
        if self.process is None:
            return True
        gone = killProcessTree(self.process, timeout)
        if self._readerThread is not None:
            self._readerThread.join(timeout=0.5)
        self._closeStderr()
        return gone

    def _closeStderr(self) -> None:
        if self._stderrFile not in (None, subprocess.DEVNULL):
            self._stderrFile.close()
            self._stderrFile = None


class SegmentationJob:
    """One engine run in a worker process: writes the job folder, starts the worker, turns its
    events into :class:`ProgressInfo`, and reads the result (or the error) back.

    Typical use::

        job = SegmentationJob(channels, mask, numberOfClasses=3, method="em-gmm")
        job.start()
        while job.isRunning():
            for info in job.progressUpdates(): print(info)
            time.sleep(0.1)
        result = job.result()        # SegmentationResult, or raises WorkerError / ProcessingCancelled
    """

    def __init__(self, channels: Sequence[np.ndarray], mask: np.ndarray | None, numberOfClasses: int,
                 method: str, device: str = "auto", seed: int = 0, spacing: Sequence[float] | None = None,
                 options: dict | None = None, pythonExecutable: str | None = None,
                 environment: dict | None = None, keepFiles: bool = False, seeds: np.ndarray | None = None):
        self.channels = channels
        self.mask = mask
        self.seeds = seeds  # the engine's seeds: int labels on the channels' grid (0 = unmarked), or None
        self.parameters = {
            "numberOfClasses": int(numberOfClasses),
            "method": method,
            "device": device,
            "seed": int(seed),
            "spacing": [float(s) for s in spacing] if spacing is not None else None,
            "options": dict(options or {}),
        }
        self.pythonExecutable = pythonExecutable
        self.environment = environment
        self.keepFiles = keepFiles
        self.jobFolder: str | None = None
        self.worker: WorkerProcess | None = None
        self._startTime = 0.0
        self._stage = "starting"
        self._logLines: list[str] = []

    def start(self) -> None:
        """Write the job folder and start the worker process."""
        python = workerPython(self.pythonExecutable)  # before anything is written
        self.jobFolder = tempfile.mkdtemp(prefix="DeepGMMSegment-", dir=jobParentFolder())
        try:
            with open(os.path.join(self.jobFolder, workerProtocol.JOB_FILE), "w", encoding="utf-8") as file:
                json.dump(self.parameters, file)
            arrays = {"channels": np.stack([np.asarray(c, dtype=np.float32) for c in self.channels])}
            if self.mask is not None:
                arrays["mask"] = np.asarray(self.mask, dtype=bool)
            if self.seeds is not None:
                arrays["seeds"] = np.asarray(self.seeds, dtype=np.uint8)
            np.savez(os.path.join(self.jobFolder, workerProtocol.INPUT_FILE), **arrays)
            command = [python, "-u", workerProtocol.__file__, self.jobFolder]
            self.worker = WorkerProcess(command, workerEnvironment(self.environment), self.jobFolder,
                                        os.path.join(self.jobFolder, "worker-stderr.txt"))
            self._startTime = time.monotonic()
            self.worker.start()
        except Exception:
            self.cleanup()
            raise

    def isRunning(self) -> bool:
        return self.worker is not None and self.worker.isRunning()

    def progressUpdates(self) -> list[ProgressInfo]:
        """Progress reports received since the last call (never blocks)."""
        updates = []
        if self.worker is None:
            return updates
        for event in self.worker.poll():
            kind = event.get("event")
            if kind == "stage":
                self._stage = str(event.get("stage", self._stage))
                updates.append(ProgressInfo(self._stage, elapsedSeconds=time.monotonic() - self._startTime))
            elif kind == "progress":
                iteration = int(event.get("iteration", 0))
                maxIterations = int(event.get("maxIterations", 0))
                elapsed = float(event.get("elapsedSeconds", 0.0))
                remaining = None
                if iteration > 0 and maxIterations >= iteration:
                    remaining = elapsed / iteration * (maxIterations - iteration)
                updates.append(ProgressInfo("fitting", iteration, maxIterations, event.get("nll"), elapsed, remaining))
            elif kind == "log":
                self._logLines.append(event.get("line", ""))
                logging.debug("DeepGMMSegment worker: %s", event.get("line", ""))
        return updates

    def cancel(self) -> bool:
        """Kill the worker and its children; True when they are gone (within 2 s)."""
        if self.worker is None:
            return True
        return self.worker.cancel()

    def wait(self, timeout: float | None = None) -> int | None:
        return self.worker.wait(timeout) if self.worker is not None else None

    def result(self) -> SegmentationResult:
        """The result of a finished job; raises ``ProcessingCancelled`` or ``WorkerError``."""
        if self.worker is None:
            raise RuntimeError("The job was not started.")
        if self.worker.cancelled:
            raise ProcessingCancelled("Segmentation cancelled.")
        returnCode = self.worker.wait()
        folder = self.jobFolder
        if returnCode == workerProtocol.EXIT_CANCELLED:
            raise ProcessingCancelled("Segmentation cancelled.")
        errorPath = os.path.join(folder, workerProtocol.ERROR_FILE)
        if os.path.exists(errorPath):
            with open(errorPath, encoding="utf-8") as file:
                error = json.load(file)
            raise WorkerError(error.get("message", "unknown error"), error.get("type", ""), error.get("traceback", ""))
        resultPath = os.path.join(folder, workerProtocol.RESULT_FILE)
        if returnCode != workerProtocol.EXIT_OK or not os.path.exists(resultPath):
            raise WorkerError(
                f"The segmentation process stopped unexpectedly (exit code {returnCode}). "
                f"Its last output:\n{self._stderrTail()}", "ProcessError", self._stderrTail(4000))
        with np.load(resultPath) as data:
            arrays = {name: np.array(data[name]) for name in data.files}
        with open(os.path.join(folder, workerProtocol.RESULT_INFO_FILE), encoding="utf-8") as file:
            info = json.load(file)
        arrays["nll_history"] = [float(v) for v in arrays["nll_history"]]
        return SegmentationResult(**arrays, **info)

    def _stderrTail(self, characters: int = 1500) -> str:
        path = os.path.join(self.jobFolder or "", "worker-stderr.txt")
        text = ""
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as file:
                text = file.read()
        text = (text + "\n".join(self._logLines)).strip()
        return text[-characters:] if text else "(no output)"

    def cleanup(self) -> None:
        """Remove the job folder (unless ``keepFiles``)."""
        if self.jobFolder and not self.keepFiles:
            shutil.rmtree(self.jobFolder, ignore_errors=True)


class DeviceQuery:
    """Which compute devices torch sees, answered by a short worker process (``worker.py --devices``).

    Importing torch takes seconds and asking about GPUs initialises CUDA; done here it never
    happens in the calling process (Slicer's GUI). ``start()``, then poll ``isRunning()``;
    ``result()`` gives :func:`.worker.deviceFacts`'s dict or raises
    :class:`WorkerError`.
    """

    def __init__(self, pythonExecutable: str | None = None, environment: dict | None = None):
        self.pythonExecutable = pythonExecutable
        self.environment = environment
        self.worker: WorkerProcess | None = None
        self._facts: dict | None = None
        self._error: WorkerError | None = None

    pollIntervalMilliseconds = 200

    def start(self, scheduler: Callable | None = None, onDone: Callable[[object], None] | None = None) -> None:
        """Start the query. With a ``scheduler(delayMilliseconds, callback)`` (``qt.QTimer.singleShot``
        in Slicer), ``onDone`` is later called with the facts, or with the error (also when the
        worker cannot start)."""
        self._scheduler, self._onDone = scheduler, onDone
        try:
            command = [workerPython(self.pythonExecutable), "-u", workerProtocol.__file__,
                       workerProtocol.DEVICES_OPTION]
            self.worker = WorkerProcess(command, workerEnvironment(self.environment))
            self.worker.start()
        except Exception as error:  # noqa: BLE001 - e.g. PythonSlicer not found
            if onDone is None:
                raise
            onDone(error)
            return
        if scheduler is not None:
            scheduler(self.pollIntervalMilliseconds, self._poll)

    def _poll(self) -> None:
        if self.isRunning():
            self._scheduler(self.pollIntervalMilliseconds, self._poll)
            return
        try:
            outcome = self.result()
        except Exception as error:  # noqa: BLE001 - handed to the caller
            outcome = error
        if self._onDone is not None:
            self._onDone(outcome)

    def isRunning(self) -> bool:
        return self.worker is not None and self.worker.isRunning()

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def result(self) -> dict:
        """The device facts of a finished query."""
        if self.worker is None:
            raise RuntimeError("The device query was not started.")
        self.worker.wait()
        for event in self.worker.poll():
            if event.get("event") == "devices":
                self._facts = {key: value for key, value in event.items() if key != "event"}
            elif event.get("event") == "error":
                self._error = WorkerError(event.get("message", "unknown error"), event.get("type", ""))
        if self._facts is not None:
            return self._facts
        raise self._error or WorkerError(
            f"The device query stopped without an answer (exit code {self.worker.returnCode}).", "ProcessError")


class ManualScheduler:
    """A scheduler for ``waitForCompletion=False`` outside Qt: callbacks run when you pump it.

    A scheduler is any callable ``scheduler(delayMilliseconds, callback)`` that calls
    ``callback()`` later on the main thread; inside Slicer that is ``qt.QTimer.singleShot``.
    Here :meth:`runPending` runs due callbacks and :meth:`runUntilIdle` pumps until none is left.
    """

    def __init__(self):
        self._pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delayMilliseconds: int, callback: Callable[[], None]) -> None:
        self._pending.append((time.monotonic() + delayMilliseconds / 1000.0, callback))

    @property
    def pendingCount(self) -> int:
        return len(self._pending)

    def runPending(self) -> int:
        """Run the callbacks that are due; returns how many ran."""
        now = time.monotonic()
        due = [entry for entry in self._pending if entry[0] <= now]
        self._pending = [entry for entry in self._pending if entry[0] > now]
        for _, callback in due:
            callback()
        return len(due)

    def runUntilIdle(self, timeoutSeconds: float = 600.0) -> None:
        """Pump until no callback is pending; raises ``TimeoutError`` after ``timeoutSeconds``."""
        deadline = time.monotonic() + timeoutSeconds
        while self._pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Scheduled work still pending after {timeoutSeconds} s.")
            if not self.runPending():
                time.sleep(0.01)
