"""Slicer adapter, the scene's outputs: class segments, probability volumes, subject hierarchy,
class statistics and the attributes a run leaves on its segmentation.

:func:`writeOutputs` turns the engine's :class:`~DeepGMMSegmentLib.result.SegmentationResult`
(rebuilt by the runner from the worker's files) into the scene's nodes and the documented
camelCase :class:`DeepGMMSegmentOutputs`. Only MRML/VTK classes of the ``slicer-core`` wheel are
used (no Qt), as in :mod:`.geometry`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import vtk

import slicer

from .. import __version__
from ..result import SegmentationResult, class_colors
from .geometry import (VolumeGeometry, arrayFromVolumeNode, localGeometry, mergedLabelmapArray, resampleArray,
                       sameGrid, updateVolumeNodeFromArray)
from .request import Request
from .runner import WorkerError

#: Segment tag holding the 1-based class index; identifies the segments this module owns.
CLASS_INDEX_TAG = "DeepGMMSegment.ClassIndex"
#: Node reference role from the output segmentation to its per-class probability volumes.
PROBABILITY_REFERENCE_ROLE = "DeepGMMSegmentProbability"
#: Attribute on a probability volume holding its 1-based class index.
PROBABILITY_CLASS_ATTRIBUTE = "DeepGMMSegment.ClassIndex"
#: Node reference roles from the output segmentation to the bias field and corrected volumes.
BIAS_FIELD_REFERENCE_ROLE = "DeepGMMSegmentBiasField"
CORRECTED_REFERENCE_ROLE = "DeepGMMSegmentCorrected"
#: Attribute on a bias field or corrected volume holding its 1-based channel index.
CHANNEL_INDEX_ATTRIBUTE = "DeepGMMSegment.ChannelIndex"
#: Subject hierarchy item attribute marking the folder of probability volumes made by this module.
PROBABILITY_FOLDER_ATTRIBUTE = "DeepGMMSegment.ProbabilityFolder"
# Attributes stored on the output segmentation node (saved with the scene).
ATTRIBUTE_PREFIX = "DeepGMMSegment."
INPUT_REFERENCE_ROLE = "DeepGMMSegmentInputVolume"
#: Node reference role from the output segmentation to the reference segments that named its classes.
REFERENCE_SEGMENTS_ROLE = "DeepGMMSegmentReferenceSegments"


def className(classIndex: int) -> str:
    """Name of the segment of 1-based class ``classIndex`` ("Class 1", "Class 2", ...)."""
    return f"Class {classIndex}"


def classColors(numberOfClasses: int) -> list[tuple[float, float, float]]:
    """Fixed, distinct RGB colours (0..1) for classes 1..K: ``result.class_colors``, the PNG preview's too."""
    return [tuple(float(c) for c in color) for color in class_colors(numberOfClasses)]


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
    biasFieldVolumes: list = field(default_factory=list)  # "<input> bias field" per channel (biasField on)
    correctedVolumes: list = field(default_factory=list)  # "<input> corrected" per channel (biasField on)


def writeOutputs(request: Request, result: SegmentationResult) -> DeepGMMSegmentOutputs:
    """Write one run's result into the scene (segmentation, probability volumes, hierarchy, attributes)."""
    firstInput = request.inputVolumes[0]
    scene = firstInput.GetScene()
    numberOfClasses = request.numberOfClasses
    expectedShape = request.channels[0][request.region].shape if request.region else request.geometry.shape
    if tuple(result.labels.shape) != tuple(expectedShape) or result.probabilities.shape[0] != numberOfClasses:
        raise WorkerError(f"The engine returned arrays of shape {result.labels.shape} / "
                          f"{result.probabilities.shape}; expected {expectedShape} with {numberOfClasses} classes.")
    if request.alwaysCorrectsBiasField and (result.bias_field is None or result.corrected is None):
        raise WorkerError("The engine returned no bias field although one was requested.")
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
        labels = readClassLabels(segmentationNode, request.geometry).astype(np.uint8)
        labels[labels > numberOfClasses] = 0
        labels[request.region] = result.labels
    names, colors = classNamesAndColors(request, result)
    writeClassSegments(segmentationNode, labels, numberOfClasses, firstInput, names, colors,
                       renamed=len(request.reference.names) if request.reference else 0)

    if request.probabilityMaps:
        volumes = writeProbabilityVolumes(segmentationNode, result.probabilities, firstInput, request.region, names)
    else:
        for node in probabilityVolumes(segmentationNode).values():
            scene.RemoveNode(node)
        volumes = []
    folderItem = placeOutputs(segmentationNode, volumes, firstInput, f"{segmentationNode.GetName()} probabilities")
    biasFieldVolumes, correctedVolumes = writeBiasFieldVolumes(segmentationNode, request, result)
    placeBesideInput(biasFieldVolumes + correctedVolumes, firstInput)

    statistics = classStatistics(labels, request.channels, numberOfClasses, request.geometry, names)
    finalNll = float(result.nll)
    storeAttributes(segmentationNode, request, result, finalNll, statistics)
    return DeepGMMSegmentOutputs(
        segmentationNode=segmentationNode, probabilityVolumes=volumes, probabilityFolderItemId=folderItem,
        classStatistics=statistics, finalNll=finalNll, method=result.method, device=result.device,
        seconds=result.seconds, seed=request.seed, numberOfIterations=result.n_iter,
        converged=result.converged, nllHistory=list(result.nll_history), region=request.region,
        biasFieldVolumes=biasFieldVolumes, correctedVolumes=correctedVolumes)


