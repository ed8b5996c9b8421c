"""A checkpoint on the Hugging Face Hub, streamed shard by shard through ``huggingface_hub``.

- The revision is resolved once to a commit (``model_info``); every later request names that commit.
- Only what the conversion needs is listed: the shards named by ``model.safetensors.index.json`` (or
  ``model.safetensors``), ``config.json`` and the tokenizer / generation-config / licence files.
  ``original/*.pth``, ``consolidated.*`` and ``*.bin`` duplicates are never fetched.
- Tensors come from the safetensors headers alone (HTTP range reads), before any shard is downloaded.
- Files already in the shared Hugging Face cache at that commit (or everything, with HF_HUB_OFFLINE=1)
  are read in place and never deleted. Others are downloaded into a private ``local_dir``, one shard
  ahead of the pipeline in a worker thread (at most two source shards on disk), checked against the
  Hub's LFS sha256, and deleted when released, unless ``keep_downloads`` (then they go to the shared
  cache, where later runs and transformers find them).
- Transient failures (5xx, 429 with Retry-After, dropped connections) are retried with backoff on top
  of huggingface_hub's own retries; everything else becomes a one-line converter.errors exception.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from pathlib import Path
from typing import Any

# hf_xet keeps a chunk cache outside our download folder; turn it off so the disk budget holds.
os.environ.setdefault("HF_XET_CHUNK_CACHE_SIZE_BYTES", "0")

import httpx2
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

from converter.errors import (
    AlreadyQuantizedError,
    ConversionFailedError,
    CorruptFileError,
    PickleOnlyError,
    SourceNotFoundError,
)
from converter.locks import lock_folder, locked_temp_folder, remove_if_unlocked
from converter.sources.base import (
    Source,
    TensorInfo,
    check_config_fields,
    check_weight_map,
    ignored_index_note,
    is_extra_file,
    quantized_reason,
)
from converter.sources.hub_client import (  # the error classes are part of this module's API
    DiskTooSmallError,
    HubAccessError,
    HubClient,
    HubDownloadError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    _DownloadCancelledError,
    _short,
)
from converter.units import human_bytes
from converter.writer.manifest import atomic_write_bytes

__all__ = [
    "DiskTooSmallError",
    "HubAccessError",
    "HubDownloadError",
    "HubRepoNotFoundError",
    "HubRevisionNotFoundError",
    "HubSource",
    "estimate_output_bytes",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

logger = logging.getLogger("converter.hub")
DownloadCallback = Callable[[str, int, int], None]  # (file, bytes done so far, file size)


# --- progress ----------------------------------------------------------------------------------
class _ProgressBar:
    """Stands in for tqdm inside hf_hub_download: forwards byte counts to the source's callback."""

    sink: Callable[[str, int], None]
    file: str

    def __init__(self, *, total: int | None = None, initial: int = 0, desc: str = "", **_: Any) -> None:
        self.n = initial
        self.total = total

    def update(self, n: int = 1) -> None:
        self.n += n
        self.sink(self.file, n)

    def close(self) -> None:
        pass

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _download_folder_of(output: Path) -> Path:
    """Where a conversion into ``output`` downloads: beside it (the same disk, usually larger than
    /tmp), under a fixed name, so that a rerun after a crash reuses or removes what it left."""
    return output.parent / f".{output.name}.quantize-model-download"


def _locked_folder(folder: Path) -> int | None:
    """Create ``folder`` if needed and take an exclusive flock on it: the descriptor that holds it, or
    None when another process holds it (the lock goes when that process ends, even killed)."""
    for _ in range(3):
        folder.mkdir(parents=True, exist_ok=True)
        fd = lock_folder(folder)
        if fd is None:
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(folder)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its last user removed it between the mkdir and the lock: make it again
    return None


#: The name of a download folder of a run's own in $TMPDIR (or ``download_dir``).
_TEMP_PREFIX = "quantize-model-download-"


def _own_folders_of(output: Path) -> list[Path]:
    """The download folders of their own that runs into ``output`` made beside it
    (``locked_temp_folder``) while another run held ``_download_folder_of(output)``."""
    fixed = _download_folder_of(output)
    return sorted(fixed.parent.glob(glob.escape(fixed.name) + "-*"))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def _git_sha1_file(path: Path) -> str:
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def estimate_output_bytes(tensors: list[TensorInfo]) -> int:
    """An upper-ish estimate of the quantized folder: 2-D float weights at ~4.3 bits, the rest as is.

    Embeddings and output heads usually stay 16-bit, so they are counted whole.
    """
    total = 0
    for t in tensors:
        keep = any(k in t.name for k in ("embed", "lm_head", "wte", "wpe", "norm"))
        if len(t.shape) == 2 and t.dtype in ("F32", "F16", "BF16") and not keep:
            total += t.numel // 2 + t.numel // 64 + 4096
        else:
            total += t.nbytes
    return int(total * 1.05) + (16 << 20)


