"""PEFT LoRA on top of our 4-bit layers: plain get_peft_model, training lowers the loss, merge works."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from loader_helpers import bnb_load, hiding, train_steps

from converter.loader.model import linear4bit_modules, load_quantized
from converter.loader.module import Linear4bit

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_lora_trains_and_merges(bnb_nf4: Path) -> None:
    from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit

    model = load_quantized(bnb_nf4)
    original = {n: layer.dequantize().clone() for n, layer in linear4bit_modules(model).items()}
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False
    )
    model = peft.get_peft_model(model, config)  # no monkeypatching, no custom-module registration
    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, PeftLoraLinear4bit)  # PEFT's own 4-bit LoRA layer around ours
    assert isinstance(wrapped.base_layer, Linear4bit)
    frozen = {n: layer.weight.data.clone() for n, layer in linear4bit_modules(model).items()}

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = train_steps(model, trainable, ids)
    assert losses[-1] < losses[0] - 0.05
    # The 4-bit weights never changed: gradients went to the input and the adapters only.
    assert all(torch.equal(frozen[n], layer.weight.data) for n, layer in linear4bit_modules(model).items())

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, PeftLoraLinear4bit):
            delta = module.get_delta_weight("default").detach().clone()
            deltas[name.removeprefix("base_model.model.")] = delta
    assert len(deltas) == 2 * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    for name, delta in deltas.items():
        layer = merged.get_submodule(name)
        assert isinstance(layer, Linear4bit)
        # PEFT decoded our weight with bnb.functional.dequantize_4bit, added the delta and let bnb
        # quantize the sum again: the bytes are those of quantizing (our exact decode + delta).
        expected, _ = bnb.functional.quantize_4bit(
            (original[name] + delta).contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        assert torch.equal(layer.weight.data.view(torch.uint8), expected.view(torch.uint8)), name
    with torch.no_grad():
        assert torch.isfinite(merged(ids).logits).all()  # our forward runs on the re-quantized weight


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_parameter_counts_under_peft_as_documented(bnb_nf4: Path) -> None:
    """docs/python-api.md "LoRA with PEFT": PEFT's trainable count equals transformers + bnb's; its
    "all params" misses our quantized weights (buffers, not parameters), and the base model's
    ``num_parameters()`` gives bnb's total."""
    config = peft.LoraConfig(r=4, target_modules=TARGETS)
    ours = peft.get_peft_model(load_quantized(bnb_nf4), config)
    theirs = peft.get_peft_model(bnb_load(bnb_nf4), config)
    trainable, total = theirs.get_nb_trainable_parameters()
    our_trainable, our_total = ours.get_nb_trainable_parameters()
    assert our_trainable == trainable
    quantized = sum(m.in_features * m.out_features for m in linear4bit_modules(ours).values())
    assert our_total == total - quantized  # the documented shortfall, exactly the 4-bit weights
    assert ours.base_model.model.num_parameters() == total


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("folder", ["bnb_nf4", "int8_folder"])
def test_num_parameters_after_merge_and_unload_is_bitsandbytes(
    folder: str, request: pytest.FixtureRequest
) -> None:
    """PEFT's merge sets each merged layer's weight to a new Params4bit / Int8Params, a parameter: our
    ``num_parameters()`` counted it twice (as a parameter and by the layer's [out, in]); transformers +
    bitsandbytes' count of the merged model is the one of the unmerged model."""
    path = request.getfixturevalue(folder)
    config = peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    ours = peft.get_peft_model(load_quantized(path), config).merge_and_unload()
    theirs = peft.get_peft_model(bnb_load(path), config).merge_and_unload()
    assert ours.num_parameters() == theirs.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == theirs.num_parameters(exclude_embeddings=True)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_custom_module_registration_trains_and_merges(our_folder: Path) -> None:
    # The path for installs without bitsandbytes: PEFT's custom-module API with our LoRA layer.
    from converter.kernels import bnb4bit as kernels
    from converter.loader.lora import lora_layer_class, register_lora
    from formats.quant_types import QuantType

    model = load_quantized(our_folder)
    original = {n: layer.dequantize(torch.float32).clone() for n, layer in linear4bit_modules(model).items()}
    config = register_lora(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    )
    model = peft.get_peft_model(model, config)
    wrapped = model.base_model.model.model.layers[1].mlp.down_proj
    assert type(wrapped) is lora_layer_class()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = train_steps(model, [p for p in model.parameters() if p.requires_grad], ids)
    assert losses[-1] < losses[0] - 0.05
    delta = wrapped.get_delta_weight("default").detach().float()
    merged = model.merge_and_unload()
    layer = merged.model.layers[1].mlp.down_proj
    assert isinstance(layer, Linear4bit)
    name = "model.layers.1.mlp.down_proj"
    packed, _ = kernels.quantize_4bit(
        (original[name] + delta).to(torch.bfloat16), blocksize=64, quant_type=QuantType.NF4
    )
    assert torch.equal(layer.weight.data.reshape(-1), packed)
    assert layer.weight.quant_state.nested