def classNamesAndColors(request: Request, result: SegmentationResult) -> tuple[list[str], list[tuple]]:
    """Name and colour of each output class: the reference segments' for the classes they mark (in
    their order), else the names a trained model stores, else "Class k"; the fixed palette for
    classes no reference segment colours."""
    names = [className(k) for k in range(1, request.numberOfClasses + 1)]
    if result.class_names is not None and len(result.class_names) == request.numberOfClasses:
        names = [str(name) for name in result.class_names]
    colors = classColors(request.numberOfClasses)
    if request.reference is not None:
        marked = len(request.reference.names)
        names[:marked], colors[:marked] = request.reference.names, request.reference.colors
    return names, colors


def classStatistics(labels: np.ndarray, channels: Sequence[np.ndarray], numberOfClasses: int,
                    geometry: VolumeGeometry, names: Sequence[str] | None = None) -> list[ClassStatistics]:
    """Voxel count, volume (mL) and mean intensity per channel of each class of ``labels``
    (classes named ``names``, default "Class k")."""
    names = names or [className(k) for k in range(1, numberOfClasses + 1)]
    flatLabels = labels.ravel()
    counts = np.bincount(flatLabels, minlength=numberOfClasses + 1)
    sums = [np.bincount(flatLabels, weights=channel.ravel().astype(np.float64), minlength=numberOfClasses + 1)
            for channel in channels]
    statistics = []
    for classIndex in range(1, numberOfClasses + 1):
        count = int(counts[classIndex])
        means = [float(channelSums[classIndex] / count) if count else float("nan") for channelSums in sums]
        statistics.append(ClassStatistics(classIndex, names[classIndex - 1], count,
                                          count * geometry.voxelVolumeMl, means))
    return statistics


def storeAttributes(segmentationNode, request: Request, result: SegmentationResult, finalNll: float,
                    statistics: list[ClassStatistics]) -> None:
    """The run's facts as ``DeepGMMSegment.*`` attributes, and references to the input volumes."""
    values = {
        "Method": result.method,
        "Seed": str(request.seed),
        "NumberOfClasses": str(request.numberOfClasses),
        "Device": result.device,
        "FinalNLL": repr(finalNll),
        "Iterations": str(result.n_iter),
        "Version": __version__,
        "Options": json.dumps(request.options, sort_keys=True),
        "BiasField": str(request.biasField),
        "BiasFieldCorrected": "true" if result.bias_field is not None else "false",
        "ClassStatistics": json.dumps([vars(s) for s in statistics]),
    }
    wasModifying = segmentationNode.StartModify()
    for name, value in values.items():
        segmentationNode.SetAttribute(ATTRIBUTE_PREFIX + name, value)
    segmentationNode.RemoveNodeReferenceIDs(INPUT_REFERENCE_ROLE)
    for volume in request.inputVolumes:
        segmentationNode.AddNodeReferenceID(INPUT_REFERENCE_ROLE, volume.GetID())
    seedNode = request.reference.segmentationNode if request.reference is not None else None
    segmentationNode.SetNodeReferenceID(REFERENCE_SEGMENTS_ROLE, seedNode.GetID() if seedNode is not None else None)
    segmentationNode.EndModify(wasModifying)


