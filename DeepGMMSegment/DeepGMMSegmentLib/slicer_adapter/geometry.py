"""Slicer adapter, the scene's geometry: volume nodes <-> numpy arrays, resampling, ROI and masks.

Everything here uses only MRML/VTK classes that exist both inside Slicer and in the ``slicer-core``
wheel (no Qt, no ``slicer.app``), so it runs in the Slicer application and in plain pytest alike.

Conventions
-----------
* Arrays are in numpy order (K, J, I) = (slice, row, column), as ``slicer.util.arrayFromVolume``.
* A :class:`VolumeGeometry` holds the grid of the *first* input: its shape and its IJK->RAS matrix
  (including any linear parent transform, i.e. in world coordinates). Every other input, the mask
  and all outputs live on that grid.
* A *region* is a tuple of three ``slice`` objects (k, j, i) into that grid (used for an ROI).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

# --------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class VolumeGeometry:
    """A voxel grid: numpy shape (K, J, I) and the 4x4 IJK->RAS (world) matrix."""

    shape: tuple[int, int, int]
    ijkToRas: np.ndarray

    @property
    def spacingKji(self) -> tuple[float, float, float]:
        """Voxel size in mm along (K, J, I), the order the core engine expects."""
        columnNorms = np.linalg.norm(self.ijkToRas[:3, :3], axis=0)
        return (float(columnNorms[2]), float(columnNorms[1]), float(columnNorms[0]))

    @property
    def voxelVolumeMl(self) -> float:
        """Volume of one voxel in millilitres (mm^3 / 1000)."""
        return abs(float(np.linalg.det(self.ijkToRas[:3, :3]))) / 1000.0

    def vtkMatrix(self) -> vtk.vtkMatrix4x4:
        """The IJK->RAS matrix as a ``vtkMatrix4x4``."""
        matrix = vtk.vtkMatrix4x4()
        for row in range(4):
            for column in range(4):
                matrix.SetElement(row, column, float(self.ijkToRas[row, column]))
        return matrix

    def orientedImage(self, array: np.ndarray | None = None) -> "slicer.vtkOrientedImageData":
        """A ``vtkOrientedImageData`` on this grid, filled from ``array`` (uint8) if given."""
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(self.shape[2], self.shape[1], self.shape[0])
        image.SetImageToWorldMatrix(self.vtkMatrix())
        if array is not None:
            image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
            flat[:] = np.ascontiguousarray(array, dtype=np.uint8).ravel()
            image.Modified()
        return image


def _matrixToNumpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def parentTransformToWorld(node) -> np.ndarray:
    """4x4 matrix from the node's coordinates to world RAS (identity without a parent transform).

    Raises ``ValueError`` for a non-linear parent transform: it cannot be expressed on a grid.
    """
    transformNode = node.GetParentTransformNode()
    if transformNode is None:
        return np.eye(4)
    if not transformNode.IsTransformToWorldLinear():
        raise ValueError(
            f"'{node.GetName()}' is under the non-linear transform '{transformNode.GetName()}'. "
            "Harden the transform (Transforms module) or resample the volume first.")
    matrix = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(matrix)
    return _matrixToNumpy(matrix)


def firstSelectableVolume(scene):
    """The first volume the input selectors can show, or None.

    The selectors list exactly ``vtkMRMLScalarVolumeNode`` (``showChildNodeTypes`` is false in
    the .ui), so labelmaps, vector and tensor volumes, which are subclasses, are skipped: a
    labelmap picked here would be segmented while the selector shows "None"."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if node.GetClassName() == "vtkMRMLScalarVolumeNode":
            return node
    return None


def volumeGeometry(volumeNode) -> VolumeGeometry:
    """Grid of a volume node in world coordinates (IJK->RAS including linear parent transforms)."""
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None:
        name = volumeNode.GetName() if volumeNode is not None else "None"
        raise ValueError(f"Volume '{name}' has no image data. Load or select a volume with voxels.")
    dimensions = imageData.GetDimensions()
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToRas = parentTransformToWorld(volumeNode) @ _matrixToNumpy(matrix)
    return VolumeGeometry(shape=(dimensions[2], dimensions[1], dimensions[0]), ijkToRas=ijkToRas)


def localGeometry(volumeNode) -> VolumeGeometry:
    """Grid of a volume node in its own coordinates (ignoring parent transforms)."""
    dimensions = volumeNode.GetImageData().GetDimensions()
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return VolumeGeometry(shape=(dimensions[2], dimensions[1], dimensions[0]), ijkToRas=_matrixToNumpy(matrix))


