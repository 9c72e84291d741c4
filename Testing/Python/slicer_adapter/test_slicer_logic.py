"""DeepGMMSegmentLogic end to end against real MRML (slicer-core) and the real worker process.

Every run uses a tiny phantom and EM (or a deep method that gets cancelled), so each worker
run costs about two seconds, most of it the worker's torch import.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import slicer
import slicer.util
import vtk

from DeepGMMSegmentLib.slicer_adapter import geometry as sceneGeometry
from DeepGMMSegmentLib.slicer_adapter import outputs as sceneOutputs
from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic, ProcessingCancelled, WorkerError
from DeepGMMSegmentLib.result import class_colors
from DeepGMMSegmentLib.slicer_adapter.runner import ManualScheduler


def _sceneSnapshot(scene):
    """Ids, names and modification times of every node: any change to the scene shows here."""
    nodes = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]
    return [(node.GetID(), node.GetName(), node.GetMTime()) for node in nodes]


def _twoChannelInputs(scene, helpers, shape=(6, 20, 24)):
    ijkToRas = helpers.ijkToRasMatrix((1.0, 1.2, 2.0), (10.0, -20.0, 5.0), helpers.obliqueDirection())
    channel1, channel2, truth = helpers.phantom(shape)
    t1 = helpers.addVolume(scene, channel1, ijkToRas, "T1")
    t2 = helpers.addVolume(scene, channel2, ijkToRas, "T2")
    return t1, t2, truth, ijkToRas


def _labels(outputs, volume):
    return sceneOutputs.readClassLabels(outputs.segmentationNode, sceneGeometry.volumeGeometry(volume))


def test_outputs_names_colours_geometry_probabilities_statistics(mrmlScene, helpers):
    t1, t2, truth, ijkToRas = _twoChannelInputs(mrmlScene, helpers)
    before = [helpers.volumeState(t1), helpers.volumeState(t2)]
    outputs = DeepGMMSegmentLogic().process([t1, t2], numberOfClasses=3, method="em-gmm", seed=3)

    segmentationNode = outputs.segmentationNode
    assert segmentationNode.GetName() == "T1 DeepGMM em-gmm"
    segmentation = segmentationNode.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    names = [segmentation.GetNthSegment(n).GetName() for n in range(3)]
    colors = [tuple(segmentation.GetNthSegment(n).GetColor()) for n in range(3)]
    assert names == ["Class 1", "Class 2", "Class 3"]
    np.testing.assert_allclose(colors, class_colors(3), atol=1e-6)
    assert len({tuple(np.round(c, 3)) for c in colors}) == 3

    # Reference geometry = first input (matrix and extent), as Slicer stores it.
    geometryText = segmentation.GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    referenceImage = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometryText, referenceImage, False)
    matrix = vtk.vtkMatrix4x4()
    referenceImage.GetImageToWorldMatrix(matrix)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), ijkToRas, atol=1e-6)
    assert referenceImage.GetExtent() == (0, 23, 0, 19, 0, 5)

    # The phantom is easy: EM finds the true tissues, numbered by ascending T1 mean.
    labels = _labels(outputs, t1)
    assert (labels == truth).mean() > 0.98

    # Probabilities: float32 0..1 volumes on the first input's grid, summing to 1, argmax = label.
    assert len(outputs.probabilityVolumes) == 3
    probabilities = np.stack([slicer.util.arrayFromVolume(v) for v in outputs.probabilityVolumes])
    assert probabilities.dtype == np.float32
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probabilities.argmax(axis=0) + 1, labels)
    for volume in outputs.probabilityVolumes:
        np.testing.assert_allclose(sceneGeometry.volumeGeometry(volume).ijkToRas, ijkToRas, atol=1e-9)

    # Subject hierarchy: segmentation beside the input, probabilities in a folder beside it.
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrmlScene)
    inputParent = shNode.GetItemParent(shNode.GetItemByDataNode(t1))
    assert shNode.GetItemParent(shNode.GetItemByDataNode(segmentationNode)) == inputParent
    folder = outputs.probabilityFolderItemId
    assert folder and shNode.GetItemParent(folder) == inputParent
    assert shNode.GetItemName(folder) == "T1 DeepGMM em-gmm probabilities"
    assert all(shNode.GetItemParent(shNode.GetItemByDataNode(v)) == folder for v in outputs.probabilityVolumes)

    # Statistics, recomputed here from the label map and the input voxels.
    voxelMl = abs(np.linalg.det(ijkToRas[:3, :3])) / 1000.0
    for stats in outputs.classStatistics:
        inside = labels == stats.classIndex
        assert stats.name == f"Class {stats.classIndex}"
        assert stats.voxelCount == int(inside.sum())
        assert stats.volumeMl == pytest.approx(inside.sum() * voxelMl)
        np.testing.assert_allclose(stats.meanIntensities, [before[0][0][inside].mean(), before[1][0][inside].mean()],
                                   rtol=1e-6)
    assert np.isfinite(outputs.finalNll) and outputs.finalNll == pytest.approx(outputs.nllHistory[-1])
    assert outputs.method == "em-gmm" and outputs.device == "cpu"

    # Run facts are stored on the node (saved with the scene).
    assert segmentationNode.GetAttribute("DeepGMMSegment.Method") == "em-gmm"
    assert segmentationNode.GetAttribute("DeepGMMSegment.Seed") == "3"
    assert float(segmentationNode.GetAttribute("DeepGMMSegment.FinalNLL")) == pytest.approx(outputs.finalNll)
    import DeepGMMSegmentLib

    assert segmentationNode.GetAttribute("DeepGMMSegment.Version") == DeepGMMSegmentLib.__version__

    helpers.assertVolumeUnchanged(t1, before[0])
    helpers.assertVolumeUnchanged(t2, before[1])


def test_mask_limits_labels_and_probabilities(mrmlScene, helpers):
    t1, t2, truth, ijkToRas = _twoChannelInputs(mrmlScene, helpers)
    inside = np.zeros(truth.shape, bool)
    inside[1:5, 3:17, 2:22] = True
    masks = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    masks.CreateDefaultDisplayNodes()
    masks.SetReferenceImageGeometryParameterFromVolumeNode(t1)
    brainImage = sceneGeometry.volumeGeometry(t1).orientedImage(inside)
    brainId = masks.AddSegmentFromBinaryLabelmapRepresentation(brainImage, "brain")
    maskMTimes = (masks.GetMTime(), masks.GetSegmentation().GetMTime(), brainImage.GetMTime())
    outputs = DeepGMMSegmentLogic().process([t1, t2], numberOfClasses=3, method="em-gmm", mask=(masks, brainId))
    assert (masks.GetMTime(), masks.GetSegmentation().GetMTime(), brainImage.GetMTime()) == maskMTimes
    labels = _labels(outputs, t1)
    assert (labels[~inside] == 0).all() and (labels[inside] > 0).all()
    assert (labels[inside] == truth[inside]).mean() > 0.98
    probabilities = np.stack([slicer.util.arrayFromVolume(v) for v in outputs.probabilityVolumes])
    np.testing.assert_allclose(probabilities.sum(axis=0)[inside], 1.0, atol=1e-4)
    assert (probabilities[:, ~inside] == 0).all()
    assert sum(s.voxelCount for s in outputs.classStatistics) == int(inside.sum())


def test_roi_refinement_changes_nothing_outside_the_roi(mrmlScene, helpers):
    t1, t2, truth, _ = _twoChannelInputs(mrmlScene, helpers)
    logic = DeepGMMSegmentLogic()
    first = logic.process([t1, t2], numberOfClasses=3, method="em-gmm")
    segmentationNode = first.segmentationNode
    segmentIds = sceneOutputs.classSegmentIds(segmentationNode)
    labelsBefore = _labels(first, t1)
    probabilitiesBefore = np.stack([slicer.util.arrayFromVolume(v).copy() for v in first.probabilityVolumes])

    roi = mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    centre = sceneGeometry.volumeGeometry(t1).ijkToRas @ np.array([12.0, 10.0, 3.0, 1.0])
    roi.SetCenter(*centre[:3])
    roi.SetSize(8.0, 8.0, 5.0)
    # Reversed prior means make class 1 the brightest tissue, so inside the ROI the labels visibly
    # change; outside they must not.
    means = [[300.0, 120.0], [200.0, 50.0], [100.0, 200.0]]
    roiMTime = roi.GetMTime()
    second = logic.process([t1, t2], outputSegmentation=segmentationNode, numberOfClasses=3, method="em-gmm",
                           roi=roi, options={"prior_means": np.array(means)})
    assert roi.GetMTime() == roiMTime
    assert second.segmentationNode is segmentationNode
    assert sceneOutputs.classSegmentIds(segmentationNode) == segmentIds
    region = sceneGeometry.roiRegion(roi, t1)
    assert second.region == region
    outside = np.ones(truth.shape, bool)
    outside[region] = False
    assert 0 < (~outside).sum() < outside.sum()

    labelsAfter = _labels(second, t1)
    probabilitiesAfter = np.stack([slicer.util.arrayFromVolume(v) for v in second.probabilityVolumes])
    assert [v.GetID() for v in second.probabilityVolumes] == [v.GetID() for v in first.probabilityVolumes]
    np.testing.assert_array_equal(labelsAfter[outside], labelsBefore[outside])
    np.testing.assert_array_equal(probabilitiesAfter[:, outside], probabilitiesBefore[:, outside])
    # Inside: the new run's labels (reversed numbering) were written.
    reversedTruth = 4 - truth[region]
    assert (labelsAfter[region] == reversedTruth).mean() > 0.95
    np.testing.assert_allclose(probabilitiesAfter[(slice(None),) + region].sum(axis=0), 1.0, atol=1e-4)


def test_second_output_kept_and_rerun_replaces_content_only(mrmlScene, helpers):
    t1, t2, truth, _ = _twoChannelInputs(mrmlScene, helpers)
    logic = DeepGMMSegmentLogic()
    gmm = logic.process([t1, t2], numberOfClasses=3, method="em-gmm")
    svgmm = logic.process([t1, t2], numberOfClasses=3, method="em-svgmm", options={"max_iter": 15})
    assert gmm.segmentationNode is not svgmm.segmentationNode
    assert svgmm.segmentationNode.GetName() == "T1 DeepGMM em-svgmm"
    svgmmLabels = _labels(svgmm, t1)
    svgmmSnapshot = (svgmm.segmentationNode.GetMTime(), [v.GetMTime() for v in svgmm.probabilityVolumes])

    # The user renames a class and adds a segment of their own; then reruns with 2 classes.
    node = gmm.segmentationNode
    nodeId = node.GetID()
    ids = sceneOutputs.classSegmentIds(node)
    node.GetSegmentation().GetSegment(ids[1]).SetName("CSF")
    own = node.GetSegmentation().AddEmptySegment("", "my notes")
    oldThird = gmm.probabilityVolumes[2].GetID()
    rerun = logic.process([t1, t2], outputSegmentation=node, numberOfClasses=2, method="em-gmm")

    assert rerun.segmentationNode.GetID() == nodeId
    assert sceneOutputs.classSegmentIds(node) == {1: ids[1], 2: ids[2]}
    assert node.GetSegmentation().GetSegment(ids[1]).GetName() == "CSF"
    assert node.GetSegmentation().GetSegment(own) is not None
    assert mrmlScene.GetNodeByID(oldThird) is None
    assert [v.GetID() for v in rerun.probabilityVolumes] == [v.GetID() for v in gmm.probabilityVolumes[:2]]
    assert rerun.probabilityFolderItemId == gmm.probabilityFolderItemId != svgmm.probabilityFolderItemId
    assert set(np.unique(_labels(rerun, t1))) == {1, 2}
    assert node.GetAttribute("DeepGMMSegment.NumberOfClasses") == "2"
    # The other output was not touched.
    np.testing.assert_array_equal(_labels(svgmm, t1), svgmmLabels)
    assert (svgmm.segmentationNode.GetMTime(), [v.GetMTime() for v in svgmm.probabilityVolumes]) == svgmmSnapshot


def test_seg_nrrd_save_and_reload_agrees_with_slicerio(mrmlScene, helpers, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    t1, t2, truth, ijkToRas = _twoChannelInputs(mrmlScene, helpers)
    outputs = DeepGMMSegmentLogic().process([t1, t2], numberOfClasses=3, method="em-gmm", probabilityMaps=False)
    assert outputs.probabilityVolumes == [] and outputs.probabilityFolderItemId == 0
    labels = _labels(outputs, t1)
    path = str(tmp_path / "classes.seg.nrrd")
    storage = outputs.segmentationNode.CreateDefaultStorageNode()
    storage.SetFileName(path)
    assert storage.WriteData(outputs.segmentationNode)

    reloaded = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    reader = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(path)
    assert reader.ReadData(reloaded)
    assert sceneOutputs.classSegmentIds(reloaded) == sceneOutputs.classSegmentIds(outputs.segmentationNode)
    np.testing.assert_array_equal(sceneOutputs.readClassLabels(reloaded, sceneGeometry.volumeGeometry(t1)), labels)

    # An independent reader of the file: names, colours, label values, voxels and geometry.
    segmentationInfo = slicerio.read_segmentation(path)
    segments = sorted(segmentationInfo["segments"], key=lambda s: s["name"])
    assert [s["name"] for s in segments] == ["Class 1", "Class 2", "Class 3"]
    np.testing.assert_allclose([s["color"] for s in segments], class_colors(3), atol=1e-3)
    voxels = segmentationInfo["voxels"]
    assert voxels.ndim == 3  # one shared layer
    fileLabels = np.zeros(voxels.shape, np.uint8)
    for classIndex, segment in enumerate(segments, start=1):
        fileLabels[voxels == segment["labelValue"]] = classIndex
    np.testing.assert_array_equal(fileLabels.transpose(2, 1, 0), labels)  # file is (I, J, K)
    lpsToRas = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(lpsToRas @ segmentationInfo["ijkToLPS"], ijkToRas, atol=1e-4)

    # A saved scene (.mrml) remembers how the output was made.
    for node in (t1, t2):
        node.AddDefaultStorageNode()
        node.GetStorageNode().SetFileName(str(tmp_path / f"{node.GetName()}.nrrd"))
        assert node.GetStorageNode().WriteData(node)
    mrmlScene.AddNode(storage)
    outputs.segmentationNode.SetAndObserveStorageNodeID(storage.GetID())
    mrmlScene.SetRootDirectory(str(tmp_path))
    mrmlScene.SetURL(str(tmp_path / "scene.mrml"))
    assert mrmlScene.Commit()
    restored = slicer.vtkMRMLScene()
    restoredSegmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    restoredSegmentations.SetMRMLScene(restored)
    restored.SetRootDirectory(str(tmp_path))
    restored.SetURL(str(tmp_path / "scene.mrml"))
    restored.Connect()
    node = restored.GetFirstNodeByName(outputs.segmentationNode.GetName())
    for name in ("Method", "Seed", "Version", "FinalNLL", "NumberOfClasses", "ClassStatistics"):
        assert node.GetAttribute(f"DeepGMMSegment.{name}") == outputs.segmentationNode.GetAttribute(
            f"DeepGMMSegment.{name}")
    assert float(node.GetAttribute("DeepGMMSegment.FinalNLL")) == pytest.approx(outputs.finalNll)
    assert [node.GetNthNodeReference("DeepGMMSegmentInputVolume", n).GetName() for n in range(2)] == ["T1", "T2"]
    assert sorted(sceneOutputs.classSegmentIds(node)) == [1, 2, 3]
    restoredSegmentations.SetMRMLScene(None)


def test_cancel_kills_worker_and_leaves_scene_unchanged(mrmlScene, helpers):
    psutil = pytest.importorskip("psutil")
    t1, t2, _, _ = _twoChannelInputs(mrmlScene, helpers, shape=(8, 32, 32))
    snapshot = _sceneSnapshot(mrmlScene)
    sceneMTime = mrmlScene.GetMTime()
    scheduler = ManualScheduler()
    logic = DeepGMMSegmentLogic(scheduler=scheduler)
    progress, completed = [], []
    # tol=0 never converges: the worker iterates until it is killed.
    task = logic.process([t1, t2], numberOfClasses=3, method="em-gmm", options={"max_iter": 10**7, "tol": 0.0},
                         waitForCompletion=False, progressCallback=progress.append,
                         completedCallback=completed.append)
    workerPid = task.job.worker.pid
    deadline = time.monotonic() + 120
    while not any(p.stage == "fitting" and p.iteration >= 1 for p in progress):
        assert logic.isProcessing(), f"worker ended early: {completed}"
        assert time.monotonic() < deadline, "no progress from the worker"
        scheduler.runPending()
        time.sleep(0.01)
    assert psutil.pid_exists(workerPid)

    logic.cancelProcessing()

    assert not logic.isProcessing()
    assert len(completed) == 1 and isinstance(completed[0], ProcessingCancelled)
    assert isinstance(task.error, ProcessingCancelled) and task.outputs is None
    assert not psutil.pid_exists(workerPid) or psutil.Process(workerPid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(task.job.jobFolder)
    scheduler.runUntilIdle(timeoutSeconds=5)  # a poll still queued must do nothing
    assert len(completed) == 1
    assert _sceneSnapshot(mrmlScene) == snapshot
    assert mrmlScene.GetMTime() == sceneMTime


def test_worker_error_surfaces_engine_message(mrmlScene, helpers):
    t1, _, truth, ijkToRas = _twoChannelInputs(mrmlScene, helpers)
    flat = helpers.addVolume(mrmlScene, np.full(truth.shape, 42.0, np.float32), ijkToRas, "flat")
    snapshot = _sceneSnapshot(mrmlScene)
    with pytest.raises(WorkerError) as raised:
        DeepGMMSegmentLogic().process([t1, flat], numberOfClasses=3, method="em-gmm")
    # The same inputs given to the engine directly: the logic must pass its message on unchanged.
    from DeepGMMSegmentLib import segment

    with pytest.raises(ValueError) as direct:
        segment([slicer.util.arrayFromVolume(t1).astype(np.float32), np.full(truth.shape, 42.0, np.float32)], 3,
                method="em-gmm", spacing=sceneGeometry.volumeGeometry(t1).spacingKji)
    assert str(raised.value) == str(direct.value)
    assert "constant" in str(raised.value)
    assert raised.value.errorType == "ValueError"
    assert _sceneSnapshot(mrmlScene) == snapshot


def test_non_blocking_path_with_hand_pumped_scheduler(mrmlScene, helpers):
    t1, t2, truth, _ = _twoChannelInputs(mrmlScene, helpers)
    scheduler = ManualScheduler()
    logic = DeepGMMSegmentLogic(scheduler=scheduler)
    progress, completed = [], []
    task = logic.process([t1, t2], numberOfClasses=3, method="em-gmm", waitForCompletion=False,
                         progressCallback=progress.append, completedCallback=completed.append)
    assert logic.isProcessing() and task.isRunning() and scheduler.pendingCount == 1
    with pytest.raises(RuntimeError, match="already running"):
        logic.process([t1], numberOfClasses=2, method="em-gmm")
    assert mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0  # nothing written yet

    scheduler.runUntilIdle(timeoutSeconds=120)

    assert not logic.isProcessing() and not task.isRunning()
    assert completed == [task.outputs]
    assert (_labels(task.outputs, t1) == truth).mean() > 0.98
    stages = [p.stage for p in progress]
    assert stages[0] == "starting" and stages[-1] == "writing" and "fitting" in stages
    iterations = [p.iteration for p in progress if p.stage == "fitting" and p.maxIterations]
    assert iterations and iterations == sorted(iterations)
    timed = [p for p in progress if p.remainingSeconds is not None and p.stage == "fitting"]
    assert timed and all(p.remainingSeconds >= 0 for p in timed)


def test_logic_knows_exactly_the_engine_methods():
    # The logic checks method names without importing the engine (torch); keep both lists equal.
    import DeepGMMSegmentLib
    from DeepGMMSegmentLib.logic import METHODS

    assert set(METHODS) == set(DeepGMMSegmentLib.METHODS)


def test_invalid_requests_are_clear_errors_before_any_work(mrmlScene, helpers):
    t1, t2, _, _ = _twoChannelInputs(mrmlScene, helpers)
    logic = DeepGMMSegmentLogic(runnerFactory=lambda **kwargs: pytest.fail("no worker may start"))
    with pytest.raises(ValueError, match="Unknown method 'kmeans'"):
        logic.process([t1], method="kmeans")
    with pytest.raises(ValueError, match="between 1 and 4"):
        logic.process([t1, t2, t1, t2, t1], method="em-gmm")
    with pytest.raises(ValueError, match="selected twice"):
        logic.process([t1, t1], method="em-gmm")
    with pytest.raises(ValueError, match=">= 2"):
        logic.process([t1], numberOfClasses=1, method="em-gmm")
    with pytest.raises(ValueError, match="progress"):
        logic.process([t1], method="em-gmm", options={"progress": print})
    with pytest.raises(ValueError, match="scheduler"):
        logic.process([t1], method="em-gmm", waitForCompletion=False)
    emptyMask = helpers.addVolume(mrmlScene, np.zeros((6, 20, 24), np.uint8),
                                  sceneGeometry.volumeGeometry(t1).ijkToRas, "empty", "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(ValueError, match="No voxel to segment"):
        logic.process([t1], method="em-gmm", mask=emptyMask)


def test_inputs_on_other_grids_and_under_a_transform(mrmlScene, helpers):
    # T1 sits under a linear transform; T2 is stored on a grid twice as fine, already in world
    # position. Every T1 voxel centre is the centre of a 2x2x2 block of equal T2 voxels, so the
    # resampled T2 must equal the coarse values exactly.
    channel1, channel2, truth = helpers.phantom()
    local = helpers.ijkToRasMatrix((1.0, 1.2, 2.0), (10.0, -20.0, 5.0), helpers.obliqueDirection())
    shift = np.eye(4)
    shift[:3, 3] = (30.0, -4.0, 2.5)
    transform = mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    t1 = helpers.addVolume(mrmlScene, channel1, local, "T1")
    t1.SetAndObserveTransformNodeID(transform.GetID())
    world = shift @ local
    fine = world.copy()
    fine[:3, :3] = world[:3, :3] / 2.0
    fine[:3, 3] = (world @ np.array([-0.25, -0.25, -0.25, 1.0]))[:3]
    fineChannel2 = np.repeat(np.repeat(np.repeat(channel2, 2, 0), 2, 1), 2, 2)
    t2 = helpers.addVolume(mrmlScene, fineChannel2, fine, "T2 fine")

    channels, covered, _ = sceneGeometry.channelsOnReferenceGrid([t1, t2])
    np.testing.assert_allclose(channels[1], channel2, rtol=1e-5)
    assert covered.all()

    outputs = DeepGMMSegmentLogic().process([t1, t2], numberOfClasses=3, method="em-gmm")
    assert outputs.segmentationNode.GetTransformNodeID() == transform.GetID()
    assert all(v.GetTransformNodeID() == transform.GetID() for v in outputs.probabilityVolumes)
    assert (_labels(outputs, t1) == truth).mean() > 0.98
    for stats in outputs.classStatistics:
        inside = _labels(outputs, t1) == stats.classIndex
        assert stats.meanIntensities[1] == pytest.approx(channel2[inside].mean(), rel=1e-5)


def test_progress_callback_returning_false_cancels_a_blocking_run(mrmlScene, helpers):
    t1, t2, _, _ = _twoChannelInputs(mrmlScene, helpers)
    snapshot = _sceneSnapshot(mrmlScene)
    logic = DeepGMMSegmentLogic()
    seen = []

    def stopAfterThree(info):
        seen.append(info)
        return not (info.stage == "fitting" and info.iteration >= 3)

    with pytest.raises(ProcessingCancelled):
        logic.process([t1, t2], numberOfClasses=3, method="em-gmm", options={"max_iter": 10**7, "tol": 0.0},
                      progressCallback=stopAfterThree)
    assert not logic.isProcessing()
    assert any(info.iteration >= 3 for info in seen)
    assert _sceneSnapshot(mrmlScene) == snapshot


class _ScriptedJob:
    """A job stand-in that replays progress reports, to test how the logic passes them on."""

    def __init__(self, batches, **jobArguments):
        self.batches = list(batches)
        self.jobArguments = jobArguments
        self.cleanedUp = False

    def start(self):
        pass

    def isRunning(self):
        return bool(self.batches)

    def progressUpdates(self):
        return self.batches.pop(0) if self.batches else []

    def result(self):
        raise WorkerError("scripted end", "ValueError")

    def cancel(self):
        return True

    def cleanup(self):
        self.cleanedUp = True


def test_iteration_reports_are_coalesced_per_poll(mrmlScene, helpers):
    from DeepGMMSegmentLib.logic import ProgressInfo

    t1, _, _, _ = _twoChannelInputs(mrmlScene, helpers)
    fitting = [ProgressInfo("fitting", n, 1000, 1.0 / n, 0.01 * n) for n in range(1, 501)]
    batches = [[ProgressInfo("loading")], [ProgressInfo("fitting")] + fitting[:300], fitting[300:],
               [ProgressInfo("saving")]]
    jobs = []
    scheduler = ManualScheduler()
    logic = DeepGMMSegmentLogic(scheduler=scheduler,
                                runnerFactory=lambda **kw: jobs.append(_ScriptedJob(batches, **kw)) or jobs[-1])
    seen, completed = [], []
    logic.process([t1], numberOfClasses=2, method="em-gmm", waitForCompletion=False, progressCallback=seen.append,
                  completedCallback=completed.append)
    scheduler.runUntilIdle(timeoutSeconds=30)
    assert [(p.stage, p.iteration) for p in seen] == [("starting", 0), ("loading", 0), ("fitting", 300),
                                                      ("fitting", 500), ("saving", 0)]
    assert isinstance(completed[0], WorkerError) and jobs[0].cleanedUp and not logic.isProcessing()
    # The job got the first input's spacing in (k, j, i) order and the arrays of the request.
    assert jobs[0].jobArguments["spacing"] == pytest.approx((2.0, 1.2, 1.0))
    assert jobs[0].jobArguments["channels"][0].shape == (6, 20, 24) and jobs[0].jobArguments["mask"] is None


def test_trained_model_that_does_not_fit_is_refused_before_the_worker(mrmlScene, helpers, trainedModelFile):
    t1, t2, _, _ = _twoChannelInputs(mrmlScene, helpers)
    model = trainedModelFile(("T1", "T2"))  # a real model file, trained on two channels
    snapshot = _sceneSnapshot(mrmlScene)
    logic = DeepGMMSegmentLogic(runnerFactory=lambda **kwargs: pytest.fail("no worker may start"))
    needs = "This model needs 2 input volume(s) in the order T1, T2 (3D), numberOfClasses=3 and method='deepsvg'."

    with pytest.raises(ValueError) as raised:
        logic.process([t1], numberOfClasses=3, method="deepsvg", options={"model": str(model)})
    assert str(raised.value) == ("The trained model does not match the input: the model expects 2 channel(s) (T1, T2) "
                                 f"but the input has 1. {needs}")
    with pytest.raises(ValueError, match="segments into 3 classes but 4 were requested"):
        logic.process([t1, t2], numberOfClasses=4, method="deepsvg", options={"model": model})
    with pytest.raises(ValueError) as raised:
        logic.process([t1, t2], numberOfClasses=3, method="deepg", options={"model": model})
    assert str(raised.value) == ("The trained model was trained for method 'deepsvg' but method='deepg' was "
                                 f"requested. {needs}")
    with pytest.raises(ValueError, match="trained for method 'deepsvg' but method='em-gmm'"):
        logic.process([t1, t2], numberOfClasses=3, method="em-gmm", options={"model": model})
    with pytest.raises(ValueError, match="does not exist"):
        logic.process([t1, t2], method="deepsvg", options={"model": str(model) + ".missing"})
    with pytest.raises(ValueError, match=r"fine_tune'\] must be an integer >= 0"):
        logic.process([t1, t2], method="deepsvg", options={"model": model, "fine_tune": -1})
    assert _sceneSnapshot(mrmlScene) == snapshot
    assert not logic.isProcessing()


def test_trained_model_segments_through_the_logic(mrmlScene, helpers, trainedModelFile, monkeypatch):
    ijkToRas = helpers.ijkToRasMatrix((1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    channel1, channel2, truth = helpers.phantom(shape=(4, 16, 18), seed=7)
    t1 = helpers.addVolume(mrmlScene, channel1, ijkToRas, "T1")
    t2 = helpers.addVolume(mrmlScene, channel2, ijkToRas, "T2")
    model = trainedModelFile(("T1", "T2"))
    monkeypatch.chdir(model.parent)  # a relative path still names the file once the worker runs elsewhere

    outputs = DeepGMMSegmentLogic().process([t1, t2], numberOfClasses=3, method="deepsvg",
                                            options={"model": model.name})
    segmentation = outputs.segmentationNode.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(3)] == ["Class 1", "Class 2", "Class 3"]
    assert outputs.numberOfIterations == 1 and len(outputs.probabilityVolumes) == 3  # one forward pass
    assert outputs.method == "deepsvg" and np.isfinite(outputs.finalNll)
    # The tiny model (3 epochs on 4 phantoms) is no expert, but it finds the three blocks.
    assert (_labels(outputs, t1) == truth).mean() > 0.6
    stored = json.loads(outputs.segmentationNode.GetAttribute("DeepGMMSegment.Options"))
    assert stored == {"model": str(model)}  # absolute: a saved scene remembers which model file


def test_a_trained_model_names_the_output_classes(mrmlScene, helpers, trainedModelFile):
    ijkToRas = helpers.ijkToRasMatrix((1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    channel1, channel2, _ = helpers.phantom(shape=(4, 16, 18), seed=7)
    t1 = helpers.addVolume(mrmlScene, channel1, ijkToRas, "T1")
    t2 = helpers.addVolume(mrmlScene, channel2, ijkToRas, "T2")
    model = trainedModelFile(("T1", "T2"), classNames=("CSF", "Grey matter", "White matter"))
    outputs = DeepGMMSegmentLogic().process([t1, t2], numberOfClasses=3, method="deepsvg", options={"model": model})
    segmentation = outputs.segmentationNode.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(3)] == ["CSF", "Grey matter", "White matter"]
    assert [s.name for s in outputs.classStatistics] == ["CSF", "Grey matter", "White matter"]
    np.testing.assert_allclose([segmentation.GetNthSegment(n).GetColor() for n in range(3)], class_colors(3),
                               atol=1e-6)
