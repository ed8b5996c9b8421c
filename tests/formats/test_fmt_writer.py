"""ShardWriter: layout, determinism, safetensors compatibility, and refusals."""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fmt_helpers import all_tensors, as_bits, randn, reference_record, shard_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from formats.metadata import validate_metadata
from formats.quant_types import QuantType
from formats.reader import open_shard
from formats.validate import (
    DTYPES,
    DuplicateWrite,
    FormatError,
    MissingSlots,
    SlotMismatch,
    UnknownSlot,
    WriterStateError,
)
from formats.writer import TORCH_DTYPES, ShardWriter, TensorSlot, WriterState, temp_path


def _content() -> tuple[list, dict[str, torch.Tensor]]:
    records = [
        reference_record("model.layers.0.mlp.down_proj.weight", randn((64, 96), torch.bfloat16, 1)),
        reference_record(
            "model.layers.0.mlp.up_proj.weight",
            randn((5, 7), torch.float16, 2),
            QuantType.FP4,
            32,
            nested=False,
        ),
        reference_record(
            "model.layers.0.self_attn.o_proj.weight",
            randn((16, 64), torch.float32, 3),
            quant_storage="bfloat16",
        ),
    ]
    passthrough = {
        "model.embed_tokens.weight": randn((10, 8), torch.bfloat16, 4),
        "model.norm.weight": torch.ones(8, dtype=torch.float32),
        "model.position_ids": torch.arange(7, dtype=torch.int64),
        "model.empty": torch.zeros(0, 3, dtype=torch.float16),
        "model.scalar": torch.tensor(2.5, dtype=torch.float64),
        "model.mask": torch.tensor([True, False, True]),
    }
    return records, passthrough


def _write(path: Path, reverse: bool = False) -> tuple:
    records, passthrough = _content()
    slots, metadata = shard_plan(records, passthrough)
    tensors = all_tensors(records, passthrough)
    with ShardWriter(path, slots, metadata) as w:
        for name in sorted(tensors, reverse=reverse):
            w.write(name, tensors[name])
        info = w.close()
    return info, tensors, metadata


def test_safetensors_reads_what_we_write(tmp_path: Path) -> None:
    path = tmp_path / "model-00001-of-00001.safetensors"
    info, tensors, metadata = _write(path)
    assert (info.path, info.size) == (path, path.stat().st_size)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype, k
        assert loaded[k].numel() == v.numel(), k
        assert np.array_equal(as_bits(loaded[k]), as_bits(v)), k
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta == {"format": "pt", **metadata}
    validate_metadata(meta)
    assert not temp_path(path).exists()


