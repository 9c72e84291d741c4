"""Class identity from painted voxels in Slicer: reference segments -> the engine's seed labels on the
first input's grid, and output classes named and coloured after the segments, in their order."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import slicer.util
import vtk

from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic
from DeepGMMSegmentLib.result import class_colors
from DeepGMMSegmentLib.slicer_adapter import geometry as sceneGeometry
from DeepGMMSegmentLib.slicer_adapter import outputs as sceneOutputs
from DeepGMMSegmentLib.slicer_adapter.request import prepareRequest
from DeepGMMSegmentLib.slicer_adapter.seeds import referenceSegments

SHAPE = (6, 20, 24)
SCAR_COLOR, BLOOD_COLOR = (0.9, 0.1, 0.1), (0.2, 0.3, 0.95)


@pytest.fixture
def scene(mrmlScene, helpers):
    ijkToRas = helpers.ijkToRasMatrix((1.0, 1.2, 2.0), (10.0, -20.0, 5.0), helpers.obliqueDirection())
    channel1, channel2, truth = helpers.phantom(SHAPE)
    t1 = helpers.addVolume(mrmlScene, channel1, ijkToRas, "T1")
    t2 = helpers.addVolume(mrmlScene, channel2, ijkToRas, "T2")
    return t1, t2, truth


def strokes(truth, tissue, every=7):
    """A few voxels of one true tissue (every n-th of them): what a radiologist's strokes mark."""
    marked = np.zeros(truth.shape, bool)
    where = np.flatnonzero(truth == tissue)[::every]
    marked.flat[where] = True
    return marked


def paint(segmentationNode, volume, name, color, marked):
    """Add a segment holding ``marked`` voxels of ``volume``'s grid, as the Segment Editor would."""
    image = sceneGeometry.volumeGeometry(volume).orientedImage(marked)
    return segmentationNode.AddSegmentFromBinaryLabelmapRepresentation(image, name, color)


def reference(scene, volume, segments):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Reference")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = [paint(node, volume, name, color, marked) for name, color, marked in segments]
    return node, ids


def segmentationState(node):
    segmentation = node.GetSegmentation()
    segments = [segmentation.GetNthSegment(n) for n in range(segmentation.GetNumberOfSegments())]
    return (node.GetMTime(), segmentation.GetMTime(), [(s.GetName(), tuple(s.GetColor()), s.GetMTime())
                                                       for s in segments])


def test_segments_become_seed_labels_in_their_order(mrmlScene, scene):
    t1, _, truth = scene
    scar, blood = strokes(truth, 3), strokes(truth, 1)
    node, _ = reference(mrmlScene, t1, [("Scar", SCAR_COLOR, scar), ("Blood pool", BLOOD_COLOR, blood)])
    before = segmentationState(node)
    seeds = referenceSegments(node, sceneGeometry.volumeGeometry(t1), np.ones(SHAPE, bool), 3)
    assert seeds.names == ["Scar", "Blood pool"]
    np.testing.assert_allclose(seeds.colors, [SCAR_COLOR, BLOOD_COLOR], atol=1e-6)
    assert seeds.labels.dtype == np.uint8 and seeds.labels.shape == SHAPE
    expected = np.zeros(SHAPE, np.uint8)
    expected[scar], expected[blood] = 1, 2
    np.testing.assert_array_equal(seeds.labels, expected)
    assert segmentationState(node) == before


def test_strokes_are_resampled_onto_the_first_input_like_every_input(mrmlScene, scene):
    t1, _, truth = scene
    marked = np.zeros(SHAPE, bool)
    marked[2:4, 5:9, 3:6] = True
    other = np.zeros(SHAPE, bool)
    other[1, 12:15, 15:20] = True
    node, _ = reference(mrmlScene, t1, [("A", SCAR_COLOR, marked), ("B", BLOOD_COLOR, other)])
    # The segmentation sits under a transform that moves it by exactly one voxel along I in world space.
    transform = mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    step = sceneGeometry.volumeGeometry(t1).ijkToRas[:3, 0]
    matrix = vtk.vtkMatrix4x4()
    for axis in range(3):
        matrix.SetElement(axis, 3, float(step[axis]))
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    seeds = referenceSegments(node, sceneGeometry.volumeGeometry(t1), np.ones(SHAPE, bool), 2)
    np.testing.assert_array_equal(seeds.labels == 1, np.roll(marked, 1, axis=2))
    np.testing.assert_array_equal(seeds.labels == 2, np.roll(other, 1, axis=2))


