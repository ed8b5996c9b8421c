"""``model.safetensors.index.json``: weight_map for transformers, per-shard sha256 and provenance for us.

Layout (sorted keys, indent 2, trailing newline; written through a temp file and a rename)::

    {
      "metadata": {
        "quantize_model": {
          "format": {"name": "quantize-model", "version": 1},
          "provenance": {...},                       # as in the shards' metadata
          "shards": {"model-00001-of-00002.safetensors": {
              "sha256": "...", "size": 123,
              "chunks": {"size": 16777216, "sha256": ["...", ...]}   # optional: formats/chunks.py
          }},
          "tool": {"name": "quantize-model", "version": "0.1.0"},
          "files": {"config.json": {"sha256": "...", "size": 123}}   # optional: since 2026-12-07
        },
        "total_size": 123                            # bytes of tensor data in all shards (headers excluded)
      },
      "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", ...}
    }
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.chunks import SHA256, ChunkDigests, digest_function, hash_file, hash_range, mismatch_line
from formats.metadata import tool_version
from formats.validate import (
    FORMAT_NAME,
    FORMAT_VERSION,
    BadIndex,
    MissingShard,
    TwoLayouts,
    UnknownFormatVersion,
    unsupported_version,
)
from formats.writer import ShardInfo, naming_os_errors

INDEX_NAME = "model.safetensors.index.json"
#: What to do about a malformed index (BadIndex) of a quantized folder: the shards may be fine, but
#: which tensor lives where (and their digests) is only known from the index.
INDEX_REMEDY = "the index is damaged: reconvert the folder or download it again"
SINGLE_NAME = "model.safetensors"


_HEX64 = re.compile("[0-9a-f]{64}")


def shard_name(k: int, n: int) -> str:
    """transformers' shard naming: ``model-00001-of-00003.safetensors`` (k counts from 1)."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


@dataclass(frozen=True)
class ShardEntry:
    sha256: str
    size: int
    chunks: ChunkDigests | None = None  # absent in indexes written before chunk digests


@dataclass(frozen=True)
class Index:
    folder: Path
    total_size: int | None
    weight_map: dict[str, str]
    shards: dict[str, ShardEntry]  # empty for an index we did not write
    format_version: int | None  # None for an index we did not write
    provenance: dict[str, Any] | None
    #: sha256 and size of the small JSON files beside the shards that loaders read (``config.json``,
    #: ``generation_config.json``); None for an index that records none (ours before 2026-12-07, others')
    file_digests: dict[str, FileDigest] | None = None

    @property
    def files(self) -> list[str]:
        """Shard file names, sorted."""
        return sorted(set(self.weight_map.values()) | set(self.shards))


def _data_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return os.fstat(f.fileno()).st_size - 8 - header_len


@dataclass(frozen=True)
class FileDigest:
    """The sha256 and size of a file's bytes, recorded in the index's ``files``."""

    sha256: str
    size: int

    @classmethod
    def of(cls, data: bytes) -> FileDigest:
        return cls(hashlib.sha256(data).hexdigest(), len(data))


