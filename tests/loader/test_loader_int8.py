"""LLM.int8 in the loader: Linear8bit against bitsandbytes' Linear8bitLt, paths, state dict, LoRA, tools.

The exact path must equal bnb's CPU forward bit for bit (same stored bytes, same math); the default
dequantize + F.linear path must equal F.linear on the dequantized weight; the fused GEMV must stay
within float32 accumulation error of it.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers
from loader_helpers import train_steps

from converter.kernels import int8 as kernels_int8
from converter.loader import int8_ops
from converter.loader.dequantize import dequantize_checkpoint
from converter.loader.model import load_quantized
from converter.loader.module_int8 import Linear8bit, QuantLinear8bit
from converter.loader.replace import replace_linear_layers
from converter.loader.state import load_quantized_state
from formats.int8 import Int8Tensor, dequantize_int8

peft = pytest.importorskip("peft")


def _transformers_model(folder: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM.from_pretrained(folder, device_map="cpu").eval()


def _int8_layers(model: torch.nn.Module) -> dict[str, QuantLinear8bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear8bit)}


def _layer(out_f: int = 48, in_f: int = 80, *, bias: bool = True, seed: int = 0, threshold: float = 6.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    codes, scb = kernels_int8.quantize_int8(w.to(torch.bfloat16))
    b = (torch.randn(out_f, generator=g) * 0.1).to(torch.bfloat16) if bias else None
    ours = Linear8bit(codes, scb, b, threshold=threshold)
    ref = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False, threshold=threshold)
    ref.weight = bnb.nn.Int8Params(
        codes.clone(), requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb
    )
    ref.state.CB, ref.state.SCB = codes, scb
    if bias:
        ref.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
    return ours.eval(), ref.eval()


def test_load_quantized_builds_linear8bit_where_transformers_does(int8_folder: Path) -> None:
    model = load_quantized(int8_folder)
    ref = _transformers_model(int8_folder)
    want = {n for n, m in ref.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert set(_int8_layers(model)) == want
    assert model.is_loaded_in_8bit
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in _int8_layers(model).values())


@pytest.mark.parametrize("tokens", [1, 10])
def test_exact_path_equals_bitsandbytes_logits(int8_folder: Path, tokens: int) -> None:
    model = load_quantized(int8_folder)
    for layer in _int8_layers(model).values():
        layer.exact = True
    ref = _transformers_model(int8_folder)
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 1, 120, 33][:tokens]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_exact_layer_with_outliers_equals_linear8bitlt(dtype, rows, threshold) -> None:
    ours, ref = _layer(threshold=threshold)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 80, generator=g).to(dtype)
    x[..., 3] = 20.0  # an outlier column (|x| >= 6)
    x[0, 0, 7] = -9.0
    ours.exact = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 6])
def test_exact_layer_in_training_mode_equals_linear8bitlt(dtype, rows) -> None:
    """In training mode (model.train(), as a LoRA fine-tune runs) bitsandbytes' CPU backend computes an
    int8 layer as MatMul8bitFp: W = q.to(x's dtype) * (SCB * (1/127)), then F.linear, not its int8
    inference matmul. exact=True kept the inference math there: a PEFT fine-tune of a loaded int8 model
    had another loss and other gradients than the same fine-tune under transformers + bitsandbytes."""
    ours, ref = _layer()
    ours.exact = True
    ours.train()
    ref.train()
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 80, generator=g).to(dtype)
    x[..., 3] = 20.0  # an outlier column: the inference math would split it
    grad_y = torch.randn(2, rows, 48, generator=g).to(dtype)
    outs, grads = [], []
    for layer in (ours, ref):
        xi = x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = layer(xi)
            y.backward(grad_y)
            with torch.no_grad():
                assert torch.equal(layer(x), y)
        outs.append(y.detach())
        grads.append(xi.grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    ours.eval()
    with torch.no_grad():  # eval mode: the inference math again (bnb's MatMul8bitLt)
        assert torch.equal(ours(x), int8_ops_exact(ours, x))


def int8_ops_exact(layer: QuantLinear8bit, x: torch.Tensor) -> torch.Tensor:
    from converter.loader.module_int8 import exact_linear

    return exact_linear(x, layer.codes, layer.scb, layer.bias.to(x.dtype), layer.threshold)


def test_default_path_is_dequantize_then_linear_and_gemv_within_float32_error() -> None:
    ours, _ = _layer(in_f=515)
    x = torch.randn(3, 515, dtype=torch.bfloat16)
    w = ours.dequantize(torch.bfloat16)
    ours.use_gemv = False
    with torch.no_grad():
        assert torch.equal(ours(x), torch.nn.functional.linear(x, w, ours.bias))
        ours.use_gemv = True
        y = ours(x).double()
    # GEMV: float32 sums of K products (gamma_K |x| |W|, u = 2^-24) plus two bf16 roundings (the
    # product, then the bias add) of the result; F.linear in bf16 rounds once too.
    w64 = torch.from_numpy(dequantize_int8(ours.codes.numpy(), ours.scb.numpy())).double()
    exact = x.double() @ w64.T + ours.bias.double()
    u, k = 2.0**-24, 515
    bound = (k * u / (1 - k * u)) * (x.double().abs() @ w64.abs().T) + 2 * 2.0**-8 * exact.abs() + 1e-6
    assert bool(((y - exact).abs() <= bound).all())


def test_backward_reaches_the_input_only() -> None:
    ours, _ = _layer(bias=False)
    x = torch.randn(4, 80, requires_grad=True)
    ours(x).sum().backward()
    w = ours.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, torch.ones(4, 48) @ w, rtol=0, atol=0)
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("exact", [False, True])
def test_output_modified_in_place_under_autograd(exact: bool) -> None:
    """A caller's in-place add into the output while training (Llama 4's MoE does it to its shared
    expert's): the GEMV path's output was a view made inside the autograd Function, which autograd
    refuses to see modified in place. It takes the add now, with the gradient of the plain output."""
    ours, _ = _layer(bias=False)
    ours.exact = exact
    x = torch.randn(1, 4, 80, requires_grad=True)
    with torch.no_grad():
        want = ours(x) + 1.0
    y = ours(x)
    y.add_(1.0)
    assert torch.equal(y, want)
    y.sum().backward()
    # exact: bitsandbytes' backward decode of W (q * (SCB / 127)), else the loaders' dequantize
    w = (
        ours.codes.float() * (ours.scb.unsqueeze(1) * (1.0 / 127.0))
        if exact
        else ours.dequantize(torch.float32)
    )
    torch.testing.assert_close(x.grad[0], torch.ones(4, 48) @ w, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1.0, 10.0])  # without / with outlier columns (threshold 6)
def test_exact_path_gives_the_linear_gradients(scale: float) -> None:
    """exact=True keeps bnb's forward bits and gives grad_x = grad_y @ W, grad_b = sum(grad_y) (bnb's
    MatMul8bitLt.backward); it used to differentiate through the activations' absmax scale instead."""
    ours, _ = _layer()
    ours.exact = True
    ours.bias.requires_grad_(True)
    x = torch.randn(4, 80, generator=torch.Generator().manual_seed(1)) * scale
    with torch.no_grad():
        want = ours(x)
    x.requires_grad_(True)
    y = ours(x)
    assert torch.equal(y, want)
    grad_y = torch.randn(4, 48, generator=torch.Generator().manual_seed(2))
    y.backward(grad_y)
    w = ours.codes.float() * (ours.scb.unsqueeze(1) * (1.0 / 127.0))  # bnb's backward decode
    torch.testing.assert_close(x.grad, grad_y @ w, rtol=0, atol=0)
    torch.testing.assert_close(ours.bias.grad, grad_y.sum(0).to(ours.bias.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exact_path_input_gradient_equals_linear8bitlt(dtype) -> None:
    """exact=True in eval mode under autograd: grad_x has bitsandbytes' bits. MatMul8bitLt.backward
    decodes W as q.to(dtype) * (SCB * (1/127)); the exact path took int8_vectorwise_dequant's
    f32(q * SCB) * (1/127), a rounding apart (a PEFT fine-tune's gradients ~1e-5 off bnb's)."""
    ours, ref = _layer()
    ours.exact = True
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 80, generator=g).to(dtype)
    grad_y = torch.randn(2, 5, 48, generator=g).to(dtype)
    grads = []
    for layer in (ours, ref):
        xi = x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer(xi).backward(grad_y)
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])