class _RangeFile:
    """A streamed Hub file: each ``get`` is one HTTP range request for one tensor.

    ``prefetch(name)`` (called by the pipeline for the next tensor, as for MappedFile) starts that
    request in the source's range-read thread, so one tensor downloads while another is quantized.
    """

    def __init__(self, source: HubSource, file: str) -> None:
        self.source, self.file = source, file
        self._infos = {t.name: t for t in source.tensors() if t.file == file}
        self._pending: dict[str, Future[Any]] = {}

    def prefetch(self, name: str) -> None:
        if name in self._infos and name not in self._pending:
            self._pending[name] = self.source._range_pool().submit(self.source.read_array, self._infos[name])

    def get_array(self, name: str) -> tuple[Any, str]:
        """(numpy array, safetensors dtype code) of one tensor; bf16 as uint16 bits."""
        pending = self._pending.pop(name, None)
        return pending.result() if pending is not None else self.source.read_array(self._infos[name])

    def get(self, name: str) -> Any:
        from converter.sources.mapped import as_torch

        return as_torch(*self.get_array(name))

    def prefetch_rows(self, name: str, start: int, stop: int) -> None:
        """Nothing: a row range is one small request, read when asked for."""

    def get_rows(self, name: str, start: int, stop: int) -> Any:
        """Rows ``start:stop`` along the first dimension of ``name``: one HTTP range request for those
        bytes only (a Llama 4 expert of a fused 3-D experts tensor, converter/sources/llama4.py)."""
        import numpy as np

        from converter.sources.mapped import as_torch, numpy_dtype, row_span

        info = self._infos[name]
        begin, end = self.source._offsets[(self.file, name)]
        skip, length = row_span(end - begin, info.shape, start, stop)
        shape = (stop - start, *info.shape[1:])
        np_dtype = numpy_dtype(info.dtype, f"tensor {name!r} in {self.source.repo_id}/{self.file}")
        data = bytearray(self.source.read_tensor_bytes(self.file, name, skip, length))
        if not data:
            return as_torch(np.empty(shape, dtype=np_dtype), info.dtype)
        return as_torch(np.frombuffer(data, dtype=np_dtype).reshape(shape), info.dtype)


