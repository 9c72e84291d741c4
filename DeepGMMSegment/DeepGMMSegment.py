"""DeepGMMSegment in 3D Slicer: module, parameter node, logic, panel (widget) and SelfTest.

The work is done in ``DeepGMMSegmentLib``: ``logic.py`` (console/batch API, Qt-free) and
``panel.py`` (Qt-free panel helpers). ``DeepGMMSegmentLib`` imports torch only in the worker
process, so this file loads, and the logic exists, before PyTorch is installed.
"""

import enum
import importlib
import os
import sys
import time
import unittest
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DeepGMMSegmentLib import options
from DeepGMMSegmentLib.logic import DeepGMMSegmentLogic as ProcessingLogic
from DeepGMMSegmentLib.slicer_adapter import geometry, panel
from DeepGMMSegmentLib.slicer_adapter.dependencies import TorchNotInstalledInTestingMode, installedTorchVersion
from DeepGMMSegmentLib.slicer_adapter.runner import DeviceQuery

LIB_PACKAGE = "DeepGMMSegmentLib"


#
# DeepGMMSegment
#


class DeepGMMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Deep GMM Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        # CropVolume: its logic computes an ROI's voxel extent (slicer_adapter.geometry.roiRegion).
        self.parent.dependencies = ["Segmentations", "Markups", "CropVolume"]
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
The sample data is the MNI ICBM 152 2009a template (Fonov et al. 2009, 2011; Collins et al. 1999).
""")
        # Sample Data is complete once the application has started (as in Slicer's module template).
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Add the bundled MNI152 sample to the Sample Data module (category "DeepGMMSegment")."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(**panel.sampleDataSource(os.path.dirname(__file__)))


#
# Parameter node
#


class MethodChoice(enum.Enum):
    """Base of :data:`SegmentationMethod`: the combo box texts of a method."""

    def label(self):
        return panel.METHOD_LABELS[self.value]

    def shortName(self):
        return panel.METHOD_SHORT_NAMES[self.value]


#: The engine's methods, one member per ``options.METHODS`` entry (the default first). The member
#: names are what the parameter node saves in a scene ("EM_GMM"), so they never change.
SegmentationMethod = MethodChoice("SegmentationMethod", [(panel.METHOD_ENUM_NAMES[method], method)
                                                         for method in options.METHODS])


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
    smoothness: deepSVG's spatial prior (0 = the published loss; AUTOMATIC_SMOOTHNESS = from the image's noise);
    labelSmoothing: deepSVG's label_mrf, the Potts strength of its labels from the fitted model
    (LABEL_MRF_OFF = the network's output; 0 = the posterior without neighbours);
    useTrainedModel: segment with the model file trainedModelPath (its method and classes),
    fineTuneSteps 0 = one forward pass; correctBiasField: estimate a bias field with the classes
    (biasFieldOrder 0 = when the image shows one, the default; 1..6 = always, of that order);
    seedSegmentation: reference segments painted per tissue, which
    fix the classes' identity, names and colours."""

    inputVolume1: Optional[vtkMRMLScalarVolumeNode]
    inputVolume2: Optional[vtkMRMLScalarVolumeNode]
    inputVolume3: Optional[vtkMRMLScalarVolumeNode]
    inputVolume4: Optional[vtkMRMLScalarVolumeNode]
    numberOfClasses: Annotated[int, WithinRange(2, 12)] = 3
    method: SegmentationMethod = SegmentationMethod(options.DEFAULT_METHOD)
    device: ComputeDevice = ComputeDevice.AUTO
    seed: Annotated[int, Minimum(0)] = 0
    maxIterations: Annotated[int, WithinRange(0, 100000)] = 0
    # Decimals come from the .ui (7 and 2): a Decimals annotation here would log 'Unused annotations'
    # at every Slicer start (Base/Python/slicer/parameterNodeWrapper/wrapper.py, _processClass).
    tolerance: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    covarianceType: CovarianceType = CovarianceType.FULL
    priorMeans: str = ""
    smoothness: Annotated[float, WithinRange(panel.AUTOMATIC_SMOOTHNESS, 10.0)] = panel.AUTOMATIC_SMOOTHNESS
    labelSmoothing: Annotated[float, WithinRange(panel.LABEL_MRF_OFF, 5.0)] = options.LABEL_MRF
    roi: Optional[vtkMRMLMarkupsROINode]
    maskSegmentation: Optional[vtkMRMLSegmentationNode]
    maskSegmentId: str = ""
    seedSegmentation: Optional[vtkMRMLSegmentationNode]
    correctBiasField: bool = True
    biasFieldOrder: Annotated[int, WithinRange(0, options.MAX_BIAS_FIELD_ORDER)] = 0
    outputSegmentation: Optional[vtkMRMLSegmentationNode]
    probabilityMaps: bool = True
    useTrainedModel: bool = False
    trainedModelPath: str = ""  # "" = none chosen (a pathlib.Path field would turn an empty field into ".")
    # Bounded on both sides: with Minimum only, the spin box connector sets the maximum to 2**31-1
    # (parameterNodeWrapper/guiConnectors.py, QSliderOrSpinBoxToIntConnector) and the .ui's 10000 is lost.
    fineTuneSteps: Annotated[int, WithinRange(0, 10000)] = 0


