"""The panel's run, without Qt: what DeepGMMSegmentWidget hands the logic and shows, on real MRML.

The widget (DeepGMMSegment.py) needs Qt and runs only inside Slicer; here its Qt-free steps
(DeepGMMSegmentLib/panel.py) drive the real logic and worker exactly as the widget does: input
check, prior means text -> engine options, non-blocking run with progress texts, results table,
then a second method into a new output (comparison keeps both).
"""

from __future__ import annotations

import numpy as np

from DeepGMMSegmentLib.options import parse_prior_means
from DeepGMMSegmentLib.slicer_adapter import panel
from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic
from DeepGMMSegmentLib.slicer_adapter.runner import ManualScheduler


def _nodeName(scene):
    return lambda nodeId: scene.GetNodeByID(nodeId).GetName() if scene.GetNodeByID(nodeId) else None


def test_panel_run_prior_means_progress_and_comparison_table(mrmlScene, helpers):
    channel1, channel2, truth = helpers.phantom()  # class means: channel 1 100/200/300, channel 2 200/50/120
    ijkToRas = helpers.ijkToRasMatrix((1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    t1 = helpers.addVolume(mrmlScene, channel1, ijkToRas, "T1")
    t2 = helpers.addVolume(mrmlScene, channel2, ijkToRas, "T2")
    selectors = [t1, t2, None, None]
    assert panel.inputsProblem(selectors) is None
    channels = panel.chosenChannels(selectors)

    # Prior means typed in the panel, brightest tissue first: class 1 becomes the brightest one.
    priorMeans = parse_prior_means("300, 120; 200, 50; 100, 200", 3, len(channels)).tolist()  # as the widget does
    options = panel.engineOptions(maxIterations=60, tolerance=0.0, covarianceType="diag", priorMeans=priorMeans)
    scheduler = ManualScheduler()
    logic = DeepGMMSegmentLogic(scheduler=scheduler)
    progressTexts, completed = [], []

    def onProgress(info):
        progressTexts.append(panel.formatProgress(info))

    logic.process(channels, outputSegmentation=None, numberOfClasses=3, method="em-gmm", roi=None, mask=None,
                  device="cpu", seed=0, options=options, probabilityMaps=True, waitForCompletion=False,
                  progressCallback=onProgress, completedCallback=completed.append)
    scheduler.runUntilIdle(timeoutSeconds=120)

    assert len(completed) == 1 and not isinstance(completed[0], BaseException), completed
    first = completed[0]
    means = np.array([statistics.meanIntensities for statistics in first.classStatistics])
    np.testing.assert_allclose(means[:, 0], [300, 200, 100], atol=10)  # class order follows the prior rows
    np.testing.assert_allclose(means[:, 1], [120, 50, 200], atol=10)
    fitting = [text for percent, text in progressTexts if text.startswith("Fitting")]
    assert fitting and "iteration" in fitting[-1] and "NLL" in fitting[-1]
    assert progressTexts[0] == (None, "Starting")
    assert all(percent is None or 0 <= percent <= 100 for percent, _ in progressTexts)

    results = panel.SessionResults()
    results.add(first.segmentationNode.GetID(), "EM-GMM", first)
    first.segmentationNode.SetName("EM result")

    # Comparison: another method into a new output keeps both, one table block each.
    second = logic.process(channels, outputSegmentation=None, numberOfClasses=3, method="em-svgmm",
                           options=panel.engineOptions(maxIterations=15))
    results.add(second.segmentationNode.GetID(), "EM-SVGMM", second)
    rows = results.rows(_nodeName(mrmlScene))
    assert [row[:3] for row in rows] == [("EM result", "EM-GMM", f"Class {k}") for k in (1, 2, 3)] + [
        (second.segmentationNode.GetName(), "EM-SVGMM", f"Class {k}") for k in (1, 2, 3)]
    voxelMl = abs(np.linalg.det(ijkToRas[:3, :3])) / 1000
    assert abs(sum(float(row[3]) for row in rows[:3]) - truth.size * voxelMl) < 0.02  # table volumes add up
    assert mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 2

    # Deleting an output from the scene drops its rows.
    mrmlScene.RemoveNode(first.segmentationNode)
    assert [row[1] for row in results.rows(_nodeName(mrmlScene))] == ["EM-SVGMM"] * 3
