"""``load_quantized_state``: a checkpoint folder as ``name -> QuantizedTensor | torch.Tensor``.

Shards are memory-mapped: every tensor is a view of the mapping (private, copy-on-write), so
nothing is read from disk before it is used and nothing is copied. Each shard is validated
structurally first (``formats.validate``: header, offsets, every bnb key group), and, with
``verify=True``, its chunk digests (xxh3_128, or sha256 where the index has no other; formats/chunks.py)
are checked against the index before any tensor is handed out.

Reads checkpoints written by quantize-model and by transformers + bitsandbytes (``save_pretrained``
of a 4-bit or 8-bit model): nf4 and fp4, nested or not, any ``quant_storage``, and LLM.int8
(``formats.int8.Int8Tensor``: codes, SCB), with the stored
``quant_map`` / ``nested_quant_map`` used as they are. A folder without a quantized weight, a
pickle-only folder, or an unknown layout is refused with an error naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from converter.errors import CorruptFileError, InputError, PickleOnlyError, SourceNotFoundError
from converter.loader import timing
from converter.loader.devices import check_device, device_argument
from converter.units import first_of
from formats.gc_pause import gc_paused
from formats.index import INDEX_NAME, INDEX_REMEDY, Verification, read_index, start_verify
from formats.int8 import Int8Tensor
from formats.reader import open_checkpoint
from formats.record import QuantizedTensor
from formats.validate import BadIndex, FormatError, TwoLayouts

SINGLE_NAME = "model.safetensors"


class ChecksumMismatchError(CorruptFileError):
    """A shard's sha256 differs from the one recorded in the index."""


class QuantizedState(dict[str, QuantizedTensor | Int8Tensor | torch.Tensor]):
    """What :func:`load_quantized_state` returns: a ``dict`` of ``name -> record / tensor`` that also
    knows the checkpoint folder it was read from (``.folder``), so that
    ``replace_linear_layers(module, state)`` takes the folder config's ``bnb_4bit_compute_dtype`` and
    ``llm_int8_threshold`` as ``replace_linear_layers(module, folder)`` does."""

    def __init__(self, tensors: dict, folder: Path | None = None) -> None:
        super().__init__(tensors)
        self.folder = folder

    def __reduce__(self) -> tuple:
        return (QuantizedState, (dict(self), self.folder))


class NotQuantizedError(InputError):
    """The checkpoint holds no quantized (4-bit or LLM.int8) weight."""


def _adapter_message(folder: Path) -> str | None:
    """For a PEFT adapter folder (adapter_config.json): what it is and how to load it, with its base
    model; "no quantized weight ... not a bitsandbytes checkpoint" said what it is not, not what to do."""
    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    of = f" ({base})" if isinstance(base, str) and base else ""
    return (
        f"{folder}: a PEFT adapter (adapter_config.json), not a quantized model: load its base model{of} "
        f"with load_quantized, then the adapter on it: PeftModel.from_pretrained(model, '{folder}')"
    )


