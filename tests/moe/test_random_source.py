"""bench/random_source.py: the benchmark's checkpoint made on the fly converts reproducibly and loads."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from moe_helpers import make_moe
from safetensors import safe_open

from converter.loader.model import load_quantized
from converter.loader.moe import moe_modules
from converter.writer.pipeline import convert

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from random_source import RandomSource, random_tensor


def _shapes_and_config(folder: Path) -> tuple[dict, dict]:
    shapes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes, json.loads((folder / "config.json").read_text())


def test_tensor_depends_on_its_name_and_seed_only():
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    a = random_tensor(name, (64, 32), 0, "cpu")
    random_tensor("another", (64, 32), 0, "cpu")  # drawn in between: no shared generator state
    assert torch.equal(a, random_tensor(name, (64, 32), 0, "cpu"))
    assert not torch.equal(a, random_tensor(name.replace(".3.", ".2."), (64, 32), 0, "cpu"))
    assert not torch.equal(a, random_tensor(name, (64, 32), 1, "cpu"))
    assert a.dtype == torch.bfloat16
    assert 0.01 < a.float().std().item() < 0.03  # randn * 0.02 over 2048 values


def test_converts_the_same_bytes_twice_and_loads(tmp_path):
    shapes, config = _shapes_and_config(make_moe("qwen3_moe", tmp_path / "src"))
    outs = []
    for run in ("a", "b"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(RandomSource(config, shapes), tmp_path / run, moe_experts="quantize", progress=False)
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / run).glob("*.safetensors"))})
    assert outs[0]
    assert outs[0] == outs[1]
    model = load_quantized(tmp_path / "a")
    assert len(moe_modules(model)) == config["num_hidden_layers"]
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