def test_state_dict_is_bitsandbytes_layout_and_round_trips() -> None:
    ours, ref = _layer()
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd) == ["weight", "bias", "SCB", "weight_format"]
    for k in sd:
        assert sd[k].dtype == ref_sd[k].dtype, k
        assert torch.equal(sd[k], ref_sd[k]), k
    fresh, _ = _layer(seed=1)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.codes, ours.codes)
    assert torch.equal(fresh.scb, ours.scb)
    clone = copy.deepcopy(ours)
    assert torch.equal(clone.codes, ours.codes)


def test_load_state_dict_loads_the_bias_in_place_as_torch_does() -> None:
    """``load_state_dict`` put a new frozen Parameter in place of the bias (the state dict's tensor, on its
    device): a bias made trainable was frozen again and the optimizer holding the old one stopped
    training the layer's (on a GPU the bias stayed on the CPU: the next forward failed). It copies into
    the layer's bias, as torch loads parameters (and the 4-bit layer its bias); a bias of another shape
    is reported, not taken."""
    ours, _ = _layer()
    new, _ = _layer(seed=1)
    ours.bias.requires_grad_(True)
    bias = ours.bias
    opt = torch.optim.SGD([bias], lr=1.0)
    ours.load_state_dict(new.state_dict())
    assert ours.bias is bias
    assert bias.requires_grad
    assert torch.equal(bias, new.bias)
    ours(torch.randn(3, 80, dtype=torch.bfloat16)).float().sum().backward()
    before = ours.bias.detach().clone()
    opt.step()
    assert not torch.equal(ours.bias, before)  # the optimizer trains the layer's bias
    sd = new.state_dict()
    sd["bias"] = sd["bias"][:1]
    with pytest.raises(RuntimeError, match=r"bias: checkpoint shape \[1\] does not match the layer's \[48\]"):
        ours.load_state_dict(sd)


