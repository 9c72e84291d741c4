"""``DeepGMMSegmentLogic``: the console / batch API of the Slicer module.

Importable with only the ``slicer-core`` wheel (MRML, no Qt), so it runs in Slicer's Python
console, in ``Slicer --no-main-window --python-script ...`` and in plain pytest.

Console example (inside Slicer)::

    from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic
    t1 = slicer.util.getNode("T1"); t2 = slicer.util.getNode("T2")
    outputs = DeepGMMSegmentLogic().process([t1, t2], numberOfClasses=3, method="em-gmm")
    for stats in outputs.classStatistics:
        print(stats.name, stats.volumeMl, stats.meanIntensities)

A run reads the scene (:mod:`.slicer_adapter.request`), runs the engine in a worker process
(:mod:`.slicer_adapter.runner`) and writes the scene (:mod:`.slicer_adapter.outputs`) only after the
worker succeeded, so an error or a cancel leaves the scene exactly as it was.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from .options import DEFAULT_BIAS_FIELD, METHODS
from .slicer_adapter.dependencies import TorchDependency, isSlicerApplication
from .slicer_adapter.outputs import ClassStatistics, DeepGMMSegmentOutputs, writeOutputs
from .slicer_adapter.request import Request, checkTrainedModel, prepareRequest
from .slicer_adapter.runner import ProcessingCancelled, ProgressInfo, SegmentationJob, WorkerError

__all__ = [
    "METHODS",
    "ClassStatistics",
    "DeepGMMSegmentLogic",
    "DeepGMMSegmentOutputs",
    "DeepGMMSegmentTask",
    "ProcessingCancelled",
    "ProgressInfo",
    "WorkerError",
]


class DeepGMMSegmentTask:
    """Handle of a running segmentation (returned when ``waitForCompletion=False``).

    ``outputs`` is set on success, ``error`` on failure or cancel; ``done`` tells which.
    """

    def __init__(self, logic: "DeepGMMSegmentLogic", job, request: Request, blocking: bool,
                 progressCallback: Callable | None, completedCallback: Callable | None):
        self._logic = logic
        self.job = job
        self._request = request
        self.blocking = blocking
        self._progressCallback = progressCallback
        self._completedCallback = completedCallback
        self.outputs: DeepGMMSegmentOutputs | None = None
        self.error: BaseException | None = None
        self.done = False
        self.lastProgress: ProgressInfo | None = None

    def isRunning(self) -> bool:
        return not self.done

    def cancel(self) -> None:
        """Stop the worker (the whole process tree); the scene is left unchanged."""
        self._logic._cancelTask(self)

    # -- internal ------------------------------------------------------------------------------

    def _deliverProgress(self, info: ProgressInfo) -> None:
        self.lastProgress = info
        if self._progressCallback is None:
            return
        try:
            keepGoing = self._progressCallback(info)
        except Exception:  # noqa: BLE001 - a broken callback must not kill the run
            logging.exception("DeepGMMSegment: progress callback failed")
            return
        if keepGoing is False:
            self.job.cancel()

    def _pumpProgress(self) -> None:
        updates = self.job.progressUpdates()
        # Fast EM can report thousands of iterations between two polls; of a run of iteration
        # reports only the newest is passed on, so the GUI redraws once per poll.
        for index, info in enumerate(updates):
            nextInfo = updates[index + 1] if index + 1 < len(updates) else None
            if info.stage == "fitting" and nextInfo is not None and nextInfo.stage == "fitting":
                continue
            self._deliverProgress(info)

    def _poll(self) -> None:
        """Scheduler callback of the non-blocking path."""
        if self.done:
            return
        self._pumpProgress()
        if self.job.isRunning():
            self._logic._schedule(self._poll)
            return
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        try:
            self._pumpProgress()
            result = self.job.result()
            self._deliverProgress(ProgressInfo("writing", result.n_iter, result.n_iter,
                                               result.nll_history[-1] if result.nll_history else None,
                                               result.seconds, 0.0))
            self.outputs = writeOutputs(self._request, result)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            self.error = error
        finally:
            self.job.cleanup()
            self.done = True
            self._logic._taskFinished(self)
        if self._completedCallback is not None:
            try:
                self._completedCallback(self.outputs if self.error is None else self.error)
            except Exception:  # noqa: BLE001
                logging.exception("DeepGMMSegment: completed callback failed")


class DeepGMMSegmentLogic:
    """Segment MRML volumes with the DeepGMMSegment engine and write the results into the scene.

    Collaborators (all optional, injectable for tests or the GUI):

    * ``runnerFactory(**jobArguments)`` -> a :class:`~DeepGMMSegmentLib.slicer_adapter.runner.SegmentationJob`-like
      object (default: ``SegmentationJob``, a worker process running the engine).
    * ``scheduler(delayMilliseconds, callback)`` for ``waitForCompletion=False``: calls ``callback``
      later on the main thread. Default: ``qt.QTimer.singleShot`` when Qt is available; outside
      Slicer pass e.g. :class:`~DeepGMMSegmentLib.slicer_adapter.runner.ManualScheduler` and pump it.
    * ``dependencyInstaller()`` called before each run; raises when torch cannot be provided
      (default: :class:`~DeepGMMSegmentLib.slicer_adapter.dependencies.TorchDependency`).
    """

    pollIntervalMilliseconds = 100

    def __init__(self, runnerFactory: Callable | None = None, scheduler: Callable | None = None,
                 dependencyInstaller: Callable | None = None):
        self.runnerFactory = runnerFactory or SegmentationJob
        self.scheduler = scheduler
        self.dependencyInstaller = dependencyInstaller if dependencyInstaller is not None else TorchDependency()
        self._task: DeepGMMSegmentTask | None = None

    # -- public API ----------------------------------------------------------------------------

    def process(self, inputVolumes, outputSegmentation=None, numberOfClasses: int = 3, method: str = "deepsvg",
                roi=None, mask=None, device: str = "auto", seed: int = 0, options: dict | None = None,
                probabilityMaps: bool = True, waitForCompletion: bool = True,
                progressCallback: Callable[[ProgressInfo], object] | None = None,
                completedCallback: Callable[[object], None] | None = None, biasField=DEFAULT_BIAS_FIELD,
                seedSegmentation=None):
        """Segment ``inputVolumes`` into ``numberOfClasses`` tissue classes.

        :param inputVolumes: 1-4 ``vtkMRMLScalarVolumeNode`` (the channels, in order). The first one
            defines the output grid; the others are resampled onto it (trilinear, in RAS, oblique
            directions and linear transforms respected). Inputs are never modified.
        :param outputSegmentation: ``vtkMRMLSegmentationNode`` to fill. ``None`` creates
            "<first input> DeepGMM <method>". An existing output keeps its node, id, subject
            hierarchy place and any segment this module did not write; its class segments and
            probability maps get the new content.
        :param numberOfClasses: K >= 2. Segments are "Class 1".."Class K" in the engine's order
            (class 1 = darkest in the first channel unless ``options["prior_means"]`` or
            ``seedSegmentation`` is given).
        :param method: "deepsvg" | "deepg" | "em-gmm" | "em-svgmm".
        :param roi: ``vtkMRMLMarkupsROINode``: compute and write only inside its box (Crop Volume's
            voxel extent on the first input). Everything outside keeps its previous value.
        :param mask: ``(vtkMRMLSegmentationNode, segmentId)`` or ``vtkMRMLLabelMapVolumeNode``
            (nonzero = inside): only voxels inside are modelled; others get label 0 / probability 0.
        :param device: "auto" | "cpu" | "cuda" | "cuda:N".
        :param seed: random seed (same inputs + seed -> same result on the same device).
        :param options: forwarded to ``segment()``: ``max_iter``, ``tol``, ``covariance_type``,
            ``prior_means`` (K x C), ... (JSON-compatible values; numpy arrays are converted).
            ``model`` (path of a trained model file) and ``fine_tune`` (steps, default 0 = one
            forward pass) segment with a trained network; the model is checked against the
            inputs, ``numberOfClasses`` and ``method`` before the worker starts.
        :param probabilityMaps: create/update one float32 volume (0..1) per class, grouped in a
            subject hierarchy folder "<output> probabilities". ``False`` removes old ones.
        :param waitForCompletion: ``True`` blocks and returns :class:`DeepGMMSegmentOutputs`;
            ``False`` returns a :class:`DeepGMMSegmentTask` at once and delivers progress and
            completion through the scheduler.
        :param progressCallback: called with a :class:`ProgressInfo` (stage, iteration,
            maxIterations, nll, elapsedSeconds, remainingSeconds). Returning ``False`` cancels.
        :param completedCallback: called with the outputs, or with the exception (e.g.
            :class:`ProcessingCancelled`, :class:`WorkerError`) on failure or cancel.
        :param biasField: correct a smooth intensity inhomogeneity together with the fit (the
            engine's ``bias_field``, docs/bias-field.md): "detect" (default: only when the image
            shows a field, looked for in masks of 12 cm and more along two axes), ``True`` or "auto"
            (always, order 3), a basis order 1..6 (always), or "none"/``False``. When a field is
            corrected, adds per channel "<input> bias field" and "<input> corrected" volumes on the
            first input's grid (the inputs are not modified); a rerun into the same output updates them.
        :param seedSegmentation: ``vtkMRMLSegmentationNode`` with a few painted strokes per tissue,
            one segment each (the engine's ``seeds``): segment n marks class n, its painted voxels'
            means become the class's prior means, and output class n takes the segment's name and
            colour. ``numberOfClasses`` may exceed the number of segments (the extra classes are
            found freely, "Class k"). Strokes must lie inside the mask; when they are painted into
            the mask's own segmentation, the mask segment is not a class.
        :raises ValueError: invalid input (message names the problem and the fix).
        :raises WorkerError: the engine failed (message is the engine's).
        :raises ProcessingCancelled: cancelled (blocking mode).
        """
        if self.isProcessing():
            raise RuntimeError("A segmentation is already running. Cancel it (cancelProcessing()) or wait for it.")
        if not waitForCompletion:
            self._scheduler()  # fail before any work when no scheduler can be found
        request = prepareRequest(inputVolumes, outputSegmentation, numberOfClasses, method, roi, mask,
                                 device, seed, options, probabilityMaps, biasField, seedSegmentation)
        self.dependencyInstaller()
        checkTrainedModel(request)
        job = self.runnerFactory(
            channels=[channel[request.region] if request.region else channel for channel in request.channels],
            mask=request.regionMask, numberOfClasses=request.numberOfClasses, method=request.method,
            device=request.device, seed=request.seed, spacing=request.geometry.spacingKji,
            options=request.engineOptions(), seeds=request.regionSeeds())
        task = DeepGMMSegmentTask(self, job, request, waitForCompletion, progressCallback, completedCallback)
        task._deliverProgress(ProgressInfo("starting"))
        job.start()
        self._task = task
        if not waitForCompletion:
            self._schedule(task._poll)
            return task
        processEvents = _applicationEventPump()
        try:
            while job.isRunning():
                task._pumpProgress()
                processEvents()
                time.sleep(0.05)
        except BaseException:
            job.cancel()  # e.g. KeyboardInterrupt in the console: do not leave the worker behind
            raise
        finally:
            task._finish()
        if task.error is not None:
            raise task.error
        return task.outputs

    def isProcessing(self) -> bool:
        """True while a segmentation runs."""
        return self._task is not None and not self._task.done

    def cancelProcessing(self) -> None:
        """Cancel the running segmentation: the worker process tree is ended (within 2 s) and the
        scene stays exactly as before. No-op when nothing runs."""
        if self._task is not None:
            self._cancelTask(self._task)

    # -- scheduling ----------------------------------------------------------------------------

    def _scheduler(self) -> Callable:
        if self.scheduler is not None:
            return self.scheduler
        try:
            import qt  # Slicer application only
        except ImportError as error:
            raise ValueError(
                "waitForCompletion=False needs a scheduler and Qt is not available. Pass "
                "DeepGMMSegmentLogic(scheduler=ManualScheduler()) and pump it, or use waitForCompletion=True."
            ) from error
        return lambda delayMilliseconds, callback: qt.QTimer.singleShot(delayMilliseconds, callback)

    def _schedule(self, callback: Callable[[], None]) -> None:
        self._scheduler()(self.pollIntervalMilliseconds, callback)

    def _cancelTask(self, task: DeepGMMSegmentTask) -> None:
        if task.done:
            return
        if not task.job.cancel():
            logging.warning("DeepGMMSegment: the worker process did not end within 2 s.")
        if not task.blocking:
            task._finish()  # the blocking loop finishes on its own

    def _taskFinished(self, task: DeepGMMSegmentTask) -> None:
        if self._task is task:
            self._task = None


def _applicationEventPump() -> Callable[[], None]:
    """Inside Slicer, a blocking run keeps repainting the application (as other Slicer modules'
    blocking runs do); elsewhere there is nothing to pump."""
    if isSlicerApplication():
        import slicer

        return slicer.app.processEvents
    return lambda: None
