"""A stand-in for the Qt side of Slicer, to run DeepGMMSegment.py's widget code outside Slicer.

Qt, ctk and the Qt-dependent parts of ``slicer`` (``ScriptedLoadableModule``, ``i18n``,
``parameterNodeWrapper``) are not in the ``slicer-core`` wheel. This module provides the few pieces
the widget touches, so its control flow (Segment -> Cancel, progress, results table, mask sync,
replace-or-new question) runs against real MRML, the real logic and the real worker process.

Where the widget code depends on how a Qt, CTK, PythonQt or Slicer piece behaves, the stand-in
models the real behaviour, and each such place names the source file it mirrors (Slicer v5.10.0,
the CTK commit Slicer 5.10 pins, PythonQt). What it cannot tell: whether the Qt/PythonQt calls
themselves are right (property names, signal signatures). That is for the module's SelfTest inside
Slicer (docs/slicer-checklist.md); the static .ui checks cover the names.
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import re
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import slicer
import slicer.util
import vtk

MODULE_FOLDER = Path(__file__).resolve().parents[3] / "DeepGMMSegment"
CURRENT_HARNESS: list = []  # the GuiHarness of the running test (its stand-ins report to it)


# ---------------------------------------------------------------------------------------------
# Widgets


class FakeWidget:
    """Holds the properties the widget code sets and calls the slots connected to its signals."""

    def __init__(self, harness, name, className, properties=None):
        self.harness, self.objectName, self.className = harness, name, className
        self.properties = dict(properties or {})  # as written in the .ui file
        self.enabled, self.visible, self.toolTip, self.text, self.value = True, True, "", "", 0
        self.range = (0, 100)
        self.minimum = self.properties.get("minimum", 0)
        self.maximum = self.properties.get("maximum", 99)  # QSpinBox's default maximum
        self.rowCount, self.items = 0, {}
        self.node, self.segmentId = None, ""
        self.slots = {}

    def property(self, name):
        return self.properties.get(name)

    # QSpinBox / QDoubleSpinBox
    def setMinimum(self, minimum):
        self.minimum = minimum

    def setMaximum(self, maximum):
        self.maximum = maximum

    def connect(self, signal, slot):
        self.slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *arguments):
        for slot in self.slots.get(signal, []):
            try:
                slot(*arguments)
            except Exception as error:  # PythonQt prints a slot's exception and goes on
                self.harness.slotErrors.append(error)

    def click(self):
        if self.enabled:
            self.emit("clicked(bool)")

    def hide(self):
        self.visible = False

    def setVisible(self, visible):
        self.visible = bool(visible)

    def setRange(self, minimum, maximum):
        self.range = (minimum, maximum)
        if self.className in ("QSpinBox", "QDoubleSpinBox"):
            self.minimum, self.maximum = minimum, maximum

    def setMRMLScene(self, scene):
        self.scene = scene

    # QTableWidget
    def horizontalHeader(self):
        return self

    def setSectionResizeMode(self, mode):
        pass

    def setRowCount(self, count):
        self.rowCount = count
        self.items = {key: value for key, value in self.items.items() if key[0] < count}

    def setItem(self, row, column, item):
        self.items[(row, column)] = item.text()

    def rowTexts(self):
        return [tuple(self.items.get((row, column), "") for column in range(6)) for row in range(self.rowCount)]

    # qMRMLSegmentSelectorWidget. A new segmentation shows the "None" segment when noneEnabled is set
    # and no segment was chosen before: the segment combo box is refilled with signals blocked and
    # the empty selection restored, so only currentNodeChanged is emitted
    # (Slicer Libs/MRML/Widgets/qMRMLSegmentSelectorWidget.cxx, populateSegmentCombobox).
    def currentNode(self):
        return self.node

    def setCurrentNode(self, node):
        if node is not self.node:
            self.node, self.segmentId = node, ""
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    def currentSegmentID(self):
        return self.segmentId

    def setCurrentSegmentID(self, segmentId):
        if segmentId != self.segmentId:
            self.segmentId = segmentId
            self.emit("currentSegmentChanged(QString)", segmentId)


def ctkNameFiltersPattern(nameFilters):
    """The validator pattern ctkPathLineEdit builds from its name filters: each ``*.ext`` becomes
    ``.*\\.ext?$``; filters without an extension (``All files (*)``) add nothing; no extension at
    all gives ``.+`` (CTK Libs/Core/ctkUtils.cpp: extensionToRegExp, nameFiltersToRegularExpression)."""
    extensions = []
    for nameFilter in nameFilters:
        inside = re.search(r"\(([^)]*)\)", nameFilter)
        for pattern in (inside.group(1) if inside else nameFilter).split():
            match = re.search(r"\*\.(\w+)", pattern)
            if match:
                extensions.append(r".*\." + match.group(1) + "?$")
    return "(" + "|".join(extensions) + ")" if extensions else ".+"


class FakeComboBox(FakeWidget):
    """The QComboBox inside a ctkPathLineEdit: editTextChanged(QString) reports every text change
    (QComboBox forwards its line edit's textChanged)."""


class FakePathLineEdit(FakeWidget):
    """ctkPathLineEdit. Its line edit carries a QRegularExpressionValidator built from the name
    filters (CTK Libs/Widgets/ctkPathLineEdit.cpp, updateFilter), and currentPathChanged is emitted
    only while the text is acceptable to it (same file, updateHasValidInput). A
    QRegularExpressionValidator accepts only a full match and is case-sensitive; the empty text is
    never acceptable. The combo box (with the history button, the default) sees every edit."""

    def __init__(self, harness, name, className, properties=None):
        super().__init__(harness, name, className, properties)
        self._path = ""
        self.history = []
        self.innerComboBox = FakeComboBox(harness, name + "ComboBox", "QComboBox")
        self.validatorPattern = ctkNameFiltersPattern(self.properties.get("nameFilters", []))

    def comboBox(self):
        return self.innerComboBox

    def hasAcceptableInput(self):
        return re.fullmatch(self.validatorPattern, self._path) is not None

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, path):  # the code sets the property; so does a pick in the file dialog
        self.userEdits(path)

    def setCurrentPath(self, path):
        self.userEdits(path)

    def userEdits(self, text):
        """The user types ``text`` (or picks that file): the line edit's textChanged."""
        if text == self._path:
            return
        self._path = text
        self.innerComboBox.emit("editTextChanged(QString)", text)
        if self.hasAcceptableInput():
            self.emit("currentPathChanged(QString)", text)

    def addCurrentPathToHistory(self):
        self.history.append(self._path)


