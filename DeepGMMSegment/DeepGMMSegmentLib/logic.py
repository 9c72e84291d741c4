"""``DeepGMMSegmentLogic``: the console / batch API of the Slicer module.

Importable with only the ``slicer-core`` wheel (MRML, no Qt), so it runs in Slicer's Python
console, in ``Slicer --no-main-window --python-script ...`` and in plain pytest.

Console example (inside Slicer)::

    from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic
    t1 = slicer.util.getNode("T1"); t2 = slicer.util.getNode("T2")
    outputs = DeepGMMSegmentLogic().process([t1, t2], numberOfClasses=3, method="em-gmm")
    for stats in outputs.classStatistics:
        print(stats.name, stats.volumeMl, stats.meanIntensities)

The engine runs in a worker process (:mod:`DeepGMMSegmentLib.runner`); the scene is only
modified after it succeeded, so an error or a cancel leaves the scene exactly as it was.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import mrml_io
from .dependencies import TorchDependency, isSlicerApplication
from .runner import ProcessingCancelled, ProgressInfo, SegmentationJob, WorkerError, WorkerResult

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

#: The engine's methods (names as in ``DeepGMMSegmentLib.segment``). Checked here too so a typo
#: fails at once instead of after the worker started.
METHODS = ("deepsvg", "deepg", "em-gmm", "em-svgmm")
MAXIMUM_INPUTS = 4

# Options the logic sets itself (or that cannot cross a process boundary).
_RESERVED_OPTIONS = ("channels", "n_classes", "method", "mask", "spacing", "device", "seed", "progress",
                     "cancel_event")

# Attributes stored on the output segmentation node (saved with the scene).
ATTRIBUTE_PREFIX = "DeepGMMSegment."
INPUT_REFERENCE_ROLE = "DeepGMMSegmentInputVolume"


@dataclass
class ClassStatistics:
    """Per-class summary of an output (computed on the whole output grid)."""

    classIndex: int
    name: str
    voxelCount: int
    volumeMl: float
    meanIntensities: list[float]  # one per input channel, in the input's units (NaN if empty)


@dataclass
class DeepGMMSegmentOutputs:
    """What :meth:`DeepGMMSegmentLogic.process` returns."""

    segmentationNode: object
    probabilityVolumes: list  # vtkMRMLScalarVolumeNode per class, class order (empty if not requested)
    probabilityFolderItemId: int  # subject hierarchy folder holding them (0 if none)
    classStatistics: list[ClassStatistics]
    finalNll: float
    method: str
    device: str
    seconds: float
    seed: int = 0
    numberOfIterations: int = 0
    converged: bool = False
    nllHistory: list[float] = field(default_factory=list)
    region: tuple | None = None  # (k, j, i) slices of the ROI on the first input's grid, or None


@dataclass
class _Request:
    """Validated inputs of one run, with the arrays read from the scene."""

    inputVolumes: list
    outputSegmentation: object
    numberOfClasses: int
    method: str
    device: str
    seed: int
    options: dict
    probabilityMaps: bool
    channels: list[np.ndarray]
    geometry: mrml_io.VolumeGeometry
    region: tuple | None
    regionMask: np.ndarray | None


class DeepGMMSegmentTask:
    """Handle of a running segmentation (returned when ``waitForCompletion=False``).

    ``outputs`` is set on success, ``error`` on failure or cancel; ``done`` tells which.
    """

    def __init__(self, logic: "DeepGMMSegmentLogic", job, request: _Request, blocking: bool,
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
            self._deliverProgress(ProgressInfo("writing", result.numberOfIterations, result.numberOfIterations,
                                               result.nllHistory[-1] if result.nllHistory else None,
                                               result.seconds, 0.0))
            self.outputs = self._logic._writeOutputs(self._request, result)
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

    * ``runnerFactory(**jobArguments)`` -> a :class:`~DeepGMMSegmentLib.runner.SegmentationJob`-like
      object (default: ``SegmentationJob``, a worker process running the engine).
    * ``scheduler(delayMilliseconds, callback)`` for ``waitForCompletion=False``: calls ``callback``
      later on the main thread. Default: ``qt.QTimer.singleShot`` when Qt is available; outside
      Slicer pass e.g. :class:`~DeepGMMSegmentLib.runner.ManualScheduler` and pump it.
    * ``dependencyInstaller()`` called before each run; raises when torch cannot be provided
      (default: :class:`~DeepGMMSegmentLib.dependencies.TorchDependency`).
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
                completedCallback: Callable[[object], None] | None = None):
        """Segment ``inputVolumes`` into ``numberOfClasses`` tissue classes.

        :param inputVolumes: 1-4 ``vtkMRMLScalarVolumeNode`` (the channels, in order). The first one
            defines the output grid; the others are resampled onto it (trilinear, in RAS, oblique
            directions and linear transforms respected). Inputs are never modified.
        :param outputSegmentation: ``vtkMRMLSegmentationNode`` to fill. ``None`` creates
            "<first input> DeepGMM <method>". An existing output keeps its node, id, subject
            hierarchy place and any segment this module did not write; its class segments and
            probability maps get the new content.
        :param numberOfClasses: K >= 2. Segments are "Class 1".."Class K" in the engine's order
            (class 1 = darkest in the first channel unless ``options["prior_means"]`` is given).
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
        :raises ValueError: invalid input (message names the problem and the fix).
        :raises WorkerError: the engine failed (message is the engine's).
        :raises ProcessingCancelled: cancelled (blocking mode).
        """
        if self.isProcessing():
            raise RuntimeError("A segmentation is already running. Cancel it (cancelProcessing()) or wait for it.")
        if not waitForCompletion:
            self._scheduler()  # fail before any work when no scheduler can be found
        request = self._prepareRequest(inputVolumes, outputSegmentation, numberOfClasses, method, roi, mask,
                                       device, seed, options, probabilityMaps)
        self.dependencyInstaller()
        self._checkTrainedModel(request)
        job = self.runnerFactory(
            channels=[channel[request.region] if request.region else channel for channel in request.channels],
            mask=request.regionMask, numberOfClasses=request.numberOfClasses, method=request.method,
            device=request.device, seed=request.seed, spacing=request.geometry.spacingKji,
            options=request.options)
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

    # -- validation and input reading ----------------------------------------------------------

    def _prepareRequest(self, inputVolumes, outputSegmentation, numberOfClasses, method, roi, mask, device, seed,
                        options, probabilityMaps) -> _Request:
        if inputVolumes is None:
            raise ValueError("No input volume given. Pass a list of 1-4 scalar volume nodes.")
        if not isinstance(inputVolumes, (list, tuple)):
            inputVolumes = [inputVolumes]
        inputVolumes = list(inputVolumes)
        if not 1 <= len(inputVolumes) <= MAXIMUM_INPUTS:
            raise ValueError(f"Got {len(inputVolumes)} input volumes; pass between 1 and {MAXIMUM_INPUTS}.")
        for position, volume in enumerate(inputVolumes, start=1):
            if volume is None or not hasattr(volume, "IsA") or not volume.IsA("vtkMRMLScalarVolumeNode"):
                raise ValueError(f"Input {position} is not a scalar volume node ({type(volume).__name__}). "
                                 "Select a scalar volume (e.g. an MRI sequence).")
            if volume.GetImageData() is None:
                raise ValueError(f"Input {position} ('{volume.GetName()}') has no image data. Load the volume first.")
        if len({volume.GetID() for volume in inputVolumes}) != len(inputVolumes):
            raise ValueError("The same volume is selected twice as input. Select each sequence once.")
        scene = inputVolumes[0].GetScene()
        if scene is None or any(volume.GetScene() is not scene for volume in inputVolumes):
            raise ValueError("All input volumes must belong to the same MRML scene.")
        if isinstance(numberOfClasses, bool) or not isinstance(numberOfClasses, (int, np.integer)) \
                or numberOfClasses < 2:
            raise ValueError(f"numberOfClasses must be an integer >= 2 (got {numberOfClasses!r}).")
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
        if outputSegmentation is not None and not (hasattr(outputSegmentation, "IsA")
                                                   and outputSegmentation.IsA("vtkMRMLSegmentationNode")):
            raise ValueError("outputSegmentation must be a segmentation node or None (to create a new one).")
        if roi is not None and not (hasattr(roi, "IsA") and roi.IsA("vtkMRMLMarkupsROINode")):
            raise ValueError("roi must be a markups ROI node (vtkMRMLMarkupsROINode) or None.")
        if not isinstance(device, str) or not device:
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got {device!r}).")
        options = self._checkedOptions(options)

        channels, covered, geometry = mrml_io.channelsOnReferenceGrid(inputVolumes)
        validMask = covered
        if mask is not None:
            validMask = validMask & self._maskArray(mask, geometry)
        region = mrml_io.roiRegion(roi, inputVolumes[0]) if roi is not None else None
        regionMask = validMask[region] if region is not None else validMask
        if not regionMask.any():
            where = " inside the ROI" if region is not None else ""
            raise ValueError(f"No voxel to segment{where}: the mask (and the area covered by every input) is empty "
                             "there. Choose another mask segment or move the ROI.")
        return _Request(
            inputVolumes=inputVolumes, outputSegmentation=outputSegmentation, numberOfClasses=int(numberOfClasses),
            method=method, device=device, seed=int(seed), options=options, probabilityMaps=bool(probabilityMaps),
            channels=channels, geometry=geometry, region=region,
            regionMask=None if regionMask.all() else regionMask)

    @staticmethod
    def _maskArray(mask, geometry: mrml_io.VolumeGeometry) -> np.ndarray:
        if isinstance(mask, (list, tuple)):
            if len(mask) != 2 or not hasattr(mask[0], "IsA") or not mask[0].IsA("vtkMRMLSegmentationNode"):
                raise ValueError("mask must be (segmentationNode, segmentId) or a labelmap volume node.")
            return mrml_io.maskFromSegment(mask[0], str(mask[1]), geometry)
        if hasattr(mask, "IsA") and mask.IsA("vtkMRMLLabelMapVolumeNode"):
            return mrml_io.maskFromLabelmapVolume(mask, geometry)
        if hasattr(mask, "IsA") and mask.IsA("vtkMRMLSegmentationNode"):
            raise ValueError("A segmentation was given as mask without a segment. Pass (segmentationNode, segmentId).")
        raise ValueError("mask must be (segmentationNode, segmentId) or a labelmap volume node.")

    @staticmethod
    def _checkedOptions(options) -> dict:
        if options is None:
            return {}
        if not isinstance(options, dict):
            raise ValueError("options must be a dict of engine options (e.g. {'max_iter': 50}).")
        reserved = sorted(set(options) & set(_RESERVED_OPTIONS))
        if reserved:
            raise ValueError(f"options may not contain {', '.join(reserved)}: pass them as process() arguments "
                             "(cancel with cancelProcessing()).")

        def plain(value):
            if isinstance(value, os.PathLike):
                return os.fspath(value)
            if isinstance(value, np.ndarray):
                return value.tolist()
            if isinstance(value, np.generic):
                return value.item()
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        converted = {key: plain(value) for key, value in options.items()}
        if converted.get("model") is not None:
            if not isinstance(converted["model"], str) or not converted["model"].strip():
                raise ValueError("options['model'] must be the path of a trained model file, "
                                 f"got {converted['model']!r}.")
            # The worker runs in its own folder: a relative path must not change meaning there.
            converted["model"] = os.path.abspath(converted["model"])
        fineTune = converted.get("fine_tune", 0)
        if isinstance(fineTune, bool) or not isinstance(fineTune, int) or fineTune < 0:
            raise ValueError(f"options['fine_tune'] must be an integer >= 0 (0 = one forward pass), got {fineTune!r}.")
        try:
            json.dumps(converted)
        except TypeError as error:
            raise ValueError(f"options must hold numbers, strings, lists or arrays ({error}).") from error
        return converted

    @staticmethod
    def _checkTrainedModel(request: _Request) -> None:
        """Refuse a trained model that does not fit the request, before the worker starts.

        ``training.check_model_request`` (``model_io.check_compatible``) compares channels,
        dimension and number of classes; the method must be the one the model was trained for.
        Needs torch (installed by then); the file is read safely (no code from it runs).
        """
        modelPath = request.options.get("model")
        if modelPath is None:
            return
        from .training import check_model_request

        try:
            metadata = check_model_request(modelPath, request.numberOfClasses, len(request.channels),
                                           request.channels[0].ndim)
        except ValueError as error:
            raise ValueError(f"{error} {_trainedModelNeeds(modelPath)}".strip()) from None
        if metadata.get("method") != request.method:
            raise ValueError(f"The trained model was trained for method {metadata.get('method')!r} but method="
                             f"{request.method!r} was requested. {_trainedModelNeeds(modelPath)}")

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

    # -- writing outputs -----------------------------------------------------------------------

    def _writeOutputs(self, request: _Request, result: WorkerResult) -> DeepGMMSegmentOutputs:
        firstInput = request.inputVolumes[0]
        scene = firstInput.GetScene()
        numberOfClasses = request.numberOfClasses
        expectedShape = request.channels[0][request.region].shape if request.region else request.geometry.shape
        if tuple(result.labels.shape) != tuple(expectedShape) or result.probabilities.shape[0] != numberOfClasses:
            raise WorkerError(f"The engine returned arrays of shape {result.labels.shape} / "
                              f"{result.probabilities.shape}; expected {expectedShape} with {numberOfClasses} classes.")
        segmentationNode = request.outputSegmentation
        if segmentationNode is None:
            segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                       f"{firstInput.GetName()} DeepGMM {request.method}")
            segmentationNode.CreateDefaultDisplayNodes()
        elif segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()

        if request.region is None:
            labels = np.asarray(result.labels, dtype=np.uint8)
        else:
            labels = mrml_io.readClassLabels(segmentationNode, request.geometry).astype(np.uint8)
            labels[labels > numberOfClasses] = 0
            labels[request.region] = result.labels
        mrml_io.writeClassSegments(segmentationNode, labels, numberOfClasses, firstInput)

        if request.probabilityMaps:
            volumes = mrml_io.writeProbabilityVolumes(segmentationNode, result.probabilities, firstInput,
                                                      request.region)
        else:
            for node in mrml_io.probabilityVolumes(segmentationNode).values():
                scene.RemoveNode(node)
            volumes = []
        folderItem = mrml_io.placeOutputs(segmentationNode, volumes, firstInput,
                                          f"{segmentationNode.GetName()} probabilities")

        statistics = self._classStatistics(labels, request.channels, numberOfClasses, request.geometry)
        finalNll = float(result.nllHistory[-1]) if result.nllHistory else float("nan")
        self._storeAttributes(segmentationNode, request, result, finalNll, statistics)
        return DeepGMMSegmentOutputs(
            segmentationNode=segmentationNode, probabilityVolumes=volumes, probabilityFolderItemId=folderItem,
            classStatistics=statistics, finalNll=finalNll, method=result.method, device=result.device,
            seconds=result.seconds, seed=request.seed, numberOfIterations=result.numberOfIterations,
            converged=result.converged, nllHistory=list(result.nllHistory), region=request.region)

    @staticmethod
    def _classStatistics(labels: np.ndarray, channels: Sequence[np.ndarray], numberOfClasses: int,
                         geometry: mrml_io.VolumeGeometry) -> list[ClassStatistics]:
        flatLabels = labels.ravel()
        counts = np.bincount(flatLabels, minlength=numberOfClasses + 1)
        sums = [np.bincount(flatLabels, weights=channel.ravel().astype(np.float64), minlength=numberOfClasses + 1)
                for channel in channels]
        statistics = []
        for classIndex in range(1, numberOfClasses + 1):
            count = int(counts[classIndex])
            means = [float(channelSums[classIndex] / count) if count else float("nan") for channelSums in sums]
            statistics.append(ClassStatistics(classIndex, mrml_io.className(classIndex), count,
                                              count * geometry.voxelVolumeMl, means))
        return statistics

    @staticmethod
    def _storeAttributes(segmentationNode, request: _Request, result: WorkerResult, finalNll: float,
                         statistics: list[ClassStatistics]) -> None:
        values = {
            "Method": result.method,
            "Seed": str(request.seed),
            "NumberOfClasses": str(request.numberOfClasses),
            "Device": result.device,
            "FinalNLL": repr(finalNll),
            "Iterations": str(result.numberOfIterations),
            "Version": packageVersion(),
            "Options": json.dumps(request.options, sort_keys=True),
            "ClassStatistics": json.dumps([vars(s) for s in statistics]),
        }
        wasModifying = segmentationNode.StartModify()
        for name, value in values.items():
            segmentationNode.SetAttribute(ATTRIBUTE_PREFIX + name, value)
        segmentationNode.RemoveNodeReferenceIDs(INPUT_REFERENCE_ROLE)
        for volume in request.inputVolumes:
            segmentationNode.AddNodeReferenceID(INPUT_REFERENCE_ROLE, volume.GetID())
        segmentationNode.EndModify(wasModifying)


def _trainedModelNeeds(modelPath: str) -> str:
    """What a run with this model needs, from its metadata (appended to a mismatch message)."""
    from .training import load_trained_model

    try:
        _, metadata = load_trained_model(modelPath)
    except ValueError:
        return ""
    names = ", ".join(str(name) for name in metadata.get("channel_names") or [])
    return (f"This model needs {metadata.get('n_channels')} input volume(s) in the order {names} ("
            f"{metadata.get('spatial_dims')}D), numberOfClasses={metadata.get('n_classes')} and "
            f"method={metadata.get('method')!r}.")


def _applicationEventPump() -> Callable[[], None]:
    """Inside Slicer, a blocking run keeps repainting the application (as other Slicer modules'
    blocking runs do); elsewhere there is nothing to pump."""
    if isSlicerApplication():
        import slicer

        return slicer.app.processEvents
    return lambda: None


def packageVersion() -> str:
    """Version of DeepGMMSegment (the package's ``__version__``, else the installed distribution)."""
    import sys

    package = sys.modules.get(__package__)
    version = getattr(package, "__version__", None)
    if version:
        return str(version)
    try:
        import importlib.metadata

        return importlib.metadata.version("deepgmmsegment")
    except Exception:  # noqa: BLE001 - running from a plain checkout
        return "unknown"
