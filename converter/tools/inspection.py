"""What ``quantize-model inspect`` and ``verify`` compute: library functions returning result objects.

``inspect_path`` summarises a quantized folder or one shard (tensors, quant types, sizes, bits per
parameter) from the headers and quant states alone; ``inspect_hub`` does the same for a Hub repo by
HTTP range requests (the headers and the small quant-state blobs), downloading no shard.
``verify_path`` re-hashes every shard against the index, validates every shard and every quantized
record, checks the weight_map against the shards' contents and, for our own shards, the metadata,
and config.json as transformers + bitsandbytes would read it (``skip_check``: 16-bit linears the
skip list misses); it returns the problems it found, one line each, and what it could not check.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converter.errors import CorruptFileError, SourceNotFoundError
from converter.loader.config_file import read_config
from converter.plan import moe
from converter.sources.hub_ranges import RangeReader
from converter.writer.manifest import MANIFEST_NAME, Manifest, damaged_manifest
from formats import index as index_mod
from formats.reader import Shard, open_shard
from formats.validate import STORAGE_NAMES, FormatError, QuantGroup, TensorEntry, find_quant_groups
from formats.writer import TORCH_NAMES

if TYPE_CHECKING:
    from converter.plan.moe import MoeSummary


@dataclass
class InspectResult:
    path: str
    shards: list[str]
    tensors_quantized: int = 0
    tensors_kept: int = 0
    params_quantized: int = 0
    params_kept: int = 0
    bytes_quantized: int = 0  # stored bytes of quantized weights (codes, absmax, maps, quant state)
    bytes_kept: int = 0
    quant_types: dict[str, int] = field(default_factory=dict)  # "nf4 blocksize 64 nested" -> count
    kept_dtypes: dict[str, int] = field(default_factory=dict)
    tool_version: str | None = None
    source: str | None = None
    quantization_config: dict | None = None
    moe: MoeSummary | None = None  # MoE folders: experts quantized or kept, and which loaders read it
    bytes_read: int | None = None  # a Hub repo: bytes fetched (headers, quant states, small JSON)
    #: what keeps the folder from loading that the summary would not show (a damaged config.json)
    warnings: list[str] = field(default_factory=list)

    @property
    def bits_per_param(self) -> float:
        params = self.params_quantized + self.params_kept
        return 8 * (self.bytes_quantized + self.bytes_kept) / params if params else 0.0

    @property
    def quantized_bits_per_param(self) -> float:
        return 8 * self.bytes_quantized / self.params_quantized if self.params_quantized else 0.0

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "moe": self.moe.to_json() if self.moe else None,
            "bits_per_param": self.bits_per_param,
            "quantized_bits_per_param": self.quantized_bits_per_param,
        }


def unfinished_conversion(folder: Path) -> bool:
    """Whether ``folder`` holds a conversion that did not finish (its manifest says so). A manifest
    that cannot be read is not this: ``damaged_manifest`` names it."""
    manifest = Manifest.load(folder)
    return manifest is not None and manifest.state != "complete"


def _shard_files(path: Path, *, require_files: bool = False) -> tuple[Path, list[str]]:
    """The folder and its shard names (the index's, else its *.safetensors). ``require_files``: a shard
    the index names that is gone is an input error naming it (inspect; verify reports it instead)."""
    if not path.exists():
        msg = f"{path}: no such file or folder; check the path"
        raise SourceNotFoundError(msg)
    if path.is_file():
        return path.parent, [path.name]
    if (path / index_mod.INDEX_NAME).is_file():
        return path, index_mod.read_index(path, require_files=require_files).files
    names = sorted(p.name for p in path.glob("*.safetensors"))
    if not names and not (path / MANIFEST_NAME).is_file():  # an interrupted conversion is reported instead
        msg = f"{path}: no .safetensors shards and no {index_mod.INDEX_NAME}; give a converted folder"
        raise SourceNotFoundError(msg)
    return path, names


class _SplitGroups:
    """The pieces of quantized weights that a shard holds only part of, gathered over a folder's shards.

    transformers' ``save_pretrained`` (of a bnb model, or of one ``load_quantized`` built) cuts shards
    key by key, so a weight's codes may end one shard and its absmax / quant state start the next.
    ``open_shard`` sees each shard alone: the codes as a plain uint8 tensor, the rest as a ``partial``
    group. The loader joins them (``formats.reader.Checkpoint``); inspect and verify, which read one
    shard at a time, counted the codes as a kept tensor and the weight as not quantized (verify then
    reported a 16-bit linear missing from ``llm_int8_skip_modules``). This joins them from the
    headers and the quant-state bytes alone (no torch), as ``Checkpoint`` does.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.located: dict[str, tuple[str, int, TensorEntry]] = {}  # key -> (shard, data start, entry)
        self.pieces: set[str] = set()
        self.bases: set[str] = set()

    def add(self, name: str, shard: Shard) -> None:
        """Note every key of ``shard`` (file ``name``) and its pieces of split weights."""
        for key in shard.keys():
            self.located[key] = (name, shard.data_start, shard.entry(key))
        for base, keys in shard.partial.items():
            self.bases.add(base)
            self.pieces.update(keys)

    def join(self) -> dict[str, QuantGroup]:
        """The split weights, each validated whole (a component in no shard raises its FormatError)."""
        if not self.bases:
            return {}
        keys = self.pieces | {b for b in self.bases if b in self.located}
        entries = {k: (self.located[k][2].dtype, tuple(self.located[k][2].shape)) for k in sorted(keys)}
        groups, _ = find_quant_groups(str(self.folder), entries, self._read, complete=True)
        return groups

    def nbytes(self, key: str) -> int:
        entry = self.located[key][2]
        return entry.end - entry.begin

    def _read(self, key: str) -> bytes:
        name, start, entry = self.located[key]
        with open(self.folder / name, "rb") as f:
            f.seek(start + entry.begin)
            return f.read(entry.end - entry.begin)


def inspect_path(path: str | Path) -> InspectResult:
    # a shard the index names that is gone: named with the index (it was the OS error, exit 1)
    folder, names = _shard_files(Path(path), require_files=True)
    result = InspectResult(path=str(path), shards=names)
    qtypes: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    names_q: list[str] = []
    names_k: list[str] = []
    shapes: list[tuple[str, tuple[int, ...], int]] = []
    expert_formats: set[tuple[str, str]] = set()
    split = _SplitGroups(folder)
    passthrough: list[tuple[str, TensorEntry]] = []  # counted once the split weights are joined
    groups: list[tuple[QuantGroup, int]] = []  # each quantized weight and its bytes
    for name in names:
        with open_shard(folder / name) as shard:
            meta = shard.metadata or {}
            tool = meta.get("quantize_model.tool") or {}
            result.tool_version = result.tool_version or tool.get("version")
            prov = meta.get("quantize_model.provenance") or {}
            result.source = result.source or prov.get("source")
            split.add(name, shard)
            # From the validated header alone (no tensor data, no torch).
            for key in shard.quantized:
                group = shard.group(key)
                groups.append((group, sum(shard.entry(k).end - shard.entry(k).begin for k in group.keys)))
            passthrough += [(key, shard.entry(key)) for key in shard.passthrough]
    joined = split.join() if Path(path).is_dir() else {}  # one shard alone: its pieces stay pieces
    groups += [(group, sum(split.nbytes(k) for k in group.keys)) for group in joined.values()]
    claimed = {k for group in joined.values() for k in group.keys}
    for group, nbytes in groups:
        info = group.info
        names_q.append(group.name)
        result.tensors_quantized += 1
        result.params_quantized += math.prod(info.shape)
        result.bytes_quantized += nbytes
        qtypes[info.describe()] += 1
        shapes.append((group.name, tuple(info.shape), getattr(info, "blocksize", 0)))
        if moe.is_expert_weight(group.name):
            qtype = getattr(info.quant_type, "label", info.quant_type)
            expert_formats.add((str(qtype), group.quant_storage))
    kept_tensors: list[moe.HeaderTensor] = []
    for key, e in passthrough:
        if key in claimed:
            continue
        names_k.append(key)
        kept_tensors.append(moe.HeaderTensor(key, e.dtype, tuple(e.shape)))
        result.tensors_kept += 1
        result.params_kept += math.prod(e.shape)
        result.bytes_kept += e.end - e.begin
        kept[TORCH_NAMES.get(e.dtype, e.dtype)] += 1
    result.quant_types = dict(sorted(qtypes.items()))
    result.kept_dtypes = dict(sorted(kept.items()))
    sizes = {name: shape for name, shape, _ in shapes} | {key: tuple(e.shape) for key, e in passthrough}
    partial = moe.partial_block_experts(shapes)
    others = moe.other_experts(kept_tensors)  # Granite's, DBRX's experts: convert names them as 16-bit
    config = folder / "config.json"
    model_type = None
    if config.is_file() and Path(path).is_dir():
        try:
            config_dict = read_config(folder) or {}
            result.quantization_config = config_dict.get("quantization_config")
            model_type = config_dict.get("model_type")
        except CorruptFileError as exc:  # inspect reports what the shards hold, and says this
            result.quantization_config = None
            result.warnings.append(str(exc))
    result.moe = moe.summarize(names_q, names_k, partial, expert_formats, sizes, others, model_type)
    finished = Path(path).is_dir() and not unfinished_conversion(folder)  # unfinished: said once, as that
    if finished and result.tensors_quantized and not isinstance(result.quantization_config, dict):
        why = "no quantization_config" if config.is_file() else "missing"
        if not result.warnings:
            result.warnings.append(
                f"{config}: {why}, but {result.tensors_quantized} weights are quantized: transformers "
                f"cannot load them as stored; `quantize-model verify` checks the whole folder"
            )
    return result


@dataclass
class VerifyResult:
    path: str
    shards: list[str]
    tensors: int = 0
    problems: list[str] = field(default_factory=list)
    #: What to do about the problems: reconvert; resume an unfinished conversion; nothing we can say for a
    #: folder quantize-model did not write (no index, no per-tensor metadata).
    remedy: str = "reconvert with --overwrite"  # _RECONVERT, refined by verify_path (_remedy)
    #: what could not be checked, and why (not problems: the exit code stays 0)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        # no problem, nothing to do: a verified folder's JSON said "reconvert with --overwrite"
        return {**asdict(self), "remedy": self.remedy if self.problems else "", "ok": self.ok}


def verify_path(path: str | Path) -> VerifyResult:
    """Check a converted folder (hashes, shards, records, weight_map, metadata) or a single shard."""
    path = Path(path)
    folder, names = _shard_files(path)
    result = VerifyResult(path=str(path), shards=names)
    weight_map: dict[str, str] | None = None
    index_has_digests = False
    file_digests: dict | None = None  # the index's digests of config.json & co, where it records them
    total_size: int | None = None
    data_bytes = 0  # of the shards read: what the index's metadata.total_size must say
    damaged = damaged_manifest(folder) if path.is_dir() else None
    unfinished = path.is_dir() and (damaged is not None or unfinished_conversion(folder))
    if damaged is not None:  # nothing to resume from: the one remedy is a conversion from scratch
        result.remedy = "rerun the convert command with --overwrite"
        result.problems.append(damaged)
    elif unfinished:  # what is missing follows from that (index, config): reported once, as this
        result.remedy = "rerun the same convert command to resume"
        result.problems.append(
            f"{folder}: the conversion did not finish; rerun the same convert command to resume"
        )
    unlisted: list[str] = []  # *.safetensors files the index does not list
    if path.is_dir():
        if (folder / index_mod.INDEX_NAME).is_file():
            index = index_mod.read_index(folder, require_files=False)
            weight_map, index_has_digests = index.weight_map, bool(index.shards)
            file_digests, total_size = index.file_digests, index.total_size
            for extra in sorted(p.name for p in folder.glob("*.safetensors") if p.name not in names):
                unlisted.append(
                    f"{folder / extra}: a shard the index does not list (loaders that glob *.safetensors "
                    f"would read it); remove it"
                )
            result.problems.extend(unlisted)
            # an explicit check: the sha256 chunk digests (cryptographic), not the load's xxh3_128
            result.problems.extend(index_mod.verify_shards(folder, algo="sha256", whole=True))
    no_index = path.is_dir() and not (folder / index_mod.INDEX_NAME).is_file() and not unfinished
    # whether quantize-model wrote the folder: a manifest, or a shard with our per-tensor metadata
    ours = (folder / MANIFEST_NAME).is_file()
    found: dict[str, str] = {}
    quant_types: dict[str, str] = {}  # quantized weight key -> "nf4" / "fp4" / "int8"
    unreadable: set[str] = set()
    kept: list[str] = []  # unquantized tensors
    split = _SplitGroups(folder)
    for name in names:
        file = folder / name
        if not file.is_file():
            continue  # reported by verify_shards
        try:
            with open_shard(file) as shard:
                split.add(name, shard)
                data_bytes += shard.data_size
                for key in shard.keys():
                    found[key] = name
                for key in shard.quantized:
                    group = shard.group(key)  # open_shard validated each group against bnb's layout
                    qt = group.info.quant_type  # a QuantType (4-bit), or int8's name
                    quant_types[key] = getattr(qt, "label", qt)  # a method name: nf4 / fp4 / int8
                    result.tensors += 1
                result.tensors += len(shard.passthrough)
                kept.extend(shard.passthrough)
                if shard.metadata is not None:
                    ours = True
                    _check_metadata(shard.raw_metadata, str(file), result)
        except FormatError as exc:
            result.problems.append(str(exc))
            unreadable.add(name)
    if weight_map is not None and not index_has_digests and ours:
        result.problems.append(
            f"{folder / index_mod.INDEX_NAME}: records no digests, but the shards were written by "
            f"quantize-model, whose index always has them; the index was changed, so the shards cannot "
            f"be verified: reconvert the folder"
        )
    complete = all((folder / name).is_file() for name in names) and not unreadable
    pieces_unjoined = False
    if complete and path.is_dir():  # weights split across shards, joined and checked whole
        try:
            joined = split.join()
        except FormatError as exc:  # e.g. a component in no shard: named as the loader names it
            result.problems.append(str(exc))
            joined = {}
            pieces_unjoined = True  # its pieces are not 16-bit linears: no skip-list problem for them
        for key, group in joined.items():
            qt = group.info.quant_type
            quant_types[key] = getattr(qt, "label", qt)
            claimed = set(group.keys)
            result.tensors += 1 - sum(k in claimed for k in kept)
            kept = [k for k in kept if k not in claimed]
    if index_has_digests and complete and total_size != data_bytes:  # our index, every shard read
        result.problems.append(
            f"{folder / index_mod.INDEX_NAME}: metadata.total_size is {total_size}, but the shards hold "
            f"{data_bytes} bytes of tensor data; the index was changed: reconvert the folder"
        )
    if no_index and ours:
        result.problems.append(f"{folder / index_mod.INDEX_NAME}: missing; reconvert the folder")
    elif weight_map is not None and not index_has_digests and not ours and not unfinished:
        # a sharded save_pretrained (transformers' index, none of our metadata): its structure checked,
        # no byte of it hashed; it passed as "verified" without a word
        result.notes.append(
            f"{folder / index_mod.INDEX_NAME} records no digests (a save_pretrained's index, not a folder "
            f"quantize-model wrote): the shards' structure was checked, their contents could not be verified"
        )
    elif no_index:
        result.remedy = ""
        result.problems.append(
            f"{folder}: no {index_mod.INDEX_NAME} with digests: not a folder quantize-model wrote (a "
            f"save_pretrained writes none), so its contents cannot be verified; the shards' structure "
            f"was checked"
        )
    config_problems: list[str] = []
    if path.is_dir() and not unfinished:
        # the skip list against the kept linears only over every shard (a missing one's weights are not
        # 16-bit linears: they are reported once, as missing or unreadable)
        kept_if_all = kept if complete and not pieces_unjoined else None
        config_problems = _config_problems(folder, quant_types, found, kept_if_all, result.notes)
        if file_digests is not None:  # a hand edit of config.json (num_hidden_layers, dtype, ...)
            config_problems += index_mod.recorded_file_problems(index, skip_missing=("config.json",))
        elif index_has_digests:
            result.notes.append(
                f"{folder / 'config.json'}: not checked for edits: the index, written before quantize-model "
                f"recorded config.json's sha256 (2026-12-07), has none"
            )
        result.problems.extend(config_problems)
    if weight_map is not None:
        for key, shard_name in sorted(weight_map.items()):
            if shard_name in unreadable:
                continue  # already reported once for the whole shard
            if key in found and found[key] != shard_name:
                result.problems.append(f"tensor {key!r}: index says {shard_name}, found in {found[key]}")
            elif key not in found and (folder / shard_name).is_file():
                result.problems.append(f"tensor {key!r}: index says {shard_name}, but it is not there")
        for key in sorted(set(found) - set(weight_map)):
            result.problems.append(f"tensor {key!r} in {found[key]} is missing from the index weight_map")
    if result.problems and result.remedy == _RECONVERT:  # no remedy of its own (unfinished, damaged, ...)
        result.remedy = _remedy(folder, ours, only_config=all(p in config_problems for p in result.problems))
        if all(p in unlisted for p in result.problems):  # the shards verified: nothing to reconvert
            result.remedy = "remove the files the index does not list"
    return result


#: the remedy for damaged shards of our finished conversion: a rerun keeps a shard whose size and mtime
#: did not change (bit rot, a copy that kept the mtime), so only a conversion from scratch redoes it
_RECONVERT = "reconvert with --overwrite"


def _remedy(folder: Path, ours: bool, *, only_config: bool) -> str:
    """What to do about a finished folder's problems. ``config.json`` alone (hand-edited, or from another
    version): the convert command run again rewrites it and keeps the shards (docs/cli.md, "Rerunning
    into an existing folder"); --overwrite, which converts everything again, was the advice. A folder
    quantize-model did not write cannot be reconverted: what it can do is said instead."""
    if not ours:
        if only_config:
            return "fix config.json as said (quantize-model did not write this folder)"
        return (
            "quantize-model did not write this folder: save it again with the tool that made it, or convert "
            "the original checkpoint with quantize-model convert"
        )
    if only_config and (folder / MANIFEST_NAME).is_file():
        return "rerun the convert command that wrote it: it rewrites config.json and keeps the shards"
    return _RECONVERT


def _config_problems(
    folder: Path,
    quant_types: dict[str, str],
    names: Collection[str] = (),
    unquantized: Collection[str] | None = None,
    notes: list[str] | None = None,
) -> list[str]:
    """What in ``config.json`` would make transformers + bitsandbytes load the quantized weights wrongly:
    no config, no ``quantization_config``, a method or quant type other than the records', or a
    quantized module that ``llm_int8_skip_modules`` keeps unquantized (transformers would then read
    its packed codes as a plain weight); with 4-bit MoE experts, a 16-bit router (among the tensor
    ``names``) that the list does not skip (vLLM's bnb loader would take it for a quantized layer);
    a linear layer kept 16-bit (among the ``unquantized`` tensors; None: not every shard was read)
    that the list does not skip (transformers would build a quantized layer for it: ``skip_check``).
    What cannot be checked goes to ``notes``."""
    from converter.methods import get_method
    from converter.plan.selection_facts import should_convert_module

    path = folder / "config.json"
    if not path.is_file():
        return [f"{path}: missing; transformers cannot build the model"]
    try:
        config = read_config(folder) or {}
    except CorruptFileError as exc:
        return [str(exc)]
    if not quant_types:
        return []
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return [
            f"{path}: no quantization_config, but {len(quant_types)} weights are quantized: transformers "
            f"would read their packed codes as plain weights"
        ]
    problems = []
    if qc.get("quant_method") != "bitsandbytes":
        problems.append(
            f"{path}: quantization_config.quant_method is {qc.get('quant_method')!r}, not 'bitsandbytes'"
        )
    refused = _bnb_config_refusal(qc)
    if refused:
        problems.append(f"{path}: transformers refuses this quantization_config: {refused}")
    if "int8" in quant_types.values() and qc.get("llm_int8_has_fp16_weight"):
        problems.append(
            f"{path}: quantization_config.llm_int8_has_fp16_weight is true: transformers would build "
            f"Linear8bitLt layers that keep float weights and cannot load the stored int8 codes"
        )
    for kind in sorted(set(quant_types.values())):
        if not get_method(kind).matches_config(qc):  # the test the loaders use to pick the method
            problems.append(
                f"{path}: quantization_config does not describe the {kind} weights (load_in_4bit="
                f"{qc.get('load_in_4bit')!r}, load_in_8bit={qc.get('load_in_8bit')!r}, "
                f"bnb_4bit_quant_type is {qc.get('bnb_4bit_quant_type')!r})"
            )
    skip = qc.get("llm_int8_skip_modules")
    kept = sorted(k for k in quant_types if not should_convert_module(k.removesuffix(".weight"), skip))
    if kept:
        more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
        problems.append(
            f"{path}: llm_int8_skip_modules keeps {', '.join(repr(k) for k in kept[:3])}{more} unquantized, "
            f"but those weights are quantized"
        )
    routers = moe.unskipped_routers(names, quant_types, skip or [])
    if routers:  # the leaves the writer lists (plan/moe.py), as vLLM matches them
        leaves, named = sorted(set(routers.values())), ", ".join(list(routers)[:3])
        more = f" and {len(routers) - 3} more" if len(routers) > 3 else ""
        problems.append(
            f"{path}: llm_int8_skip_modules does not list the 16-bit router(s) {named}{more} "
            f"of this folder with 4-bit experts: vLLM's bitsandbytes loader would load them as quantized "
            f"layers; add {', '.join(repr(leaf) for leaf in leaves)} to the list"
        )
    if not refused and unquantized is not None:  # which 16-bit linears would transformers convert?
        from converter.tools.skip_check import unskipped_linears

        found, note = unskipped_linears(path, config, quant_types, unquantized, skip)
        problems.extend(found)
        if note is not None and notes is not None:
            notes.append(note)
    return problems


#: quantization_config keys transformers' BitsAndBytesConfig requires to be booleans when present.
_BNB_BOOL_KEYS = (
    "load_in_4bit",
    "load_in_8bit",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
    "bnb_4bit_use_double_quant",
)
_BNB_STORAGE_NAMES = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")


def _bnb_config_refusal(qc: dict) -> str | None:
    """Why transformers' ``BitsAndBytesConfig`` (its ``__init__`` / ``post_init`` checks) refuses
    ``qc``, so that ``from_pretrained`` fails before loading any weight; None if it takes it."""
    if qc.get("load_in_4bit") and qc.get("load_in_8bit"):
        return "load_in_4bit and load_in_8bit are both true; set the one the weights are not to false"
    for key in _BNB_BOOL_KEYS:
        if key in qc and not isinstance(qc[key], bool):
            return f"{key} is {qc[key]!r}, not true or false"
    threshold = qc.get("llm_int8_threshold", 6.0)
    if not isinstance(threshold, float):
        return f"llm_int8_threshold is {threshold!r}, not a float (write it with a decimal point: 6.0)"
    skip = qc.get("llm_int8_skip_modules")
    if skip is not None and not isinstance(skip, list):
        return f"llm_int8_skip_modules is {skip!r}, not a list of module names (or null)"
    if not isinstance(qc.get("bnb_4bit_quant_type", "fp4"), str):
        return f"bnb_4bit_quant_type is {qc['bnb_4bit_quant_type']!r}, not a string"
    storage = qc.get("bnb_4bit_quant_storage")
    if storage is not None and storage not in _BNB_STORAGE_NAMES:
        return f"bnb_4bit_quant_storage is {storage!r}, not one of {', '.join(_BNB_STORAGE_NAMES)}"
    return None


def _check_metadata(raw: dict, file: str, result: VerifyResult) -> None:
    try:
        from formats.metadata import validate_metadata

        validate_metadata(raw, file=file)
    except ImportError:
        return  # the schema check needs jsonschema (a test dependency); the rest still ran
    except FormatError as exc:
        result.problems.append(str(exc))


# --- a Hub repo, from headers and quant states only ------------------------------------------------
_QS_SUFFIX = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__(?:nf4|fp4)$")
_CODE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip


def inspect_hub(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None
) -> InspectResult:
    """``inspect_path`` of a Hub repo, from the shard headers and quant-state blobs read by HTTP range
    requests (and config.json / the index, which are small JSON files); no shard is downloaded."""
    from formats.validate import SCB_SUFFIX, check_int8_group, parse_quant_state, scb_key, weight_format_key

    hub = RangeReader(repo_id, revision, token)
    if index_mod.INDEX_NAME in hub.files:
        weight_map = json.loads(hub.get(index_mod.INDEX_NAME)).get("weight_map") or {}
        names = sorted(set(weight_map.values()))
    else:
        names = [f for f in hub.files if f.endswith(".safetensors") and "/" not in f]
    if not names:
        msg = f"{repo_id}: no .safetensors shards at {hub.commit}; give a repo with safetensors weights"
        raise SourceNotFoundError(msg)
    result = InspectResult(path=f"{repo_id}@{hub.commit}", shards=names)
    qtypes: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    names_q: list[str] = []
    names_k: list[str] = []
    expert_formats: set[tuple[str, str]] = set()
    # Every shard's header first: a weight's keys may sit in two shards (transformers' save_pretrained
    # cuts shards key by key: the codes in one, the quant state or SCB in the next), so the weights are
    # known, and their keys told from the kept tensors, only over the whole repo.
    headers: dict[str, dict[str, Any]] = {}
    weights: dict[str, Any] = {}  # 4-bit weight key -> its quant state
    scb_in: dict[str, str] = {}  # int8 weight key -> the shard holding its SCB
    for name in names:
        header, data_start = hub.header(name)
        meta = header.pop("__metadata__", None) or {}
        headers[name] = header
        tool = _json_field(meta, "quantize_model.tool")
        result.tool_version = result.tool_version or tool.get("version")
        result.source = result.source or _json_field(meta, "quantize_model.provenance").get("source")
        qs_keys = {m.group("weight"): key for key in header if (m := _QS_SUFFIX.match(key))}
        spans = {k: tuple(data_start + x for x in header[k]["data_offsets"]) for k in qs_keys.values()}
        blocks = hub.get_spans(name, spans.values())  # merged across small gaps, concurrent
        starts = [a for a, _ in blocks]
        for weight, key in qs_keys.items():
            a, b = spans[key]
            start, data = blocks[bisect.bisect_right(starts, a) - 1] if b > a else (a, b"")
            weights[weight] = parse_quant_state(name, key, data[a - start : b - start])
        for k in header:
            if k.split(".")[-1] == SCB_SUFFIX:
                scb_in[k.removesuffix(SCB_SUFFIX) + "weight"] = name
    entries = {k: e for header in headers.values() for k, e in header.items()}
    # LLM.int8 weights: <m>.weight I8 with <m>.SCB (+ <m>.weight_format), known from the headers alone
    present = {k: (e["dtype"], tuple(e["shape"])) for k, e in entries.items()}
    int8 = {w: check_int8_group(name, w, present) for w, name in scb_in.items()}
    quantized = set(weights) | {k for w in int8 for k in (w, scb_key(w), weight_format_key(w))}
    names_q += list(weights) + list(int8)
    for key, info in int8.items():
        result.tensors_quantized += 1
        result.params_quantized += math.prod(info.shape)
        qtypes[info.describe()] += 1
        if moe.EXPERT_KEY.match(key):  # per-expert LLM.int8 records: int8's loaders, not 4-bit's
            expert_formats.add(("int8", "int8"))
    for key, qs in weights.items():
        result.tensors_quantized += 1
        result.params_quantized += math.prod(qs.shape)
        nested = " nested" if qs.nested_offset is not None else ""
        qtypes[f"{qs.quant_type.label} blocksize {qs.blocksize}{nested}"] += 1
        if moe.is_expert_weight(key) and key in entries:  # the packed weight's dtype is the storage
            storage = STORAGE_NAMES.get(entries[key]["dtype"], entries[key]["dtype"])
            expert_formats.add((qs.quant_type.label, storage))
    kept_tensors: list[moe.HeaderTensor] = []
    for key, entry in entries.items():
        begin, end = entry["data_offsets"]
        owner = next(
            (w for w in (key, key.rsplit(".", 1)[0], key.split(".quant_state.")[0]) if w in quantized), None
        )
        if owner is not None:
            result.bytes_quantized += end - begin
            continue
        names_k.append(key)
        kept_tensors.append(moe.HeaderTensor(key, entry["dtype"], tuple(entry["shape"])))
        result.tensors_kept += 1
        result.params_kept += math.prod(entry["shape"])
        result.bytes_kept += end - begin
        kept[_CODE_NAMES.get(entry["dtype"], entry["dtype"])] += 1
    result.quant_types = dict(sorted(qtypes.items()))
    result.kept_dtypes = dict(sorted(kept.items()))
    partial = moe.partial_block_experts([(k, tuple(qs.shape), qs.blocksize) for k, qs in weights.items()])
    sizes = {k: tuple(e["shape"]) for k, e in entries.items()} | {
        k: tuple(qs.shape) for k, qs in weights.items()
    }
    others = moe.other_experts(kept_tensors)
    model_type = None
    if "config.json" in hub.files:
        try:
            config_dict = json.loads(hub.get("config.json"))
            result.quantization_config = config_dict.get("quantization_config")
            model_type = config_dict.get("model_type")
        except ValueError:
            result.quantization_config = None
    result.moe = moe.summarize(names_q, names_k, partial, expert_formats, sizes, others, model_type)
    result.bytes_read = hub.bytes_read
    return result


def _json_field(meta: dict, key: str) -> dict:
    try:
        value = json.loads(meta.get(key) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