# --------------------------------------------------------------------------------------------
# Volume nodes <-> arrays


def arrayFromVolumeNode(volumeNode) -> np.ndarray:
    """A copy of a scalar volume's voxels as a (K, J, I) array (the node is not touched)."""
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None:
        name = volumeNode.GetName() if volumeNode is not None else "None"
        raise ValueError(f"Volume '{name}' has no image data. Load or select a volume with voxels.")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"Volume '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} components per "
            "voxel; DeepGMMSegment needs scalar volumes. Split it into scalar volumes (Vector to Scalar Volume "
            "module) and pass each one as an input.")
    dimensions = imageData.GetDimensions()
    flat = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())
    return np.array(flat, copy=True).reshape(dimensions[2], dimensions[1], dimensions[0])


def updateVolumeNodeFromArray(volumeNode, array: np.ndarray, geometry: VolumeGeometry) -> None:
    """Replace a volume node's voxels by ``array`` (K, J, I) on ``geometry`` (node coordinates)."""
    array = np.ascontiguousarray(array)
    if array.shape != tuple(geometry.shape):
        raise ValueError(f"Array shape {array.shape} does not match the grid {geometry.shape}.")
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(geometry.shape[2], geometry.shape[1], geometry.shape[0])
    vtkArray = numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                          array_type=numpy_support.get_vtk_array_type(array.dtype))
    vtkArray.SetNumberOfComponents(1)
    imageData.GetPointData().SetScalars(vtkArray)
    wasModifying = volumeNode.StartModify()
    volumeNode.SetIJKToRASMatrix(geometry.vtkMatrix())
    volumeNode.SetAndObserveImageData(imageData)
    volumeNode.EndModify(wasModifying)


# --------------------------------------------------------------------------------------------
# Resampling onto the first input's grid


def _resliceable(source: np.ndarray, interpolation: str) -> np.ndarray:
    """``source`` as a type ``vtkImageReslice`` handles: it is compiled without 64-bit integers
    (such input crashes it), and VTK has no boolean arrays.

    64-bit integers become float64 for "linear" and 32-bit integers for "nearest" (label values
    must fit); booleans become uint8. Every other type is passed through without a copy.
    """
    if source.dtype == bool:
        return source.view(np.uint8)
    if source.dtype.kind in "iu" and source.dtype.itemsize == 8:
        if interpolation == "linear":
            return source.astype(np.float64)
        narrow = np.dtype(np.int32 if source.dtype.kind == "i" else np.uint32)
        if source.size and (source.min() < np.iinfo(narrow).min or source.max() > np.iinfo(narrow).max):
            raise ValueError(
                f"The label values ({source.min()}..{source.max()}) do not fit in 32 bits. Relabel the "
                "volume with smaller values (e.g. Segment Editor or Cast Scalar Volume) and try again.")
        return source.astype(narrow)
    if source.dtype == np.float16:
        return source.astype(np.float32)
    return np.ascontiguousarray(source)


def _imageDataView(array: np.ndarray) -> vtk.vtkImageData:
    """A ``vtkImageData`` on the plain IJK grid (origin 0, spacing 1) sharing ``array``'s memory."""
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=False,
                                         array_type=numpy_support.get_vtk_array_type(array.dtype))
    imageData.GetPointData().SetScalars(scalars)
    return imageData


def _scalarsArray(imageData: vtk.vtkImageData, shape: Sequence[int]) -> np.ndarray:
    """The image's scalars as a (K, J, I) array (a view that keeps the VTK array alive)."""
    return numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(tuple(shape))


