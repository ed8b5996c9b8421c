"""``verify=True`` with chunk digests (formats/chunks.py), on the CPU mapped path and the streamed path.

The folder (``chunked_folder``) is converted with 4 KiB chunks so that every shard has many. A byte
changed in chunk k of a shard is caught before the model is returned, and the error names the shard
and the chunk; the streamed load hashes the bytes it reads into staging (no byte read twice); a
folder whose index has no chunk digests (written before them) is still verified by whole file.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

from converter import load_quantized
from converter.loader import state as state_mod
from converter.loader import stream
from converter.loader.state import ChecksumMismatchError, load_quantized_state, read_state, shards_verified
from converter.loader.stream import StreamStats
from formats.index import INDEX_NAME, Verification, read_index

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


@pytest.fixture(params=["mapped", "streamed"])
def path_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CPU mapped load, or the device path (stream into fresh tensors) run with CPU targets."""
    if request.param == "streamed":
        monkeypatch.setattr(state_mod, "streams_to", lambda device: True)
    return request.param


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip(folder: Path, shard_index: int, where: str) -> tuple[str, int, int, bool]:
    """Flip a byte of a shard: in its header ("header"), its first tensor ("data") or its last byte
    ("last", in a quant-state JSON blob); (shard name, chunk k holding it, chunk start, whether the
    shard still parses)."""
    index = read_index(folder)
    name = sorted(index.shards)[shard_index]
    entry = index.shards[name]
    assert entry.chunks is not None
    assert len(entry.chunks.sha256) >= 4
    path = folder / name
    data = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")
    offset = {"header": 20, "data": data_start + 10, "last": len(data) - 1}[where]
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    k = offset // entry.chunks.size
    return name, k, entry.chunks.span(k, entry.size)[0], where == "data"


@pytest.mark.parametrize(
    ("shard_index", "where"),
    [(0, "header"), (-1, "data"), (1, "last")],
    ids=["header", "first-tensor", "last"],
)
def test_a_changed_byte_in_chunk_k_is_caught_and_named(
    chunked_folder: Path, tmp_path: Path, path_kind: str, shard_index: int, where: str
) -> None:
    folder = _copy(chunked_folder, tmp_path / "changed")
    name, k, start, parses = _flip(folder, shard_index, where)
    assert k > 0 or where == "header"  # the header of these shards is longer than a 4 KiB chunk
    # verify=True checks the xxh3_128 chunk digests the writer recorded; verify="sha256" the sha256 ones
    with pytest.raises(
        ChecksumMismatchError, match=rf"{re.escape(name)}: xxh3_128 of chunk {k} \(bytes {start}-"
    ) as info:
        load_quantized(folder)
    assert "verify=False" in str(info.value)
    with pytest.raises(ChecksumMismatchError, match=rf"{re.escape(name)}: xxh3_128 of chunk {k} "):
        load_quantized_state(folder)
    sha = rf"{re.escape(name)}: sha256 of chunk {k} \(bytes {start}-"
    with pytest.raises(ChecksumMismatchError, match=sha):
        load_quantized(folder, verify="sha256")
    with pytest.raises(ChecksumMismatchError, match=rf"{re.escape(name)}: sha256 of chunk {k} "):
        load_quantized_state(folder, verify="sha256")
    if parses:  # a changed code byte: only the hashes catch it
        assert isinstance(load_quantized(folder, verify=False), torch.nn.Module)


def test_verify_takes_true_false_or_sha256(chunked_folder: Path) -> None:
    with pytest.raises(ValueError, match="verify must be True, False or 'sha256', got 'md5'"):
        load_quantized_state(chunked_folder, verify="md5")
    want = load_quantized_state(chunked_folder).keys()
    assert load_quantized_state(chunked_folder, verify="sha256").keys() == want


def test_an_intact_chunked_folder_loads_the_same_model_on_both_paths(
    chunked_folder: Path, our_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mapped = load_quantized(chunked_folder)
    monkeypatch.setattr(state_mod, "streams_to", lambda device: True)
    streamed = load_quantized(chunked_folder)
    reference = load_quantized(our_folder, verify=False)  # chunk size changes the index, not the shards
    with torch.no_grad():
        want = reference(IDS).logits
        assert torch.equal(mapped(IDS).logits, want)
        assert torch.equal(streamed(IDS).logits, want)


def test_the_stream_hashes_what_it_reads_reading_each_file_once(
    chunked_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hold the verification's own threads until the stream has read everything: every chunk is then
    # the stream's to hash, from its staging buffers.
    gate = threading.Event()
    real = Verification._hash_chunk

    def held(self: Verification, name: str, k: int) -> None:
        gate.wait()
        real(self, name, k)

    monkeypatch.setattr(Verification, "_hash_chunk", held)
    reads: dict[int, list[tuple[int, int]]] = {}
    recorded: list[tuple[str, int]] = []
    real_preadv, real_record = os.preadv, Verification.record

    def preadv(fd: int, buffers, offset: int) -> int:
        got = real_preadv(fd, buffers, offset)
        reads.setdefault(fd, []).append((offset, got))
        return got

    def record(self: Verification, name: str, k: int, digest: str) -> None:
        recorded.append((name, k))
        real_record(self, name, k, digest)

    monkeypatch.setattr(stream.os, "preadv", preadv)
    monkeypatch.setattr(Verification, "record", record)
    stats = StreamStats()
    real_stream = stream.stream_state
    monkeypatch.setattr(stream, "stream_state", lambda *a, **kw: real_stream(*a, **kw, stats=stats))
    monkeypatch.setattr(state_mod, "streams_to", lambda device: True)
    index = read_index(chunked_folder)
    with shards_verified(chunked_folder) as hashes:
        assert hashes is not None
        try:
            out = read_state(chunked_folder, "cpu", hashes)
        finally:
            gate.set()
    assert out
    # Every chunk of every shard was hashed by the stream, once; each file read once, whole, in order.
    want = {(n, k) for n, e in index.shards.items() for k in range(len(e.chunks.sha256))}
    assert sorted(recorded) == sorted(want)
    assert {p.name: n for p, n in stats.bytes_read.items()} == {n: e.size for n, e in index.shards.items()}
    for spans in reads.values():
        spans.sort()
        assert spans[0][0] == 0
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(spans))


def test_a_folder_without_chunk_digests_is_still_verified(
    chunked_folder: Path, tmp_path: Path, path_kind: str
) -> None:
    folder = _copy(chunked_folder, tmp_path / "old")
    path = folder / INDEX_NAME
    raw = json.loads(path.read_text())
    for entry in raw["metadata"]["quantize_model"]["shards"].values():
        del entry["chunks"]  # an index written before chunk digests
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    assert isinstance(load_quantized(folder), torch.nn.Module)
    name = sorted(raw["metadata"]["quantize_model"]["shards"])[-1]
    data = bytearray((folder / name).read_bytes())
    data[-1] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=rf"{re.escape(name)}: sha256 [0-9a-f]{{64}}, index says"):
        load_quantized(folder)
