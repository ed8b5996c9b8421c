"""``model.dequantize()`` on a model from load_quantized (converter/loader/dequantize_inplace.py): torch's
own modules with the weights the kernels decode, so the logits are those of the folder's dequantized
checkpoint loaded by plain transformers; a plain ``save_pretrained``; clear refusals."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import load_logged

from converter.loader.dequantize import dequantize_checkpoint
from converter.loader.dequantize_inplace import DequantizeError, dequantize_model
from converter.loader.model import load_quantized
from converter.loader.module import QuantLinear4bit
from converter.loader.module_int8 import QuantLinear8bit

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 11, 90, 3, 45]])
QUANTIZED = (QuantLinear4bit, QuantLinear8bit)


def _plain(folder: Path) -> torch.nn.Module:
    return load_logged(folder, dtype=torch.bfloat16)[0]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dequantize_gives_the_dequantized_checkpoints_model(kind, our_folder, int8_folder, tmp_path):
    """Every quantized linear becomes an nn.Linear; the logits equal, bit for bit, plain transformers'
    on the ``quantize-model dequantize`` output of the same folder (the same bf16 weights and ops)."""
    folder = our_folder if kind == "nf4" else int8_folder
    model = load_quantized(folder)
    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED)]
    assert names
    assert model.dequantize() is model
    assert not any(isinstance(m, QUANTIZED) for m in model.modules())
    for name in names:
        layer = model.get_submodule(name)
        assert type(layer) is torch.nn.Linear
        assert layer.weight.dtype == torch.bfloat16
        assert not layer.weight.requires_grad
    assert not hasattr(model.config, "quantization_config")
    assert not getattr(model, "is_loaded_in_4bit", False)
    assert not getattr(model, "is_loaded_in_8bit", False)
    dequantize_checkpoint(folder, tmp_path / "plain", dtype="bf16")
    assert torch.equal(_logits(model), _logits(_plain(tmp_path / "plain")))
    # save_pretrained writes a plain checkpoint that transformers loads without bitsandbytes
    model.save_pretrained(tmp_path / "saved")
    saved = _plain(tmp_path / "saved")
    assert not hasattr(saved.config, "quantization_config")
    assert torch.equal(_logits(saved), _logits(model))


def test_dtype_argument_and_copies(our_folder):
    """``dtype`` sets the weights' dtype; a deep copy's dequantize acts on the copy only."""
    model = load_quantized(our_folder)
    twin = copy.deepcopy(model)
    twin.dequantize(torch.float32)
    assert any(isinstance(m, QuantLinear4bit) for m in model.modules())  # the original untouched
    linears = [m for m in twin.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32]
    assert linears
    assert not any(isinstance(m, QuantLinear4bit) for m in twin.modules())
    # the float32 weights rounded to bf16 are the bf16 ones (the decode is exact in float32)
    model.dequantize()
    bf16 = {n: m.weight for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    for n, m in twin.named_modules():
        if n in bf16 and m.weight.dtype == torch.float32:
            assert torch.equal(m.weight.to(torch.bfloat16), bf16[n])


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("cast", ["half", "float", "to"])
def test_dequantize_after_a_cast_follows_the_models_dtype(kind, cast, our_folder, int8_folder):
    """A loaded model cast with ``.half()`` / ``.float()`` / ``.to(dtype)`` (allowed, unlike on a
    transformers + bitsandbytes model) keeps its ``config.dtype``; ``dequantize()`` without a dtype gives
    its linears the dtype the model's other parameters now hold, so the model still runs (they were made
    in the load's bf16 beside float16 / float32 norms and embeddings: 'expected m1 and m2 to have the same
    dtype'), with the weights the 4-bit kernels decode."""
    folder = our_folder if kind == "nf4" else int8_folder
    want = torch.float32 if cast == "float" else torch.float16
    model = load_quantized(folder)
    model = model.half() if cast == "half" else model.float() if cast == "float" else model.to(want)
    reference = load_quantized(folder).dequantize(want)  # the weights, decoded straight into want
    model.dequantize()
    head = model.get_output_embeddings()  # never quantized: cast with the model, not decoded
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head}
    assert linears
    assert {m.weight.dtype for m in linears.values()} == {want}
    for name, layer in linears.items():
        assert torch.equal(layer.weight, reference.get_submodule(name).weight)
    assert _logits(model).dtype == want  # it runs


