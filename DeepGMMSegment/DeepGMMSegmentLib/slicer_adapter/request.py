"""Slicer adapter, reading the request: check :meth:`DeepGMMSegmentLogic.process`'s arguments and
read the channels, mask and ROI from the scene.

The first step of a run (read the scene here, run the worker in :mod:`.runner`, write the scene
in :mod:`.outputs`). A trained model file is checked through :mod:`DeepGMMSegmentLib.trained.inference`
once PyTorch is installed (imported then, not at load time).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..options import DEFAULT_BIAS_FIELD, METHODS, detects_bias_field, resolve_bias_field_order
from . import geometry
from .geometry import VolumeGeometry
from .seeds import ReferenceSegments, referenceSegments, segmentCountProblem

MAXIMUM_INPUTS = 4

# Options the logic sets itself (or that cannot cross a process boundary).
RESERVED_OPTIONS = ("channels", "n_classes", "method", "mask", "spacing", "device", "seed", "progress",
                    "cancel_event", "bias_field", "seeds")
# The process() argument that replaces each reserved engine option a user may mean.
_ARGUMENT_OF_OPTION = {"bias_field": "biasField", "seeds": "seedSegmentation"}


@dataclass
class Request:
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
    geometry: VolumeGeometry
    region: tuple | None
    regionMask: np.ndarray | None
    biasField: str | int = DEFAULT_BIAS_FIELD  # the engine's bias_field: "none", "auto", "detect" or a basis order
    reference: ReferenceSegments | None = None  # seeds from the reference segments, with names and colours

    @property
    def correctsBiasField(self) -> bool:
        """Whether the engine is asked for a field (always, or when it detects one)."""
        return resolve_bias_field_order(self.biasField) > 0

    @property
    def alwaysCorrectsBiasField(self) -> bool:
        """Whether every run returns a field ("detect" returns one only when it finds one)."""
        return self.correctsBiasField and not detects_bias_field(self.biasField)

    def regionSeeds(self) -> np.ndarray | None:
        """The seed labels the engine gets: on the ROI's region when there is one, else the whole grid."""
        if self.reference is None:
            return None
        return self.reference.labels[self.region] if self.region else self.reference.labels

    def engineOptions(self) -> dict:
        """What the worker passes to ``segment()`` besides the arrays: the options and the bias field."""
        return {**self.options, "bias_field": self.biasField}  # explicit: "none" must not become the engine's default


def prepareRequest(inputVolumes, outputSegmentation, numberOfClasses, method, roi, mask, device, seed,
                   options, probabilityMaps, biasField=DEFAULT_BIAS_FIELD, seedSegmentation=None) -> Request:
    """Check every argument (``ValueError`` naming the problem and the fix) and read the scene."""
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
    options = checkedOptions(options)
    biasField = checkedBiasField(biasField)
    maskSegmentId = ""  # the mask segment, when the strokes were painted into the mask's segmentation
    if seedSegmentation is not None:
        if not (hasattr(seedSegmentation, "IsA") and seedSegmentation.IsA("vtkMRMLSegmentationNode")):
            raise ValueError("seedSegmentation must be a segmentation node (painted in the Segment Editor) or None.")
        if outputSegmentation is not None and outputSegmentation.GetID() == seedSegmentation.GetID():
            raise ValueError("The reference segments cannot also be the output: choose another output segmentation "
                             "(or Create new segmentation).")
        if options.get("prior_means") is not None:
            raise ValueError("Give either prior class means or reference segments, not both: the painted voxels "
                             "give the class means. Clear one of them.")
        if options.get("model") is not None:
            raise ValueError("Reference segments cannot be combined with a trained model: the model's training fixed "
                             "its classes. Clear Reference segments or uncheck Use trained model.")
        maskNode = mask[0] if isinstance(mask, (list, tuple)) and mask else None
        if hasattr(maskNode, "GetID") and maskNode.GetID() == seedSegmentation.GetID():
            maskSegmentId = str(mask[1])
        problem = segmentCountProblem(seedSegmentation, int(numberOfClasses), maskSegmentId)
        if problem is not None:  # before the inputs are read
            raise ValueError(problem)

    channels, covered, gridGeometry = geometry.channelsOnReferenceGrid(inputVolumes)
    validMask = covered
    if mask is not None:
        validMask = validMask & maskArray(mask, gridGeometry)
    region = geometry.roiRegion(roi, inputVolumes[0]) if roi is not None else None
    regionMask = validMask[region] if region is not None else validMask
    if not regionMask.any():
        where = " inside the ROI" if region is not None else ""
        raise ValueError(f"No voxel to segment{where}: the mask (and the area covered by every input) is empty "
                         "there. Choose another mask segment or move the ROI.")
    reference = None
    if seedSegmentation is not None:
        reference = referenceSegments(seedSegmentation, gridGeometry, validMask, int(numberOfClasses), region,
                                      maskSegmentId)
    return Request(
        inputVolumes=inputVolumes, outputSegmentation=outputSegmentation, numberOfClasses=int(numberOfClasses),
        method=method, device=device, seed=int(seed), options=options, probabilityMaps=bool(probabilityMaps),
        channels=channels, geometry=gridGeometry, region=region,
        regionMask=None if regionMask.all() else regionMask, biasField=biasField, reference=reference)


