"""Qt-free helpers of the DeepGMMSegment panel (the widget in ``DeepGMMSegment.py``).

Everything the panel decides or formats without touching a Qt widget lives here, so that CI can
test it with plain pytest: which channel selectors to show, whether the inputs can be segmented,
the engine options from the advanced settings, what to show and refuse for a trained model file,
the progress text, the rows of the results table and the order of a developer reload.

Method names and defaults come from :mod:`DeepGMMSegmentLib.options` (torch-free), so the widget
loads this before PyTorch is installed. The prior-means text is parsed by
``options.parse_prior_means``, the one syntax of every surface.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
from typing import Any, Callable, Iterable, Optional, Sequence

from ..options import DEEP_METHODS, DEFAULT_METHOD, METHODS

#: Member names of the Slicer enum of each method, keyed by ``options.METHODS``: the parameter node
#: saves these names in scenes, so they stay as they are.
METHOD_ENUM_NAMES = {"deepsvg": "DEEP_SVG", "deepg": "DEEP_G", "em-gmm": "EM_GMM", "em-svgmm": "EM_SVGMM"}
#: How each method is written in the panel, keyed by ``options.METHODS``.
METHOD_SHORT_NAMES = {"deepsvg": "deepSVG", "deepg": "deepG", "em-gmm": "EM-GMM", "em-svgmm": "EM-SVGMM"}
_METHOD_NOTES = {DEFAULT_METHOD: "default", "em-gmm": "classic, fast", "em-svgmm": "classic, spatially variant"}
#: Combo box texts of the method enum, in ``options.METHODS`` order (the .ui lists the same items).
METHOD_LABELS = {method: METHOD_SHORT_NAMES[method] + (f" ({_METHOD_NOTES[method]})" if method in _METHOD_NOTES else "")
                 for method in METHODS}
DEVICE_LABELS = {"auto": "Automatic", "cpu": "CPU", "cuda": "CUDA (GPU)"}
COVARIANCE_LABELS = {"full": "Full", "diag": "Diagonal"}

#: Column titles of the results table, in order (the .ui file declares the same columns).
RESULT_COLUMNS = ("Output", "Method", "Class", "Volume (mL)", "Mean intensity (channel 1 / 2 / ...)", "Final NLL")


def channelSelectorVisibility(selected: Sequence[bool]) -> list[bool]:
    """Which channel selectors to show, given which ones hold a volume.

    Channel 1 is always shown; channel k+1 appears once channel k is chosen, and a selector
    that holds a volume stays visible (so a volume is never hidden from the user).
    """
    visible = []
    for index, isSelected in enumerate(selected):
        previousChosen = index == 0 or bool(selected[index - 1])
        visible.append(previousChosen or bool(isSelected))
    return visible


def _nodeKey(node: Any) -> Any:
    """Identity of an MRML node for duplicate checks (its ID when it has one)."""
    getId = getattr(node, "GetID", None)
    nodeId = getId() if callable(getId) else None
    return nodeId if nodeId else id(node)


def inputChannelsProblem(volumes: Sequence[Any]) -> Optional[str]:
    """Return why the chosen channels cannot be segmented, or None when they can.

    ``volumes`` are the selectors' nodes in channel order (None where empty). Channel 1 is
    required, the order must have no gap (it is the channel order the model sees), and a volume
    may appear only once.
    """
    if not volumes or volumes[0] is None:
        return "Select the first channel (channel 1 defines the output grid)."
    lastChosen = max(index for index, volume in enumerate(volumes) if volume is not None)
    for index in range(lastChosen):
        if volumes[index] is None:
            return (f"Channel {index + 1} is empty but channel {lastChosen + 1} is set: "
                    f"fill channel {index + 1} or clear the later channels.")
    seen = {}
    for index, volume in enumerate(volumes[: lastChosen + 1]):
        key = _nodeKey(volume)
        if key in seen:
            return (f"Channel {index + 1} repeats channel {seen[key] + 1}: "
                    "choose a different volume or clear it.")
        seen[key] = index
    return None


def inputsProblem(volumes: Sequence[Any], maskSegmentation: Any = None, maskSegmentId: str = "") -> Optional[str]:
    """Why Segment cannot run with these inputs (channels, optional mask segment), or None."""
    problem = inputChannelsProblem(volumes)
    if problem is None and maskSegmentation is not None and not maskSegmentId:
        problem = "Choose a segment of the mask segmentation, or clear the mask."
    return problem


def chosenChannels(volumes: Sequence[Any]) -> list[Any]:
    """The chosen volumes in channel order (empty selectors dropped)."""
    return [volume for volume in volumes if volume is not None]


# The smoothness spin box's lowest value, shown as "automatic": deepSVG chooses the weight from the
# image's noise (options.adaptive_smoothness). 0 stays a choice of its own (the published loss).
AUTOMATIC_SMOOTHNESS = -0.1


def smoothnessFor(method: str, smoothness: float) -> Optional[float]:
    """The panel's spatial smoothness for ``method``: deepSVG only (deepG and EM use none), else None.

    ``AUTOMATIC_SMOOTHNESS`` (any negative value) is None too: the engine then chooses it from the noise.
    """
    return float(smoothness) if method == "deepsvg" and smoothness >= 0 else None


# The label smoothing spin box's lowest value, shown as "off": deepSVG's labels and probability maps
# are then the network's output (label_mrf="off"). 0 stays a choice of its own (the fitted model's
# posterior without neighbours); the box's default is the engine's, options.LABEL_MRF.
LABEL_MRF_OFF = -0.1


def labelMrfFor(method: str, labelSmoothing: float) -> Optional[float | str]:
    """The panel's label smoothing as deepSVG's ``label_mrf`` option: the Potts strength under which
    the labels are computed from the fitted model, "off" for ``LABEL_MRF_OFF`` (any negative value:
    the network's output). deepSVG only (the other methods have no such step), else None."""
    if method != "deepsvg":
        return None
    return "off" if labelSmoothing < 0 else float(labelSmoothing)


def engineOptions(maxIterations: int = 0, tolerance: float = 0.0, covarianceType: str = "full",
                  priorMeans: Optional[list[list[float]]] = None, smoothness: Optional[float] = None,
                  labelMrf: Optional[float | str] = None) -> dict:
    """Engine options from the advanced settings; 0 means "the method's default" and is left out
    (except ``smoothness`` and ``labelMrf``, where 0 is a choice: None leaves them out)."""
    options: dict = {"covariance_type": covarianceType}
    if smoothness is not None:
        options["smoothness"] = float(smoothness)
    if labelMrf is not None:
        options["label_mrf"] = labelMrf if isinstance(labelMrf, str) else float(labelMrf)
    if maxIterations and maxIterations > 0:
        options["max_iter"] = int(maxIterations)
    if tolerance and tolerance > 0:
        options["tol"] = float(tolerance)
    if priorMeans is not None:
        options["prior_means"] = [list(row) for row in priorMeans]
    return options


def biasFieldOption(correct: bool, order: int = 0):
    """``process(biasField=...)`` from the panel: "none" unchecked, else "detect" (order 0, the
    spin box's "when detected", the default) or the chosen basis order (always corrected)."""
    if not correct:
        return "none"
    return int(order) if order and order > 0 else "detect"


#: Deep methods a trained model can be made for (engine names, in ``options.METHODS`` order).
TRAINED_MODEL_METHODS = tuple(method for method in METHODS if method in DEEP_METHODS)
#: Number of classes the panel's spin box allows (the parameter node's range).
CLASS_RANGE = (2, 12)
UNCHECK_HINT = "or uncheck 'Use trained model'"
TORCH_NEEDED_TEXT = ("PyTorch is not installed yet: the model file is read and checked when you click Segment "
                     "(PyTorch is offered then).")


def trainedModelPathProblem(path: Any) -> Optional[str]:
    """Why ``path`` cannot be a model file (empty, missing, a folder), or None. Needs no PyTorch."""
    text = "" if path is None else str(path).strip()
    if not text or text == ".":
        return f"Choose a trained model file (.pt, written by deepgmm-train) {UNCHECK_HINT}."
    if not os.path.exists(text):
        return f"The trained model file {text!r} does not exist: choose another file {UNCHECK_HINT}."
    if not os.path.isfile(text):
        return f"{text!r} is not a file: choose a trained model file (.pt) {UNCHECK_HINT}."
    return None


def describeTrainedModel(path: Any, modelIo: Any, cache: Optional[dict] = None) -> tuple[Optional[dict], Optional[str]]:
    """``(metadata, None)`` for a readable model file, ``(None, why not)`` otherwise.

    ``modelIo`` is ``DeepGMMSegmentLib.trained.model_file`` (it needs PyTorch), or None when PyTorch is not
    installed yet: then ``(None, None)`` (not known yet) is returned for an existing file. Files
    are read with ``model_file.describe_model``, which never runs code from the file. ``cache``
    (a dict the caller keeps) remembers each file version (path, size, modification time).
    """
    problem = trainedModelPathProblem(path)
    if problem is not None:
        return None, problem
    if modelIo is None:
        return None, None
    path = os.path.abspath(str(path).strip())
    status = os.stat(path)
    key = (path, status.st_size, status.st_mtime_ns)
    if cache is not None and key in cache:
        return cache[key]
    try:
        result = dict(modelIo.describe_model(path)), None
    except (ValueError, OSError) as error:
        result = None, f"This file cannot be used as a trained model: {error}"
    if cache is not None:
        while len(cache) >= 8:
            cache.pop(next(iter(cache)))
        cache[key] = result
    return result


def trainedModelSettings(info: Optional[dict]) -> Optional[tuple[str, int]]:
    """``(method, numberOfClasses)`` the panel takes over from a model's metadata, or None if unusable."""
    if not info or info.get("method") not in TRAINED_MODEL_METHODS:
        return None
    try:
        numberOfClasses = int(info.get("n_classes"))
    except (TypeError, ValueError):
        return None
    if not CLASS_RANGE[0] <= numberOfClasses <= CLASS_RANGE[1]:
        return None
    return info["method"], numberOfClasses


def trainedModelSummary(path: Any, modelIo: Any, cache: Optional[dict] = None) -> str:
    """The text under the model file: its metadata (``model_file.format_description``) or why it cannot be used."""
    info, error = describeTrainedModel(path, modelIo, cache)
    if error is not None:
        return error
    if info is None:
        return TORCH_NEEDED_TEXT
    lines = [modelIo.format_description(info)]
    size = int(info.get("file_size_bytes") or 0)
    sizeText = f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"
    lines.append(f"file: {info.get('path')} ({sizeText}, {info.get('n_parameters')} parameters)")
    settings = trainedModelSettings(info)
    if settings is not None:
        lines.append(f"Segment uses the model's method ({METHOD_SHORT_NAMES[settings[0]]}) and its "
                     f"{settings[1]} classes.")
    return "\n".join(lines)


def trainedModelProblem(path: Any, numberOfChannels: int, modelIo: Any, cache: Optional[dict] = None,
                        channelNames: Optional[Sequence[str]] = None,
                        numberOfClasses: Optional[int] = None) -> Optional[str]:
    """Why Segment cannot run with this model and these inputs (message with the fix), or None.

    The comparison is ``model_file.check_compatible`` (the one place that decides compatibility):
    channel count, 3D (Slicer volumes are 3D), number of classes and, when the chosen volumes
    are named exactly like the model's channels in some order (e.g. "T1", "PD"), their order.
    Without PyTorch (``modelIo`` None) only the path is checked; the logic checks the rest
    before anything runs.
    """
    info, error = describeTrainedModel(path, modelIo, cache)
    if error is not None or info is None:
        return error
    if trainedModelSettings(info) is None:
        return (f"The model is for method {info.get('method')!r} with {info.get('n_classes')} classes; this panel "
                f"runs trained {' / '.join(METHOD_SHORT_NAMES[m] for m in TRAINED_MODEL_METHODS)} models with "
                f"{CLASS_RANGE[0]}-{CLASS_RANGE[1]} classes. Use the Python console (DeepGMMSegmentLogic) "
                f"{UNCHECK_HINT}.")
    modelNames = [str(name) for name in info.get("channel_names") or []]
    given = [str(name) for name in channelNames] if channelNames is not None else None
    if given is None or sorted(n.lower() for n in given) != sorted(n.lower() for n in modelNames):
        given = None  # volume names are free text: compared only when they are the model's channel names
    try:
        modelIo.check_compatible(info, int(numberOfChannels), spatial_dims=3, channel_names=given,
                                 n_classes=numberOfClasses)
    except ValueError as error:
        return f"{error} {trainedModelFix(info)}"
    return None


def trainedModelFix(info: dict) -> str:
    """What to choose so that the model fits, from its metadata (appended to a mismatch message)."""
    if int(info.get("spatial_dims") or 3) != 3:
        return ("Slicer volumes are 3D, so this model (trained on 2D images) cannot be used here: "
                f"train one on 3D volumes {UNCHECK_HINT}.")
    count = int(info.get("n_channels") or 0)
    names = ", ".join(str(name) for name in info.get("channel_names") or [])
    return f"Choose {count} input volume{'s' if count != 1 else ''} in the order {names}, {UNCHECK_HINT}."


def trainedModelOptions(path: Any, fineTuneSteps: int = 0, labelMrf: Optional[float | str] = None) -> dict:
    """Engine options for a run with a trained model: the model file, the fine-tuning steps (0 = one pass) and,
    for a deepSVG model, the label smoothing (``labelMrfFor``; None leaves the engine's default)."""
    options = {"model": os.path.abspath(str(path).strip()), "fine_tune": max(0, int(fineTuneSteps))}
    if labelMrf is not None:
        options["label_mrf"] = labelMrf if isinstance(labelMrf, str) else float(labelMrf)
    return options


def formatDuration(seconds: Optional[float]) -> str:
    """Human-readable duration: '42 s', '3 min 05 s', '1 h 02 min'."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _field(record: Any, name: str, default: Any = None) -> Any:
    """Read ``name`` from a dataclass-like object or a dict."""
    if isinstance(record, dict):
        return record.get(name, default)
    return getattr(record, name, default)


def formatProgress(info: Any) -> tuple[Optional[int], str]:
    """Progress bar percentage (None when unknown) and status text for one ProgressInfo.

    ``info`` has ``stage``, ``iteration``, ``maxIterations``, ``nll``, ``elapsedSeconds`` and
    ``remainingSeconds`` (any of them may be None).
    """
    stage = str(_field(info, "stage") or "working").capitalize()
    iteration = _field(info, "iteration")
    maxIterations = _field(info, "maxIterations")
    nll = _field(info, "nll")
    remaining = _field(info, "remainingSeconds")
    elapsed = _field(info, "elapsedSeconds")

    percent = None
    parts = [stage]
    if iteration is not None and maxIterations:
        percent = max(0, min(100, int(100 * iteration / maxIterations)))
        parts.append(f"iteration {iteration}/{maxIterations}")
    if nll is not None and math.isfinite(nll):
        parts.append(f"NLL {nll:.4f}")
    if remaining is not None and math.isfinite(remaining):
        parts.append(f"about {formatDuration(remaining)} left")
    elif elapsed:  # nothing to say at 0 s
        parts.append(f"{formatDuration(elapsed)} elapsed")
    return percent, " \u00b7 ".join(parts)


def describeComputeDevices(facts: dict) -> str:
    """One line about the compute devices torch sees, from ``worker.deviceFacts()``'s dict
    (asked in a worker process: torch and CUDA never start in Slicer's GUI process)."""
    devices = facts.get("cuda") or []
    if not facts.get("cudaAvailable") or not devices:
        return "No CUDA GPU found: Automatic runs on the CPU."
    descriptions = [f"cuda:{index} {device.get('name')} ({device.get('totalMemoryBytes', 0) / 1024**3:.0f} GB)"
                    for index, device in enumerate(devices)]
    return "GPU: " + ", ".join(descriptions)


#: Texts of the device label while the device question is open or cannot be answered.
DEVICE_QUERY_RUNNING_TEXT = "Looking for GPUs..."
TORCH_NOT_INSTALLED_TEXT = "PyTorch not installed yet (offered on first Segment)."


def deviceQueryFailedText(error: Any) -> str:
    return f"PyTorch cannot be used: {error}"


def formatMeans(meanIntensities: Sequence[float]) -> str:
    """Mean intensity per channel, in channel order: '412.3 / 88.07'."""
    return " / ".join(f"{float(value):.4g}" for value in meanIntensities)


def resultRows(outputName: str, methodLabel: str, classStatistics: Sequence[Any],
               finalNll: Optional[float]) -> list[tuple[str, ...]]:
    """Rows of the results table for one output: one row per class, columns as RESULT_COLUMNS."""
    nllText = f"{finalNll:.4f}" if finalNll is not None and math.isfinite(finalNll) else ""
    rows = []
    for statistics in classStatistics:
        rows.append((
            outputName,
            methodLabel,
            str(_field(statistics, "name", "")),
            f"{float(_field(statistics, 'volumeMl', 0.0)):.2f}",
            formatMeans(_field(statistics, "meanIntensities", ()) or ()),
            nllText,
        ))
    return rows


class SessionResults:
    """The results table's content: every output computed in this session, in run order.

    A new run into the same output replaces that output's rows; outputs deleted from the scene
    are dropped when the rows are built.
    """

    def __init__(self):
        self._byOutputId: dict = {}

    def add(self, outputId: str, methodName: str, outputs: Any) -> None:
        """Record (or replace) the result written into output ``outputId``."""
        self._byOutputId.pop(outputId, None)
        self._byOutputId[outputId] = (methodName, outputs)

    def clear(self) -> None:
        self._byOutputId.clear()

    def __len__(self) -> int:
        return len(self._byOutputId)

    def rows(self, outputName: Callable[[str], Optional[str]]) -> list[tuple[str, ...]]:
        """Table rows; ``outputName(outputId)`` gives the node's current name, or None once it is deleted."""
        rows = []
        for outputId, (methodName, outputs) in list(self._byOutputId.items()):
            name = outputName(outputId)
            if name is None:
                del self._byOutputId[outputId]
                continue
            rows.extend(resultRows(name, methodName, _field(outputs, "classStatistics", ()),
                                   _field(outputs, "finalNll")))
        return rows


def completionText(methodName: str, device: str, seconds: Optional[float], finalNll: Optional[float]) -> str:
    """Status line after a successful run."""
    nllText = f", final NLL {finalNll:.4f}" if finalNll is not None and math.isfinite(finalNll) else ""
    return f"Done: {methodName} on {device} in {formatDuration(seconds)}{nllText}."


def replaceQuestion(outputName: str, withRoi: bool) -> str:
    """The question the panel asks before writing into an output that already holds segments."""
    if withRoi:
        return (f'"{outputName}" already holds a segmentation. Recompute the voxels inside the ROI box '
                "and keep everything outside it?\n\nTo keep the old result untouched, choose "
                '"Create new segmentation" as output instead.')
    return (f'"{outputName}" already holds a segmentation. Replace its content with the new result?\n\n'
            'To compare methods, choose "Create new segmentation" as output instead: both results are kept.')


# Sample Data: the bundled MNI152 T1 (2 mm) and its brain mask, one click in the Sample Data module.
SAMPLE_DATA_CATEGORY = "DeepGMMSegment"
# (file name, node name, Slicer file type): the mask loads as a segmentation, ready for the Mask selector.
SAMPLE_DATA_FILES = (("mni152_2009_t1_2mm.nii.gz", "MNI152 T1", "VolumeFile"),
                     ("mni152_2009_brainmask_2mm.nii.gz", "MNI152 brain mask", "SegmentationFile"))


def sampleDataSource(moduleFolder: str) -> dict:
    """Arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` for the bundled sample.

    The files ship with the module in ``Resources/SampleData`` (250 kB), so the URIs are local
    ``file://`` URIs: Sample Data copies them into its cache with ``urllib`` and checks the SHA256."""
    folder = os.path.join(moduleFolder, "Resources", "SampleData")
    paths = [os.path.join(folder, entry[0]) for entry in SAMPLE_DATA_FILES]

    def sha256(path):
        with open(path, "rb") as file:
            return "SHA256:" + hashlib.sha256(file.read()).hexdigest()

    return {
        "category": SAMPLE_DATA_CATEGORY,
        "sampleName": "MNI152 T1 + brain mask (2 mm)",
        "thumbnailFileName": os.path.join(folder, "mni152_thumbnail.png"),
        "uris": [pathlib.Path(path).as_uri() for path in paths],
        "fileNames": [entry[0] for entry in SAMPLE_DATA_FILES],
        "nodeNames": [entry[1] for entry in SAMPLE_DATA_FILES],
        "loadFileTypes": [entry[2] for entry in SAMPLE_DATA_FILES],
        "checksums": [sha256(path) for path in paths],
    }


def reloadOrder(moduleNames: Iterable[str], package: str) -> list[str]:
    """The loaded modules of ``package`` in the order a developer reload runs them.

    ``options`` and ``result`` first (the vocabulary imports nothing of the package), then the
    deepest modules first (``slicer_adapter.*`` before ``logic``, which imports them), the
    package itself last. Modules of one depth go in name order."""
    names = [name for name in moduleNames if name == package or name.startswith(package + ".")]
    vocabulary = [f"{package}.{name}" for name in ("options", "result") if f"{package}.{name}" in names]
    rest = sorted((name for name in names if name not in vocabulary), key=lambda name: (-name.count("."), name))
    return vocabulary + rest
