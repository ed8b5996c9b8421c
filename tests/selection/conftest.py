from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import make_tiny


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(name) -> folder of a random tiny checkpoint (made once per session)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_tiny(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return made[name]

    return get


@pytest.fixture(scope="session")
def minilm(minilm_model: Path) -> Path:
    return minilm_model
