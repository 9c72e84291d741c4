"""Static checks of the Slicer panel: DeepGMMSegment.ui against DeepGMMSegment.py, without Qt.

Each check runs on the real files and on a deliberately broken copy, so a check that cannot fail
is caught too.
"""

import ast
import py_compile
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

import slicer_ui_checks as checks

REPOSITORY = Path(__file__).resolve().parents[3]
MODULE_FOLDER = REPOSITORY / "DeepGMMSegment"
UI_PATH = MODULE_FOLDER / "Resources" / "UI" / "DeepGMMSegment.ui"
MODULE_PATH = MODULE_FOLDER / "DeepGMMSegment.py"
PARAMETER_NODE_CLASS = "DeepGMMSegmentParameterNode"


@pytest.fixture(scope="module")
def uiText():
    return UI_PATH.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def moduleSource():
    return MODULE_PATH.read_text(encoding="utf-8")


def brokenCopy(tmp_path, text, old, new, count=1):
    """Write ``text`` with ``old`` replaced by ``new`` to a temporary .ui file and return its path."""
    assert old in text, f"test setup: {old!r} not found"
    path = tmp_path / "Broken.ui"
    path.write_text(text.replace(old, new, count), encoding="utf-8")
    return path


def treeOf(text, tmp_path):
    path = tmp_path / "Copy.ui"
    path.write_text(text, encoding="utf-8")
    return checks.parseUi(path)


# ---------------------------------------------------------------------------------------------
# The real files pass every check


def test_ui_is_well_formed_with_qmrmlwidget_root():
    assert checks.wellFormedProblems(UI_PATH) == []
    tree = checks.parseUi(UI_PATH)
    assert checks.rootWidget(tree).get("class") == "qMRMLWidget"
    assert checks.rootWidget(tree).get("name") == "DeepGMMSegment"


def test_ui_object_names_are_unique():
    assert checks.duplicateNameProblems(checks.parseUi(UI_PATH)) == []


def test_ui_widget_classes_are_stock_or_declared():
    tree = checks.parseUi(UI_PATH)
    assert checks.undeclaredClassProblems(tree) == []
    # The panel really uses the Slicer widgets it declares.
    used = {element.get("class") for element in tree.iter("widget")}
    assert {"qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget", "ctkCollapsibleButton", "ctkPathLineEdit"} <= used


def test_ui_connections_and_scene_wiring():
    tree = checks.parseUi(UI_PATH)
    assert checks.connectionProblems(tree) == []
    assert checks.sceneConnectionProblems(tree) == []


def test_every_ui_name_used_in_the_module_exists(moduleSource):
    tree = checks.parseUi(UI_PATH)
    used = checks.uiAttributeNames(moduleSource)
    assert "segmentButton" in used and "resultsTableWidget" in used  # the parser does find the uses
    assert checks.missingUiNameProblems(tree, moduleSource) == []


def test_every_parameter_binding_is_a_parameter_node_field(moduleSource):
    tree = checks.parseUi(UI_PATH)
    assert checks.parameterNameProblems(tree, moduleSource, PARAMETER_NODE_CLASS) == []
    bindings = set(checks.parameterBindings(tree).values())
    expected = {"inputVolume1", "inputVolume2", "inputVolume3", "inputVolume4", "numberOfClasses", "method",
                "device", "seed", "maxIterations", "tolerance", "covarianceType", "priorMeans", "smoothness",
                "labelSmoothing", "roi", "outputSegmentation", "probabilityMaps", "useTrainedModel", "fineTuneSteps",
                "seedSegmentation", "correctBiasField", "biasFieldOrder"}
    assert bindings == expected


