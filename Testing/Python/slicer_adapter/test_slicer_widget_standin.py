"""DeepGMMSegmentWidget's control flow on real MRML, the real logic and worker, with Qt stood in.

Qt cannot run here, so ``slicer_gui_standin`` provides the widgets (one per name in the real .ui
file), the scheduler behind ``qt.QTimer.singleShot`` and a parameter node wrapper. Everything
else is real: the module file, the MRML scene, DeepGMMSegmentLogic and its worker process.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types

import pytest

from DeepGMMSegmentLib.slicer_adapter.runner import ManualScheduler
from slicer_gui_standin import MODULE_FOLDER as MODULE_DATA
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


def test_method_enum_and_defaults_come_from_options(harness, volumes):
    from DeepGMMSegmentLib import options

    methods = harness.module.SegmentationMethod
    assert [member.value for member in methods] == list(options.METHODS)
    assert [member.name for member in methods] == ["DEEP_SVG", "DEEP_G", "EM_GMM", "EM_SVGMM"]  # saved in scenes
    parameters = harness.createWidget()._parameterNode
    assert parameters.method.value == options.DEFAULT_METHOD
    assert parameters.smoothness == harness.module.panel.AUTOMATIC_SMOOTHNESS  # "automatic": from the noise
    assert parameters.labelSmoothing == options.LABEL_MRF  # the engine's default Potts strength
    assert [methods.EM_GMM.label(), methods.EM_GMM.shortName()] == ["EM-GMM (classic, fast)", "EM-GMM"]


def test_developer_reload_reloads_the_lib_subpackages(harness, volumes):
    import sys

    widget = harness.createWidget()

    def ownDefinitions():  # a reload runs each file again: its functions and classes are new objects
        return {(name, key): value for name, module in list(sys.modules.items())
                if name.startswith("DeepGMMSegmentLib.slicer_adapter.")
                for key, value in vars(module).items() if getattr(value, "__module__", None) == name}

    # importlib.reload re-runs each file inside the same module object; put the old definitions back
    # afterwards, or later tests would meet two SegmentationCancelled classes (one cached by the
    # package's lazy __getattr__, one re-created by the reload) and fail depending on their order.
    saved = {name: dict(vars(module)) for name, module in list(sys.modules.items())
             if name == "DeepGMMSegmentLib" or name.startswith("DeepGMMSegmentLib.")}
    try:
        before = ownDefinitions()
        widget.onReload()
        after = ownDefinitions()
    finally:
        for name, namespace in saved.items():
            vars(sys.modules[name]).clear()
            vars(sys.modules[name]).update(namespace)
    assert before and not [key for key, value in before.items() if after[key] is value]


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
    given = json.loads(first.GetAttribute("DeepGMMSegment.Options"))
    assert "smoothness" not in given and "label_mrf" not in given  # deepSVG only
    assert not ui.smoothnessSpinBox.enabled and not ui.labelSmoothingSpinBox.enabled
    parameters.method = harness.module.SegmentationMethod.DEEP_SVG
    assert ui.smoothnessSpinBox.enabled and parameters.smoothness == harness.module.panel.AUTOMATIC_SMOOTHNESS
    assert ui.labelSmoothingSpinBox.enabled

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


def recordJobOptions(widget) -> list:
    """The options of every job the widget's logic would start (each start is then stopped with an error)."""
    recorded = []

    def recordOptions(**job):
        recorded.append(job["options"])
        raise RuntimeError("options recorded")

    widget.logic.runnerFactory = recordOptions
    return recorded


def test_label_smoothing_reaches_the_job_as_deepsvgs_label_mrf(harness, volumes):
    widget = harness.createWidget()
    ui, parameters, panel = widget.ui, widget._parameterNode, harness.module.panel
    recorded = recordJobOptions(widget)
    parameters.method = harness.module.SegmentationMethod.DEEP_SVG
    for value, expected in ((panel.LABEL_MRF_OFF, "off"), (0.0, 0.0), (1.5, 1.5)):
        parameters.labelSmoothing = value
        ui.segmentButton.click()
        assert recorded[-1]["label_mrf"] == expected and not widget.isProcessing()
    parameters.method = harness.module.SegmentationMethod.DEEP_G
    assert not ui.labelSmoothingSpinBox.enabled
    ui.segmentButton.click()
    assert "label_mrf" not in recorded[-1] and len(recorded) == 4
    assert harness.errorMessages and all("options recorded" in text for text in harness.errorMessages)


