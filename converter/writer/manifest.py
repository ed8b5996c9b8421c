"""The in-progress manifest, and what a re-run into an existing output folder does.

``.quantize-model-manifest.json`` sits in the output folder from the first byte written. It holds the
plan fingerprint (source identity, options, tool and format version), the state ("in_progress" or
"complete") and the sha256, size and chunk digests (formats/chunks.py) of every shard already
finished. It is rewritten atomically (temp name, fsync, rename) after each shard, and marked complete
only after index and config are in place.

Rules (design.md): no folder (or an empty one) -> create; our manifest with the same fingerprint ->
resume (skip shards whose recorded sha256 still matches) or, when complete, do nothing; anything else
-> refuse with exit 2. ``overwrite`` empties the folder and starts from scratch in every case.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from converter.errors import CorruptFileError, FolderBusyError, OutputExistsError
from converter.locks import lock_folder
from formats.chunks import ChunkDigests, hash_file
from formats.writer import ShardInfo, naming_os_errors, temp_path

MANIFEST_NAME = ".quantize-model-manifest.json"
TOOL = "quantize-model"


class Action(Enum):
    CREATE = "create"
    RESUME = "resume"
    NOOP = "noop"


@dataclass
class Manifest:
    fingerprint: str
    state: str = "in_progress"  # or "complete"; "clearing" while --overwrite empties the folder
    shards: dict[str, dict] = field(default_factory=dict)  # name -> {"sha256", "size", "chunks", ...}
    plan: dict = field(default_factory=dict)
    #: the source's files copied as they are (tokenizer, README, 1_Pooling/config.json): a rerun
    #: removes those gone from the source since (a manifest written before has none recorded)
    copied: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {
            "tool": TOOL,
            "fingerprint": self.fingerprint,
            "state": self.state,
            "shards": dict(sorted(self.shards.items())),
            "plan": self.plan,
        }
        if self.copied:
            out["copied"] = sorted(self.copied)
        return out

    @classmethod
    def load(cls, folder: Path) -> Manifest | None:
        path = folder / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("tool") != TOOL or "fingerprint" not in data:
            return None
        copied = data.get("copied")
        return cls(
            data["fingerprint"],
            data.get("state", "in_progress"),
            data.get("shards", {}),
            data.get("plan", {}),
            [n for n in copied if isinstance(n, str)] if isinstance(copied, list) else [],
        )

    def save(self, folder: Path) -> None:
        atomic_write_bytes(
            folder / MANIFEST_NAME, (json.dumps(self.to_json(), separators=(",", ":")) + "\n").encode()
        )


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_temp(path: Path) -> tuple[int, Path]:
    """A new file beside ``path`` under a hidden name of its own, ``.<name>.<8 hex digits>.tmp``, open
    for writing (created as open() creates files: the umask applies). Two processes writing ``path`` at
    once each write their own, where one fixed name let them truncate and rename each other's."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def temp_files(path: Path) -> list[Path]:
    """The temp files of ``path`` (atomic_write_bytes'; ``.<name>.tmp`` of earlier versions) in its
    folder: what a killed writer leaves behind."""
    try:
        return sorted(p for p in path.parent.iterdir() if is_temp_file(p.name, path.name))
    except OSError:  # no folder yet
        return []


def is_temp_file(name: str, target: str) -> bool:
    """Whether ``name`` is a temp file of the file ``target`` of the same folder."""
    return re.fullmatch(re.escape(f".{target}") + r"(\.[0-9a-f]{8})?\.tmp", name) is not None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file of its own beside ``path``, fsync, rename: readers see old or new,
    never half, and concurrent writers of ``path`` each rename a whole file of theirs."""
    tmp: Path | None = None
    try:
        with naming_os_errors(path):
            fd, tmp = _open_temp(path)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # a full disk must not leave a stray temp file behind
        if exc.filename is not None and Path(exc.filename).name.startswith(f".{path.name}."):
            # named after the file asked for (a missing folder, a folder in its place), not our temp
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


#: errors of writing a file (a full disk, a file size limit, a read-only folder), not of reading one
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})


@contextmanager
def writing_to(dest: Path) -> Iterator[Path]:
    """A temp path beside ``dest`` for the block to write (a copy), renamed onto ``dest`` when it
    succeeds. On failure the temp file is removed, and an error of writing (ENOSPC, EFBIG, ...) is
    reported under ``dest``'s name: shutil's copies name the source file, which is not the one that
    failed."""
    tmp = temp_path(dest)
    try:
        yield tmp
        tmp.replace(dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in _WRITE_ERRNOS:
            raise OSError(exc.errno, exc.strerror, str(dest)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def shard_chunks_json(info: ShardInfo) -> dict:
    """The manifest entry's ``chunks`` field of a shard just written (empty without chunk digests)."""
    return {"chunks": info.chunks.to_json()} if info.chunks is not None else {}


