from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "selection"))

from tiny_models import make_tiny


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory):
    """tiny_src(name) -> folder of a random tiny checkpoint (made once per session)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_tiny(name, tmp_path_factory.mktemp(f"src-{name}"))
        return made[name]

    return get


@pytest.fixture(scope="session")
def minilm_src(minilm_model: Path) -> Path:
    return minilm_model
