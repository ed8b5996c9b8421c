"""load_quantized and replace_linear_layers: same modules, same logits as transformers + bitsandbytes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers
from bnb_cpu_path import bnb_generic_cpu_path
from error_bounds import worst_ratio
from loader_helpers import bnb_load, bnb_quantize_folder, gemv_bound, linear4bit_outputs, make_layer
from safetensors.torch import save_file
from tiny_models import add_repository_code, make_tiny, skip_unless_built_in
from torch import nn

from converter.loader.head import GemvHead
from converter.loader.model import (
    ModelBuildError,
    UnexpectedArgumentError,
    linear4bit_modules,
    load_quantized,
)
from converter.loader.module import Linear4bit
from converter.loader.replace import CheckpointMismatchError, replace_linear_layers
from converter.loader.state import load_quantized_state
from formats.record import QuantizedTensor

IDS = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64]])


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _bnb_reference(folder: Path) -> nn.Module:
    """transformers + bnb in train mode before any forward: bnb then keeps its dequantize + F.linear
    path (in eval mode on an AVX512-BF16 CPU it repacks the weights for its own fused kernel)."""
    model = bnb_load(folder)
    model.train()
    return model


def _quantized_names(model: nn.Module, cls: type) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, cls)}


def test_same_modules_and_bit_identical_logits_on_dequant_path(bnb_folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "transformers would load this differently" warning
        ours = load_quantized(bnb_folder)
    theirs = _bnb_reference(bnb_folder)
    assert _quantized_names(ours, Linear4bit) == _quantized_names(theirs, bnb.nn.Linear4bit)
    for layer in linear4bit_modules(ours).values():
        layer.use_gemv = False
    # the bf16 head too (8 tokens: its GEMV kernel's sums are within the bound of F.linear's, not
    # bit-equal to every torch CPU path's; tests/loader/test_loader_head.py)
    for head in (m for m in ours.modules() if isinstance(m, GemvHead)):
        head.use_gemv = False
    # Same decode (bit-exact) and the same F.linear call: identical logits.
    assert torch.equal(_logits(ours), _logits(theirs))


def test_fused_gemv_layers_within_derived_bound_in_a_model_forward(bnb_nf4: Path) -> None:
    """The fused GEMV inside a real forward: every Linear4bit output is within the derived bound of the
    float64 product of the input it received and its exact float32 decode. (End-to-end logits have no
    derivable tolerance: attention, norms and softmax amplify rounding in data-dependent ways; the
    dequantize path above is bit-identical to transformers + bitsandbytes instead.)"""
    ours = load_quantized(bnb_nf4)
    for ids in (IDS[:, :1], IDS[:, :4], IDS):  # 1, 4 and 8 tokens: all take our GEMV
        calls = linear4bit_outputs(ours, ids)
        assert len(calls) == len(linear4bit_modules(ours))
        for name, layer, x, y in calls:
            ref, bound = gemv_bound(x, layer.dequantize(torch.float32), layer.bias)
            assert worst_ratio(y.reshape(ref.shape), ref, bound) <= 1.0, (ids.shape[1], name)


def test_generate(bnb_nf4: Path) -> None:
    ours = load_quantized(bnb_nf4)
    for layer in linear4bit_modules(ours).values():
        layer.use_gemv = False
    theirs = _bnb_reference(bnb_nf4)
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        out = ours.generate(IDS[:, :3], **kwargs)
        assert torch.equal(out, theirs.generate(IDS[:, :3], **kwargs))
    assert out.shape == (1, 9)


def test_skip_modules_are_honoured(plain_llama: Path, tmp_path: Path) -> None:
    folder = bnb_quantize_folder(plain_llama, tmp_path / "skip", skip=["o_proj", "lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = load_quantized(folder)
    assert type(ours.model.layers[0].self_attn.o_proj) is nn.Linear
    assert _quantized_names(ours, Linear4bit) == _quantized_names(_bnb_reference(folder), bnb.nn.Linear4bit)


def test_our_folder_loads_like_transformers_loads_it(our_folder: Path) -> None:
    ours = load_quantized(our_folder, dtype=torch.bfloat16)
    theirs = _bnb_reference(our_folder)
    assert _quantized_names(ours, Linear4bit) == _quantized_names(theirs, bnb.nn.Linear4bit)
    for layer in linear4bit_modules(ours).values():
        layer.use_gemv = False
    assert torch.equal(_logits(ours), _logits(theirs))
    assert ours.is_loaded_in_4bit


def test_non_quantized_tensors_stay_mapped(our_folder: Path) -> None:
    model = load_quantized(our_folder, dtype=torch.bfloat16)
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(our_folder) in line]
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps]
    emb = model.model.embed_tokens.weight
    assert any(lo <= emb.data_ptr() < hi for lo, hi in ranges)  # bf16 in, bf16 asked: no copy


def test_replace_linear_layers_on_a_transformers_model(our_folder: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(our_folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = load_quantized_state(our_folder)
    names = replace_linear_layers(model, our_folder)
    assert set(names) == {
        k.removesuffix(".weight") for k, v in state.items() if isinstance(v, QuantizedTensor)
    }
    model.load_state_dict(
        {k: v for k, v in state.items() if not isinstance(v, QuantizedTensor)}, strict=False
    )
    reference = load_quantized(our_folder)
    for m in (model, reference):
        for layer in linear4bit_modules(m).values():
            layer.use_gemv = False
    assert torch.equal(_logits(model.eval()), _logits(reference))


def test_replace_linear_layers_with_a_loaded_state_reads_its_folder_config(
    plain_llama: Path, tmp_path: Path
) -> None:
    """The documented ``state = load_quantized_state(folder)``; ``replace_linear_layers(model, state)``
    takes the folder config's ``bnb_4bit_compute_dtype`` (float32 here, transformers'
    ``BitsAndBytesConfig`` default, for bf16 weights) and ``llm_int8_threshold``, as the folder path
    does: the layers computed in the weights' dtype (bf16) and with threshold 6.0 instead, and the logits
    were not load_quantized's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from converter.loader.module_int8 import QuantLinear8bit
    from converter.writer.pipeline import convert

    folder = tmp_path / "fp32-compute"
    convert(plain_llama, folder, progress=False, compute_dtype="float32")
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = load_quantized_state(folder)
    names = replace_linear_layers(model, state)
    layers = linear4bit_modules(model)
    assert sorted(layers) == sorted(names)
    assert {layer.compute_dtype for layer in layers.values()} == {torch.float32}
    model.load_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, strict=False)
    assert torch.equal(_logits(model.eval()), _logits(load_quantized(folder)))

    int8 = tmp_path / "int8-threshold-3"
    convert(plain_llama, int8, progress=False, quant_type="int8", int8_threshold=3.0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    replace_linear_layers(model, load_quantized_state(int8))
    thresholds = {m.threshold for m in model.modules() if isinstance(m, QuantLinear8bit)}
    assert thresholds == {3.0}


def test_replace_linear_layers_on_a_falcon_mamba_runs_its_quantized_branch(tmp_path: Path) -> None:
    """FalconMamba multiplies by ``dt_proj.weight`` unless ``config._is_quantized`` is set (transformers'
    quantizers and load_quantized set it): after replace_linear_layers on a plain transformers model the
    4-bit weight met a float matmul ("Expected size for first two dimensions of batch2 tensor"). The
    swap marks the configs of the transformers models in the module, and the logits are
    load_quantized's (dequantize + F.linear on both)."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = FalconMambaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2)
    FalconMambaForCausalLM(config).save_pretrained(tmp_path / "plain")
    convert(tmp_path / "plain", tmp_path / "q", progress=False)
    model = FalconMambaForCausalLM(config).eval()
    state = load_quantized_state(tmp_path / "q")
    replace_linear_layers(model, tmp_path / "q")
    model.load_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, strict=False)
    reference = load_quantized(tmp_path / "q", dtype=torch.float32)
    for m in (model, reference):
        for layer in linear4bit_modules(m).values():
            layer.use_gemv = False
    assert torch.equal(_logits(model, IDS[:, :5] % 128), _logits(reference, IDS[:, :5] % 128))


def test_replace_linear_layers_on_any_module(tmp_path: Path) -> None:
    # A plain nn.Module with its own names; the checkpoint is our layers' state dicts.
    layers = {"encoder.proj": make_layer(32, 64, bias=True)[0], "head": make_layer(8, 32, seed=1)[0]}
    tensors = {f"{name}.{k}": v for name, layer in layers.items() for k, v in layer.state_dict().items()}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = nn.Sequential()
    model.add_module("encoder", nn.Module())
    model.encoder.add_module("proj", nn.Linear(64, 32, dtype=torch.bfloat16))
    model.add_module("act", nn.ReLU())
    model.add_module("head", nn.Linear(32, 8, bias=False, dtype=torch.bfloat16))
    model.forward = lambda x: model.head(model.act(model.encoder.proj(x)))
    assert sorted(replace_linear_layers(model, tmp_path)) == ["encoder.proj", "head"]
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = layers["head"](torch.relu(layers["encoder.proj"](x)))
    assert torch.equal(model.forward(x), expected)
    wrong = nn.Sequential()
    wrong.add_module("encoder", nn.Module())
    wrong.encoder.add_module("proj", nn.Linear(65, 32))
    with pytest.raises(
        CheckpointMismatchError, match=r"'encoder\.proj\.weight' has shape \[32, 64\].*\[32, 65\]"
    ):
        replace_linear_layers(wrong, tmp_path)
    # The checkpoint's bias on a module built without one: refused before anything is swapped (it was
    # dropped without a word, so the layer silently computed x @ W.T alone).
    no_bias = nn.Sequential()
    no_bias.add_module("encoder", nn.Module())
    no_bias.encoder.add_module("proj", nn.Linear(64, 32, bias=False))
    no_bias.add_module("head", nn.Linear(32, 8, bias=False))
    with pytest.raises(CheckpointMismatchError, match=r"'encoder\.proj\.bias' is in the checkpoint"):
        replace_linear_layers(no_bias, tmp_path)
    assert type(no_bias.head) is nn.Linear


def test_state_api_and_replace_work_without_transformers(our_folder: Path, tmp_path: Path) -> None:
    script = f"""
import sys
sys.modules["transformers"] = None  # import transformers -> ImportError
import torch
from torch import nn
from converter.loader.state import load_quantized_state
from converter.loader.replace import replace_linear_layers
from converter.loader.model import load_quantized, ModelBuildError
state = load_quantized_state({str(our_folder)!r})
q = state["model.layers.0.mlp.down_proj.weight"]
m = nn.Module(); m.down_proj = nn.Linear(q.shape[1], q.shape[0], bias=False)
holder = nn.Module(); holder.model = nn.Module(); holder.model.layers = nn.ModuleList([nn.Module()])
holder.model.layers[0].mlp = m
only = {{"model.layers.0.mlp.down_proj.weight": q}}
x = torch.randn(2, q.shape[1], dtype=torch.bfloat16)
print(replace_linear_layers(holder, only), m.down_proj(x).shape)
try:
    load_quantized({str(our_folder)!r})
except ModelBuildError as exc:
    print("refused:", exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "['model.layers.0.mlp.down_proj'] torch.Size([2, 64])" in out
    assert "refused: load_quantized needs transformers" in out


def test_missing_tensor_is_named(our_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-norm"
    shutil.copytree(our_folder, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert "model.norm.weight" in index["weight_map"]
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the shards have two layers
    (folder / "config.json").write_text(json.dumps(config))
    with (
        pytest.warns(UserWarning, match="would load this folder differently") as caught,
        pytest.raises(ModelBuildError, match=r"no tensor for .* model parameter\(s\): \['model\.layers\.2\."),
    ):
        load_quantized(folder)
    # the warning names the user's call, not a line of the loader
    assert {Path(w.filename).name for w in caught if "differently" in str(w.message)} == {Path(__file__).name}


def test_gpt2_conv1d_fp4_fp16(tmp_path: Path) -> None:
    # GPT-2's Conv1D layers: transformers transposes them to [out, in] before quantizing.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).to(torch.float16).save_pretrained(tmp_path / "gpt2")
    folder = bnb_quantize_folder(tmp_path / "gpt2", tmp_path / "gpt2-fp4", quant_type="fp4", nested=False)
    ours = load_quantized(folder, dtype=torch.float16)
    theirs = bnb_load(folder)
    bnb_generic_cpu_path(theirs)
    assert _quantized_names(ours, Linear4bit) == _quantized_names(theirs, bnb.nn.Linear4bit)
    assert len(linear4bit_modules(ours)) == 8
    for layer in linear4bit_modules(ours).values():
        layer.use_gemv = False
    ids = IDS[:, :5]
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs.eval()(ids).logits)


def test_float32_model_from_bf16_shards(bnb_nf4: Path) -> None:
    model = load_quantized(bnb_nf4, dtype=torch.float32)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16  # from the config
    assert _logits(model).dtype == torch.float32


def test_save_pretrained_round_trip(bnb_nf4: Path, tmp_path: Path) -> None:
    # Our layers save bnb's layout: the folder reloads with us and with transformers + bnb unchanged.
    from safetensors.torch import load_file

    model = load_quantized(bnb_nf4)
    model.save_pretrained(tmp_path / "resaved")
    original, resaved = (
        load_file(bnb_nf4 / "model.safetensors"),
        load_file(tmp_path / "resaved" / "model.safetensors"),
    )
    assert set(original) == set(resaved)
    assert all(torch.equal(original[k], resaved[k]) for k in original)
    theirs = _bnb_reference(tmp_path / "resaved")
    assert _quantized_names(theirs, bnb.nn.Linear4bit) == _quantized_names(model, Linear4bit)


def test_trust_remote_code_builds_the_repository_model_class(our_folder: Path, tmp_path: Path) -> None:
    """A folder whose config names repository code (auto_map, the .py files copied by convert):
    trust_remote_code=True builds that class, as transformers does; same logits as the built-in class
    on the same shards. Without it, the code is never run."""
    folder = tmp_path / "remote"
    shutil.copytree(our_folder, folder)
    add_repository_code(folder)
    model = load_quantized(folder, device="cpu", trust_remote_code=True)
    assert type(model).__name__ == "MyForCausalLM"
    assert torch.equal(_logits(model), _logits(load_quantized(our_folder, device="cpu")))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_quantized(folder, device="cpu")


def test_meta_parameter_hook_leaves_other_threads_alone() -> None:
    """While one thread builds a model skeleton (parameters on meta), a parameter another thread
    registers (a model loaded beside it tying its weights, a module the application builds) stays real:
    two loads of tied-embedding models in threads failed with "no tensor for lm_head.weight"."""
    import threading

    from converter.loader.model import _params_on_meta

    built: dict[str, nn.Module] = {}
    with _params_on_meta():
        built["here"] = nn.Linear(4, 3)
        worker = threading.Thread(target=lambda: built.__setitem__("there", nn.Linear(4, 3)))
        worker.start()
        worker.join()
    assert built["here"].weight.device.type == "meta"
    assert built["there"].weight.device.type == "cpu"
    assert built["there"].bias.device.type == "cpu"


@pytest.mark.parametrize("folder_fixture", ["our_folder", "int8_folder"])
@pytest.mark.parametrize("exclude_embeddings", [False, True])
def test_num_parameters_counts_the_quantized_weights(
    folder_fixture: str, exclude_embeddings: bool, plain_llama: Path, request: pytest.FixtureRequest
) -> None:
    """``num_parameters()`` is the checkpoint's parameter count, as transformers + bitsandbytes report it
    for the same folder: the 4-bit / int8 weights are buffers of our layers, not parameters, and must
    still be counted (by their ``[out, in]`` shape)."""
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(folder_fixture)
    plain = AutoModelForCausalLM.from_pretrained(plain_llama)
    expected = plain.num_parameters(exclude_embeddings=exclude_embeddings)
    assert bnb_load(folder).num_parameters(exclude_embeddings=exclude_embeddings) == expected
    model = load_quantized(folder)
    assert model.num_parameters(exclude_embeddings=exclude_embeddings) == expected
    assert model.num_parameters(only_trainable=True) == 0  # a loaded model is frozen


def test_counts_survive_torch_save_and_load(our_folder: Path, plain_llama: Path) -> None:
    """A loaded model saved with torch.save and read back with torch.load keeps our
    ``num_parameters()`` and ``get_memory_footprint()``: they were methods bound to local functions,
    pickled as getattr(model, name), so the copy got transformers' own, which leave out the 4-bit
    weights (a parameter count short by all of them) and count the 4-bit layers short, silently."""
    import io

    from transformers import AutoModelForCausalLM

    model = load_quantized(our_folder)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    expected = AutoModelForCausalLM.from_pretrained(plain_llama).num_parameters()
    assert copy.num_parameters() == model.num_parameters() == expected
    assert copy.num_parameters(exclude_embeddings=True) == model.num_parameters(exclude_embeddings=True)
    assert copy.get_memory_footprint() == model.get_memory_footprint()
    assert copy.get_memory_footprint(return_buffers=False) == model.get_memory_footprint(return_buffers=False)


@pytest.mark.parametrize("generation_file", ["custom", "absent", "invalid"])
def test_generation_config_is_the_folders(our_folder: Path, tmp_path: Path, generation_file: str) -> None:
    """The folder's generation_config.json (a chat model's extra EOS ids, sampling defaults) is the
    loaded model's generation_config, as transformers + bitsandbytes loads it; without the file both
    derive it from config.json, and so they do when the file is not valid JSON (transformers falls back
    silently; we warn, naming the file). generate() without arguments then follows it (here: stops at 7
    tokens)."""
    folder = tmp_path / "folder"
    shutil.copytree(our_folder, folder)
    if generation_file == "custom":
        (folder / "generation_config.json").write_text(
            json.dumps({"eos_token_id": [2, 5], "do_sample": True, "top_k": 3, "max_new_tokens": 7})
        )
    elif generation_file == "invalid":
        (folder / "generation_config.json").write_text('{"eos_token_id": [2, 5],')
    else:
        (folder / "generation_config.json").unlink(missing_ok=True)
    if generation_file == "invalid":
        with pytest.warns(UserWarning, match=r"generation_config\.json.*config\.json") as record:
            ours = load_quantized(folder, verify=False)
        assert [w.filename for w in record if "generation_config" in str(w.message)] == [__file__]
    else:
        ours = load_quantized(folder, verify=False)
    theirs = bnb_load(folder)
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    if generation_file == "custom":
        assert ours.generate(IDS, pad_token_id=0).shape[1] <= IDS.shape[1] + 7


@pytest.mark.parametrize("generation_file", ["custom", "absent"])
@pytest.mark.parametrize("class_name", ["LlamaForCausalLM", "AutoModelForCausalLM"])
def test_generation_config_with_config_kwargs(
    our_folder: Path, tmp_path: Path, generation_file: str, class_name: str
) -> None:
    """``load_quantized(folder, model_class=C, pad_token_id=5, ...)`` gives the generation_config of
    ``C.from_pretrained(folder, pad_token_id=5, ...)``: a concrete class's from_pretrained also applies
    the keyword arguments to the folder's generation_config.json (an Auto class consumes them with the
    config first; without the file both take config.json as it is on disk)."""
    import transformers

    cls = getattr(transformers, class_name)
    folder = tmp_path / "folder"
    shutil.copytree(our_folder, folder)
    if generation_file == "custom":
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    else:
        (folder / "generation_config.json").unlink(missing_ok=True)
    kwargs = {"pad_token_id": 5, "eos_token_id": [4, 6]}
    ours = load_quantized(folder, verify=False, model_class=cls, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = cls.from_pretrained(folder, device_map="cpu", **kwargs)
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()


@pytest.mark.parametrize("class_name", [None, "LlamaForCausalLM", "AutoModelForCausalLM"])
def test_name_or_path_is_the_argument(our_folder: Path, class_name: str | None) -> None:
    """``model.name_or_path`` (and config's ``_name_or_path``, what PEFT records as an adapter's
    ``base_model_name_or_path``) is the path or repo id given, as ``from_pretrained`` sets it whatever
    the class."""
    import transformers
    from peft import LoraConfig, get_peft_model

    cls = getattr(transformers, class_name or "AutoModelForCausalLM")
    model_class = getattr(transformers, class_name) if class_name else None
    ours = load_quantized(our_folder, verify=False, model_class=model_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = cls.from_pretrained(our_folder, device_map="cpu")
    assert ours.name_or_path == theirs.name_or_path == str(our_folder)
    assert ours.config.to_dict() == theirs.config.to_dict()
    peft_model = get_peft_model(ours, LoraConfig(r=2, target_modules=["q_proj"]))
    assert peft_model.peft_config["default"].base_model_name_or_path == str(our_folder)


def test_a_quantization_config_argument_is_named_as_ignored(our_folder: Path) -> None:
    """``quantization_config=BitsAndBytesConfig(...)``, as from_pretrained takes it, was dropped silently;
    the folder's own config still decides, and a warning says the argument is ignored."""
    from transformers import BitsAndBytesConfig

    asked = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")
    with pytest.warns(UserWarning, match=r"quantization_config=BitsAndBytesConfig\(\.\.\.\) is ignored"):
        model = load_quantized(our_folder, verify=False, quantization_config=asked)
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"


def test_torch_dtype_is_dtype(our_folder: Path) -> None:
    """``torch_dtype=`` (transformers' former name of ``dtype``, which its from_pretrained still takes)
    sets the load dtype, instead of landing in the config and leaving bfloat16; given with a different
    ``dtype`` it is refused rather than one of the two being ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_quantized(our_folder, verify=False, torch_dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.config.dtype == torch.float16
    with pytest.raises(TypeError, match="torch_dtype"):
        load_quantized(our_folder, verify=False, dtype=torch.float32, torch_dtype=torch.float16)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_quantized_layers_biases_take_the_load_dtype(quant_type: str, tmp_path: Path) -> None:
    """A float32 checkpoint with biases (BERT) loaded with ``dtype=torch.float16``: the quantized layers'
    biases are float16 as every other float parameter, as transformers + bitsandbytes loads the same
    folder; they stayed float32 (the checkpoint's), cast to float16 on every call."""
    import transformers

    from converter.writer.pipeline import convert

    src = make_tiny("bert", tmp_path / "src")
    out = tmp_path / quant_type
    convert(src, out, quant_type=quant_type, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_quantized(out, verify=False, dtype=torch.float16)
        stock = transformers.AutoModel.from_pretrained(out, dtype=torch.float16)
    query = ours.encoder.layer[0].attention.self.query
    assert type(query).__name__ != "Linear"
    assert query.bias.dtype == torch.float16
    assert {p.dtype for p in ours.parameters() if p.is_floating_point()} == {torch.float16}
    stock_biases = {k: p.dtype for k, p in stock.named_parameters() if k.endswith(".bias")}
    assert {k: p.dtype for k, p in ours.named_parameters() if k.endswith(".bias")} == stock_biases


@pytest.mark.parametrize(
    "kwargs", [{"output_loading_info": True}, {"variant": "fp16", "offload_state_dict": True}]
)
def test_unknown_keyword_arguments_are_a_type_error_naming_them(our_folder: Path, kwargs: dict) -> None:
    """from_pretrained options load_quantized does not take are a TypeError naming them, as from_pretrained
    fails on an unknown keyword (still a ModelBuildError too); they used to be "transformers could not
    build LlamaForCausalLM from config.json", blaming the folder."""
    names = ("argument " if len(kwargs) == 1 else "arguments ") + ", ".join(repr(k) for k in sorted(kwargs))
    with pytest.raises(TypeError, match=re.escape(f"got an unexpected keyword {names}: not attributes")):
        load_quantized(our_folder, verify=False, **kwargs)


def test_use_safetensors(our_folder: Path) -> None:
    """``use_safetensors=True`` (a common from_pretrained argument) is accepted: these folders are always
    safetensors; it used to be a TypeError. ``use_safetensors=False`` asks for a pickle checkpoint,
    which a quantized folder never is: a ValueError saying so, before any work."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_quantized(our_folder, verify=False, use_safetensors=True)
    assert model.is_loaded_in_4bit
    with pytest.raises(ValueError, match=r"use_safetensors=False: .* safetensors shards only"):
        load_quantized(our_folder / "missing", use_safetensors=False)


def test_dtype_takes_any_torch_dtype_name(our_folder: Path) -> None:
    """``dtype="half"`` / ``"float"`` (names of torch dtypes, which from_pretrained takes as
    ``getattr(torch, name)``) load in float16 / float32; they used to be refused ("unsupported dtype").
    A torch dtype the 4-bit kernels do not compute in is still refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, dtype in (("half", torch.float16), ("float", torch.float32), ("torch.half", torch.float16)):
            model = load_quantized(our_folder, verify=False, dtype=name)
            assert {p.dtype for p in model.parameters()} == {dtype}, name
    with pytest.raises(ValueError, match="unsupported dtype 'double'"):
        load_quantized(our_folder, verify=False, dtype="double")


def test_dtype_takes_the_short_names_convert_and_dequantize_take(our_folder: Path) -> None:
    """``convert(dtype="bf16")``, ``dequantize_checkpoint(dtype="fp16")`` and the CLI's ``--dtype bf16``
    take the short names; ``load_quantized``, ``estimate`` and ``model.dequantize`` refused them
    ("unsupported dtype 'bf16': expected one of float32, float16, bfloat16 (or half, float)")."""
    from converter.loader.estimate import estimate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
            model = load_quantized(our_folder, verify=False, dtype=name)
            assert {p.dtype for p in model.parameters()} == {dtype}, name
            assert estimate(our_folder, "auto", None, name) == estimate(our_folder, "auto", None, dtype), name
            model.dequantize(dtype=name)
            assert {p.dtype for p in model.parameters()} == {dtype}, name


def test_dtype_auto_is_the_checkpoints_as_from_pretrained_picks_it(plain_llama: Path, tmp_path: Path) -> None:
    """``dtype="auto"`` / ``torch_dtype="auto"`` (the usual from_pretrained call) and ``dtype=None`` (what
    from_pretrained makes "auto" of) load a float16 folder in float16, as transformers + bitsandbytes
    do: config.json's dtype, else (a config without one) the first float tensor's. They used to be
    refused ("unsupported dtype")."""
    import transformers

    from converter.writer.pipeline import convert

    folder = tmp_path / "fp16"
    convert(plain_llama, folder, dtype="float16", progress=False, max_shard_size="60KB")
    for stored in (True, False):
        if not stored:
            config = json.loads((folder / "config.json").read_text())
            assert config.pop("dtype") == "float16"
            config.pop("torch_dtype", None)
            (folder / "config.json").write_text(json.dumps(config))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map="cpu")
            assert theirs.model.embed_tokens.weight.dtype == torch.float16
            for kwargs in ({"dtype": "auto"}, {"torch_dtype": "auto"}, {"dtype": None}):
                model = load_quantized(folder, verify=False, **kwargs)
                assert {p.dtype for p in model.parameters()} == {torch.float16}, (stored, kwargs)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_keep_in_fp32_modules_load_in_float32_as_transformers_loads_them(
    tmp_path: Path, quant_type: str
) -> None:
    """A float16 T5 keeps its ``_keep_in_fp32_modules`` ("wo") in float32, in the shards and in the
    model: transformers' dtype plan casts them to float32 at load (``_get_dtype_plan``), whatever the
    empty model holds. They used to be cast to float16, the model's dtype, so every kept tensor's dtype
    and the logits differed from transformers + bitsandbytes on the same folder."""
    import transformers
    from tiny_models import TINY, tiny_config

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    getattr(transformers, TINY["t5"][1])(tiny_config("t5")).half().save_pretrained(tmp_path / "src")
    folder = tmp_path / quant_type
    convert(tmp_path / "src", folder, quant_type=quant_type, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.T5ForConditionalGeneration.from_pretrained(folder, device_map="cpu")
    ours = load_quantized(folder, dtype=torch.float16)
    wanted = {k: v.dtype for k, v in theirs.state_dict().items() if v.is_floating_point()}
    wo = [k for k in wanted if k.endswith(".wo.weight")]
    assert wo
    assert all(wanted[k] == torch.float32 for k in wo)
    assert {k: v.dtype for k, v in ours.state_dict().items() if k in wanted} == wanted


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_buffers_computed_at_init_hold_transformers_float32_values(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """GPT-J's rotary table (``embed_positions``, a non-persistent float32 buffer) is computed by
    ``1.0 / 10000 ** (arange(int64) / dim)``, which takes the default dtype. Built under a 16-bit default
    dtype its inverse frequencies are rounded to 8 (bf16) or 11 (fp16) bits; from_pretrained recomputes
    such buffers by ``_init_weights`` after the build, in float32. Ours must hold the same values, bit
    for bit (the table depends on no weight: any difference is the build's dtype)."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    config = GPTJConfig(vocab_size=128, n_positions=64, n_embd=64, n_layer=1, n_head=4, rotary_dim=8)
    GPTJForCausalLM(config).to(dtype).save_pretrained(tmp_path / "gptj")
    folder = bnb_quantize_folder(tmp_path / "gptj", tmp_path / "gptj-nf4")
    ours = load_quantized(folder, dtype=dtype)
    theirs = bnb_load(folder)
    table = ours.transformer.rotary_emb.embed_positions
    assert table.dtype == torch.float32
    assert torch.equal(table, theirs.transformer.rotary_emb.embed_positions)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_mamba_mixers_that_branch_on_a_quantized_config_run(tmp_path: Path, quant_type: str) -> None:
    """FalconMamba and Jamba multiply by ``dt_proj.weight`` directly unless ``config._is_quantized`` is
    set, which transformers sets on every (sub)model config of a quantized load: then they call the
    layer. Without the flag the 4-bit or int8 weight met a float matmul ("Expected size for first two
    dimensions of batch2 tensor", "expected scalar type Float but found Char"). The logits must be those
    of transformers + bitsandbytes loading the same folder (dequantize + F.linear on both sides; int8:
    ``exact`` runs bitsandbytes' own matmul)."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = FalconMambaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2)
    FalconMambaForCausalLM(config).save_pretrained(tmp_path / "plain")
    folder = tmp_path / quant_type
    convert(tmp_path / "plain", folder, quant_type=quant_type, progress=False)
    _assert_loaders_agree(folder)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_mamba_dt_proj_stays_16bit_so_every_loader_runs(tmp_path: Path, quant_type: str) -> None:
    """Mamba's mixer multiplies by ``dt_proj.weight`` itself whatever the config (transformers 5.x), so a
    quantized dt_proj failed in our loader and in transformers + bitsandbytes alike ("Expected size for
    first two dimensions of batch2 tensor"). It stays 16-bit with its reason and is named in
    ``llm_int8_skip_modules``; every other linear is quantized; both loaders give the same logits."""
    from transformers import MambaConfig, MambaForCausalLM

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2)
    MambaForCausalLM(config).save_pretrained(tmp_path / "plain")
    folder = tmp_path / quant_type
    convert(tmp_path / "plain", folder, quant_type=quant_type, progress=False)
    _assert_kept_16bit(
        folder,
        [f"backbone.layers.{i}.mixer.dt_proj" for i in range(2)],
        "read directly (MambaMixer multiplies by dt_proj.weight itself)",
        quantized=[f"backbone.layers.{i}.mixer.{m}" for i in range(2) for m in ("in_proj", "out_proj")],
    )
    _assert_loaders_agree(folder)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_hy_v4_indexer_weights_proj_stays_16bit_so_every_loader_runs(tmp_path: Path, quant_type: str) -> None:
    """HY-V4's sparse-attention indexer calls ``weights_proj`` on ``x.to(weights_proj.weight.dtype)``; its
    model lists the layer in ``_keep_in_fp32_modules_strict`` only, which transformers + bitsandbytes does
    not exclude, so a quantized one was uint8 storage (nf4: the input truncated to uint8, silent garbage
    in both loaders) or int8 (both loaders failed). It stays 16-bit with its reason, named in
    ``llm_int8_skip_modules``; its sibling projections are quantized; both loaders give the same logits."""
    from transformers import HYV4Config, HYV4ForCausalLM

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = HYV4Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        head_dim=16, intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, kv_lora_rank=64, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16,
        index_n_heads=4, index_head_dim=32, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    HYV4ForCausalLM(config).save_pretrained(tmp_path / "plain")
    folder = tmp_path / quant_type
    # bitsandbytes 0.50's CPU int8 matmul takes 2-D/3-D inputs only; MLA's kv_b_proj gets a 4-D one
    skip = ["*.kv_b_proj"] if quant_type == "int8" else []
    convert(tmp_path / "plain", folder, quant_type=quant_type, skip=skip, progress=False)
    _assert_kept_16bit(
        folder,
        [f"model.layers.{i}.self_attn.indexer.weights_proj" for i in range(2)],
        "read directly (HYV4Indexer casts its input to weights_proj.weight.dtype)",
        quantized=[f"model.layers.{i}.self_attn.indexer.wk" for i in range(2)],
    )
    _assert_loaders_agree(folder)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_layers_whose_input_is_cast_to_their_weight_dtype_stay_16bit(tmp_path: Path, quant_type: str) -> None:
    """GraniteSpeech5's encoder calls ``input_linear`` on ``input_features.to(input_linear.weight.dtype)``
    (as do Ernie-4.5-VL's patch embedding, the ColPali retrievers' projection, BLIP-2's retrieval heads,
    LongT5's ``wo``...: selection_facts.READ_DIRECTLY): quantized, the input became uint8 (nf4: "mixed
    dtype") or int8 and the forward failed in our loader and in transformers + bitsandbytes alike. It
    stays 16-bit with its reason, named in ``llm_int8_skip_modules``; both loaders give the same logits."""
    from transformers import AutoConfig, GraniteSpeech5ForCTC

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "granite_speech5_ctc", vocab_size=64, encoder_config=dict(
            hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
            num_hidden_layers=2, num_mel_bins=16, context_size=8, max_position_embeddings=16, vocab_size=64,
            subsample_layers=[0],
        ),
    )  # fmt: skip
    GraniteSpeech5ForCTC(config).save_pretrained(tmp_path / "plain")
    folder = tmp_path / quant_type
    convert(tmp_path / "plain", folder, quant_type=quant_type, progress=False)
    _assert_kept_16bit(
        folder,
        ["encoder.input_linear"],
        "read directly (GraniteSpeech5Encoder casts its input to input_linear.weight.dtype)",
        quantized=["encoder.layers.0.self_attn.q_proj"],
    )
    features = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(0))
    _assert_loaders_agree(folder, {"input_features": features})


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_mobilebert_mlm_head_dense_stays_16bit(tmp_path: Path, quant_type: str) -> None:
    """MobileBERT's MLM head multiplies by ``torch.cat([decoder.weight.t(), dense.weight])``: quantized
    (as transformers + bitsandbytes quantize it, once the skeleton is untied like from_pretrained's),
    the forward failed in our loader and in theirs ("Sizes of tensors must match"). It stays 16-bit
    with its reason, named in ``llm_int8_skip_modules``; both loaders give the same logits."""
    from transformers import MobileBertConfig, MobileBertForMaskedLM

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = MobileBertConfig(  # every input width a multiple of 64: whole blocks, bnb's CPU path exact
        vocab_size=128, hidden_size=128, embedding_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, intra_bottleneck_size=64, true_hidden_size=64,
    )  # fmt: skip
    MobileBertForMaskedLM(config).save_pretrained(tmp_path / "plain")
    folder = tmp_path / quant_type
    convert(tmp_path / "plain", folder, quant_type=quant_type, progress=False)
    _assert_kept_16bit(
        folder,
        ["cls.predictions.dense"],
        "read directly (MobileBertLMPredictionHead concatenates dense.weight into its output matrix)",
        quantized=["mobilebert.encoder.layer.0.attention.self.query"],
    )
    _assert_loaders_agree(folder, {"input_ids": IDS[:, :5]})


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_layoutlmv3_relative_position_tables_stay_16bit(tmp_path: Path, quant_type: str) -> None:
    """LayoutLMv3's encoder indexes ``rel_pos_bias.weight`` (and the 2-D x/y tables) as bias tables instead
    of calling the layers: quantized, the forward failed in our loader and in transformers + bitsandbytes
    alike (nf4: the packed storage has one column, "index 31 is out of bounds"; int8: "result type Float
    can't be cast to the desired output type Char"). They stay 16-bit with their reason, named in
    ``llm_int8_skip_modules``; both loaders give the same logits."""
    from transformers import LayoutLMv3Config, LayoutLMv3ForSequenceClassification

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = LayoutLMv3Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, visual_embed=False, rel_pos_bins=64, coordinate_size=10, shape_size=12,
    )  # fmt: skip
    LayoutLMv3ForSequenceClassification(config).save_pretrained(tmp_path / "plain")
    folder = tmp_path / quant_type
    convert(tmp_path / "plain", folder, quant_type=quant_type, progress=False)
    for leaf in ("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias"):
        _assert_kept_16bit(
            folder,
            [f"layoutlmv3.encoder.{leaf}"],
            f"read directly (LayoutLMv3Encoder indexes {leaf}.weight)",
            quantized=["layoutlmv3.encoder.layer.0.attention.self.query"],
        )
    bbox = torch.tensor(
        [[[0, 0, 10, 10], [10, 0, 30, 10], [40, 5, 60, 20], [0, 30, 90, 50], [5, 60, 50, 90]]]
    )
    _assert_loaders_agree(folder, {"input_ids": IDS[:, :5], "bbox": bbox})


def _assert_kept_16bit(folder: Path, modules: list[str], reason: str, *, quantized: list[str]) -> None:
    """The report keeps each of ``modules``' weights with ``reason`` and quantizes ``quantized``'s;
    ``llm_int8_skip_modules`` names ``modules`` (without the base-model prefix, as transformers matches;
    a base model's names have none)."""
    report = json.loads((folder / "quantization_report.json").read_text())
    actions = {t["name"]: (t["action"], t.get("reason")) for t in report["tensors"]}
    assert all(actions[f"{m}.weight"] == ("keep", reason) for m in modules)
    assert all(actions[f"{m}.weight"][0] == "quantize" for m in quantized)
    skip = json.loads((folder / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert all(m in skip or m.split(".", 1)[1] in skip for m in modules)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_linears_called_through_a_plain_list_stay_16bit(tmp_path: Path, quant_type: str) -> None:
    """Mask2Former's mask predictor calls its linears through ``PredictionBlock.layers``, a plain list
    (registered with ``add_module`` besides): a quantized one is a replaced module the list does not
    reach, and both loaders' forward failed ("Tensor on device meta is not on the expected device cpu").
    They stay 16-bit with their reason, named in ``llm_int8_skip_modules``; the other linears are
    quantized; both loaders give the same outputs (dequantize + F.linear; int8: bitsandbytes' matmul)."""
    from transformers import Mask2FormerConfig, Mask2FormerModel

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    swin = dict(
        model_type="swin",
        image_size=32,
        patch_size=4,
        embed_dim=64,
        depths=[1, 1, 1, 1],
        num_heads=[2, 2, 4, 4],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=swin, hidden_dim=64, feature_size=64, mask_feature_size=64,
        encoder_feedforward_dim=128, dim_feedforward=128, encoder_layers=1, decoder_layers=2,
        num_attention_heads=4, num_queries=8, architectures=["Mask2FormerModel"],
    )  # fmt: skip
    Mask2FormerModel(config).to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    folder = tmp_path / quant_type
    convert(tmp_path / "plain", folder, quant_type=quant_type, progress=False)
    listed = [f"transformer_module.decoder.mask_predictor.mask_embedder.{i}.0" for i in range(3)]
    _assert_kept_16bit(
        folder,
        listed,
        "called through a plain list (Mask2FormerPredictionBlock.layers), which a replaced layer does not "
        "reach",
        quantized=[
            "transformer_module.decoder.layers.0.self_attn.out_proj",
            "pixel_level_module.decoder.encoder.layers.0.fc1",
        ],
    )
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    a, b = _both_loaders(folder, pixel_values=pixels)
    assert torch.equal(a.transformer_decoder_last_hidden_state, b.transformer_decoder_last_hidden_state)
    assert torch.equal(a.masks_queries_logits[-1], b.masks_queries_logits[-1])


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_wavlm_attention_projections_stay_16bit_so_every_loader_runs(tmp_path: Path, quant_type: str) -> None:
    """WavLM's attention passes its q/k/v/out projections' weights to ``F.multi_head_attention_forward``
    instead of calling the layers: quantized, the forward failed in our loader and in transformers +
    bitsandbytes alike ("expecting query weights shape of (64, 64), but got torch.Size([2048, 1])").
    They stay 16-bit with their reason, named in ``llm_int8_skip_modules``; the feed-forward layers are
    quantized; both loaders give the same logits."""
    from transformers import WavLMConfig, WavLMForCTC

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = WavLMConfig(
        vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        conv_dim=(64, 64), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, architectures=["WavLMForCTC"],
    )  # fmt: skip
    WavLMForCTC(config).to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    folder = tmp_path / quant_type
    # gru_rel_pos_linear (16 -> 8) gets a 4-D input: bitsandbytes 0.50's CPU int8 matmul takes 2-D/3-D
    # inputs only, and its CPU 4-bit dequantize takes rows of 16 as whole blocks (docs/cli.md --blocksize)
    skip = ["*.gru_rel_pos_linear"]
    convert(tmp_path / "plain", folder, quant_type=quant_type, skip=skip, progress=False)
    for leaf in ("q_proj", "k_proj", "v_proj", "out_proj"):
        _assert_kept_16bit(
            folder,
            [f"wavlm.encoder.layers.{i}.attention.{leaf}" for i in range(2)],
            f"read directly (WavLMAttention passes {leaf}.weight to F.multi_head_attention_forward)",
            quantized=[f"wavlm.encoder.layers.{i}.feed_forward.output_dense" for i in range(2)],
        )
    audio = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ours, theirs = _both_loaders(folder, input_values=audio)
    assert torch.equal(ours.logits, theirs.logits)


def _both_loaders(folder: Path, **inputs: torch.Tensor) -> tuple:
    """The outputs of ``load_quantized`` and of transformers + bitsandbytes (config.json's architecture)
    on ``inputs``, bfloat16, dequantize + F.linear on both sides (int8: bitsandbytes' own matmul)."""
    import transformers

    ours = load_quantized(folder, dtype=torch.bfloat16)
    cls = getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bnb_generic_cpu_path(
            cls.from_pretrained(folder, device_map="cpu", dtype=torch.bfloat16).eval()
        )
    for layer in ours.modules():
        if hasattr(layer, "use_gemv"):
            layer.use_gemv = False
        if hasattr(layer, "exact"):
            layer.exact = True
    with torch.no_grad():
        return ours(**inputs), theirs(**inputs)


def _tiny_siglip2(folder: Path) -> dict:
    from transformers import Siglip2Config, Siglip2ForImageClassification

    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=4
    )
    text = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    config = Siglip2Config(
        vision_config=vision, text_config=text, architectures=["Siglip2ForImageClassification"]
    )
    Siglip2ForImageClassification(config).to(torch.bfloat16).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    return dict(
        pixel_values=torch.randn(1, 16, 3 * 4 * 4, generator=g).to(torch.bfloat16),
        pixel_attention_mask=torch.ones(1, 16, dtype=torch.long),
        spatial_shapes=torch.tensor([[4, 4]]),
    )


def _tiny_switch_transformers(folder: Path) -> dict:
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2, decoder_start_token_id=0,
        architectures=["SwitchTransformersForConditionalGeneration"],
    )  # fmt: skip
    SwitchTransformersForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(folder)
    return dict(input_ids=IDS % 128, decoder_input_ids=torch.tensor([[0, 5, 6, 7]]))


#: model -> (tiny checkpoint writer, a linear whose parent casts the input to its weight's dtype, the
#: parent's class, a sibling linear that is quantized)
_CASTING = {
    "siglip2": (
        _tiny_siglip2,
        "vision_model.embeddings.patch_embedding",
        "Siglip2VisionEmbeddings",
        "vision_model.encoder.layers.0.mlp.fc1",
    ),
    "switch_transformers": (
        _tiny_switch_transformers,
        "encoder.block.0.layer.1.mlp.wo",
        "SwitchTransformersDenseActDense",
        "encoder.block.0.layer.1.mlp.wi",
    ),
}


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
@pytest.mark.parametrize("name", sorted(_CASTING))
def test_linears_whose_input_is_cast_to_their_weight_dtype_stay_16bit(
    tmp_path: Path, name: str, quant_type: str
) -> None:
    """SigLIP2's patch embedding (``target_dtype = self.patch_embedding.weight.dtype``) and Switch
    Transformers' dense ``wo`` (``hidden_states.to(self.wo.weight.dtype)`` unless int8) cast their input
    to the weight's dtype: a 4-bit weight (uint8 storage) truncated it to uint8 and both loaders agreed
    on garbage logits, an int8 patch embedding failed in both. Such a linear, found in its parent's
    source, stays 16-bit with its reason and is named in ``llm_int8_skip_modules``; both loaders give
    the same outputs, near the 16-bit model's."""
    from transformers import AutoConfig

    from converter.writer.pipeline import convert

    write, kept, parent, quantized = _CASTING[name]
    torch.manual_seed(0)
    inputs = write(tmp_path / "plain")
    folder = tmp_path / quant_type
    convert(tmp_path / "plain", folder, quant_type=quant_type, progress=False)
    reason = f"read directly ({parent} casts its input to {kept.rsplit('.', 1)[1]}.weight.dtype)"
    _assert_kept_16bit(folder, [kept], reason, quantized=[quantized])
    ours, theirs = _both_loaders(folder, **inputs)
    assert torch.equal(ours.logits, theirs.logits)
    import transformers

    arch = AutoConfig.from_pretrained(tmp_path / "plain").architectures[0]
    plain = getattr(transformers, arch).from_pretrained(tmp_path / "plain", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = plain(**inputs).logits.float()
    assert (ours.logits.float() - ref).norm() < 0.5 * ref.norm()


def _tiny_ergo(folder: Path) -> Path:
    """Ergo (transformers 5.25): a dense first layer, then routed experts; saved in its own names."""
    skip_unless_built_in("ergo", "ErgoForCausalLM")
    from transformers import ErgoConfig, ErgoForCausalLM

    config = ErgoConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        first_dense_intermediate_size=128, num_dense_blocks=1, moe_intermediate_size=64,
        shared_intermediate_size=64, num_experts=4, num_experts_per_tok=2, sliding_window=8,
        global_attention_every_n_layers=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    ErgoForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_a_cast_to_a_deeper_linears_weight_dtype_keeps_it_16bit(tmp_path: Path, quant_type: str) -> None:
    """Ergo's decoder layer casts its attention and MLP inputs to ``self.self_attn.o_proj.weight.dtype``:
    with o_proj quantized, transformers + bitsandbytes failed on our folder ("value cannot be converted to
    type uint8_t without overflow"; int8: int8_t) and so did load_quantized (int8: "quantized layers
    compute in float32, ... not torch.int8"), as transformers + bitsandbytes quantizing on load does. Such
    a linear, found through the path in an ancestor's source, stays 16-bit with its reason and is named in
    ``llm_int8_skip_modules``; both loaders give the same logits, near the 16-bit model's."""
    from converter.writer.pipeline import convert

    src = _tiny_ergo(tmp_path / "plain")
    folder = tmp_path / quant_type
    convert(src, folder, quant_type=quant_type, progress=False)
    reason = "read directly (ErgoDecoderLayer casts its input to self_attn.o_proj.weight.dtype)"
    kept = [f"layers.{i}.attention.wo" for i in (0, 1)]  # Ergo's own names for self_attn.o_proj
    _assert_kept_16bit(folder, [], reason, quantized=[f"layers.{i}.attention.wqkv" for i in (0, 1)])
    report = json.loads((folder / "quantization_report.json").read_text())
    actions = {t["name"]: (t["action"], t.get("reason")) for t in report["tensors"]}
    assert all(actions[f"{m}.weight"] == ("keep", reason) for m in kept)
    skip = json.loads((folder / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert {"layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj"} <= set(skip)
    ours, theirs = _both_loaders(folder, input_ids=IDS % 128)
    assert torch.equal(ours.logits, theirs.logits)
    plain = transformers.ErgoForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = plain(IDS % 128).logits.float()
    assert (ours.logits.float() - ref).norm() < 0.5 * ref.norm()
    # why: transformers + bitsandbytes quantizing o_proj on load cannot run the model either
    bnb_config = (
        transformers.BitsAndBytesConfig(load_in_8bit=True)
        if quant_type == "int8"
        else transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_load = transformers.ErgoForCausalLM.from_pretrained(
            src, device_map="cpu", quantization_config=bnb_config
        )
    with torch.no_grad(), pytest.raises(RuntimeError, match="without overflow"):
        on_load(IDS % 128)


def test_fused_16bit_tensors_are_split_as_transformers_loads_them(tmp_path: Path) -> None:
    """HRM's checkpoint holds ``attn.gqkv_proj`` and ``mlp.gate_up_proj`` fused; transformers' conversion
    mapping chunks them into the model's gate/q/k/v and gate/up projections on load. Those stay 16-bit
    (their quantization state would not follow the split): our loader left them unused, warned, and ran
    with those projections randomly initialised (logits unlike transformers + bitsandbytes'). Now it runs
    the same converters on 16-bit tensors: no warning, the same logits."""
    from transformers import HrmTextConfig, HrmTextForCausalLM

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = HrmTextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    HrmTextForCausalLM(config).save_pretrained(tmp_path / "plain")
    folder = tmp_path / "nf4"
    convert(tmp_path / "plain", folder, quant_type="nf4", progress=False)
    report = json.loads((folder / "quantization_report.json").read_text())
    assert {t["action"] for t in report["tensors"] if t["name"].endswith("gqkv_proj.weight")} == {"keep"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "checkpoint tensor(s) unused" / new parameters
        load_quantized(folder, dtype=torch.float32, verify=False)
    _assert_loaders_agree(folder)


def test_fused_16bit_qkv_is_split_after_the_renamings(tmp_path: Path) -> None:
    """Sarvam-MoE (a Glm4MoeForCausalLM) stores ``attention.query_key_value``: transformers renames
    ``.attention.`` to ``.self_attn.`` and splits the rows by each target's size (GQA). The converter runs
    on the renamed key, as transformers chains them (it never matched the raw key: q/k/v were randomly
    initialised before)."""
    from transformers import CONFIG_MAPPING, Glm4MoeForCausalLM

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = CONFIG_MAPPING["sarvam_moe"](
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, first_k_dense_replace=1, n_group=1, topk_group=1,
    )  # fmt: skip
    Glm4MoeForCausalLM(config).save_pretrained(tmp_path / "plain")
    folder = tmp_path / "nf4"
    convert(tmp_path / "plain", folder, quant_type="nf4", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "checkpoint tensor(s) unused" / new parameters
        load_quantized(folder, dtype=torch.float32, verify=False)
    _assert_loaders_agree(folder)


def test_padded_16bit_head_is_sliced_as_transformers_loads_it(tmp_path: Path) -> None:
    """Inkling2 saves its head padded to ``vocab_size`` rows; transformers' converter of the same name
    slices it to ``unpadded_vocab_size`` on load. Our loader refused the folder ("tensor 'lm_head.weight'
    has shape [256, 64], the model wants [250, 64]"); it now runs the converter on a 16-bit tensor whose
    shape differs from the model's too: the same logits as transformers + bitsandbytes."""
    from transformers import Inkling2ForCausalLM, Inkling2TextConfig

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = Inkling2TextConfig(
        vocab_size=256, unpadded_vocab_size=250, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
        swa_head_dim=16, sliding_window_size=16, rel_extent=16, n_layers_per_attn_res_block=1,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, eos_token_id=0,
    )  # fmt: skip
    Inkling2ForCausalLM(config).save_pretrained(tmp_path / "plain")
    folder = tmp_path / "nf4"
    convert(tmp_path / "plain", folder, quant_type="nf4", progress=False)
    _assert_loaders_agree(folder)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_olmo_hybrid_split_conv1d_is_concatenated_on_load(tmp_path: Path, quant_type: str) -> None:
    """OLMo-Hybrid's ``linear_attn.conv1d.weight`` is written split (``q_conv1d`` / ``k_conv1d`` /
    ``v_conv1d``) and concatenated by transformers' WeightConverter on load. Our loader left the three
    unused and ``conv1d`` randomly initialised (warnings, and logits unlike transformers'); it now
    concatenates them in the converter's order: the same tensor and logits as transformers + bitsandbytes."""
    from safetensors.torch import load_file
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = OlmoHybridConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, pad_token_id=3,
        eos_token_id=3,
    )  # fmt: skip
    OlmoHybridForCausalLM(config).save_pretrained(tmp_path / "plain")
    folder = tmp_path / quant_type
    convert(tmp_path / "plain", folder, quant_type=quant_type, progress=False)
    shard = load_file(folder / "model.safetensors")
    prefix = "model.layers.0.linear_attn."
    want = torch.cat([shard[f"{prefix}{p}_conv1d.weight"] for p in "qkv"]).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unused" tensors, no newly initialised parameters
        ours = load_quantized(folder, dtype=torch.float32, verify=False)
    assert torch.equal(ours.get_parameter(f"{prefix}conv1d.weight"), want)
    _assert_loaders_agree(folder)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_nemotron_h_experts_without_gate_convert_and_load(tmp_path: Path, quant_type: str) -> None:
    """NemotronH's routed experts have no gate projection (per-expert ``up_proj`` / ``down_proj`` on disk):
    convert refused every such checkpoint ("experts.0.gate_proj.weight is missing ... an incomplete or
    damaged source") and load_quantized found "no fused experts module". They convert with the experts
    16-bit (the default) and load in both loaders with the same logits (--moe-experts quantize:
    tests/moe/test_moe_ungated.py)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = NemotronHConfig(
        vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, mamba_num_heads=4,
        mamba_head_dim=16, ssm_state_size=8, n_groups=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        layers_block_type=["linear_attention", "moe", "full_attention"],
    )  # fmt: skip
    NemotronHForCausalLM(config).save_pretrained(tmp_path / "plain")
    folder = tmp_path / quant_type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "routed MoE experts ... stay 16-bit"
        convert(tmp_path / "plain", folder, quant_type=quant_type, progress=False)
    _assert_loaders_agree(folder)


@pytest.mark.parametrize(
    ("model_type", "fused"),
    [
        ("nomic_bert", "encoder.layers.0.attn.Wqkv.weight"),  # Chunk into q/k/v
        ("molmo2_text", "layers.0.self_attn.att_proj.weight"),  # Split by the model's q/k/v sizes (GQA)
    ],
)
def test_fused_tensors_split_on_load_are_split(tmp_path: Path, model_type: str, fused: str) -> None:
    """NomicBERT's ``attn.Wqkv`` and Molmo2's ``att_proj`` are written fused and split by transformers'
    WeightConverter (Chunk / Split) into ``q_proj`` / ``k_proj`` / ``v_proj`` on load; they stay 16-bit.
    Our loader left them unused and the three projections randomly initialised (outputs unlike
    transformers'); it now splits them: every parameter and the hidden states equal transformers'."""
    from transformers import AutoConfig, AutoModel

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, head_dim=16, max_position_embeddings=64,
        **({"num_key_value_heads": 2} if model_type == "molmo2_text" else {}),
    )  # fmt: skip
    AutoModel.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    folder = tmp_path / "q"
    convert(tmp_path / "plain", folder, progress=False)
    report = json.loads((folder / "quantization_report.json").read_text())
    assert {t["name"]: t["action"] for t in report["tensors"]}[fused] == "keep"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unused" tensors, no newly initialised parameters
        ours = load_quantized(folder, model_class=AutoModel, verify=False)
    theirs = bnb_generic_cpu_path(AutoModel.from_pretrained(folder, device_map="cpu").eval())
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        if p.dtype.is_floating_point:
            assert torch.equal(mine[name], p), name
    for layer in ours.modules():
        if hasattr(layer, "use_gemv"):
            layer.use_gemv = False
    with torch.no_grad():
        assert torch.equal(ours(IDS[:, :5]).last_hidden_state, theirs(IDS[:, :5]).last_hidden_state)


def _assert_loaders_agree(folder: Path, inputs: dict[str, torch.Tensor] | None = None) -> None:
    """Our loader and transformers + bitsandbytes (config.json's architecture when ``inputs`` are given,
    float32 then) run ``folder`` on ``inputs`` (default: token ids) and give the same logits: dequantize +
    F.linear on both sides (int8: ``exact`` runs bitsandbytes' own matmul)."""
    ours = load_quantized(folder, dtype=torch.float32)
    if inputs is None:
        theirs = bnb_load(folder).eval()
    else:
        arch = json.loads((folder / "config.json").read_text())["architectures"][0]
        theirs = bnb_load(folder, getattr(transformers, arch), dtype=torch.float32).eval()
    bnb_generic_cpu_path(theirs)
    for layer in ours.modules():
        if hasattr(layer, "use_gemv"):
            layer.use_gemv = False
        if hasattr(layer, "exact"):
            layer.exact = True
    inputs = {"input_ids": IDS[:, :5]} if inputs is None else inputs
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)


def test_quantization_config_is_the_object_transformers_gives(our_folder: Path, int8_folder: Path) -> None:
    """``model.config.quantization_config`` as transformers + bitsandbytes leave it on the same folder: a
    ``BitsAndBytesConfig`` (code reads ``.load_in_4bit``, ``.bnb_4bit_quant_type``) with the same values;
    ``save_pretrained`` writes it back as the dict a folder holds."""
    for folder in (our_folder, int8_folder):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = load_quantized(folder).config
        theirs = bnb_load(folder).config.quantization_config
        assert type(ours.quantization_config) is type(theirs)
        assert ours.quantization_config.to_dict() == theirs.to_dict()
        saved = ours.to_dict()["quantization_config"]
        stored = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert {k: saved.get(k) for k in stored} == stored
        assert saved["load_in_4bit"] is (folder == our_folder)


@pytest.mark.parametrize("kwargs", [{"gguf_file": "model.gguf"}, {"gguf_file": "x.gguf", "num_labels": 3}])
def test_gguf_file_is_an_unexpected_argument_naming_what_to_do(our_folder: Path, kwargs: dict) -> None:
    """``gguf_file=`` (a from_pretrained option) went to AutoConfig, which looked for the GGUF on the Hub
    and failed with an OSError naming a bogus ``huggingface.co//tmp/...`` URL. Now it is refused before
    anything is read, as the other loading options load_quantized does not take, naming it and what to do."""
    with pytest.raises(UnexpectedArgumentError, match=r"gguf_file='[^']+\.gguf'.*convert the GGUF") as info:
        load_quantized(our_folder, verify=False, **kwargs)
    assert "huggingface.co" not in str(info.value)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_memory": {"cpu": "1GiB"}},
        {"offload_folder": "off"},
        {"max_memory": {"cpu": 10**9}, "offload_folder": "o"},
    ],
)
def test_max_memory_or_offload_folder_without_device_map_warns(
    our_folder: Path, tmp_path: Path, kwargs: dict
) -> None:
    """``max_memory=`` / ``offload_folder=`` without ``device_map`` do nothing (transformers ignores them
    too, silently): a warning names them and that they need device_map, and the load goes on."""
    kwargs = {k: (tmp_path / v if k == "offload_folder" else v) for k, v in kwargs.items()}
    with pytest.warns(UserWarning, match=r"need(s)? device_map") as record:
        model = load_quantized(our_folder, verify=False, **kwargs)
    text = " ".join(str(w.message) for w in record)
    assert all(k in text for k in kwargs)
    assert getattr(model, "hf_device_map", None) is None  # loaded as without them, on the CPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_quantized(our_folder, verify=False)  # no warning without them