def index_text(
    folder: Path,
    shards: Sequence[ShardInfo],
    weight_map: Mapping[str, str],
    provenance: Mapping[str, Any],
    *,
    version: str | None = None,
    format_version: int = FORMAT_VERSION,
    files: Mapping[str, FileDigest] | None = None,
) -> str:
    """The text ``write_index`` writes for ``shards`` (in ``folder``); a rerun compares it with the
    index a finished conversion holds. ``files``: the digests of the small JSON files beside the shards
    that loaders read (``config.json``: its bytes, which may be written after the index), recorded for
    ``verify``; None records none (as indexes before them)."""
    names = {Path(s.path).name: s for s in shards}
    unknown = sorted({f for f in weight_map.values() if f not in names})
    unused = sorted(set(names) - set(weight_map.values()))
    if unknown or unused:
        msg = f"{folder / INDEX_NAME}: weight_map names shards {unknown} not written; shards {unused} unused"
        raise BadIndex(msg)
    total = sum(_data_bytes(folder / name) for name in names)
    index = {
        "metadata": {
            "total_size": total,
            "quantize_model": {
                "format": {"name": FORMAT_NAME, "version": format_version},
                "tool": {"name": FORMAT_NAME, "version": version or tool_version()},
                "shards": {name: _shard_json(s) for name, s in names.items()},
                "provenance": dict(provenance),
            },
        },
        "weight_map": dict(weight_map),
    }
    if files is not None:
        for name in files:
            _check_file_name(name, folder / INDEX_NAME)
        digests = {n: {"sha256": d.sha256, "size": d.size} for n, d in files.items()}
        index["metadata"]["quantize_model"]["files"] = digests
    return json.dumps(index, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def write_index(
    folder: Path,
    shards: Sequence[ShardInfo],
    weight_map: Mapping[str, str],
    provenance: Mapping[str, Any],
    *,
    version: str | None = None,
    format_version: int = FORMAT_VERSION,
    files: Mapping[str, FileDigest] | None = None,
) -> Path:
    """Write the index for ``shards`` (already in ``folder``). Every shard must hold a weight_map key.
    ``files``: as for :func:`index_text`."""
    folder = Path(folder)
    text = index_text(
        folder, shards, weight_map, provenance, version=version, format_version=format_version, files=files
    )
    path = folder / INDEX_NAME
    tmp = folder / f".{INDEX_NAME}.partial"
    try:
        with naming_os_errors(path), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no temp file behind
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _shard_json(s: ShardInfo) -> dict[str, Any]:
    entry: dict[str, Any] = {"sha256": s.sha256, "size": s.size}
    if s.chunks is not None:
        entry["chunks"] = s.chunks.to_json()
    return entry


def _shard_entry(name: str, e: dict, where: Path) -> ShardEntry:
    size, sha = e["size"], e["sha256"]
    # exact types: a string size or an uppercase digest is not what the writer writes, and a digest
    # compared as text must be spelt one way
    if type(size) is not int or size < 0 or not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        msg = f"{where}: shard {name}: 'sha256' must be 64 lowercase hex digits and 'size' a byte count"
        raise BadIndex(msg)
    chunks = e.get("chunks")
    if chunks is not None:
        try:
            chunks = ChunkDigests.from_json(chunks, size, f"{where}: shard {name}")
        except ValueError as exc:
            raise BadIndex(str(exc)) from None
    return ShardEntry(sha, size, chunks)


def _check_file_name(name: str, where: Path) -> None:
    """A name in the index's ``files``: a plain file name in the folder (never a path: verify reads it)."""
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        what = "which is not a file name inside the folder"
        msg = f"{where}: metadata.quantize_model.files names {name!r}, {what}"
        raise BadIndex(msg)


def _file_digests(ours: dict, where: Path) -> dict[str, FileDigest] | None:
    """The index's ``files`` (optional), each entry checked as a shard's ``sha256`` and ``size`` are."""
    files = ours.get("files")
    if files is None:
        return None
    if not isinstance(files, dict):
        msg = f"{where}: metadata.quantize_model.files must map file names to their sha256 and size"
        raise BadIndex(msg)
    out = {}
    for name, e in files.items():
        _check_file_name(name, where)
        entry = _shard_entry(name, e, where) if isinstance(e, dict) and "chunks" not in e else None
        if entry is None:
            msg = f"{where}: metadata.quantize_model.files: {name}: must be {{'sha256', 'size'}}"
            raise BadIndex(msg)
        out[name] = FileDigest(entry.sha256, entry.size)
    return out


def read_index(folder: Path, *, require_files: bool = True) -> Index:
    """Parse and check an index (ours or transformers'). Raises BadIndex / MissingShard."""
    folder = Path(folder)
    path = folder / INDEX_NAME
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        msg = f"{path}: not a JSON file ({exc})"
        raise BadIndex(msg) from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        msg = f"{path}: 'weight_map' must map tensor names to shard file names"
        raise BadIndex(msg)
    # Checked once per distinct file name (a few shards), not per tensor key (thousands).
    for file in set(wm.values()):
        if Path(file).name != file or file in ("", ".", ".."):
            key = next(k for k, f in wm.items() if f == file)
            msg = f"{path}: tensor {key!r} maps to {file!r}, which is not a file name inside the folder"
            raise BadIndex(msg)
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        msg = f"{path}: 'metadata' must be an object"
        raise BadIndex(msg)
    total = meta.get("total_size")
    ours = meta.get("quantize_model")
    shards: dict[str, ShardEntry] = {}
    version = prov = digests = None
    if ours is not None:
        try:
            name, version = ours["format"]["name"], ours["format"]["version"]
            shards = {n: _shard_entry(n, e, path) for n, e in ours["shards"].items()}
            prov = ours.get("provenance")
            digests = _file_digests(ours, path)
        except BadIndex:  # a chunks entry that does not fit its shard (the message names both)
            raise
        except (KeyError, TypeError, AttributeError) as exc:
            msg = f"{path}: metadata.quantize_model is malformed ({exc!r})"
            raise BadIndex(msg) from None
        if name != FORMAT_NAME:
            msg = f"{path}: metadata.quantize_model.format.name is {name!r}, expected {FORMAT_NAME!r}"
            raise BadIndex(msg)
        if (msg := unsupported_version(path, version)) is not None:
            raise UnknownFormatVersion(msg)
        stray = sorted(set(wm.values()) - set(shards))
        if stray:
            msg = f"{path}: weight_map names shards without a sha256 entry: {stray}"
            raise BadIndex(msg)
    others = sorted(set(wm.values()) - {SINGLE_NAME})
    if others and (folder / SINGLE_NAME).is_file():
        msg = (
            f"{folder}: has both {SINGLE_NAME} and {INDEX_NAME} (which names {len(others)} other shard "
            f"file(s), e.g. {others[0]}): transformers' from_pretrained loads {SINGLE_NAME} and ignores the "
            "index, quantize-model reads the index; remove the one that is not the model"
        )
        raise TwoLayouts(msg)
    index = Index(folder, total if isinstance(total, int) else None, dict(wm), shards, version, prov, digests)
    if require_files:
        missing = [f for f in index.files if not (folder / f).is_file()]
        if missing:
            msg = f"{path}: shard file(s) missing: {', '.join(missing)}; re-run the conversion"
            raise MissingShard(msg)
    return index


def _sha256(path: Path) -> str:
    """The whole file's sha256, read in 1 MiB pieces (hashlib.file_digest is Python 3.11+; the project
    supports 3.10)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_problems(index: Index) -> tuple[list[str], list[str]]:
    """(one line per missing shard or shard whose size differs from the index, the names of the others)."""
    problems: list[str] = []
    present: list[str] = []
    for name in index.files:
        p = index.folder / name
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif name in index.shards and p.stat().st_size != index.shards[name].size:
            problems.append(f"{p}: size {p.stat().st_size}, index says {index.shards[name].size}")
        else:
            present.append(name)
    return problems, present


def recorded_file_problems(index: Index, *, skip_missing: Sequence[str] = ()) -> list[str]:
    """One line per file of the index's ``files`` whose bytes are not the recorded ones (a hand edit of
    ``config.json``: another layer count, dtype or quantization_config), or that is missing (those named
    in ``skip_missing`` excepted: the caller reports their absence its own way). Empty where the index
    records no ``files``."""
    problems = []
    for name, entry in sorted((index.file_digests or {}).items()):
        path = index.folder / name
        got = _file_digest(path)
        if isinstance(got, FileNotFoundError):
            if name not in skip_missing:
                problems.append(f"{path}: missing (the index records its sha256)")
        elif isinstance(got, OSError):
            problems.append(f"{path}: unreadable ({got.strerror or got})")
        elif got != entry:
            problems.append(
                f"{path}: sha256 {got.sha256}, index says {entry.sha256} "
                "(changed since the conversion wrote it)"
            )
    return problems


def edited_files(index: Index, *, skip_missing: Sequence[str] = ()) -> list[str]:
    """The names (sorted) of the index's ``files`` whose bytes are not the recorded ones, or that are
    missing (those in ``skip_missing`` excepted) or unreadable: what :func:`recorded_file_problems`
    reports, without the details (each file read once). Empty where the index records no ``files``."""
    edited = []
    for name, entry in sorted((index.file_digests or {}).items()):
        got = _file_digest(index.folder / name)
        if got != entry and not (isinstance(got, FileNotFoundError) and name in skip_missing):
            edited.append(name)
    return edited


def _file_digest(path: Path) -> FileDigest | OSError:
    """The digest of a small file's bytes, or the error reading it."""
    try:
        return FileDigest.of(path.read_bytes())
    except OSError as exc:
        return exc


