"""Strict validation of a shard: one straight-line function, one named error per failure.

``validate_file`` checks, in order: the 8-byte length prefix, the header size, UTF-8, JSON, every
tensor entry (dtype known, shape of non-negative ints, offsets in bounds, shape x dtype = byte size),
contiguous offsets without holes or overlap, a buffer covered exactly, ``__metadata__`` as a
str -> str map, our format version, and then every quantized weight's group of bnb keys (all
components present, nothing unknown under ``W.``, the quant_state JSON strict, the dtypes and sizes
of packed codes, absmax and nested tensors consistent with the JSON's shape and blocksize).

A shard with our metadata must hold every group whole. One that bitsandbytes/transformers wrote may
have a weight's keys split over several shards (transformers shards by size, key by key): its
incomplete groups are returned as ``partial`` and checked whole by ``find_quant_groups`` once the
reader (``formats.reader.Checkpoint``) has joined the shards.

Every error is a subclass of ``FormatError`` whose message names the file, the tensor, what was
expected and what was found. The tensor layout rules (``quant_layout``) and the safetensors dtype
table (``DTYPES``) live here because the writer, the record and the reader all check against them.
"""

from __future__ import annotations

import bisect
import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from formats.codebooks import f32
from formats.quant_types import BLOCKSIZES, NESTED_BLOCKSIZE, QuantType, n_blocks, n_nested_blocks

#: safetensors refuses headers above this many bytes (safetensors/src/tensor.rs MAX_HEADER_SIZE).
MAX_HEADER_SIZE = 100_000_000
#: Our own format version written under ``quantize_model.format``; readers refuse versions they do not
#: know. A folder is version 1 unless it holds a fused 3-D experts record (docs/format.md 7): a reader of
#: version 1 does not refuse such a record but loads the model with its experts newly initialized, so
#: those folders alone are version 2 and every other folder stays readable by version-1 readers.
FORMAT_NAME = "quantize-model"
FORMAT_VERSION = 1
FUSED_EXPERTS_FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION, FUSED_EXPERTS_FORMAT_VERSION)


def unsupported_version(where: object, version: object) -> str | None:
    """The message refusing format ``version`` (read from ``where``), or None for a version we know."""
    if version in SUPPORTED_FORMAT_VERSIONS and not isinstance(version, bool):
        return None
    known = " and ".join(map(str, SUPPORTED_FORMAT_VERSIONS))
    why = f"format version {version} is not supported (this reader knows {known})"
    return f"{where}: {why}; upgrade quantize-model"


#: safetensors dtype code -> item size in bytes (sub-byte and unusual codes are refused).
DTYPES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip

#: quant_storage names (torch dtype names, as transformers' config writes them) -> safetensors code.
STORAGE_CODES: dict[str, str] = {
    "uint8": "U8", "int8": "I8", "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
}  # fmt: skip
STORAGE_NAMES: dict[str, str] = {code: name for name, code in STORAGE_CODES.items()}
#: Original (and dequantized) dtypes a quantized weight may have.
WEIGHT_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")

_F32_MAX = 3.4028234663852886e38  # np.finfo(np.float32).max
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
#: JSON keys of bnb's packed quant state, in the order bnb's ``json.dumps`` writes them.
QS_KEYS: tuple[str, ...] = ("quant_type", "blocksize", "dtype", "shape")
QS_NESTED_KEYS: tuple[str, ...] = ("nested_blocksize", "nested_dtype", "nested_offset")
_COMPONENT_SUFFIXES = frozenset({"absmax", "quant_map", "nested_absmax", "nested_quant_map"})


# --------------------------------------------------------------------------------------------------
# Errors


class FormatError(ValueError):
    """Base class: a file or a tensor that breaks the format. Messages name the file and the tensor."""


class TruncatedFile(FormatError):
    """The file ends before the length prefix, the header or the data it announces."""


class HeaderTooLarge(FormatError):
    """The length prefix announces a header above safetensors' 100 MB limit."""


class HeaderNotUtf8(FormatError):
    """The header bytes are not valid UTF-8."""


class HeaderNotJson(FormatError):
    """The header is not a JSON object."""


class BadTensorEntry(FormatError):
    """A header entry lacks dtype / shape / data_offsets or has values of the wrong type."""


class UnknownDtype(FormatError):
    """A dtype code this reader does not know."""