def test_load_state_dict_of_a_4bit_weight_or_another_shape_is_an_error_as_in_torch() -> None:
    """An int8 model's ``load_state_dict(sd, strict=False)`` with a 4-bit state dict (the same model
    converted to nf4: ``weight`` packed [N, 1] uint8 and its ``weight.absmax`` / ``weight.quant_state...``
    keys, no ``SCB``), or a ``weight`` of another shape, returned normally and kept the old weights: only
    the missing ``SCB`` was listed, the mismatch not at all (torch, and transformers + bitsandbytes, raise
    "size mismatch" under ``strict=False`` too). Now an error names the weight."""
    from loader_helpers import quantize_record

    ours, _ = _layer(bias=False)
    codes = ours.codes.clone()
    record = quantize_record(torch.randn(48, 80, dtype=torch.bfloat16), name="weight")
    four_bit = record.state_dict()
    assert "weight.absmax" in four_bit
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"weight: a 4-bit weight \(bitsandbytes' Linear4bit layout"):
            ours.load_state_dict(four_bit, strict=strict)
        with pytest.raises(
            RuntimeError, match=r"weight: checkpoint shape \[80, 48\] does not match the layer's"
        ):
            ours.load_state_dict({"weight": torch.zeros(80, 48, dtype=torch.int8)}, strict=strict)
    assert torch.equal(ours.codes, codes)
    # the codes alone, of the layer's shape, without SCB: reported missing as before, nothing taken
    result = ours.load_state_dict({"weight": torch.zeros(48, 80, dtype=torch.int8)}, strict=False)
    assert result.missing_keys == ["SCB"]
    assert torch.equal(ours.codes, codes)


def test_half_and_to_never_cast_codes_or_scb() -> None:
    ours, _ = _layer()
    ours.half()
    assert ours.codes.dtype == torch.int8
    assert ours.scb.dtype == torch.float32
    assert ours.bias.dtype == torch.float16
    assert ours.state.CB.data_ptr() == ours.codes.data_ptr()


def test_loaded_int8_layers_compute_in_the_input_dtype(int8_folder: Path) -> None:
    """LLM.int8 has no compute dtype: after ``.float()`` a model loaded in bf16 runs its int8 matmuls
    in float32 (W in x's dtype), not with the activations rounded to bf16."""
    model = load_quantized(int8_folder, dtype=torch.bfloat16).float()
    layer = next(iter(_int8_layers(model).values()))
    assert layer.compute_dtype is None
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = layer(x)
    ref = torch.nn.functional.linear(x, layer.dequantize(torch.float32), layer.bias)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 8, 9])
