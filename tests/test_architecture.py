"""The package's shape: no import circles (deferred imports included), no oversized module,
the public API importable from ``lgvq_plugins``, and docs/architecture.md naming every
module that exists — so the documented architecture cannot drift from the tree."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
#: source folders and the module names they are installed under (pyproject package-dir)
SOURCES = {"lgvq_plugins": "lgvq_plugins", "backbones": "lgvq_plugins.backbones",
           "tasks": "lgvq_plugins.tasks"}
MAX_LINES = 400
PUBLIC_API = ["hookimpl", "LanguageGuided", "save_pretrained", "from_pretrained", "Experiment"]


def _module_files() -> dict[str, Path]:
    """Module name → file, for every .py under the source folders (packages by __init__)."""
    modules: dict[str, Path] = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = _module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """Internal modules ``name`` imports, at any depth (inside functions too), plus
    ``importlib.import_module("literal")`` calls. ``from pkg import x`` counts as importing
    ``pkg.x`` when that is a module, else ``pkg``. The implicit import of a module's parent
    packages is not an edge (every module would otherwise depend on ``lgvq_plugins``)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if _is_package(name) else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.add(sub if sub in MODULES else source)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets.add(node.args[0].value)
    return {t for t in targets if t in MODULES and t != name}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if state[start]:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if state[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            if state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_import_graph_resolves_the_layout():
    graph = {name: _imports(name) for name in MODULES}
    # spot checks that resolution works: relative, from-package, deferred and backbones/ imports
    assert "lgvq_plugins.api" in graph["lgvq_plugins.guidance.model"]
    assert "lgvq_plugins.backbones.tokenizer_base" in graph["lgvq_plugins.backbones.vqgan"]
    assert "lgvq_plugins.interfaces" in graph["lgvq_plugins.backbones.vqgan"]
    assert "lgvq_plugins" not in graph["lgvq_plugins.backbones.vqgan"]


def test_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _find_cycle(graph) in (["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = {name: _imports(name) for name in MODULES}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


#: the plugin host and the contracts: the bottom layers of docs/architecture.md's diagram
CORE = {"hookspecs", "registry", "plugins", "api", "interfaces", "contracts", "adapters", "arguments",
        "config", "_version", "_source_layout"}


def test_the_core_names_no_component():
    """The host and the contracts import (transitively) nothing from text/, guidance/, data/,
    training/, evaluation/, backbones/ or tasks/: built-ins reach the host as plugins."""
    graph = {name: _imports(name) for name in MODULES}
    core = {f"lgvq_plugins.{name}" for name in CORE}
    assert core <= set(MODULES), sorted(core - set(MODULES))
    for name in sorted(core):
        seen, todo = set(), [name]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        assert seen <= core, f"{name} depends on {sorted(seen - core)}"


def test_internal_modules_never_import_the_package_itself():
    offenders = [name for name in MODULES
                 if name != "lgvq_plugins" and "lgvq_plugins" in _raw_targets(name)]
    assert offenders == [], f"import lgvq_plugins inside the package (use `from lgvq_plugins import api`): {offenders}"


def _raw_targets(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module == "lgvq_plugins":
            found.update("lgvq_plugins" for alias in node.names if f"lgvq_plugins.{alias.name}" not in MODULES)
    return found


def test_no_module_is_oversized():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
             for path in MODULES.values()}
    big = {path: n for path, n in sizes.items() if n > MAX_LINES}
    assert big == {}, f"modules over {MAX_LINES} lines (split them by concern): {big}"


@pytest.mark.parametrize("name", PUBLIC_API)
def test_public_api_importable_from_the_package(name):
    package = importlib.import_module("lgvq_plugins")
    assert callable(getattr(package, name)), name
    assert name in package.__all__


def test_registry_api_importable_from_the_package():
    package = importlib.import_module("lgvq_plugins")
    assert {"quantizer", "backbone", "text_encoder", "alignment_loss", "dataset", "task", "metric"} <= set(package.KINDS)
    for kind in package.KINDS:  # a kind added later is covered too
        plural = f"list_{kind}es" if kind.endswith("s") else f"list_{kind}s"
        for name in (f"create_{kind}", f"register_{kind}", plural):
            assert callable(getattr(package, name, None)), name
            assert name in package.__all__, name


def test_architecture_doc_names_every_module():
    """Each module under lgvq_plugins/ appears as its path (``guidance/model.py``, ``api.py``)
    and each subpackage as ``name/``."""
    named = DOC.read_text(encoding="utf-8")
    missing = []
    for name, path in MODULES.items():
        if not name.startswith("lgvq_plugins") or name.startswith(("lgvq_plugins.backbones", "lgvq_plugins.tasks")):
            continue
        rel = path.relative_to(ROOT / "lgvq_plugins")
        want = f"{rel.parent.as_posix()}/" if path.name == "__init__.py" else rel.as_posix()
        if want == "./":
            continue
        if not re.search(rf"(?<![\w.]){re.escape(want)}", named):
            missing.append(want)
    assert missing == [], f"docs/architecture.md does not name {missing}; add them to its module map"
