"""DeepGMMSegmentWidget's control flow on real MRML, the real logic and worker, with Qt stood in.

Qt cannot run here, so ``slicer_gui_standin`` provides the widgets (one per name in the real .ui
file), the scheduler behind ``qt.QTimer.singleShot`` and a parameter node wrapper. Everything
else is real: the module file, the MRML scene, DeepGMMSegmentLogic and its worker process.
"""

from __future__ import annotations

import json
import time

import pytest

from DeepGMMSegmentLib.runner import ManualScheduler
from slicer_gui_standin import GuiHarness


@pytest.fixture
def harness(mrmlScene, monkeypatch):
    harness = GuiHarness(monkeypatch, ManualScheduler())
    yield harness
    harness.cleanup()


@pytest.fixture
def volumes(mrmlScene, helpers):
    channel1, channel2, _ = helpers.phantom(shape=(4, 16, 18))
    ijkToRas = helpers.ijkToRasMatrix((1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    return (helpers.addVolume(mrmlScene, channel1, ijkToRas, "T1"),
            helpers.addVolume(mrmlScene, channel2, ijkToRas, "T2"))


def segmentationCount(scene):
    return scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()


def runToEnd(harness, widget, timeoutSeconds=120):
    start = time.monotonic()
    while widget.isProcessing():
        assert time.monotonic() - start < timeoutSeconds, "the run did not finish"
        harness.scheduler.runPending()
        time.sleep(0.02)


def test_setup_picks_first_volume_and_shows_channels_as_needed(harness, volumes):
    t1, t2 = volumes
    widget = harness.createWidget()
    ui = widget.ui
    parameters = widget._parameterNode
    assert parameters.inputVolume1.GetID() == t1.GetID()  # the first volume saves a click
    assert [ui.inputVolume1Selector.visible, ui.inputVolume2Selector.visible, ui.inputVolume3Selector.visible,
            ui.inputVolume4Selector.visible] == [True, True, False, False]
    assert ui.inputVolume2Label.visible and not ui.inputVolume3Label.visible
    assert ui.segmentButton.enabled and ui.segmentButton.text == ""  # text comes from the .ui in Slicer
    assert not ui.progressBar.visible
    assert ui.detectedDeviceLabel.text  # filled once the panel is shown

    parameters.inputVolume3 = t2  # a gap in the channel order
    assert not ui.segmentButton.enabled
    assert "Channel 2 is empty but channel 3 is set" in ui.segmentButton.toolTip
    assert ui.inputVolume3Selector.visible and ui.inputVolume4Selector.visible
    parameters.inputVolume3 = None
    parameters.inputVolume1 = None
    assert not ui.segmentButton.enabled and "first channel" in ui.segmentButton.toolTip
    assert harness.slotErrors == []


def test_mask_selector_and_parameter_node_stay_in_sync(harness, volumes, mrmlScene):
    widget = harness.createWidget()
    empty = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Empty")
    masks = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Masks")
    brainId = masks.GetSegmentation().AddEmptySegment("brain")
    ventriclesId = masks.GetSegmentation().AddEmptySegment("ventricles")
    selector, parameters = widget.ui.maskSegmentSelector, widget._parameterNode

    selector.setCurrentNode(empty)  # no segment to choose: Segment says what is missing
    assert parameters.maskSegmentation.GetID() == empty.GetID() and parameters.maskSegmentId == ""
    assert not widget.ui.segmentButton.enabled and "Choose a segment" in widget.ui.segmentButton.toolTip
    selector.setCurrentNode(masks)  # the selector shows "None"; the first segment is taken (audit R14)
    assert selector.currentSegmentID() == brainId and parameters.maskSegmentId == brainId
    assert widget.ui.segmentButton.enabled
    selector.setCurrentSegmentID(ventriclesId)
    assert parameters.maskSegmentId == ventriclesId
    selector.setCurrentSegmentID(brainId)

    parameters.maskSegmentation = None  # e.g. a scene loaded with another setting
    assert selector.currentNode() is None
    parameters.maskSegmentation, parameters.maskSegmentId = masks, brainId
    assert selector.currentNode().GetID() == masks.GetID() and selector.currentSegmentID() == brainId
    assert harness.slotErrors == []


def test_segment_compare_replace_and_results_table(harness, volumes, mrmlScene):
    t1, t2 = volumes
    widget = harness.createWidget()
    ui, parameters = widget.ui, widget._parameterNode
    parameters.inputVolume2 = t2
    parameters.method = harness.module.SegmentationMethod.EM_GMM
    inputBefore = t1.GetImageData().GetMTime()

    ui.segmentButton.click()
    assert harness.slotErrors == [], harness.errorMessages
    assert widget.isProcessing() and ui.segmentButton.text == "Cancel" and ui.segmentButton.enabled
    assert not ui.inputsCollapsibleButton.enabled and not ui.advancedCollapsibleButton.enabled
    assert ui.progressBar.visible
    runToEnd(harness, widget)
    assert harness.slotErrors == [] and harness.errorMessages == []
    assert ui.segmentButton.text == "Segment" and ui.inputsCollapsibleButton.enabled and not ui.progressBar.visible
    assert ui.statusLabel.text.startswith("Done: EM-GMM on cpu in ")
    first = parameters.outputSegmentation  # the new output is kept selected (for ROI refinement)
    assert first is not None and segmentationCount(mrmlScene) == 1
    rows = ui.resultsTableWidget.rowTexts()
    assert [row[1:3] for row in rows] == [("EM-GMM", f"Class {k}") for k in (1, 2, 3)]
    assert all(row[0] == first.GetName() and len(row[4].split(" / ")) == 2 for row in rows)  # two channels
    assert t1.GetImageData().GetMTime() == inputBefore
    assert "smoothness" not in json.loads(first.GetAttribute("DeepGMMSegment.Options"))  # deepSVG only
    assert not ui.smoothnessSpinBox.enabled
    parameters.method = harness.module.SegmentationMethod.DEEP_SVG
    assert ui.smoothnessSpinBox.enabled and parameters.smoothness == 0.3

    # Another method, "Create new (keep both)": a second output and a second block of rows.
    questions = []
    widget.askReplaceOrNew = lambda name, withRoi: questions.append((name, withRoi)) or "new"
    parameters.method = harness.module.SegmentationMethod.EM_SVGMM
    parameters.maxIterations = 10
    ui.segmentButton.click()
    runToEnd(harness, widget)
    assert questions == [(first.GetName(), False)]
    second = parameters.outputSegmentation
    assert second.GetID() != first.GetID() and segmentationCount(mrmlScene) == 2
    assert [row[1] for row in ui.resultsTableWidget.rowTexts()] == ["EM-GMM"] * 3 + ["EM-SVGMM"] * 3

    # "Cancel" in the question: nothing starts. With an ROI box the question is about refining.
    roi = mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    parameters.roi = roi
    widget.askReplaceOrNew = lambda name, withRoi: questions.append((name, withRoi)) or "cancel"
    ui.segmentButton.click()
    assert questions[-1] == (second.GetName(), True)
    assert not widget.isProcessing() and segmentationCount(mrmlScene) == 2
    parameters.roi = None

    # "Replace": the same output gets the new content; its rows are replaced, not added.
    widget.askReplaceOrNew = lambda name, withRoi: "replace"
    parameters.method = harness.module.SegmentationMethod.EM_GMM
    parameters.numberOfClasses = 2
    ui.segmentButton.click()
    runToEnd(harness, widget)
    assert parameters.outputSegmentation.GetID() == second.GetID() and segmentationCount(mrmlScene) == 2
    assert [row[1:3] for row in ui.resultsTableWidget.rowTexts()] == (
        [("EM-GMM", f"Class {k}") for k in (1, 2, 3)] + [("EM-GMM", "Class 1"), ("EM-GMM", "Class 2")])

    ui.clearResultsButton.click()
    assert ui.resultsTableWidget.rowCount == 0 and segmentationCount(mrmlScene) == 2
    assert harness.slotErrors == [] and harness.errorMessages == []


def test_bad_prior_means_show_an_error_and_start_nothing(harness, volumes, mrmlScene):
    widget = harness.createWidget()
    widget._parameterNode.priorMeans = "10;20"  # 2 rows for 3 classes
    widget.ui.segmentButton.click()
    assert not widget.isProcessing() and widget.ui.segmentButton.text == ""
    assert len(harness.errorMessages) == 1
    assert "2 rows given but the number of classes is 3" in harness.errorMessages[0]
    assert segmentationCount(mrmlScene) == 0


def test_cancel_stops_the_worker_and_leaves_the_scene_unchanged(harness, volumes, mrmlScene):
    widget = harness.createWidget()
    ui, parameters = widget.ui, widget._parameterNode
    parameters.method = harness.module.SegmentationMethod.DEEP_SVG
    parameters.maxIterations = 100000
    nodeIds = [mrmlScene.GetNthNode(index).GetID() for index in range(mrmlScene.GetNumberOfNodes())]

    ui.segmentButton.click()
    assert widget.isProcessing() and ui.statusLabel.text == "Starting"
    start = time.monotonic()
    while ui.statusLabel.text == "Starting":  # wait until the worker itself reports (it is running)
        assert time.monotonic() - start < 60, ui.statusLabel.text
        harness.scheduler.runPending()
        time.sleep(0.02)
    assert widget.isProcessing(), ui.statusLabel.text

    cancelStart = time.monotonic()
    ui.segmentButton.click()  # the button is Cancel now
    runToEnd(harness, widget, timeoutSeconds=5)
    assert time.monotonic() - cancelStart < 3
    assert ui.statusLabel.text == "Cancelled. The scene is as it was before."
    assert ui.segmentButton.text == "Segment" and ui.inputsCollapsibleButton.enabled
    assert [mrmlScene.GetNthNode(index).GetID() for index in range(mrmlScene.GetNumberOfNodes())] == nodeIds
    assert not widget.logic.isProcessing()
    assert harness.slotErrors == [] and harness.errorMessages == []


def test_module_description(harness):
    parent = type("Parent", (), {})()
    harness.module.DeepGMMSegment(parent)
    assert parent.categories == ["Segmentation"] and parent.title == "Deep GMM Segment"
    assert "arXiv:2404.12252" in parent.acknowledgementText
    assert parent.contributors == ["DeepGMMSegment contributors"] and "docs/slicer.md" in parent.helpText


def test_closing_the_scene_cancels_a_run_and_resets_the_panel(harness, volumes, mrmlScene):
    widget = harness.createWidget()
    widget._parameterNode.method = harness.module.SegmentationMethod.DEEP_SVG
    widget.ui.segmentButton.click()
    assert widget.isProcessing()
    mrmlScene.Clear(0)  # File > Close Scene
    assert not widget.isProcessing() and not widget.logic.isProcessing()
    assert widget.ui.statusLabel.text == "Cancelled. The scene is as it was before."
    assert widget.ui.resultsTableWidget.rowCount == 0
    assert segmentationCount(mrmlScene) == 0
    # A fresh parameter node for the empty scene (the module is shown), with the defaults.
    assert widget._parameterNode is not None and widget._parameterNode.inputVolume1 is None
    assert not widget.ui.segmentButton.enabled
    assert harness.slotErrors == [] and harness.errorMessages == []


def test_trained_model_is_shown_checked_and_passed_to_the_logic(harness, volumes, mrmlScene, trainedModelFile):
    t1, t2 = volumes
    model = trainedModelFile(("T1", "T2"), method="deepg")  # a real model file: deepG, 3 classes, T1 then T2
    widget = harness.createWidget()
    ui, parameters = widget.ui, widget._parameterNode
    methods = harness.module.SegmentationMethod
    parameters.numberOfClasses = 5
    assert not ui.trainedModelPathLineEdit.enabled and ui.methodComboBox.enabled and ui.trainedModelInfoLabel.text == ""

    parameters.useTrainedModel = True  # no file yet
    assert ui.trainedModelPathLineEdit.enabled and ui.fineTuneStepsSpinBox.enabled
    assert not ui.methodComboBox.enabled and not ui.numberOfClassesSpinBox.enabled  # the model decides these
    assert not ui.maxIterationsSpinBox.enabled and not ui.priorMeansLineEdit.enabled
    assert not ui.smoothnessSpinBox.enabled
    assert not ui.segmentButton.enabled and ui.segmentButton.toolTip == ui.trainedModelInfoLabel.text == (
        "Choose a trained model file (.pt, written by deepgmm-train) or uncheck 'Use trained model'.")

    ui.trainedModelPathLineEdit.setCurrentPath(str(model))  # the user picks the file
    assert parameters.trainedModelPath == str(model)
    assert "channels (2): T1, T2" in ui.trainedModelInfoLabel.text
    assert ui.trainedModelInfoLabel.text.endswith("Segment uses the model's method (deepG) and its 3 classes.")
    assert (parameters.method, parameters.numberOfClasses) == (methods.DEEP_G, 3)  # taken over from the model
    # Only channel 1 is chosen: refused, with the reason and the fix on the button.
    assert not ui.segmentButton.enabled
    assert ui.segmentButton.toolTip == (
        "The trained model does not match the input: the model expects 2 channel(s) (T1, T2) but the input has 1. "
        "Choose 2 input volumes in the order T1, T2, or uncheck 'Use trained model'.")
    parameters.inputVolume1, parameters.inputVolume2 = t2, t1  # named like the model's channels: order checked
    assert not ui.segmentButton.enabled and "the channels are in a different order" in ui.segmentButton.toolTip
    parameters.inputVolume1, parameters.inputVolume2 = t1, t2
    assert ui.segmentButton.enabled, ui.segmentButton.toolTip

    parameters.fineTuneSteps = 2
    ui.segmentButton.click()
    assert harness.slotErrors == [] and harness.errorMessages == [], harness.errorMessages
    runToEnd(harness, widget)
    assert harness.slotErrors == [] and harness.errorMessages == [], harness.errorMessages
    assert ui.statusLabel.text.startswith("Done: deepG on cpu in "), ui.statusLabel.text
    output = parameters.outputSegmentation
    assert json.loads(output.GetAttribute("DeepGMMSegment.Options")) == {"model": str(model), "fine_tune": 2}
    assert int(output.GetAttribute("DeepGMMSegment.Iterations")) == 2  # the fine-tuning steps (1 = a single pass)
    assert [row[1:3] for row in ui.resultsTableWidget.rowTexts()] == [("deepG", f"Class {k}") for k in (1, 2, 3)]

    # A scene loaded with another model path shows it in the field; unchecking gives the settings back.
    parameters.trainedModelPath = str(model.parent / "other.pt")
    assert ui.trainedModelPathLineEdit.currentPath == str(model.parent / "other.pt")
    assert "does not exist" in ui.segmentButton.toolTip and not ui.segmentButton.enabled
    parameters.useTrainedModel = False
    assert ui.segmentButton.enabled and ui.methodComboBox.enabled and ui.maxIterationsSpinBox.enabled
    assert ui.trainedModelInfoLabel.text == "" and not ui.trainedModelPathLineEdit.enabled
    assert harness.slotErrors == [] and harness.errorMessages == []
