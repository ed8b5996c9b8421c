"""``convert --device cuda`` imports no torch: the CUDA path quantizes numpy buffers through the extension.

On a GPU machine the conversion runs on the GPU (the report's ``timings.device`` says which); without
one it falls back to the CPU with a note. Either way the fresh interpreter must not import torch, and
the shards must be the CPU path's bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from test_torch_free import probe

from converter.quantize import cuda_host


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "quantization_report.json"
    }


def test_cuda_conversion_imports_no_torch(tiny_checkpoint, tmp_path: Path) -> None:
    src = str(tiny_checkpoint("llama_tied"))
    probe("convert", src, str(tmp_path / "cpu"), "-q")  # also fills the selection cache if needed
    got = probe("convert", src, str(tmp_path / "gpu"), "--device", "cuda", "-q")
    assert got["heavy"] == []
    timings = json.loads((tmp_path / "gpu" / "quantization_report.json").read_text())["timings"]
    if cuda_host.cuda_status()[0]:
        assert timings["device"]["device"] == "cuda:0"  # quantized on the GPU, not the fallback
        assert timings["device"]["tensors"] > 0
    else:
        assert "device" not in timings
    assert _hashes(tmp_path / "gpu") == _hashes(tmp_path / "cpu")