class HubSource(Source):
    """A Hub repo as a conversion source (see the module docstring)."""

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        keep_downloads: bool = False,
        allow_pickle: bool = False,
        disk_budget: int | None = None,
        cache_dir: str | Path | None = None,
        endpoint: str | None = None,
        output_dir: str | Path | None = None,
        download_dir: str | Path | None = None,
        on_download: DownloadCallback | None = None,
        attempts: int = 5,
        stream_large: bool = False,
    ) -> None:
        self.repo_id = repo_id
        self.requested_revision = revision
        self.keep_downloads = keep_downloads
        self.allow_pickle = allow_pickle
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.on_download = on_download
        self.client = HubClient(repo_id, token=token, endpoint=endpoint, attempts=attempts)
        self.client.revision = revision or "main"
        self.offline = constants.is_offline_mode()
        self._lock = threading.Condition()
        self._executor: ThreadPoolExecutor | None = None
        self._hasher: ThreadPoolExecutor
        self._range_executor: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future[Path]] = {}
        self._live: set[str] = set()  # private downloads on disk (or in flight), not yet released
        self._released: set[str] = set()
        self._order: list[str] = []
        self._in_place: dict[str, Path] = {}  # cached files: read where they are, never deleted
        self._small: dict[str, Path] = {}
        self._by_key: dict[tuple[str, str], TensorInfo] = {}  # (file, name): tensor_elsewhere's lookup
        self._converted: dict[str, Path] = {}  # pickle shards turned into temp safetensors
        self._streamed: set[str] = set()  # read by HTTP range, tensor by tensor (stream_large)
        self.stream_large = stream_large
        self.bytes_downloaded = 0
        self._file_done: dict[str, int] = {}
        self.peak_live = 0
        self._closed = False
        self._dl_dir: Path | None = None
        self._owns_dl_dir = False
        self._dl_lock: int | None = None  # descriptor holding the flock on the folder beside the output
        self._download_dir_arg = Path(download_dir) if download_dir is not None else None
        self._output_dir = Path(output_dir).expanduser().resolve() if output_dir is not None else None
        try:
            self._resolve()
            self._plan_files()
            self._config = self._read_config()
            self._tensors = self._read_tensors()
            reason = quantized_reason(self._config, self._tensors)
            if reason:
                msg = f"{repo_id}: already quantized ({reason}); convert the original checkpoint instead"
                raise AlreadyQuantizedError(msg)
            self._check_disk(disk_budget)
            self._order = list(self._files)
        except BaseException:
            self.close()
            raise

    # --- resolution and listing ----------------------------------------------------------------
    def _resolve(self) -> None:
        """Pin the revision to a commit and list the files (with sizes and LFS sha256)."""
        self._sizes: dict[str, int] = {}
        self._sha256: dict[str, str] = {}
        self._git_oid: dict[str, str] = {}
        if self.offline:
            from huggingface_hub import snapshot_download

            try:
                folder = snapshot_download(
                    self.repo_id,
                    revision=self.requested_revision,
                    cache_dir=self.cache_dir,
                    local_files_only=True,
                )
            except Exception as exc:
                raise self.client.map_error(exc, "offline lookup") from exc
            self._snapshot = Path(folder)
            self.commit = self._snapshot.name
            names = sorted(
                p.relative_to(self._snapshot).as_posix() for p in self._snapshot.rglob("*") if p.is_file()
            )
            for n in names:
                self._sizes[n] = (self._snapshot / n).stat().st_size
            self._names = names
            return
        self._snapshot = None
        info = self.client.call(
            "model info",
            lambda: self.client.api.model_info(
                self.repo_id, revision=self.requested_revision, files_metadata=True
            ),
        )
        self.commit = str(info.sha)
        self.client.revision = self.commit
        names = []
        for s in info.siblings or []:
            names.append(s.rfilename)
            if s.size is not None:
                self._sizes[s.rfilename] = int(s.size)
            if s.lfs is not None:
                self._sha256[s.rfilename] = s.lfs.sha256
            elif s.blob_id:
                self._git_oid[s.rfilename] = s.blob_id
        self._names = sorted(names)

    def _plan_files(self) -> None:
        names = set(self._names)
        self._weight_map: dict[str, str] | None = None
        self._pickle_files: list[str] = []
        self._notes: list[str] = []
        if INDEX_NAME in names:
            index = self._load_json(INDEX_NAME)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                msg = f"{self.repo_id}: {INDEX_NAME} has no weight_map; report it to the repo owner"
                raise CorruptFileError(msg)
            weight_map = {str(k): str(v) for k, v in weight_map.items()}
            note = ignored_index_note(self.repo_id, weight_map)
            if note and SINGLE_NAME in names:  # transformers downloads model.safetensors first
                self._notes.append(note)
                self._files = [SINGLE_NAME]
                return
            self._weight_map = weight_map
            files = sorted(set(self._weight_map.values()))
            missing = [f for f in files if f not in names]
            if missing:
                if self.offline:  # the listing is the local snapshot's, not the repo's
                    msg = (
                        f"{self.repo_id}@{self.commit[:12]}: {missing[0]} is not in the local cache and "
                        "HF_HUB_OFFLINE=1; unset HF_HUB_OFFLINE (or download the whole repo first)"
                    )
                else:
                    msg = (
                        f"{self.repo_id}@{self.commit[:12]}: {missing[0]} is named by {INDEX_NAME} "
                        "but not in the repo; report it to the repo owner"
                    )
                raise SourceNotFoundError(msg)
            self._files = files
            return
        if SINGLE_NAME in names:
            self._files = [SINGLE_NAME]
            return
        top = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
        if len(top) == 1:
            self._files = top
            return
        if len(top) > 1:
            msg = (
                f"{self.repo_id}: {len(top)} .safetensors files but no {INDEX_NAME}; "
                "cannot tell which is the model"
            )
            raise SourceNotFoundError(msg)
        pickles = self._pickle_candidates(names)
        if not pickles and self.offline:  # the listing is the local snapshot's: what was cached, not the repo
            held = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
            msg = (
                f"{self.repo_id}@{self.commit[:12]}: its weights are not in the local Hugging Face cache "
                f"(the cached snapshot holds {len(names)} file(s){': ' + held if names else ''}) and "
                "HF_HUB_OFFLINE=1; unset HF_HUB_OFFLINE to download them (or download the whole repo first)"
            )
            raise SourceNotFoundError(msg)
        if not pickles:
            msg = (
                f"{self.repo_id}@{self.commit[:12]}: no safetensors weights "
                f"(no {SINGLE_NAME} or {INDEX_NAME}); is this a model repo with transformers weights?"
            )
            raise SourceNotFoundError(msg)
        if not self.allow_pickle:
            msg = (
                f"{self.repo_id}: only pickle weights ({', '.join(pickles[:3])}); "
                "pass --allow-pickle to load them "
                "with torch.load(weights_only=True), or use a repo with safetensors weights"
            )
            raise PickleOnlyError(msg)
        self._pickle_files = pickles
        self._files = [self._converted_name(p) for p in pickles]

    def _pickle_candidates(self, names: set[str]) -> list[str]:
        if PICKLE_INDEX in names:
            index = self._load_json(PICKLE_INDEX)
            return sorted(set(str(v) for v in (index.get("weight_map") or {}).values()))
        if PICKLE_SINGLE in names:
            return [PICKLE_SINGLE]
        return sorted(
            n for n in names if "/" not in n and n.endswith((".bin", ".pt")) and not n.startswith("training")
        )

    @staticmethod
    def _converted_name(pickle_name: str) -> str:
        return pickle_name.rsplit(".", 1)[0] + ".safetensors"

    # --- small files ---------------------------------------------------------------------------
    def _cached_path(self, name: str) -> Path | None:
        if self._snapshot is not None:
            p = self._snapshot / name
            return p if p.is_file() else None
        found = try_to_load_from_cache(self.repo_id, name, cache_dir=self.cache_dir, revision=self.commit)
        return Path(found) if isinstance(found, str) else None

    def _download_dir(self) -> Path:
        if self._dl_dir is None:
            if self._download_dir_arg is None and self._output_dir is not None:
                # beside the output: a rerun after a crash reuses a finished download there
                fixed = _download_folder_of(self._output_dir)
                self._dl_lock = _locked_folder(fixed)
                if self._dl_lock is not None:
                    self._dl_dir = fixed
                    self._owns_dl_dir = True
                    return fixed
                # Another run into the same output downloads there (this one will be refused by the
                # output's lock): a folder of its own, so that cleaning up never touches the other's,
                # locked as the fixed one is, so that a run killed while using it is seen to be gone.
                self._dl_dir, self._dl_lock = locked_temp_folder(fixed.parent, fixed.name + "-")
            else:
                self._dl_dir, self._dl_lock = locked_temp_folder(self._temp_base(), _TEMP_PREFIX)
            self._owns_dl_dir = True
        return self._dl_dir

    def _temp_base(self) -> Path:
        """Where a source without an output folder downloads (into a folder of its own)."""
        if self._download_dir_arg is None:
            return Path(tempfile.gettempdir())
        self._download_dir_arg.mkdir(parents=True, exist_ok=True)
        return self._download_dir_arg

    def _fetch(self, name: str, *, progress: bool = False) -> Path:
        """A local path to ``name``: the cache in place, else a verified download."""
        cached = self._cached_path(name)
        if cached is not None:
            return cached
        return self._checked(name, self._download(name, progress=progress), progress=progress)

    def _download(self, name: str, *, progress: bool = False, force: bool = False) -> Path:
        """hf_hub_download into the private folder (or, with keep_downloads, the shared cache)."""
        if self.offline:
            msg = (
                f"{self.repo_id}: {name} is not in the local cache and HF_HUB_OFFLINE=1; unset HF_HUB_OFFLINE"
            )
            raise SourceNotFoundError(msg)
        bar = None
        if progress:
            bar = type("Bar", (_ProgressBar,), {"sink": staticmethod(self._count_bytes), "file": name})
        kwargs: dict[str, Any] = {
            "revision": self.commit,
            "token": self.client.token,
            "endpoint": self.client.endpoint,
            "cache_dir": self.cache_dir,
            "tqdm_class": bar,
            "force_download": force,
        }
        if not self.keep_downloads:
            kwargs["local_dir"] = self._download_dir()
        path = Path(
            self.client.call("download", lambda: hf_hub_download(self.repo_id, name, **kwargs), file=name)
        )
        if self.keep_downloads:
            self._record_ref()
        return path

    def _record_ref(self) -> None:
        """Point the shared cache's ref of the requested revision (``main`` by default) at the pinned
        commit, as ``hf_hub_download(revision="main")`` does: files downloaded by commit sha alone are
        invisible to an offline run (ours, or transformers') that asks for the branch."""
        requested = self.requested_revision or "main"
        if requested == self.commit:
            return
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        folder = Path(self.cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(
            repo_id=self.repo_id, repo_type="model"
        )
        ref = folder / "refs" / requested
        if ref.is_file() and ref.read_text() == self.commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        # a temp file of its own, renamed: two runs recording the ref at once never mix their writes
        atomic_write_bytes(ref, self.commit.encode())

    def _checked(self, name: str, path: Path, *, progress: bool = False) -> Path:
        """``path`` once its bytes match the Hub's hash; one fresh download if they do not."""
        for attempt in range(2):
            if self._verify(name, path):
                if progress:
                    logger.info("downloaded %s (%s)", name, human_bytes(path.stat().st_size, 1))
                return path
            path.unlink(missing_ok=True)
            if attempt == 0:
                path = self._download(name, progress=progress, force=True)
        expected = self._sha256.get(name) or self._git_oid.get(name)
        msg = (
            f"{self.repo_id}: {name} downloaded twice but does not match the Hub's hash {expected}; "
            "rerun later or report it to the repo owner"
        )
        raise HubDownloadError(msg)

    def _verify(self, name: str, path: Path) -> bool:
        if name in self._sha256:
            return _sha256_file(path) == self._sha256[name]
        if name in self._git_oid:
            return _git_sha1_file(path) == self._git_oid[name]
        return True

    def _count_bytes(self, file: str, n: int) -> None:
        if self._closed:
            # Closed while downloading (Ctrl-C, an error): stop at the next chunk instead of
            # finishing a multi-GB file nobody will read; hf_hub_download removes its temp file.
            raise _DownloadCancelledError(file)
        with self._lock:
            self.bytes_downloaded += n
            self._file_done[file] = self._file_done.get(file, 0) + n
            done = self._file_done[file]
        if self.on_download is not None:
            self.on_download(file, done, self._sizes.get(file, 0))

    def _load_json(self, name: str) -> dict:
        path = self._fetch(name)
        self._small[name] = path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            msg = f"{self.repo_id}: {name} is not valid JSON ({exc}); report it to the repo owner"
            raise CorruptFileError(msg) from None
        if not isinstance(data, dict):
            msg = f"{self.repo_id}: {name} is not a JSON object; report it to the repo owner"
            raise CorruptFileError(msg)
        return data

    def _read_config(self) -> dict | None:
        if "config.json" not in self._names:
            return None
        config = self._load_json("config.json")
        return check_config_fields(config, f"{self.repo_id}: config.json", "report it to the repo owner")

    # --- headers -------------------------------------------------------------------------------
    def _read_tensors(self) -> list[TensorInfo]:
        if self._pickle_files:
            self._convert_pickles()
        tensors: list[TensorInfo] = []
        seen: dict[str, str] = {}
        self._data_start: dict[str, int] = {}
        self._offsets: dict[tuple[str, str], tuple[int, int]] = {}
        for file in self._files:
            for name, dtype, shape, (begin, end) in self._header_entries(file):
                if name in seen:
                    msg = (
                        f"{self.repo_id}: tensor {name!r} is in both {seen[name]} and {file}; "
                        "report it to the repo owner"
                    )
                    raise CorruptFileError(msg)
                seen[name] = file
                self._offsets[(file, name)] = (begin, end)
                tensors.append(TensorInfo(name, file, dtype, shape))
        if self._weight_map is not None:
            index = f"{self.repo_id}: {INDEX_NAME}"
            check_weight_map(index, self._weight_map, seen, "report it to the repo owner")
        return tensors

    def _header_entries(self, file: str) -> list[tuple[str, str, tuple[int, ...], tuple[int, int]]]:
        local = self._converted.get(file) or self._cached_path(file)
        if local is not None:
            from converter.sources.mapped import read_header

            raw, header = read_header(local, f"{self.repo_id}/{file}")
            self._data_start[file] = len(raw)
            items = [
                (k, v["dtype"], tuple(int(d) for d in v["shape"]), tuple(v["data_offsets"]))
                for k, v in header.items()
                if k != "__metadata__"
            ]
        else:
            meta = self.client.call(
                "header read",
                lambda: self.client.api.parse_safetensors_file_metadata(
                    self.repo_id, file, revision=self.commit
                ),
                file=file,
            )
            items = [
                (k, v.dtype, tuple(int(d) for d in v.shape), tuple(v.data_offsets))
                for k, v in meta.tensors.items()
            ]
        # On-disk order, as LocalSource: the pipeline then reads each file front to back.
        items.sort(key=lambda e: (e[3][0], e[0]))
        return items  # type: ignore[return-value]

    def _convert_pickles(self) -> None:
        """Download each pickle shard, load it with weights_only=True, save it as a temp safetensors."""
        import torch
        from safetensors.torch import save_file

        for pickle_name in self._pickle_files:
            path = self._fetch(pickle_name, progress=True)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                msg = (
                    f"{self.repo_id}: {pickle_name} cannot be loaded with torch.load(weights_only=True) "
                    f"({_short(exc)})"
                )
                raise CorruptFileError(msg) from None
            if not isinstance(state, dict):
                msg = f"{self.repo_id}: {pickle_name} does not hold a state dict"
                raise CorruptFileError(msg)
            tensors: dict[str, torch.Tensor] = {}
            seen_ptrs: set[int] = set()
            for k, v in state.items():
                if not isinstance(v, torch.Tensor):
                    continue
                v = v.contiguous()
                ptr = v.untyped_storage().data_ptr()
                tensors[str(k)] = v.clone() if ptr in seen_ptrs else v  # tied weights share storage
                seen_ptrs.add(ptr)
            out = self._download_dir() / self._converted_name(pickle_name)
            save_file(tensors, str(out), metadata={"format": "pt"})
            del state, tensors
            if self._cached_path(pickle_name) is None and not self.keep_downloads:
                path.unlink(missing_ok=True)
            self._converted[self._converted_name(pickle_name)] = out

    def download_progress(self) -> dict[str, int]:
        """Bytes downloaded so far per file (a display attaching late seeds itself from this)."""
        with self._lock:
            return dict(self._file_done)

    # --- disk plan -----------------------------------------------------------------------------
    def download_plan(self) -> dict[str, int]:
        """Weight files that must be downloaded, with their sizes (cached ones are read in place)."""
        return {
            f: self._sizes.get(f, 0)
            for f in self._files
            if f not in self._converted and f not in self._streamed and self._cached_path(f) is None
        }

    def _check_disk(self, disk_budget: int | None) -> None:
        """Refuse before downloading anything when the plan cannot fit (from the repo's file sizes).

        With ``stream_large``, the largest files are switched to HTTP range reads (never on disk)
        one by one until the rest fits; without it, or when even the output cannot fit, refuse.
        """
        while True:
            try:
                self._check_disk_once(disk_budget)
                return
            except DiskTooSmallError:
                plan = self.download_plan()
                if not self.stream_large or not plan:
                    raise
                self._streamed.add(max(plan, key=lambda f: (plan[f], f)))

    def _check_disk_once(self, disk_budget: int | None) -> None:
        plan = self.download_plan()
        sizes = sorted(plan.values(), reverse=True)
        need_dl = sum(sizes) if self.keep_downloads else sum(sizes[:2])
        what_dl = (
            "all source shards (--keep-downloads)" if self.keep_downloads else "the two largest source shards"
        )
        need_out = estimate_output_bytes(self._tensors)
        self.planned_disk = {"downloads": need_dl, "output": need_out}
        # Each filesystem: (where, [(bytes, what)]); downloads and output share one when on the same disk.
        checks: dict[Any, tuple[str, list[tuple[int, str]]]] = {}
        if disk_budget is not None:
            parts = [(need_dl, what_dl)] + ([(need_out, "the estimated output")] if self._output_dir else [])
            checks["budget"] = ("the disk budget", parts)
            free_of = {"budget": disk_budget}
        else:
            free_of = {}
            if plan:
                where = self._disk_probe(self._download_target())
                dev = os.stat(where).st_dev
                checks[dev] = (str(where), [(need_dl, what_dl)])
                free_of[dev] = shutil.disk_usage(where).free
            if self._output_dir is not None:
                where = self._disk_probe(self._output_dir)
                dev = os.stat(where).st_dev
                checks.setdefault(dev, (str(where), []))[1].append((need_out, "the estimated output"))
                free_of.setdefault(dev, shutil.disk_usage(where).free)
        for key, (where, parts) in checks.items():
            need, free = sum(n for n, _ in parts), free_of[key]
            if need > free:
                detail = " + ".join(f"{what} {human_bytes(n, 1)}" for n, what in parts)
                msg = (
                    f"{self.repo_id}: needs {human_bytes(need, 1)} on {where} ({detail}) "
                    f"but it has {human_bytes(free, 1)} free; free some space or choose another output folder"
                )
                raise DiskTooSmallError(msg)

    def _download_target(self) -> Path:
        if self.keep_downloads:
            return Path(self.cache_dir or constants.HF_HUB_CACHE)
        if self._download_dir_arg is not None:
            return self._download_dir_arg
        if self._output_dir is not None:
            return self._output_dir.parent
        return Path(tempfile.gettempdir())

    @staticmethod
    def _disk_probe(path: Path) -> Path:
        path = Path(path).expanduser().resolve()
        while not path.exists() and path != path.parent:
            path = path.parent
        return path

    # --- prefetching ---------------------------------------------------------------------------
    def set_needed(self, files: list[str]) -> None:
        """Only these weight files will be acquired (resume skips finished shards): prefetch just them,
        starting now, so the first download overlaps the pipeline's planning."""
        with self._lock:
            needed = set(files)
            self._order = [f for f in self._files if f in needed]
            self._prefetch_next()

    def _is_private(self, file: str) -> bool:
        """A file we download ourselves (not converted from pickle, not streamed, not cached)."""
        return file not in self._converted and file not in self._streamed and self._cached_path(file) is None

    def _schedule(self, file: str) -> None:
        """Start downloading ``file`` in the worker (caller holds the lock)."""
        if file in self._futures:
            return
        if self._executor is None:
            # One download at a time (as the baseline), and hashing in its own thread so checking
            # shard k does not delay the download of shard k+1.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-download")
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-sha256")
        self._live.add(file)
        self.peak_live = max(self.peak_live, len(self._live))
        result: Future[Path] = Future()
        hasher = self._hasher

        def settle(value: Path | None = None, exc: BaseException | None = None) -> None:
            # close() cancels ``result`` while a download may still be running: whatever it ends with
            # then has no one to go to (setting it would raise InvalidStateError in this callback)
            try:
                if exc is not None:
                    result.set_exception(exc)
                else:
                    result.set_result(value)  # type: ignore[arg-type]
            except InvalidStateError:
                pass

        def check(path: Path) -> None:
            try:
                value = self._checked(file, path, progress=True)
            except BaseException as exc:
                settle(exc=exc)
            else:
                settle(value)

        def downloaded(done: Future[Path]) -> None:
            if done.cancelled():
                result.cancel()
            elif done.exception() is not None:
                settle(exc=done.exception())
            else:
                try:
                    hasher.submit(check, done.result())
                except RuntimeError as exc:  # the source was closed meanwhile
                    settle(exc=exc)

        self._executor.submit(self._download, file, progress=True).add_done_callback(downloaded)
        self._futures[file] = result

    def _prefetch_next(self) -> None:
        """Start the next needed private file while fewer than two are on disk (caller holds the lock)."""
        if self._closed:
            return
        for f in self._order:
            if f in self._released or f in self._futures or not self._is_private(f):
                continue
            if len(self._live) < 2:
                self._schedule(f)
            return

    def _range_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._range_executor is None:
                self._range_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-range")
            return self._range_executor

    def is_streamed(self, file: str) -> bool:
        """Whether ``file`` is too large for the disk budget and is read by HTTP range instead."""
        return file in self._streamed

    def open_file(self, file: str) -> Any:
        """The tensors of ``file`` as an object with ``.get(name) -> torch.Tensor``.

        A streamed file is read tensor by tensor through HTTP range requests; any other file is
        acquired and memory-mapped (converter.sources.mapped.MappedFile). Pair with ``release``.
        """
        if file in self._streamed:
            return _RangeFile(self, file)
        from converter.sources.mapped import MappedFile

        return MappedFile(self.acquire(file), file)

    def acquire(self, file: str) -> Path:
        if file not in self._files:
            msg = f"{self.repo_id}: {file} is not a weight file of this source"
            raise SourceNotFoundError(msg)
        if file in self._streamed:
            msg = (
                f"{self.repo_id}: {file} ({human_bytes(self._sizes.get(file, 0), 1)}) "
                "does not fit the disk budget "
                "and is read by HTTP range only (open_file); free disk space to convert it from a whole file"
            )
            raise ConversionFailedError(msg)
        if file in self._converted:
            return self._converted[file]
        cached = self._cached_path(file)
        if cached is not None:
            with self._lock:
                self._prefetch_after(file)
            return cached
        with self._lock:
            self._released.discard(file)
            self._schedule(file)
            future = self._futures[file]
            self._prefetch_after(file)
        return future.result()

    def _prefetch_after(self, file: str) -> None:
        # Prefetch only files after this one: a resumed run starts past its finished shards, and
        # files before the first one acquired are never needed (acquire() still fetches any file).
        if file in self._order:
            self._order = self._order[self._order.index(file) :]
        self._prefetch_next()

    def release(self, file: str) -> None:
        with self._lock:
            future = self._futures.pop(file, None)
            self._released.add(file)
            self._live.discard(file)
            if future is not None and not self.keep_downloads and self._is_private(file):
                try:
                    path = future.result()
                except Exception:
                    path = None
                if path is not None and self._dl_dir is not None and path.is_relative_to(self._dl_dir):
                    path.unlink(missing_ok=True)
            self._prefetch_next()

    def read_tensor_bytes(self, file: str, name: str, skip: int = 0, length: int | None = None) -> bytes:
        """The raw bytes of one tensor through an HTTP range request (no download of the file); with
        ``skip``/``length``, only that part of them."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        begin, end = self._offsets[(file, name)]
        begin += skip
        if length is not None:
            end = min(end, begin + length)
        url = hf_hub_url(self.repo_id, file, revision=self.commit, endpoint=self.client.endpoint)
        headers = build_hf_headers(token=self.client.token)
        if file not in self._data_start:

            def prefix() -> int:
                r = get_session().get(url, headers={**headers, "Range": "bytes=0-7"}, follow_redirects=True)
                hf_raise_for_status(r)
                return 8 + int.from_bytes(r.content[:8], "little")

            self._data_start[file] = self.client.call("header read", prefix, file=file)
        start = self._data_start[file] + begin
        if end == begin:
            return b""

        def get() -> bytes:
            rng = f"bytes={start}-{start + end - begin - 1}"
            r = get_session().get(url, headers={**headers, "Range": rng}, follow_redirects=True)
            hf_raise_for_status(r)
            if len(r.content) != end - begin:
                msg = f"short range read of {name}"
                raise httpx2.RemoteProtocolError(msg)
            return r.content

        data = self.client.call("range read", get, file=file)
        with self._lock:
            self.bytes_downloaded += len(data)
        return data

    def tensor_elsewhere(self, file: str, name: str) -> Any:
        """Tensor ``name`` of ``file``, read for a tensor of another file (an FP8 weight whose scale
        transformers' save_pretrained put in the next shard): from ``file`` where it is on disk already
        (the cache, a pickle conversion, a download in hand), else by one HTTP range request. Acquiring
        the file downloaded it whole for one small tensor, again after its release had deleted it, and
        kept it on disk beside the two the disk budget counts."""
        from converter.sources.mapped import MappedFile

        path = self._converted.get(file) or self._cached_path(file)
        if path is None:
            with self._lock:
                future = self._futures.get(file)
            if future is not None and future.done() and not future.cancelled() and future.exception() is None:
                path = future.result()
        if path is not None:
            return MappedFile(path, file).get(name)
        if not self._by_key:
            self._by_key = {(t.file, t.name): t for t in self._tensors}
        return self.read_tensor(self._by_key[(file, name)])

    def read_array(self, info: TensorInfo) -> tuple[Any, str]:
        """One tensor as (numpy array, dtype code), read by HTTP range (files larger than the disk budget)."""
        import numpy as np

        from converter.sources.mapped import NP_DTYPES

        np_dtype = NP_DTYPES.get(info.dtype)
        if np_dtype is None:
            msg = f"tensor {info.name!r} in {self.repo_id}/{info.file}: dtype {info.dtype} is not supported"
            raise CorruptFileError(msg)
        data = bytearray(self.read_tensor_bytes(info.file, info.name))
        if not data:
            return np.empty(info.shape, dtype=np_dtype), info.dtype
        return np.frombuffer(data, dtype=np_dtype).reshape(info.shape), info.dtype

    def read_tensor(self, info: TensorInfo) -> Any:
        """One tensor as a torch tensor, read by HTTP range (for files larger than the disk budget)."""
        from converter.sources.mapped import as_torch

        return as_torch(*self.read_array(info))

    # --- Source --------------------------------------------------------------------------------
    def describe(self) -> dict:
        # The content is pinned by the commit: the requested name (main, a tag, the sha itself) is
        # left out so a rerun naming the same commit differently still resumes.
        return {
            "kind": "hub",
            "repo_id": self.repo_id,
            "commit": self.commit,
            "files": {
                f: {"size": self._sizes.get(f), "sha256": self._file_sha256(f)}
                for f in (self._pickle_files or self._files)
            },
        }

    def _file_sha256(self, name: str) -> str | None:
        """The LFS sha256 from the listing, or offline the cache blob's name (blobs are named by it)."""
        if name in self._sha256:
            return self._sha256[name]
        cached = self._cached_path(name)
        if cached is not None and cached.is_symlink():
            blob = Path(os.readlink(cached)).name
            if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
                return blob
        return None

    def config(self) -> dict | None:
        return self._config

    def notes(self) -> list[str]:
        return list(self._notes)

    def tensors(self) -> list[TensorInfo]:
        return list(self._tensors)

    def weight_files(self) -> list[str]:
        return list(self._files)

    def extra_files(self) -> list[str]:
        return [n for n in self._names if not n.startswith(".") and is_extra_file(n)]

    def copy_extra_file(self, name: str, dest: Path) -> None:
        path = self._small.get(name) or self._fetch(name)
        shutil.copyfile(path, dest)
        if self._dl_dir is not None and path.is_relative_to(self._dl_dir) and not self.keep_downloads:
            path.unlink(missing_ok=True)
            self._small.pop(name, None)

    def holds_extra_file(self, name: str, path: Path) -> bool:
        """Checked against the Hub's listing (size, then LFS sha256 or git blob id), or the cached
        snapshot offline: nothing is downloaded."""
        try:
            if self._snapshot is not None:
                return path.read_bytes() == (self._snapshot / name).read_bytes()
            return path.stat().st_size == self._sizes.get(name, path.stat().st_size) and self._verify(
                name, path
            )
        except OSError:
            return False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for f in self._futures.values():
                f.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._hasher.shutdown(wait=True, cancel_futures=True)
        if self._range_executor is not None:
            self._range_executor.shutdown(wait=True, cancel_futures=True)
        if self._owns_dl_dir and self._dl_dir is not None:
            shutil.rmtree(self._dl_dir, ignore_errors=True)
        if self._dl_lock is not None:
            os.close(self._dl_lock)  # drops the flock, once the folder is gone
            self._dl_lock = None
        self._remove_abandoned_download_folder()

    def _remove_abandoned_download_folder(self) -> None:
        """Remove the folder beside the output that a killed run downloaded into, when this run did not
        use it (everything came from the cache, --keep-downloads, nothing left to download) and no
        other run holds its lock: otherwise nothing ever would. So too the folders of their own that
        killed runs made beside it while another run held it, or in $TMPDIR / ``download_dir`` without
        an output folder (never reused: nothing tells which source a download there was from)."""
        if self._output_dir is not None and self._download_dir_arg is None:
            folders = [_download_folder_of(self._output_dir), *_own_folders_of(self._output_dir)]
        else:  # and those of killed runs without an output folder (in $TMPDIR or download_dir)
            base = self._download_dir_arg or Path(tempfile.gettempdir())
            folders = sorted(base.glob(_TEMP_PREFIX + "*"))
        for folder in folders:
            if folder != self._dl_dir:
                remove_if_unlocked(folder)