#
# DeepGMMSegmentLogic
#


class DeepGMMSegmentLogic(ProcessingLogic, ScriptedLoadableModuleLogic):
    """The module's logic (``slicer.util.getModuleLogic("DeepGMMSegment")``): the Qt-free
    ``DeepGMMSegmentLib.logic.DeepGMMSegmentLogic`` plus the scene's parameter node. It needs no
    torch to exist; ``process()`` installs torch (after asking) when a run needs it."""

    def __init__(self, **collaborators):
        ScriptedLoadableModuleLogic.__init__(self)  # moduleName "DeepGMMSegment", singleton parameter node
        ProcessingLogic.__init__(self, **collaborators)

    def getParameterNode(self):
        return DeepGMMSegmentParameterNode(super().getParameterNode())


#
# DeepGMMSegmentWidget
#


class DeepGMMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: reads the settings, starts the logic, shows progress and results."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None  # DeepGMMSegmentLogic, created in setup() (needs no torch)
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingMaskSelector = False
        self._results = panel.SessionResults()
        self._processing = False
        self._runningMethod = None
        self._deviceQuery = None
        self._trainedModels = {}  # model file metadata, cached per file version (panel.describeTrainedModel)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepGMMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        # Before anything else, so that slicer.util.getModuleLogic("DeepGMMSegment") works at once.
        self.logic = DeepGMMSegmentLogic(scheduler=lambda milliseconds, callback: qt.QTimer.singleShot(
            milliseconds, callback))

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
        # ctkPathLineEdit emits currentPathChanged only for text its name-filter validator accepts
        # (CTK Libs/Widgets/ctkPathLineEdit.cpp, updateHasValidInput): a file picked under "All files",
        # an upper-case ".PT" or a cleared field would never reach the parameter node. The inner
        # combo box reports every edit.
        self.ui.trainedModelPathLineEdit.comboBox().connect("editTextChanged(QString)",
                                                            self.onTrainedModelPathChanged)

        self.initializeParameterNode()
        qt.QTimer.singleShot(0, self.updateDetectedDeviceLabel)  # after the panel is shown

    def cleanup(self):
        if self.logic is not None and self.logic.isProcessing():
            self.logic.cancelProcessing()
        if self._deviceQuery is not None:
            self._deviceQuery.cancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # The GUI stays connected while the module is hidden: Slicer 5.10's connectGui leaves one
        # observer behind per connect (fixed after 5.10, Slicer commit 16069d367e), so connecting
        # again on every enter() would pile them up. Updates of a hidden panel are cheap.
        pass

    def onSceneStartClose(self, caller, event):
        if self.logic is not None and self.logic.isProcessing():
            self.logic.cancelProcessing()  # its outputs would land in a cleared scene
        self.setParameterNode(None)
        self.onClearResults()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume1:
            firstVolumeNode = geometry.firstSelectableVolume(slicer.mrmlScene)
            if firstVolumeNode:
                self._parameterNode.inputVolume1 = firstVolumeNode

    def setParameterNode(self, inputParameterNode):
        if (self._parameterNode is not None and inputParameterNode is not None
                and self._parameterNode.parameterNode is inputParameterNode.parameterNode):
            return  # already connected to this node (see exit())
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
        self.ui.biasFieldOrderSpinBox.enabled = self._parameterNode.correctBiasField
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
        selector = self.ui.maskSegmentSelector
        node = selector.currentNode()
        segmentId = selector.currentSegmentID() if node else ""
        if node is not None and not segmentId and node.GetSegmentation().GetNumberOfSegments() > 0:
            # A new mask segmentation shows the "None" segment (qMRMLSegmentSelectorWidget); its first
            # segment is nearly always the one meant (e.g. a brain mask), and Segment needs one.
            segmentId = node.GetSegmentation().GetNthSegmentID(0)
            selector.setCurrentSegmentID(segmentId)  # re-enters here with the same values
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.maskSegmentation = node
            self._parameterNode.maskSegmentId = segmentId

    def onTrainedModelPathChanged(self, path):
        if self._parameterNode and path != self._parameterNode.trainedModelPath:
            self._parameterNode.trainedModelPath = path

    def _modelIo(self):
        """``trained.model_file`` once PyTorch is installed (reading a model file's metadata needs it;
        no GPU is touched), else None."""
        if installedTorchVersion() is None:
            return None
        return importlib.import_module(f"{LIB_PACKAGE}.trained.model_file")

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
        # Reference segments give the class means (so no prior means) and a model fixes its classes.
        ui.priorMeansLineEdit.enabled = not use and parameters.seedSegmentation is None
        ui.seedSegmentationSelector.enabled = not use
        modelIo = self._modelIo() if use else None
        ui.trainedModelInfoLabel.text = panel.trainedModelSummary(path, modelIo, self._trainedModels) if use else ""
        settings = panel.trainedModelSettings(panel.describeTrainedModel(path, modelIo, self._trainedModels)[0]
                                              if use else None)
        # deepSVG's labels from its fitted model: a per-image fit's, and a deepSVG model's pass or fine-tuning
        ui.labelSmoothingSpinBox.enabled = (settings is not None and settings[0] == SegmentationMethod.DEEP_SVG.value
                                            if use else parameters.method == SegmentationMethod.DEEP_SVG)
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
        """Show which GPU PyTorch sees, asked in a short worker process: torch and CUDA never start
        in Slicer's GUI process."""
        if installedTorchVersion() is None:
            self.ui.detectedDeviceLabel.text = panel.TORCH_NOT_INSTALLED_TEXT
        elif self._deviceQuery is None:
            self.ui.detectedDeviceLabel.text = panel.DEVICE_QUERY_RUNNING_TEXT
            self._deviceQuery = DeviceQuery()
            self._deviceQuery.start(scheduler=qt.QTimer.singleShot, onDone=self._showDevices)

    def _showDevices(self, facts):
        self._deviceQuery = None
        self.ui.detectedDeviceLabel.text = (panel.deviceQueryFailedText(facts) if isinstance(facts, Exception)
                                            else panel.describeComputeDevices(facts))

    def askReplaceOrNew(self, outputName, withRoi):
        """Ask what to do with an output that already holds segments: "replace", "new" or "cancel"."""
        box = qt.QMessageBox(slicer.util.mainWindow())
        try:
            box.setWindowTitle(_("DeepGMMSegment"))
            box.setIcon(qt.QMessageBox.Question)
            box.setText(panel.replaceQuestion(outputName, withRoi))
            replaceButton = box.addButton(_("Refine inside ROI") if withRoi else _("Replace"),
                                          qt.QMessageBox.AcceptRole)
            newButton = box.addButton(_("Create new (keep both)"), qt.QMessageBox.ActionRole)
            box.addButton(qt.QMessageBox.Cancel)
            box.exec_()
            clicked = box.clickedButton()
            return "replace" if clicked == replaceButton else "new" if clicked == newButton else "cancel"
        finally:
            # A box with a parent lives as long as the parent (PythonQt deletes only parentless
            # objects); Slicer's own slicer.util.messageBox ends its boxes the same way.
            box.deleteLater()

    def onSegmentButton(self):
        if self.isProcessing():
            self.ui.statusLabel.text = _("Cancelling...")
            self.logic.cancelProcessing()  # may report completion (cancelled) before it returns
            return
        # No wait cursor here: the questions and the PyTorch install below must show the normal
        # cursor (an override cursor applies to dialogs too); _startSegmentation sets it for the start.
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start.")):
            self._startSegmentation()

    def _startSegmentation(self):
        parameters = self._parameterNode
        problem = self._inputProblem()
        if problem:
            raise ValueError(problem)
        channels = panel.chosenChannels(self._channelVolumes())
        if parameters.useTrainedModel:
            engineOptions = panel.trainedModelOptions(parameters.trainedModelPath, parameters.fineTuneSteps,
                                                      panel.labelMrfFor(parameters.method.value,
                                                                        parameters.labelSmoothing))
        else:
            priorMeansText = parameters.priorMeans if parameters.seedSegmentation is None else ""
            priorMeans = options.parse_prior_means(priorMeansText, parameters.numberOfClasses, len(channels))
            engineOptions = panel.engineOptions(parameters.maxIterations, parameters.tolerance,
                                                parameters.covarianceType.value,
                                                None if priorMeans is None else priorMeans.tolist(),
                                                panel.smoothnessFor(parameters.method.value, parameters.smoothness),
                                                panel.labelMrfFor(parameters.method.value, parameters.labelSmoothing))
        output = parameters.outputSegmentation
        if output is not None and output.GetSegmentation().GetNumberOfSegments() > 0:
            answer = self.askReplaceOrNew(output.GetName(), parameters.roi is not None)
            if answer == "cancel":
                return
            if answer == "new":
                output = None
        torchWasInstalled = installedTorchVersion() is not None
        self.logic.dependencyInstaller()  # PyTorch: asks once and installs when missing
        if not torchWasInstalled:
            self.updateDetectedDeviceLabel()
        if parameters.useTrainedModel:  # PyTorch may be new: read the model, take over its method and classes
            self._updateTrainedModel()
            problem = self._inputProblem()
            if problem:
                raise ValueError(problem)
        mask = (parameters.maskSegmentation, parameters.maskSegmentId) if parameters.maskSegmentation else None
        strokes = None if parameters.useTrainedModel else parameters.seedSegmentation  # greyed out with a model
        self._runningMethod = parameters.method
        self._setProcessing(True)
        try:
            with slicer.util.WaitCursor():  # reading and resampling the inputs before the worker starts
                self.logic.process(channels, outputSegmentation=output, numberOfClasses=parameters.numberOfClasses,
                                   method=parameters.method.value, roi=parameters.roi, mask=mask,
                                   device=parameters.device.value, seed=parameters.seed, options=engineOptions,
                                   probabilityMaps=parameters.probabilityMaps, waitForCompletion=False,
                                   progressCallback=self.onProgress, completedCallback=self.onCompleted,
                                   biasField=panel.biasFieldOption(parameters.correctBiasField,
                                                                   parameters.biasFieldOrder),
                                   seedSegmentation=strokes)
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
            if self._parameterNode.useTrainedModel:
                self.ui.trainedModelPathLineEdit.addCurrentPathToHistory()  # the field's history button
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
        """Developer reload: also reload every loaded Lib module, subpackages included, deepest
        first (``panel.reloadOrder``; Python 3.12 has no ``imp``)."""
        for name in panel.reloadOrder(list(sys.modules), LIB_PACKAGE):
            importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)