def resampleArray(source: np.ndarray, sourceGeometry: VolumeGeometry, targetGeometry: VolumeGeometry,
                  interpolation: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """Resample ``source`` from its grid onto ``targetGeometry`` through world (RAS) coordinates.

    Works for any (oblique, flipped, anisotropic) orientation, through ``vtkImageReslice`` (the
    resampler behind Slicer's slice views and segment resampling): both arrays are
    given to VTK on their plain IJK grids and the reslice axes are the target-IJK -> source-IJK
    matrix, so VTK's direction conventions do not enter. Returns (values, inside): values are
    float32 for "linear" (trilinear) and the source dtype for "nearest" (label maps never mix
    values); ``inside`` is True where the target voxel centre lies inside the source volume,
    i.e. within half a voxel of its outermost voxel centres (VTK's border: the edge voxels
    extend half a voxel). Voxels outside get 0.

    Why VTK (measured against the hand-written numpy trilinear / nearest code it replaced, on 4
    oblique, flipped and anisotropic grid pairs of 8 000 - 125 000 target voxels): the same
    ``inside`` voxel for voxel; linear values within 2e-6 of the data range (VTK's float32
    weights); nearest labels identical except 4 of 157 000 voxels that lie within 1e-5 voxel of a
    rounding tie; peak memory 1.1-1.2x the output's size (numpy: 1.3x); 5-16x faster, both on one
    thread (a ratio measured side by side).
    """
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"Unknown interpolation '{interpolation}'; use 'linear' or 'nearest'.")
    resliceable = _resliceable(source, interpolation)
    targetToSource = np.linalg.inv(sourceGeometry.ijkToRas) @ targetGeometry.ijkToRas
    nk, nj, ni = targetGeometry.shape
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(_imageDataView(resliceable))
    reslice.SetResliceAxes(VolumeGeometry(targetGeometry.shape, targetToSource).vtkMatrix())
    reslice.SetOutputOrigin(0.0, 0.0, 0.0)
    reslice.SetOutputSpacing(1.0, 1.0, 1.0)
    reslice.SetOutputExtent(0, ni - 1, 0, nj - 1, 0, nk - 1)
    reslice.SetBorder(True)
    reslice.SetBackgroundLevel(0.0)
    if interpolation == "linear":
        reslice.SetInterpolationModeToLinear()
        reslice.SetOutputScalarType(vtk.VTK_FLOAT)
    else:
        reslice.SetInterpolationModeToNearestNeighbor()
    reslice.GenerateStencilOutputOn()
    coverage = vtk.vtkImageStencilToImage()
    coverage.SetInputConnection(reslice.GetStencilOutputPort())
    coverage.SetInsideValue(1)
    coverage.SetOutsideValue(0)
    coverage.SetOutputScalarTypeToUnsignedChar()
    coverage.Update()
    values = _scalarsArray(reslice.GetOutput(), targetGeometry.shape)
    inside = _scalarsArray(coverage.GetOutput(), targetGeometry.shape).view(bool)
    if interpolation == "nearest" and values.dtype != source.dtype:
        values = values.astype(source.dtype)
    return values, inside


def sameGrid(first: VolumeGeometry, second: VolumeGeometry, tolerance: float = 1e-5) -> bool:
    """True when two geometries are the same voxel grid (shape and IJK->RAS)."""
    return tuple(first.shape) == tuple(second.shape) and np.allclose(first.ijkToRas, second.ijkToRas,
                                                                     atol=tolerance, rtol=0.0)


def channelsOnReferenceGrid(inputVolumes: Sequence) -> tuple[list[np.ndarray], np.ndarray, VolumeGeometry]:
    """Read every input onto the first input's grid.

    Returns (channels, covered, geometry): one float32 (K, J, I) array per input, a boolean array
    that is True where every input has data (inputs on other grids may cover only part of the
    first one), and the first input's world geometry. Raises ``ValueError`` naming the input
    when an input does not overlap the first one at all.
    """
    referenceGeometry = volumeGeometry(inputVolumes[0])
    channels = [arrayFromVolumeNode(inputVolumes[0]).astype(np.float32, copy=False)]
    covered = np.ones(referenceGeometry.shape, dtype=bool)
    for volumeNode in inputVolumes[1:]:
        geometry = volumeGeometry(volumeNode)
        source = arrayFromVolumeNode(volumeNode)
        if sameGrid(geometry, referenceGeometry):
            channels.append(source.astype(np.float32, copy=False))
            continue
        values, inside = resampleArray(source, geometry, referenceGeometry, "linear")
        if not inside.any():
            raise ValueError(
                f"Input '{volumeNode.GetName()}' does not overlap the first input '{inputVolumes[0].GetName()}' "
                "in space. Check that both show the same subject and are registered (Transforms or General "
                "Registration), or remove this input.")
        if not inside.all():
            logging.info("DeepGMMSegment: '%s' covers %.1f%% of '%s'; voxels outside it are left unlabelled.",
                         volumeNode.GetName(), 100.0 * inside.mean(), inputVolumes[0].GetName())
        channels.append(values)
        covered &= inside
    return channels, covered, referenceGeometry


