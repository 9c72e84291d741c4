"""The Slicer extension packaging: what Slicer's extension build and the ExtensionsIndex expect.

The module CMakeLists must list every .py and every resource, or the file is silently missing from
the installed extension; several engineers add files to DeepGMMSegmentLib, so CI checks the list.
"""

import json
import re
import struct
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[3]
MODULE_NAME = "DeepGMMSegment"
MODULE_FOLDER = REPOSITORY / MODULE_NAME
SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
              "slicer-extension-catalog-entry-schema-v1.0.1.json#")
# Properties of the v1.0.1 catalog entry schema (Slicer/Slicer:Schemas/), which forbids any other.
SCHEMA_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                     "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
# Build artefacts that are never part of the extension.
IGNORED_PARTS = {"__pycache__", ".pytest_cache"}


def cmakeCommands(text):
    """(command, [arguments]) of a CMake file: comments dropped, quoted arguments unquoted
    (they may hold '#', parentheses and spaces), nested parentheses kept as plain arguments."""
    tokenPattern = re.compile(r'"((?:[^"\\]|\\.)*)"|#[^\n]*|(\w+)\s*\(|(\()|(\))|([^\s()#"]+)')
    commands, current, depth = [], None, 0
    for match in tokenPattern.finditer(text):
        quoted, name, opening, closing, bare = match.groups()
        if match.group(0).startswith("#"):
            continue
        if current is None:
            if name:
                current, depth = (name, []), 1
            continue
        if name or opening:
            depth += 1
            current[1].append(match.group(0).rstrip("("))
        elif closing:
            depth -= 1
            if depth == 0:
                commands.append(current)
                current = None
        else:
            current[1].append(quoted if quoted is not None else bare)
    return commands


def cmakeVariables(text):
    """Values of ``set(NAME value...)`` with ``${MODULE_NAME}`` substituted."""
    variables = {}
    for command, arguments in cmakeCommands(text):
        if command == "set" and arguments:
            variables[arguments[0]] = arguments[1:]
    moduleName = variables.get("MODULE_NAME", [""])[0]
    return {name: [value.replace("${MODULE_NAME}", moduleName) for value in values]
            for name, values in variables.items()}


def moduleFiles(pattern, under=MODULE_FOLDER):
    """Files of the module folder matching ``pattern``, relative to it, build artefacts excluded."""
    return {path.relative_to(MODULE_FOLDER).as_posix() for path in under.rglob(pattern)
            if path.is_file() and not IGNORED_PARTS & set(path.parts)
            and not any(part.endswith(".egg-info") for part in path.parts)}


