"""Shared builders for the loader tests: quantized layers and tiny checkpoints (ours and bnb-made)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from error_bounds import dot_bound, gemv_arithmetic, unit_roundoff

from converter.kernels import bnb4bit as kernels
from converter.loader.module import Linear4bit
from formats.quant_types import QuantType
from formats.record import QuantizedTensor

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

TINY_LLAMA = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def quantize_record(
    w: torch.Tensor,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    nested: bool = True,
    storage: str = "uint8",
    name: str = "layer.weight",
) -> QuantizedTensor:
    """A record of ``w`` made by our kernels (the same bytes as formats.reference)."""
    qt = QuantType.parse(quant_type)
    packed, absmax = kernels.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type=qt)
    nested_out = kernels.quantize_nested(absmax) if nested else None
    return QuantizedTensor.from_kernel_outputs(
        name, tuple(w.shape), DTYPE_NAMES[w.dtype], qt, blocksize, packed, absmax, nested=nested_out,
        quant_storage=storage,
    )  # fmt: skip


def train_steps(model: torch.nn.Module, params: list[torch.nn.Parameter], ids: torch.Tensor) -> list[float]:
    """Five AdamW steps of causal-LM loss on ``ids``; the losses, in order."""
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def inputs_an_eager_launch_declines(in_features: int) -> list[torch.Tensor]:
    """x that the eager launches of a bfloat16 layer of ``in_features`` (loader/cpu_gemv.py, cuda_gemv.py)
    hand back to the general route: more than 8 tokens, not contiguous, not a kernel dtype, a last
    dimension other than in_features (same element count), another device."""
    return [
        torch.randn(9, in_features).to(torch.bfloat16),
        torch.randn(in_features, 2).to(torch.bfloat16).T,
        torch.ones(1, in_features, dtype=torch.int32),
        torch.randn(2, in_features // 2).to(torch.bfloat16),
        torch.randn(1, in_features, dtype=torch.bfloat16, device="meta"),
    ]


def make_layer(
    out_features: int,
    in_features: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    bias: bool = False,
    seed: int = 0,
    compute_dtype: torch.dtype | None = None,
    **kw,
) -> tuple[Linear4bit, QuantizedTensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).to(dtype)
    record = quantize_record(w, **kw)
    b = (torch.randn(out_features, generator=g) * 0.1).to(dtype) if bias else None
    return Linear4bit.from_record(record, bias=b, compute_dtype=compute_dtype), record, b


def save_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def bnb_quantize_folder(
    src: Path,
    dst: Path,
    *,
    quant_type: str = "nf4",
    nested: bool = True,
    storage: torch.dtype = torch.uint8,
    skip: list[str] | None = None,
) -> Path:
    """transformers + bitsandbytes on CPU: quantize on load, then save_pretrained (the bnb-made oracle)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=skip,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")
        model.save_pretrained(dst)
    return dst


def bnb_load(folder: Path, model_class: type | None = None, **kwargs):
    """transformers + bitsandbytes' load of ``folder`` (``model_class``, default AutoModelForCausalLM)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (model_class or AutoModelForCausalLM).from_pretrained(folder, device_map="cpu", **kwargs)


def gemv_bound(
    x: torch.Tensor, w32: torch.Tensor, bias: torch.Tensor | None = None, *, device_type: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 reference, elementwise bound) of a Linear4bit forward through the fused GEMV.

    ``w32``: the exact float32 decode. The GEMV's arithmetic on ``device_type``
    (error_bounds.gemv_arithmetic), its rounding to x's dtype, then ``+ bias`` in x's dtype
    (module._linear_forward).
    """
    x2d = x.reshape(-1, x.shape[-1])
    return dot_bound(x2d, w32, out_dtype=x.dtype, bias=bias, **gemv_arithmetic(device_type, x.dtype))


def linear_bound(
    x: torch.Tensor, w32: torch.Tensor, bias: torch.Tensor | None, weight_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 reference, elementwise bound) of the fallback: the weight rounded once to
    ``weight_dtype`` (u of it), ``F.linear`` accumulating in float32 in any blocking (gamma_K), the
    result and the bias addition each rounded to x's dtype (at most two roundings)."""
    x2d = x.reshape(-1, x.shape[-1])
    return dot_bound(x2d, w32, out_dtype=x.dtype, bias=bias, weight_rel=unit_roundoff(weight_dtype))


