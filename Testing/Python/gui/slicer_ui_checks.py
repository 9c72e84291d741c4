"""Static checks of a Slicer module's Qt Designer ``.ui`` file against its Python code, without Qt.

Qt is not available in CI, and Qt's own loaders accept broken files (an undeclared custom class is
silently dropped), so these checks read the XML with the standard library. Each function returns
a list of problems (empty when the check passes), so a test can show all of them at once.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ElementTree
from pathlib import Path

# Widget classes that Qt Designer / QUiLoader create without a <customwidget> declaration.
STOCK_QT_WIDGETS = frozenset({
    "QWidget", "QFrame", "QLabel", "QPushButton", "QToolButton", "QRadioButton", "QCheckBox",
    "QComboBox", "QFontComboBox", "QLineEdit", "QTextEdit", "QPlainTextEdit", "QSpinBox",
    "QDoubleSpinBox", "QSlider", "QScrollBar", "QDial", "QProgressBar", "QLCDNumber",
    "QGroupBox", "QTabWidget", "QStackedWidget", "QToolBox", "QScrollArea", "QSplitter",
    "QDockWidget", "QMdiArea", "QListWidget", "QTreeWidget", "QTableWidget", "QListView",
    "QTreeView", "QTableView", "QColumnView", "QUndoView", "QDialogButtonBox",
    "QCommandLinkButton", "QKeySequenceEdit", "QDateEdit", "QTimeEdit", "QDateTimeEdit",
    "QCalendarWidget", "QGraphicsView", "QTextBrowser", "QOpenGLWidget", "QMainWindow",
    "QDialog", "QMenu", "QMenuBar", "QStatusBar", "QToolBar",
})

SCENE_SIGNAL = "mrmlSceneChanged(vtkMRMLScene*)"
SCENE_SLOT = "setMRMLScene(vtkMRMLScene*)"


def parseUi(uiPath) -> ElementTree.ElementTree:
    """Parse a .ui file; raises ``xml.etree.ElementTree.ParseError`` when it is not well-formed."""
    return ElementTree.parse(str(uiPath))


def wellFormedProblems(uiPath) -> list[str]:
    """The XML parse error of the file, if any."""
    try:
        parseUi(uiPath)
    except ElementTree.ParseError as error:
        return [f"{Path(uiPath).name} is not well-formed XML: {error}"]
    return []


def rootWidget(tree) -> ElementTree.Element:
    """The top-level <widget> of the form."""
    return tree.getroot().find("widget")


def namedElements(tree) -> list[ElementTree.Element]:
    """Every widget, layout, spacer and action element that carries a name."""
    elements = []
    for tag in ("widget", "layout", "spacer", "action"):
        elements.extend(element for element in tree.iter(tag) if element.get("name"))
    return elements


def widgetNames(tree) -> set[str]:
    """Object names of all widgets (the names ``childWidgetVariables`` exposes as ``self.ui.<name>``)."""
    return {element.get("name") for element in tree.iter("widget") if element.get("name")}


def duplicateNameProblems(tree) -> list[str]:
    """Object names that occur more than once (Qt would expose only one of them)."""
    seen, problems = set(), []
    for element in namedElements(tree):
        name = element.get("name")
        if name in seen:
            problems.append(f"object name {name!r} is used more than once")
        seen.add(name)
    return problems


def declaredCustomWidgets(tree) -> dict[str, str]:
    """Custom widget class -> the class it extends, from <customwidgets>."""
    declared = {}
    for custom in tree.getroot().iter("customwidget"):
        className = (custom.findtext("class") or "").strip()
        declared[className] = (custom.findtext("extends") or "").strip()
    return declared


def undeclaredClassProblems(tree) -> list[str]:
    """Widget classes that are neither stock Qt nor declared in <customwidgets>."""
    declared = declaredCustomWidgets(tree)
    problems = []
    for element in tree.iter("widget"):
        className = element.get("class")
        if className not in STOCK_QT_WIDGETS and className not in declared:
            problems.append(f"widget {element.get('name')!r} has class {className!r}, which is not a stock Qt "
                            "widget and not declared in <customwidgets>")
    for className, extends in declared.items():
        if extends not in STOCK_QT_WIDGETS and extends not in declared:
            problems.append(f"custom widget {className!r} extends {extends!r}, which is neither stock Qt nor declared")
    return problems


def connectionProblems(tree) -> list[str]:
    """Designer connections whose sender or receiver is not an object of the form."""
    names = {element.get("name") for element in namedElements(tree)}
    problems = []
    for connection in tree.getroot().iter("connection"):
        for role in ("sender", "receiver"):
            objectName = (connection.findtext(role) or "").strip()
            if objectName not in names:
                problems.append(f"connection {role} {objectName!r} does not exist in the form")
    return problems


def sceneConnectionProblems(tree) -> list[str]:
    """MRML widgets (qMRML* classes) that do not get the root's scene via mrmlSceneChanged -> setMRMLScene."""
    rootName = rootWidget(tree).get("name")
    connected = set()
    for connection in tree.getroot().iter("connection"):
        if ((connection.findtext("sender") or "").strip() == rootName
                and (connection.findtext("signal") or "").strip() == SCENE_SIGNAL
                and (connection.findtext("slot") or "").strip() == SCENE_SLOT):
            connected.add((connection.findtext("receiver") or "").strip())
    problems = []
    for element in rootWidget(tree).iter("widget"):
        if element is rootWidget(tree):
            continue
        if element.get("class", "").startswith("qMRML") and element.get("name") not in connected:
            problems.append(f"MRML widget {element.get('name')!r} is not connected "
                            f"{rootName}.{SCENE_SIGNAL} -> {SCENE_SLOT}")
    return problems