def pngSize(path):
    """Width and height from a PNG file's IHDR chunk."""
    data = Path(path).read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def topCMake():
    return (REPOSITORY / "CMakeLists.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def moduleCMake():
    return (MODULE_FOLDER / "CMakeLists.txt").read_text(encoding="utf-8")


def test_module_cmakelists_lists_every_python_file_and_no_missing_one(moduleCMake):
    listed = cmakeVariables(moduleCMake)["MODULE_PYTHON_SCRIPTS"]
    # Python files under Resources/ (example scripts) ship as resources, checked below.
    onDisk = {path for path in moduleFiles("*.py") if not path.startswith("Resources/")}
    assert f"{MODULE_NAME}.py" in listed and f"{MODULE_NAME}Lib/__init__.py" in listed
    assert sorted(onDisk - set(listed)) == [], "add these to MODULE_PYTHON_SCRIPTS in DeepGMMSegment/CMakeLists.txt"
    assert sorted(set(listed) - onDisk) == [], "listed in MODULE_PYTHON_SCRIPTS but missing on disk"
    assert len(listed) == len(set(listed)), "a script is listed twice"


def test_module_cmakelists_lists_every_resource_and_no_missing_one(moduleCMake):
    listed = cmakeVariables(moduleCMake)["MODULE_PYTHON_RESOURCES"]
    onDisk = moduleFiles("*", MODULE_FOLDER / "Resources")
    assert {f"Resources/Icons/{MODULE_NAME}.png", f"Resources/UI/{MODULE_NAME}.ui"} <= set(listed)
    assert sorted(onDisk - set(listed)) == [], "add these to MODULE_PYTHON_RESOURCES in DeepGMMSegment/CMakeLists.txt"
    assert sorted(set(listed) - onDisk) == [], "listed in MODULE_PYTHON_RESOURCES but missing on disk"


def test_module_cmakelists_builds_scripted_module_with_tests(moduleCMake):
    commands = cmakeCommands(moduleCMake)
    assert ("set", ["MODULE_NAME", MODULE_NAME]) in commands
    build = [arguments for command, arguments in commands if command == "slicerMacroBuildScriptedModule"]
    assert len(build) == 1
    assert build[0][:2] == ["NAME", "${MODULE_NAME}"]
    assert {"SCRIPTS", "${MODULE_PYTHON_SCRIPTS}", "RESOURCES", "${MODULE_PYTHON_RESOURCES}",
            "WITH_GENERIC_TESTS"} <= set(build[0])
    assert ("slicer_add_python_unittest", ["SCRIPT", "${MODULE_NAME}.py"]) in commands
    assert ("add_subdirectory", ["Testing"]) in commands
    testing = cmakeCommands((MODULE_FOLDER / "Testing" / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert testing == [("add_subdirectory", ["Python"])]
    assert (MODULE_FOLDER / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_top_cmakelists_has_extension_metadata(topCMake):
    checkTopCMake(topCMake)


@pytest.mark.parametrize("old, new", [
    ('set(EXTENSION_DEPENDS "PyTorch")', 'set(EXTENSION_DEPENDS "NA")'),
    ('set(EXTENSION_CATEGORY "Segmentation")', 'set(EXTENSION_CATEGORY "Examples")'),
    ("project(DeepGMMSegment)", "project(SlicerDeepGMMSegment)"),
    ("add_subdirectory(DeepGMMSegment)", ""),
    ("include(${Slicer_EXTENSION_CPACK})", ""),
])
def test_top_cmakelists_check_catches_broken_metadata(topCMake, old, new):
    assert old in topCMake
    with pytest.raises(AssertionError):
        checkTopCMake(topCMake.replace(old, new))


def checkTopCMake(topCMake):
    """Assert the extension metadata and structure Slicer's extension build expects."""
    commands = cmakeCommands(topCMake)
    variables = cmakeVariables(topCMake)
    # ExtensionsIndex: the project name must equal the catalog entry's file name.
    assert ("project", [MODULE_NAME]) in commands
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                 "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert variables.get(name) and variables[name][0].strip(), f"{name} is not set"
    assert variables["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert "PyTorch" in variables["EXTENSION_DEPENDS"][0].split()
    assert variables["EXTENSION_HOMEPAGE"][0].startswith("https://")
    for url in [variables["EXTENSION_ICONURL"][0]] + variables["EXTENSION_SCREENSHOTURLS"][0].split():
        assert url.startswith("https://raw.githubusercontent.com/"), url
    order = [command for command, _ in commands if command in ("find_package", "include", "add_subdirectory")]
    assert order[:2] == ["find_package", "include"]
    assert ("find_package", ["Slicer", "REQUIRED"]) in commands
    assert ("include", ["${Slicer_USE_FILE}"]) in commands
    assert ("add_subdirectory", [MODULE_NAME]) in commands
    assert commands[-2:] == [("include", ["${Slicer_EXTENSION_GENERATE_CONFIG}"]),
                             ("include", ["${Slicer_EXTENSION_CPACK}"])]


def test_icon_and_screenshot_urls_point_at_files_in_this_repository(topCMake):
    """The raw URLs must resolve once the repository is published: the files exist at those paths."""
    variables = cmakeVariables(topCMake)
    for url in [variables["EXTENSION_ICONURL"][0]] + variables["EXTENSION_SCREENSHOTURLS"][0].split():
        relative = url.split("/main/", 1)[1]
        path = REPOSITORY / relative
        assert path.is_file(), f"{url} -> {relative} does not exist"
        pngSize(path)
    assert url.endswith(".png")


def test_icons_are_128_pixel_pngs():
    assert pngSize(REPOSITORY / f"{MODULE_NAME}.png") == (128, 128)
    assert pngSize(MODULE_FOLDER / "Resources" / "Icons" / f"{MODULE_NAME}.png") == (128, 128)


def test_extensions_index_entry_is_valid():
    checkCatalogEntry(json.loads((REPOSITORY / f"{MODULE_NAME}.json").read_text(encoding="utf-8")))


def prettierJsonText(entry):
    """The text the ExtensionsIndex lint accepts: prettier (2-space indent, final newline) with
    prettier-plugin-multiline-arrays at multilineArraysWrapThreshold 0, which wraps every non-empty
    array, one element per line (Slicer/ExtensionsIndex: .prettierrc.js, .pre-commit-config.yaml).
    For a flat entry like ours that is exactly json.dumps(indent=2)."""
    assert all(not isinstance(value, dict) for value in entry.values()), "nested objects need prettier itself"
    return json.dumps(entry, indent=2, ensure_ascii=False) + "\n"


def test_extensions_index_entry_is_formatted_as_the_index_lint_requires():
    text = (REPOSITORY / f"{MODULE_NAME}.json").read_text(encoding="utf-8")
    assert text == prettierJsonText(json.loads(text))
    # The check catches the one-line array the lint rewrites (audit D8).
    oneLine = text.replace('[\n    "PyTorch"\n  ]', '["PyTorch"]')
    assert oneLine != text and oneLine != prettierJsonText(json.loads(oneLine))


@pytest.mark.parametrize("change", [
    {"tier": "1"}, {"build_dependencies": []}, {"homepage": "https://x"}, {"category": "Utilities"},
    {"scm_url": "https://github.com/x/DeepGMMSegment.git"}, {"$schema": "v1.0.0"},
])
def test_catalog_entry_check_catches_invalid_entries(change):
    entry = json.loads((REPOSITORY / f"{MODULE_NAME}.json").read_text(encoding="utf-8"))
    with pytest.raises(AssertionError):
        checkCatalogEntry({**entry, **change})
    del entry["scm_url"]
    with pytest.raises(AssertionError):
        checkCatalogEntry(entry)


def checkCatalogEntry(entry):
    """Assert the ExtensionsIndex entry follows schema v1.0.1 and the index's rules."""
    assert SCHEMA_REQUIRED <= set(entry)
    assert set(entry) <= set(SCHEMA_PROPERTIES), f"not allowed by the schema: {set(entry) - set(SCHEMA_PROPERTIES)}"
    for key, value in entry.items():
        assert isinstance(value, SCHEMA_PROPERTIES[key]), f"{key} must be {SCHEMA_PROPERTIES[key].__name__}"
    assert entry["$schema"] == SCHEMA_URL
    assert entry["category"] == "Segmentation"
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_revision"] == "main"
    assert entry["tier"] == 1 and 1 <= entry["tier"] <= 5
    assert entry.get("build_subdirectory", ".") == "."  # not a superbuild
    # ExtensionsIndex rule: the repository name starts with "Slicer", the extension name does not.
    repositoryName = entry["scm_url"].rstrip("/").split("/")[-1].removesuffix(".git")
    assert repositoryName.startswith("Slicer") and not MODULE_NAME.startswith("Slicer")


def test_licence_is_apache_2_at_the_top():
    text = (REPOSITORY / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text


# ---------------------------------------------------------------------------------------------
# The checks catch what they are for


def test_forgotten_python_file_is_detected(tmp_path, moduleCMake):
    broken = moduleCMake.replace("  ${MODULE_NAME}Lib/slicer_adapter/panel.py\n", "")
    assert "Lib/slicer_adapter/panel.py" not in " ".join(cmakeVariables(broken)["MODULE_PYTHON_SCRIPTS"])
    assert f"{MODULE_NAME}Lib/slicer_adapter/panel.py" in (moduleFiles("*.py")
                                                           - set(cmakeVariables(broken)["MODULE_PYTHON_SCRIPTS"]))


def test_cmake_parser_reads_quoted_values_and_ignores_comments():
    text = ('set(EXTENSION_DESCRIPTION "Models (deepG, deepSVG) and EM")\n'
            '# set(EXTENSION_CATEGORY "Old")\nset(EXTENSION_CATEGORY "Segmentation") # trailing\n'
            'set(EXTENSION_HOMEPAGE "https://example.org/x#readme")\n'
            'set(MODULE_NAME X)\nset(LIST\n  ${MODULE_NAME}.py  # the module\n  ${MODULE_NAME}Lib/a.py\n  )\n')
    variables = cmakeVariables(text)
    assert variables["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert variables["EXTENSION_HOMEPAGE"] == ["https://example.org/x#readme"]
    assert variables["EXTENSION_DESCRIPTION"] == ["Models (deepG, deepSVG) and EM"]
    assert variables["LIST"] == ["X.py", "XLib/a.py"]
