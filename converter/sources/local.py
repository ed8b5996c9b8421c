"""A checkpoint on local disk: a folder (single or sharded safetensors) or one .safetensors file.

Everything is validated up front from the headers, before any tensor data is read: missing shards,
corrupt or truncated files, index entries that are not in their shard, already-quantized and
pickle-only checkpoints each raise a one-line converter.errors exception naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from converter.errors import AlreadyQuantizedError, CorruptFileError, PickleOnlyError, SourceNotFoundError
from converter.sources import looks_like_repo_id
from converter.sources.base import (
    Source,
    TensorInfo,
    check_config_fields,
    check_weight_map,
    ignored_index_note,
    is_extra_file,
    quantized_reason,
)
from converter.sources.mapped import MappedFile, read_header

__all__ = ["LocalSource", "MappedFile", "read_header"]  # MappedFile/read_header: sources.mapped

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
PICKLE_TMP_PREFIX = "quantize-model-pickle-"
_OWNER_NAME = ".owner"  # in each pickle temp folder: flocked by the run that made it, while it lives
_UNOWNED_GRACE_S = 600.0  # a folder without the owner file (older versions) is left alone this long
_COMMIT = re.compile("[0-9a-f]{40}")
_SHA256 = re.compile("[0-9a-f]{64}")


def hub_cache_snapshot(root: Path | str) -> tuple[str, str] | None:
    """(repo id, commit) of a folder that is a snapshot of the Hugging Face cache,
    ``…/models--<org>--<name>/snapshots/<commit>`` (huggingface_hub's layout: the repo id with ``/``
    spelt ``--``, which a repo id cannot hold otherwise), else None. From the path alone, so it also
    reads the path a folder converted before recorded."""
    root = Path(root)
    repo, snapshots = root.parent.parent.name, root.parent.name
    if snapshots != "snapshots" or not repo.startswith("models--") or not _COMMIT.fullmatch(root.name):
        return None
    repo_id = repo.removeprefix("models--").replace("--", "/")
    return (repo_id, root.name) if looks_like_repo_id(repo_id) else None


def older_identity(identity: dict) -> dict | None:
    """``identity`` (a LocalSource's) as the versions before a Hugging Face cache snapshot was recorded
    by its repo id and commit described it, or None where they described it the same: a folder
    converted from the snapshot by them is the same source, resumed or left as it is, not refused."""
    if identity.get("kind") != "local" or "repo_id" not in identity:
        return None
    out = {k: v for k, v in identity.items() if k not in ("repo_id", "commit")}
    files = out.get("files")
    if isinstance(files, dict):
        out["files"] = {n: {k: v for k, v in f.items() if k != "sha256"} for n, f in files.items()}
    return out


def _load_json(path: Path, display: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{display}: not valid JSON ({exc}); fix or re-download it"
        raise CorruptFileError(msg) from None
    if not isinstance(data, dict):
        msg = f"{display}: expected a JSON object; fix or re-download it"
        raise CorruptFileError(msg)
    return data


#: what sample_digest reads of a local weight file: SAMPLE_WINDOWS windows of SAMPLE_BYTES
SAMPLE_WINDOWS, SAMPLE_BYTES = 8, 64 << 10


def sample_digest(path: Path, size: int) -> str:
    """sha256 of ``SAMPLE_WINDOWS`` windows of ``SAMPLE_BYTES`` at evenly spaced offsets of the file
    ``path`` of ``size`` bytes, the first at 0 and the last at its end (the whole file when it is no
    larger than the windows together)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= SAMPLE_WINDOWS * SAMPLE_BYTES:
            h.update(f.read())
        else:
            step = (size - SAMPLE_BYTES) / (SAMPLE_WINDOWS - 1)
            for k in range(SAMPLE_WINDOWS):
                f.seek(round(k * step))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def extra_files_in(root: Path) -> list[str]:
    """The files of the folder ``root`` copied into a converted folder as they are (relative names,
    '/'-separated): top level, plus one level down for sentence-transformers module folders
    (``1_Pooling/config.json``)."""
    candidates = [*root.glob("*"), *root.glob("*/*")]
    rels = sorted(p.relative_to(root).as_posix() for p in candidates if p.is_file())
    return [r for r in rels if not r.startswith(".") and is_extra_file(r)]


class LocalSource(Source):
    def __init__(self, path: Path, *, allow_pickle: bool = False) -> None:
        path = Path(path).expanduser().resolve()
        self._weight_map: dict[str, str] | None = None
        self._notes: list[str] = []
        if not path.exists():
            msg = f"{path}: no such file or folder; check the path"
            raise SourceNotFoundError(msg)
        self.allow_pickle = allow_pickle
        self._pickles: list[str] = []  # pickle weight files converted to safetensors in _tmp
        self._tmp: Path | None = None
        self._tmp_lock = -1  # descriptor holding the flock on _tmp's owner file
        try:
            if path.is_file():
                self.root = path.parent
                if path.suffix == ".safetensors":
                    files = [path.name]
                    note = _lone_shard_note(path)
                    if note:
                        self._notes.append(note)
                else:
                    files = self._from_pickles([path.name])
            else:
                self.root = path
                files = self._find_weight_files()
            self._files = files
            self._config = self._read_config()
            self._headers: dict[str, str] = {}
            self._samples: dict[tuple[str, int, int, int], str] = {}
            self._tensors = self._read_tensors()
            reason = quantized_reason(self._config, self._tensors)
            if reason:
                msg = f"{self.root}: already quantized ({reason}); convert the original checkpoint instead"
                raise AlreadyQuantizedError(msg)
        except BaseException:
            self.close()  # remove temp files made from pickle weights
            raise

    # --- discovery -------------------------------------------------------------------------
    def _find_weight_files(self) -> list[str]:
        index = self.root / INDEX_NAME
        if index.exists():
            data = _load_json(index, str(index))
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                msg = f"{index}: has no weight_map; fix or re-download it"
                raise CorruptFileError(msg)
            weight_map = {str(k): str(v) for k, v in weight_map.items()}
            note = ignored_index_note(str(self.root), weight_map)
            if note and (self.root / SINGLE_NAME).is_file():  # transformers reads model.safetensors first
                self._notes.append(note)
                return [SINGLE_NAME]
            self._weight_map = weight_map
            files = sorted(set(self._weight_map.values()))
            for name in files:
                if not (self.root / name).is_file():
                    msg = f"{self.root / name}: missing (named by {INDEX_NAME}); download the missing shard"
                    raise SourceNotFoundError(msg)
            return files
        if (self.root / SINGLE_NAME).is_file():
            return [SINGLE_NAME]
        found = sorted(p.name for p in self.root.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if len(found) > 1:
            msg = (
                f"{self.root}: {len(found)} .safetensors files but no {INDEX_NAME}; "
                "pass one file as SOURCE or add the index"
            )
            raise SourceNotFoundError(msg)
        return self._from_pickles(self._pickle_names())

    def _pickle_names(self) -> list[str]:
        """pytorch_model.bin, the shards of pytorch_model.bin.index.json, or any lone .bin/.pt file."""
        index = self.root / PICKLE_INDEX_NAME
        if index.is_file():
            weight_map = _load_json(index, str(index)).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                msg = f"{index}: has no weight_map; fix or re-download it"
                raise CorruptFileError(msg)
            names = sorted({str(v) for v in weight_map.values()})
            for name in names:
                if not (self.root / name).is_file():
                    msg = f"{self.root / name}: missing (named by {PICKLE_INDEX_NAME}); download it"
                    raise SourceNotFoundError(msg)
            return names
        return sorted(p.name for p in self.root.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)

    def _from_pickles(self, names: list[str]) -> list[str]:
        """Refuse pickle weights, or with allow_pickle load them (weights_only) into temp safetensors."""
        if not names:
            msg = f"{self.root}: no model.safetensors, {INDEX_NAME} or .safetensors file; check the path"
            raise SourceNotFoundError(msg)
        if not all(n.endswith(PICKLE_SUFFIXES) for n in names):
            msg = f"{self.root / names[0]}: not a .safetensors file; give a safetensors checkpoint"
            raise SourceNotFoundError(msg)
        if not self.allow_pickle:
            msg = (
                f"{self.root}: only pickle weights ({', '.join(names[:3])}); "
                "quantize-model reads safetensors: "
                "re-save the model with transformers' save_pretrained(folder) "
                "(safetensors: its only format in 5.x, the default since 4.35), "
                "or pass --allow-pickle if you trust the files"
            )
            raise PickleOnlyError(msg)
        self._pickles = names
        self._tmp, self._tmp_lock = _make_pickle_dir()
        out = []
        for name in names:
            converted = name.rsplit(".", 1)[0].replace("/", "_") + ".safetensors"
            _pickle_to_safetensors(self.root / name, self._tmp / converted)
            out.append(converted)
        return out

    def _read_config(self) -> dict | None:
        path = self.root / "config.json"
        if not path.is_file():
            return None
        return check_config_fields(_load_json(path, str(path)), str(path), "fix it")

    def _read_tensors(self) -> list[TensorInfo]:
        tensors: list[TensorInfo] = []
        seen: dict[str, str] = {}
        for file in self._files:
            path = self.acquire(file)
            raw, header = read_header(path, str(path))
            self._headers[file] = hashlib.sha256(raw).hexdigest()
            entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
            # On-disk order: the pipeline then reads each file front to back.
            entries.sort(key=lambda kv: (kv[1]["data_offsets"][0], kv[0]))
            for name, entry in entries:
                if name in seen:
                    msg = f"{path}: tensor {name!r} is also in {seen[name]}; remove the duplicate"
                    raise CorruptFileError(msg)
                seen[name] = file
                tensors.append(TensorInfo(name, file, entry["dtype"], tuple(int(d) for d in entry["shape"])))
        if self._weight_map is not None:
            index = str(self.root / INDEX_NAME)
            check_weight_map(index, self._weight_map, seen, "re-download the checkpoint")
        return tensors

    # --- Source ----------------------------------------------------------------------------
    def describe(self) -> dict:
        files = {}
        for name, original in zip(self._files, self._pickles or self._files, strict=True):
            path = self.root / original  # identity of what the user has: the pickle file if any
            st = path.stat()
            files[name] = {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "header_sha256": self._headers[name],
                "sample_sha256": self._sample_digest(path, st),
            }
        out = {"kind": "local", "path": str(self.root), "name": self.root.name, "files": files}
        if self._pickles:
            out["pickle_files"] = list(self._pickles)
        snapshot = hub_cache_snapshot(self.root)
        if snapshot is not None:
            # A snapshot of the Hugging Face cache is that repo at that commit: recorded as a Hub source
            # is (outputs name it repo_id@commit, push's card its base model), each weight file with the
            # sha256 its cache blob is named by, as the Hub lists it.
            out["repo_id"], out["commit"] = snapshot
            for name, original in zip(self._files, self._pickles or self._files, strict=True):
                sha = _blob_sha256(self.root / original)
                if sha is not None:
                    files[name]["sha256"] = sha
        return out

    def _sample_digest(self, path: Path, st: os.stat_result) -> str:
        """``sample_digest`` of a weight file, part of its identity: a file swapped for another of the
        same size and header (other values of the same shapes) with its mtime restored differs in
        every window. Kept per (size, mtime, inode): describe() is called again after the shards."""
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in self._samples:
            self._samples[key] = sample_digest(path, st.st_size)
        return self._samples[key]

    def config(self) -> dict | None:
        return self._config

    def notes(self) -> list[str]:
        return list(self._notes)

    def tensors(self) -> list[TensorInfo]:
        return list(self._tensors)

    def weight_files(self) -> list[str]:
        return list(self._files)

    def acquire(self, file: str) -> Path:
        return (self._tmp if self._tmp is not None else self.root) / file

    def release(self, file: str) -> None:
        """Nothing to free: local files are only memory-mapped."""

    def extra_files(self) -> list[str]:
        return extra_files_in(self.root)

    def copy_extra_file(self, name: str, dest: Path) -> None:
        shutil.copyfile(self.root / name, dest)

    def holds_extra_file(self, name: str, path: Path) -> bool:
        try:
            return path.read_bytes() == (self.root / name).read_bytes()
        except OSError:
            return False

    def close(self) -> None:
        """Delete the temp safetensors made from pickle weights (nothing else is held open)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if self._tmp_lock >= 0:
            os.close(self._tmp_lock)
            self._tmp_lock = -1


def _blob_sha256(path: Path) -> str | None:
    """The sha256 a cache snapshot's file is stored under: huggingface_hub links it to
    ``blobs/<sha256 of its content>`` (an LFS file's; a small git file's blob is named by its 40-hex id)."""
    try:
        blob = Path(os.readlink(path)).name
    except OSError:  # not a link: copied into the snapshot folder by hand
        return None
    return blob if _SHA256.fullmatch(blob) else None


def _lone_shard_note(path: Path) -> str | None:
    """The warning for a SOURCE file that is one shard of the sharded checkpoint beside it (its folder's
    index names it and other files): the output then holds only that shard's tensors under the whole
    model's config.json, which transformers loads with the rest randomly initialized (a warning in its
    log only), and which verify passes. None for any other file."""
    index = path.parent / INDEX_NAME
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        shards = {str(v) for v in weight_map.values()}
        mine = sum(1 for v in weight_map.values() if str(v) == path.name)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
        return None  # no index, or not one that could name it
    if path.name not in shards or len(shards) < 2:
        return None
    return (
        f"{path}: one of the {len(shards)} shards {INDEX_NAME} names, converted alone: the output holds "
        f"{mine} of the model's {len(weight_map)} tensors, and transformers loads the others randomly "
        f"initialized; to convert the whole model, pass the folder {path.parent}"
    )


def _make_pickle_dir() -> tuple[Path, int]:
    """A temp folder for the safetensors made from pickle weights, and the descriptor of the flock
    that marks it as in use (held until close(), dropped by the kernel when the process dies).

    A run killed before close() (SIGKILL, the OOM killer, power loss) cannot delete its folder, which
    holds a full-size copy of the weights; so every new one first deletes the folders whose owner is
    gone. The owner file is locked before it gets its name, so a folder is never seen unlocked while
    its run is alive.
    """
    import fcntl

    remove_stale_pickle_dirs()
    tmp = Path(tempfile.mkdtemp(prefix=PICKLE_TMP_PREFIX))
    fd = os.open(tmp / (_OWNER_NAME + ".new"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(tmp / (_OWNER_NAME + ".new"), tmp / _OWNER_NAME)
    return tmp, fd


def remove_stale_pickle_dirs() -> list[Path]:
    """Delete this user's pickle temp folders (``PICKLE_TMP_PREFIX`` in the temp dir) whose run has
    died; returns them. A folder whose owner file is locked belongs to a live run and stays."""
    import fcntl

    removed = []
    for d in Path(tempfile.gettempdir()).glob(PICKLE_TMP_PREFIX + "*"):
        try:
            if d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
            fd = os.open(d / _OWNER_NAME, os.O_RDONLY)
        except FileNotFoundError:
            # no owner file: a run of an older version, or one between mkdtemp and its lock
            try:
                if time.time() - d.stat().st_mtime > _UNOWNED_GRACE_S:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
            except OSError:
                pass
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # locked: its run is alive
        else:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            os.close(fd)
    return removed


def _pickle_to_safetensors(src: Path, dst: Path) -> None:
    """torch.load(weights_only=True) a pickle state dict and save it as safetensors (tied tensors cloned)."""
    import torch  # pickle sources only: the safetensors path never imports torch
    from safetensors.torch import save_file

    try:
        state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        msg = f"{src}: cannot be loaded with torch.load(weights_only=True) ({reason}); re-save as safetensors"
        raise CorruptFileError(msg) from None
    if not isinstance(state, dict):
        msg = f"{src}: does not hold a state dict; re-save it with save_pretrained"
        raise CorruptFileError(msg)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.contiguous()
            ptr = value.untyped_storage().data_ptr()
            tensors[str(key)] = value.clone() if ptr in seen else value
            seen.add(ptr)
    save_file(tensors, str(dst), metadata={"format": "pt"})