@pytest.mark.parametrize("use_gemv", [True, False])
def test_float64_input_computes_in_float64(tokens: int, use_gemv: bool) -> None:
    """float64 activations (e.g. ``model.double()``: int8 layers compute in the input's dtype) raised
    "x has dtype float64" from the GEMV kernel up to 8 tokens and "out_dtype torch.float64 is not
    supported" past 8. They now take the dequantize path: the float32 weight cast (exact), F.linear
    in float64."""
    ours, _ = _layer()
    ours.use_gemv = use_gemv
    w64 = ours.dequantize(torch.float32).double()
    assert torch.equal(ours.dequantize(torch.float64), w64)
    x = torch.randn(tokens, 80, dtype=torch.float64)
    with torch.no_grad():
        y = ours(x)
    assert y.dtype == torch.float64
    assert torch.equal(y, torch.nn.functional.linear(x, w64, ours.bias.double()))
    assert torch.autograd.gradcheck(ours, (x.requires_grad_(),))
    with pytest.raises(TypeError, match=r"float32, float16, bfloat16 or float64, not torch\.int32"):
        ours.dequantize(torch.int32)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.complex64])
def test_other_input_dtypes_are_a_type_error_on_every_path(exact: bool, dtype: torch.dtype) -> None:
    """docs/python-api.md: dtypes other than float32/float16/bfloat16/float64 are a TypeError. With
    ``exact = True`` an integer input ran bitsandbytes' math and returned an integer tensor (the
    products truncated), and a complex one failed inside torch."""
    ours, _ = _layer()
    ours.exact = exact
    x = torch.ones(3, 80, dtype=dtype)
    with torch.no_grad(), pytest.raises(TypeError, match=r"float32, float16, bfloat16 or float64, not"):
        ours(x)