def test_layout_is_aligned_and_header_padded(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    _write(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__")
    ends = sorted((e["data_offsets"][0], e["data_offsets"][1], k) for k, e in header.items())
    for begin, _, k in ends:
        assert (8 + n + begin) % DTYPES[header[k]["dtype"]] == 0, k
    blobs = [k for _, _, k in ends if "quant_state" in k]
    assert [k for _, _, k in ends][-len(blobs) :] == sorted(blobs)  # JSON blobs last, by name


def test_deterministic_whatever_the_write_order(tmp_path: Path) -> None:
    a, _, _ = _write(tmp_path / "a.safetensors")
    b, _, _ = _write(tmp_path / "b.safetensors", reverse=True)
    assert a.sha256 == b.sha256
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def _small_writer(path: Path) -> ShardWriter:
    slots = [TensorSlot("a", "F32", (2, 2)), TensorSlot("b", "U8", None), TensorSlot("c", "BF16", (3,))]
    return ShardWriter(path, slots, {})


def test_refuses_unknown_duplicate_wrong_size_and_dtype(tmp_path: Path) -> None:
    w = _small_writer(tmp_path / "x.safetensors")
    with pytest.raises(UnknownSlot, match="'zz' is not in this shard's plan"):
        w.write("zz", torch.zeros(4))
    with pytest.raises(SlotMismatch, match=r"'a': 3 elements written, the plan says shape \[2, 2\]"):
        w.write("a", torch.zeros(3))
    with pytest.raises(SlotMismatch, match=r"dtype torch\.float16 written to a F32 slot"):
        w.write("a", torch.zeros(4, dtype=torch.float16))
    with pytest.raises(SlotMismatch, match="numpy dtype float64 written to a F32 slot"):
        w.write("a", np.zeros(4))
    with pytest.raises(SlotMismatch, match="'c': 5 bytes written, the plan says 6"):
        w.write("c", b"12345")
    w.write("a", np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(DuplicateWrite, match="'a' written twice"):
        w.write("a", torch.zeros(4))
    with pytest.raises(MissingSlots, match=r"2 planned tensor\(s\) never written: 'b', 'c'"):
        w.close()
    w.write("b", b'{"k": 1}')
    w.write("c", torch.zeros(3, dtype=torch.bfloat16))
    info = w.close()
    assert w.state is WriterState.CLOSED
    with pytest.raises(WriterStateError, match=r"write\(\) needs state open, the writer is closed"):
        w.write("a", torch.zeros(4))
    assert load_file(info.path)["b"].tolist() == list(b'{"k": 1}')


def test_write_part_gives_the_bytes_of_one_write(tmp_path: Path) -> None:
    """A tensor written in parts (any order, any mix of torch, numpy and bytes) gives the file that one
    write of the whole tensor gives."""
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    c = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    slots = [TensorSlot("a", "F32", (3, 4)), TensorSlot("b", "U8", None), TensorSlot("c", "BF16", (3,))]
    with ShardWriter(tmp_path / "whole.safetensors", slots, {}) as whole:
        whole.write("a", a)
        whole.write("b", b'{"k": 1}')
        whole.write("c", c)
    with ShardWriter(tmp_path / "parts.safetensors", slots, {}) as w:
        w.write_part("a", 32, a[2])  # the last row first
        w.write_part("a", 0, a[0].numpy())
        w.write_part("a", 16, a[1].numpy().tobytes())
        w.write_part("c", 4, c[2:])
        w.write_part("c", 0, c[:2])
        w.write("b", b'{"k": 1}')
    assert (tmp_path / "parts.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    empty = TensorSlot("z", "F32", (0, 4))
    with ShardWriter(tmp_path / "empty.safetensors", [empty], {}) as w:
        w.write_part("z", 0, torch.zeros(0))  # a zero-size tensor is whole with its empty part
    assert load_file(tmp_path / "empty.safetensors")["z"].shape == (0, 4)


def test_write_part_refuses_parts_outside_overlapping_or_missing(tmp_path: Path) -> None:
    slots = [TensorSlot("a", "F32", (3, 4)), TensorSlot("b", "U8", None), TensorSlot("c", "BF16", (3,))]
    w = ShardWriter(tmp_path / "x.safetensors", slots, {})
    with pytest.raises(UnknownSlot, match="'zz' is not in this shard's plan"):
        w.write_part("zz", 0, torch.zeros(4))
    with pytest.raises(SlotMismatch, match="'b' is a variable-length blob: write it whole"):
        w.write_part("b", 0, b"{}")
    with pytest.raises(SlotMismatch, match=r"'a': part of 16 bytes at offset 40 lies outside its 48 bytes"):
        w.write_part("a", 40, torch.zeros(4))
    with pytest.raises(SlotMismatch, match=r"'a': part of 4 bytes at offset -4 lies outside"):
        w.write_part("a", -4, torch.zeros(1))
    with pytest.raises(SlotMismatch, match=r"does not start and end on F32 elements \(4 bytes\)"):
        w.write_part("a", 2, torch.zeros(1))
    with pytest.raises(SlotMismatch, match=r"does not start and end on F32 elements"):
        w.write_part("a", 0, b"123")
    with pytest.raises(SlotMismatch, match=r"dtype torch\.float16 written to a F32 slot"):
        w.write_part("a", 0, torch.zeros(4, dtype=torch.float16))
    with pytest.raises(TypeError, match="byte_offset must be an int"):
        w.write_part("a", 0.0, torch.zeros(4))  # type: ignore[arg-type]
    w.write_part("a", 16, torch.ones(4))
    with pytest.raises(DuplicateWrite, match=r"'a': part \[16, 32\) overlaps the part \[16, 32\)"):
        w.write_part("a", 16, torch.ones(4))  # the same part again
    with pytest.raises(DuplicateWrite, match=r"'a': part \[8, 24\) overlaps the part \[16, 32\)"):
        w.write_part("a", 8, torch.ones(4))
    with pytest.raises(DuplicateWrite, match=r"'a': part \[28, 36\) overlaps the part \[16, 32\)"):
        w.write_part("a", 28, torch.ones(2))
    with pytest.raises(DuplicateWrite, match="'a' written whole after parts of it"):
        w.write("a", torch.zeros(12))
    w.write_part("a", 0, torch.ones(4))
    w.write("b", b"{}")
    w.write("c", torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(DuplicateWrite, match="'c' written twice"):
        w.write_part("c", 0, torch.zeros(1, dtype=torch.bfloat16))
    with pytest.raises(
        MissingSlots, match=r"1 planned tensor\(s\) only partly written: 'a' \(32 of 48 bytes\)"
    ):
        w.close()
    assert w.state is WriterState.OPEN  # refused before finalizing: the missing part can still come
    w.write_part("a", 32, torch.ones(4))
    with pytest.raises(DuplicateWrite, match="'a' written twice"):
        w.write_part("a", 0, torch.zeros(0))  # nothing more once whole, not even an empty part
    info = w.close()
    assert load_file(info.path)["a"].tolist() == [[1.0] * 4] * 3
    with pytest.raises(WriterStateError, match=r"write_part\(\) needs state open, the writer is closed"):
        w.write_part("a", 0, torch.zeros(4))


def test_a_part_left_out_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(MissingSlots, match=r"'a' \(16 of 48 bytes\)"):
        with ShardWriter(path, [TensorSlot("a", "F32", (3, 4))], {}) as w:
            w.write_part("a", 0, torch.zeros(4))
    assert list(tmp_path.iterdir()) == []


def test_abort_and_exceptions_leave_no_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    w = _small_writer(path)
    w.write("a", torch.zeros(4))
    assert temp_path(path).exists()
    assert not path.exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []

    def fail_midway() -> None:
        with _small_writer(path) as w2:
            w2.write("a", torch.zeros(4))
            msg = "boom"
            raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="boom"):
        fail_midway()
    assert list(tmp_path.iterdir()) == []

    def leave_without_close() -> None:
        with _small_writer(path) as w3:
            w3.write("a", torch.zeros(4))

    with pytest.raises(MissingSlots):
        leave_without_close()
    assert list(tmp_path.iterdir()) == []


def test_refuses_bad_plan_and_metadata(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="planned twice"):
        ShardWriter(tmp_path / "x", [TensorSlot("a", "U8", (1,)), TensorSlot("a", "U8", (1,))], {})
    with pytest.raises(FormatError, match="unknown dtype 'F4'"):
        ShardWriter(tmp_path / "x", [TensorSlot("a", "F4", (1,))], {})
    with pytest.raises(FormatError, match="variable-length slot must be U8"):
        ShardWriter(tmp_path / "x", [TensorSlot("a", "F32", None)], {})
    with pytest.raises(FormatError, match="'format' must be a 'quantize_model"):
        ShardWriter(tmp_path / "x", [], {"format": "np"})
    assert list(tmp_path.iterdir()) == []


def test_transformers_safe_load(tmp_path: Path) -> None:
    """transformers reads shards through its own safetensors helper; make sure it accepts ours."""
    from transformers.modeling_utils import load_state_dict

    path = tmp_path / "model.safetensors"
    _, tensors, _ = _write(path)
    sd = load_state_dict(str(path))
    assert set(sd) == set(tensors)


_CODES = ["U8", "I8", "BOOL", "F16", "BF16", "I32", "F32", "I64", "F64"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.text("abcxyz._", min_size=1, max_size=6),
        st.tuples(st.sampled_from(_CODES), st.lists(st.integers(0, 5), max_size=3)),
        max_size=8,
    ),
    st.dictionaries(st.text("qrs", min_size=1, max_size=4), st.binary(max_size=40), max_size=3),
    st.randoms(use_true_random=False),
)
def test_round_trip_property(fixed: dict, blobs: dict, rnd: random.Random) -> None:
    """Any plan, written in any order, reads back identically through safetensors and our reader."""
    blobs = {f"blob.{k}": v for k, v in blobs.items()}
    slots = [TensorSlot(k, code, tuple(shape)) for k, (code, shape) in fixed.items()]
    slots += [TensorSlot(k, "U8", None) for k in blobs]
    data: dict[str, torch.Tensor] = {}
    for k, (code, shape) in fixed.items():
        raw = torch.randint(0, 256, (math.prod(shape) * DTYPES[code],), dtype=torch.uint8)
        data[k] = (
            raw.view(TORCH_DTYPES[code]).reshape(shape) if code != "BOOL" else (raw % 2).bool().reshape(shape)
        )
    for k, v in blobs.items():
        data[k] = torch.tensor(list(v), dtype=torch.uint8)
    order = list(data)
    rnd.shuffle(order)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.safetensors"
        with ShardWriter(path, slots, {}) as w:
            for k in order:
                w.write(k, data[k])
        loaded = load_file(path)
        shard = open_shard(path)
        assert set(loaded) == set(data) == set(shard.keys())
        for k, v in data.items():
            assert np.array_equal(as_bits(loaded[k]), as_bits(v)), k
            assert np.array_equal(as_bits(shard.get_tensor(k)), as_bits(v)), k
            itemsize = DTYPES[shard.entry(k).dtype]
            assert (shard.data_start + shard.entry(k).begin) % itemsize == 0, k
