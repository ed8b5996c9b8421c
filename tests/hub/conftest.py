"""Fixtures for the fake-Hub tests: a running FakeHub, and huggingface_hub pointed at it.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET into
``huggingface_hub.constants`` at import time, so in-process tests patch both the environment (for
subprocesses and code that reads it late) and the constants.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_hub import FakeHub
from hub_helpers import hub_env, make_checkpoint


@pytest.fixture
def fake_hub(tmp_path: Path) -> Iterator[FakeHub]:
    with FakeHub(tmp_path / "fake-hub-store") as hub:
        yield hub


@pytest.fixture
def hf_home(tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub in this process talks to ``fake_hub`` with an empty HF_HOME in tmp_path."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for k, v in hub_env(fake_hub, home).items():
        if k.startswith("HF_") or k == "TORCHDYNAMO_DISABLE":
            monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        fake_hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 5)
    return home


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-shard tiny checkpoint (read-only)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", shards=3)