def test_bad_reference_segments_are_clear_errors_before_any_work(mrmlScene, scene):
    t1, t2, truth = scene
    logic = DeepGMMSegmentLogic(runnerFactory=lambda **kwargs: pytest.fail("no worker may start"))
    scar, blood = strokes(truth, 3), strokes(truth, 1)

    single, _ = reference(mrmlScene, t1, [("Scar", SCAR_COLOR, scar)])
    with pytest.raises(ValueError, match=r"'Reference' has 1 segment\(s\) to use; paint at least two tissues"):
        logic.process([t1], numberOfClasses=3, method="em-gmm", seedSegmentation=single)

    four, _ = reference(mrmlScene, t1, [(name, SCAR_COLOR, strokes(truth, tissue))
                                        for name, tissue in (("a", 1), ("b", 2), ("c", 3))]
                        + [("d", BLOOD_COLOR, np.zeros(SHAPE, bool))])
    with pytest.raises(ValueError, match="has 4 segments but the number of classes is 3: raise the number of "
                                         "classes to at least 4"):
        logic.process([t1], numberOfClasses=3, method="em-gmm", seedSegmentation=four)
    with pytest.raises(ValueError, match=r"Segment 'd' of 'Reference' is empty on the grid of the first input"):
        logic.process([t1], numberOfClasses=4, method="em-gmm", seedSegmentation=four)

    overlapping, _ = reference(mrmlScene, t1, [("Scar", SCAR_COLOR, scar), ("Blood", BLOOD_COLOR, scar | blood)])
    with pytest.raises(ValueError, match=rf"Segment 'Blood' .* overlaps segment 'Scar' in {scar.sum()} voxel"):
        logic.process([t1], numberOfClasses=3, method="em-gmm", seedSegmentation=overlapping)

    good, _ = reference(mrmlScene, t1, [("Scar", SCAR_COLOR, scar), ("Blood", BLOOD_COLOR, blood)])
    inside = np.ones(SHAPE, bool)
    inside[:, :, :4] = False  # the mask leaves out some blood strokes
    masks = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mask")
    maskId = paint(masks, t1, "inside", (1, 1, 0), inside)
    with pytest.raises(ValueError, match=rf"Segment 'Blood' .* has {(blood & ~inside).sum()} painted voxel\(s\) "
                                         "outside the mask"):
        logic.process([t1], numberOfClasses=3, method="em-gmm", mask=(masks, maskId), seedSegmentation=good)

    roi = mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")  # a box over the scar side only
    centre = sceneGeometry.volumeGeometry(t1).ijkToRas @ np.array([21.0, 10.0, 3.0, 1.0])
    roi.SetCenter(*centre[:3])
    roi.SetSize(4.0, 30.0, 14.0)
    with pytest.raises(ValueError, match="Segment 'Blood' .* has no painted voxel inside the ROI box"):
        logic.process([t1], numberOfClasses=3, method="em-gmm", roi=roi, seedSegmentation=good)

    with pytest.raises(ValueError, match="either prior class means or reference segments, not both"):
        logic.process([t1], numberOfClasses=3, method="em-gmm", seedSegmentation=good,
                      options={"prior_means": [[1.0], [2.0], [3.0]]})
    with pytest.raises(ValueError, match="reference segments cannot also be the output"):
        logic.process([t1], outputSegmentation=good, numberOfClasses=3, method="em-gmm", seedSegmentation=good)
    with pytest.raises(ValueError, match="seedSegmentation must be a segmentation node"):
        logic.process([t1], numberOfClasses=3, method="em-gmm", seedSegmentation=t2)
    with pytest.raises(ValueError, match=r"options may not contain seeds: .*\(seedSegmentation;"):
        logic.process([t1], numberOfClasses=3, method="em-gmm", options={"seeds": [1]})
    assert mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 5  # no output was made


def test_strokes_painted_into_the_mask_segmentation_leave_the_mask_segment_out(mrmlScene, scene):
    t1, _, truth = scene
    inside = np.ones(SHAPE, bool)
    inside[0] = False
    scar, blood = strokes(truth, 3) & inside, strokes(truth, 1) & inside
    node, ids = reference(mrmlScene, t1, [("LV mask", (1, 1, 0), inside), ("Scar", SCAR_COLOR, scar),
                                          ("Blood", BLOOD_COLOR, blood)])
    request = prepareRequest([t1], None, 3, "em-gmm", None, (node, ids[0]), "cpu", 0, None, True,
                             seedSegmentation=node)
    assert request.reference.names == ["Scar", "Blood"]
    np.testing.assert_array_equal(request.reference.labels, np.where(scar, 1, np.where(blood, 2, 0)))
    np.testing.assert_array_equal(request.regionSeeds(), request.reference.labels)