@pytest.mark.parametrize("tokens", [1, 12])
def test_layer_from_a_strided_or_half_precision_scb_and_codes(tokens: int) -> None:
    """``Linear8bit(codes, scb)`` from tensors: codes that are a transposed view, or an SCB that is
    a strided view or float16 (bitsandbytes' SCB values are float16 numbers), ran past 8 tokens but
    raised from the GEMV kernel ("codes is not contiguous", "scb has dtype float16") for 1..8 tokens
    (fp16 SCB: always); so did such views given to ``load_state_dict``. The layer now stores them
    contiguous and the SCB as float32 (exact)."""
    ours, _ = _layer()
    codes, scb = ours.codes, ours.scb
    strided = torch.stack([scb, scb], dim=1)[:, 0]
    x = torch.randn(tokens, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(x)
        for c, s in [(codes.t().contiguous().t(), scb), (codes, strided), (codes, scb.half())]:
            layer = Linear8bit(c, s, ours.bias.data)
            assert layer.scb.dtype == torch.float32
            assert torch.equal(layer(x), expected)
            if s.dtype == torch.float32:  # load_state_dict takes the same views (it refuses F16 SCB)
                layer = Linear8bit(torch.zeros_like(codes), torch.ones_like(scb), ours.bias.data)
                layer.load_state_dict({"weight": c, "SCB": s, "bias": ours.bias.data})
                assert torch.equal(layer(x), expected)


def test_a_loaded_int8_model_runs_in_float64(int8_folder: Path) -> None:
    model = load_quantized(int8_folder).double()
    with torch.no_grad():
        for ids in (torch.tensor([[1, 5, 9, 30, 7, 100, 3, 8, 2, 4]]), torch.tensor([[1]])):
            logits = model(ids).logits
            assert logits.dtype == torch.float64
            assert bool(logits.isfinite().all())


def test_custom_ops_have_fake_kernels() -> None:
    codes, scb = kernels_int8.quantize_int8(torch.randn(16, 40))
    x = torch.randn(2, 40)
    torch.library.opcheck(torch.ops.quantize_model.dequantize_int8, (codes, scb, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    torch.library.opcheck(torch.ops.quantize_model.gemv_int8, (x, codes, scb),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    assert torch.equal(
        int8_ops._dequantize_torch(codes, scb, torch.bfloat16),
        int8_ops.dequantize(codes, scb, torch.bfloat16),
    )


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_peft_lora_wraps_and_trains(int8_folder: Path) -> None:
    from peft.tuners.lora.bnb import Linear8bitLt as PeftLoraLinear8bitLt

    model = load_quantized(int8_folder)
    frozen = {n: m.codes.clone() for n, m in _int8_layers(model).items()}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             lora_dropout=0.0, init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(model, config)
    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, PeftLoraLinear8bitLt)
    assert isinstance(wrapped.base_layer, Linear8bit)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = train_steps(model, params, ids)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(frozen[n.removeprefix("base_model.model.").replace(".base_layer", "")], m.codes)
               for n, m in _int8_layers(model).items())  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_a_peft_merged_int8_model_casts_and_moves(int8_folder: Path) -> None:
    """PEFT's 8-bit merge sets the layer's weight to a new Int8Params (a parameter, no longer our
    buffer); `.half()` / `.to(dtype)` of the merged model then raised KeyError 'weight'. Now they
    work and, as for any int8 layer, never cast the merged codes or SCB."""
    model = load_quantized(int8_folder, dtype=torch.float32)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    merged = peft.get_peft_model(model, config).merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    codes, scb = layer.codes.clone(), layer.scb.clone()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    merged.to(torch.bfloat16)
    assert layer.weight.dtype == torch.int8
    assert torch.equal(layer.codes, codes)
    assert torch.equal(layer.scb, scb)
    assert merged.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert merged(ids).logits.dtype == torch.bfloat16


def test_replace_linear_layers_and_state(int8_folder: Path, plain_llama: Path) -> None:
    state = load_quantized_state(int8_folder)
    records = {k: v for k, v in state.items() if isinstance(v, Int8Tensor)}
    assert len(records) == 14
    assert all(r.dtype == "bfloat16" for r in records.values())  # from our metadata
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(plain_llama))
    names = replace_linear_layers(model, int8_folder)
    assert set(names) == {k.removesuffix(".weight") for k in records}
    assert model.is_loaded_in_8bit
    assert all(m.threshold == 6.0 for m in _int8_layers(model).values())


def test_dequantize_checkpoint_writes_bnb_dequantized_weights(int8_folder: Path, tmp_path: Path) -> None:
    result = dequantize_checkpoint(int8_folder, tmp_path / "plain", dtype="float32")
    assert result.tensors_dequantized == 14
    from safetensors import safe_open

    state = load_quantized_state(int8_folder)
    with safe_open(tmp_path / "plain" / "model.safetensors", "pt") as fh:
        name = "model.layers.1.mlp.gate_proj.weight"
        rec = state[name]
        want = torch.ops.bitsandbytes.int8_vectorwise_dequant.default(rec.codes, rec.scb)
        assert torch.equal(fh.get_tensor(name), want)
        assert "model.layers.1.mlp.gate_proj.SCB" not in fh.keys()


_COMPILE = """
import torch
from converter.kernels import int8 as kernels_int8
from converter.loader.module_int8 import Linear8bit
codes, scb = kernels_int8.quantize_int8(torch.randn(64, 96).to(torch.bfloat16))
layer = Linear8bit(codes, scb, torch.zeros(64, dtype=torch.bfloat16)).eval()
compiled = torch.compile(layer, fullgraph=True, backend="eager")
for tokens in (1, 12):  # the GEMV op, then the dequantize op + F.linear
    x = torch.randn(tokens, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), compiled(x)), tokens
# gemv_ok's CUDA branch asks the extension (pybind, untraceable) whether the CUDA GEMV exists: it
# must reach dynamo as a constant, or fullgraph=True fails on every CUDA input.
from converter.loader import int8_ops
probe = torch.compile(lambda x: x + int(int8_ops._has_cuda_gemv()), fullgraph=True, backend="eager")
assert probe(torch.zeros(1)).item() == int(int8_ops._has_cuda_gemv())
print("ok")
"""


def test_default_forward_compiles_without_graph_breaks() -> None:
    """The int8 custom ops are single graph nodes: fullgraph=True traces the default path (in a
    subprocess: make test disables dynamo for the rest of the suite)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_loads_a_bitsandbytes_made_8bit_folder(plain_llama: Path, tmp_path: Path) -> None:
    """transformers + bnb's own save_pretrained (llm_int8_skip_modules null, no metadata of ours)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qc = transformers.BitsAndBytesConfig(load_in_8bit=True)
        made = transformers.LlamaForCausalLM.from_pretrained(
            plain_llama, device_map="cpu", quantization_config=qc
        )
        made.save_pretrained(tmp_path / "bnb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "transformers would load this differently" warning
        model = load_quantized(tmp_path / "bnb")
    layers = _int8_layers(model)
    assert len(layers) == 14
    for layer in layers.values():
        layer.exact = True
    ids = torch.tensor([[5, 17, 3, 99, 42]])
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids).logits, _transformers_model(tmp_path / "bnb")(input_ids=ids).logits
        )