def test_a_deepsvg_models_label_smoothing_reaches_the_job(harness, volumes, trainedModelFile):
    """A deepSVG model's labels come from its fitted mixture too: the box is live and its value is passed on."""
    t1, t2 = volumes
    model = trainedModelFile(("T1", "T2"), method="deepsvg")
    widget = harness.createWidget()
    ui, parameters, panel = widget.ui, widget._parameterNode, harness.module.panel
    recorded = recordJobOptions(widget)
    parameters.inputVolume1, parameters.inputVolume2 = t1, t2
    parameters.useTrainedModel = True
    assert not ui.labelSmoothingSpinBox.enabled  # no model file yet
    ui.trainedModelPathLineEdit.setCurrentPath(str(model))
    assert parameters.method == harness.module.SegmentationMethod.DEEP_SVG  # taken over from the model
    assert ui.labelSmoothingSpinBox.enabled and not ui.smoothnessSpinBox.enabled  # the model keeps its own prior
    for value, expected in ((panel.LABEL_MRF_OFF, "off"), (1.5, 1.5)):
        parameters.labelSmoothing = value
        ui.segmentButton.click()
        assert {k: recorded[-1][k] for k in ("model", "fine_tune", "label_mrf")} == {
            "model": str(model), "fine_tune": 0, "label_mrf": expected}
    assert len(recorded) == 2 and all("options recorded" in text for text in harness.errorMessages)


def test_bad_prior_means_show_an_error_and_start_nothing(harness, volumes, mrmlScene):
    widget = harness.createWidget()
    widget._parameterNode.priorMeans = "10;20"  # 2 rows for 3 classes
    widget.ui.segmentButton.click()
    assert not widget.isProcessing() and widget.ui.segmentButton.text == ""
    assert len(harness.errorMessages) == 1
    assert "prior means have 2 rows but there are 3 classes" in harness.errorMessages[0]
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

    ui.segmentButton.click()  # the button is Cancel now
    # Events and order, not wall-clock time (a loaded machine made a 3 s limit flaky): the run, which
    # would need 100000 iterations, ends as cancelled; the timeout only guards against a hang.
    runToEnd(harness, widget, timeoutSeconds=120)
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
    assert parent.dependencies == ["Segmentations", "Markups", "CropVolume"]


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
    assert not ui.smoothnessSpinBox.enabled and not ui.labelSmoothingSpinBox.enabled
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


# ---------------------------------------------------------------------------------------------
# The audit of the Slicer-facing code (../shared/research/slicer-api-audit.md): D1-D7, R3, R8, R10,
# R11, R14 and the Sample Data registration, each on the stand-in that models the real behaviour.


def test_logic_exists_before_any_run(harness, volumes):
    import slicer.util

    logic = slicer.util.getModuleLogic("DeepGMMSegment")  # Slicer's own accessor, before any Segment click
    assert isinstance(logic, harness.module.DeepGMMSegmentLogic) and not logic.isProcessing()
    assert logic is harness.moduleWidget.logic
    parameters = logic.getParameterNode()
    assert parameters.parameterNode.GetAttribute("ModuleName") == "DeepGMMSegment"
    assert parameters.inputVolume1.GetID() == volumes[0].GetID()  # the panel's parameter node


