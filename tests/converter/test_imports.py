"""Every module imports, and every `from converter/formats ... import name` names something that exists.

CUDA-only modules (kernels_cuda, kernels_int8_cuda, ...) and imports inside functions are reached on a
GPU alone, so a name moved by a refactor would only fail there; this test finds it on any machine.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import converter
import formats

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (converter, formats)


# Modules that exist for sure: a module list without them was built from the wrong folder (in the
# editable install, `converter.__path__[0]` is the site-packages folder that holds only _kernels*.so).
KNOWN = {"converter", "converter.loader.model", "converter.writer.pipeline", "formats", "formats.reader"}


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        names += [pkg.__name__] + [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return sorted(names)


def test_module_lists_cover_the_source_tree() -> None:
    """The lists the other tests walk hold every source module, so none of them passes on an empty list."""
    source = set(_module_files())
    assert KNOWN <= source, f"not found under {ROOT}: {sorted(KNOWN - source)}"
    assert sorted(source - set(_modules())) == []


@pytest.mark.parametrize("name", _modules())
def test_module_imports(name: str) -> None:
    importlib.import_module(name)


def _project_imports() -> list[tuple[str, int, str, str]]:
    """(file, line, module, name) of every absolute `from converter|formats... import name`, at any depth."""
    found = []
    for folder in ("converter", "formats", "bench", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                    continue
                if node.module.split(".")[0] not in ("converter", "formats"):
                    continue
                for alias in node.names:
                    if alias.name != "*":
                        found.append((str(path.relative_to(ROOT)), node.lineno, node.module, alias.name))
    return found


def test_every_imported_name_exists() -> None:
    missing = []
    for path, line, module, name in _project_imports():
        mod = importlib.import_module(module)
        if hasattr(mod, name):
            continue
        try:  # `from package import submodule`
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            missing.append(f"{path}:{line}: from {module} import {name}")
    assert not missing, "names that no longer exist:\n" + "\n".join(missing)


def _module_files() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages (a package is its __init__).

    Read from the source tree, not `pkg.__path__[0]`: in the editable install that is the
    site-packages folder holding only the compiled _kernels*.so, which would leave the graph empty."""
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg.__name__).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports, at any depth (function-level imports count: they run
    the first time the function does), except under ``if TYPE_CHECKING`` (never run). An import of
    an ancestor package is no edge: Python initializes it before the importer anyway."""
    mods = _module_files()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str | None] = []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.append(full if full in mods else resolve(node.module))
            elif isinstance(node, ast.Import):
                targets += [resolve(alias.name) for alias in node.names]
            for t in targets:
                if t and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    """No two modules import each other, directly or around a loop, not even lazily inside a function
    (a lazy import hides a loop until the first call; move the shared part into a module of its own)."""
    graph = _import_graph()
    assert KNOWN <= set(graph), f"the import graph misses {sorted(KNOWN - set(graph))}"
    cycles = _cycles(graph)
    detail = [
        " <-> ".join(c) + ": " + ", ".join(f"{a}->{b}" for a in c for b in sorted(graph[a]) if b in c)
        for c in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_the_cycle_check_finds_a_lazy_loop() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
