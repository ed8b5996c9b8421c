"""Streaming a checkpoint into device tensors (converter.loader.stream), exercised with CPU targets.

On a GPU, ``load_quantized(device="cuda")`` reads each shard once in chunks into staging buffers,
hashes those bytes and copies them into the final tensors. The same code runs here with CPU
destinations (``streams_to`` patched), so the chunking, the hash and the state rebuilt from it are
checked on every machine; tests/loader/test_loader_stream_cuda.py repeats the model checks on CUDA.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

from converter import load_quantized
from converter.errors import CorruptFileError
from converter.loader import model as model_mod
from converter.loader import state as state_mod
from converter.loader import stream
from converter.loader.state import ChecksumMismatchError, load_quantized_state, shard_files
from converter.loader.stream import StreamStats, mapped_files, stream_state
from formats.index import Verification
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


def _tensor_ranges(state: dict, files: list) -> dict[int, set[tuple[int, int]]]:
    """File index -> the (offset, end) of every tensor of ``state`` that is a view of that file."""
    out: dict[int, set[tuple[int, int]]] = {}
    for value in state.values():
        for t in stream._tensors_of(value):
            where = stream._locate(t, files)
            if where is not None:
                out.setdefault(where[0], set()).add((where[1], where[1] + t.numel() * t.element_size()))
    return out


@pytest.mark.parametrize("chunk", [4096, 1 << 20], ids=["tensors-across-chunks", "one-chunk"])
def test_stream_copies_every_tensor_reading_each_byte_once(
    our_folder: Path, chunk: int, counted_reads: dict
) -> None:
    checkpoint, state = _open(our_folder)
    stats = StreamStats()
    files = mapped_files(checkpoint.shards)
    out = stream_state(state, files, "cpu", chunk_bytes=chunk, slots=3, stats=stats)
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
    # One descriptor per file; its reads never overlap (no byte read twice) and, run together,
    # they cover every byte of every tensor of that file.
    assert len(counted_reads) == len(files) > 1
    reads = [sorted(spans) for spans in counted_reads.values()]
    for spans in reads:
        assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans))
    for i, tensors in _tensor_ranges(state, files).items():
        spans = next(s for s in reads if sum(n for _, n in s) == stats.bytes_read[files[i].path])
        covered = set()
        for a, n in spans:
            covered.update(range(a, a + n))
        assert all(set(range(lo, hi)) <= covered for lo, hi in tensors), files[i].path
        assert stats.bytes_read[files[i].path] <= files[i].size


def test_tensors_outside_the_mapping_are_moved_as_they_are(our_folder: Path) -> None:
    checkpoint, state = _open(our_folder)
    extra = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # not a shard view, not contiguous
    state = {**state, "extra": extra}
    stats = StreamStats()
    out = stream_state(state, mapped_files(checkpoint.shards), "cpu", stats=stats)
    assert stats.moved_tensors == 1
    assert torch.equal(out["extra"], extra)


def _reader_threads() -> int:
    return sum(t.name.startswith("ThreadPoolExecutor") and t.is_alive() for t in threading.enumerate())


def test_while_reading_runs_on_the_caller_beside_the_readers(our_folder: Path) -> None:
    """A streamed load builds the model class while the readers stream (load_quantized's EarlyBuild):
    the callback runs once, on the calling thread, with the readers started; the result is unchanged."""
    checkpoint, state = _open(our_folder)
    files = mapped_files(checkpoint.shards)
    seen: list[tuple[bool, int]] = []
    before = _reader_threads()

    def during() -> None:
        seen.append((threading.current_thread() is threading.main_thread(), _reader_threads() - before))

    out = stream_state(state, files, "cpu", readers=2, while_reading=during)
    # Once, on the calling thread, with reader threads started. Not "2": the executor starts its threads
    # lazily, one per submit unless one is idle, so a first reader that already read this small folder
    # (a loaded machine can pause the caller between the two submits) serves the second job itself.
    assert len(seen) == 1
    on_caller, readers = seen[0]
    assert on_caller
    assert 1 <= readers <= 2
    plain = stream_state(state, files, "cpu", readers=2)
    for key in state:
        pairs = zip(stream._tensors_of(out[key]), stream._tensors_of(plain[key]), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs), key


def test_an_error_while_reading_is_raised_once_the_readers_ended(our_folder: Path) -> None:
    checkpoint, state = _open(our_folder)
    before = _reader_threads()

    def boom() -> None:
        msg = "built wrong"
        raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="built wrong"):
        stream_state(state, mapped_files(checkpoint.shards), "cpu", readers=2, while_reading=boom)
    assert _reader_threads() == before, "no reader left running with its buffers"


def test_a_streamed_load_builds_the_model_once_while_reading(
    our_folder: Path, streamed_on_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = model_mod.build_model

    def counted(*args, **kwargs):
        calls.append(_reader_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(model_mod, "build_model", counted)
    load_quantized(our_folder)
    assert len(calls) == 1, "built once"
    assert calls[0] > 0, "while the readers ran"


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


def test_streamed_verify_catches_a_flipped_byte_hashed_during_the_read(
    our_folder: Path, tmp_path: Path, streamed_on_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(our_folder, folder)
    shard = _flip_a_data_byte(folder)
    events: list[str] = []
    real_start, real_stream, real_finish = state_mod.start_verify, stream.stream_state, Verification.__call__

    def start_verify(*args, **kwargs):
        pending = real_start(*args, **kwargs)
        events.append("hashing started")
        return pending

    def finish(self: Verification) -> list[str]:
        events.append("hashes awaited")
        return real_finish(self)

    def stream_state(*args, **kwargs):
        events.append("stream")
        return real_stream(*args, **kwargs)

    real_build = model_mod.build_skeleton

    def build_skeleton(*args, **kwargs):
        events.append("build")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(state_mod, "start_verify", start_verify)
    monkeypatch.setattr(Verification, "__call__", finish)
    monkeypatch.setattr(stream, "stream_state", stream_state)
    monkeypatch.setattr(model_mod, "build_skeleton", build_skeleton)
    with pytest.raises(ChecksumMismatchError, match=re.escape(shard.name)) as info:
        load_quantized(folder)
    assert "verify=False" in str(info.value)
    # The hashes run on their threads (and the stream's readers) while the shards are parsed and
    # copied and the model is built, and are awaited before anything is returned.
    assert events == ["hashing started", "stream", "build", "hashes awaited"]
    assert isinstance(load_quantized_state(folder, verify=False, device="cpu"), dict)
    load_quantized(folder, verify=False)  # skipping the check loads the changed shard


def _append_a_byte(data: bytearray) -> None:
    data.append(0)  # one byte more: the size in the index no longer matches


def _break_the_header(data: bytearray) -> None:
    data[8] = 0xFF  # the header's first byte: not JSON any more, the shard does not even parse


@pytest.mark.parametrize("damage", [_append_a_byte, _break_the_header], ids=["truncated", "header"])
def test_streamed_verify_names_a_shard_that_does_not_parse_as_a_checksum_mismatch(
    our_folder: Path, tmp_path: Path, streamed_on_cpu: None, damage
) -> None:
    folder = tmp_path / "damaged"
    shutil.copytree(our_folder, folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    damage(data)
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=re.escape(shard.name)):
        load_quantized(folder)
    if damage is _break_the_header:
        with pytest.raises(CorruptFileError, match=re.escape(shard.name)):
            load_quantized(folder, verify=False)


def test_a_read_that_comes_up_short_names_the_file_and_stops_every_reader(
    our_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file shrank after its header was parsed: the reader that meets the end names the file, the
    # other readers stop at their next chunk, and the error reaches the caller (no hang, no partial state).
    checkpoint, state = _open(our_folder)
    files = mapped_files(checkpoint.shards)
    real_open, real_preadv = os.open, os.preadv
    short: set[int] = set()  # descriptors of the shrunk file
    calls: list[int] = []

    def open_(path, flags: int, *args) -> int:
        fd = real_open(path, flags, *args)
        if Path(path) == files[-1].path:
            short.add(fd)
        return fd

    def preadv(fd: int, buffers, offset: int) -> int:
        calls.append(fd)
        return 0 if fd in short else real_preadv(fd, buffers, offset)  # 0: end of file

    monkeypatch.setattr(stream.os, "open", open_)
    monkeypatch.setattr(stream.os, "preadv", preadv)
    with pytest.raises(CorruptFileError, match=re.escape(str(files[-1].path))):
        stream_state(state, files, "cpu", chunk_bytes=4096, slots=4, readers=2)
    assert len(calls) < sum(f.size for f in files) // 4096, "the readers stopped early"