_PANEL_WITHOUT_TORCH = """
import sys, types
sys.modules["torch"] = None  # a Slicer whose PyTorch is not installed yet
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import pytest, slicer, slicer.util
from conftest import SlicerTestEnvironment
from slicer_gui_standin import GuiHarness
from DeepGMMSegmentLib.slicer_adapter import dependencies
from DeepGMMSegmentLib.slicer_adapter.runner import ManualScheduler
monkeypatch = pytest.MonkeyPatch()
environment = SlicerTestEnvironment()
monkeypatch.setattr(slicer, "mrmlScene", environment.scene, raising=False)
monkeypatch.setattr(slicer, "modules", environment.modulesNamespace(), raising=False)
monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: None)
harness = GuiHarness(monkeypatch, ManualScheduler())
monkeypatch.setattr(harness.module, "installedTorchVersion", lambda: None)
logic = slicer.util.getModuleLogic("DeepGMMSegment")
print(type(logic).__name__, harness.moduleWidget.ui.detectedDeviceLabel.text)
"""


def test_module_and_logic_load_without_torch():
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    completed = subprocess.run([sys.executable, "-c", _PANEL_WITHOUT_TORCH, str(here), str(here.parents[2] /
                                "DeepGMMSegment")], capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == (
        "DeepGMMSegmentLogic PyTorch not installed yet (offered on first Segment).")


def test_parameter_node_logs_no_unused_annotations(monkeypatch, mrmlScene, caplog):
    with caplog.at_level("WARNING"):
        GuiHarness(monkeypatch, ManualScheduler())
    assert "Unused annotations" not in caplog.text
    # The stand-in's wrapper does warn, as Slicer's does, for a GUI annotation on a field with a default.
    import typing

    from slicer_gui_standin import Decimals, WithinRange, parameterNodeWrapper

    WithDecimals = type("WithDecimals", (), {  # built directly: this file's annotations are strings
        "__annotations__": {"tolerance": typing.Annotated[float, WithinRange(0.0, 1.0), Decimals(7)]},
        "tolerance": 0.0})

    with caplog.at_level("WARNING"):
        parameterNodeWrapper(WithDecimals)
    assert "Unused annotations: [Decimals(value=7)]" in caplog.text


def test_spin_box_ranges_after_connecting_are_the_ui_ranges(harness):
    widget = harness.createWidget()
    bound = [w for w in vars(widget.ui).values()
             if w.className in ("QSpinBox", "QDoubleSpinBox") and w.property("SlicerParameterName")]
    assert {w.objectName for w in bound} >= {"fineTuneStepsSpinBox", "numberOfClassesSpinBox", "seedSpinBox"}
    for spinBox in bound:
        assert (spinBox.minimum, spinBox.maximum) == (spinBox.property("minimum") or 0,
                                                      spinBox.property("maximum")), spinBox.objectName


def test_every_model_path_edit_reaches_the_parameter_node(harness, volumes, tmp_path):
    widget = harness.createWidget()
    ui, parameters = widget.ui, widget._parameterNode
    parameters.useTrainedModel = True
    pathEdit = ui.trainedModelPathLineEdit
    for text, acceptable in ((str(tmp_path / "model.pt"), True), (str(tmp_path / "model.ckpt"), False),
                             (str(tmp_path / "MODEL.PT"), False), ("", False)):
        emitted = []
        pathEdit.connect("currentPathChanged(QString)", emitted.append)
        pathEdit.userEdits(text)
        assert bool(emitted) == acceptable  # what ctkPathLineEdit's validator lets through
        assert parameters.trainedModelPath == text
        parameters.seed = parameters.seed + 1  # any other change: the old path must not come back
        assert pathEdit.currentPath == text and parameters.trainedModelPath == text
    assert "Choose a trained model file" in ui.segmentButton.toolTip


def test_question_boxes_are_deleted_and_never_under_a_wait_cursor(harness, volumes, mrmlScene, monkeypatch):
    from DeepGMMSegmentLib.slicer_adapter import dependencies

    widget = harness.createWidget()
    parameters = widget._parameterNode
    parameters.method = harness.module.SegmentationMethod.EM_GMM
    widget.ui.segmentButton.click()
    runToEnd(harness, widget)
    assert harness.slotErrors == [] and harness.overrideCursorDepth == 0

    # PyTorch "missing": the install question and the install run without a wait cursor too.
    installed = {"done": False, "cursor": None}
    monkeypatch.setattr(harness.module, "installedTorchVersion", lambda: (2, 13) if installed["done"] else None)
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: (2, 13) if installed["done"] else None)

    class PyTorchUtilsLogic:
        def installTorch(self, **kwargs):
            installed.update(done=True, cursor=harness.overrideCursorDepth)
            return "torch"

    questions = []
    widget.logic.dependencyInstaller = dependencies.TorchDependency(
        pyTorchUtilsModule=types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic), insideSlicer=True,
        testingMode=False, canAsk=True, confirm=lambda q: questions.append(harness.overrideCursorDepth) or True)
    harness.answers = [1]  # "Create new (keep both)"
    widget.ui.segmentButton.click()
    runToEnd(harness, widget)
    assert harness.slotErrors == [] and harness.errorMessages == []
    assert questions == [0] and installed == {"done": True, "cursor": 0}
    assert harness.cursorDuringQuestions == [0]
    assert len(harness.messageBoxes) == 1 and harness.liveHiddenMessageBoxes() == []
    assert segmentationCount(mrmlScene) == 2 and harness.overrideCursorDepth == 0