def shard_info(path: Path, entry: dict) -> ShardInfo:
    """The ``ShardInfo`` of a finished shard from its manifest entry, for the index. An entry without
    usable chunk digests (a manifest written before them) has them computed from the file, which a
    resumed run has just checked against the entry's sha256."""
    sha, size = entry["sha256"], entry["size"]
    try:
        chunks = ChunkDigests.from_json(entry.get("chunks"), size, str(path))
    except ValueError:
        whole, chunks = hash_file(path)
        if whole != sha:
            msg = f"{path}: changed since it was written (sha256 {whole}, manifest says {sha}); convert again"
            raise CorruptFileError(msg) from None
    return ShardInfo(path, sha, size, chunks)


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Decision:
    action: Action
    manifest: Manifest
    done: dict[str, dict]  # shards verified complete: name -> {"sha256", "size"}


def _visible_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def decide(
    output: Path,
    fingerprint: str,
    plan_json: dict,
    *,
    overwrite: bool,
    protected: tuple[Path, ...] = (),
    refresh: bool = False,
) -> Decision:
    """Decide what to do with ``output`` for a plan with ``fingerprint`` (see the module docstring).

    ``protected`` are paths the output must not contain or equal (the source), even with overwrite.
    ``refresh``: files outside the fingerprint (config.json, tokenizer, ...) changed in the source, so
    a finished conversion is resumed (its shards kept, the rest rewritten) instead of left as it is.
    """
    output = output.resolve()
    contains = _contains_source(output, protected)
    if contains:
        raise OutputExistsError(contains)
    fresh = Decision(Action.CREATE, Manifest(fingerprint, plan=plan_json), {})
    if output.exists() and not output.is_dir():
        if not overwrite:
            raise OutputExistsError(not_a_folder(output))
        output.unlink()
        return fresh
    # A kill between writing the first manifest's temp file and renaming it leaves only that file:
    # ours, never complete, so it is dropped instead of making the folder look like someone else's.
    # (only those there: unlink fails on a read-only folder even for a missing file)
    for stray in temp_files(output / MANIFEST_NAME):
        stray.unlink()
    if not output.exists() or not any(output.iterdir()):
        return fresh
    if overwrite:
        # --overwrite means start from scratch, even over a finished identical conversion. This run's
        # manifest, state "clearing", replaces the old one before anything is deleted, and the index and
        # config.json go first: killed while clearing, the folder is an unfinished conversion (verify and
        # the loaders say so), never the old one with some files gone that still verifies or loads; and
        # the same command, even without --overwrite, empties it again.
        Manifest(fingerprint, "clearing", plan=plan_json).save(output)
        clear_folder(output, keep=MANIFEST_NAME)
        return fresh
    manifest = Manifest.load(output)
    if manifest is not None and manifest.fingerprint == fingerprint and manifest.state == "clearing":
        clear_folder(output, keep=MANIFEST_NAME)  # an --overwrite killed while emptying the folder
        return fresh
    if manifest is not None and same_plan(manifest, fingerprint, plan_json):
        finished = all((output / n).is_file() for n in ("config.json", "model.safetensors.index.json"))
        if manifest.state == "complete" and finished and not refresh:
            # A finished folder is checked by size and mtime (``quantize-model verify`` hashes it); a
            # shard that fails that is hashed below (and the folder resumed: the manifest rewritten).
            done = _verified_shards(output, manifest, deep=False)
            if len(done) == len(manifest.shards):
                return Decision(Action.NOOP, manifest, done)
        done = _verified_shards(output, manifest, deep=True)
        manifest.state = "in_progress"
        manifest.shards = dict(done)
        return Decision(Action.RESUME, manifest, done)
    raise OutputExistsError(_foreign(output, manifest, plan_json))


