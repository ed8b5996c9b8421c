from __future__ import annotations

from pathlib import Path

import pytest
from qm_checkpoints import make_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Single-file bf16 tiny Llama (read-only: copy it before changing it)."""
    return make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model saved in several shards with model.safetensors.index.json."""
    return make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-llama-sharded", max_shard_size="60KB")