def test_labelmap_is_not_picked_as_first_input(harness, mrmlScene, helpers):
    channel1, _, labels = helpers.phantom(shape=(4, 8, 8))
    ijkToRas = helpers.ijkToRasMatrix((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    helpers.addVolume(mrmlScene, labels, ijkToRas, "labels", "vtkMRMLLabelMapVolumeNode")
    t1 = helpers.addVolume(mrmlScene, channel1, ijkToRas, "T1")
    widget = harness.createWidget()
    assert widget._parameterNode.inputVolume1.GetID() == t1.GetID()


def test_entering_the_module_again_does_not_connect_the_gui_again(harness, volumes, mrmlScene):
    import slicer.util

    slicer.util.selectModule("DeepGMMSegment")
    widget = harness.moduleWidget
    for _ in range(5):
        widget.exit()
        widget.enter()
    assert len(harness.guiObservers) == 1  # Slicer 5.10 leaks one observer per connectGui
    mrmlScene.Clear(0)  # a new scene: a new parameter node, connected once
    assert len(harness.guiObservers) == 2 and widget._parameterNode is not None


def test_module_declares_crop_volume_and_registers_the_sample_data(harness, monkeypatch, mrmlScene):
    import hashlib
    import inspect
    import urllib.parse
    import urllib.request

    parent = types.SimpleNamespace()
    harness.module.DeepGMMSegment(parent)
    assert "CropVolume" in parent.dependencies  # geometry.roiRegion uses vtkSlicerCropVolumeLogic

    registered = []

    # Parameters of SampleDataLogic.registerCustomSampleDataSource in Slicer v5.10.0
    # (Modules/Scripted/SampleData/SampleData.py).
    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                       nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                       loadFileTypes=None, loadFiles=None, loadFileProperties={}, checksums=None,
                                       loadFileType=None):
        registered.append(inspect.getcallargs(registerCustomSampleDataSource, category, sampleName, uris, fileNames,
                                              nodeNames, customDownloader, thumbnailFileName, loadFileTypes,
                                              loadFiles, loadFileProperties, checksums, loadFileType))

    sampleData = types.ModuleType("SampleData")
    sampleData.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=registerCustomSampleDataSource)
    monkeypatch.setitem(sys.modules, "SampleData", sampleData)
    slots = [slot for signal, slot in harness.startupSlots if signal == "startupCompleted()"]
    assert len(slots) >= 1
    slots[0]()  # Slicer has started
    source = harness.module.panel.sampleDataSource(str(MODULE_DATA))
    assert [{key: value for key, value in call.items() if key in source} for call in registered] == [source]
    assert source["loadFileTypes"] == ["VolumeFile", "SegmentationFile"]
    assert os.path.isfile(source["thumbnailFileName"])
    repository = MODULE_DATA.parent
    for uri, fileName, checksum in zip(source["uris"], source["fileNames"], source["checksums"]):
        # What Sample Data does with the URI: urllib copies it into its cache, then checks the SHA256.
        path, _ = urllib.request.urlretrieve(uri)
        with open(path, "rb") as file:
            content = file.read()
        assert checksum == "SHA256:" + hashlib.sha256(content).hexdigest()
        assert content == (repository / "data" / "sample" / fileName).read_bytes()  # the bundled sample
    # The T1 loads as a volume with real MRML.
    volume = mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", source["nodeNames"][0])
    storage = mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(urllib.request.url2pathname(urllib.parse.urlparse(source["uris"][0]).path))
    assert storage.ReadData(volume) and volume.GetImageData().GetDimensions()[0] > 50