LayerCall = tuple[str, Linear4bit, torch.Tensor, torch.Tensor]


def linear4bit_outputs(model: torch.nn.Module, ids: torch.Tensor) -> list[LayerCall]:
    """Run ``model(ids)`` and return ``(name, layer, input, output)`` of every Linear4bit call."""
    seen: list[LayerCall] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.append((name, mod, inp[0], out)))
        for name, m in model.named_modules()
        if isinstance(m, Linear4bit)
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def reference_weight(record: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The numpy reference decode in float32, then one round-to-nearest-even cast to ``dtype``."""
    from formats import reference

    w = reference.dequantize_4bit(
        record.packed_bytes().numpy(),
        record.absmax_f32(),
        record.n,
        record.blocksize,
        record.quant_map.numpy(),
    )
    return torch.from_numpy(w).reshape(record.shape).to(dtype)


def assert_compiled_without_breaks(counters) -> None:
    """dynamo really compiled (TORCHDYNAMO_DISABLE would make torch.compile a no-op) and broke no graph."""
    assert counters["stats"]["unique_graphs"] >= 1, "dynamo compiled nothing: is it disabled?"
    assert dict(counters["graph_break"]) == {}


def assert_graph_replay_follows_the_stream(layer: torch.nn.Module, x: torch.Tensor) -> None:
    """Capture ``layer(x)`` in a CUDA graph on a non-default stream, change x in place and replay: the
    output is ``layer`` of the new x (the launches followed torch's current stream, no host sync)."""
    with torch.no_grad():
        eager = layer(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x)  # warm-up on the side stream, as torch.cuda.graph requires
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(x * 2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, layer(x))
    assert not torch.equal(out, eager)


def greedy_reference(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    """transformers' own greedy loop on a static cache (what graphed_greedy must reproduce)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + kw["max_new_tokens"])
    return model.generate(ids, do_sample=False, cache=cache, disable_compile=True, **kw)


def sample_reference(model, ids: torch.Tensor, seed: int, **kw) -> torch.Tensor:
    """transformers' own sampling loop on a static cache, seeded (what graphed_greedy's sampling must
    reproduce with the same seed)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + kw["max_new_tokens"])
    torch.manual_seed(seed)
    return model.generate(ids, do_sample=True, cache=cache, disable_compile=True, **kw)


def hiding(package: str) -> str:
    """Python source that makes ``package`` unimportable and unfindable for the rest of a child process
    (an install without it), to prefix to a ``python -c`` script."""
    return f"""
import importlib.abc, importlib.util, sys
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {package!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Hide())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda n, p=None: None if n.split(".")[0] == {package!r} else _find_spec(n, p)
"""


#: Ways to give a loaded model other 4-bit weights after graphed_greedy recorded its decode steps: a new
#: state dict, codes replaced in place, a LoRA merged by our LoRA layer (re-quantized and prepared again)
#: or by PEFT's bitsandbytes one (a new weight assigned in place of the prepared one).
WEIGHT_CHANGES = ("load_state_dict", "weight_data", "lora_merge", "peft_bnb_merge")


def change_weights(model: torch.nn.Module, change: str, other: Path) -> None:
    """Give ``model``'s 4-bit layers other weights the way ``change`` (one of WEIGHT_CHANGES) does;
    ``other``: a checkpoint of the same shapes (``load_state_dict``'s source). Deterministic: a second
    model changed the same way gets the same weights."""
    from converter.loader.model import linear4bit_modules, load_quantized

    if change == "load_state_dict":
        model.load_state_dict(load_quantized(other).state_dict())  # our layers move what they load
    elif change == "weight_data":  # rows of bytes reversed: another valid weight of the same layout
        for layer in linear4bit_modules(model).values():
            layer.weight.data = layer.weight.data.flip(0).contiguous()
    elif change in ("lora_merge", "peft_bnb_merge"):
        import pytest

        from converter.loader.lora import register_lora

        peft = pytest.importorskip("peft")
        if change == "peft_bnb_merge":  # our layers are then bnb.nn.Linear4bit ones: PEFT wraps them its way
            pytest.importorskip("bitsandbytes")

        config = peft.LoraConfig(
            r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        torch.manual_seed(0)  # the same adapters for every model changed so
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = peft.get_peft_model(model, register_lora(config) if change == "lora_merge" else config)
            assert wrapped.merge_and_unload() is model  # the adapters merged into model's own layers
    else:
        raise ValueError(change)
