from __future__ import annotations

from pathlib import Path

import pytest
from loader_helpers import bnb_quantize_folder, save_tiny_llama


@pytest.fixture(scope="session")
def plain_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bf16 Llama checkpoint (read-only)."""
    return save_tiny_llama(tmp_path_factory.mktemp("loader") / "plain")


@pytest.fixture(scope="session", params=[("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)],
                ids=lambda p: f"{p[0]}-{'nested' if p[1] else 'flat'}")  # fmt: skip
def bnb_folder(
    request: pytest.FixtureRequest, plain_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny Llama quantized on load by transformers + bitsandbytes (CPU) and saved (read-only)."""
    quant_type, nested = request.param
    dst = tmp_path_factory.mktemp("loader") / f"bnb-{quant_type}-{nested}"
    return bnb_quantize_folder(plain_llama, dst, quant_type=quant_type, nested=nested)


@pytest.fixture(scope="session")
def bnb_nf4(plain_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bnb_quantize_folder(plain_llama, tmp_path_factory.mktemp("loader") / "bnb-nf4")


@pytest.fixture(scope="session")
def our_folder(plain_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama converted by our pipeline, in several shards with an index (read-only)."""
    from converter.writer.pipeline import convert

    dst = tmp_path_factory.mktemp("loader") / "ours"
    convert(plain_llama, dst, progress=False, max_shard_size="60KB", compute_dtype="bfloat16")
    return dst


@pytest.fixture(scope="session")
def int8_folder(plain_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama converted to LLM.int8 by our pipeline (read-only)."""
    from converter.writer.pipeline import convert

    out = tmp_path_factory.mktemp("loader") / "int8"
    convert(plain_llama, out, quant_type="int8", progress=False)
    return out


@pytest.fixture(scope="session")
def chunked_folder(plain_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``our_folder`` converted with 4 KiB chunk digests (formats/chunks.py), so that every shard has
    many chunks (read-only)."""
    from converter.writer.pipeline import convert

    dst = tmp_path_factory.mktemp("loader") / "chunked"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("formats.chunks.CHUNK_BYTES", 4096)
        convert(plain_llama, dst, progress=False, max_shard_size="60KB", compute_dtype="bfloat16")
    return dst


@pytest.fixture(scope="session")
def other_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``our_folder``'s model with other random weights (seed 1), converted the same way (read-only)."""
    from converter.writer.pipeline import convert

    root = tmp_path_factory.mktemp("loader")
    dst = root / "other"
    convert(save_tiny_llama(root / "plain-other", seed=1), dst, progress=False, compute_dtype="bfloat16")
    return dst