# --------------------------------------------------------------------------------------------
# Output segmentation


def classSegmentIds(segmentationNode) -> dict[int, str]:
    """Map class index -> segment id for the class segments this module wrote into the node."""
    segmentation = segmentationNode.GetSegmentation()
    result = {}
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        tagValue = vtk.reference("")
        if segment.GetTag(CLASS_INDEX_TAG, tagValue):
            try:
                result[int(str(tagValue))] = segmentation.GetNthSegmentID(n)
            except ValueError:
                continue
    return result


def readClassLabels(segmentationNode, geometry: VolumeGeometry) -> np.ndarray:
    """The class labels (0 = none, k = class k) of an existing output, rasterised on ``geometry``."""
    classIds = classSegmentIds(segmentationNode)
    indices = sorted(classIds)
    return mergedLabelmapArray(segmentationNode, [classIds[k] for k in indices], indices, geometry)


def writeClassSegments(segmentationNode, labels: np.ndarray, numberOfClasses: int, referenceVolume,
                       names: Sequence[str] | None = None, colors: Sequence | None = None, renamed: int = 0) -> None:
    """Write ``labels`` (0..K on the reference volume's grid) as one segment per class.

    All class segments share one binary labelmap layer (class k = label value k), exactly on the
    reference volume's grid, so nothing is resampled and the ``.seg.nrrd`` stays compact.
    Missing class segments are added as ``names`` / ``colors`` (default "Class k" and the fixed
    palette). Existing class segments keep their id, display settings and, beyond the first
    ``renamed`` classes (those a reference segment names), their name and colour; all get the new
    voxels. Class segments beyond K are removed. Segments this module did not write are left alone.
    """
    geometry = localGeometry(referenceVolume)
    names = list(names or [className(k) for k in range(1, numberOfClasses + 1)])
    colors = list(colors or classColors(numberOfClasses))
    segmentation = segmentationNode.GetSegmentation()
    representationName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    existing = classSegmentIds(segmentationNode)
    sharedLabelmap = geometry.orientedImage(np.where(labels <= numberOfClasses, labels, 0))
    wasModifying = segmentationNode.StartModify()
    try:
        if segmentation.GetNumberOfSegments() == 0:
            segmentation.SetSourceRepresentationName(representationName)
        elif segmentation.GetSourceRepresentationName() != representationName:
            raise ValueError(
                f"'{segmentationNode.GetName()}' stores its segments as "
                f"'{segmentation.GetSourceRepresentationName()}', not as a binary labelmap. Choose a new "
                "output segmentation.")
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        if segmentationNode.GetParentTransformNode() is not referenceVolume.GetParentTransformNode():
            segmentationNode.SetAndObserveTransformNodeID(referenceVolume.GetTransformNodeID())
        for classIndex, segmentId in existing.items():
            if classIndex > numberOfClasses:
                segmentation.RemoveSegment(segmentId)
        for classIndex in range(1, numberOfClasses + 1):
            segmentId = existing.get(classIndex)
            segment = segmentation.GetSegment(segmentId) if segmentId is not None else None
            name, color = names[classIndex - 1], colors[classIndex - 1]
            if segment is None:
                segment = slicer.vtkSegment()
                segment.SetName(name)
                segment.SetColor(*color)
                segment.SetTag(CLASS_INDEX_TAG, str(classIndex))
                segment.AddRepresentation(representationName, sharedLabelmap)
                segment.SetLabelValue(classIndex)
                if not segmentation.AddSegment(segment, segmentation.GenerateUniqueSegmentID(name)):
                    raise RuntimeError(f"Could not add segment '{name}' to '{segmentationNode.GetName()}'.")
            else:
                if classIndex <= renamed:
                    segment.SetName(name)
                    segment.SetColor(*color)
                segment.AddRepresentation(representationName, sharedLabelmap)
                segment.SetLabelValue(classIndex)
        # Tell displays and editors that the source representation changed (the image objects were
        # replaced, not modified in place).
        segmentation.InvokeEvent(slicer.vtkSegmentation.SourceRepresentationModified)
    finally:
        segmentationNode.EndModify(wasModifying)
    segmentationNode.Modified()


# --------------------------------------------------------------------------------------------
# Probability volumes and subject hierarchy