def test_parameter_node_fields_have_the_specified_types(moduleSource):
    """Classes 2..12 validated; method/device/covariance are Enums; nodes for inputs, ROI, mask, output."""
    classNode = next(node for node in ast.walk(ast.parse(moduleSource))
                     if isinstance(node, ast.ClassDef) and node.name == PARAMETER_NODE_CLASS)
    annotations = {statement.target.id: ast.unparse(statement.annotation)
                   for statement in classNode.body if isinstance(statement, ast.AnnAssign)}
    assert annotations["numberOfClasses"] == "Annotated[int, WithinRange(2, 12)]"
    assert annotations["method"] == "SegmentationMethod"
    assert annotations["device"] == "ComputeDevice"
    for name in ("inputVolume1", "inputVolume2", "inputVolume3", "inputVolume4"):
        assert annotations[name] == "Optional[vtkMRMLScalarVolumeNode]"
    assert annotations["roi"] == "Optional[vtkMRMLMarkupsROINode]"
    assert annotations["maskSegmentation"] == "Optional[vtkMRMLSegmentationNode]"
    assert annotations["outputSegmentation"] == "Optional[vtkMRMLSegmentationNode]"
    assert annotations["useTrainedModel"] == "bool"
    assert annotations["trainedModelPath"] == "str"  # synced by hand with the ctkPathLineEdit
    # Bounded on both sides: Minimum alone makes the spin box connector set the maximum to 2**31-1.
    assert annotations["fineTuneSteps"] == "Annotated[int, WithinRange(0, 10000)]"
    assert annotations["seedSegmentation"] == "Optional[vtkMRMLSegmentationNode]"
    assert annotations["correctBiasField"] == "bool"
    assert annotations["biasFieldOrder"] == "Annotated[int, WithinRange(0, options.MAX_BIAS_FIELD_ORDER)]"
    # The lowest value means "automatic" / "off"; label smoothing's default is the engine's label_mrf.
    assert annotations["smoothness"] == "Annotated[float, WithinRange(panel.AUTOMATIC_SMOOTHNESS, 10.0)]"
    assert annotations["labelSmoothing"] == "Annotated[float, WithinRange(panel.LABEL_MRF_OFF, 5.0)]"
    defaults = {statement.target.id: ast.unparse(statement.value)
                for statement in classNode.body if isinstance(statement, ast.AnnAssign) and statement.value}
    assert defaults["labelSmoothing"] == "options.LABEL_MRF"
    # No GUI-only annotation (Decimals) on fields with a default: it is logged as unused at every start.
    assert "Decimals" not in "".join(annotations.values())


def test_parameter_node_fields_avoid_the_wrappers_reserved_names(moduleSource):
    # parameterNodeWrapper adds these members to the class and refuses fields of the same name.
    reserved = {"allParameters", "default", "isCached", "dataType", "getValue", "setValue", "connectGui",
                "connectParametersToGui", "disconnectGui", "StartModify", "EndModify", "AddObserver",
                "RemoveObserver", "Modified", "parameterNode"}
    fields = checks.parameterNodeFields(moduleSource, PARAMETER_NODE_CLASS)
    assert len(fields) == 25 and not reserved & set(fields)


def test_combo_box_items_match_the_enum_labels(moduleSource):
    """The .ui items are what the parameter node connector shows (labels from panel.py)."""
    from DeepGMMSegmentLib import options
    from DeepGMMSegmentLib.slicer_adapter import panel

    enumValues = {"SegmentationMethod": list(options.METHODS)}  # the module builds that enum from it
    for node in ast.walk(ast.parse(moduleSource)):
        if isinstance(node, ast.ClassDef) and any(ast.unparse(base) == "enum.Enum" for base in node.bases):
            enumValues[node.name] = [statement.value.value for statement in node.body
                                     if isinstance(statement, ast.Assign)]
    tree = checks.parseUi(UI_PATH)

    def items(widgetName):
        widget = next(element for element in tree.iter("widget") if element.get("name") == widgetName)
        return [item.findtext("property/string") for item in widget.findall("item")]

    assert items("methodComboBox") == [panel.METHOD_LABELS[v] for v in enumValues["SegmentationMethod"]]
    assert items("deviceComboBox") == [panel.DEVICE_LABELS[v] for v in enumValues["ComputeDevice"]]
    assert items("covarianceTypeComboBox") == [panel.COVARIANCE_LABELS[v] for v in enumValues["CovarianceType"]]
    assert enumValues["SegmentationMethod"][0] == "deepsvg"  # deepSVG is the default (first item)