class FakeMessageBox:
    """qt.QMessageBox as the widget uses it. PythonQt deletes a wrapped object created from Python
    only when it has no parent (PythonQt src/PythonQtInstanceWrapper.cpp, PythonQtInstanceWrapper_deleteObject):
    a box parented to the main window stays alive, hidden, until deleteLater()."""

    Question, AcceptRole, ActionRole, Cancel = 4, 0, 3, 0x00400000

    def __init__(self, parent=None):
        self.parent, self.deleted, self.buttons, self.text = parent, False, [], ""
        self.clicked = None
        harness = CURRENT_HARNESS[0]
        harness.messageBoxes.append(self)

    def setWindowTitle(self, title):
        self.title = title

    def setIcon(self, icon):
        pass

    def setText(self, text):
        self.text = text

    def addButton(self, textOrStandardButton, role=None):
        button = types.SimpleNamespace(text=textOrStandardButton, role=role)
        self.buttons.append(button)
        return button

    def exec_(self):
        harness = CURRENT_HARNESS[0]
        harness.cursorDuringQuestions.append(harness.overrideCursorDepth)
        self.clicked = self.buttons[harness.answerIndex(self)]

    def clickedButton(self):
        return self.clicked

    def deleteLater(self):
        self.deleted = True

class TableItem:
    def __init__(self, text):
        self._text = text

    def text(self):
        return self._text


# ---------------------------------------------------------------------------------------------
# Parameter node wrapper (typed attributes stored in a vtkMRMLScriptedModuleNode)


class Validator:
    """Marker: annotations the wrapper's serializers consume (Base/Python/slicer/parameterNodeWrapper/validators.py)."""


