"""Fixtures of the MoE tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from moe_helpers import make_moe

from converter.loader.dequantize import dequantize_checkpoint
from converter.writer.pipeline import convert


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory):
    """folders(name) -> (quantized folder, its dequantized bf16 folder), made once per session."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            root = tmp_path_factory.mktemp(f"moe-load-{name}")
            src = make_moe(name, root / "src")
            convert(src, root / "q", moe_experts="quantize", progress=False)
            dequantize_checkpoint(root / "q", root / "plain")
            made[name] = (root / "q", root / "plain")
        return made[name]

    return get
