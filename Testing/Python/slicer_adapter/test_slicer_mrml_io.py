"""MRML adapter against real MRML (slicer-core): geometry, resampling, ROI, masks, segments."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import slicer.util
import vtk

from DeepGMMSegmentLib.slicer_adapter import geometry as sceneGeometry
from DeepGMMSegmentLib.slicer_adapter import outputs as sceneOutputs


def _rasToIjk(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetRASToIJKMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _voxelRas(ijkToRas, k, j, i) -> np.ndarray:
    return (ijkToRas @ np.array([i, j, k, 1.0]))[:3]


def test_volume_array_round_trip_keeps_oblique_geometry(mrmlScene, helpers):
    ijkToRas = helpers.ijkToRasMatrix((0.7, 0.9, 2.5), (-12.0, 30.0, 4.0), helpers.obliqueDirection(25))
    array = np.random.default_rng(1).normal(size=(5, 7, 9)).astype(np.float32)
    node = mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    sceneGeometry.updateVolumeNodeFromArray(node, array, sceneGeometry.VolumeGeometry(array.shape, ijkToRas))

    # Slicer's own view of the node: same voxels (numpy K,J,I order), same matrix, spacing, origin.
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), array)
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), ijkToRas, atol=1e-9)
    np.testing.assert_allclose(node.GetSpacing(), (0.7, 0.9, 2.5), atol=1e-9)
    np.testing.assert_allclose(node.GetOrigin(), (-12.0, 30.0, 4.0), atol=1e-9)

    back = sceneGeometry.arrayFromVolumeNode(node)
    np.testing.assert_array_equal(back, array)
    back[0, 0, 0] = 1e6  # a copy: the node must not change
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] == array[0, 0, 0]
    geometry = sceneGeometry.volumeGeometry(node)
    assert geometry.shape == (5, 7, 9)
    np.testing.assert_allclose(geometry.ijkToRas, ijkToRas, atol=1e-9)
    np.testing.assert_allclose(geometry.spacingKji, (2.5, 0.9, 0.7), atol=1e-9)
    assert geometry.voxelVolumeMl == pytest.approx(0.7 * 0.9 * 2.5 / 1000.0)


def test_geometry_includes_linear_parent_transform(mrmlScene, helpers):
    node = helpers.addVolume(mrmlScene, np.zeros((2, 3, 4), np.float32),
                             helpers.ijkToRasMatrix((1, 1, 1), (0, 0, 0)), "moved")
    transform = mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, -2.0, 1.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(sceneGeometry.volumeGeometry(node).ijkToRas[:3, 3], (5.0, -2.0, 1.0))
    np.testing.assert_allclose(sceneGeometry.localGeometry(node).ijkToRas[:3, 3], (0.0, 0.0, 0.0))


def test_second_channel_is_resampled_onto_first_grid_at_known_ras_points(mrmlScene, helpers):
    # Channel 2 holds a linear function of RAS on its own oblique grid; trilinear interpolation
    # reproduces a linear function exactly, so every resampled value must equal the function at
    # the RAS position of the first input's voxel.
    def field(ras):
        return 2.0 * ras[0] - 3.0 * ras[1] + 0.5 * ras[2] + 10.0

    firstToRas = helpers.ijkToRasMatrix((1.5, 1.5, 3.0), (-8.0, -9.0, -6.0), helpers.obliqueDirection(30))
    first = helpers.addVolume(mrmlScene, np.random.default_rng(0).normal(size=(5, 12, 11)).astype(np.float32),
                              firstToRas, "first")
    secondToRas = helpers.ijkToRasMatrix((1.0, 1.2, 1.1), (-20.0, -15.0, -16.0), helpers.obliqueDirection(-40))
    shape = (30, 28, 36)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ras = np.einsum("rc,ckji->rkji", secondToRas[:3, :3], np.stack([i, j, k]).astype(float))
    ras += secondToRas[:3, 3][:, None, None, None]
    second = helpers.addVolume(mrmlScene, field(ras).astype(np.float32), secondToRas, "second")
    secondVoxels = slicer.util.arrayFromVolume(second).copy()

    channels, covered, geometry = sceneGeometry.channelsOnReferenceGrid([first, second])

    assert geometry.shape == (5, 12, 11)
    np.testing.assert_array_equal(channels[0], slicer.util.arrayFromVolume(first))
    # Decide independently (Slicer's RAS->IJK of channel 2) which voxels fall inside its grid.
    rasToIjk = _rasToIjk(second)
    checked = 0
    for kk in range(5):
        for jj in range(12):
            for ii in range(11):
                point = _voxelRas(firstToRas, kk, jj, ii)
                sourceIjk = (rasToIjk @ np.append(point, 1.0))[:3]
                interior = np.all(sourceIjk >= 0) and np.all(sourceIjk <= np.array(shape[::-1]) - 1)
                outside = np.any(sourceIjk < -0.5 - 1e-3) or np.any(sourceIjk > np.array(shape[::-1]) - 0.5 + 1e-3)
                if interior:
                    assert channels[1][kk, jj, ii] == pytest.approx(field(point), abs=2e-3)
                    assert covered[kk, jj, ii]
                    checked += 1
                if outside:
                    assert not covered[kk, jj, ii]
    assert checked > 50 and not covered.all()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(second), secondVoxels)  # input untouched


def _sourceIjkOfTargetVoxels(sourceNode, targetToRas, shape) -> np.ndarray:
    """(3, K, J, I) continuous IJK of ``sourceNode`` at each target voxel centre, by Slicer's RAS->IJK."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    targetIjk = np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1).astype(float)
    return ((_rasToIjk(sourceNode) @ targetToRas @ targetIjk)[:3]).reshape((3,) + tuple(shape))