def test_device_label_comes_from_a_worker_process(harness, volumes):
    import torch

    from DeepGMMSegmentLib.slicer_adapter import panel

    widget = harness.createWidget()
    assert widget.ui.detectedDeviceLabel.text == panel.DEVICE_QUERY_RUNNING_TEXT
    query = widget._deviceQuery
    assert query is not None and query.worker.pid != os.getpid()
    start = time.monotonic()
    while widget._deviceQuery is not None:
        assert time.monotonic() - start < 120
        harness.scheduler.runPending()
        time.sleep(0.05)
    expected = "GPU: " if torch.cuda.is_available() else "No CUDA GPU found: Automatic runs on the CPU."
    assert widget.ui.detectedDeviceLabel.text.startswith(expected)


# ---------------------------------------------------------------------------------------------
# The module's SelfTest, run on the stand-in (in Slicer it runs with Slicer's own classes)


def _runSelfTest(harness, names):
    import unittest

    suite = unittest.TestSuite(harness.module.DeepGMMSegmentTest(name) for name in names)
    return unittest.TextTestRunner(stream=open(os.devnull, "w"), verbosity=0).run(suite)


def test_self_test_runs_logic_em_and_cancel_paths(harness, mrmlScene):
    result = _runSelfTest(harness, ["test_LogicBeforeAnyRun", "test_ParameterNode", "test_PanelEmGmm",
                                    "test_PanelReferenceSegmentsAndBiasField", "test_PanelCancel"])
    assert result.wasSuccessful() and not result.skipped, result.errors + result.failures
    assert harness.slotErrors == [] and harness.errorMessages == []


def test_self_test_in_testing_mode_without_torch_skips_and_installs_nothing(monkeypatch, mrmlScene):
    from DeepGMMSegmentLib.slicer_adapter import dependencies

    harness = GuiHarness(monkeypatch, ManualScheduler(), testingEnabled=True)
    monkeypatch.setattr(harness, "module", harness.module)
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: None)
    monkeypatch.setattr(harness.module, "installedTorchVersion", lambda: None)
    monkeypatch.setattr(sys.modules["slicer"].app, "slicerHome", "/opt/Slicer", raising=False)
    pyTorchUtils = types.ModuleType("PyTorchUtils")  # any use would fail the test
    monkeypatch.setitem(sys.modules, "PyTorchUtils", pyTorchUtils)
    try:
        result = _runSelfTest(harness, ["test_LogicBeforeAnyRun", "test_ParameterNode", "test_PanelEmGmm",
                                        "test_PanelReferenceSegmentsAndBiasField", "test_PanelCancel"])
    finally:
        harness.cleanup()
    assert result.wasSuccessful(), result.errors + result.failures
    assert [test._testMethodName for test, _ in result.skipped] == ["test_PanelEmGmm",
                                                                    "test_PanelReferenceSegmentsAndBiasField",
                                                                    "test_PanelCancel"]
    assert all("testing mode" in reason and "never installs" in reason for _, reason in result.skipped)
    assert mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_correct_bias_field_adds_the_field_and_corrected_volumes(harness, volumes, mrmlScene):
    t1, _ = volumes
    widget = harness.createWidget()
    ui, parameters = widget.ui, widget._parameterNode
    parameters.method = harness.module.SegmentationMethod.EM_GMM
    assert (parameters.correctBiasField, parameters.biasFieldOrder) == (True, 0)  # "when detected" by default
    assert ui.biasFieldOrderSpinBox.enabled
    assert ui.biasFieldOrderSpinBox.property("specialValueText") == "when detected"
    parameters.correctBiasField = False
    assert not ui.biasFieldOrderSpinBox.enabled
    parameters.correctBiasField = True
    assert ui.biasFieldOrderSpinBox.enabled
    inputBefore = t1.GetImageData().GetMTime()
    ui.segmentButton.click()
    runToEnd(harness, widget)
    assert harness.slotErrors == [] and harness.errorMessages == [], harness.errorMessages
    output = parameters.outputSegmentation
    # "when detected" looks for no field in a region this small: no volumes
    assert output.GetAttribute("DeepGMMSegment.BiasField") == "detect"
    assert output.GetAttribute("DeepGMMSegment.BiasFieldCorrected") == "false"
    assert not [node for node in nodesOfClass(mrmlScene, "vtkMRMLScalarVolumeNode") if "bias field" in node.GetName()]

    widget.askReplaceOrNew = lambda name, withRoi: "replace"
    parameters.biasFieldOrder = 3  # an order: always corrected
    ui.segmentButton.click()
    runToEnd(harness, widget)
    assert harness.slotErrors == [] and harness.errorMessages == [], harness.errorMessages
    assert output.GetAttribute("DeepGMMSegment.BiasField") == "3"
    assert output.GetAttribute("DeepGMMSegment.BiasFieldCorrected") == "true"
    assert [node.GetName() for node in nodesOfClass(mrmlScene, "vtkMRMLScalarVolumeNode")
            if "bias field" in node.GetName() or "corrected" in node.GetName()] == ["T1 bias field", "T1 corrected"]
    assert t1.GetImageData().GetMTime() == inputBefore

    widget.askReplaceOrNew = lambda name, withRoi: "replace"
    parameters.biasFieldOrder = 1
    ui.segmentButton.click()
    runToEnd(harness, widget)
    assert output.GetAttribute("DeepGMMSegment.BiasField") == "1"
    assert harness.slotErrors == [] and harness.errorMessages == []


