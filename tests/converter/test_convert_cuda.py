"""--device cuda gives the same bytes as the CPU path (design.md: identical on every device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_pipeline import output_hashes

from converter.kernels import bnb4bit as kernels
from converter.writer.pipeline import convert


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and "cuda" in kernels.available_backends()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_ready(), reason="needs an NVIDIA GPU and the CUDA backend")
@pytest.mark.parametrize(("quant_type", "nested"), [("nf4", True), ("fp4", False)])
def test_cuda_conversion_equals_cpu(
    quant_type: str, nested: bool, tiny_llama_sharded: Path, tmp_path: Path
) -> None:
    opts = {"quant_type": quant_type, "double_quant": nested, "max_shard_size": "40KB", "progress": False}
    convert(tiny_llama_sharded, tmp_path / "cpu", device="cpu", **opts)
    convert(tiny_llama_sharded, tmp_path / "gpu", device="cuda", **opts)
    assert output_hashes(tmp_path / "gpu") == output_hashes(tmp_path / "cpu")


def test_cuda_device_falls_back_to_cpu_with_a_note(tiny_llama: Path, tmp_path: Path) -> None:
    if _cuda_ready():
        pytest.skip("this machine has the CUDA backend")
    gpu = convert(tiny_llama, tmp_path / "gpu", device="cuda", progress=False)
    convert(tiny_llama, tmp_path / "cpu", device="cpu", progress=False)
    assert len(gpu.notes) == 1
    assert gpu.notes[0].startswith("--device cuda: no usable CUDA backend, ")
    assert gpu.notes[0].endswith("; converting on the CPU (same bytes)")
    assert output_hashes(tmp_path / "gpu") == output_hashes(tmp_path / "cpu")


def test_unknown_device_refused(tiny_llama: Path, tmp_path: Path) -> None:
    from converter.errors import InputError

    with pytest.raises(InputError) as exc:
        convert(tiny_llama, tmp_path / "out", device="tpu", progress=False)
    assert str(exc.value) == "--device 'tpu' is not supported: use cpu or cuda"
    assert not (tmp_path / "out").exists()