def resolve_folder(
    path_or_repo: str | os.PathLike,
    *,
    code: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    subfolder: str = "",
    modules: bool = False,
    weights: bool = True,
) -> Path:
    """A local folder as is; anything else is taken as a Hub repo id and fetched at ``revision`` (a
    branch, tag or commit; None: main) with cache, token, offline mode as huggingface_hub does them
    (``token``, ``cache_dir``, ``force_download``, ``local_files_only``: its arguments, None / False
    leaving its defaults): the safetensors shards, index and JSON files only, and with ``code``
    (``trust_remote_code=True``) the repository's Python files its config names; none of a deeper
    folder (chat templates excepted). ``subfolder``: the checkpoint is that folder of the local folder
    or repo (only its files are fetched). ``modules``: the JSON files of the sentence-transformers module
    folders its ``modules.json`` names are fetched too (``1_Pooling/config.json``: what dequantize
    copies; loading needs none of them). ``weights=False``: of a repo, the JSON files (config, index)
    and code only, no shard (``estimate`` reads their headers by range requests)."""
    path = Path(path_or_repo).expanduser()  # '~/m' quoted in a script, as convert takes it
    sub = subfolder.strip("/")
    if path.is_dir():
        if sub and not (path / sub).is_dir():
            msg = f"{path}: has no subfolder {sub!r}"
            raise SourceNotFoundError(msg)
        return path / sub
    if path.exists():
        msg = f"{path}: expected a checkpoint folder, got a file; pass the folder that holds it"
        raise InputError(msg)
    text = str(path_or_repo)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        msg = f"{text}: no such folder (and not a Hub repo id of the form 'owner/name')"
        raise SourceNotFoundError(msg)
    from huggingface_hub import snapshot_download

    try:
        # weights, JSON (config, index, generation and tokenizer configs) and the other tokenizer files:
        # vocabularies, sentencepiece models, chat templates (chat_template.jinja since transformers 5)
        tokenizer = ["*.txt", "*.model", "*.jinja", "*.tiktoken"]
        patterns = [
            *(["*.safetensors", "*.json", *tokenizer] if weights else ["*.json"]),
            *(["*.py"] if code else []),
        ]
        prefix = f"{sub}/" if sub else ""
        # ("*" matches "/" too) none of the files of a deeper folder, such as another variant's shards,
        # but chat templates: transformers 5 saves more of them in additional_chat_templates/
        nested = [f"{prefix}*/{p}" for p in patterns if p != "*.jinja"]
        fetched = snapshot_download(
            text,
            revision=revision,
            allow_patterns=[prefix + p for p in patterns],
            ignore_patterns=nested,
            token=token,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
        )
        folders = _module_folders(Path(fetched) / sub) if modules else []
        if folders:  # the same commit as the snapshot (a branch may have moved meanwhile)
            snapshot_download(
                text,
                revision=Path(fetched).name,
                allow_patterns=[f"{prefix}{f}/*.{ext}" for f in folders for ext in ("json", "safetensors")],
                ignore_patterns=[f"{prefix}{f}/*/*" for f in folders],
                token=token,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
            )
    except Exception as exc:  # huggingface_hub raises many types; name the repo and the cause
        cause = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        at = f" at revision {revision!r}" if revision is not None else ""
        msg = f"{text}: not a local folder, and the Hub repo could not be fetched{at} ({cause})"
        hint = _access_hint(text, exc, token)
        raise SourceNotFoundError(msg + (f"; {hint}" if hint else "")) from exc
    if sub and not (Path(fetched) / sub).is_dir():  # no file of the repo matched: named as a local folder's
        at = f" at revision {revision!r}" if revision is not None else ""
        msg = f"{text}: the Hub repo has no subfolder {sub!r}{at} (holding safetensors or JSON files)"
        raise SourceNotFoundError(msg)
    return Path(fetched) / sub


def _access_hint(repo: str, exc: BaseException, token: str | bool | None) -> str | None:
    """What to do when ``exc`` is the Hub refusing access (a gated repo, a private one without a
    token, a rejected token), as ``convert`` says it (``converter.sources.hub_client``); else None."""
    from converter.sources.hub_client import HubAccessError, HubClient, HubRepoNotFoundError

    try:
        mapped = HubClient(repo, token=token, endpoint=None).map_error(exc, "download")
    except Exception:  # the hint is a courtesy: never hide the cause behind another error
        return None
    if not isinstance(mapped, (HubAccessError, HubRepoNotFoundError)):
        return None
    text = str(mapped)
    text = text.removeprefix(f"{repo}: ")
    return text.replace("set HF_TOKEN", "set HF_TOKEN (or pass token=)")


def _module_folders(folder: Path) -> list[str]:
    """The module folders ``folder/modules.json`` names whose files dequantize copies (``1_Pooling``;
    none where the file is missing or not a sentence-transformers module list)."""
    from converter.sources.base import is_extra_file

    try:
        listed = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    paths = [m.get("path") for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []
    names = {p for p in paths if isinstance(p, str) and "/" not in p}
    return sorted(p for p in names if is_extra_file(f"{p}/config.json"))


def shard_files(folder: Path) -> tuple[list[Path], bool]:
    """The shard files of a folder (index order) and whether the index records their sha256."""
    if (folder / INDEX_NAME).is_file():
        try:
            index = read_index(folder)
        except FormatError as exc:
            damaged = isinstance(exc, BadIndex) and not isinstance(exc, TwoLayouts)  # (it says what to do)
            raise CorruptFileError(f"{exc}; {INDEX_REMEDY}" if damaged else str(exc)) from exc
        names = list(dict.fromkeys(index.weight_map.values()))
        return [folder / n for n in names], bool(index.shards)
    from converter.writer.manifest import unfinished_conversion

    # Killed before its index: say so, not "not a checkpoint"; and never take the shards finished so
    # far (one of them would pass for a single-file checkpoint) for the whole model.
    unfinished = unfinished_conversion(folder)
    if unfinished is not None:
        raise InputError(unfinished)
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME], False
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found, False
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        msg = f"{folder}: only pickle weights (.bin/.pt); a quantized checkpoint must be safetensors"
        raise PickleOnlyError(msg)
    msg = f"{folder}: no {INDEX_NAME} and no single *.safetensors file; not a checkpoint folder"
    raise SourceNotFoundError(msg)


