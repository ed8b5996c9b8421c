"""Tiny random checkpoints made with transformers, and helpers shared by tests/selection and tests/compat.

Every model but one has hidden size 64 (rows a multiple of the 64-element block) and an intermediate
size of 96, so the down/out projections have 96 inputs: 4-bit blocks there cross row boundaries.
"llama_odd" (hidden 72, intermediate 100) also has tensors whose size is not a multiple of 64, so
their last block is partial.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

from converter.plan.selection_table_gen import TINY_DECODER
from converter.sources.base import TensorInfo

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _decoder(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(TINY_DECODER, max_position_embeddings=64, tie_word_embeddings=False)
    base.update(extra)
    return base


# name -> (model_type, architecture, config kwargs, torch dtype name)
TINY: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "llama": ("llama", "LlamaForCausalLM", _decoder(), "bfloat16"),
    # hidden 72 / intermediate 100: rows not a multiple of 64 and partial last blocks (e.g. k_proj 36x72)
    "llama_odd": (
        "llama",
        "LlamaForCausalLM",
        _decoder(hidden_size=72, intermediate_size=100, head_dim=18),
        "bfloat16",
    ),
    "llama_tied": ("llama", "LlamaForCausalLM", _decoder(tie_word_embeddings=True), "float32"),
    "gpt2": (
        "gpt2",
        "GPT2LMHeadModel",
        dict(
            n_embd=64,
            n_inner=96,
            n_layer=2,
            n_head=4,
            vocab_size=128,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "float32",
    ),
    "bert": (
        "bert",
        "BertModel",
        dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
        ),
        "float32",
    ),
    "t5": (
        "t5",
        "T5ForConditionalGeneration",
        dict(
            d_model=64, d_ff=96, d_kv=16, num_layers=2, num_heads=4, vocab_size=128, decoder_start_token_id=0
        ),
        "float32",
    ),
    # its linears are FalconLinear, a subclass of nn.Linear that transformers + bnb leave 16-bit
    "falcon": (
        "falcon",
        "FalconForCausalLM",
        {k: v for k, v in _decoder(new_decoder_architecture=True, num_kv_heads=2).items() if k != "head_dim"},
        "bfloat16",
    ),
    "mixtral": (
        "mixtral",
        "MixtralForCausalLM",
        _decoder(num_local_experts=4, num_experts_per_tok=2),
        "bfloat16",
    ),
    "qwen3_moe": (
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        _decoder(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1),
        "bfloat16",
    ),
    # MLA attention (transformers feeds kv_b_proj a 4-D input), shared experts, a dense first layer
    "deepseek_v3": (
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        {
            **{k: v for k, v in _decoder().items() if k != "head_dim"},
            "moe_intermediate_size": 32,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "n_group": 1,
            "topk_group": 1,
        },
        "bfloat16",
    ),
}


def tiny_config(name: str) -> Any:
    import transformers

    model_type, arch, kwargs, _ = TINY[name]
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    cfg.architectures = [arch]
    return cfg


def skip_unless_built_in(model_type: str, arch: str) -> None:
    """Skip the calling test where the installed transformers lacks ``model_type`` or ``arch`` (the model
    types transformers 5.25 added, under 5.24)."""
    import pytest
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING or not hasattr(transformers, arch):
        pytest.skip(f"transformers {transformers.__version__} has no {model_type} ({arch})")


def make_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """Random tiny checkpoint ``name`` saved with save_pretrained into ``folder``."""
    import torch
    import transformers

    _, arch, _, dtype = TINY[name]
    cfg = tiny_config(name)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).to(getattr(torch, dtype)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


def read_infos(folder: Path) -> list[TensorInfo]:
    """TensorInfo of every tensor in the folder's safetensors files (header only)."""
    out = []
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for key, v in header.items():
            if key != "__metadata__":
                out.append(TensorInfo(key, f.name, v["dtype"], tuple(v["shape"])))
    return out