def test_bad_reference_segments_show_an_error_and_start_nothing(harness, volumes, mrmlScene):
    widget = harness.createWidget()
    reference = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Strokes")
    reference.GetSegmentation().AddEmptySegment("Scar")
    widget._parameterNode.seedSegmentation = reference
    widget.ui.segmentButton.click()
    assert not widget.isProcessing()
    assert len(harness.errorMessages) == 1 and "paint at least two tissues" in harness.errorMessages[0]
    assert segmentationCount(mrmlScene) == 1


def nodesOfClass(scene, className):
    return [scene.GetNthNodeByClass(index, className) for index in range(scene.GetNumberOfNodesByClass(className))]


def test_reference_segments_name_the_classes_in_the_results_table(harness, volumes, mrmlScene, helpers):
    import numpy as np

    from DeepGMMSegmentLib.slicer_adapter import geometry

    t1, _ = volumes
    _, _, truth = helpers.phantom(shape=(4, 16, 18))
    reference = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Strokes")
    for name, tissue in (("White matter", 3), ("CSF", 1)):
        marked = np.zeros(truth.shape, bool)
        marked.flat[np.flatnonzero(truth == tissue)[::9]] = True
        reference.AddSegmentFromBinaryLabelmapRepresentation(geometry.volumeGeometry(t1).orientedImage(marked), name)
    widget = harness.createWidget()
    parameters = widget._parameterNode
    parameters.method = harness.module.SegmentationMethod.EM_GMM
    parameters.priorMeans = "1;2;3"  # typed before; the strokes give the class means instead
    assert widget.ui.priorMeansLineEdit.enabled
    parameters.seedSegmentation = reference
    assert not widget.ui.priorMeansLineEdit.enabled and widget.ui.seedSegmentationSelector.enabled
    widget.ui.segmentButton.click()
    runToEnd(harness, widget)
    assert harness.slotErrors == [] and harness.errorMessages == [], harness.errorMessages
    assert [row[2] for row in widget.ui.resultsTableWidget.rowTexts()] == ["White matter", "CSF", "Class 3"]
    assert "prior_means" not in json.loads(parameters.outputSegmentation.GetAttribute("DeepGMMSegment.Options"))
    parameters.useTrainedModel = True  # a trained model fixes its classes: the strokes are not used
    assert not widget.ui.seedSegmentationSelector.enabled