def digest_problems(index: Index, digests: dict[str, str]) -> list[str]:
    """One line per shard (by name, in index order) whose computed sha256 differs from the index."""
    return [
        f"{index.folder / name}: sha256 {digests[name]}, index says {index.shards[name].sha256}"
        for name in index.files
        if name in digests and name in index.shards and digests[name] != index.shards[name].sha256
    ]


class Verification:
    """The hashing of a folder's shards, started on a thread pool at once (hashlib and the reads
    release the GIL, so it runs while the caller parses, copies or builds); call it to wait for the
    result: one line per problem, as :func:`verify_shards` returns.

    A shard with chunk digests is hashed chunk by chunk on all the threads; one without (an index
    written before them) as one whole-file sha256 on one thread. A caller that reads a shard's bytes
    anyway (the streamed GPU load, front to back) can :meth:`take` each chunk it has just read, if no
    thread has started it, hash it from its own buffer and :meth:`record` the digest. The threads
    work from the last chunk backwards, so the two meet somewhere in the middle, and whatever the
    caller has not reached when it stops reading is hashed by the threads while it does other work
    (building the model).
    """

    _POOL, _CALLER = 1, 2

    def __init__(
        self,
        index: Index,
        threads: int | None = None,
        algo: str | None = None,
        *,
        whole: bool = False,
        start: bool = True,
    ) -> None:
        self.index = index
        self._problems, present = file_problems(index)
        hashed = [n for n in present if n in index.shards]
        # whole=True (the explicit `verify` command): each shard is read once for its whole-file sha256
        # and its sha256 chunk digests, so an index whose two disagree does not pass.
        self._chunked = {} if whole else {n: c for n in hashed if (c := index.shards[n].chunks) is not None}
        # Per shard, the chunk digests checked: xxh3_128 where recorded, else (or algo="sha256") sha256.
        self._algo = {n: c.for_verify(algo)[0] for n, c in self._chunked.items()}
        self._owner = {n: [0] * len(c.sha256) for n, c in self._chunked.items()}
        self._got: dict[str, dict[int, str]] = {n: {} for n in self._chunked}
        self._lock = threading.Lock()
        self._threads = max(1, threads or len(os.sched_getaffinity(0)))
        # Popped from the end, so the last chunk first: a caller reading the files front to back takes
        # chunks from the other end.
        self._order = [(n, k) for n, c in self._chunked.items() for k in range(len(c.sha256))]
        self._whole: dict[str, Future[tuple[str, ChunkDigests | None]]] = {}
        self._tasks: list[Future[None]] = []
        # The pool's threads are started from one thread of its own: each start waits for the new
        # thread to run, which the caller would otherwise do once per thread, in turn with the threads
        # already hashing for the GIL.
        self._starter = threading.Thread(target=self._start, args=(hashed,), name="qm-verify-start")
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Start the threads (once; calling the verification starts them too). A caller that parses
        the shards' headers first starts them after: a dozen threads taking the GIL between chunks
        made that pure-Python parse 17x slower (8B folder, 16 cores: 0.40 s instead of 0.02 s)."""
        if not self._started:
            self._started = True
            self._starter.start()

    def _start(self, hashed: list[str]) -> None:
        tasks = len(self._order) + len(hashed) - len(self._chunked)
        workers = max(1, min(tasks, self._threads))
        pool = ThreadPoolExecutor(max_workers=workers)
        self._whole = {n: pool.submit(self._hash_whole, n) for n in hashed if n not in self._chunked}
        self._tasks = [pool.submit(self._hash_chunks) for _ in range(workers)] if self._order else []
        pool.shutdown(wait=False)  # the threads finish what is queued; nothing else is submitted

    def _hash_whole(self, name: str) -> tuple[str, ChunkDigests | None]:
        """(whole-file sha256, sha256 chunk digests where the index records chunks) of one shard."""
        path, chunks = self.index.folder / name, self.index.shards[name].chunks
        if chunks is None:
            return _sha256(path), None
        return hash_file(path, chunks.size, threads=1)

    def _hash_chunks(self) -> None:
        """Hash chunks until none is left (one task per thread, not per chunk: fewer GIL hand-offs)."""
        while True:
            with self._lock:
                if not self._order:
                    return
                name, k = self._order.pop()
            self._hash_chunk(name, k)

    def _hash_chunk(self, name: str, k: int) -> None:
        with self._lock:
            if self._owner[name][k]:
                return  # taken by the caller
            self._owner[name][k] = self._POOL
        self._hash_now(name, k)

    def _hash_now(self, name: str, k: int) -> None:
        offset, nbytes = self._chunked[name].span(k, self.index.shards[name].size)
        try:
            digest = hash_range(self.index.folder / name, offset, nbytes, self._algo[name])
        except OSError as exc:  # e.g. truncated since it was sized: reported as that chunk's problem
            digest = f"unreadable ({exc})"
        self.record(name, k, digest)

    def chunk_digests(self, name: str) -> tuple[ChunkDigests, int] | None:
        """The chunk digests of shard ``name`` and its size, when it is hashed by chunks (else None:
        no digests, or a size that differs from the index)."""
        chunks = self._chunked.get(name)
        return None if chunks is None else (chunks, self.index.shards[name].size)

    def chunk_hasher(self, name: str) -> Callable[[Any], str]:
        """The function that computes the digest :meth:`record` expects for chunks of shard ``name``."""
        return digest_function(self._algo[name])

    def take(self, name: str, k: int) -> bool:
        """Chunk ``k`` of shard ``name`` is the caller's to hash (True), unless a thread started it."""
        with self._lock:
            owner = self._owner[name]
            if owner[k]:
                return False
            owner[k] = self._CALLER
            return True

    def record(self, name: str, k: int, digest: str) -> None:
        """The digest (hex, :meth:`chunk_hasher`'s) of chunk ``k`` of shard ``name`` (thread-safe)."""
        with self._lock:
            self._got[name][k] = digest

    def hashed_by(self) -> tuple[int, int]:
        """(chunks hashed by the threads, chunks the caller took) so far: where verify's work went."""
        with self._lock:
            owners = [o for owned in self._owner.values() for o in owned]
        return owners.count(self._POOL), owners.count(self._CALLER)

    def __call__(self) -> list[str]:
        self.start()
        self._starter.join()
        for task in self._tasks:
            task.result()
        # Chunks a caller took but never recorded (it failed first) are hashed here.
        left = [
            (n, k) for n, c in self._chunked.items() for k in range(len(c.sha256)) if k not in self._got[n]
        ]
        if left:
            with ThreadPoolExecutor(max(1, min(len(left), self._threads))) as pool:
                list(pool.map(lambda nk: self._hash_now(*nk), left))
        problems = list(self._problems)
        digests = {n: f.result() for n, f in self._whole.items()}
        for name in self.index.files:
            if name in digests:
                sha, chunks = digests[name]
                entry = self.index.shards[name]
                line = None
                if chunks is not None and entry.chunks is not None:  # the chunk that differs, if one does
                    got = dict(enumerate(chunks.sha256))
                    line = mismatch_line(self.index.folder / name, entry.chunks, entry.size, got, SHA256)
                problems += [line] if line is not None else digest_problems(self.index, {name: sha})
            elif name in self._chunked:
                entry = self.index.shards[name]
                line = mismatch_line(
                    self.index.folder / name,
                    self._chunked[name],
                    entry.size,
                    self._got[name],
                    self._algo[name],
                )
                if line is not None:
                    problems.append(line)
        return problems


def start_verify(
    folder: Path,
    *,
    threads: int | None = None,
    algo: str | None = None,
    whole: bool = False,
    start: bool = True,
) -> Verification:
    """Start hashing every shard on background threads; call the result to wait for the problems.
    ``algo="sha256"``: check the sha256 chunk digests even where xxh3_128 ones are recorded;
    ``whole=True``: also the whole-file sha256 of every shard (one thread per shard); ``start=False``:
    the threads start at the result's ``start()`` (or call)."""
    return Verification(read_index(folder, require_files=False), threads, algo, whole=whole, start=start)


def verify_shards(
    folder: Path, *, threads: int | None = None, algo: str | None = None, whole: bool = False
) -> list[str]:
    """Hash every shard (in parallel) and compare with the index; returns one line per problem."""
    return start_verify(folder, threads=threads, algo=algo, whole=whole)()