def test_spin_boxes_with_a_special_lowest_value_match_the_panel():
    """smoothness' "automatic" and label smoothing's "off" are the lowest values panel.py maps."""
    from DeepGMMSegmentLib.slicer_adapter import panel

    tree = checks.parseUi(UI_PATH)
    bindings = checks.parameterBindings(tree)
    advanced = next(element for element in tree.iter("widget") if element.get("name") == "advancedCollapsibleButton")
    inAdvanced = {element.get("name") for element in advanced.iter("widget")}
    for name, field, lowest, text in (("smoothnessSpinBox", "smoothness", panel.AUTOMATIC_SMOOTHNESS, "automatic"),
                                      ("labelSmoothingSpinBox", "labelSmoothing", panel.LABEL_MRF_OFF, "off")):
        spinBox = next((element for element in tree.iter("widget") if element.get("name") == name), None)
        assert spinBox is not None and spinBox.get("class") == "QDoubleSpinBox", name
        assert bindings[name] == field and name in inAdvanced
        properties = {prop.get("name"): prop[0].text for prop in spinBox.findall("property")}
        assert float(properties["minimum"]) == lowest and properties["specialValueText"] == text, name
        assert properties["toolTip"].startswith("deepSVG only"), name


def test_results_table_columns_match_panel_rows():
    from DeepGMMSegmentLib.slicer_adapter import panel

    tree = checks.parseUi(UI_PATH)
    table = next(element for element in tree.iter("widget") if element.get("name") == "resultsTableWidget")
    assert tuple(column.findtext("property/string") for column in table.findall("column")) == panel.RESULT_COLUMNS


def test_trained_model_file_filter_offers_the_model_io_suffix(moduleSource):
    from DeepGMMSegmentLib.trained import model_file

    tree = checks.parseUi(UI_PATH)
    pathEdit = next(element for element in tree.iter("widget") if element.get("name") == "trainedModelPathLineEdit")
    assert pathEdit.get("class") == "ctkPathLineEdit"
    nameFilters = [string.text for prop in pathEdit.findall("property") if prop.get("name") == "nameFilters"
                   for string in prop.iter("string")]
    assert f"*{model_file.MODEL_SUFFIX}" in nameFilters[0].split("(")[1]
    # Not bound through SlicerParameterName: the code keeps it and the str field in sync.
    assert "trainedModelPathLineEdit" not in checks.parameterBindings(tree)
    # Every edit reaches the parameter node: the inner combo box's editTextChanged, not currentPathChanged,
    # which the name-filter validator suppresses for "All files", ".PT" and an empty field.
    assert re.search(r'comboBox\(\)\.connect\("editTextChanged\(QString\)",\s*self\.onTrainedModelPathChanged\)',
                     moduleSource)


def test_module_file_compiles_and_is_thin(tmp_path):
    py_compile.compile(str(MODULE_PATH), cfile=str(tmp_path / "module.pyc"), doraise=True)
    # The SelfTest (end of the file) is as long as Slicer needs; the module, logic and panel stay thin.
    text = MODULE_PATH.read_text(encoding="utf-8")
    assert len(text[:text.index("class DeepGMMSegmentTest(")].encode("utf-8")) < 30_000


def test_module_declares_slicer_module_conventions(moduleSource):
    tree = ast.parse(moduleSource)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"DeepGMMSegment", "DeepGMMSegmentWidget", "DeepGMMSegmentTest", PARAMETER_NODE_CLASS} <= classes
    assert '"Segmentation"' in moduleSource and "arXiv:2404.12252" in moduleSource
    assert "import imp\n" not in moduleSource and "importlib.reload" in moduleSource
    # Qt-only imports stay in this file: the Lib package must never import qt/ctk at module level.
    for path in (MODULE_FOLDER / "DeepGMMSegmentLib").rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(name.split(".")[0] in ("qt", "ctk") for name in names), f"{path.name} imports Qt"


# ---------------------------------------------------------------------------------------------
# Each check fails on a deliberately broken copy


def test_malformed_xml_is_reported(tmp_path, uiText):
    broken = brokenCopy(tmp_path, uiText, "</customwidgets>", "</customwidget>")
    problems = checks.wellFormedProblems(broken)
    assert len(problems) == 1 and "not well-formed" in problems[0]


