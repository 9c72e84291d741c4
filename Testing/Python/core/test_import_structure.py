"""The package's imports run one way: no import cycle, no private name (``_x``) used across files.

The imports are read from the source with ``ast`` (nothing is imported), at every level: an import
inside a function is a dependency too, it only happens later. ``from . import segment`` depends on
the file the package's lazy ``__init__`` takes ``segment`` from (its ``_LAZY`` table).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PACKAGES = {"DeepGMMSegmentLib": REPO / "DeepGMMSegment" / "DeepGMMSegmentLib", "evaluation": REPO / "evaluation"}


def _modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (sub-packages included)."""
    root = PACKAGES[package]
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = (package,) + path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _lazy_table(init: Path, package: str) -> dict[str, str]:
    """The lazy ``__init__``'s ``_LAZY = {"name": "module", ...}``: public name -> module."""
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in targets):
                return {ast.literal_eval(k): f"{package}.{ast.literal_eval(v)}"
                        for k, v in zip(node.value.keys, node.value.values)}
    return {}


def _base(module: str, path: Path, level: int, target: str | None) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if level == 0:
        return target or ""
    parts = module.split(".")
    if path.name != "__init__.py":
        parts = parts[:-1]  # a module's package
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


def _imports(package: str):
    """Yield (importer, imported module, imported names) for every import statement of the package."""
    modules = _modules(package)
    lazy = _lazy_table(PACKAGES[package] / "__init__.py", package)
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        yield module, alias.name, []
            elif isinstance(node, ast.ImportFrom):
                base = _base(module, path, node.level, node.module)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in modules:
                        yield module, submodule, []
                    elif base in modules:
                        target = lazy.get(alias.name, base) if base == package else base
                        yield module, target, [alias.name]


def _graph(package: str) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in _modules(package)}
    for importer, imported, _ in _imports(package):
        if imported != importer:
            graph[importer].add(imported)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle(package):
    cycles = _cycles(_graph(package))
    assert not cycles, "import cycles (each line: modules that import each other, directly or not):\n" + \
        "\n".join(" <-> ".join(group) for group in cycles)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_private_name_is_imported_across_files(package):
    leaks = [f"{importer} imports {name} from {imported}"
             for importer, imported, names in _imports(package) for name in names
             if name.startswith("_") and not name.startswith("__") and imported != importer]
    assert not leaks, "make these names public (no leading underscore) or keep them in their file:\n" + \
        "\n".join(leaks)


def test_the_walker_sees_cycles_and_function_level_imports(tmp_path, monkeypatch):
    """The checks above would fail on the cycles issue 13 removed (a function-level import counts)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "__init__.py").write_text('_LAZY = {"segment": "engine"}\n')
    (lib / "engine.py").write_text("def run():\n    from .training import predict\n")
    (lib / "training.py").write_text("from . import segment\nfrom .cli import _load_inputs\n")
    (lib / "cli.py").write_text("X = 1\n")
    monkeypatch.setitem(PACKAGES, "lib", lib)
    assert _cycles(_graph("lib")) == [["lib.engine", "lib.training"]]
    leaks = [(i, n) for i, _, names in _imports("lib") for n in names if n.startswith("_")]
    assert leaks == [("lib.training", "_load_inputs")]


# ----------------------------------------------------------------------------- layer direction

LIB = "DeepGMMSegmentLib"
#: The numerics.
CORE = ("core",)
#: Modules of each layer (prefixes below ``DeepGMMSegmentLib.``) and what they must never import.
FORBIDDEN = {
    ("options", "result"): ("core", "trained", "engine", "cli", "slicer_adapter", "logic"),
    CORE: ("trained", "engine", "cli", "slicer_adapter", "logic"),
    ("trained",): ("engine", "cli", "slicer_adapter", "logic"),
    ("engine",): ("cli", "slicer_adapter", "logic"),
    ("cli",): ("slicer_adapter", "logic"),
    ("slicer_adapter",): ("cli",),
}
#: Third-party modules the torch-free vocabulary must not load (numpy is allowed: Slicer ships it).
HEAVY = ("torch", "SimpleITK", "slicer", "vtk", "qt", "ctk", "scipy", "sklearn")


def _under(module: str, prefixes) -> bool:
    return any(module == f"{LIB}.{p}" or module.startswith(f"{LIB}.{p}.") for p in prefixes)


def _layer_violations(package: str = LIB) -> list[str]:
    violations = []
    for importer, imported, _ in _imports(package):
        for layer, forbidden in FORBIDDEN.items():
            if _under(importer, layer) and _under(imported, forbidden):
                violations.append(f"{importer} imports {imported}")
    return sorted(set(violations))


def _third_party_imports(package: str):
    """Yield (module, top-level name) for every absolute import of something outside the package."""
    for module, path in _modules(package).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield module, alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield module, node.module.split(".")[0]


def test_layers_import_downwards_only():
    violations = _layer_violations()
    assert not violations, "imports against the layer direction (docs/architecture.md):\n" + "\n".join(violations)


def test_vocabulary_is_torch_free():
    heavy = sorted({f"{module} imports {name}" for module, name in _third_party_imports(LIB)
                    if module in (f"{LIB}.options", f"{LIB}.result") and name in HEAVY})
    assert not heavy, "options.py and result.py must load without torch, SimpleITK or Slicer:\n" + "\n".join(heavy)


def test_core_never_loads_slicer_or_file_io():
    """The numerics run with numpy and torch alone (pytest on CPU, the worker, the command line)."""
    outside = ("SimpleITK", "slicer", "vtk", "qt", "ctk", "tqdm")
    found = sorted({f"{module} imports {name}" for module, name in _third_party_imports(LIB)
                    if _under(module, CORE) and name in outside})
    assert not found, "core/ must not load Slicer, VTK, Qt or file I/O:\n" + "\n".join(found)


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The direction check would fail if the adapter imported the command line."""
    lib = tmp_path / LIB
    (lib / "slicer_adapter").mkdir(parents=True)
    (lib / "cli").mkdir()
    (lib / "__init__.py").write_text("")
    (lib / "cli" / "__init__.py").write_text("")
    (lib / "cli" / "preview.py").write_text("X = 1\n")
    (lib / "slicer_adapter" / "__init__.py").write_text("")
    (lib / "slicer_adapter" / "outputs.py").write_text("def colors():\n    from ..cli.preview import X\n")
    monkeypatch.setitem(PACKAGES, LIB, lib)
    assert _layer_violations() == [f"{LIB}.slicer_adapter.outputs imports {LIB}.cli.preview"]


def test_segment_runs_without_scipy():
    """scipy serves one seeded case only (core/seeds.py imports it there): a plain run never loads it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['scipy'] = None\n"  # any import of scipy now fails
        "import numpy as np\n"
        "from DeepGMMSegmentLib import segment\n"
        "image = np.repeat([0.0, 1.0, 2.0], 10)[None, :].repeat(8, 0) + np.random.default_rng(0).normal(0, .1, (8, 30))\n"
        "print(segment(image, 3, method='em-gmm', device='cpu').labels.max())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[3] / "DeepGMMSegment")
    assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr[-2000:]
