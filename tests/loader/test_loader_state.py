"""load_quantized_state: bnb-made and our-made folders, stored maps, quant_storage, verify, mmap, refusals."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bnb_signed_zero import fp4_code8_as_plus_zero
from loader_helpers import bnb_load, bnb_quantize_folder
from safetensors.torch import load_file, save_file

from converter.errors import CorruptFileError
from converter.loader import ops
from converter.loader.module import Linear4bit, state_from_record
from converter.loader.state import ChecksumMismatchError, NotQuantizedError, load_quantized_state
from formats import codebooks
from formats.record import QuantizedTensor


def _bnb_layers(folder: Path) -> dict[str, bnb.nn.Linear4bit]:
    model = bnb_load(folder)
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _assert_dequant_equals_bnb(folder: Path) -> int:
    """Our decode of every quantized weight equals bitsandbytes' dequantize_4bit bit for bit."""
    state = load_quantized_state(folder)
    records = {k: v for k, v in state.items() if isinstance(v, QuantizedTensor)}
    layers = _bnb_layers(folder)
    assert set(records) == set(layers)
    for name, record in records.items():
        w = layers[name].weight
        theirs = bnb.functional.dequantize_4bit(w.data, w.quant_state)
        # bitsandbytes' own sign of FP4 code 8's zero depends on its CPU path (tests/bnb_signed_zero.py)
        theirs = fp4_code8_as_plus_zero(theirs, w.data, w.quant_state.quant_type)
        ours = ops.dequantize(record.packed, state_from_record(record))
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16)), name
    return len(records)


def test_bnb_made_checkpoints_decode_bit_exact(bnb_folder: Path) -> None:
    assert _assert_dequant_equals_bnb(bnb_folder) == 14


def test_our_checkpoints_decode_bit_exact_and_match_bnb_loader(our_folder: Path) -> None:
    assert _assert_dequant_equals_bnb(our_folder) == 14


def test_stored_nested_map_is_used(bnb_nf4: Path, tmp_path: Path) -> None:
    # bnb <= 0.49 on CPU wrote -1.0 at nested_quant_map[0]; any stored table must be honoured.
    folder = tmp_path / "old-map"
    shutil.copytree(bnb_nf4, folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    for key in [k for k in tensors if k.endswith(".nested_quant_map")]:
        tensors[key] = tensors[key].clone()
        tensors[key][0] = -1.0
    tensors[name + ".absmax"] = tensors[name + ".absmax"].clone()
    tensors[name + ".absmax"][:5] = 0  # five blocks use code 0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _assert_dequant_equals_bnb(folder)
    record = load_quantized_state(folder)[name]
    assert record.nested.nested_quant_map[0].item() == -1.0
    # Decoding with today's table (no -1.0) would give other values for those five blocks.
    table = torch.tensor(codebooks.DYNAMIC8, dtype=torch.float32)
    today = dataclasses.replace(record, nested=dataclasses.replace(record.nested, nested_quant_map=table))
    stored = ops.dequantize(record.packed, state_from_record(record)).reshape(-1)
    other = ops.dequantize(record.packed, state_from_record(today)).reshape(-1)
    differ = (stored != other).nonzero().flatten()
    assert differ.numel() > 0
    assert differ.max() < 5 * record.blocksize


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_other_quant_storage(plain_llama: Path, tmp_path: Path, storage: torch.dtype) -> None:
    folder = bnb_quantize_folder(plain_llama, tmp_path / "bnb", storage=storage)
    state = load_quantized_state(folder)
    record = state["model.layers.1.self_attn.q_proj.weight"]
    assert record.packed.dtype == storage
    _assert_dequant_equals_bnb(folder)
    layer = Linear4bit.from_record(record)
    assert layer.weight.dtype == storage
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).shape == (2, 64)


def test_verify_names_the_corrupt_shard(our_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(our_folder, folder)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")
    data[data_start + 10] ^= 0x01  # a byte of the first (fixed-size) tensor: still a valid file
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=re.escape(shard.name)) as info:
        load_quantized_state(folder)
    assert "xxh3_128" in str(info.value)  # the chunk digest verify=True checks
    assert "verify=False" in str(info.value)
    assert isinstance(load_quantized_state(folder, verify=False), dict)  # skipping the check loads it


def test_tensors_are_views_of_the_mapped_files(our_folder: Path) -> None:
    state = load_quantized_state(our_folder)
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if str(our_folder) in line:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            maps.append((lo, hi))
    assert maps

    def mapped(t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() < hi for lo, hi in maps)

    records = [v for v in state.values() if isinstance(v, QuantizedTensor)]
    assert all(mapped(r.packed) and mapped(r.absmax) for r in records)
    assert all(mapped(v) for v in state.values() if isinstance(v, torch.Tensor) and v.numel())


def test_refuses_a_plain_checkpoint(plain_llama: Path) -> None:
    with pytest.raises(NotQuantizedError, match=r"no quantized weight"):
        load_quantized_state(plain_llama)


def test_a_peft_adapter_folder_is_said_to_be_one(plain_llama: Path, tmp_path: Path) -> None:
    """`load_quantized("./my-adapter")` (a PEFT adapter: adapter_config.json, adapter_model.safetensors)
    said "no quantized weight ...; not a bitsandbytes 4-bit or 8-bit checkpoint": true, but not what to
    do. It names the adapter's base model and how to load the adapter on it."""
    import json
    import shutil

    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    shutil.copy(plain_llama / "model.safetensors", adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/base-nf4"})
    )
    with pytest.raises(NotQuantizedError) as info:
        load_quantized_state(adapter)
    assert str(info.value) == (
        f"{adapter}: a PEFT adapter (adapter_config.json), not a quantized model: load its base model "
        f"(org/base-nf4) with load_quantized, then the adapter on it: "
        f"PeftModel.from_pretrained(model, '{adapter}')"
    )


def test_refuses_a_missing_component_naming_file_and_tensor(bnb_nf4: Path, tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(bnb_nf4, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.self_attn.v_proj.weight.nested_absmax"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptFileError, match=r"broken: tensor .*v_proj\.weight.*nested_absmax.* missing"):
        load_quantized_state(folder)