def checkedBiasField(biasField):
    """``process(biasField=...)`` as the engine's ``bias_field``: True = "auto", False/None = "none",
    else "none", "auto", "detect" or a basis order (checked by ``options.resolve_bias_field_order``)."""
    if biasField is None or biasField is False:
        return "none"
    if biasField is True:
        return "auto"
    try:
        order = resolve_bias_field_order(biasField)
    except ValueError as error:
        raise ValueError(f"biasField: {error}") from None
    if order == 0:
        return "none"
    if isinstance(biasField, str) and biasField.strip().lower() in ("auto", "detect"):
        return biasField.strip().lower()
    return order


def maskArray(mask, gridGeometry: VolumeGeometry) -> np.ndarray:
    """The ``mask`` argument (segment or labelmap volume) as a boolean array on the first input's grid."""
    if isinstance(mask, (list, tuple)):
        if len(mask) != 2 or not hasattr(mask[0], "IsA") or not mask[0].IsA("vtkMRMLSegmentationNode"):
            raise ValueError("mask must be (segmentationNode, segmentId) or a labelmap volume node.")
        return geometry.maskFromSegment(mask[0], str(mask[1]), gridGeometry)
    if hasattr(mask, "IsA") and mask.IsA("vtkMRMLLabelMapVolumeNode"):
        return geometry.maskFromLabelmapVolume(mask, gridGeometry)
    if hasattr(mask, "IsA") and mask.IsA("vtkMRMLSegmentationNode"):
        raise ValueError("A segmentation was given as mask without a segment. Pass (segmentationNode, segmentId).")
    raise ValueError("mask must be (segmentationNode, segmentId) or a labelmap volume node.")


def _plain(value):
    """``value`` with paths, numpy arrays and numpy scalars turned into JSON-compatible values."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def checkedOptions(options) -> dict:
    """The engine options of ``process()``, checked and made JSON-compatible (they cross to the worker)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError("options must be a dict of engine options (e.g. {'max_iter': 50}).")
    reserved = sorted(set(options) & set(RESERVED_OPTIONS))
    if reserved:
        arguments = ", ".join(_ARGUMENT_OF_OPTION.get(name, name) for name in reserved)
        raise ValueError(f"options may not contain {', '.join(reserved)}: pass them as process() arguments "
                         f"({arguments}; cancel with cancelProcessing()).")
    converted = {key: _plain(value) for key, value in options.items()}
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


def checkTrainedModel(request: Request) -> None:
    """Refuse a trained model that does not fit the request, before the worker starts.

    ``trained.inference.check_model_request`` (``model_file.check_compatible``) compares channels,
    dimension and number of classes; the method must be the one the model was trained for.
    Needs torch (installed by then); the file is read safely (no code from it runs).
    """
    modelPath = request.options.get("model")
    if modelPath is None:
        return
    from ..trained.inference import check_model_request

    try:
        metadata = check_model_request(modelPath, request.numberOfClasses, len(request.channels),
                                       request.channels[0].ndim)
    except ValueError as error:
        raise ValueError(f"{error} {trainedModelNeeds(modelPath)}".strip()) from None
    if metadata.get("method") != request.method:
        raise ValueError(f"The trained model was trained for method {metadata.get('method')!r} but method="
                         f"{request.method!r} was requested. {trainedModelNeeds(modelPath)}")


def trainedModelNeeds(modelPath: str) -> str:
    """What a run with this model needs, from its metadata (appended to a mismatch message)."""
    from ..trained.inference import load_trained_model

    try:
        _, metadata = load_trained_model(modelPath)
    except ValueError:
        return ""
    names = ", ".join(str(name) for name in metadata.get("channel_names") or [])
    return (f"This model needs {metadata.get('n_channels')} input volume(s) in the order {names} ("
            f"{metadata.get('spatial_dims')}D), numberOfClasses={metadata.get('n_classes')} and "
            f"method={metadata.get('method')!r}.")