def read_tensors(folder: Path) -> dict[str, Any]:
    """Every tensor of the folder's safetensors files, by name."""
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def linear4bit_modules(model: Any) -> set[str]:
    import bitsandbytes as bnb

    return {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def quantized_modules(selection: Any) -> set[str]:
    return {k.removesuffix(".weight") for k in selection.quantize}


class WarningRecords(logging.Handler):
    """Collects the messages of WARNING and above (transformers' load reports)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_logged(folder: Path, **kwargs: Any) -> tuple[Any, dict, list[str]]:
    """``from_pretrained(folder, device_map="cpu")`` of config.json's architecture, in eval mode, with the
    loading info and the warnings transformers logged: (model, info, messages)."""
    import transformers

    cls = getattr(transformers, read_config(folder)["architectures"][0])
    handler = WarningRecords()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    # at warning level whatever an earlier test in this process set (the demo sets "error")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    try:
        model, info = cls.from_pretrained(folder, device_map="cpu", output_loading_info=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
        hf_logger.removeHandler(handler)
    return model.eval(), info, handler.messages


def add_repository_code(folder: Path) -> None:
    """Make the Llama checkpoint in ``folder`` one whose config names repository code (``auto_map``):
    a config and model subclass in ``configuration_my.py`` / ``modeling_my.py``, as custom-code models
    ship them."""
    (folder / "configuration_my.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        "class MyConfig(LlamaConfig):\n    model_type = 'my_llama'\n"
    )
    (folder / "modeling_my.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_my import MyConfig\n\n\n"
        "class MyForCausalLM(LlamaForCausalLM):\n    config_class = MyConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="my_llama",
        architectures=["MyForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_my.MyConfig",
            "AutoModelForCausalLM": "modeling_my.MyForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))


def swap_data_keeping_stat(weights: Path) -> None:
    """Give the safetensors file ``weights`` other tensor values (low mantissa bits flipped) under the
    same header, size and mtime: a source swapped so that only its data tells."""
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # after the header
    data[start:] = bytes(b ^ 0x01 for b in data[start:])
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def int8_experts(folder: Path) -> None:
    """Turn the 16-bit per-expert weights of an int8 conversion (one ``model.safetensors``) into LLM.int8
    records (``<m>.weight`` I8, ``<m>.SCB``, ``<m>.weight_format``), as transformers 4.x + bitsandbytes'
    load_in_8bit saved Mixtral, whose experts were nn.Linear then; the index lists the new keys."""
    import torch
    from safetensors.torch import load_file, save_file

    from converter.kernels.int8 import quantize_int8

    shard = folder / "model.safetensors"
    tensors = load_file(shard)
    for key in [k for k in tensors if ".experts." in k]:
        codes, scb = quantize_int8(tensors[key].contiguous())
        module = key.removesuffix("weight")
        tensors.update(
            {key: codes, module + "SCB": scb, module + "weight_format": torch.tensor(0, dtype=torch.uint8)}
        )
    save_file(tensors, shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(sorted(tensors), shard.name)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def resharded_as_transformers(converted: Path, out: Path, split: str) -> Path:
    """``converted`` rewritten as transformers' ``save_pretrained`` shards a bnb model: key by key, so
    ``split`` (a key of a quantized weight) ends shard 1 and the weight's next key starts shard 2; an index
    with a weight_map and no digests, no metadata of ours."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors: dict = {}
    for shard in sorted(converted.glob("*.safetensors")):
        tensors.update(load_file(shard))
    keys = sorted(tensors)
    cut = keys.index(split) + 1
    assert keys[cut].startswith(split.rsplit(".", 1)[0] + ".")  # the next key is of the same module
    out.mkdir()
    weight_map = {}
    for i, part in enumerate((keys[:cut], keys[cut:]), start=1):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(converted / "config.json", out / "config.json")
    return out


def without_config_digests(folder: Path) -> Path:
    """``folder``'s index as quantize-model wrote it before it recorded the digests of config.json & co
    (``metadata.quantize_model.files``): for tests of verify's checks of what config.json says, which a
    hand edit of a newer folder also fails by its digest."""
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    del index["metadata"]["quantize_model"]["files"]
    path.write_text(json.dumps(index, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return folder