def test_duplicate_object_name_is_reported(tmp_path, uiText):
    tree = treeOf(uiText.replace('name="seedSpinBox"', 'name="numberOfClassesSpinBox"'), tmp_path)
    assert checks.duplicateNameProblems(tree) == ["object name 'numberOfClassesSpinBox' is used more than once"]


def test_undeclared_custom_class_is_reported(tmp_path, uiText):
    # Drop the qMRMLSegmentSelectorWidget declaration: Qt would silently drop the widget.
    declaration = re.search(r"\s*<customwidget>\s*<class>qMRMLSegmentSelectorWidget</class>.*?</customwidget>",
                            uiText, re.S).group(0)
    tree = treeOf(uiText.replace(declaration, ""), tmp_path)
    problems = checks.undeclaredClassProblems(tree)
    assert len(problems) == 1 and "maskSegmentSelector" in problems[0]


def test_connection_to_missing_widget_is_reported(tmp_path, uiText):
    tree = treeOf(uiText.replace("<receiver>roiSelector</receiver>", "<receiver>roiSelectorOld</receiver>"),
                  tmp_path)
    assert checks.connectionProblems(tree) == ["connection receiver 'roiSelectorOld' does not exist in the form"]
    # ... and the ROI selector now misses its scene.
    assert any("roiSelector" in problem for problem in checks.sceneConnectionProblems(tree))


def test_missing_ui_name_in_code_is_reported(uiText, moduleSource, tmp_path):
    tree = treeOf(uiText.replace('name="statusLabel"', 'name="statusText"'), tmp_path)
    problems = checks.missingUiNameProblems(tree, moduleSource)
    assert problems and all("statusLabel" in problem for problem in problems)
    # A typo in the code is caught the same way.
    typo = moduleSource.replace("self.ui.segmentButton.text", "self.ui.segmentButon.text", 1)
    assert any("segmentButon" in problem for problem in checks.missingUiNameProblems(checks.parseUi(UI_PATH), typo))
    # ... also through a local alias (``ui = self.ui``), as the trained-model code uses.
    assert "ui.trainedModelInfoLabel.text" in moduleSource and "self.ui.trainedModelInfoLabel" not in moduleSource
    tree = treeOf(uiText.replace('name="trainedModelInfoLabel"', 'name="trainedModelInfoText"'), tmp_path)
    assert any("trainedModelInfoLabel" in problem for problem in checks.missingUiNameProblems(tree, moduleSource))


def test_parameter_name_not_in_parameter_node_is_reported(tmp_path, uiText, moduleSource):
    tree = treeOf(uiText.replace("<string>numberOfClasses</string>", "<string>classCount</string>"), tmp_path)
    problems = checks.parameterNameProblems(tree, moduleSource, PARAMETER_NODE_CLASS)
    assert problems == ["widget 'numberOfClassesSpinBox' binds SlicerParameterName 'classCount', "
                        f"which is not a field of {PARAMETER_NODE_CLASS}"]
    # Removing the field from the class is caught too.
    withoutField = moduleSource.replace("    seed: Annotated[int, Minimum(0)] = 0\n", "")
    assert any("'seed'" in problem
               for problem in checks.parameterNameProblems(checks.parseUi(UI_PATH), withoutField,
                                                           PARAMETER_NODE_CLASS))


def test_module_that_does_not_compile_is_reported(tmp_path, moduleSource):
    broken = tmp_path / "DeepGMMSegment.py"
    broken.write_text(moduleSource.replace("def setup(self):", "def setup(self)", 1), encoding="utf-8")
    with pytest.raises(py_compile.PyCompileError):
        py_compile.compile(str(broken), cfile=str(tmp_path / "broken.pyc"), doraise=True)


def test_parse_error_is_an_xml_error(tmp_path):
    path = tmp_path / "Empty.ui"
    path.write_text("<ui><widget></ui>", encoding="utf-8")
    with pytest.raises(ElementTree.ParseError):
        checks.parseUi(path)
