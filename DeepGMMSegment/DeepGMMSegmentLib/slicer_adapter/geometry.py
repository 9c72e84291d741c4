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

# A point counts as inside a volume when it lies within half a voxel of the outermost voxel
# centres (the voxel's own extent), with a little slack for rounding of the matrices.
_INSIDE_SLACK = 1e-4


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


def _trilinearSlab(source: np.ndarray, coordinates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear interpolation of ``source`` (K, J, I) at continuous (i, j, k) ``coordinates`` (3, N).

    Returns the values (float32) and whether each point lies inside the source's extent. Points
    within the outermost half voxel are clamped to the edge voxel (constant extrapolation there).
    """
    sizes = np.array([source.shape[2], source.shape[1], source.shape[0]], dtype=float)[:, None]
    inside = np.all((coordinates >= -0.5 - _INSIDE_SLACK) & (coordinates <= sizes - 0.5 + _INSIDE_SLACK), axis=0)
    clamped = np.clip(coordinates, 0.0, sizes - 1.0)
    lower = np.floor(clamped).astype(np.intp)
    lower = np.minimum(lower, (sizes - 2).clip(min=0).astype(np.intp))
    fraction = clamped - lower
    upper = np.minimum(lower + 1, (sizes - 1).astype(np.intp))
    i0, j0, k0 = lower
    i1, j1, k1 = upper
    fi, fj, fk = fraction
    values = np.zeros(coordinates.shape[1], dtype=np.float64)
    for kIndex, kWeight in ((k0, 1.0 - fk), (k1, fk)):
        for jIndex, jWeight in ((j0, 1.0 - fj), (j1, fj)):
            for iIndex, iWeight in ((i0, 1.0 - fi), (i1, fi)):
                values += source[kIndex, jIndex, iIndex] * (kWeight * jWeight * iWeight)
    return values.astype(np.float32), inside


def _nearestSlab(source: np.ndarray, coordinates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour lookup of ``source`` at (i, j, k) ``coordinates``; same contract as trilinear."""
    sizes = np.array([source.shape[2], source.shape[1], source.shape[0]], dtype=float)[:, None]
    inside = np.all((coordinates >= -0.5 - _INSIDE_SLACK) & (coordinates <= sizes - 0.5 + _INSIDE_SLACK), axis=0)
    index = np.clip(np.rint(coordinates), 0, sizes - 1).astype(np.intp)
    return source[index[2], index[1], index[0]], inside


def resampleArray(source: np.ndarray, sourceGeometry: VolumeGeometry, targetGeometry: VolumeGeometry,
                  interpolation: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """Resample ``source`` from its grid onto ``targetGeometry`` through world (RAS) coordinates.

    Works for any (oblique, flipped) orientation: each target voxel centre is mapped to RAS and
    from there into the source's continuous IJK. Returns (values, inside): values are float32 for
    "linear" (trilinear) and the source dtype for "nearest"; ``inside`` is True where the target
    voxel centre lies inside the source volume (outside voxels get the nearest edge value).
    """
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"Unknown interpolation '{interpolation}'; use 'linear' or 'nearest'.")
    sampler = _trilinearSlab if interpolation == "linear" else _nearestSlab
    targetToSource = np.linalg.inv(sourceGeometry.ijkToRas) @ targetGeometry.ijkToRas
    nk, nj, ni = targetGeometry.shape
    dtype = np.float32 if interpolation == "linear" else source.dtype
    values = np.empty((nk, nj, ni), dtype=dtype)
    inside = np.empty((nk, nj, ni), dtype=bool)
    jGrid, iGrid = np.meshgrid(np.arange(nj, dtype=float), np.arange(ni, dtype=float), indexing="ij")
    planeIjk = np.stack([iGrid.ravel(), jGrid.ravel(), np.zeros(iGrid.size), np.ones(iGrid.size)])
    # One target slice at a time keeps the coordinate arrays small for large volumes.
    for k in range(nk):
        planeIjk[2] = k
        sourceIjk = (targetToSource @ planeIjk)[:3]
        sliceValues, sliceInside = sampler(source, sourceIjk)
        values[k] = sliceValues.reshape(nj, ni)
        inside[k] = sliceInside.reshape(nj, ni)
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