def referencedVolumes(segmentationNode, role: str, indexAttribute: str) -> dict[int, object]:
    """Map index -> volume node referenced by an output segmentation under ``role``; each volume
    holds its 1-based index (class or channel) in the attribute ``indexAttribute``."""
    result = {}
    for n in range(segmentationNode.GetNumberOfNodeReferences(role)):
        node = segmentationNode.GetNthNodeReference(role, n)
        if node is None:
            continue
        try:
            result[int(node.GetAttribute(indexAttribute))] = node
        except (TypeError, ValueError):
            continue
    return result


def probabilityVolumes(segmentationNode) -> dict[int, object]:
    """Map class index -> probability volume node referenced by an output segmentation."""
    return referencedVolumes(segmentationNode, PROBABILITY_REFERENCE_ROLE, PROBABILITY_CLASS_ATTRIBUTE)


def writeReferencedVolumes(segmentationNode, role: str, indexAttribute: str, arrays: np.ndarray, names: Sequence[str],
                           referenceVolume, region: tuple[slice, slice, slice] | None,
                           initial, windowLevelMinMax: tuple[float, float] | None = None) -> list:
    """Create or update one float32 volume per entry of ``arrays`` on the reference volume's grid.

    ``arrays`` is (N, k, j, i): the full grid, or the ``region`` only, in which case the voxels
    outside the region keep their previous values (``initial(index)``'s for new volumes). The
    volumes are referenced from the segmentation node under ``role``, so a rerun into the same
    output updates them (and removes those beyond N); new ones are named ``names[index - 1]``.
    ``windowLevelMinMax`` fixes the display range (else Slicer's automatic window/level).
    Returns the volumes in index order.
    """
    scene = segmentationNode.GetScene()
    geometry = localGeometry(referenceVolume)
    count = arrays.shape[0]
    existing = referencedVolumes(segmentationNode, role, indexAttribute)
    for index, node in existing.items():
        if index > count:
            # Removing the node also drops the segmentation's reference to it.
            scene.RemoveNode(node)
    volumes = []
    for index in range(1, count + 1):
        node = existing.get(index)
        values = arrays[index - 1].astype(np.float32, copy=False)
        if region is None:
            full = values
        else:
            if node is not None and node.GetImageData() is not None:
                full = _previousOnGrid(node, referenceVolume, geometry)
            else:
                full = np.array(initial(index), dtype=np.float32)
            full[region] = values
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", names[index - 1])
            node.SetAttribute(indexAttribute, str(index))
            segmentationNode.AddNodeReferenceID(role, node.GetID())
        updateVolumeNodeFromArray(node, full, geometry)
        if node.GetParentTransformNode() is not referenceVolume.GetParentTransformNode():
            node.SetAndObserveTransformNodeID(referenceVolume.GetTransformNodeID())
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        displayNode = node.GetDisplayNode()
        if displayNode is not None and windowLevelMinMax is not None:
            displayNode.AutoWindowLevelOff()
            displayNode.SetWindowLevelMinMax(*windowLevelMinMax)
        volumes.append(node)
    return volumes


def writeProbabilityVolumes(segmentationNode, probabilities: np.ndarray, referenceVolume,
                            region: tuple[slice, slice, slice] | None = None,
                            names: Sequence[str] | None = None) -> list:
    """Create or update one float32 volume (0..1) per class on the reference volume's grid,
    "<output> <class name> probability" (role :data:`PROBABILITY_REFERENCE_ROLE`); outside a
    ``region`` the previous values are kept (zero for new volumes)."""
    names = names or [className(k) for k in range(1, probabilities.shape[0] + 1)]
    geometry = localGeometry(referenceVolume)
    return writeReferencedVolumes(
        segmentationNode, PROBABILITY_REFERENCE_ROLE, PROBABILITY_CLASS_ATTRIBUTE, probabilities,
        [f"{segmentationNode.GetName()} {name} probability" for name in names], referenceVolume, region,
        lambda index: np.zeros(geometry.shape, dtype=np.float32), (0.0, 1.0))