@pytest.mark.parametrize("extra", ["weight.absmax", "weight.quant_map", "SCB.absmax"])
def test_a_key_under_an_int8_weight_is_refused(plain_llama: Path, tmp_path: Path, extra: str) -> None:
    """A stray key under an int8 weight's keys (bitsandbytes' and transformers' int8 layers have no such
    component) only gave an "unused tensor" warning; 4-bit weights refuse theirs (docs/format.md)."""
    from safetensors.torch import load_file, save_file

    from converter.errors import CorruptFileError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qc = transformers.BitsAndBytesConfig(load_in_8bit=True)
        made = transformers.LlamaForCausalLM.from_pretrained(
            plain_llama, device_map="cpu", quantization_config=qc
        )
        made.save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    tensors = load_file(shard)
    key = f"model.layers.0.mlp.up_proj.{extra}"
    tensors[key] = torch.ones(4)
    save_file(tensors, shard, metadata={"format": "pt"})
    for load in (load_quantized, load_quantized_state):
        with pytest.raises(CorruptFileError, match="unexpected keys") as info:
            load(tmp_path)
        assert str(shard) in str(info.value)
        assert repr(key) in str(info.value)


def test_device_map_cpu_and_footprint_count_codes_and_scb(int8_folder: Path) -> None:
    plain = load_quantized(int8_folder)
    mapped = load_quantized(int8_folder, device_map="cpu")
    ids = torch.tensor([[5, 17, 3, 99]])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, mapped(input_ids=ids).logits)
    layers = _int8_layers(plain)
    int8_bytes = sum(m.codes.numel() + 4 * m.scb.numel() for m in layers.values())
    others = {id(t): t for n, m in plain.named_modules() if n not in layers
              for t in (*m._parameters.values(), *m._buffers.values()) if t is not None}  # fmt: skip
    others.update({id(m.bias): m.bias for m in layers.values() if m.bias is not None})
    expected = int8_bytes + sum(t.numel() * t.element_size() for t in others.values())
    assert plain.get_memory_footprint() == expected


def test_bf16_prefill_multiplies_in_float32_without_native_bf16_matmuls(monkeypatch) -> None:
    """More than 8 bf16 tokens under no_grad on a CPU without AVX512_BF16 (forced with QM_CPU_ISA): the
    default path's float32 weight in one float32 GEMM, rounded once to bf16, as the 4-bit layers do;
    ``use_gemv = False`` and training keep the bf16 ``F.linear`` of the weight cast to bf16."""
    from converter.kernels import bnb4bit

    ours, _ = _layer()
    x = torch.randn(12, 80).to(torch.bfloat16)
    w32 = int8_ops.dequantize(ours.codes, ours.scb, torch.float32)
    monkeypatch.setenv("QM_CPU_ISA", "avx2" if "avx2" in bnb4bit.cpu_isas() else "scalar")
    with torch.no_grad():
        assert torch.equal(ours(x), torch.nn.functional.linear(x.float(), w32, ours.bias.float()).to(x.dtype))
        ours.use_gemv = False
        assert torch.equal(ours(x), torch.nn.functional.linear(x, w32.to(x.dtype), ours.bias))
    ours.use_gemv = True
    assert torch.equal(ours(x), torch.nn.functional.linear(x, w32.to(x.dtype), ours.bias))
