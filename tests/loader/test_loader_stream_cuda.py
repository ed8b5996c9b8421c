"""``load_quantized(device="cuda")`` streams the shards into CUDA tensors (converter.loader.stream).

Checked against the CPU load moved with ``.to("cuda")``: the same bytes in every tensor (4-bit codes,
absmax, maps, nested offset, int8 codes and SCB), the same logits bit for bit (same bytes, same
kernels), no CPU tensor left, no extra GPU copy, and verify still catching a changed byte.
Needs an NVIDIA GPU (skipped otherwise).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from converter import load_quantized
from converter.loader import warmup
from converter.loader.footprint import module_tensors
from converter.loader.module import QuantLinear4bit
from converter.loader.state import ChecksumMismatchError

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def _assert_same_model(streamed: torch.nn.Module, moved: torch.nn.Module) -> None:
    # state_dict() holds every 4-bit layer's codes, absmax, maps and quant-state blob (nested offset
    # inside), and every int8 layer's codes and SCB.
    a, b = streamed.state_dict(), moved.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        # weight_format: the 0-d int8 format tag that state_dict() makes afresh on the CPU, as bnb's
        # Linear8bitLt does (torch.tensor(0, dtype=torch.uint8)); every tensor the layers hold is on the GPU.
        assert a[name].device.type == "cuda" or name.endswith(".weight_format"), name
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].cpu(), b[name].cpu()), name
    with torch.no_grad():
        ids = IDS.cuda()
        assert torch.equal(streamed(ids).logits, moved(ids).logits)


def _allocation_sites(snapshot: dict) -> str:
    """Bytes of the live allocations of a memory-history snapshot, by the first frame of ours or of
    transformers that made them (what the bound below is failed by, when it is)."""
    sites: dict[str, int] = {}
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = [f for f in block.get("frames", []) if "/converter/" in f["filename"]]
            frames = frames or [f for f in block.get("frames", []) if "transformers" in f["filename"]]
            site = f"{Path(frames[0]['filename']).name}:{frames[0]['line']}" if frames else "?"
            sites[site] = sites.get(site, 0) + block["size"]
    return ", ".join(f"{k} {v}" for k, v in sorted(sites.items(), key=lambda kv: -kv[1]))


@pytest.mark.parametrize("warm", ["0", "1"], ids=["warmup-off", "warmup-on"])
def test_cuda_load_streams_the_same_model(
    our_folder: Path, warm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cuBLAS workspaces (torch keeps one per handle and stream) are not the load's tensors: the load's
    # warm-up thread does matmuls (loader/warmup.py), so they are freed on both sides of the count.
    monkeypatch.setenv(warmup.ENV, warm)
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        streamed = load_quantized(our_folder, device="cuda")
        torch._C._cuda_clearCublasWorkspaces()
        held = torch.cuda.memory_allocated() - base
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    # No second GPU copy: what is allocated is what the model holds (codes, absmax, maps, offsets,
    # norms, embeddings), each tensor rounded up to the caching allocator's 512-byte granule.
    sizes = [size for _, _, size in module_tensors(streamed)]
    count = len(streamed.state_dict()) + sum(isinstance(m, QuantLinear4bit) for m in streamed.modules())
    bound = sum(sizes) + 512 * count
    assert held <= bound, f"held {held} > {bound}; live allocations by site: {_allocation_sites(snapshot)}"
    moved = load_quantized(our_folder).to("cuda")
    _assert_same_model(streamed, moved)


def test_cuda_load_int8_folder(plain_llama: Path, tmp_path: Path) -> None:
    from converter.writer.pipeline import convert

    folder = convert(plain_llama, tmp_path / "int8", quant_type="int8", progress=False).output
    _assert_same_model(load_quantized(folder, device="cuda"), load_quantized(folder).to("cuda"))


def test_cuda_verify_catches_a_flipped_byte(our_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(our_folder, folder)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 10] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=re.escape(shard.name)):
        load_quantized(folder, device="cuda")
    assert next(load_quantized(folder, device="cuda", verify=False).parameters()).is_cuda


def test_cuda_verify_by_chunk_digests_names_the_chunk(chunked_folder: Path, tmp_path: Path) -> None:
    # chunked_folder: 4 KiB chunk digests, hashed by the stream's readers from the pinned staging.
    _assert_same_model(
        load_quantized(chunked_folder, device="cuda"), load_quantized(chunked_folder).to("cuda")
    )
    folder = tmp_path / "corrupt"
    shutil.copytree(chunked_folder, folder)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    offset = 8 + int.from_bytes(data[:8], "little") + 10  # a byte of the first tensor
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    k = offset // 4096
    with pytest.raises(ChecksumMismatchError, match=rf"{re.escape(shard.name)}: xxh3_128 of chunk {k} "):
        load_quantized(folder, device="cuda")
    with pytest.raises(ChecksumMismatchError, match=rf"{re.escape(shard.name)}: sha256 of chunk {k} "):
        load_quantized(folder, device="cuda", verify="sha256")