def test_output_classes_take_the_segments_names_and_colours_in_their_order(mrmlScene, scene):
    t1, t2, truth = scene
    scar, blood = strokes(truth, 3), strokes(truth, 1)
    node, _ = reference(mrmlScene, t1, [("Scar", SCAR_COLOR, scar), ("Blood pool", BLOOD_COLOR, blood)])
    referenceBefore = segmentationState(node)
    inputsBefore = [slicer.util.arrayFromVolume(v).copy() for v in (t1, t2)]
    logic = DeepGMMSegmentLogic()
    outputs = logic.process([t1, t2], numberOfClasses=3, method="em-gmm", seedSegmentation=node)

    segmentation = outputs.segmentationNode.GetSegmentation()
    segments = [segmentation.GetNthSegment(n) for n in range(segmentation.GetNumberOfSegments())]
    assert [s.GetName() for s in segments] == ["Scar", "Blood pool", "Class 3"]
    np.testing.assert_allclose([s.GetColor() for s in segments], [SCAR_COLOR, BLOOD_COLOR, class_colors(3)[2]],
                               atol=1e-6)
    labels = sceneOutputs.readClassLabels(outputs.segmentationNode, sceneGeometry.volumeGeometry(t1))
    assert (labels[scar] == 1).all() and (labels[blood] == 2).all()  # the marked voxels keep their class
    assert ((labels == 1) == (truth == 3)).mean() > 0.98  # class 1 is the tissue the "Scar" strokes marked
    assert ((labels == 2) == (truth == 1)).mean() > 0.98
    assert [s.name for s in outputs.classStatistics] == ["Scar", "Blood pool", "Class 3"]
    assert [v.GetName() for v in outputs.probabilityVolumes] == [
        "T1 DeepGMM em-gmm Scar probability", "T1 DeepGMM em-gmm Blood pool probability",
        "T1 DeepGMM em-gmm Class 3 probability"]
    assert outputs.segmentationNode.GetNodeReference(sceneOutputs.REFERENCE_SEGMENTS_ROLE).GetID() == node.GetID()
    assert segmentationState(node) == referenceBefore
    for volume, array in zip((t1, t2), inputsBefore):
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), array)

    # A rerun with a renamed reference segment renames the class it marks; the free class keeps the
    # name the user gave it.
    segments[2].SetName("Edema")
    node.GetSegmentation().GetNthSegment(0).SetName("Infarct")
    logic.process([t1, t2], outputSegmentation=outputs.segmentationNode, numberOfClasses=3, method="em-gmm",
                  seedSegmentation=node, probabilityMaps=False)
    assert [segmentation.GetNthSegment(n).GetName() for n in range(3)] == ["Infarct", "Blood pool", "Edema"]
    assert not outputs.segmentationNode.GetNodeReference(sceneOutputs.PROBABILITY_REFERENCE_ROLE)


def test_seeds_inside_an_roi_and_with_a_deep_method(mrmlScene, scene):
    t1, t2, truth = scene
    scar, blood = strokes(truth, 3, every=3), strokes(truth, 1, every=3)
    node, _ = reference(mrmlScene, t1, [("Scar", SCAR_COLOR, scar), ("Blood pool", BLOOD_COLOR, blood)])
    roi = mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    centre = sceneGeometry.volumeGeometry(t1).ijkToRas @ np.array([12.0, 10.0, 3.0, 1.0])
    roi.SetCenter(*centre[:3])
    roi.SetSize(20.0, 20.0, 10.0)
    outputs = DeepGMMSegmentLogic().process(
        [t1, t2], numberOfClasses=2, method="deepg", roi=roi, seedSegmentation=node,
        options={"max_iter": 20, "min_iter": 5, "depth": 2, "base_width": 4, "warm_start_iter": 10,
                 "precision": "float32"})
    region = sceneGeometry.roiRegion(roi, t1)
    labels = sceneOutputs.readClassLabels(outputs.segmentationNode, sceneGeometry.volumeGeometry(t1))[region]
    assert (labels[scar[region]] == 1).all() and (labels[blood[region]] == 2).all()
    names = [outputs.segmentationNode.GetSegmentation().GetNthSegment(n).GetName() for n in range(2)]
    assert names == ["Scar", "Blood pool"]


def test_seeds_with_a_trained_model_are_refused_before_the_worker(mrmlScene, scene, trainedModelFile):
    t1, t2, truth = scene
    node, _ = reference(mrmlScene, t1, [("Scar", SCAR_COLOR, strokes(truth, 3)),
                                        ("Blood pool", BLOOD_COLOR, strokes(truth, 1))])
    logic = DeepGMMSegmentLogic(runnerFactory=lambda **kwargs: pytest.fail("no worker may start"))
    with pytest.raises(ValueError, match="Reference segments cannot be combined with a trained model"):
        logic.process([t1, t2], numberOfClasses=3, method="deepsvg", seedSegmentation=node,
                      options={"model": str(trainedModelFile(("T1", "T2")))})
