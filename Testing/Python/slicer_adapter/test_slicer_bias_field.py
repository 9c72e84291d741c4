"""process(..., biasField=...) against real MRML and the real worker: the estimated field and the
corrected images arrive as volume nodes on the first input's grid, and the inputs stay untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import slicer
import slicer.util

from DeepGMMSegmentLib import segment
from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic
from DeepGMMSegmentLib.slicer_adapter import geometry as sceneGeometry
from DeepGMMSegmentLib.slicer_adapter import outputs as sceneOutputs
from DeepGMMSegmentLib.slicer_adapter.runner import SegmentationJob

SHAPE = (6, 20, 24)


def _knownField(shape=SHAPE):
    """A smooth multiplicative field, +-25 % across the I axis and a little along J."""
    k, j, i = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    return np.exp(0.25 * i + 0.08 * j).astype(np.float32)


@pytest.fixture
def biasedInputs(mrmlScene, helpers):
    ijkToRas = helpers.ijkToRasMatrix((1.0, 1.2, 2.0), (10.0, -20.0, 5.0), helpers.obliqueDirection())
    channel1, channel2, truth = helpers.phantom(SHAPE)
    field = _knownField()
    t1 = helpers.addVolume(mrmlScene, channel1 * field, ijkToRas, "T1")
    t2 = helpers.addVolume(mrmlScene, channel2 * field, ijkToRas, "T2")
    return t1, t2, field, truth, ijkToRas


def test_field_and_corrected_volumes_have_the_input_grid_and_the_engine_values(mrmlScene, biasedInputs, helpers):
    t1, t2, trueField, truth, ijkToRas = biasedInputs
    before = [helpers.volumeState(t1), helpers.volumeState(t2)]
    outputs = DeepGMMSegmentLogic().process([t1, t2], numberOfClasses=3, method="em-gmm", seed=1, biasField="auto")

    assert [v.GetName() for v in outputs.biasFieldVolumes] == ["T1 bias field", "T2 bias field"]
    assert [v.GetName() for v in outputs.correctedVolumes] == ["T1 corrected", "T2 corrected"]
    inputs = [before[0][0], before[1][0]]
    # The very arrays the engine gives for the same channels (the worker and runner carry them whole).
    direct = segment(inputs, 3, method="em-gmm", spacing=sceneGeometry.volumeGeometry(t1).spacingKji, seed=1,
                     device="cpu", bias_field="auto")
    for channel, (fieldNode, correctedNode) in enumerate(zip(outputs.biasFieldVolumes, outputs.correctedVolumes)):
        for node in (fieldNode, correctedNode):
            assert node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
            np.testing.assert_allclose(sceneGeometry.volumeGeometry(node).ijkToRas, ijkToRas, atol=1e-9)
            assert node.GetDisplayNode() is not None
        field = slicer.util.arrayFromVolume(fieldNode)
        corrected = slicer.util.arrayFromVolume(correctedNode)
        assert field.dtype == corrected.dtype == np.float32 and field.shape == SHAPE
        np.testing.assert_allclose(field, direct.bias_field[channel], rtol=1e-4)
        np.testing.assert_allclose(corrected, direct.corrected[channel], rtol=1e-4)
        np.testing.assert_allclose(corrected, inputs[channel] / field, rtol=1e-5)
        # The known field is found (up to the global scale the class means absorb).
        assert np.corrcoef(np.log(field).ravel(), np.log(trueField).ravel())[0, 1] > 0.95
    labels = sceneOutputs.readClassLabels(outputs.segmentationNode, sceneGeometry.volumeGeometry(t1))
    assert (labels == truth).mean() > 0.95

    # Beside the input in the subject hierarchy; the run's setting is stored on the output.
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrmlScene)
    inputParent = shNode.GetItemParent(shNode.GetItemByDataNode(t1))
    for node in outputs.biasFieldVolumes + outputs.correctedVolumes:
        assert shNode.GetItemParent(shNode.GetItemByDataNode(node)) == inputParent
    segmentationNode = outputs.segmentationNode
    assert segmentationNode.GetAttribute("DeepGMMSegment.BiasField") == "auto"
    assert "bias_field" not in json.loads(segmentationNode.GetAttribute("DeepGMMSegment.Options"))
    helpers.assertVolumeUnchanged(t1, before[0])
    helpers.assertVolumeUnchanged(t2, before[1])


def test_rerun_updates_the_same_volumes_and_a_run_without_keeps_them(mrmlScene, biasedInputs):
    t1, t2, _, _, _ = biasedInputs
    logic = DeepGMMSegmentLogic()
    first = logic.process([t1], numberOfClasses=3, method="em-gmm", biasField=True)
    fieldNode, correctedNode = first.biasFieldVolumes[0], first.correctedVolumes[0]
    fieldBefore = slicer.util.arrayFromVolume(fieldNode).copy()
    fieldNode.SetName("my field")  # the user's name is kept

    second = logic.process([t1], outputSegmentation=first.segmentationNode, numberOfClasses=3, method="em-gmm",
                           biasField=1)  # a linear field this time
    assert [v.GetID() for v in second.biasFieldVolumes] == [fieldNode.GetID()]
    assert [v.GetID() for v in second.correctedVolumes] == [correctedNode.GetID()]
    assert fieldNode.GetName() == "my field"
    assert not np.allclose(slicer.util.arrayFromVolume(fieldNode), fieldBefore)
    assert first.segmentationNode.GetAttribute("DeepGMMSegment.BiasField") == "1"

    third = logic.process([t1], outputSegmentation=first.segmentationNode, numberOfClasses=3, method="em-gmm")
    assert third.biasFieldVolumes == [] and third.correctedVolumes == []
    # The old volumes stay in the scene, no longer tied to this output.
    assert mrmlScene.GetNodeByID(fieldNode.GetID()) is not None
    assert mrmlScene.GetNodeByID(correctedNode.GetID()) is not None
    for role in (sceneOutputs.BIAS_FIELD_REFERENCE_ROLE, sceneOutputs.CORRECTED_REFERENCE_ROLE):
        assert first.segmentationNode.GetNumberOfNodeReferences(role) == 0
    # the default, "detect", looks for no field in a region this small
    assert first.segmentationNode.GetAttribute("DeepGMMSegment.BiasField") == "detect"
    assert first.segmentationNode.GetAttribute("DeepGMMSegment.BiasFieldCorrected") == "false"


def test_roi_run_fills_the_field_outside_the_box_like_outside_a_mask(mrmlScene, biasedInputs):
    t1, _, _, _, _ = biasedInputs
    roi = mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    centre = sceneGeometry.volumeGeometry(t1).ijkToRas @ np.array([12.0, 10.0, 3.0, 1.0])
    roi.SetCenter(*centre[:3])
    roi.SetSize(14.0, 14.0, 8.0)
    outputs = DeepGMMSegmentLogic().process([t1], numberOfClasses=3, method="em-gmm", roi=roi, biasField="auto")
    region = sceneGeometry.roiRegion(roi, t1)
    outside = np.ones(SHAPE, bool)
    outside[region] = False
    assert outside.any() and not outside.all()
    field = slicer.util.arrayFromVolume(outputs.biasFieldVolumes[0])
    corrected = slicer.util.arrayFromVolume(outputs.correctedVolumes[0])
    original = slicer.util.arrayFromVolume(t1)
    assert (field[outside] == 1.0).all()
    np.testing.assert_array_equal(corrected[outside], original[outside])
    np.testing.assert_allclose(field[region].mean(), 1.0, rtol=1e-4)  # mean 1 where it was estimated
    np.testing.assert_allclose(corrected[region], original[region] / field[region], rtol=1e-5)


def test_bad_bias_field_values_are_clear_errors_before_any_work(mrmlScene, biasedInputs):
    t1, _, _, _, _ = biasedInputs
    logic = DeepGMMSegmentLogic(runnerFactory=lambda **kwargs: pytest.fail("no worker may start"))
    with pytest.raises(ValueError,
                       match=r"biasField: bias_field must be 'none', 'auto', 'detect' or a basis order 0\.\.6"):
        logic.process([t1], biasField="strong")
    with pytest.raises(ValueError, match=r"options may not contain bias_field: .*\(biasField;"):
        logic.process([t1], options={"bias_field": "auto"})
    assert mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_segmentation_job_carries_the_field_and_corrected_arrays():
    channel = np.abs(np.random.default_rng(0).normal(100.0, 5.0, (4, 12, 12))).astype(np.float32)
    channel[:, :, 6:] *= 2.0
    channel *= _knownField((4, 12, 12))
    job = SegmentationJob([channel], None, numberOfClasses=2, method="em-gmm", options={"bias_field": 2}, seed=0)
    job.start()
    job.wait(timeout=120)
    try:
        result = job.result()
    finally:
        job.cleanup()
    direct = segment(channel, 2, method="em-gmm", seed=0, device="cpu", bias_field=2)
    assert result.bias_field.shape == result.corrected.shape == (1, 4, 12, 12)
    assert result.bias_field.dtype == result.corrected.dtype == np.float32
    np.testing.assert_allclose(result.bias_field, direct.bias_field, rtol=1e-4)
    np.testing.assert_allclose(result.corrected, direct.corrected, rtol=1e-4)