def _raise_problems(problems: list[str]) -> None:
    if problems:
        msg = (
            f"{first_of(problems)}: the shard is corrupt or was changed; download or convert it again "
            "(verify=False / --no-verify skips this check)"
        )
        raise ChecksumMismatchError(msg)


def _written_by_us(shard: Path) -> bool:
    """Whether the shard's safetensors header carries our ``quantize_model.*`` metadata (a header read)."""
    try:
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(n, 100 << 20)))
    except (OSError, ValueError):
        return False  # unreadable: the load's own parsing names the problem
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and any(str(k).startswith("quantize_model.") for k in meta)


def _refuse_lost_digests(folder: Path, files: list[Path]) -> None:
    """Shards we wrote always come with an index of digests; without it ``verify`` cannot hold, so the
    load is refused rather than silently unverified (the index was deleted, or its digests removed)."""
    ours = next((f for f in files if f.is_file() and _written_by_us(f)), None)
    if ours is not None:
        index = folder / INDEX_NAME
        what = "records no digests" if index.is_file() else "is missing"
        msg = (
            f"{index}: {what}, but {ours.name} was written by quantize-model, whose index always has "
            "them; the folder was changed: download or convert it again (verify=False / --no-verify "
            "skips this check)"
        )
        raise ChecksumMismatchError(msg)


def streams_to(device: str | torch.device) -> bool:
    """Whether a load onto ``device`` reads the shards into device tensors (every device but the CPU,
    where the memory-mapped views are used as they are)."""
    return torch.device(device).type not in ("cpu", "meta")


def load_quantized_state(
    path_or_repo: str | os.PathLike,
    *,
    verify: bool | str = True,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    subfolder: str = "",
) -> QuantizedState:
    """``name -> QuantizedTensor`` for every quantized weight (the weight key, e.g.
    ``model.layers.0.mlp.down_proj.weight``) and ``name -> torch.Tensor`` for every other tensor, a
    :class:`QuantizedState` (a ``dict``) whose ``.folder`` is the checkpoint folder.

    On the CPU, tensors are views of memory-mapped shards (nothing read before use). On another
    device (e.g. ``"cuda"``) every tensor is read once from its shard straight into its device tensor
    (``converter.loader.stream``). ``verify=True`` checks each shard against the digests of the
    index (per 16 MiB chunk: xxh3_128 where recorded, else sha256; ``verify="sha256"`` checks the
    sha256 ones), the shards hashed on background threads while they are parsed and copied; a
    mismatch raises before anything is returned. Checkpoints whose index records no hashes (e.g. written by
    transformers) are validated structurally only.

    A Hub repo id is fetched at ``revision`` (branch, tag or commit; default main) with ``token``,
    ``cache_dir``, ``force_download`` and ``local_files_only`` as ``load_quantized`` fetches it; a local
    folder ignores them. ``subfolder``: the checkpoint is that folder of the local folder or repo.
    """
    # a CPU-only torch, no GPU, "meta": named before any work
    check_device(device, device_argument("device", device))
    folder = resolve_folder(
        path_or_repo,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        subfolder=subfolder,
    )
    with shards_verified(folder, verify, streaming=streams_to(device)) as hashes:
        return QuantizedState(read_state(folder, device, hashes), folder)


def _hash_threads() -> int:
    """Threads for the verification: every core but the caller's, on a streamed load too.

    A streamed load's readers hash what they read as well, so while they run there are more hashing
    threads than cores; but they run for a fraction of the load only. Before them (CUDA context,
    allocation, pinned staging) and after them (the model build) the verification's threads alone
    hash, and with fewer of them (cores - 1 - readers, as before) the cores the readers leave idle
    then did nothing while the hashing, not the load, was the critical path of ``verify=True``.
    """
    return max(1, len(os.sched_getaffinity(0)) - 1)