#
# DeepGMMSegmentTest
#


class DeepGMMSegmentTest(ScriptedLoadableModuleTest):
    """SelfTest inside Slicer: logic and parameter node, the EM path (also with reference segments and
    the bias field) and the cancel path of the panel.

    Runs in ctest (``--testing``) on the extensions factory too. There nothing is installed: when
    PyTorch is missing, the two runs are skipped with a message saying so (peers skip their heavy
    tests there for the same reason: PyTorch is several GB)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_LogicBeforeAnyRun, self.test_ParameterNode, self.test_PanelEmGmm,
                     self.test_PanelReferenceSegmentsAndBiasField, self.test_PanelCancel):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as skipped:
                self.delayDisplay(f"Skipped {test.__name__}: {skipped}")
        self.delayDisplay("Test passed")

    def _requireTorch(self):
        """Skip (testing mode, PyTorch missing) instead of installing several GB unattended."""
        try:
            DeepGMMSegmentLogic().dependencyInstaller()
        except TorchNotInstalledInTestingMode as error:
            self.skipTest(str(error))

    def _phantom(self, shape=(12, 32, 32)):
        """Three intensity classes (blocks along I) with noise, 1.5 mm voxels."""
        import numpy as np

        array = np.repeat([100.0, 200.0, 300.0], -(-shape[2] // 3))[: shape[2]] * np.ones(shape)
        array += np.random.default_rng(0).normal(0.0, 8.0, shape)
        volume = slicer.util.addVolumeFromArray(array.astype(np.float32), name="DeepGMMSegmentPhantom")
        volume.SetSpacing(1.5, 1.5, 1.5)
        return volume

    def _panel(self):
        slicer.util.selectModule("DeepGMMSegment")
        widget = slicer.modules.deepgmmsegment.widgetRepresentation().self()
        widget.askReplaceOrNew = lambda outputName, withRoi: "new"  # no modal dialog in a test
        return widget

    def _waitUntil(self, condition, timeoutSeconds, what):
        start = time.time()
        while not condition():
            slicer.app.processEvents()
            time.sleep(0.02)
            self.assertLess(time.time() - start, timeoutSeconds, f"{what} did not happen in {timeoutSeconds} s")

    def test_LogicBeforeAnyRun(self):
        self.delayDisplay("The module's logic exists before any run and without PyTorch")
        logic = slicer.util.getModuleLogic("DeepGMMSegment")
        self.assertIsInstance(logic, DeepGMMSegmentLogic)
        self.assertFalse(logic.isProcessing())
        self.assertEqual(logic.getParameterNode().parameterNode.GetAttribute("ModuleName"), "DeepGMMSegment")

    def test_ParameterNode(self):
        parameters = DeepGMMSegmentLogic().getParameterNode()
        self.assertEqual((parameters.numberOfClasses, parameters.method), (3, SegmentationMethod.DEEP_SVG))
        with self.assertRaises(ValueError):
            parameters.numberOfClasses = 13
        parameters.method = SegmentationMethod.EM_GMM
        self.assertEqual(parameters.parameterNode.GetParameter("method"), "EM_GMM")  # saved by name
        self.assertEqual((parameters.useTrainedModel, parameters.trainedModelPath, parameters.fineTuneSteps),
                         (False, "", 0))
        with self.assertRaises(ValueError):
            parameters.fineTuneSteps = 10001  # the .ui's maximum

    def test_PanelEmGmm(self):
        self.delayDisplay("Panel: EM-GMM, then a second EM-GMM run into a new output")
        self._requireTorch()
        import numpy as np

        volume = self._phantom()
        before = slicer.util.arrayFromVolume(volume).copy()
        widget = self._panel()
        parameters = widget._parameterNode
        parameters.inputVolume1, parameters.outputSegmentation = volume, None
        parameters.method, parameters.numberOfClasses = SegmentationMethod.EM_GMM, 3
        widget.ui.segmentButton.click()
        self._waitUntil(lambda: not widget.isProcessing(), 300, "the EM-GMM run")
        self.assertEqual(widget.ui.resultsTableWidget.rowCount, 3, widget.ui.statusLabel.text)
        first = parameters.outputSegmentation
        segmentation = first.GetSegmentation()
        self.assertEqual([segmentation.GetNthSegment(index).GetName() for index in range(3)],
                         ["Class 1", "Class 2", "Class 3"])
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before), "input was modified")

        widget.ui.segmentButton.click()  # the output holds segments: "Create new (keep both)"
        self._waitUntil(lambda: not widget.isProcessing(), 300, "the second EM-GMM run")
        self.assertEqual(widget.ui.resultsTableWidget.rowCount, 6, widget.ui.statusLabel.text)
        self.assertNotEqual(parameters.outputSegmentation.GetID(), first.GetID())
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")), 2)

    def test_PanelReferenceSegmentsAndBiasField(self):
        self.delayDisplay("Panel: EM-GMM with painted reference segments and bias field correction")
        self._requireTorch()
        import numpy as np

        volume = self._phantom()
        before = slicer.util.arrayFromVolume(volume).copy()
        strokes = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Strokes")
        strokes.CreateDefaultDisplayNodes()
        strokes.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        # The phantom's blocks along I: brightest on the right. Strokes: "Bright" first, then "Dark".
        for name, columns, color in (("Bright", slice(28, 30), (1.0, 0.2, 0.2)),
                                     ("Dark", slice(2, 4), (0.2, 0.2, 1.0))):
            marked = np.zeros(before.shape, dtype=np.uint8)
            marked[4:8, 10:20, columns] = 1
            segmentId = strokes.GetSegmentation().AddEmptySegment(name, name, color)
            slicer.util.updateSegmentBinaryLabelmapFromArray(marked, strokes, segmentId, volume)
        widget = self._panel()
        parameters = widget._parameterNode
        parameters.inputVolume1, parameters.outputSegmentation = volume, None
        parameters.method, parameters.numberOfClasses = SegmentationMethod.EM_GMM, 3
        # order 3 = always corrected ("when detected" looks for no field in a region this small)
        parameters.seedSegmentation, parameters.correctBiasField, parameters.biasFieldOrder = strokes, True, 3
        widget.ui.segmentButton.click()
        self._waitUntil(lambda: not widget.isProcessing(), 300, "the EM-GMM run")
        segmentation = parameters.outputSegmentation.GetSegmentation()
        self.assertEqual([segmentation.GetNthSegment(index).GetName() for index in range(3)],
                         ["Bright", "Dark", "Class 3"], widget.ui.statusLabel.text)
        self.assertEqual([round(c, 3) for c in segmentation.GetNthSegment(0).GetColor()], [1.0, 0.2, 0.2])
        for name in ("DeepGMMSegmentPhantom bias field", "DeepGMMSegmentPhantom corrected"):
            self.assertEqual(slicer.util.getNode(name).GetImageData().GetDimensions(),
                             volume.GetImageData().GetDimensions())
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before), "input was modified")
        parameters.seedSegmentation, parameters.correctBiasField, parameters.biasFieldOrder = None, True, 0

    def test_PanelCancel(self):
        self.delayDisplay("Panel: cancel a long deepSVG run")
        self._requireTorch()
        volume = self._phantom()
        widget = self._panel()
        parameters = widget._parameterNode
        parameters.inputVolume1, parameters.outputSegmentation = volume, None
        parameters.method, parameters.maxIterations, parameters.tolerance = SegmentationMethod.DEEP_SVG, 100000, 0.0
        nodeCountBefore = slicer.mrmlScene.GetNumberOfNodes()
        widget.ui.segmentButton.click()
        self.assertEqual(widget.ui.segmentButton.text, "Cancel")
        # Cancel only once the worker is fitting; if the run had ended, a click would start a new one.
        self._waitUntil(lambda: widget.ui.statusLabel.text.startswith("Fitting") or not widget.isProcessing(),
                        300, "the first deepSVG iteration")
        self.assertTrue(widget.isProcessing(), f"the run ended before it could be cancelled: "
                                               f"{widget.ui.statusLabel.text}")
        widget.ui.segmentButton.click()  # Cancel
        self._waitUntil(lambda: not widget.isProcessing(), 10, "the cancel")
        self.assertEqual(widget.ui.segmentButton.text, "Segment")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCountBefore)
        self.assertIn("Cancelled", widget.ui.statusLabel.text)