def parameterBindings(tree) -> dict[str, str]:
    """Widget name -> value of its ``SlicerParameterName`` dynamic property."""
    bindings = {}
    for element in tree.iter("widget"):
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings[element.get("name")] = (prop.findtext("string") or "").strip()
    return bindings


def uiAttributeNames(pythonSource: str) -> dict[str, int]:
    """Names used as ``<something>.ui.<name>`` or ``ui.<name>`` (a local alias of ``self.ui``) in
    Python source -> first line number."""
    used = {}
    for node in ast.walk(ast.parse(pythonSource)):
        if isinstance(node, ast.Attribute) and (
                (isinstance(node.value, ast.Attribute) and node.value.attr == "ui")
                or (isinstance(node.value, ast.Name) and node.value.id == "ui")):
            used.setdefault(node.attr, node.lineno)
    return used


def missingUiNameProblems(tree, pythonSource: str) -> list[str]:
    """``self.ui.<name>`` uses in the module code that name no widget of the form."""
    names = widgetNames(tree)
    return [f"line {line}: .ui.{name} is used in the code but no widget of that name is in the .ui file"
            for name, line in sorted(uiAttributeNames(pythonSource).items(), key=lambda item: item[1])
            if name not in names]


def parameterNodeFields(pythonSource: str, className: str) -> list[str]:
    """Annotated fields of the ``@parameterNodeWrapper`` class ``className`` in the module source."""
    for node in ast.walk(ast.parse(pythonSource)):
        if isinstance(node, ast.ClassDef) and node.name == className:
            decorators = [ast.unparse(decorator) for decorator in node.decorator_list]
            if not any(decorator.endswith("parameterNodeWrapper") for decorator in decorators):
                raise ValueError(f"class {className} is not decorated with @parameterNodeWrapper")
            return [statement.target.id for statement in node.body
                    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)]
    raise ValueError(f"class {className} not found in the module source")


def parameterNameProblems(tree, pythonSource: str, className: str) -> list[str]:
    """``SlicerParameterName`` values in the form that are not fields of the parameter node class."""
    fields = set(parameterNodeFields(pythonSource, className))
    return [f"widget {widget!r} binds SlicerParameterName {parameter!r}, which is not a field of {className}"
            for widget, parameter in sorted(parameterBindings(tree).items()) if parameter not in fields]
