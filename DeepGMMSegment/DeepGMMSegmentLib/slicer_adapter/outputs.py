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
#: Subject hierarchy item attribute marking the folder of probability volumes made by this module.
PROBABILITY_FOLDER_ATTRIBUTE = "DeepGMMSegment.ProbabilityFolder"
# Attributes stored on the output segmentation node (saved with the scene).
ATTRIBUTE_PREFIX = "DeepGMMSegment."
INPUT_REFERENCE_ROLE = "DeepGMMSegmentInputVolume"


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


def writeOutputs(request: Request, result: SegmentationResult) -> DeepGMMSegmentOutputs:
    """Write one run's result into the scene (segmentation, probability volumes, hierarchy, attributes)."""
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
        labels = readClassLabels(segmentationNode, request.geometry).astype(np.uint8)
        labels[labels > numberOfClasses] = 0
        labels[request.region] = result.labels
    writeClassSegments(segmentationNode, labels, numberOfClasses, firstInput)

    if request.probabilityMaps:
        volumes = writeProbabilityVolumes(segmentationNode, result.probabilities, firstInput, request.region)
    else:
        for node in probabilityVolumes(segmentationNode).values():
            scene.RemoveNode(node)
        volumes = []
    folderItem = placeOutputs(segmentationNode, volumes, firstInput, f"{segmentationNode.GetName()} probabilities")

    statistics = classStatistics(labels, request.channels, numberOfClasses, request.geometry)
    finalNll = float(result.nll)
    storeAttributes(segmentationNode, request, result, finalNll, statistics)
    return DeepGMMSegmentOutputs(
        segmentationNode=segmentationNode, probabilityVolumes=volumes, probabilityFolderItemId=folderItem,
        classStatistics=statistics, finalNll=finalNll, method=result.method, device=result.device,
        seconds=result.seconds, seed=request.seed, numberOfIterations=result.n_iter,
        converged=result.converged, nllHistory=list(result.nll_history), region=request.region)


def classStatistics(labels: np.ndarray, channels: Sequence[np.ndarray], numberOfClasses: int,
                    geometry: VolumeGeometry) -> list[ClassStatistics]:
    """Voxel count, volume (mL) and mean intensity per channel of each class of ``labels``."""
    flatLabels = labels.ravel()
    counts = np.bincount(flatLabels, minlength=numberOfClasses + 1)
    sums = [np.bincount(flatLabels, weights=channel.ravel().astype(np.float64), minlength=numberOfClasses + 1)
            for channel in channels]
    statistics = []
    for classIndex in range(1, numberOfClasses + 1):
        count = int(counts[classIndex])
        means = [float(channelSums[classIndex] / count) if count else float("nan") for channelSums in sums]
        statistics.append(ClassStatistics(classIndex, className(classIndex), count,
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
        "ClassStatistics": json.dumps([vars(s) for s in statistics]),
    }
    wasModifying = segmentationNode.StartModify()
    for name, value in values.items():
        segmentationNode.SetAttribute(ATTRIBUTE_PREFIX + name, value)
    segmentationNode.RemoveNodeReferenceIDs(INPUT_REFERENCE_ROLE)
    for volume in request.inputVolumes:
        segmentationNode.AddNodeReferenceID(INPUT_REFERENCE_ROLE, volume.GetID())
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


def writeClassSegments(segmentationNode, labels: np.ndarray, numberOfClasses: int, referenceVolume) -> None:
    """Write ``labels`` (0..K on the reference volume's grid) as one segment per class.

    All class segments share one binary labelmap layer (class k = label value k), exactly on the
    reference volume's grid, so nothing is resampled and the ``.seg.nrrd`` stays compact.
    Existing class segments keep their id, name, colour and display settings and get the new
    voxels; missing ones are added as "Class k" with the fixed palette; class segments beyond K
    are removed. Segments this module did not write are left alone.
    """
    geometry = localGeometry(referenceVolume)
    colors = classColors(numberOfClasses)
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
            if segment is None:
                segment = slicer.vtkSegment()
                segment.SetName(className(classIndex))
                segment.SetColor(*colors[classIndex - 1])
                segment.SetTag(CLASS_INDEX_TAG, str(classIndex))
                segment.AddRepresentation(representationName, sharedLabelmap)
                segment.SetLabelValue(classIndex)
                if not segmentation.AddSegment(segment, segmentation.GenerateUniqueSegmentID(className(classIndex))):
                    raise RuntimeError(f"Could not add segment '{className(classIndex)}' to "
                                       f"'{segmentationNode.GetName()}'.")
            else:
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


def probabilityVolumes(segmentationNode) -> dict[int, object]:
    """Map class index -> probability volume node referenced by an output segmentation."""
    result = {}
    for n in range(segmentationNode.GetNumberOfNodeReferences(PROBABILITY_REFERENCE_ROLE)):
        node = segmentationNode.GetNthNodeReference(PROBABILITY_REFERENCE_ROLE, n)
        if node is None:
            continue
        try:
            result[int(node.GetAttribute(PROBABILITY_CLASS_ATTRIBUTE))] = node
        except (TypeError, ValueError):
            continue
    return result


def writeProbabilityVolumes(segmentationNode, probabilities: np.ndarray, referenceVolume,
                            region: tuple[slice, slice, slice] | None = None) -> list:
    """Create or update one float32 volume (0..1) per class on the reference volume's grid.

    ``probabilities`` is (K, k, j, i): the full grid, or the ``region`` only, in which case the
    voxels outside the region keep their previous values (zero for new volumes). The volumes are
    referenced from the segmentation node (role :data:`PROBABILITY_REFERENCE_ROLE`), so a rerun
    into the same output updates them. Returns the volumes in class order.
    """
    scene = segmentationNode.GetScene()
    geometry = localGeometry(referenceVolume)
    numberOfClasses = probabilities.shape[0]
    existing = probabilityVolumes(segmentationNode)
    for classIndex, node in existing.items():
        if classIndex > numberOfClasses:
            # Removing the node also drops the segmentation's reference to it.
            scene.RemoveNode(node)
    volumes = []
    for classIndex in range(1, numberOfClasses + 1):
        node = existing.get(classIndex)
        classProbability = probabilities[classIndex - 1].astype(np.float32, copy=False)
        if region is None:
            full = classProbability
        else:
            full = np.zeros(geometry.shape, dtype=np.float32)
            if node is not None and node.GetImageData() is not None:
                full = _previousOnGrid(node, referenceVolume, geometry)
            full[region] = classProbability
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                           f"{segmentationNode.GetName()} {className(classIndex)} probability")
            node.SetAttribute(PROBABILITY_CLASS_ATTRIBUTE, str(classIndex))
            segmentationNode.AddNodeReferenceID(PROBABILITY_REFERENCE_ROLE, node.GetID())
        updateVolumeNodeFromArray(node, full, geometry)
        if node.GetParentTransformNode() is not referenceVolume.GetParentTransformNode():
            node.SetAndObserveTransformNodeID(referenceVolume.GetTransformNodeID())
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        displayNode = node.GetDisplayNode()
        if displayNode is not None:
            displayNode.AutoWindowLevelOff()
            displayNode.SetWindowLevelMinMax(0.0, 1.0)
        volumes.append(node)
    return volumes


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
    parentItem = shNode.GetItemParent(_itemForNode(shNode, referenceVolume))
    segmentationItem = _itemForNode(shNode, segmentationNode)
    if shNode.GetItemParent(segmentationItem) != parentItem:
        shNode.SetItemParent(segmentationItem, parentItem)
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