def test_labelmap_on_an_oblique_anisotropic_grid_is_resampled_nearest(mrmlScene, helpers):
    # Labels on a sagittal, 3 mm thick, flipped grid read onto an oblique 0.8 x 0.9 x 2 mm grid:
    # each target voxel takes exactly the label of the source voxel nearest to its centre (found
    # independently from Slicer's RAS->IJK), never a mixture, and keeps the labelmap's type.
    sourceToRas = helpers.ijkToRasMatrix((1.0, 1.1, 3.0), (2.0, 6.0, -2.5),
                                         np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    labels = np.random.default_rng(4).choice(np.array([0, 3, 7, 1000], np.int16), size=(12, 40, 45))
    labelmap = helpers.addVolume(mrmlScene, labels, sourceToRas, "labels", "vtkMRMLLabelMapVolumeNode")
    targetToRas = helpers.ijkToRasMatrix((0.8, 0.9, 2.0), (-10.0, -25.0, 0.0), helpers.obliqueDirection(35))
    target = sceneGeometry.VolumeGeometry((14, 30, 36), targetToRas)

    values, inside = sceneGeometry.resampleArray(labels, sceneGeometry.volumeGeometry(labelmap), target, "nearest")

    assert values.dtype == np.int16 and values.shape == target.shape
    assert set(np.unique(values[inside])) <= {0, 3, 7, 1000}
    sourceIjk = _sourceIjkOfTargetVoxels(labelmap, targetToRas, target.shape)
    upper = np.array(labels.shape[::-1], dtype=float).reshape(3, 1, 1, 1) - 0.5
    farFromEdge = np.all((sourceIjk > -0.5 + 1e-3) & (sourceIjk < upper - 1e-3), axis=0)
    beyondEdge = np.any((sourceIjk < -0.5 - 1e-3) | (sourceIjk > upper + 1e-3), axis=0)
    np.testing.assert_array_equal(inside[farFromEdge], True)
    np.testing.assert_array_equal(inside[beyondEdge], False)
    np.testing.assert_array_equal(values[beyondEdge], 0)
    noTie = np.all(np.abs(sourceIjk - np.floor(sourceIjk) - 0.5) > 1e-3, axis=0)
    nearest = np.clip(np.rint(sourceIjk), 0, upper + 0.5 - 1).astype(int)
    checked = farFromEdge & noTie
    assert checked.sum() > 2000 and beyondEdge.sum() > 2000
    np.testing.assert_array_equal(values[checked], labels[nearest[2], nearest[1], nearest[0]][checked])


def test_resampling_takes_types_vtk_reslice_lacks(mrmlScene, helpers):
    # vtkImageReslice is built without 64-bit integers (such input crashes the process) and VTK
    # has no booleans: these come back in their own type, as the 16-bit labels would.
    labels = np.random.default_rng(5).integers(0, 4, size=(6, 9, 8)).astype(np.int16)
    sourceGeometry = sceneGeometry.VolumeGeometry(labels.shape, helpers.ijkToRasMatrix((1, 1, 2), (0, 0, 0)))
    target = sceneGeometry.VolumeGeometry((5, 7, 9), helpers.ijkToRasMatrix((1.1, 0.9, 2.2), (0.4, -0.3, 0.5),
                                                                          helpers.obliqueDirection(10)))
    reference, referenceInside = sceneGeometry.resampleArray(labels, sourceGeometry, target, "nearest")
    linearReference, _ = sceneGeometry.resampleArray(labels, sourceGeometry, target, "linear")
    assert referenceInside.any() and not referenceInside.all()
    for dtype in (np.int64, np.uint64):
        values, inside = sceneGeometry.resampleArray(labels.astype(dtype), sourceGeometry, target, "nearest")
        assert values.dtype == dtype
        np.testing.assert_array_equal(values, reference)
        np.testing.assert_array_equal(inside, referenceInside)
        linear, _ = sceneGeometry.resampleArray(labels.astype(dtype), sourceGeometry, target, "linear")
        np.testing.assert_allclose(linear, linearReference, atol=1e-5)
    booleans, inside = sceneGeometry.resampleArray(labels > 1, sourceGeometry, target, "nearest")
    assert booleans.dtype == bool
    np.testing.assert_array_equal(booleans, reference > 1)
    with pytest.raises(ValueError, match="do not fit in 32 bits.*Relabel"):
        sceneGeometry.resampleArray(labels.astype(np.int64) << 40, sourceGeometry, target, "nearest")
    with pytest.raises(ValueError, match="Unknown interpolation 'cubic'"):
        sceneGeometry.resampleArray(labels, sourceGeometry, target, "cubic")

    # The same through the scene: a 64-bit labelmap volume as the mask.
    labelmap = helpers.addVolume(mrmlScene, labels.astype(np.int64), sourceGeometry.ijkToRas, "lm64",
                                 "vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(sceneGeometry.maskFromLabelmapVolume(labelmap, target),
                                  (reference != 0) & referenceInside)


def test_a_single_slice_input_covers_half_a_slice_on_each_side(mrmlScene, helpers):
    # A one-slice 2 mm volume resampled onto a grid of 0.5 mm slices: the target slices within
    # 1 mm of its plane take its in-plane values, the others lie outside it.
    image = np.arange(20, dtype=np.float32).reshape(1, 4, 5)
    single = sceneGeometry.VolumeGeometry(image.shape, helpers.ijkToRasMatrix((1, 1, 2), (0, 0, 0)))
    target = sceneGeometry.VolumeGeometry((6, 4, 5), helpers.ijkToRasMatrix((1, 1, 0.5), (0, 0, -1.6)))
    values, inside = sceneGeometry.resampleArray(image, single, target, "linear")
    # Target slice z positions: -1.6, -1.1, -0.6, -0.1, 0.4, 0.9 mm; the slab is -1 .. +1 mm.
    np.testing.assert_array_equal(inside.all(axis=(1, 2)), [False, False, True, True, True, True])
    np.testing.assert_allclose(values[2:], np.broadcast_to(image, (4, 4, 5)))
    np.testing.assert_array_equal(values[:2], 0.0)


def test_same_grid_inputs_are_taken_as_they_are(mrmlScene, helpers):
    ijkToRas = helpers.ijkToRasMatrix((1, 1, 2), (0, 0, 0), helpers.obliqueDirection())
    a, b, _ = helpers.phantom((3, 5, 6))
    first = helpers.addVolume(mrmlScene, a, ijkToRas, "a")
    second = helpers.addVolume(mrmlScene, b, ijkToRas, "b")
    channels, covered, _ = sceneGeometry.channelsOnReferenceGrid([first, second])
    np.testing.assert_array_equal(channels[1], b)
    assert covered.all()


def test_input_that_does_not_overlap_is_a_clear_error(mrmlScene, helpers):
    first = helpers.addVolume(mrmlScene, np.ones((4, 4, 4), np.float32), helpers.ijkToRasMatrix((1, 1, 1), (0, 0, 0)),
                              "T1")
    far = helpers.addVolume(mrmlScene, np.ones((4, 4, 4), np.float32),
                            helpers.ijkToRasMatrix((1, 1, 1), (500, 0, 0)), "FLAIR")
    with pytest.raises(ValueError, match=r"'FLAIR' does not overlap the first input 'T1'.*regist"):
        sceneGeometry.channelsOnReferenceGrid([first, far])


def test_roi_region_is_crop_volume_extent(mrmlScene, helpers):
    volume = helpers.addVolume(mrmlScene, np.zeros((10, 20, 30), np.float32),
                               helpers.ijkToRasMatrix((1, 1, 1), (0, 0, 0), np.diag([-1.0, -1.0, 1.0])), "vol")
    roi = mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(-10.0, -8.0, 5.0)
    roi.SetSize(6.0, 4.0, 2.0)
    region = sceneGeometry.roiRegion(roi, volume)
    extent = [0] * 6
    slicer.vtkSlicerCropVolumeLogic.GetVoxelBasedCropOutputExtent(roi, volume, extent, True)
    assert region == (slice(extent[4], extent[5] + 1), slice(extent[2], extent[3] + 1),
                      slice(extent[0], extent[1] + 1))
    # The box is centred on voxel (i=10, j=8, k=5) (RAS x = -i, y = -j, z = k).
    centre = [(s.start + s.stop - 1) / 2 for s in region]
    assert centre == pytest.approx([5, 8, 10], abs=0.51)
    roi.SetCenter(400.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="does not overlap"):
        sceneGeometry.roiRegion(roi, volume)


def test_mask_from_segment_and_labelmap(mrmlScene, helpers):
    ijkToRas = helpers.ijkToRasMatrix((1, 1, 2), (3, 4, 5), helpers.obliqueDirection())
    volume = helpers.addVolume(mrmlScene, np.zeros((4, 6, 8), np.float32), ijkToRas, "vol")
    geometry = sceneGeometry.volumeGeometry(volume)
    inside = np.zeros((4, 6, 8), bool)
    inside[1:3, 2:5, 1:7] = True
    segmentation = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentId = segmentation.AddSegmentFromBinaryLabelmapRepresentation(geometry.orientedImage(inside), "brain")
    np.testing.assert_array_equal(sceneGeometry.maskFromSegment(segmentation, segmentId, geometry), inside)
    with pytest.raises(ValueError, match="does not exist"):
        sceneGeometry.maskFromSegment(segmentation, "noSuchSegment", geometry)

    labelmap = helpers.addVolume(mrmlScene, inside.astype(np.uint8) * 7, ijkToRas, "lm", "vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(sceneGeometry.maskFromLabelmapVolume(labelmap, geometry), inside)
    # A labelmap on a grid twice as fine (same field of view) is resampled nearest-neighbour.
    fine = np.repeat(np.repeat(np.repeat(inside, 2, 0), 2, 1), 2, 2).astype(np.uint8)
    fineToRas = ijkToRas.copy()
    fineToRas[:3, :3] = ijkToRas[:3, :3] / 2.0
    fineToRas[:3, 3] = (ijkToRas @ np.array([-0.25, -0.25, -0.25, 1.0]))[:3]
    fineLabelmap = helpers.addVolume(mrmlScene, fine, fineToRas, "fine", "vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(sceneGeometry.maskFromLabelmapVolume(fineLabelmap, geometry), inside)


def test_class_segments_written_and_read_back(mrmlScene, helpers):
    ijkToRas = helpers.ijkToRasMatrix((1, 1, 2), (3, 4, 5), helpers.obliqueDirection())
    volume = helpers.addVolume(mrmlScene, np.zeros((4, 6, 8), np.float32), ijkToRas, "vol")
    labels = np.random.default_rng(3).integers(0, 4, size=(4, 6, 8)).astype(np.uint8)
    segmentation = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    segmentation.CreateDefaultDisplayNodes()
    userSegment = segmentation.GetSegmentation().AddEmptySegment("", "my notes")
    sceneOutputs.writeClassSegments(segmentation, labels, 3, volume)
    np.testing.assert_array_equal(sceneOutputs.readClassLabels(segmentation, sceneGeometry.volumeGeometry(volume)), labels)
    ids = sceneOutputs.classSegmentIds(segmentation)
    assert sorted(ids) == [1, 2, 3]

    # Rewriting with fewer classes keeps the ids of the kept classes, drops class 3, and leaves
    # the segment this module did not write alone.
    newLabels = np.where(labels == 3, 1, labels).astype(np.uint8)
    sceneOutputs.writeClassSegments(segmentation, newLabels, 2, volume)
    assert sceneOutputs.classSegmentIds(segmentation) == {1: ids[1], 2: ids[2]}
    assert segmentation.GetSegmentation().GetSegment(userSegment) is not None
    np.testing.assert_array_equal(sceneOutputs.readClassLabels(segmentation, sceneGeometry.volumeGeometry(volume)), newLabels)