HIDE_BNB = hiding("bitsandbytes")


def test_everything_works_without_bitsandbytes(our_folder: Path) -> None:
    script = (
        HIDE_BNB
        + f"""
import subprocess
import sys
import warnings
warnings.simplefilter("ignore")
import torch, peft
from converter.loader.module import HAS_BITSANDBYTES, Linear4bit, QuantLinear4bit
from converter.loader.model import load_quantized
from converter.loader.lora import register_lora
assert not HAS_BITSANDBYTES and Linear4bit is QuantLinear4bit
model = load_quantized({str(our_folder)!r})
ids = torch.tensor([[1, 2, 3, 4]])
model = peft.get_peft_model(model, register_lora(peft.LoraConfig(r=2, target_modules=["q_proj"])))
loss = model(ids, labels=ids).loss
loss.backward()
merged = model.merge_and_unload()
print(type(merged.model.layers[0].self_attn.q_proj).__name__, sorted(merged.state_dict())[:3], "ok")
"""
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
    assert out.stdout.startswith("QuantLinear4bit")


HIDE_PEFT = hiding("peft")


def test_bitsandbytes_is_not_imported_where_peft_cannot_use_it(our_folder: Path, tmp_path: Path) -> None:
    """bitsandbytes installed, PEFT not: loading and generating never import bitsandbytes (more than a
    second of a loading process: it imports torch._dynamo); the layers are our own classes and give the
    same logits as the bnb-based ones of this process."""
    logits_file = tmp_path / "logits.pt"
    script = (
        HIDE_PEFT
        + f"""
import sys
import warnings
warnings.simplefilter("ignore")
import torch
from converter.loader.module import HAS_BITSANDBYTES, Linear4bit, QuantLinear4bit
from converter.loader.model import load_quantized
assert "bitsandbytes" not in sys.modules, "imported by the loader"
assert not HAS_BITSANDBYTES and Linear4bit is QuantLinear4bit
model = load_quantized({str(our_folder)!r})
ids = torch.tensor([[1, 2, 3, 4]])
with torch.no_grad():
    torch.save(model(ids).logits, {str(logits_file)!r})
    model.generate(ids, max_new_tokens=2, do_sample=False)
assert "bitsandbytes" not in sys.modules, "imported while loading or generating"
print("ok")
"""
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
    model = load_quantized(our_folder)  # this process has PEFT: bnb-based layers
    assert isinstance(linear4bit_modules(model)["model.layers.0.self_attn.q_proj"], bnb.nn.Linear4bit)
    with torch.no_grad():
        want = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.equal(torch.load(logits_file), want)


def test_peft_imported_after_loading_turns_our_layers_into_bnb_ones(
    our_folder: Path, plain_llama: Path, tmp_path: Path
) -> None:
    """bitsandbytes and PEFT installed, neither imported: loading imports neither (bitsandbytes costs a
    loading process more than a second). Importing PEFT afterwards (which imports bitsandbytes) makes the
    loaded 4-bit and int8 layers bitsandbytes' classes in place (same objects, same tensors, same
    logits), and plain ``get_peft_model`` wraps them with PEFT's own bnb LoRA layers."""
    from converter.writer.pipeline import convert

    int8_folder = tmp_path / "int8"
    convert(plain_llama, int8_folder, quant_type="int8", progress=False)
    script = f"""
import copy, io, pickle, sys, warnings
warnings.simplefilter("ignore")
import torch
from converter.loader import module, module_int8
from converter.loader.model import load_quantized
m4 = load_quantized({str(our_folder)!r})
m8 = load_quantized({str(int8_folder)!r})
assert "bitsandbytes" not in sys.modules and "peft" not in sys.modules, "imported by the loader"
assert not module.HAS_BITSANDBYTES and module.Linear4bit is module.QuantLinear4bit
assert module_int8.Linear8bit is module_int8.QuantLinear8bit
ids = torch.tensor([[1, 2, 3, 4]])
with torch.no_grad():
    before4, before8 = m4(ids).logits, m8(ids).logits
q4, q8 = m4.model.layers[0].self_attn.q_proj, m8.model.layers[0].self_attn.q_proj
w4, w8, state4 = q4.weight, q8.weight, q4.weight.quant_state
twin = copy.deepcopy(q4)  # a copy made before the import is upgraded too
buffer = io.BytesIO()
torch.save(m4, buffer)  # a whole model pickled before the import, loaded back: its layers too
buffer.seek(0)
m4_loaded = torch.load(buffer, weights_only=False)
assert type(m4_loaded.model.layers[0].self_attn.q_proj.weight) is module.Packed4bit

import peft
import bitsandbytes as bnb
from peft.tuners.lora.bnb import Linear4bit as PeftLora4bit, Linear8bitLt as PeftLora8bit

assert module.HAS_BITSANDBYTES and type(q4) is module.Linear4bit and type(q8) is module_int8.Linear8bit
assert isinstance(q4, bnb.nn.Linear4bit) and isinstance(twin, bnb.nn.Linear4bit)
assert q4.weight is w4 and isinstance(w4, bnb.nn.Params4bit) and w4.bnb_quantized
assert w4.quant_state is state4 and isinstance(state4, bnb.functional.QuantState)
assert state4.nested and isinstance(state4.state2, bnb.functional.QuantState)
assert (w4.blocksize, w4.quant_type, w4.compress_statistics) == (64, "nf4", True)
assert isinstance(q8, bnb.nn.Linear8bitLt) and q8.weight is w8 and isinstance(w8, bnb.nn.Int8Params)
assert isinstance(q8.state, bnb.MatmulLtState) and q8.state.CB is w8.CB and q8.state.threshold == 6.0
assert type(pickle.loads(pickle.dumps(q4))) is module.Linear4bit
assert isinstance(m4_loaded.model.layers[0].self_attn.q_proj.weight, bnb.nn.Params4bit)
with torch.no_grad():
    assert torch.equal(m4(ids).logits, before4) and torch.equal(m8(ids).logits, before8)
    assert torch.equal(m4_loaded(ids).logits, before4)
for model, lora_type, want in ((m4, PeftLora4bit, before4), (m8, PeftLora8bit, before8)):
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    wrapped = peft.get_peft_model(model, config)
    assert isinstance(wrapped.base_model.model.model.layers[0].self_attn.q_proj, lora_type)
    with torch.no_grad():  # LoRA's B starts at zero: the same logits
        assert torch.equal(wrapped(ids).logits, want)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


class _TwoLayers(torch.nn.Module):
    """Two 4-bit layers with biases (float32 compute), for register_lora's LoRA layer."""

    def __init__(self) -> None:
        from loader_helpers import make_layer

        super().__init__()
        self.proj = make_layer(64, 64, bias=True, dtype=torch.float32)[0]
        self.head = make_layer(64, 64, bias=True, seed=1, dtype=torch.float32)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(x)))


