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


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return sorted(names)


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