def not_a_folder(output: Path) -> str:
    """The refusal of an output that exists as a file (without --overwrite)."""
    return f"{Path(output).resolve()}: exists and is not a folder; remove it or pass --overwrite"


def _contains_source(output: Path, protected: tuple[Path, ...]) -> str | None:
    for p in protected:
        p = p.resolve()
        if output == p or p.is_relative_to(output):
            return source_overlap(output, p, remedy="choose another output folder")
    return None


def source_overlap(output: Path, source: Path, *, remedy: str) -> str | None:
    """The error for an output folder that is the local ``source`` (a folder or a file), contains it,
    or lies inside a source folder (``convert SRC SRC/sub``: the output would become part of the
    source it is made from), else None. convert and dequantize ask it before any work; ``remedy`` ends
    the line."""
    out, src = Path(output).expanduser().resolve(), Path(source).expanduser().resolve()
    if out == src or src.is_relative_to(out):
        kind = "file" if src.is_file() else "folder"
        return f"{out}: the output folder is or contains the source {kind} {src}; {remedy}"
    if src.is_dir() and out.is_relative_to(src):
        return f"{out}: the output folder is inside the source folder {src}; {remedy}"
    return None


def unfinished_conversion(folder: Path) -> str | None:
    """What to say of a folder whose manifest records a conversion that did not finish, else None."""
    manifest = Manifest.load(folder)
    if manifest is None or manifest.state == "complete":
        return None
    return f"{folder}: the conversion did not finish; rerun the same convert command to resume"


def damaged_manifest(folder: Path) -> str | None:
    """The message for a folder whose manifest exists but is not one quantize-model can read (cut short,
    edited, another tool's file), else None. Without a readable manifest nothing can be resumed, so
    every command gives the one remedy that works: convert again with --overwrite."""
    path = folder / MANIFEST_NAME
    if not path.is_file() or Manifest.load(folder) is not None:
        return None
    return (
        f"{path}: damaged (not a readable quantize-model manifest), so the conversion cannot be resumed; "
        f"rerun the convert command with --overwrite to convert again"
    )


def _foreign(output: Path, manifest: Manifest | None, plan_json: dict) -> str:
    damaged = damaged_manifest(output) if manifest is None else None
    if damaged is not None:
        return damaged
    if manifest is None:
        what = f"holds files quantize-model did not write ({', '.join(_visible_entries(output)[:3])})"
    else:
        what = "holds a conversion with different options or a different source"
        change = plan_difference(manifest.plan, plan_json)
        what += f" ({change})" if change else ""
    return f"{output}: {what}; choose an empty folder or pass --overwrite"


def same_plan(manifest: Manifest, fingerprint: str, plan_json: dict) -> bool:
    """Whether ``manifest`` records the plan of ``fingerprint``, or the same plan as recorded before a
    local source's files were identified by their sampled data too (``sample_sha256``, new in 0.1.0's
    development: a folder converted before is still resumed or left as it is, not refused)."""
    if manifest.fingerprint == fingerprint:
        return True
    source = plan_json.get("source") or {}
    files = source.get("files") or {}
    if source.get("kind") != "local" or not any("sample_sha256" in f for f in files.values()):
        return False
    older = {n: {k: v for k, v in f.items() if k != "sample_sha256"} for n, f in files.items()}
    return manifest.plan == {**plan_json, "source": {**source, "files": older}}


#: how plan_difference names the fields of a source file's identity
_FILE_FIELDS = {"mtime_ns": "modification time", "header_sha256": "header", "sample_sha256": "sampled data"}