# --------------------------------------------------------------------------------------------
# ROI and mask


def roiRegion(roiNode, referenceVolume) -> tuple[slice, slice, slice]:
    """The ROI's bounding box on the reference volume's grid as (k, j, i) slices.

    Uses Slicer's Crop Volume rule (``vtkSlicerCropVolumeLogic.GetVoxelBasedCropOutputExtent``) so
    the region is exactly what Crop Volume would keep. Raises ``ValueError`` when the ROI lies
    outside the volume.
    """
    extent = [0] * 6
    ok = slicer.vtkSlicerCropVolumeLogic.GetVoxelBasedCropOutputExtent(roiNode, referenceVolume, extent, True)
    if not ok or extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        raise ValueError(
            f"The ROI '{roiNode.GetName()}' does not overlap the volume '{referenceVolume.GetName()}'. "
            "Move or resize the ROI box so it covers the region to segment.")
    return (slice(extent[4], extent[5] + 1), slice(extent[2], extent[3] + 1), slice(extent[0], extent[1] + 1))


def mergedLabelmapArray(segmentationNode, segmentIds: Sequence[str], labelValues: Sequence[int],
                        geometry: VolumeGeometry) -> np.ndarray:
    """Segments rasterised on ``geometry`` (world) as one uint8/uint16 array: segment n -> labelValues[n].

    Segments are resampled (nearest neighbour) when their own geometry differs; nothing in the
    scene is created or modified.
    """
    if not segmentIds:
        return np.zeros(geometry.shape, dtype=np.uint8)
    # The merged labelmap is computed in the segmentation's own coordinates; bring the grid there.
    worldToSegmentation = np.linalg.inv(parentTransformToWorld(segmentationNode))
    localGrid = VolumeGeometry(geometry.shape, worldToSegmentation @ geometry.ijkToRas)
    ids = vtk.vtkStringArray()
    for segmentId in segmentIds:
        ids.InsertNextValue(segmentId)
    values = vtk.vtkIntArray()
    for value in labelValues:
        values.InsertNextValue(int(value))
    merged = slicer.vtkOrientedImageData()
    ok = segmentationNode.GenerateMergedLabelmapForAllSegments(
        merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, localGrid.orientedImage(), ids, values)
    if not ok:
        raise ValueError(f"Could not rasterise segments of '{segmentationNode.GetName()}' on the input grid.")
    dimensions = merged.GetDimensions()
    extent = merged.GetExtent()
    flat = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars())
    array = np.array(flat, copy=True).reshape(dimensions[2], dimensions[1], dimensions[0])
    if tuple(extent) != (0, geometry.shape[2] - 1, 0, geometry.shape[1] - 1, 0, geometry.shape[0] - 1):
        full = np.zeros(geometry.shape, dtype=array.dtype)
        lo = [max(extent[2 * a], 0) for a in range(3)]
        hi = [min(extent[2 * a + 1], geometry.shape[2 - a] - 1) for a in range(3)]
        if all(lo[a] <= hi[a] for a in range(3)):
            full[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = array[
                lo[2] - extent[4]:hi[2] - extent[4] + 1,
                lo[1] - extent[2]:hi[1] - extent[2] + 1,
                lo[0] - extent[0]:hi[0] - extent[0] + 1]
        array = full
    return array


def maskFromSegment(segmentationNode, segmentId: str, geometry: VolumeGeometry) -> np.ndarray:
    """Boolean array on ``geometry``: True inside the segment ``segmentId`` of ``segmentationNode``."""
    if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
        raise ValueError(
            f"The mask segment '{segmentId}' does not exist in '{segmentationNode.GetName()}'. "
            "Pick a segment of that segmentation (segment ids, not names).")
    return mergedLabelmapArray(segmentationNode, [segmentId], [1], geometry) > 0


def maskFromLabelmapVolume(labelmapNode, geometry: VolumeGeometry) -> np.ndarray:
    """Boolean array on ``geometry``: True where the labelmap is nonzero (nearest-neighbour resampled)."""
    labels = arrayFromVolumeNode(labelmapNode)
    labelGeometry = volumeGeometry(labelmapNode)
    if sameGrid(labelGeometry, geometry):
        return labels != 0
    values, inside = resampleArray(labels, labelGeometry, geometry, "nearest")
    return (values != 0) & inside