class WithinRange(Validator):
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Minimum(Validator):
    def __init__(self, minimum):
        self.minimum = minimum

    def validate(self, value):
        if value < self.minimum:
            raise ValueError(f"Value must be >= {self.minimum}, is {value}")


class Decimals:
    """A GUI-connector annotation, not a validator (parameterNodeWrapper/guiConnectors.py)."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return f"Decimals(value={self.value})"


def applySpinBoxRange(widget, validators, isInteger):
    """What the spin box connectors do to a spin box's range: WithinRange sets both ends, a lone
    Minimum or Maximum sets one end and the other goes to the type's extreme, 2**31-1 for int, inf
    for float (parameterNodeWrapper/guiConnectors.py: QSliderOrSpinBoxToIntConnector,
    QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector)."""
    withinRange = next((v for v in validators if isinstance(v, WithinRange)), None)
    minimum = next((v for v in validators if isinstance(v, Minimum)), None)
    if withinRange is not None:
        widget.minimum, widget.maximum = withinRange.minimum, withinRange.maximum
        return
    widget.minimum = minimum.minimum if minimum is not None else (-(2**31) if isInteger else float("-inf"))
    widget.maximum = 2**31 - 1 if isInteger else float("inf")


def _baseType(hint):
    if typing.get_origin(hint) is typing.Annotated:
        return _baseType(typing.get_args(hint)[0])[0], list(typing.get_args(hint)[1:])
    if typing.get_origin(hint) is typing.Union:
        return [arg for arg in typing.get_args(hint) if arg is not type(None)][0], []
    return hint, []


def parameterNodeWrapper(classtype):
    """Typed attributes on a scripted module node: nodes as references, Enums by name, scalars as text."""
    fields = {}
    for name, hint in typing.get_type_hints(classtype, include_extras=True).items():
        baseType, annotations = _baseType(hint)
        validators = [annotation for annotation in annotations if isinstance(annotation, Validator)]
        unused = [annotation for annotation in annotations if not isinstance(annotation, Validator)]
        # A field with a class default keeps what no serializer consumed, and says so
        # (parameterNodeWrapper/wrapper.py, _processClass).
        if unused and hasattr(classtype, name):
            logging.warning(f"Unused annotations: {unused}")
        fields[name] = (baseType, validators, getattr(classtype, name, None))

    def read(self, name):
        baseType, _, _ = fields[name]
        if isinstance(baseType, type) and issubclass(baseType, slicer.vtkMRMLNode):
            return self.parameterNode.GetNodeReference(name)
        text = self.parameterNode.GetParameter(name)
        if issubclass(baseType, enum.Enum):
            return baseType[text]
        if baseType is bool:
            return text == "True"
        return baseType(text)

    def write(self, name, value):
        baseType, validators, _ = fields[name]
        if isinstance(baseType, type) and issubclass(baseType, slicer.vtkMRMLNode):
            self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            return
        if not isinstance(value, baseType) and not (baseType is float and isinstance(value, int)):
            raise TypeError(f"{name} must be {baseType.__name__}, got {value!r}")
        for validator in validators:
            validator.validate(value)
        self.parameterNode.SetParameter(name, value.name if isinstance(value, enum.Enum) else str(value))

    def init(self, parameterNode):
        object.__setattr__(self, "parameterNode", parameterNode)
        for name, (baseType, _, default) in fields.items():
            isNode = isinstance(baseType, type) and issubclass(baseType, slicer.vtkMRMLNode)
            if not isNode and not parameterNode.HasParameter(name):
                write(self, name, default)

    def getattribute(self, name):
        if name in fields:
            return read(self, name)
        return object.__getattribute__(self, name)

    def setattr(self, name, value):
        if name not in fields:
            raise AttributeError(f"{name} is not a parameter")
        write(self, name, value)

    def connectGui(self, gui):
        """Bind the widgets whose SlicerParameterName names a field. Like Slicer 5.10, every connect
        adds a ModifiedEvent observer that disconnectGui never removes (wrapper.py, _connectGui /
        _disconnectGui; fixed after 5.10 in Slicer commit 16069d367e)."""
        harness = CURRENT_HARNESS[0]
        for widget in vars(gui).values():
            name = widget.property("SlicerParameterName")
            if name in fields and widget.className in ("QSpinBox", "QDoubleSpinBox"):
                applySpinBoxRange(widget, fields[name][1], isInteger=fields[name][0] is int)
        harness.guiObservers.append(self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent,
                                                                    lambda caller, event: None))
        return len(harness.guiObservers)

    namespace = {
        "__init__": init, "__getattribute__": getattribute, "__setattr__": setattr,
        "connectGui": connectGui, "disconnectGui": lambda self, tag: None,
        "StartModify": lambda self: self.parameterNode.StartModify(),
        "EndModify": lambda self, wasModified: self.parameterNode.EndModify(wasModified),
        "AddObserver": lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
            event, callback, priority),
        "RemoveObserver": lambda self, tag: self.parameterNode.RemoveObserver(tag),
    }
    return type(classtype.__name__, (), namespace)


# ---------------------------------------------------------------------------------------------
# ScriptedLoadableModule base classes


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = type(self).__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent or types.SimpleNamespace(isEntered=True)
        self.moduleName = type(self).__name__.removesuffix("Widget")
        self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

    def setup(self):
        pass

    def resourcePath(self, filename):
        return str(MODULE_FOLDER / "Resources" / filename)

    def onReload(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    """unittest.TestCase plus delayDisplay (which pumps the application's events in Slicer)."""

    messages: list = []

    def delayDisplay(self, message, msec=None):
        ScriptedLoadableModuleTest.messages.append(message)
        slicer.app.processEvents()


# ---------------------------------------------------------------------------------------------
# The harness


class GuiHarness:
    """Installs the stand-ins (through pytest's monkeypatch) and loads DeepGMMSegment.py.

    ``testingEnabled`` plays Slicer's ``--testing``. ``answers`` lists the button indices the
    question boxes get (default: the first button)."""

    def __init__(self, monkeypatch, scheduler, testingEnabled=False):
        self.scheduler = scheduler
        self.slotErrors, self.errorMessages, self.widgets = [], [], []
        self.messageBoxes, self.cursorDuringQuestions, self.answers, self.guiObservers = [], [], [], []
        self.startupSlots = []
        self.overrideCursorDepth = 0
        CURRENT_HARNESS[:] = [self]
        qt = types.ModuleType("qt")
        qt.QTimer = types.SimpleNamespace(singleShot=lambda milliseconds, callback: scheduler(milliseconds, callback))
        qt.QHeaderView = types.SimpleNamespace(ResizeToContents=3)
        qt.QTableWidgetItem = TableItem
        qt.QMessageBox = FakeMessageBox
        qt.Qt = types.SimpleNamespace(WaitCursor=3)
        qt.QApplication = types.SimpleNamespace(setOverrideCursor=self.setOverrideCursor,
                                                restoreOverrideCursor=self.restoreOverrideCursor)
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        wrapperModule = types.ModuleType("slicer.parameterNodeWrapper")
        for item in (WithinRange, Minimum, Decimals, parameterNodeWrapper):
            setattr(wrapperModule, item.__name__, item)
        scripted = types.ModuleType("slicer.ScriptedLoadableModule")
        for item in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                     ScriptedLoadableModuleTest):
            setattr(scripted, item.__name__, item)
        for name, module in (("qt", qt), ("slicer.i18n", i18n), ("slicer.parameterNodeWrapper", wrapperModule),
                             ("slicer.ScriptedLoadableModule", scripted)):
            monkeypatch.setitem(sys.modules, name, module)
        self.mainWindow = FakeWidget(self, "MainWindow", "qSlicerMainWindow")
        application = types.SimpleNamespace(
            setOverrideCursor=self.setOverrideCursor, restoreOverrideCursor=self.restoreOverrideCursor,
            testingEnabled=lambda: testingEnabled, processEvents=self.processEvents,
            connect=lambda signal, slot: self.startupSlots.append((signal, slot)),
            moduleManager=lambda: types.SimpleNamespace(module=self.moduleByName))
        monkeypatch.setattr(slicer, "app", application, raising=False)
        monkeypatch.setattr(slicer, "qSlicerScriptedLoadableModule", ScriptedModuleStandIn, raising=False)
        monkeypatch.setattr(slicer, "qSlicerScriptedLoadableModuleWidget", WidgetRepresentation, raising=False)
        monkeypatch.setattr(slicer.util, "loadUI", self.loadUI)
        monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda root: root.ui)
        monkeypatch.setattr(slicer.util, "mainWindow", lambda: self.mainWindow)
        monkeypatch.setattr(slicer.util, "selectModule", self.selectModule)
        monkeypatch.setattr(slicer.util, "errorDisplay",
                            lambda text, **kwargs: self.errorMessages.append(text))
        spec = importlib.util.spec_from_file_location("DeepGMMSegment", MODULE_FOLDER / "DeepGMMSegment.py")
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)
        self.module.DeepGMMSegment(types.SimpleNamespace())  # Slicer instantiates the module at startup
        self.moduleWidget = None
        monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
            **vars(getattr(slicer, "modules", types.SimpleNamespace())),
            deepgmmsegment=types.SimpleNamespace(widgetRepresentation=lambda: WidgetRepresentation(self))),
            raising=False)

    def setOverrideCursor(self, cursor):
        self.overrideCursorDepth += 1

    def restoreOverrideCursor(self):
        self.overrideCursorDepth -= 1

    def processEvents(self):
        self.scheduler.runPending()

    def answerIndex(self, box):
        return self.answers.pop(0) if self.answers else 0

    def liveHiddenMessageBoxes(self):
        """Question boxes that outlived their question (parented and never deleted)."""
        return [box for box in self.messageBoxes if box.parent is not None and not box.deleted]

    def moduleByName(self, name):
        return ScriptedModuleStandIn(self) if name == "DeepGMMSegment" else None

    def selectModule(self, name):
        """The module panel is created the first time the module is shown, then entered."""
        assert name == "DeepGMMSegment"
        if self.moduleWidget is None:
            self.moduleWidget = self.createWidget()
        self.moduleWidget.enter()

    def cleanup(self):
        """What Slicer does when the application closes: each widget's cleanup()."""
        for widget in self.widgets:
            widget.cleanup()

    def loadUI(self, path):
        """A root widget whose ``ui`` namespace holds one stand-in per widget of the real .ui file,
        with the properties the .ui sets (numbers, strings, string lists)."""
        tree = ElementTree.parse(path)
        root = FakeWidget(self, tree.getroot().find("widget").get("name"), "qMRMLWidget")
        widgets = {}
        for element in tree.iter("widget"):
            properties = {}
            for prop in element.findall("property"):
                number, string = prop.find("number"), prop.find("string")
                if number is not None:
                    properties[prop.get("name")] = int(number.text)
                elif prop.find("double") is not None:
                    properties[prop.get("name")] = float(prop.find("double").text)
                elif prop.find("stringlist") is not None:
                    properties[prop.get("name")] = [item.text for item in prop.iter("string")]
                elif string is not None:
                    properties[prop.get("name")] = string.text
            widgetClass = FakePathLineEdit if element.get("class") == "ctkPathLineEdit" else FakeWidget
            widgets[element.get("name")] = widgetClass(self, element.get("name"), element.get("class"), properties)
        root.ui = types.SimpleNamespace(**widgets)
        return root

    def createWidget(self):
        widget = self.module.DeepGMMSegmentWidget()
        self.widgets.append(widget)
        widget.setup()
        self.scheduler.runPending()  # the deferred device label
        return widget


class ScriptedModuleStandIn:
    """``slicer.app.moduleManager().module("DeepGMMSegment")`` (a qSlicerScriptedLoadableModule)."""

    name = "DeepGMMSegment"

    def __init__(self, harness=None):
        self.harness = harness

    def widgetRepresentation(self):
        return WidgetRepresentation(self.harness)


class WidgetRepresentation:
    """A scripted module's widget representation; ``self()`` is the Python widget object
    (created on first use, as Slicer creates a module panel when it is first needed)."""

    def __init__(self, harness=None):
        self.harness = harness

    def self(self):
        if self.harness.moduleWidget is None:
            self.harness.moduleWidget = self.harness.createWidget()
        return self.harness.moduleWidget
