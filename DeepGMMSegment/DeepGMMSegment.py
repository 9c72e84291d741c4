"""DeepGMMSegment in 3D Slicer: module, parameter node, panel (widget) and SelfTest.

The work is done in ``DeepGMMSegmentLib``: ``logic.py`` (console/batch API) and ``panel.py`` (Qt-free panel helpers).
"""

import enum
import importlib
import importlib.util
import os
import sys
import time
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Decimals, Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

LIB_PACKAGE = "DeepGMMSegmentLib"
# Reload order for the developer "Reload" button: dependencies before their users.
LIB_RELOAD_ORDER = ("gmm", "em", "networks", "deep", "engine", "preview", "model_io", "training", "worker",
                    "mrml_io", "runner", "dependencies", "panel", "logic")


def importLibModule(name, standalone=False):
    """Import ``DeepGMMSegmentLib.<name>``.

    The package's ``__init__`` imports torch, which is slow and not installed before the first
    run, so the self-contained modules (``panel``, ``dependencies``) are loaded from their files
    (``standalone=True``) unless the package is already imported.
    """
    if not standalone or LIB_PACKAGE in sys.modules:
        return importlib.import_module(f"{LIB_PACKAGE}.{name}")
    standaloneName = f"{LIB_PACKAGE}_{name}_withoutTorch"
    if standaloneName not in sys.modules:
        path = os.path.join(os.path.dirname(__file__), LIB_PACKAGE, name + ".py")
        spec = importlib.util.spec_from_file_location(standaloneName, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[standaloneName] = module
    return sys.modules[standaloneName]


panel = importLibModule("panel", standalone=True)  # Qt-free helpers; stdlib only


#
# DeepGMMSegment
#


class DeepGMMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Deep GMM Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["DeepGMMSegment contributors"]
        self.parent.helpText = _("""
Unsupervised segmentation of 1-4 co-registered images into 2-12 tissue classes, without training data:
a deep Gaussian mixture model (deepSVG, deepG) or classic EM (EM-GMM, EM-SVGMM) is fitted to the images.
Outputs: a segmentation (Class 1 = darkest in channel 1) and per-class probability maps. See the
<a href="https://github.com/deepgmmsegment/SlicerDeepGMMSegment/blob/main/docs/slicer.md">user guide</a>.
""")
        self.parent.acknowledgementText = _("""
The deepG and deepSVG models follow: M. Schwab, A. Mayr, M. Haltmeier, "Deep Gaussian mixture model
for unsupervised image segmentation", 2024 (arXiv:2404.12252).
Torch is installed through the PyTorch extension (SlicerPyTorch, F. Perez-Garcia).
""")


#
# Parameter node
#


class SegmentationMethod(enum.Enum):
    """The engine's methods (values are its method names)."""

    DEEP_SVG = "deepsvg"
    DEEP_G = "deepg"
    EM_GMM = "em-gmm"
    EM_SVGMM = "em-svgmm"

    def label(self):
        return panel.METHOD_LABELS[self.value]

    def shortName(self):
        return panel.METHOD_SHORT_NAMES[self.value]


class ComputeDevice(enum.Enum):
    """Where the engine runs (values are its device names)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return panel.DEVICE_LABELS[self.value]


class CovarianceType(enum.Enum):
    """Shape of the class covariance matrices (values are the engine's names)."""

    FULL = "full"
    DIAGONAL = "diag"

    def label(self):
        return panel.COVARIANCE_LABELS[self.value]


@parameterNodeWrapper
class DeepGMMSegmentParameterNode:
    """The panel's settings, saved with the scene. Channel 1 defines the output grid and class
    order; maxIterations/tolerance 0 = method default; priorMeans "10,20;30,40" = one row per
    class, one value per channel; outputSegmentation None = create a new segmentation;
    smoothness: deepSVG's spatial prior (0 = the published loss);
    useTrainedModel: segment with the model file trainedModelPath (its method and classes),
    fineTuneSteps 0 = one forward pass."""

    inputVolume1: Optional[vtkMRMLScalarVolumeNode]
    inputVolume2: Optional[vtkMRMLScalarVolumeNode]
    inputVolume3: Optional[vtkMRMLScalarVolumeNode]
    inputVolume4: Optional[vtkMRMLScalarVolumeNode]
    numberOfClasses: Annotated[int, WithinRange(2, 12)] = 3
    method: SegmentationMethod = SegmentationMethod.DEEP_SVG
    device: ComputeDevice = ComputeDevice.AUTO
    seed: Annotated[int, Minimum(0)] = 0
    maxIterations: Annotated[int, WithinRange(0, 100000)] = 0
    tolerance: Annotated[float, WithinRange(0.0, 1.0), Decimals(7)] = 0.0
    covarianceType: CovarianceType = CovarianceType.FULL
    priorMeans: str = ""
    smoothness: Annotated[float, WithinRange(0.0, 10.0), Decimals(2)] = 0.3
    roi: Optional[vtkMRMLMarkupsROINode]
    maskSegmentation: Optional[vtkMRMLSegmentationNode]
    maskSegmentId: str = ""
    outputSegmentation: Optional[vtkMRMLSegmentationNode]
    probabilityMaps: bool = True
    useTrainedModel: bool = False
    trainedModelPath: str = ""  # "" = none chosen (a pathlib.Path field would turn an empty field into ".")
    fineTuneSteps: Annotated[int, Minimum(0)] = 0


def getParameterNode():
    """The scene's DeepGMMSegment parameter node (created when missing), wrapped."""
    parameterLogic = ScriptedLoadableModuleLogic()
    parameterLogic.moduleName = "DeepGMMSegment"
    return DeepGMMSegmentParameterNode(parameterLogic.getParameterNode())


#
# DeepGMMSegmentWidget
#


class DeepGMMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: reads the settings, starts the logic, shows progress and results."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None  # DeepGMMSegmentLogic, created on the first run (it needs torch)
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingMaskSelector = False
        self._results = panel.SessionResults()
        self._processing = False
        self._runningMethod = None
        self._torchDependency = None
        self._trainedModels = {}  # model file metadata, cached per file version (panel.describeTrainedModel)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepGMMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.channelSelectors = [self.ui.inputVolume1Selector, self.ui.inputVolume2Selector,
                                 self.ui.inputVolume3Selector, self.ui.inputVolume4Selector]
        self.channelLabels = [self.ui.inputVolume1Label, self.ui.inputVolume2Label,
                              self.ui.inputVolume3Label, self.ui.inputVolume4Label]
        self.ui.progressBar.hide()
        self.ui.resultsTableWidget.horizontalHeader().setSectionResizeMode(qt.QHeaderView.ResizeToContents)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.clearResultsButton.connect("clicked(bool)", self.onClearResults)
        self.ui.maskSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMaskSelectorChanged)
        self.ui.maskSegmentSelector.connect("currentSegmentChanged(QString)", self.onMaskSelectorChanged)
        self.ui.trainedModelPathLineEdit.connect("currentPathChanged(QString)", self.onTrainedModelPathChanged)

        self.initializeParameterNode()
        qt.QTimer.singleShot(0, self.updateDetectedDeviceLabel)  # after the panel is shown

    def cleanup(self):
        if self.logic is not None and self.logic.isProcessing():
            self.logic.cancelProcessing()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self.logic is not None and self.logic.isProcessing():
            self.logic.cancelProcessing()  # its outputs would land in a cleared scene
        self.setParameterNode(None)
        self.onClearResults()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(getParameterNode())
        if not self._parameterNode.inputVolume1:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume1 = firstVolumeNode

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        self._updateChannelSelectors()
        self._updateMaskSelectorFromParameterNode()
        self._updateTrainedModel()
        self._checkCanApply()

    def _channelVolumes(self):
        parameters = self._parameterNode
        return [parameters.inputVolume1, parameters.inputVolume2, parameters.inputVolume3, parameters.inputVolume4]

    def _updateChannelSelectors(self):
        visibility = panel.channelSelectorVisibility([volume is not None for volume in self._channelVolumes()])
        for selector, label, visible in zip(self.channelSelectors, self.channelLabels, visibility):
            selector.setVisible(visible)
            label.setVisible(visible)

    def _updateMaskSelectorFromParameterNode(self):
        # The segment selector has no parameter node connector: synced by hand.
        selector = self.ui.maskSegmentSelector
        node, segmentId = self._parameterNode.maskSegmentation, self._parameterNode.maskSegmentId
        self._updatingMaskSelector = True
        try:
            if selector.currentNode() != node:
                selector.setCurrentNode(node)
            if node is not None and segmentId and selector.currentSegmentID() != segmentId:
                selector.setCurrentSegmentID(segmentId)
        finally:
            self._updatingMaskSelector = False

    def onMaskSelectorChanged(self, *unused):
        if self._updatingMaskSelector or not self._parameterNode:
            return
        node = self.ui.maskSegmentSelector.currentNode()
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.maskSegmentation = node
            self._parameterNode.maskSegmentId = self.ui.maskSegmentSelector.currentSegmentID() if node else ""

    def onTrainedModelPathChanged(self, path):
        if self._parameterNode and path != self._parameterNode.trainedModelPath:
            self._parameterNode.trainedModelPath = path

    def _modelIo(self):
        """``model_io`` once PyTorch is installed (reading a model file needs it), else None."""
        if importLibModule("dependencies", standalone=True).installedTorchVersion() is None:
            return None
        return importLibModule("model_io")

    def _updateTrainedModel(self):
        """Sync the model file field, show the model's metadata and take over its method and classes."""
        parameters, ui = self._parameterNode, self.ui
        use, path = parameters.useTrainedModel, parameters.trainedModelPath
        if ui.trainedModelPathLineEdit.currentPath != path:
            ui.trainedModelPathLineEdit.currentPath = path
        for widget in (ui.trainedModelPathLineEdit, ui.fineTuneStepsSpinBox, ui.trainedModelInfoLabel):
            widget.enabled = use
        for widget in (ui.methodComboBox, ui.numberOfClassesSpinBox, ui.maxIterationsSpinBox, ui.toleranceSpinBox,
                       ui.covarianceTypeComboBox, ui.priorMeansLineEdit):
            widget.enabled = not use  # the model decides these
        ui.smoothnessSpinBox.enabled = not use and parameters.method == SegmentationMethod.DEEP_SVG
        modelIo = self._modelIo() if use else None
        ui.trainedModelInfoLabel.text = panel.trainedModelSummary(path, modelIo, self._trainedModels) if use else ""
        settings = panel.trainedModelSettings(panel.describeTrainedModel(path, modelIo, self._trainedModels)[0]
                                              if use else None)
        if settings and (parameters.method.value, parameters.numberOfClasses) != settings:
            with slicer.util.NodeModify(parameters):
                parameters.method, parameters.numberOfClasses = SegmentationMethod(settings[0]), settings[1]

    def _inputProblem(self):
        parameters = self._parameterNode
        problem = panel.inputsProblem(self._channelVolumes(), parameters.maskSegmentation, parameters.maskSegmentId)
        if problem is None and parameters.useTrainedModel:
            channels = panel.chosenChannels(self._channelVolumes())
            problem = panel.trainedModelProblem(parameters.trainedModelPath, len(channels), self._modelIo(),
                                                self._trainedModels, [volume.GetName() for volume in channels],
                                                parameters.numberOfClasses)
        return problem

    def _checkCanApply(self, caller=None, event=None):
        if self.isProcessing():
            self.ui.segmentButton.enabled = True
            self.ui.segmentButton.toolTip = _("Stop the running segmentation; the scene is left as it was.")
            return
        problem = self._inputProblem() if self._parameterNode else _("No parameter node.")
        self.ui.segmentButton.enabled = problem is None
        self.ui.segmentButton.toolTip = problem or _("Segment the channels into classes.")

    def isProcessing(self):
        """True from Segment until the logic reports completion, failure or cancel."""
        return self._processing

    def updateDetectedDeviceLabel(self):
        """Show which GPU PyTorch sees (imports torch only when it is already installed)."""
        dependencies = importLibModule("dependencies", standalone=True)
        if dependencies.installedTorchVersion() is None:
            self.ui.detectedDeviceLabel.text = _("PyTorch not installed yet (offered on first Segment).")
            return
        try:
            import torch

            self.ui.detectedDeviceLabel.text = panel.describeComputeDevices(torch)
        except Exception as error:  # a broken torch install must not break the panel
            self.ui.detectedDeviceLabel.text = _("PyTorch cannot be imported: {error}").format(error=error)

    def _ensureLogic(self):
        """Create the logic, installing PyTorch first if needed (asks the user once)."""
        if self.logic is None:
            if self._torchDependency is None:  # one instance remembers a declined install
                self._torchDependency = importLibModule("dependencies", standalone=True).TorchDependency()
            self._torchDependency.ensureTorch()
            self.logic = importLibModule("logic").DeepGMMSegmentLogic(
                scheduler=lambda milliseconds, callback: qt.QTimer.singleShot(milliseconds, callback))
            self.updateDetectedDeviceLabel()
        return self.logic

    def askReplaceOrNew(self, outputName, withRoi):
        """Ask what to do with an output that already holds segments: "replace", "new" or "cancel"."""
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(_("DeepGMMSegment"))
        box.setIcon(qt.QMessageBox.Question)
        box.setText(panel.replaceQuestion(outputName, withRoi))
        replaceButton = box.addButton(_("Refine inside ROI") if withRoi else _("Replace"), qt.QMessageBox.AcceptRole)
        newButton = box.addButton(_("Create new (keep both)"), qt.QMessageBox.ActionRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        clicked = box.clickedButton()
        return "replace" if clicked == replaceButton else "new" if clicked == newButton else "cancel"

    def onSegmentButton(self):
        if self.isProcessing():
            self.ui.statusLabel.text = _("Cancelling...")
            self.logic.cancelProcessing()  # may report completion (cancelled) before it returns
            return
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            self._startSegmentation()

    def _startSegmentation(self):
        parameters = self._parameterNode
        problem = self._inputProblem()
        if problem:
            raise ValueError(problem)
        channels = panel.chosenChannels(self._channelVolumes())
        if parameters.useTrainedModel:
            options = panel.trainedModelOptions(parameters.trainedModelPath, parameters.fineTuneSteps)
        else:
            priorMeans = panel.parsePriorMeans(parameters.priorMeans, parameters.numberOfClasses, len(channels))
            options = panel.engineOptions(parameters.maxIterations, parameters.tolerance,
                                          parameters.covarianceType.value, priorMeans,
                                          panel.smoothnessFor(parameters.method.value, parameters.smoothness))
        output = parameters.outputSegmentation
        if output is not None and output.GetSegmentation().GetNumberOfSegments() > 0:
            answer = self.askReplaceOrNew(output.GetName(), parameters.roi is not None)
            if answer == "cancel":
                return
            if answer == "new":
                output = None
        logic = self._ensureLogic()
        if parameters.useTrainedModel:  # PyTorch may be new: read the model, take over its method and classes
            self._updateTrainedModel()
            problem = self._inputProblem()
            if problem:
                raise ValueError(problem)
        mask = (parameters.maskSegmentation, parameters.maskSegmentId) if parameters.maskSegmentation else None
        self._runningMethod = parameters.method
        self._setProcessing(True)
        try:
            logic.process(channels, outputSegmentation=output, numberOfClasses=parameters.numberOfClasses,
                          method=parameters.method.value, roi=parameters.roi, mask=mask,
                          device=parameters.device.value, seed=parameters.seed, options=options,
                          probabilityMaps=parameters.probabilityMaps, waitForCompletion=False,
                          progressCallback=self.onProgress, completedCallback=self.onCompleted)
        except Exception:
            self._setProcessing(False)
            raise

    def _setProcessing(self, processing):
        """Turn Segment into Cancel (and back) and lock the settings during a run."""
        self._processing = processing
        self.ui.segmentButton.text = _("Cancel") if processing else _("Segment")
        for section in (self.ui.inputsCollapsibleButton, self.ui.parametersCollapsibleButton,
                        self.ui.advancedCollapsibleButton, self.ui.outputsCollapsibleButton):
            section.enabled = not processing
        self.ui.progressBar.setVisible(processing)
        if processing:
            self.ui.progressBar.setRange(0, 0)  # busy until the first iteration is reported
            self.ui.statusLabel.text = _("Starting...")
        self._checkCanApply()

    def onProgress(self, info):
        percent, text = panel.formatProgress(info)
        if percent is None:
            self.ui.progressBar.setRange(0, 0)
        else:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = percent
        self.ui.statusLabel.text = text

    def onCompleted(self, result):
        # Called by the logic with the outputs, or with the exception that ended the run.
        self._setProcessing(False)
        if isinstance(result, BaseException):
            if type(result).__name__ in ("ProcessingCancelled", "SegmentationCancelled"):
                self.ui.statusLabel.text = _("Cancelled. The scene is as it was before.")
            else:
                self.ui.statusLabel.text = _("Failed: {error}").format(error=result)
                details = getattr(result, "details", "")
                slicer.util.errorDisplay(_("Segmentation failed:\n\n{error}").format(error=result),
                                         **({"detailedText": details} if details else {}))
            return
        outputs = result
        if self._parameterNode:
            # Keep the output selected, so an ROI run refines it; "Create new" keeps results apart.
            self._parameterNode.outputSegmentation = outputs.segmentationNode
        self._results.add(outputs.segmentationNode.GetID(), self._runningMethod.shortName(), outputs)
        self.updateResultsTable()
        self.ui.statusLabel.text = panel.completionText(self._runningMethod.shortName(), outputs.device,
                                                        outputs.seconds, outputs.finalNll)

    def updateResultsTable(self):
        """One row per class of every output computed in this session."""
        def nodeName(nodeId):
            node = slicer.mrmlScene.GetNodeByID(nodeId)
            return node.GetName() if node is not None else None

        rows = self._results.rows(nodeName)
        table = self.ui.resultsTableWidget
        table.setRowCount(len(rows))
        for rowIndex, row in enumerate(rows):
            for columnIndex, text in enumerate(row):
                table.setItem(rowIndex, columnIndex, qt.QTableWidgetItem(text))

    def onClearResults(self):
        self._results.clear()
        self.ui.resultsTableWidget.setRowCount(0)

    def onReload(self):
        """Developer reload: also reload the Lib submodules (Python 3.12 has no ``imp``)."""
        for name in LIB_RELOAD_ORDER:
            sys.modules.pop(f"{LIB_PACKAGE}_{name}_withoutTorch", None)  # reloaded from file on next use
            if f"{LIB_PACKAGE}.{name}" in sys.modules:
                importlib.reload(sys.modules[f"{LIB_PACKAGE}.{name}"])
        ScriptedLoadableModuleWidget.onReload(self)


#
# DeepGMMSegmentTest
#


class DeepGMMSegmentTest(ScriptedLoadableModuleTest):
    """SelfTest inside Slicer: parameter node, the logic on a small volume, the panel's GUI path."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_ParameterNode, self.test_LogicEmGmm, self.test_PanelCompareAndCancel):
            self.setUp()
            test()

    def _phantom(self, shape=(12, 32, 32)):
        """Three intensity classes (blocks along I) with noise, 1.5 mm voxels."""
        import numpy as np

        array = np.repeat([100.0, 200.0, 300.0], -(-shape[2] // 3))[: shape[2]] * np.ones(shape)
        array += np.random.default_rng(0).normal(0.0, 8.0, shape)
        volume = slicer.util.addVolumeFromArray(array.astype(np.float32), name="DeepGMMSegmentPhantom")
        volume.SetSpacing(1.5, 1.5, 1.5)
        return volume

    def _waitUntilDone(self, widget, timeoutSeconds=300):
        start = time.time()
        while widget.isProcessing():
            slicer.app.processEvents()
            time.sleep(0.02)
            self.assertLess(time.time() - start, timeoutSeconds, "segmentation did not finish in time")

    def test_ParameterNode(self):
        parameters = getParameterNode()
        self.assertEqual((parameters.numberOfClasses, parameters.method), (3, SegmentationMethod.DEEP_SVG))
        with self.assertRaises(ValueError):
            parameters.numberOfClasses = 13
        parameters.method = SegmentationMethod.EM_GMM
        self.assertEqual(parameters.parameterNode.GetParameter("method"), "EM_GMM")  # saved by name
        self.assertEqual((parameters.useTrainedModel, parameters.trainedModelPath, parameters.fineTuneSteps),
                         (False, "", 0))
        with self.assertRaises(ValueError):
            parameters.fineTuneSteps = -1

    def test_LogicEmGmm(self):
        self.delayDisplay("Logic: EM-GMM on a phantom")
        import numpy as np

        importLibModule("dependencies", standalone=True).TorchDependency().ensureTorch()
        volume = self._phantom()
        before = slicer.util.arrayFromVolume(volume).copy()
        outputs = importLibModule("logic").DeepGMMSegmentLogic().process([volume], numberOfClasses=3, method="em-gmm")
        segmentation = outputs.segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, ["Class 1", "Class 2", "Class 3"])
        self.assertEqual(len(outputs.probabilityVolumes), 3)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before), "input was modified")
        totalMl = sum(statistics.volumeMl for statistics in outputs.classStatistics)
        self.assertAlmostEqual(totalMl, before.size * 1.5**3 / 1000, places=3)

    def test_PanelCompareAndCancel(self):
        self.delayDisplay("Panel: EM-GMM, deepSVG into a second output, then cancel")
        volume = self._phantom()
        slicer.util.selectModule("DeepGMMSegment")
        widget = slicer.modules.deepgmmsegment.widgetRepresentation().self()
        widget.askReplaceOrNew = lambda outputName, withRoi: "new"  # no modal dialog in a test
        parameters = widget._parameterNode
        parameters.inputVolume1, parameters.outputSegmentation = volume, None
        parameters.method = SegmentationMethod.EM_GMM
        widget.ui.segmentButton.click()
        self._waitUntilDone(widget)
        self.assertEqual(widget.ui.resultsTableWidget.rowCount, 3, widget.ui.statusLabel.text)
        firstOutput = parameters.outputSegmentation

        parameters.method, parameters.maxIterations = SegmentationMethod.DEEP_SVG, 5
        widget.ui.segmentButton.click()
        self._waitUntilDone(widget)
        self.assertEqual(widget.ui.resultsTableWidget.rowCount, 6, widget.ui.statusLabel.text)
        self.assertNotEqual(parameters.outputSegmentation.GetID(), firstOutput.GetID())
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")), 2)

        nodeCountBefore = slicer.mrmlScene.GetNumberOfNodes()
        parameters.maxIterations = 100000
        widget.ui.segmentButton.click()
        self.assertEqual(widget.ui.segmentButton.text, "Cancel")
        startTime = time.time()
        while widget.isProcessing() and time.time() - startTime < 3:
            slicer.app.processEvents()
        widget.ui.segmentButton.click()  # Cancel
        self._waitUntilDone(widget, timeoutSeconds=10)
        self.assertEqual(widget.ui.segmentButton.text, "Segment")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCountBefore)
        self.assertIn("Cancelled", widget.ui.statusLabel.text)
        self.delayDisplay("Test passed")