def writeBiasFieldVolumes(segmentationNode, request: Request, result: SegmentationResult) -> tuple[list, list]:
    """The estimated field and the corrected image of each channel as volumes on the first input's
    grid, "<input> bias field" and "<input> corrected" (roles :data:`BIAS_FIELD_REFERENCE_ROLE`,
    :data:`CORRECTED_REFERENCE_ROLE`); the inputs are never modified. Outside an ROI's region a
    rerun keeps the previous values; new volumes hold there the field 1 and the uncorrected input
    (what the engine gives outside its mask). Without a field this run (none requested, or
    ``biasField="detect"`` found none), the output's references to old ones are dropped (the
    volumes stay in the scene)."""
    if not request.correctsBiasField or result.bias_field is None:
        for role in (BIAS_FIELD_REFERENCE_ROLE, CORRECTED_REFERENCE_ROLE):
            segmentationNode.RemoveNodeReferenceIDs(role)
        return [], []
    firstInput = request.inputVolumes[0]
    inputNames = [volume.GetName() for volume in request.inputVolumes]
    shape = request.geometry.shape
    fields = writeReferencedVolumes(
        segmentationNode, BIAS_FIELD_REFERENCE_ROLE, CHANNEL_INDEX_ATTRIBUTE, np.asarray(result.bias_field),
        [f"{name} bias field" for name in inputNames], firstInput, request.region,
        lambda index: np.ones(shape, dtype=np.float32))
    corrected = writeReferencedVolumes(
        segmentationNode, CORRECTED_REFERENCE_ROLE, CHANNEL_INDEX_ATTRIBUTE, np.asarray(result.corrected),
        [f"{name} corrected" for name in inputNames], firstInput, request.region,
        lambda index: request.channels[index - 1])
    return fields, corrected


def _previousOnGrid(volumeNode, referenceVolume, geometry: VolumeGeometry) -> np.ndarray:
    """Previous voxels of an output volume on ``geometry``; resampled if its grid changed."""
    previous = arrayFromVolumeNode(volumeNode).astype(np.float32, copy=False)
    previousGeometry = localGeometry(volumeNode)
    if sameGrid(previousGeometry, geometry):
        return previous.copy()
    values, inside = resampleArray(previous, previousGeometry, geometry, "linear")
    values[~inside] = 0.0
    return values


def subjectHierarchyNode(scene):
    """The scene's subject hierarchy node (created on demand by MRML)."""
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def _itemForNode(shNode, node) -> int:
    item = shNode.GetItemByDataNode(node)
    if not item:
        # Without the Subject Hierarchy module logic nodes are not added automatically.
        item = shNode.CreateItem(shNode.GetSceneItemID(), node)
    return item


def placeOutputs(segmentationNode, probabilityNodes: Sequence, referenceVolume, folderName: str) -> int:
    """Put the segmentation beside the reference volume in the subject hierarchy, and the
    probability volumes in a folder beside it. Returns the folder's item id (0 if none).

    An existing folder that already holds these volumes is reused (and renamed).
    """
    shNode = subjectHierarchyNode(segmentationNode.GetScene())
    if shNode is None:
        return 0
    placeBesideInput([segmentationNode], referenceVolume)
    parentItem = shNode.GetItemParent(_itemForNode(shNode, referenceVolume))
    if not probabilityNodes:
        return 0
    folderItem = 0
    for node in probabilityNodes:
        candidate = shNode.GetItemParent(_itemForNode(shNode, node))
        # Reuse only a folder this module made (never a study or a folder of the user's).
        if candidate and shNode.GetItemAttribute(candidate, PROBABILITY_FOLDER_ATTRIBUTE) == "1":
            folderItem = candidate
            break
    if not folderItem:
        folderItem = shNode.CreateFolderItem(parentItem, folderName)
        shNode.SetItemAttribute(folderItem, PROBABILITY_FOLDER_ATTRIBUTE, "1")
    elif shNode.GetItemName(folderItem) != folderName:
        shNode.SetItemName(folderItem, folderName)
    if shNode.GetItemParent(folderItem) != parentItem:
        shNode.SetItemParent(folderItem, parentItem)
    for node in probabilityNodes:
        item = _itemForNode(shNode, node)
        if shNode.GetItemParent(item) != folderItem:
            shNode.SetItemParent(item, folderItem)
    return folderItem


def placeBesideInput(nodes: Sequence, referenceVolume) -> None:
    """Put ``nodes`` beside the reference volume in the subject hierarchy (same parent)."""
    shNode = subjectHierarchyNode(referenceVolume.GetScene())
    if shNode is None or not nodes:
        return
    parentItem = shNode.GetItemParent(_itemForNode(shNode, referenceVolume))
    for node in nodes:
        item = _itemForNode(shNode, node)
        if shNode.GetItemParent(item) != parentItem:
            shNode.SetItemParent(item, parentItem)