def _registered(model: torch.nn.Module, **kw) -> torch.nn.Module:
    from converter.loader.lora import register_lora

    config = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["proj"], init_lora_weights=False, **kw)
    return peft.get_peft_model(model, register_lora(config))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_custom_lora_bias_is_merged_into_the_layer_bias() -> None:
    # merge() requantized the weight and dropped lora_B's bias: the merged model's outputs moved by it
    torch.manual_seed(0)
    model = _registered(_TwoLayers(), lora_bias=True)
    wrapped = model.base_model.model.proj
    with torch.no_grad():
        wrapped.lora_B["default"].bias.fill_(0.25)
    x = torch.randn(3, 64)
    bias, scaling = wrapped.base_layer.bias.detach().clone(), wrapped.scaling["default"]
    with torch.no_grad():
        want = model(x)
        model.merge_adapter()
        assert torch.equal(wrapped.base_layer.bias, bias + 0.25 * scaling)
        merged = model(x)
        model.unmerge_adapter()
        torch.testing.assert_close(wrapped.base_layer.bias, bias)
    # only the weight's re-quantization differs (the bias alone moves outputs by 0.25 * 4 = 1 and more)
    assert (merged - want).abs().max() < 0.3


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_custom_lora_bias_on_a_layer_without_bias_refuses_to_merge(our_folder: Path) -> None:
    from converter.loader.lora import register_lora

    config = register_lora(peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    model = peft.get_peft_model(load_quantized(our_folder), config)
    with pytest.raises(RuntimeError, match=r"lora_bias=True.*has no bias"):
        model.merge_adapter()


def test_custom_lora_mixed_adapter_batch() -> None:
    # adapter_names= reached QuantLinear4bit.forward: TypeError
    torch.manual_seed(0)
    model = _registered(_TwoLayers())
    from converter.loader.lora import register_lora

    other = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
    model.add_adapter("other", register_lora(other))
    model.eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", "other", "__base__"])
        model.set_adapter("default")
        a = model(x)
        model.set_adapter("other")
        b = model(x)
        with model.disable_adapter():
            base = model(x)
    torch.testing.assert_close(mixed, torch.stack([a[0], b[1], base[2]]), rtol=0, atol=1e-6)
    assert not torch.equal(a[0], base[0])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("option", "value"), [("use_dora", True), ("alora_invocation_tokens", [1, 2])], ids=["dora", "alora"]
)
def test_custom_lora_refuses_variants_by_name(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"LoraConfig\({option}=.*not supported.*plain LoRA"):
        _registered(_TwoLayers(), **{option: value})


