"""Streaming a checkpoint into device tensors (converter.loader.stream), exercised with CPU targets.

On a GPU, ``load_quantized(device="cuda")`` reads each shard once in chunks into staging buffers,
hashes those bytes and copies them into the final tensors. The same code runs here with CPU
destinations (``streams_to`` patched), so the chunking, the hash and the state rebuilt from it are
checked on every machine; tests/loader/test_loader_stream_cuda.py repeats the model checks on CUDA.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from converter import load_quantized
from converter.errors import CorruptFileError
from converter.loader import state as state_mod
from converter.loader import stream
from converter.loader.state import ChecksumMismatchError, load_quantized_state, shard_files
from converter.loader.stream import StreamStats, mapped_files, stream_state
from formats.reader import open_checkpoint

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def _open(folder: Path):
    checkpoint = open_checkpoint(shard_files(folder)[0])
    return checkpoint, checkpoint.records()


@pytest.fixture
def counted_reads(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[tuple[int, int]]]:
    """Every (offset, length) the stream reads, per file descriptor (a counting os.preadv)."""
    reads: dict[int, list[tuple[int, int]]] = {}
    real = os.preadv

    def preadv(fd: int, buffers, offset: int) -> int:
        got = real(fd, buffers, offset)
        reads.setdefault(fd, []).append((offset, got))
        return got

    monkeypatch.setattr(stream.os, "preadv", preadv)
    return reads


@pytest.mark.parametrize("chunk", [4096, 1 << 20], ids=["tensors-across-chunks", "one-chunk"])
def test_stream_copies_every_tensor_and_reads_each_byte_once(
    our_folder: Path, chunk: int, counted_reads: dict
) -> None:
    checkpoint, state = _open(our_folder)
    stats = StreamStats()
    files = mapped_files(checkpoint.shards)
    out = stream_state(state, files, "cpu", hash_files=True, chunk_bytes=chunk, slots=3, stats=stats)
    assert out.keys() == state.keys()
    for key in state:
        before, after = stream._tensors_of(state[key]), stream._tensors_of(out[key])
        assert type(out[key]) is type(state[key])
        assert len(before) == len(after) > 0
        for a, b in zip(before, after, strict=True):
            assert (a.dtype, a.shape) == (b.dtype, b.shape), key
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), key
            assert stream._locate(b, files) is None  # a copy, not a view of the mapping
    assert stats.moved_tensors == 0  # every tensor of our checkpoint came through the staging buffers
    # Each file read exactly once, every byte: the reads tile [0, size) without overlap.
    assert len(counted_reads) == len(files) > 1
    for f in files:
        assert stats.bytes_read[f.path] == f.size
        assert stats.sha256[f.path] == hashlib.sha256(f.path.read_bytes()).hexdigest()
    for spans in counted_reads.values():
        spans = sorted(spans)
        assert spans[0][0] == 0
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(spans))
    assert sorted(sum(n for _, n in s) for s in counted_reads.values()) == sorted(f.size for f in files)


def test_stream_without_hash_reads_no_byte_twice(our_folder: Path, counted_reads: dict) -> None:
    checkpoint, state = _open(our_folder)
    files = mapped_files(checkpoint.shards)
    out = stream_state(state, files, "cpu", chunk_bytes=4096, slots=2)
    assert torch.equal(out["model.norm.weight"], state["model.norm.weight"])
    for spans in counted_reads.values():
        covered = [set(range(a, a + n)) for a, n in spans]
        assert sum(len(c) for c in covered) == len(set().union(*covered))  # no byte read twice
    assert sum(n for s in counted_reads.values() for _, n in s) <= sum(f.size for f in files)


def test_tensors_outside_the_mapping_are_moved_as_they_are(our_folder: Path) -> None:
    checkpoint, state = _open(our_folder)
    extra = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # not a shard view, not contiguous
    state = {**state, "extra": extra}
    stats = StreamStats()
    out = stream_state(state, mapped_files(checkpoint.shards), "cpu", stats=stats)
    assert stats.moved_tensors == 1
    assert torch.equal(out["extra"], extra)


@pytest.fixture
def streamed_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_quantized(device="cpu") takes the device path (stream into fresh CPU tensors)."""
    monkeypatch.setattr(state_mod, "streams_to", lambda device: True)


def test_streamed_model_equals_the_mapped_one(our_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mapped = load_quantized(our_folder)
    monkeypatch.setattr(state_mod, "streams_to", lambda device: True)
    streamed = load_quantized(our_folder)
    a, b = mapped.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(mapped(IDS).logits, streamed(IDS).logits)  # same bytes, same kernels


def _flip_a_data_byte(folder: Path) -> Path:
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")
    data[data_start + 10] ^= 0x01  # a byte of the first tensor: the file still parses
    shard.write_bytes(bytes(data))
    return shard


def test_streamed_verify_catches_a_flipped_byte_from_its_own_reads(
    our_folder: Path, tmp_path: Path, streamed_on_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(our_folder, folder)
    shard = _flip_a_data_byte(folder)

    def no_second_pass(*args, **kwargs):
        msg = "the streamed load must not hash the shards in a separate pass"
        raise AssertionError(msg)

    monkeypatch.setattr(state_mod, "verify_folder", no_second_pass)
    with pytest.raises(ChecksumMismatchError, match=re.escape(shard.name)) as info:
        load_quantized(folder)
    assert "verify=False" in str(info.value)
    assert isinstance(load_quantized_state(folder, verify=False, device="cpu"), dict)
    load_quantized(folder, verify=False)  # skipping the check loads the changed shard


def test_streamed_verify_catches_a_truncated_shard(
    our_folder: Path, tmp_path: Path, streamed_on_cpu: None
) -> None:
    folder = tmp_path / "short"
    shutil.copytree(our_folder, folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    with open(shard, "ab") as f:  # one byte more: the size in the index no longer matches
        f.write(b"\0")
    with pytest.raises(ChecksumMismatchError, match=re.escape(shard.name)):
        load_quantized(folder)


def test_streamed_verify_names_a_corrupt_header_as_a_checksum_mismatch(
    our_folder: Path, tmp_path: Path, streamed_on_cpu: None
) -> None:
    folder = tmp_path / "header"
    shutil.copytree(our_folder, folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8] = 0xFF  # the header's first byte: not JSON any more, the shard does not even parse
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=re.escape(shard.name)):
        load_quantized(folder)
    with pytest.raises(CorruptFileError, match=re.escape(shard.name)):
        load_quantized(folder, verify=False)