def _verify_algo(verify: bool | str) -> str | None:
    """The digest ``verify`` asks for: True, the ones the index records (xxh3_128 before sha256:
    formats/chunks.py; None here); "sha256", the sha256 ones only (a cryptographic check); False, no
    check (None too)."""
    if verify is True or verify is False:
        return None
    if verify == "sha256":
        return "sha256"
    msg = f"verify must be True, False or 'sha256', got {verify!r}"
    raise ValueError(msg)


@contextlib.contextmanager
def shards_verified(
    folder: Path, verify: bool | str = True, *, streaming: bool = False
) -> Iterator[Verification | None]:
    """Hash the shards of ``folder`` on background threads while the block runs (hashlib releases the
    GIL); on leaving it, wait for them and raise ``ChecksumMismatchError`` naming a changed shard, also
    in place of any error the block raised (a changed shard explains a failure to read it best).
    Yields the running ``Verification``: pass it to :func:`read_state` so that a streamed load hashes
    the chunks it reads itself. A folder whose index records no hashes, or ``verify=False``: nothing
    is hashed (yields None). ``streaming``: the block streams the shards (``read_state`` to a GPU); the
    verification takes every core but the caller's either way (``_hash_threads``)."""
    algo = _verify_algo(verify)
    if not verify:
        yield None
        return
    files, hashed = shard_files(folder)
    if not hashed:
        _refuse_lost_digests(folder, files)  # a folder with no digests: another tool's, not one of ours
        yield None
        return
    try:
        with timing.phase("verify_start"):
            # started by read_state once the headers are parsed (Verification.start says why)
            pending = start_verify(folder, threads=_hash_threads(), algo=algo, start=False)
    except FormatError as exc:
        raise CorruptFileError(str(exc)) from exc

    def check() -> None:
        try:
            with timing.phase("verify_wait"):
                problems = pending()
            if timing.active():
                by_pool, by_caller = pending.hashed_by()
                timing.add("hashed_by_pool", by_pool)
                timing.add("hashed_by_caller", by_caller)
            _raise_problems(problems)
        except FormatError as exc:
            raise CorruptFileError(str(exc)) from exc

    try:
        yield pending
    except Exception:
        check()
        raise
    check()


def read_state(
    folder: Path,
    device: str | torch.device = "cpu",
    hashes: Verification | None = None,
    on_parsed: Callable[[dict], None] | None = None,
    while_reading: Callable[[dict], None] | None = None,
) -> dict:
    """``load_quantized_state``'s result without its own verification: ``hashes`` (from
    :func:`shards_verified`) is given the chunks a streamed load reads. ``on_parsed`` is called with
    the parsed (memory-mapped) state before it is streamed (``converter.loader.warmup`` starts there);
    ``while_reading`` with the same state on this thread while the shards stream (after parsing when
    nothing streams): work that needs only the headers, done instead of waiting for the reads."""
    files, _ = shard_files(folder)
    try:
        # Groups split across shards (transformers' save_pretrained may do that) are joined here.
        with timing.phase("open"):
            checkpoint = open_checkpoint(files)
            out = checkpoint.records()
    except FormatError as exc:
        raise CorruptFileError(str(exc)) from exc
    finally:
        if hashes is not None:  # the hashing threads, now that the headers' parse is done
            hashes.start()
    if all(isinstance(v, torch.Tensor) for v in out.values()):
        msg = _adapter_message(folder) or (
            f"{folder}: no quantized weight (no '*.quant_state.bitsandbytes__nf4|fp4' key and no int8 "
            "'*.SCB' key); not a bitsandbytes 4-bit or 8-bit checkpoint"
        )
        raise NotQuantizedError(msg)
    if on_parsed is not None:
        on_parsed(out)
    if streams_to(device):
        from converter.loader.stream import mapped_files, stream_state

        # one device tensor and one record copy per tensor: >100 k objects for a large MoE
        parsed = out
        with timing.phase("stream"), gc_paused():
            out = stream_state(
                out,
                mapped_files(checkpoint.shards),
                device,
                hashes=hashes,
                while_reading=None if while_reading is None else lambda: while_reading(parsed),
            )
    elif while_reading is not None:
        while_reading(out)
    return out