class TensorSizeMismatch(FormatError):
    """shape x item size differs from the byte range given by data_offsets."""


class BadOffsets(FormatError):
    """data_offsets are reversed, overlap, or leave a hole between tensors."""


class BufferNotCovered(FormatError):
    """The data buffer holds bytes no tensor claims (or the tensors claim bytes past its end)."""


class BadMetadataField(FormatError):
    """``__metadata__`` is not a map of strings to strings."""


class BadMetadata(FormatError):
    """A ``quantize_model.*`` field is not valid JSON or does not match the metadata schema."""


class UnknownFormatVersion(FormatError):
    """The shard was written by a newer (or unknown) version of our format."""


class MissingQuantComponent(FormatError):
    """A quantized weight lacks one of the bnb keys its quant state requires."""


class UnexpectedQuantComponent(FormatError):
    """A key under ``W.`` that bitsandbytes' ``QuantState.from_dict`` would reject."""


class BadQuantState(FormatError):
    """The ``quant_state.bitsandbytes__*`` JSON is not UTF-8 / JSON, or has missing, unknown or bad fields."""


class QuantLayoutMismatch(FormatError):
    """Packed codes, absmax or nested tensors have a dtype or size inconsistent with shape and blocksize."""


class UnsupportedOption(FormatError):
    """A quant type, blocksize, dtype or quant_storage the format does not allow."""


class WriterStateError(FormatError):
    """A shard-writer step called in the wrong state (e.g. write after close)."""


class UnknownSlot(FormatError):
    """A write to a tensor name that is not in the shard's plan."""


class DuplicateWrite(FormatError):
    """A tensor written twice."""


class SlotMismatch(FormatError):
    """Data written to a slot has the wrong dtype or byte size."""


class MissingSlots(FormatError):
    """close() with planned tensors never written."""


class BadIndex(FormatError):
    """``model.safetensors.index.json`` is malformed."""


class TwoLayouts(BadIndex):
    """``model.safetensors`` beside an index naming other shards: transformers loads the former, we
    would read the latter (the message says what to remove)."""


class MissingShard(FormatError):
    """The index names a shard file that does not exist."""


class DuplicateTensor(FormatError):
    """The same tensor key in two shards of one checkpoint."""


# --------------------------------------------------------------------------------------------------
# Layout rules shared by writer, record and reader


