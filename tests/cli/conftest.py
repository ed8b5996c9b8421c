from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "converter"))
from qm_checkpoints import make_tiny_llama


class Run:
    """The CLI under CliRunner with catch_exceptions=False: a crash fails the test, not exit code 1."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str):
        from converter.cli import cli

        return self.runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def qm() -> Run:
    return Run()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("cli-src") / "tiny-llama")