def plan_difference(old: dict, new: dict) -> str | None:
    """The first difference between the plan a folder was converted with (its manifest's) and
    ``new``, in words: the source (its path, Hub commit, a weight file), then an option, then the
    rest. None when ``old`` is empty (a manifest written before plans were kept) or equal."""
    if not old or old == new:
        return None
    src_old, src_new = old.get("source") or {}, new.get("source") or {}
    for key in sorted((src_old.keys() | src_new.keys()) - {"files", "name"}):
        if src_old.get(key) != src_new.get(key):
            return f"source {key}: {src_old.get(key)!r} -> {src_new.get(key)!r}"
    files_old, files_new = src_old.get("files") or {}, src_new.get("files") or {}
    for name in sorted(files_old.keys() | files_new.keys()):
        was, now = files_old.get(name), files_new.get(name)
        if was == now:
            continue
        if was is None or now is None:
            return f"source file {name} {'added' if was is None else 'gone'}"
        fields = [_FILE_FIELDS.get(k, k) for k in sorted(was.keys() | now.keys()) if was.get(k) != now.get(k)]
        return f"source file {name} changed: {', '.join(fields)}"
    opts_old, opts_new = old.get("options") or {}, new.get("options") or {}
    # the quant type first: another method records other options (int8 none of blocksize, double_quant,
    # ...), which would otherwise be named instead of the option the user changed
    for key in sorted(opts_old.keys() | opts_new.keys(), key=lambda k: (k != "quant_type", k)):
        if opts_old.get(key) != opts_new.get(key):
            return f"option {key}: {opts_old.get(key)!r} -> {opts_new.get(key)!r}"
    for key in sorted((old.keys() | new.keys()) - {"shards"}):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return "the tensors or their shards differ"


def would_refuse(
    output: Path,
    fingerprint: str,
    plan_json: dict,
    *,
    overwrite: bool,
    protected: tuple[Path, ...] = (),
) -> str | None:
    """The message decide() would refuse ``output`` with, or None; reads the folder, changes nothing
    (dry runs: a run that will be refused must not be reported as one that will convert)."""
    output = output.resolve()
    contains = _contains_source(output, protected)
    if contains or overwrite or not output.exists():
        return contains
    if not output.is_dir():
        return not_a_folder(output)
    if all(is_temp_file(p.name, MANIFEST_NAME) for p in output.iterdir()):  # decide() drops them
        return None
    manifest = Manifest.load(output)
    if manifest is not None and same_plan(manifest, fingerprint, plan_json):
        return None
    return _foreign(output, manifest, plan_json)


def _verified_shards(output: Path, manifest: Manifest, *, deep: bool) -> dict[str, dict]:
    """Shards the manifest records as finished whose bytes still hash to the recorded sha256 (``deep``),
    else whose size is the recorded one and which were not modified after the manifest was written
    (a shard edited in place keeps its size, not its mtime). No mtime is stored: the manifest is part
    of the output, identical for identical conversions."""
    done = {}
    try:
        written = (output / MANIFEST_NAME).stat().st_mtime_ns
    except OSError:
        written = -1
    for name, info in manifest.shards.items():
        path = output / name
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_size != info.get("size"):
            continue
        if deep:
            if sha256_file(path) == info.get("sha256"):
                done[name] = info
        elif st.st_mtime_ns <= written:
            done[name] = info
    return done


class FolderLock:
    """An exclusive flock on the output folder itself (no lock file to clean up), held for a run.

    A second conversion into the same folder fails at once instead of interleaving shards, with
    FolderBusyError (exit 75: retry once the other process ends).
    """

    def __init__(self, folder: Path) -> None:
        fd = lock_folder(folder)
        if fd is None:
            msg = f"{folder}: another quantize-model process is writing this folder; wait for it to finish"
            raise FolderBusyError(msg)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def dangling_link(path: Path) -> str | None:
    """The error for an output ``path`` that is, or lies under, a symbolic link to nothing (a folder
    not created yet), else None: no folder can be made there, and mkdir only says "File exists"."""
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            return (
                f"{p}: a symbolic link to {os.readlink(p)}, which does not exist; "
                "create that folder or remove the link"
            )
    return None


def file_above(path: Path) -> str | None:
    """The error for an output ``path`` under a file (``afile/sub``), else None: no folder can be made
    there, and mkdir's own "Not a directory" names neither the file nor the remedy (an OS error, exit 1,
    where this is the input's fault, exit 2). ``path`` itself being a file is the callers' own case."""
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is None:
        return None
    return f"{path}: {blocker} is a file, not a folder; choose an output folder"


#: removed first when a folder is cleared: without them nothing left in it loads as a checkpoint
_CLEARED_FIRST = ("model.safetensors.index.json", "config.json")


def clear_folder(folder: Path, *, keep: str | None = None) -> None:
    """Empty ``folder`` (for --overwrite) without removing the folder itself, or the entry ``keep``.
    The index and config.json go first."""
    rest = sorted(p for p in folder.iterdir() if p.name not in (keep, *_CLEARED_FIRST))
    for p in [*(folder / n for n in _CLEARED_FIRST if (folder / n).is_file()), *rest]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
