"""A stand-in for the Qt side of Slicer, to run DeepGMMSegment.py's widget code outside Slicer.

Qt, ctk and the Qt-dependent parts of ``slicer`` (``ScriptedLoadableModule``, ``i18n``,
``parameterNodeWrapper``) are not in the ``slicer-core`` wheel. This module provides the few pieces
the widget touches, so its control flow (Segment -> Cancel, progress, results table, mask sync,
replace-or-new question) runs against real MRML, the real logic and the real worker process.

What it cannot tell: whether the Qt/PythonQt calls themselves are right (property names, signal
signatures) and whether Slicer's parameter node GUI connectors accept the widgets. That is for the
module's SelfTest inside Slicer; the static .ui checks cover the names.
"""

from __future__ import annotations

import enum
import importlib.util
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import slicer
import slicer.util

MODULE_FOLDER = Path(__file__).resolve().parents[3] / "DeepGMMSegment"


# ---------------------------------------------------------------------------------------------
# Widgets


class FakeWidget:
    """Holds the properties the widget code sets and calls the slots connected to its signals."""

    def __init__(self, harness, name, className):
        self.harness, self.objectName, self.className = harness, name, className
        self.enabled, self.visible, self.toolTip, self.text, self.value = True, True, "", "", 0
        self.range = (0, 100)
        self.rowCount, self.items = 0, {}
        self.node, self.segmentId = None, ""
        self.currentPath = ""
        self.slots = {}

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

    # qMRMLSegmentSelectorWidget
    def currentNode(self):
        return self.node

    def setCurrentNode(self, node):
        if node is not self.node:
            self.node = node
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    def currentSegmentID(self):
        return self.segmentId

    def setCurrentSegmentID(self, segmentId):
        if segmentId != self.segmentId:
            self.segmentId = segmentId
            self.emit("currentSegmentChanged(QString)", segmentId)


    # ctkPathLineEdit: the user picks a file (the code sets ``currentPath`` directly, which Qt
    # answers with the same signal; the widget ignores a path it already has).
    def setCurrentPath(self, path):
        if path != self.currentPath:
            self.currentPath = path
            self.emit("currentPathChanged(QString)", path)


class TableItem:
    def __init__(self, text):
        self._text = text

    def text(self):
        return self._text


# ---------------------------------------------------------------------------------------------
# Parameter node wrapper (typed attributes stored in a vtkMRMLScriptedModuleNode)


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Minimum:
    def __init__(self, minimum):
        self.minimum = minimum

    def validate(self, value):
        if value < self.minimum:
            raise ValueError(f"Value must be >= {self.minimum}, is {value}")


class Decimals:
    def __init__(self, value):
        self.value = value

    def validate(self, value):
        pass


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
        baseType, validators = _baseType(hint)
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

    namespace = {
        "__init__": init, "__getattribute__": getattribute, "__setattr__": setattr,
        "connectGui": lambda self, gui: object(), "disconnectGui": lambda self, tag: None,
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


# ---------------------------------------------------------------------------------------------
# The harness


class GuiHarness:
    """Installs the stand-ins (through pytest's monkeypatch) and loads DeepGMMSegment.py."""

    def __init__(self, monkeypatch, scheduler):
        self.scheduler = scheduler
        self.slotErrors, self.errorMessages, self.widgets = [], [], []
        qt = types.ModuleType("qt")
        qt.QTimer = types.SimpleNamespace(singleShot=lambda milliseconds, callback: scheduler(milliseconds, callback))
        qt.QHeaderView = types.SimpleNamespace(ResizeToContents=3)
        qt.QTableWidgetItem = TableItem
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        wrapperModule = types.ModuleType("slicer.parameterNodeWrapper")
        for item in (WithinRange, Minimum, Decimals, parameterNodeWrapper):
            setattr(wrapperModule, item.__name__, item)
        scripted = types.ModuleType("slicer.ScriptedLoadableModule")
        for item in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic):
            setattr(scripted, item.__name__, item)
        scripted.ScriptedLoadableModuleTest = unittest.TestCase
        for name, module in (("qt", qt), ("slicer.i18n", i18n), ("slicer.parameterNodeWrapper", wrapperModule),
                             ("slicer.ScriptedLoadableModule", scripted)):
            monkeypatch.setitem(sys.modules, name, module)
        application = types.SimpleNamespace(setOverrideCursor=lambda cursor: None,
                                            restoreOverrideCursor=lambda: None, testingEnabled=lambda: False)
        qt.Qt = types.SimpleNamespace(WaitCursor=3)
        monkeypatch.setattr(slicer, "app", application, raising=False)
        monkeypatch.setattr(slicer.util, "loadUI", self.loadUI)
        monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda root: root.ui)
        monkeypatch.setattr(slicer.util, "mainWindow", lambda: None)
        monkeypatch.setattr(slicer.util, "errorDisplay",
                            lambda text, **kwargs: self.errorMessages.append(text))
        spec = importlib.util.spec_from_file_location("DeepGMMSegment", MODULE_FOLDER / "DeepGMMSegment.py")
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)

    def cleanup(self):
        """What Slicer does when the application closes: each widget's cleanup()."""
        for widget in self.widgets:
            widget.cleanup()

    def loadUI(self, path):
        """A root widget whose ``ui`` namespace holds one FakeWidget per widget of the real .ui file."""
        tree = ElementTree.parse(path)
        root = FakeWidget(self, tree.getroot().find("widget").get("name"), "qMRMLWidget")
        root.ui = types.SimpleNamespace(**{
            element.get("name"): FakeWidget(self, element.get("name"), element.get("class"))
            for element in tree.iter("widget")})
        return root

    def createWidget(self):
        widget = self.module.DeepGMMSegmentWidget()
        self.widgets.append(widget)
        widget.setup()
        self.scheduler.runPending()  # the deferred device label
        return widget
