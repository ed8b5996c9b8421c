"""open_shard: round trips, bnb-made shards, one hostile file per FormatError class, and fuzzing."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fmt_helpers import all_tensors, as_bits, bnb_state_dict, randn, reference_record, shard_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from formats.quant_types import QuantType
from formats.reader import open_checkpoint, open_shard
from formats.record import QuantizedTensor
from formats.validate import (
    BadMetadata,
    BadMetadataField,
    BadOffsets,
    BadQuantState,
    BadTensorEntry,
    BufferNotCovered,
    FormatError,
    HeaderNotJson,
    HeaderNotUtf8,
    HeaderTooLarge,
    MissingQuantComponent,
    QuantLayoutMismatch,
    TensorSizeMismatch,
    TruncatedFile,
    UnexpectedQuantComponent,
    UnknownDtype,
    UnknownFormatVersion,
)
from formats.writer import ShardWriter

W = "model.layers.0.mlp.down_proj.weight"


def _our_shard(path: Path) -> tuple[dict[str, torch.Tensor], list[QuantizedTensor]]:
    records = [
        reference_record(W, randn((32, 64), torch.bfloat16, 1)),
        reference_record(
            "model.layers.0.mlp.up_proj.weight", randn((3, 5), torch.float32, 2), QuantType.FP4, nested=False
        ),
    ]
    passthrough = {"model.norm.weight": torch.ones(64, dtype=torch.bfloat16), "model.ids": torch.arange(3)}
    slots, metadata = shard_plan(records, passthrough)
    tensors = all_tensors(records, passthrough)
    with ShardWriter(path, slots, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return tensors, records


def test_round_trip_our_shard(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    tensors, records = _our_shard(path)
    with open_shard(path) as shard:
        assert set(shard.keys()) == set(tensors)
        assert sorted(shard.quantized) == sorted(r.name for r in records)
        assert sorted(shard.passthrough) == ["model.ids", "model.norm.weight"]
        assert shard.metadata is not None
        assert shard.metadata["quantize_model.format"] == {"name": "quantize-model", "version": 1}
        for k, v in tensors.items():
            assert np.array_equal(as_bits(shard.get_tensor(k)), as_bits(v)), k
        got = shard.records()
        for r in records:
            rec = got[r.name]
            assert isinstance(rec, QuantizedTensor)
            assert torch.equal(rec.dequantize().float(), r.dequantize().float())
        assert torch.equal(got["model.ids"], torch.arange(3))


def test_tensors_are_copy_on_write_views_that_outlive_the_shard(tmp_path: Path) -> None:
    """The map is made when the shard opens and wrapped for numpy on the first tensor (inspect and verify
    never import numpy): a tensor is still a writable view whose writes never reach the file, and it
    stays valid after the shard is closed."""
    path = tmp_path / "s.safetensors"
    tensors, _ = _our_shard(path)
    before = path.read_bytes()
    with open_shard(path) as shard:
        ids = shard.get_tensor("model.ids")
        norm = shard.get_tensor("model.norm.weight")
        ids.add_(100)
    assert torch.equal(ids, torch.arange(3) + 100)
    assert np.array_equal(as_bits(norm), as_bits(tensors["model.norm.weight"]))
    assert path.read_bytes() == before
    with open_shard(path) as shard:
        assert torch.equal(shard.get_tensor("model.ids"), torch.arange(3))


def test_reads_bnb_made_shard(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    x = randn((64, 128), torch.float16, 9)
    sd = bnb_state_dict(W, x, "nf4", nested=True)
    sd["model.layers.0.mlp.down_proj.bias"] = torch.zeros(64, dtype=torch.float16)
    path = tmp_path / "bnb.safetensors"
    save_file(sd, path, metadata={"format": "pt"})
    shard = open_shard(path)
    assert shard.metadata is None
    assert shard.quantized == [W]
    assert shard.passthrough == ["model.layers.0.mlp.down_proj.bias"]
    rec = shard.record(W)
    assert rec.nested is not None
    assert rec.dtype == "float16"


# --------------------------------------------------------------------------------------------------
# Hostile files, built byte by byte.


def _raw(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if header_len is None else header_len) + body + data


def _tensor(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _open(tmp_path: Path, raw: bytes):
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(raw)
    return open_shard(path)


def test_minimal_valid_file_parses(tmp_path: Path) -> None:
    shard = _open(tmp_path, _raw({"a": _tensor("F32", [2], 0, 8), "e": _tensor("F16", [0], 8, 8)}, b"\0" * 8))
    assert shard.keys() == ["a", "e"]
    assert shard.get_tensor("e").shape == (0,)
    assert _open(tmp_path, _raw(b"{}")).keys() == []
    padded = _open(tmp_path, _raw(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}' + b" " * 64, b"x"))
    assert padded.get_tensor("a").tolist() == [ord("x")]


def _layout_case(tmp_path: Path, mutate) -> bytes:
    """Our valid shard's tensors re-laid out by hand after ``mutate(tensors)`` edits them."""
    tensors, _ = _our_shard(tmp_path / "base.safetensors")
    tensors = dict(tensors)
    metadata = {"format": "pt", "quantize_model.format": '{"name":"quantize-model","version":1}'}
    mutate(tensors, metadata)
    header: dict = {"__metadata__": metadata}
    data = b""
    for k, v in tensors.items():
        raw = as_bits(v).tobytes()
        dt = {torch.uint8: "U8", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[v.dtype]
        header[k] = _tensor(dt, list(v.shape), len(data), len(data) + len(raw))
        data += raw
    return _raw(header, data)


QS = f"{W}.quant_state.bitsandbytes__nf4"


def _js(obj: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)


CASES = [
    # (error class, raw-bytes builder, message fragment)
    (TruncatedFile, lambda p: b"\x01\x02", "needs at least 8"),
    (TruncatedFile, lambda p: _raw(b"{}", header_len=64), "header needs 64 bytes"),
    (TruncatedFile, lambda p: _raw({"a": _tensor("F32", [4], 0, 16)}, b"\0" * 8), "file truncated"),
    (HeaderTooLarge, lambda p: struct.pack("<Q", 100_000_001) + b"{}", "exceeds the limit"),
    (HeaderNotUtf8, lambda p: _raw(b'{"\xff": 1}'), "not UTF-8"),
    (HeaderNotJson, lambda p: _raw(b"[1, 2]"), "must begin with '{'"),
    (HeaderNotJson, lambda p: _raw(b'{"a": '), "not valid JSON"),
    (BadTensorEntry, lambda p: _raw({"a": {"dtype": "F32", "shape": [1]}}), "entry must be"),
    (BadTensorEntry, lambda p: _raw({"a": _tensor("F32", [-1], 0, 4)}, b"\0" * 4), "entry must be"),
    (UnknownDtype, lambda p: _raw({"a": _tensor("F4", [2], 0, 1)}, b"\0"), "unknown dtype 'F4'"),
    (TensorSizeMismatch, lambda p: _raw({"a": _tensor("F32", [3], 0, 8)}, b"\0" * 8), "is 12 bytes"),
    (BadOffsets, lambda p: _raw({"a": _tensor("U8", [1], 1, 2)}, b"\0\0"), "(a hole)"),
    (
        BadOffsets,
        lambda p: _raw({"a": _tensor("U8", [2], 0, 2), "b": _tensor("U8", [2], 1, 3)}, b"\0" * 3),
        "(an overlap)",
    ),
    (BadOffsets, lambda p: _raw({"a": _tensor("U8", [0], 2, 1)}, b"\0\0"), "reversed"),
    (BufferNotCovered, lambda p: _raw({"a": _tensor("U8", [1], 0, 1)}, b"\0polyglot"), "trailing bytes"),
    (BadMetadataField, lambda p: _raw({"__metadata__": {"format": 1}}), "map strings to strings"),
    (BadMetadata, lambda p: _raw({"__metadata__": {"quantize_model.format": "{"}}), "quantize_model.format"),
    (
        BadMetadata,
        lambda p: _layout_case(p, lambda t, m: m.update({"quantize_model.tensors": "{}"})),
        "quantize_model.tensors lists [] not in the shard and omits",
    ),
    (
        UnknownFormatVersion,
        lambda p: _raw({"__metadata__": {"quantize_model.format": '{"name":"quantize-model","version":9}'}}),
        "format version 9",
    ),
    (
        MissingQuantComponent,
        lambda p: _layout_case(p, lambda t, m: t.pop(f"{W}.nested_absmax")),
        "nested_absmax",
    ),
    (
        MissingQuantComponent,
        lambda p: _layout_case(p, lambda t, m: t.pop(QS)),
        "but no",
    ),
    (
        UnexpectedQuantComponent,
        lambda p: _layout_case(p, lambda t, m: t.update({f"{W}.bias": torch.ones(2)})),
        "a bias belongs at",
    ),
    (
        BadQuantState,
        lambda p: _layout_case(p, lambda t, m: t.update({QS: _js({"quant_type": "nf4"})})),
        "missing",
    ),
    (
        QuantLayoutMismatch,
        lambda p: _layout_case(p, lambda t, m: t.update({f"{W}.absmax": t[f"{W}.absmax"][:-1]})),
        "expected U8 [32]",
    ),
    (
        QuantLayoutMismatch,
        lambda p: _layout_case(p, lambda t, m: t.update({W: t[W].reshape(-1).view(torch.int64)})),
        "not a quant_storage dtype",
    ),
]


@pytest.mark.parametrize(("error", "build", "fragment"), CASES, ids=lambda c: getattr(c, "__name__", None))
def test_hostile_file(tmp_path: Path, error: type[FormatError], build, fragment: str) -> None:
    raw = build(tmp_path)
    with pytest.raises(error) as exc:
        _open(tmp_path, raw)
    assert type(exc.value) is error
    assert fragment in str(exc.value)
    assert str(exc.value).startswith(str(tmp_path / "hostile.safetensors"))


def test_bnb_made_file_with_missing_component(tmp_path: Path) -> None:
    """Without our metadata a group may be split over shards: the shard opens, the checkpoint refuses."""

    def drop(t: dict, m: dict) -> None:
        t.pop(f"{W}.nested_absmax")
        m.pop("quantize_model.format")

    raw = _layout_case(tmp_path, drop)
    shard = _open(tmp_path, raw)
    assert W in shard.partial
    assert W not in shard.passthrough
    with pytest.raises(MissingQuantComponent, match="split across shards"):
        shard.records()
    with pytest.raises(MissingQuantComponent, match=r"nested_absmax' missing"):
        open_checkpoint([tmp_path / "hostile.safetensors"])


def test_every_validation_error_class_has_a_hostile_file() -> None:
    import formats.validate as v

    reader_errors = {
        v.TruncatedFile, v.HeaderTooLarge, v.HeaderNotUtf8, v.HeaderNotJson, v.BadTensorEntry, v.UnknownDtype,
        v.TensorSizeMismatch, v.BadOffsets, v.BufferNotCovered, v.BadMetadataField, v.BadMetadata,
        v.UnknownFormatVersion, v.MissingQuantComponent, v.UnexpectedQuantComponent, v.BadQuantState,
        v.QuantLayoutMismatch,
    }  # fmt: skip
    assert {c[0] for c in CASES} == reader_errors


# --------------------------------------------------------------------------------------------------
# Fuzzing: random bytes and mutations of a valid shard raise FormatError or nothing, never another error.


def _read_everything(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.safetensors"
        path.write_bytes(raw)
        try:
            shard = open_shard(path)
            shard.records()
            for k in shard.keys():
                shard.get_tensor(k)
        except FormatError:
            pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(raw: bytes) -> None:
    _read_everything(raw)
    _read_everything(struct.pack("<Q", len(raw)) + raw)


_VALID: list[bytes] = []


def _valid_bytes() -> bytes:
    if not _VALID:
        with tempfile.TemporaryDirectory() as d:
            _our_shard(Path(d) / "v.safetensors")
            _VALID.append((Path(d) / "v.safetensors").read_bytes())
    return _VALID[0]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_valid_shard(data: st.DataObject) -> None:
    raw = bytearray(_valid_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip_header", "flip_any", "truncate", "insert", "digit"]))
        if kind == "flip_header":
            i = data.draw(st.integers(0, min(len(raw), 8 + header_len) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif kind == "flip_any":
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del raw[data.draw(st.integers(0, len(raw) - 1)) :]
        elif kind == "insert":
            i = data.draw(st.integers(0, len(raw)))
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:  # change a digit inside the header JSON: offsets, shapes, blocksizes
            digits = [i for i in range(8, min(len(raw), 8 + header_len)) if chr(raw[i]).isdigit()]
            if digits:
                raw[data.draw(st.sampled_from(digits))] = ord(str(data.draw(st.integers(0, 9))))
        if not raw:
            break
    _read_everything(bytes(raw))


def test_metadata_record_must_match_the_bnb_keys(tmp_path: Path) -> None:
    rec = reference_record(W, randn((4, 64), torch.float16, 1))
    slots, meta = shard_plan([rec], {})
    tensors = json.loads(meta["quantize_model.tensors"])
    tensors[W]["blocksize"] = 128
    meta["quantize_model.tensors"] = json.dumps(tensors)
    path = tmp_path / "s.safetensors"
    with ShardWriter(path, slots, meta) as w:
        for k, v in rec.state_dict().items():
            w.write(k, v)
    with pytest.raises(
        BadMetadata, match=r"down_proj\.weight': metadata record .*'blocksize': 128.* disagrees"
    ):
        open_shard(path)