def quant_layout(
    name: str,
    shape: tuple[int, ...],
    quant_type: QuantType,
    blocksize: int,
    nested: bool,
    quant_storage: str,
) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """The bnb keys of one quantized weight -> (safetensors dtype code, shape); None = JSON blob.

    ``name`` is the weight key ("...down_proj.weight"); the keys are ``name`` and ``name + ".<suffix>"``.
    """
    code = STORAGE_CODES[quant_storage]
    n = math.prod(shape)
    packed_bytes = (n + 1) // 2
    itemsize = DTYPES[code]
    nb = n_blocks(n, blocksize)
    layout: dict[str, tuple[str, tuple[int, ...] | None]] = {
        name: (code, (packed_bytes // itemsize, 1)),
        f"{name}.absmax": ("U8", (nb,)) if nested else ("F32", (nb,)),
        f"{name}.quant_map": ("F32", (16,)),
    }
    if nested:
        layout[f"{name}.nested_absmax"] = ("F32", (n_nested_blocks(nb),))
        layout[f"{name}.nested_quant_map"] = ("F32", (256,))
    layout[f"{name}.{QUANT_STATE_PREFIX}{quant_type.label}"] = ("U8", None)
    return layout


def check_quant_options(
    file: str, name: str, shape: tuple[int, ...], dtype: str, blocksize: int, quant_storage: str
) -> None:
    """Refuse what bitsandbytes cannot represent, naming the tensor."""
    where = f"{file}: tensor {name!r}"
    if dtype not in WEIGHT_DTYPES:
        msg = f"{where}: dtype {dtype!r} cannot be quantized; expected one of {', '.join(WEIGHT_DTYPES)}"
        raise UnsupportedOption(msg)
    if blocksize not in BLOCKSIZES:
        msg = f"{where}: blocksize {blocksize} not supported; expected one of {list(BLOCKSIZES)}"
        raise UnsupportedOption(msg)
    if quant_storage not in STORAGE_CODES:
        msg = f"{where}: quant_storage {quant_storage!r} not supported; expected one of {list(STORAGE_CODES)}"
        raise UnsupportedOption(msg)
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        msg = f"{where}: shape {list(shape)} must be non-negative integers"
        raise UnsupportedOption(msg)
    n = math.prod(shape)
    if n == 0:
        msg = f"{where}: an empty tensor (shape {list(shape)}) is never quantized; store it as passthrough"
        raise UnsupportedOption(msg)
    itemsize = DTYPES[STORAGE_CODES[quant_storage]]
    if ((n + 1) // 2) % itemsize:
        msg = (
            f"{where}: {(n + 1) // 2} packed bytes are not a whole number of {quant_storage} items "
            f"({itemsize} bytes); use quant_storage 'uint8'"
        )
        raise UnsupportedOption(msg)


@dataclass(frozen=True)
class QuantStateInfo:
    """The parsed ``quant_state.bitsandbytes__*`` JSON."""

    quant_type: QuantType
    blocksize: int
    dtype: str
    shape: tuple[int, ...]
    nested_offset: float | None  # None: not nested

    def describe(self) -> str:
        """A short label for ``inspect``: "nf4 blocksize 64 nested"."""
        nested = " nested" if self.nested_offset is not None else ""
        return f"{self.quant_type.label} blocksize {self.blocksize}{nested}"

    def record_fields(self, quant_storage: str) -> dict:
        """The metadata-record fields these keys decide (``check_tensor_records``)."""
        return {
            "kind": "quantized", "quant_type": self.quant_type.label, "blocksize": self.blocksize,
            "shape": list(self.shape), "dtype": self.dtype, "nested": self.nested_offset is not None,
            "quant_storage": quant_storage,
        }  # fmt: skip


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _naturals(values: list) -> bool:
    """Every value a JSON integer >= 0 (``json.loads`` gives exact ints; a bool is not one)."""
    for v in values:
        if type(v) is not int or v < 0:
            return False
    return True


def parse_quant_state(file: str, key: str, raw: bytes) -> QuantStateInfo:
    """Strictly parse bnb's quant-state JSON stored under ``key`` (``<W>.quant_state.bitsandbytes__x``)."""
    where = f"{file}: tensor {key!r}"
    try:
        obj = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        msg = f"{where}: quant state is not UTF-8 JSON ({exc})"
        raise BadQuantState(msg) from None
    if not isinstance(obj, dict):
        msg = f"{where}: quant state must be a JSON object, got {type(obj).__name__}"
        raise BadQuantState(msg)
    nested = "nested_offset" in obj or "nested_blocksize" in obj or "nested_dtype" in obj
    expected = set(QS_KEYS) | (set(QS_NESTED_KEYS) if nested else set())
    if set(obj) != expected:
        unknown = sorted(set(obj) - expected)
        missing = sorted(expected - set(obj))
        msg = f"{where}: quant state keys wrong (unknown: {unknown}, missing: {missing})"
        raise BadQuantState(msg)
    label = key.rsplit("__", 1)[-1] if "__" in key else None
    if obj["quant_type"] not in ("nf4", "fp4") or (label is not None and obj["quant_type"] != label):
        msg = f"{where}: quant_type {obj['quant_type']!r} does not match the key (expected {label!r})"
        raise BadQuantState(msg)
    if not _is_int(obj["blocksize"]) or obj["blocksize"] not in BLOCKSIZES:
        msg = f"{where}: blocksize {obj['blocksize']!r} not one of {list(BLOCKSIZES)}"
        raise BadQuantState(msg)
    if obj["dtype"] not in WEIGHT_DTYPES:
        msg = f"{where}: dtype {obj['dtype']!r} not one of {list(WEIGHT_DTYPES)}"
        raise BadQuantState(msg)
    shape = obj["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        msg = f"{where}: shape {shape!r} must be a list of non-negative integers"
        raise BadQuantState(msg)
    offset: float | None = None
    if nested:
        if obj["nested_blocksize"] != NESTED_BLOCKSIZE or not _is_int(obj["nested_blocksize"]):
            msg = f"{where}: nested_blocksize {obj['nested_blocksize']!r}, expected {NESTED_BLOCKSIZE}"
            raise BadQuantState(msg)
        if obj["nested_dtype"] != "float32":
            msg = f"{where}: nested_dtype {obj['nested_dtype']!r}, expected 'float32'"
            raise BadQuantState(msg)
        off = obj["nested_offset"]
        if not isinstance(off, (int, float)) or isinstance(off, bool) or not math.isfinite(off):
            msg = f"{where}: nested_offset {off!r} must be a finite number"
            raise BadQuantState(msg)
        if abs(off) > _F32_MAX or f32(off) != off:
            msg = f"{where}: nested_offset {off!r} is not a float32 value"
            raise BadQuantState(msg)
        offset = float(off)
    return QuantStateInfo(
        QuantType.parse(obj["quant_type"]), obj["blocksize"], obj["dtype"], tuple(shape), offset
    )


def check_quant_group(
    file: str,
    base: str,
    info: QuantStateInfo,
    present: dict[str, tuple[str, tuple[int, ...]]],
) -> tuple[str, dict[str, tuple[str, tuple[int, ...] | None]]]:
    """Check the keys found for one quantized weight against its quant state.

    ``present`` maps the weight key and every key under ``base + "."`` to (dtype code, shape).
    Returns (quant_storage, expected layout).
    """
    storage = STORAGE_NAMES.get(present[base][0])
    if storage is None:
        msg = (
            f"{file}: tensor {base!r}: packed weight dtype {present[base][0]} is not a quant_storage "
            f"dtype ({sorted(STORAGE_NAMES)})"
        )
        raise QuantLayoutMismatch(msg)
    try:
        check_quant_options(file, base, info.shape, info.dtype, info.blocksize, storage)
    except UnsupportedOption as exc:
        raise QuantLayoutMismatch(str(exc)) from None
    expected = quant_layout(
        base, info.shape, info.quant_type, info.blocksize, info.nested_offset is not None, storage
    )
    for k, (dt, shp) in expected.items():
        if k not in present:
            msg = f"{file}: tensor {base!r}: component {k!r} missing ({dt} {list(shp or [])} expected)"
            raise MissingQuantComponent(msg)
        got_dtype, got_shape = present[k]
        if (
            got_dtype != dt
            or (shp is not None and tuple(got_shape) != shp)
            or (shp is None and len(got_shape) != 1)
        ):
            msg = (
                f"{file}: tensor {k!r}: expected {dt} {list(shp) if shp else '[len]'} for shape "
                f"{list(info.shape)} blocksize {info.blocksize}, got {got_dtype} {list(got_shape)}"
            )
            raise QuantLayoutMismatch(msg)
    extra = sorted(set(present) - set(expected))
    if extra:
        msg = (
            f"{file}: tensor {base!r}: unexpected keys {extra} under the quantized weight "
            "(bitsandbytes rejects them; a bias belongs at '<module>.bias')"
        )
        raise UnexpectedQuantComponent(msg)
    return storage, expected


def find_quant_groups(
    file: str,
    entries: Mapping[str, tuple[str, tuple[int, ...]]],
    read: Callable[[str], bytes],
    *,
    complete: bool,
) -> tuple[dict[str, QuantGroup], dict[str, tuple[str, ...]]]:
    """Group the bnb keys of every quantized weight among ``entries`` (key -> (dtype code, shape)).

    ``read(key)`` returns a tensor's bytes (used for the quant-state JSON). With ``complete`` every
    group must be whole here; without it, a group with keys missing (or components without a quant
    state) is returned in the second dict (weight key -> its keys present) instead of raising.
    """
    groups: dict[str, QuantGroup] = {}
    partial: dict[str, tuple[str, ...]] = {}
    ordered = sorted(entries)

    def below(base: str) -> list[str]:
        """Every key starting with ``base + "."`` (bisect: no N^2 scan)."""
        lo = bisect.bisect_left(ordered, base + ".")
        hi = bisect.bisect_left(ordered, base + "/")  # "/" is the character after "."
        return ordered[lo:hi]

    def under(base: str) -> list[str]:
        """``base`` (if present) and every key starting with ``base + "."``."""
        return ([base] if base in entries else []) + below(base)

    for key in entries:
        base, sep, _ = key.rpartition("." + QUANT_STATE_PREFIX)
        if not sep:
            continue
        dtype, shape = entries[key]
        if dtype != "U8" or len(shape) != 1:
            msg = f"{file}: tensor {key!r}: quant state must be 1-D U8, got {dtype} {list(shape)}"
            raise BadQuantState(msg)
        if base in groups or base in partial:
            msg = f"{file}: tensor {base!r}: more than one quant_state key (second: {key!r})"
            raise UnexpectedQuantComponent(msg)
        info = parse_quant_state(file, key, read(key))
        present = {k: entries[k] for k in under(base)}
        names = quant_layout(
            base, info.shape, info.quant_type, info.blocksize, info.nested_offset is not None, "uint8"
        )
        extra = sorted(set(present) - set(names))
        if extra:
            msg = (
                f"{file}: tensor {base!r}: unexpected keys {extra} under the quantized weight "
                "(bitsandbytes rejects them; a bias belongs at '<module>.bias')"
            )
            raise UnexpectedQuantComponent(msg)
        if not complete and set(present) != set(names):
            partial[base] = tuple(sorted(present))
            continue
        if base not in present:
            msg = f"{file}: tensor {base!r}: packed weight missing (its quant state {key!r} is present)"
            raise MissingQuantComponent(msg)
        storage, expected = check_quant_group(file, base, info, dict(present))
        groups[base] = QuantGroup(base, info, storage, (base, *sorted(set(expected) - {base})))
    _find_int8(file, entries, read, complete, groups, partial, below)
    # Components whose weight has no quant_state key: transformers would silently load the packed
    # bytes as the weight.
    for key in entries:
        base, _, suffix = key.rpartition(".")
        if suffix not in _COMPONENT_SUFFIXES or base in groups or base in partial:
            continue
        if not complete:
            partial[base] = tuple(sorted(under(base)))
        elif base in entries:
            msg = f"{file}: tensor {base!r}: has {key!r} but no '{base}.{QUANT_STATE_PREFIX}nf4|fp4' key"
            raise MissingQuantComponent(msg)
    return groups, partial


def _find_int8(
    file: str,
    entries: Mapping[str, tuple[str, tuple[int, ...]]],
    read: Callable[[str], bytes],
    complete: bool,
    groups: dict[str, QuantGroup],
    partial: dict[str, tuple[str, ...]],
    below: Callable[[str], list[str]],
) -> None:
    """LLM.int8 weights (``<m>.weight`` I8 + ``<m>.SCB`` + ``<m>.weight_format``), added to ``groups``.

    ``below(key)``: the keys under ``key + "."``. As under a 4-bit weight, any key under one of the
    group's keys (``<m>.weight.absmax``, ``<m>.SCB.x``...) is refused: bitsandbytes' ``Int8Params``
    has no such component, and a loader would otherwise drop it with an "unused tensor" warning."""
    for base, keys in find_int8_groups(file, entries).items():
        extra = [k for key in (base, scb_key(base), weight_format_key(base)) for k in below(key)]
        if extra:
            msg = (
                f"{file}: tensor {base!r}: unexpected keys {sorted(extra)} under the int8 weight (its keys "
                f"are {base!r}, {scb_key(base)!r} and {weight_format_key(base)!r}; "
                "a bias belongs at '<module>.bias')"
            )
            raise UnexpectedQuantComponent(msg)
        present = {k: entries[k] for k in keys}
        # In a shard bnb wrote, a group without its weight or weight_format may have them in the next
        # shard (save_pretrained cuts shards key by key): the reader joins the pieces.
        if not complete and (base not in present or weight_format_key(base) not in present):
            partial[base] = keys
            continue
        info = check_int8_group(file, base, present, read)
        groups[base] = QuantGroup(base, info, "int8", keys)
    for key in entries:  # a weight_format without its SCB
        prefix, dot, suffix = key.rpartition(".")
        if dot and suffix == WEIGHT_FORMAT_SUFFIX and f"{prefix}.{SCB_SUFFIX}" not in entries:
            base = f"{prefix}.weight"
            if not complete:  # the SCB may be in another shard: a piece of a split group
                partial[base] = tuple(k for k in (base, key) if k in entries)
            elif base in entries:  # else the int8 codes would load as a float weight
                msg = f"{file}: tensor {base!r}: has {key!r} but no '{prefix}.{SCB_SUFFIX}' key"
                raise MissingQuantComponent(msg)


# --------------------------------------------------------------------------------------------------
# LLM.int8 (bitsandbytes 8-bit) layout: <m>.weight I8 [out, in], <m>.SCB F32 [out], <m>.weight_format U8 []
# (formats/int8.py has the math and the record)

INT8_QUANT_TYPE = "int8"
SCB_SUFFIX = "SCB"
WEIGHT_FORMAT_SUFFIX = "weight_format"
#: bnb's weight_format codes (bitsandbytes/utils.py); only "row" is written since bnb 0.45.
WEIGHT_FORMAT_ROW = 0


def _module_prefix(weight_key: str) -> str:
    """``a.b.weight`` -> ``a.b.``; a bare ``weight`` (a module's own state dict) -> ``""``."""
    return "" if weight_key == "weight" else weight_key.removesuffix("weight")


def scb_key(weight_key: str) -> str:
    """``a.b.weight`` -> ``a.b.SCB`` (int8 weights are always a module's ``weight``)."""
    return _module_prefix(weight_key) + SCB_SUFFIX


def weight_format_key(weight_key: str) -> str:
    return _module_prefix(weight_key) + WEIGHT_FORMAT_SUFFIX


def int8_layout(name: str, shape: Sequence[int]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The keys of one int8 weight -> (safetensors dtype code, shape), in bnb's state-dict order."""
    if not name.endswith(".weight") or len(shape) != 2:
        msg = f"tensor {name!r}: an int8 weight is a module's 2-D '.weight', got shape {list(shape)}"
        raise UnsupportedOption(msg)
    rows, cols = (int(d) for d in shape)
    return {
        name: ("I8", (rows, cols)),
        scb_key(name): ("F32", (rows,)),
        weight_format_key(name): ("U8", ()),
    }


@dataclass(frozen=True)
class Int8Info:
    """What the keys of one int8 weight say about it (bnb stores no dtype: the config holds it)."""

    shape: tuple[int, int]
    has_weight_format: bool

    quant_type = INT8_QUANT_TYPE

    def describe(self) -> str:
        return "int8 row-wise"

    def record_fields(self, quant_storage: str) -> dict[str, Any]:
        """The metadata-record fields the keys decide (formats.validate.check_tensor_records)."""
        return {"kind": "quantized", "quant_type": INT8_QUANT_TYPE, "shape": list(self.shape)}


def check_int8_group(
    file: str, name: str, present: Mapping[str, tuple[str, tuple[int, ...]]], read_format: Any = None
) -> Int8Info:
    """Check the keys of int8 weight ``name`` (its ``.weight`` key): I8 [out, in], F32 SCB [out] and
    an optional U8 scalar weight_format equal to 0 (``read_format(key) -> bytes`` reads its value)."""
    where = f"{file}: tensor {name!r}"
    if name not in present:
        msg = f"{where}: int8 weight missing (its {scb_key(name)!r} is present)"
        raise MissingQuantComponent(msg)
    dtype, shape = present[name]
    if dtype != "I8" or len(shape) != 2:
        msg = f"{where}: an int8 weight with SCB must be I8 [out, in], got {dtype} {list(shape)}"
        raise QuantLayoutMismatch(msg)
    sk, fk = scb_key(name), weight_format_key(name)
    if sk not in present:
        msg = f"{where}: component {sk!r} missing (F32 [{shape[0]}] expected)"
        raise MissingQuantComponent(msg)
    if present[sk] != ("F32", (shape[0],)):
        got = f"{present[sk][0]} {list(present[sk][1])}"
        msg = f"{file}: tensor {sk!r}: expected F32 [{shape[0]}] for weight shape {list(shape)}, got {got}"
        raise QuantLayoutMismatch(msg)
    has_format = fk in present
    if has_format:
        if present[fk] != ("U8", ()):
            msg = (
                f"{file}: tensor {fk!r}: expected a U8 scalar [], got {present[fk][0]} {list(present[fk][1])}"
            )
            raise QuantLayoutMismatch(msg)
        if read_format is not None and bytes(read_format(fk)) != bytes([WEIGHT_FORMAT_ROW]):
            msg = (
                f"{file}: tensor {fk!r}: weight_format {bytes(read_format(fk))!r} is a tiled layout "
                "(bitsandbytes 0.43-0.44 on a GPU); only 0 (row) is supported: "
                "re-save it with bitsandbytes >= 0.45"
            )
            raise UnexpectedQuantComponent(msg)
    return Int8Info((int(shape[0]), int(shape[1])), has_format)


def find_int8_groups(
    file: str, entries: Mapping[str, tuple[str, tuple[int, ...]]]
) -> dict[str, tuple[str, ...]]:
    """Weight key -> the keys of each int8 weight announced by a ``<m>.SCB`` among ``entries``
    (those present: a bnb shard may hold only some of them)."""
    out: dict[str, tuple[str, ...]] = {}
    for key in entries:
        module, dot, suffix = key.rpartition(".")
        if not dot or suffix != SCB_SUFFIX:
            continue
        w = f"{module}.weight"
        out[w] = tuple(k for k in (w, key, weight_format_key(w)) if k in entries)
    return out


# --------------------------------------------------------------------------------------------------
# The straight-line validation of a whole shard


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the data buffer
    end: int


@dataclass(frozen=True)
class QuantGroup:
    """The keys of one quantized weight, as found in a shard."""

    name: str  # the weight key
    info: QuantStateInfo | Int8Info
    quant_storage: str
    keys: tuple[str, ...]  # every key of the group, the weight key first


@dataclass(frozen=True)
class ValidatedShard:
    path: Path
    data_start: int  # file offset of the data buffer (8 + header length)
    entries: dict[str, TensorEntry]  # in file order
    metadata: dict[str, str]  # raw __metadata__ (empty if absent)
    groups: dict[str, QuantGroup]  # quantized weights whose keys are all in this shard, by weight key
    partial: dict[str, tuple[str, ...]]  # weight key -> its keys in this shard, the rest elsewhere
    passthrough: tuple[str, ...]  # every other key


def validate_file(path: Path, f: BinaryIO, file_size: int) -> ValidatedShard:
    """Validate the shard open as ``f`` (``file_size`` bytes). Raises a FormatError subclass."""
    file = str(path)
    # 1. Length prefix and header size.
    if file_size < 8:
        msg = f"{file}: truncated: {file_size} bytes, a safetensors file needs at least 8"
        raise TruncatedFile(msg)
    f.seek(0)
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > MAX_HEADER_SIZE:
        msg = f"{file}: header length {header_len} exceeds the limit {MAX_HEADER_SIZE}"
        raise HeaderTooLarge(msg)
    if 8 + header_len > file_size:
        msg = f"{file}: truncated: header needs {header_len} bytes, only {file_size - 8} follow the prefix"
        raise TruncatedFile(msg)
    raw = f.read(header_len)
    # 2. UTF-8, then a JSON object.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"{file}: header is not UTF-8 (byte {exc.start})"
        raise HeaderNotUtf8(msg) from None
    if not text.startswith("{"):
        msg = f"{file}: header must begin with '{{', got {text[:1]!r}"
        raise HeaderNotJson(msg)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        msg = f"{file}: header is not valid JSON ({exc})"
        raise HeaderNotJson(msg) from None
    if not isinstance(header, dict):
        msg = f"{file}: header must be a JSON object"
        raise HeaderNotJson(msg)
    # 3. __metadata__ must be str -> str.
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        msg = f"{file}: __metadata__ must map strings to strings"
        raise BadMetadataField(msg)
    # 4. Every tensor entry: keys, dtype, shape, offsets, size.
    entries: dict[str, TensorEntry] = {}
    for name, e in header.items():
        # Plain type() tests and no per-entry set or generator: a MoE shard has >100 k entries.
        if (
            type(e) is not dict
            or len(e) != 3
            or type(e.get("dtype")) is not str
            or type(e.get("shape")) is not list
            or not _naturals(e["shape"])
            or type(e.get("data_offsets")) is not list
            or len(e["data_offsets"]) != 2
            or not _naturals(e["data_offsets"])
        ):
            msg = (
                f"{file}: tensor {name!r}: entry must be {{dtype: str, shape: [int>=0], "
                f"data_offsets: [begin, end]}}, got {json.dumps(e)[:200]}"
            )
            raise BadTensorEntry(msg)
        if e["dtype"] not in DTYPES:
            msg = f"{file}: tensor {name!r}: unknown dtype {e['dtype']!r}; expected one of {sorted(DTYPES)}"
            raise UnknownDtype(msg)
        begin, end = e["data_offsets"]
        if begin > end:
            msg = f"{file}: tensor {name!r}: data_offsets [{begin}, {end}] are reversed"
            raise BadOffsets(msg)
        nbytes = math.prod(e["shape"]) * DTYPES[e["dtype"]]
        if nbytes != end - begin:
            msg = (
                f"{file}: tensor {name!r}: shape {e['shape']} x {e['dtype']} is {nbytes} bytes, "
                f"data_offsets give {end - begin}"
            )
            raise TensorSizeMismatch(msg)
        entries[name] = TensorEntry(e["dtype"], tuple(e["shape"]), begin, end)
    # 5. Offsets contiguous from 0 (no hole, no overlap), buffer covered exactly.
    data_start = 8 + header_len
    position = 0
    ordered = sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    for name, e in ordered:
        if e.begin != position:
            kind = "a hole" if e.begin > position else "an overlap"
            msg = f"{file}: tensor {name!r}: data_offsets begin at {e.begin}, expected {position} ({kind})"
            raise BadOffsets(msg)
        position = e.end
    if data_start + position != file_size:
        msg = f"{file}: data buffer is {file_size - data_start} bytes but the tensors cover {position}" + (
            " (file truncated)" if data_start + position > file_size else " (trailing bytes)"
        )
        raise (TruncatedFile if data_start + position > file_size else BufferNotCovered)(msg)
    entries = dict(ordered)
    # 6. Our format version, when the shard carries our metadata.
    if "quantize_model.format" in metadata:
        try:
            fmt = json.loads(metadata["quantize_model.format"])
        except ValueError:
            fmt = None
        if not isinstance(fmt, dict) or fmt.get("name") != FORMAT_NAME or not _is_int(fmt.get("version")):
            msg = f"{file}: __metadata__ 'quantize_model.format' is {metadata['quantize_model.format']!r}"
            raise BadMetadata(msg)
        if (msg := unsupported_version(file, fmt["version"])) is not None:
            raise UnknownFormatVersion(msg)

    # 7. Quantized weights. Our shards hold every group whole; a shard bnb/transformers wrote may have
    #    a weight's keys split over several shards (checked across the folder by the reader).
    def read(key: str) -> bytes:
        f.seek(data_start + entries[key].begin)
        return f.read(entries[key].end - entries[key].begin)

    shapes = {k: (e.dtype, e.shape) for k, e in entries.items()}
    ours = "quantize_model.format" in metadata
    groups, partial = find_quant_groups(file, shapes, read, complete=ours)
    claimed = {k for g in groups.values() for k in g.keys} | {k for ks in partial.values() for k in ks}
    passthrough = tuple(k for k in entries if k not in claimed)
    # 8. Our per-tensor records must describe exactly the tensors found (the bnb keys are authoritative).
    if "quantize_model.tensors" in metadata:
        check_tensor_records(file, metadata["quantize_model.tensors"], groups, entries, passthrough)
    return ValidatedShard(path, data_start, entries, dict(metadata), groups, partial, passthrough)


def check_tensor_records(
    file: str,
    raw: str,
    groups: Mapping[str, QuantGroup],
    entries: Mapping[str, TensorEntry],
    passthrough: tuple[str, ...],
) -> None:
    """``quantize_model.tensors`` against the shard: one record per quantized weight and passthrough."""
    try:
        records = json.loads(raw)
    except ValueError as exc:
        msg = f"{file}: __metadata__ 'quantize_model.tensors' is not JSON ({exc})"
        raise BadMetadata(msg) from None
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        msg = f"{file}: __metadata__ 'quantize_model.tensors' must map tensor names to objects"
        raise BadMetadata(msg)
    described = set(groups) | set(passthrough)
    if set(records) != described:
        extra, missing = sorted(set(records) - described), sorted(described - set(records))
        msg = f"{file}: quantize_model.tensors lists {extra[:3]} not in the shard and omits {missing[:3]}"
        raise BadMetadata(msg)
    for name, g in groups.items():
        want = g.info.record_fields(g.quant_storage)
        got = {k: records[name].get(k) for k in want}
        if got != want:
            msg = f"{file}: tensor {name!r}: metadata record {got} disagrees with its bnb keys {want}"
            raise BadMetadata(msg)
    for name in passthrough:
        want = {"kind": "passthrough", "dtype": entries[name].dtype, "shape": list(entries[name].shape)}
        got = {k: records[name].get(k) for k in want}
        if got != want:
            msg = f"{file}: tensor {name!r}: metadata record {got} disagrees with the stored tensor {want}"
            raise BadMetadata(msg)