def test_peft_wrapped_layers_are_refused_before_any_swap(our_folder):
    peft = pytest.importorskip("peft")
    model = load_quantized(our_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    before = sum(isinstance(m, QuantLinear4bit) for m in model.modules())
    with pytest.raises(DequantizeError, match="merge_and_unload"):
        wrapped.base_model.model.dequantize()
    assert sum(isinstance(m, QuantLinear4bit) for m in model.modules()) == before  # nothing swapped


def test_disk_offloaded_layers_are_refused_before_any_swap(our_folder):
    """Our disk modules hold views of the mapped shards (not meta tensors, as accelerate's offload
    leaves them): dequantize() swapped them for RAM copies past max_memory, while the docs promise a
    refusal for offloaded modules."""
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = load_quantized(our_folder, device_map=device_map)
    before = sum(isinstance(m, QuantLinear4bit) for m in model.modules())
    with pytest.raises(DequantizeError, match=r"'model\.layers\.1\..*offloaded"):
        model.dequantize()
    assert sum(isinstance(m, QuantLinear4bit) for m in model.modules()) == before  # nothing swapped


def test_dequantized_modules_keep_the_models_eval_mode(our_folder):
    """The swapped-in nn.Linear modules were in training mode inside an eval model (model.training
    False, its new linears True): a later model.train()/eval() mismatch a user would not expect."""
    model = load_quantized(our_folder).eval()
    model.dequantize()
    assert not any(m.training for m in model.modules())


def test_a_model_without_quantized_modules_warns(plain_llama):
    model = _plain(plain_llama)
    with pytest.warns(UserWarning, match="no quantized modules"):
        assert dequantize_model(model) is model


def test_the_documented_name_is_the_function() -> None:
    """docs/python-api.md names ``converter.loader.dequantize_model(model, dtype=None)``: it was the
    submodule of that name once anything had imported it (load_quantized does), not the function."""
    import converter.loader

    for name in converter.loader.__all__:
        assert callable(getattr(converter.loader, name)), name
    assert converter.loader.dequantize_model is dequantize_model


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_gpt2_conv1d_layers_dequantize_to_conv1d(kind, tmp_path):
    """GPT-2's Conv1D layers (quantized as [out, in]) become Conv1D again with the [in, out] weight, as
    plain transformers loads the ``quantize-model dequantize`` output: same logits, and a
    ``save_pretrained`` that transformers loads. They became nn.Linear [out, in], so the saved checkpoint
    held [out, in] weights under Conv1D names and ``from_pretrained`` refused it (size mismatch)."""
    from tiny_models import make_tiny
    from transformers.pytorch_utils import Conv1D

    from converter.writer.pipeline import convert

    src = make_tiny("gpt2", tmp_path / "src")
    convert(src, tmp_path / "q", quant_type=kind, progress=False)
    model = load_quantized(tmp_path / "q", dtype=torch.float32)
    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED)]
    assert len(names) == 8
    model.dequantize()
    for name in names:
        layer = model.get_submodule(name)
        assert type(layer) is Conv1D
        assert layer.weight.shape == (layer.nx, layer.nf)
    dequantize_checkpoint(tmp_path / "q", tmp_path / "plain", dtype="fp32")
    plain = load_logged(tmp_path / "plain", dtype=torch.float32)[0]
    assert torch.equal(_logits(model), _logits(plain))
    model.save_pretrained(tmp_path / "saved")
    saved, info, _ = load_logged(tmp_path / "saved", dtype=torch.float32)
    assert not info["mismatched_keys"]
    assert torch.equal(_logits(saved), _logits(model))


@pytest.mark.parametrize("tokens", [1, 5])
def test_dequantize_gives_the_plain_models_logits_on_short_inputs(tokens, our_folder, tmp_path):
    """A loaded model's bf16 CPU head runs our GEMV kernel on 1..8 tokens (converter/loader/head.py):
    after ``dequantize()`` it stayed, and the logits of a short prompt or a decode step differed from
    plain transformers' on the dequantized checkpoint (the test above takes 12 tokens: F.linear). The
    head is a plain nn.Linear again."""
    model = load_quantized(our_folder)
    assert type(model.get_output_embeddings()) is not torch.nn.Linear  # the GEMV head, while quantized
    model.dequantize()
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    dequantize_checkpoint(our_folder, tmp_path / "plain", dtype="bf16")
    ids = IDS[:, :tokens]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _plain(tmp_path / "plain")(ids).logits)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dequantized_falcon_mamba_runs_the_plain_models_forward(kind: str, tmp_path: Path) -> None:
    """FalconMamba branches on ``config._is_quantized`` (set by the load, as transformers sets it):
    quantized, it calls ``dt_proj`` and subtracts the bias again, plain it multiplies by the weight. After
    ``dequantize()`` the model is plain, so the flag goes with ``quantization_config`` and the logits are,
    bit for bit, those of the dequantized checkpoint loaded by plain transformers (in bf16 the two
    branches round differently)."""
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    from converter.writer.pipeline import convert

    torch.manual_seed(0)
    config = FalconMambaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2)
    FalconMambaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "q", quant_type=kind, progress=False)
    model = load_quantized(tmp_path / "q").dequantize()
    dequantize_checkpoint(tmp_path / "q", tmp_path / "plain", dtype="bf16")
    ids = IDS % 128
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _plain(tmp_path / "plain")(ids).logits)
