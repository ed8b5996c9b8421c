"""Per-chunk digests (formats/chunks.py): the writer records a sha256 and an xxh3_128 per chunk, the
index carries them, and ``Verification`` checks them on many threads (xxh3_128 where recorded, sha256
on request or in older indexes), naming the shard and the chunk that changed."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path

import pytest
import torch
import xxhash
from fmt_helpers import reference_record, shard_plan

from formats.chunks import ChunkDigests, chunk_count, hash_file
from formats.index import (
    INDEX_NAME,
    Verification,
    read_index,
    shard_name,
    start_verify,
    verify_shards,
    write_index,
)
from formats.quant_types import QuantType
from formats.reader import open_shard
from formats.validate import BadIndex
from formats.writer import ShardInfo, ShardWriter

PROV = {"source": "test", "files": [], "options": {}}
CHUNK = 4096


def _expected(data: bytes, size: int) -> list[str]:
    return [hashlib.sha256(data[o : o + size]).hexdigest() for o in range(0, len(data), size)]


def _expected_fast(data: bytes, size: int) -> list[str]:
    return [xxhash.xxh3_128_hexdigest(data[o : o + size]) for o in range(0, len(data), size)]


@pytest.mark.parametrize("nbytes", [0, 1, 100, CHUNK - 1, CHUNK, 3 * CHUNK, 3 * CHUNK + 1, 5 * CHUNK - 7],
                         ids=lambda n: f"{n}B")  # fmt: skip
@pytest.mark.parametrize("threads", [1, 3])
def test_hash_file_gives_the_file_sha256_and_one_digest_per_aligned_chunk(
    tmp_path: Path, nbytes: int, threads: int
) -> None:
    data = bytes(range(256)) * (nbytes // 256) + bytes(nbytes % 256)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    whole, chunks = hash_file(path, CHUNK, threads=threads)
    assert whole == hashlib.sha256(data).hexdigest()
    assert chunks.size == CHUNK
    # Exact multiple: no empty tail chunk; smaller than a chunk: one short chunk; empty file: none.
    assert len(chunks.sha256) == chunk_count(nbytes, CHUNK) == -(-nbytes // CHUNK)
    assert list(chunks.sha256) == _expected(data, CHUNK)
    assert list(chunks.xxh3_128) == _expected_fast(data, CHUNK)
    for k in range(len(chunks.sha256)):
        start, n = chunks.span(k, nbytes)
        assert start == k * CHUNK
        assert 0 < n <= CHUNK
    assert sum(chunks.span(k, nbytes)[1] for k in range(len(chunks.sha256))) == nbytes


def _write_two_shards(
    folder: Path, chunk_bytes: int | None = CHUNK
) -> tuple[list[ShardInfo], dict[str, str]]:
    infos, weight_map = [], {}
    for k in (1, 2):
        torch.manual_seed(k)
        rec = reference_record(f"layer{k}.weight", torch.randn(128, 256), QuantType.NF4, 64, nested=True)
        slots, meta = shard_plan([rec], {f"layer{k}.bias": torch.zeros(128)})
        path = folder / shard_name(k, 2)
        with ShardWriter(path, slots, meta, chunk_bytes=chunk_bytes) as w:
            for name, t in {**rec.state_dict(), f"layer{k}.bias": torch.zeros(128)}.items():
                w.write(name, t)
                weight_map[name] = path.name
        infos.append(w.info)
    return infos, weight_map


def test_writer_records_chunk_digests_and_writes_the_same_bytes(tmp_path: Path) -> None:
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    infos, _ = _write_two_shards(small, CHUNK)
    others, _ = _write_two_shards(big, 1 << 20)
    for a, b in zip(infos, others, strict=True):
        data = a.path.read_bytes()
        # The chunk size changes the digests recorded, never the shard: same bytes, same sha256.
        assert data == b.path.read_bytes()
        assert a.sha256 == b.sha256 == hashlib.sha256(data).hexdigest()
        assert a.size == len(data) > 3 * CHUNK  # several chunks
        assert a.chunks is not None
        assert b.chunks is not None
        assert list(a.chunks.sha256) == _expected(data, CHUNK)
        assert list(b.chunks.sha256) == _expected(data, 1 << 20)
        assert list(a.chunks.xxh3_128) == _expected_fast(data, CHUNK)
        assert open_shard(a.path).data_size == len(data) - 8 - int.from_bytes(data[:8], "little")


def test_index_round_trips_chunk_digests(tmp_path: Path) -> None:
    infos, wm = _write_two_shards(tmp_path)
    write_index(tmp_path, infos, wm, PROV, version="0.1.0")
    raw = json.loads((tmp_path / INDEX_NAME).read_text())
    entry = raw["metadata"]["quantize_model"]["shards"][shard_name(1, 2)]
    assert entry["chunks"] == {
        "size": CHUNK,
        "sha256": list(infos[0].chunks.sha256),
        "xxh3_128": list(infos[0].chunks.xxh3_128),
    }
    assert entry["sha256"] == infos[0].sha256  # the whole-file sha256 stays for older readers
    index = read_index(tmp_path)
    assert index.format_version == 1  # an optional field: same format version (docs/format.md 8)
    assert index.shards[shard_name(2, 2)].chunks == infos[1].chunks
    assert verify_shards(tmp_path) == []


def _edit_index(folder: Path, edit) -> None:
    path = folder / INDEX_NAME
    raw = json.loads(path.read_text())
    for entry in raw["metadata"]["quantize_model"]["shards"].values():
        edit(entry)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e["chunks"]["sha256"].pop(), r"must list \d+ digests, got \d+"),
        (lambda e: e["chunks"].update(size=5000), "not a power of two"),
        (lambda e: e["chunks"].update(size=1 << 31), "not a power of two"),
        (lambda e: e["chunks"]["sha256"].__setitem__(0, "XYZ"), "not 64 lowercase hex"),
        (lambda e: e.update(chunks=[1, 2]), "not a power of two"),
        (lambda e: e["chunks"]["xxh3_128"].pop(), r"chunks\.xxh3_128 must list \d+ digests, got \d+"),
        (lambda e: e["chunks"]["xxh3_128"].__setitem__(0, "0" * 64), "not 32 lowercase hex"),
    ],
    ids=["count", "size", "too-large", "hex", "not-an-object", "fast-count", "fast-hex"],
)
def test_malformed_chunk_digests_are_a_bad_index_naming_the_shard(tmp_path: Path, edit, message: str) -> None:
    infos, wm = _write_two_shards(tmp_path)
    write_index(tmp_path, infos, wm, PROV)
    _edit_index(tmp_path, edit)
    with pytest.raises(BadIndex, match=message) as info:
        read_index(tmp_path)
    assert shard_name(1, 2) in str(info.value)
    assert INDEX_NAME in str(info.value)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("algo", ["xxh3_128", "sha256"])
@pytest.mark.parametrize("k", [0, 2, -1], ids=["first", "middle", "last"])
def test_a_changed_byte_is_named_by_shard_and_chunk(tmp_path: Path, k: int, algo: str) -> None:
    infos, wm = _write_two_shards(tmp_path)
    write_index(tmp_path, infos, wm, PROV)
    shard = infos[1]
    n = len(shard.chunks.sha256)
    k = k % n
    start, length = shard.chunks.span(k, shard.size)
    _flip(shard.path, start + length - 1)  # the chunk's last byte
    # the default checks the fast digests; algo="sha256" the cryptographic ones
    problems = verify_shards(tmp_path, threads=3, algo=None if algo == "xxh3_128" else algo)
    assert len(problems) == 1
    assert problems[0].startswith(
        f"{shard.path}: {algo} of chunk {k} (bytes {start}-{start + length - 1}) is "
    )
    assert f"index says {getattr(shard.chunks, algo)[k]}; chunk {k} holds " in problems[0]  # its tensors
    _flip(shard.path, (k + 1) % n * CHUNK)  # a second chunk: counted, the first one named
    (line,) = verify_shards(tmp_path)
    assert f"of chunk {min(k, (k + 1) % n)} " in line
    assert f"; 2 of {n} chunks differ" in line  # then what the chunk holds, where its header reads


def test_an_index_without_chunk_digests_is_verified_by_whole_file(tmp_path: Path) -> None:
    infos, wm = _write_two_shards(tmp_path)
    write_index(tmp_path, infos, wm, PROV)
    _edit_index(tmp_path, lambda e: e.pop("chunks"))  # as written before chunk digests existed
    assert all(e.chunks is None for e in read_index(tmp_path).shards.values())
    assert verify_shards(tmp_path) == []
    _flip(infos[0].path, infos[0].size - 1)
    (line,) = verify_shards(tmp_path)
    assert re.fullmatch(
        rf"{re.escape(str(infos[0].path))}: sha256 [0-9a-f]{{64}}, index says {infos[0].sha256}", line
    )


def test_an_index_without_chunk_digests_is_verified_on_python_3_10(tmp_path: Path, monkeypatch) -> None:
    """The whole-file sha256 of a shard without chunk digests used hashlib.file_digest, which Python
    3.10 (README: 3.10+) lacks: verify and the loaders failed with AttributeError on such folders."""
    import hashlib

    infos, wm = _write_two_shards(tmp_path)
    write_index(tmp_path, infos, wm, PROV)
    _edit_index(tmp_path, lambda e: e.pop("chunks"))
    monkeypatch.delattr(hashlib, "file_digest", raising=False)  # as on Python 3.10
    assert verify_shards(tmp_path) == []
    _flip(infos[1].path, 7)
    (line,) = verify_shards(tmp_path)
    assert line.startswith(f"{infos[1].path}: sha256 ")


def test_taken_chunks_are_left_to_the_caller_and_hashed_at_the_end_if_never_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    infos, wm = _write_two_shards(tmp_path)
    write_index(tmp_path, infos, wm, PROV)
    name = infos[0].path.name
    gate = threading.Event()
    real = Verification._hash_chunk
    pool_hashed: list[tuple[str, int]] = []
    started: list[tuple[str, int]] = []

    def held(self: Verification, shard: str, k: int) -> None:
        started.append((shard, k))
        gate.wait()  # the caller takes its chunks before any pool thread starts one
        before = len(self._got[shard])
        real(self, shard, k)
        if len(self._got[shard]) > before:
            pool_hashed.append((shard, k))

    monkeypatch.setattr(Verification, "_hash_chunk", held)
    pending = start_verify(tmp_path, threads=1)
    grid = pending.chunk_digests(name)
    assert grid == (infos[0].chunks, infos[0].size)
    chunks, size = grid
    n = len(chunks.sha256)
    assert all(pending.take(name, k) for k in range(n))
    assert not any(pending.take(name, k) for k in range(n))  # nothing is taken twice
    data = infos[0].path.read_bytes()
    _flip(infos[0].path, 0)  # changed after the caller read it: the caller's digests are what count
    for k in range(1, n):
        start, length = chunks.span(k, size)
        pending.record(name, k, pending.chunk_hasher(name)(data[start : start + length]))
    gate.set()
    problems = pending()
    # The pool starts from the last chunk of the last shard, works backwards, hashes only what the
    # caller did not take; chunk 0, taken but never recorded, was hashed at the end.
    assert started[0] == (infos[1].path.name, len(infos[1].chunks.sha256) - 1)
    assert {s for s, _ in pool_hashed} == {infos[1].path.name}
    assert len(problems) == 1
    assert problems[0].startswith(f"{infos[0].path}: xxh3_128 of chunk 0 ")


def test_a_folder_mixing_old_and_new_chunk_entries_checks_each_by_what_it_records(tmp_path: Path) -> None:
    # A conversion resumed from a manifest written before xxh3_128 digests keeps those shards' sha256-only
    # entries: each shard is checked by the digests its own entry has.
    infos, wm = _write_two_shards(tmp_path)
    write_index(tmp_path, infos, wm, PROV)
    path = tmp_path / INDEX_NAME
    raw = json.loads(path.read_text())
    del raw["metadata"]["quantize_model"]["shards"][infos[0].path.name]["chunks"]["xxh3_128"]
    path.write_text(json.dumps(raw))
    index = read_index(tmp_path)
    assert index.shards[infos[0].path.name].chunks.xxh3_128 is None
    assert index.shards[infos[1].path.name].chunks.xxh3_128 is not None
    assert verify_shards(tmp_path) == []
    for info in infos:
        _flip(info.path, info.size - 1)
    lines = sorted(verify_shards(tmp_path))
    assert len(lines) == 2
    assert lines[0].startswith(f"{infos[0].path}: sha256 of chunk ")
    assert lines[1].startswith(f"{infos[1].path}: xxh3_128 of chunk ")


def test_chunk_digests_json_round_trip() -> None:
    c = ChunkDigests(CHUNK, ("0" * 64, "f" * 64))
    assert ChunkDigests.from_json(c.to_json(), CHUNK + 1, "x") == c
    assert c.for_verify() == ("sha256", c.sha256)  # an index written before xxh3_128 digests
    fast = ChunkDigests(CHUNK, ("0" * 64, "f" * 64), ("1" * 32, "2" * 32))
    assert ChunkDigests.from_json(fast.to_json(), CHUNK + 1, "x") == fast
    assert fast.for_verify() == ("xxh3_128", fast.xxh3_128)
    assert fast.for_verify("sha256") == ("sha256", fast.sha256)
    with pytest.raises(ValueError, match=r"x: chunks\.sha256 must list 1 digests, got 2"):
        ChunkDigests.from_json(c.to_json(), CHUNK, "x")