HIDE_BNB_SCRIPT_ALL_LINEAR = """
import warnings
warnings.simplefilter("ignore")
import peft
from converter.loader.lora import register_lora
from converter.loader.model import load_quantized
model = load_quantized({folder!r})
try:
    register_lora(peft.LoraConfig(r=2, target_modules="all-linear"))
except ValueError as exc:
    print("refused" if "register_lora(config, model)" in str(exc) else exc)
config = register_lora(peft.LoraConfig(r=2, target_modules="all-linear"), model)
model = peft.get_peft_model(model, config)
print(sorted({{n.rpartition(".")[2] for n, m in model.named_modules() if hasattr(m, "lora_A")}}))
"""


def test_all_linear_without_bitsandbytes(our_folder: Path) -> None:
    # PEFT's "all-linear" only picks nn.Linear / Conv1D: NoMatchingPeftModuleError without bitsandbytes
    script = HIDE_BNB + HIDE_BNB_SCRIPT_ALL_LINEAR.format(folder=str(our_folder))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "refused"
    # every 4-bit projection, and not lm_head (the output head, a plain nn.Linear PEFT leaves out)
    assert lines[1] == str(
        sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_all_linear_with_the_model_matches_peft_with_bitsandbytes(our_folder: Path) -> None:
    from converter.loader.lora import register_lora

    ours = register_lora(peft.LoraConfig(r=2, target_modules="all-linear"), load_quantized(our_folder))
    theirs = peft.get_peft_model(
        load_quantized(our_folder), peft.LoraConfig(r=2, target_modules="all-linear")
    )
    assert set(ours.target_modules) == set(theirs.peft_config["default"].target_modules)


def _trainer(model: torch.nn.Module, out: Path):
    from transformers import Trainer, TrainingArguments

    ids = torch.tensor([1, 5, 9, 30, 7, 100, 3, 8])
    args = TrainingArguments(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        learning_rate=1e-2, logging_steps=1, save_strategy="no",
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=[{"input_ids": ids, "labels": ids}] * 4)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("folder", ["bnb_nf4", "int8_folder"])
def test_trainer_refuses_a_model_without_adapters_as_for_bitsandbytes(
    folder: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """transformers' Trainer on a loaded model with no adapters started training and failed in the first
    backward ("element 0 of tensors does not require grad"); transformers + bitsandbytes' model is refused
    at construction through its hf_quantizer / is_quantized: ours now is too, with the same message."""
    path = request.getfixturevalue(folder)
    messages = []
    for model in (bnb_load(path), load_quantized(path)):
        with pytest.raises(ValueError, match=r"purely quantized models\. Please attach trainable") as err:
            _trainer(model, tmp_path)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    ours = load_quantized(path)
    assert ours.is_quantized
    assert ours.hf_quantizer.is_trainable
    assert not hasattr(ours, "quantization_method")  # .to(dtype) and Trainer's device move as before


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("prepare", [False, True], ids=["get_peft_model", "prepare_model_for_kbit_training"])
def test_trainer_trains_lora_on_a_loaded_model(prepare: bool, bnb_nf4: Path, tmp_path: Path) -> None:
    """With LoRA attached (plain get_peft_model, or after prepare_model_for_kbit_training) the Trainer
    takes the model and trains the adapters: the loss is logged and lora_B moves from zero."""
    model = load_quantized(bnb_nf4)
    if prepare:
        model = peft.prepare_model_for_kbit_training(model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=TARGETS))
    trainer = _trainer(model, tmp_path)
    trainer.train()
    assert [e["loss"] for e in trainer.state.log_history if "loss" in e]
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b
    assert any(p.abs().sum() > 0 for p in lora_b)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_quantizer_attributes_keep_casts_copies_and_save(bnb_nf4: Path, tmp_path: Path) -> None:
    """The quantizer attributes change nothing else: .half() / .float() cast as documented (transformers
    refuses them on a quantized model), copies keep their own, save_pretrained writes the same state
    dict, and dequantize() removes them (Trainer then takes the model)."""
    import copy
    import pickle

    from safetensors.torch import load_file

    model = load_quantized(bnb_nf4)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.half.model is twin
        assert twin.hf_quantizer is not model.hf_quantizer
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert sorted(saved) == sorted(state)
    assert all(torch.equal(saved[k], v) for k, v in state.items())
    assert model.half() is model
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert model.float() is model
    assert model.lm_head.weight.dtype == torch.float32
    model.dequantize()
    assert not hasattr(model, "hf_quantizer") or model.hf_quantizer is None
    assert not getattr(model, "is_quantized", False)
    _trainer(model, tmp_path)  # not refused


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_replace_linear_layers_gives_the_quantizer_attributes_too(bnb_nf4: Path, tmp_path: Path) -> None:
    """A transformers model swapped by replace_linear_layers got no hf_quantizer: Trainer took it without
    adapters and training failed in the first backward. Now it is refused as load_quantized's model is;
    a transformers model inside a plain wrapper gets them (the outermost transformers model only), and
    dequantize() removes them again."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from converter.loader.replace import replace_linear_layers

    config = AutoConfig.from_pretrained(bnb_nf4)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    replace_linear_layers(model, bnb_nf4)
    assert model.is_quantized
    assert model.hf_quantizer.is_trainable
    assert getattr(model.model, "hf_quantizer", None) is None  # the inner LlamaModel: not twice
    with pytest.raises(ValueError, match=r"purely quantized models\. Please attach trainable"):
        _trainer(model, tmp_path)
    model.dequantize()
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    _trainer(model, tmp_path)  # not refused

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

    from converter.loader.state import load_quantized_state

    wrapper = Wrapper(AutoModelForCausalLM.from_config(config))
    replace_linear_layers(wrapper, {f"inner.{k}": v for k, v in load_quantized_state(bnb_nf4).items()})
    assert wrapper.inner.is_quantized
    assert not hasattr(wrapper, "hf_quantizer")
    from converter.loader.dequantize_inplace import dequantize_model

    dequantize_model(wrapper)
    assert getattr(wrapper.inner, "hf_quantizer", None) is None
    assert not getattr(wrapper.inner, "is_quantized", False)
