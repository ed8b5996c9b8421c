"""Linear4bit: forward on every layout, GEMV vs fallback, autograd, device/dtype moves, state dict."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from error_bounds import dot_bound, gamma, worst_ratio
from loader_helpers import gemv_bound, linear_bound, make_layer, reference_weight

from converter import _kernels
from converter.loader.module import Linear4bit, dtype_from_name
from formats.quant_types import BLOCKSIZES

# (out, in): in a multiple of every blocksize up to 4096, in not a multiple (blocks cross rows), odd sizes.
SHAPES = [(24, 4096), (33, 200), (7, 77)]


def _reference(layer: Linear4bit, record, bias, x: torch.Tensor) -> torch.Tensor:
    """dequantize (numpy reference) + F.linear in the compute dtype: what the fallback must give exactly."""
    compute = layer.compute_dtype
    w = reference_weight(record, compute)
    return F.linear(x.to(compute), w, None if bias is None else bias.to(compute)).to(x.dtype)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_every_blocksize_and_shape(blocksize: int, shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    k = BLOCKSIZES.index(blocksize)
    dtype = (torch.bfloat16, torch.float16, torch.float32)[k % 3]
    layer, record, bias = make_layer(
        out_f, in_f, dtype=dtype, bias=bool(k % 2), nested=k % 4 < 2, blocksize=blocksize,
        quant_type="nf4" if k % 3 else "fp4", seed=k,
    )  # fmt: skip
    w32 = reference_weight(record, torch.float32)  # the exact float32 decode the GEMV multiplies
    fused = in_f % blocksize == 0  # else the layer dequantizes to x's dtype and calls F.linear
    for batch in range(1, 9):
        x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(batch)).to(dtype)
        layer.use_gemv = False
        y_fallback = layer(x)
        assert torch.equal(y_fallback, _reference(layer, record, bias, x)), (batch, "fallback")
        layer.use_gemv = True
        y = layer(x)
        assert y.dtype == dtype
        assert y.shape == (batch, out_f)
        ref, bound = gemv_bound(x, w32, bias) if fused else linear_bound(x, w32, bias, dtype)
        worst = worst_ratio(y, ref, bound)
        assert worst <= 1.0, (batch, "gemv" if fused else "fallback", f"{worst:.3g} x the derived bound")


def test_gemv_bound_catches_a_corrupted_absmax() -> None:
    """The forward's bound is tight enough to catch one block of one row scaled wrongly or dropped."""
    layer, record, _ = make_layer(24, 4096, dtype=torch.float32, nested=False, blocksize=64, seed=11)
    w32 = reference_weight(record, torch.float32)
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(3))
    ref, bound = gemv_bound(x, w32)
    assert worst_ratio(layer(x), ref, bound) <= 1.0
    absmax = layer.weight.quant_state.absmax
    contrib = (x[0].double() * w32[9].double()).view(-1, 64).sum(1).abs()
    block = 9 * (4096 // 64) + int(contrib.argmax())  # row 9's largest block: the error must show
    original = absmax[block].item()
    for corrupt in (original * 1.25, 0.0):
        absmax[block] = corrupt
        try:
            err = (layer(x).double() - ref).abs() / bound
        finally:
            absmax[block] = original
        assert float(err[0, 9]) > 1.0, corrupt


def test_gemv_taken_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = _kernels.gemv_4bit  # what every GEMV route (loader/cpu_gemv.py, ops.linear) launches
    monkeypatch.setattr(_kernels, "gemv_4bit", lambda *a: calls.append((a[2], a[3])) or real(*a))
    whole, _, _ = make_layer(32, 128, blocksize=64)
    crossing, _, _ = make_layer(32, 100, blocksize=64)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    whole(x)
    assert calls == [(3, 128)]  # 3 tokens, whole blocks per row: the fused GEMV
    whole(torch.randn(9, 128, dtype=torch.bfloat16))  # 9 tokens: dequantize + matmul
    crossing(torch.randn(2, 100, dtype=torch.bfloat16))  # blocks cross rows: dequantize + matmul
    whole(torch.randn(2, 4, 128, dtype=torch.bfloat16))  # 8 tokens in a 3-D input: GEMV
    assert calls == [(3, 128), (8, 128)]


@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16, torch.float32])
def test_activation_dtypes_and_compute_dtype(act: torch.dtype) -> None:
    layer, record, bias = make_layer(16, 128, dtype=torch.bfloat16, bias=True, compute_dtype=torch.float32)
    layer.use_gemv = False
    x = torch.randn(2, 5, 128).to(act)
    y = layer(x)
    assert y.dtype == act  # output in the input's dtype, matmul in the compute dtype (as bnb)
    assert torch.equal(y, _reference(layer, record, bias, x))


def test_non_contiguous_input_and_3d() -> None:
    layer, record, bias = make_layer(40, 256, bias=True)
    big = torch.randn(4, 3, 512, dtype=torch.bfloat16)
    x = big[..., ::2]
    assert not x.is_contiguous()
    layer.use_gemv = True
    assert torch.equal(layer(x[:, 0]), layer(x[:, 0].contiguous()))  # 4 tokens: GEMV
    assert layer(x[:, 0]).shape == (4, 40)
    # 12 tokens: dequantize + F.linear on the caller's (strided) tensor, as bitsandbytes does; torch
    # may round a strided GEMM differently from a contiguous one, so compare with the same call.
    assert torch.equal(layer(x), _reference(layer, record, bias, x))
    ref, bound = linear_bound(x, reference_weight(record, torch.float32), bias, torch.bfloat16)
    assert worst_ratio(layer(x).reshape(-1, 40), ref, bound) <= 1.0


def test_gradient_flows_to_input_only() -> None:
    layer, record, _ = make_layer(48, 128, dtype=torch.float32, bias=True)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]  # packed codes are a buffer
    assert not layer.bias.requires_grad
    w = record.dequantize()
    for n_tokens in (1, 12):  # GEMV forward and fallback forward share the backward
        x = torch.randn(n_tokens, 128, requires_grad=True)
        g = torch.randn(n_tokens, 48)
        (layer(x) * g).sum().backward()
        # The backward is a float32 matmul (K = 48 terms, any blocking): within gamma_48 * (|g| @ |W|)
        # of the float64 product.
        ref, bound = dot_bound(g, w.T, out_dtype=torch.float32)
        assert worst_ratio(x.grad, ref, bound) <= 1.0
    assert layer.weight.grad is None


def test_backward_uses_the_forwards_weight_when_the_compute_dtype_is_wider() -> None:
    """bnb_4bit_compute_dtype float32 over bfloat16 weights (transformers' BitsAndBytesConfig default):
    the forward multiplies by W decoded exactly in float32, as bitsandbytes' forward does, and the
    backward by that same W, so grad_x is the gradient of the forward (bitsandbytes 0.50.2's backward
    decodes W to bfloat16 first: other gradients from equal logits; docs/python-api.md)."""
    layer, _, _ = make_layer(48, 128, dtype=torch.bfloat16, compute_dtype=torch.float32)
    layer.train()
    w = layer.dequantize(torch.float32)
    assert not torch.equal(w, layer.dequantize(torch.bfloat16).float())  # the two decodes differ here
    x = torch.randn(12, 128, requires_grad=True)
    g = torch.randn(12, 48)
    y = layer(x)
    assert torch.equal(y, F.linear(x.detach(), w))
    y.backward(g)
    assert torch.equal(x.grad, g @ w)


@pytest.mark.parametrize("n_tokens", [1, 12])  # the GEMV path (its output a reshape) and F.linear
def test_output_modified_in_place_under_autograd(n_tokens: int) -> None:
    """A caller may add into the layer's output in place while training (Llama 4's MoE adds its routed
    experts into the shared expert's output): autograd refused it ("Output 0 of _Linear4bitFunction is a
    view and is being modified inplace") on the GEMV path, whose output was a view made inside the
    Function. The output now takes the add, and the gradient is the one without it."""
    layer, _, _ = make_layer(48, 128, dtype=torch.float32, bias=False)
    x = torch.randn(1, n_tokens, 128, requires_grad=True)
    with torch.no_grad():
        want = layer(x) + 1.0
    y = layer(x)
    y.add_(1.0)
    assert torch.equal(y, want)
    y.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    layer(x).sum().backward()
    assert torch.equal(grad, x.grad)


def test_gradcheck_float64_free_path() -> None:
    # autograd.gradcheck in float32 with loose tolerances: the backward is the exact transpose.
    layer, _, _ = make_layer(8, 64, dtype=torch.float32)
    layer.use_gemv = False
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    # Both sides sum 8 float32 terms per element: each within gamma_8 * (1 @ |W|) of the exact sum.
    w = layer.dequantize(torch.float32).double()
    assert bool(((gx.double() - w.sum(0)).abs() <= gamma(8) * w.abs().sum(0)).all())


@pytest.mark.parametrize("tokens", [1, 8, 9, 33])
@pytest.mark.parametrize("use_gemv", [True, False])
def test_float64_computes_in_float64_on_the_dequantize_path(tokens: int, use_gemv: bool) -> None:
    """compute_dtype float64 (e.g. ``load_quantized(dtype=torch.float64)``) raised a bare
    ``KeyError: torch.float64`` past 8 tokens (the dequantize kernel's dtype table) and a ValueError
    from the GEMV kernel up to 8. float64 now takes the dequantize path: the float32 weight (each
    element a float32 product, held exactly in float64) cast, then F.linear in float64."""
    layer, _, bias = make_layer(24, 128, bias=True, compute_dtype=torch.float64)
    layer.use_gemv = use_gemv
    w64 = layer.dequantize(torch.float32).double()
    assert torch.equal(layer.dequantize(torch.float64), w64)
    for act in (torch.float64, torch.float32):  # float32 input: computed in float64, returned in float32
        x = torch.randn(tokens, 128, dtype=act)
        y = layer(x)
        assert y.dtype == act
        assert torch.equal(y, F.linear(x.double(), w64, bias.double()).to(act))
    x = torch.randn(tokens, 128, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))  # float64: the backward is the exact transpose


def test_unsupported_compute_dtype_is_a_type_error() -> None:
    layer, _, _ = make_layer(8, 64)
    with pytest.raises(TypeError, match=r"float32, float16, bfloat16 or float64, not torch\.int32"):
        layer.dequantize(torch.int32)
    layer.compute_dtype = torch.int64
    with pytest.raises(TypeError, match=r"float32, float16, bfloat16 or float64, not torch\.int64"):
        layer(torch.randn(12, 64))


def _bytes(layer: Linear4bit) -> list[torch.Tensor]:
    s = layer.weight.quant_state
    out = [layer.weight.data.reshape(-1).view(torch.uint8), s.absmax, s.code]
    if s.nested:
        out += [s.state2.absmax, s.state2.code, s.offset]
    return [t.detach().clone() for t in out]


@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float32"])
def test_dtype_casts_and_moves_keep_quantized_bytes(storage: str) -> None:
    layer, _, _ = make_layer(32, 128, bias=True, storage=storage)
    before = _bytes(layer)
    packed_dtype = layer.weight.dtype
    steps = [
        lambda m: m.half(),
        lambda m: m.float(),
        lambda m: m.bfloat16(),
        lambda m: m.to(torch.float16),
        lambda m: m.cpu(),
        lambda m: m.to("cpu"),
        lambda m: m.to(torch.device("cpu"), torch.float32),
    ]
    for step in steps:
        step(layer)
        assert layer.weight.dtype == packed_dtype
        assert all(torch.equal(a, b) for a, b in zip(before, _bytes(layer), strict=True))
    assert layer.bias.dtype == torch.float32  # ordinary tensors do follow the casts
    assert isinstance(layer.weight, bnb.nn.Params4bit)


@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float32"])
def test_torch_save_of_a_layer_of_any_quant_storage(storage: str) -> None:
    """torch.save of a layer (and so of a whole loaded model) whose codes are stored as bfloat16 or
    float32 (bnb_4bit_quant_storage, as FSDP QLoRA sets it): its prepared kernel arguments held the codes
    as a uint8 view of the same memory, and torch.save refused the layer ("Cannot save multiple tensors
    or storages that view the same data as different types"). The loaded copy prepares its own
    arguments from its own codes: same outputs, on the fused GEMV too."""
    import io

    layer, _, _ = make_layer(32, 128, bias=True, storage=storage)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    assert copy.weight.dtype == layer.weight.dtype
    assert copy._kernel_args is not None  # prepared again, for the fused GEMV
    assert copy._eager_gemv is not None
    codes = copy._kernel_args.packed
    assert codes.untyped_storage().data_ptr() == copy.weight.untyped_storage().data_ptr()
    assert torch.equal(copy(x), expected)


@pytest.mark.parametrize("nested", [True, False])
def test_state_dict_is_bnb_layout_and_round_trips(nested: bool) -> None:
    layer, record, bias = make_layer(40, 96, bias=True, nested=nested, quant_type="fp4")
    sd = layer.state_dict()
    expected = {f"weight{s}" for s in ("", ".absmax", ".quant_map", ".quant_state.bitsandbytes__fp4")} | {
        "bias"
    }
    if nested:
        expected |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(sd) == expected
    # The same keys and bytes bitsandbytes' own QuantState serializer writes.
    for key, value in layer.weight.quant_state.as_dict(packed=True).items():
        assert torch.equal(sd["weight." + key], value), key
    for key, value in record.state_dict().items():
        assert torch.equal(sd[key.replace("layer.", "")], value), key
    other, _, _ = make_layer(40, 96, bias=True, nested=not nested, seed=5)
    other.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(_bytes(layer), _bytes(other), strict=True))
    assert torch.equal(other.bias, bias)
    wrong, _, _ = make_layer(40, 95, bias=True)
    with pytest.raises(
        RuntimeError, match=r"weight: checkpoint shape \[40, 96\] does not match the layer's \[40, 95\]"
    ):
        wrong.load_state_dict(sd)


def test_a_bias_of_another_shape_is_refused_not_broadcast() -> None:
    """``load_state_dict`` copied the bias in place, so a bias of shape [1] (or any shape that
    broadcasts) filled every row with its value, silently; it is reported as torch reports a size
    mismatch. Loaded with ``assign=True`` the bias keeps its ``requires_grad``, as torch keeps it."""
    layer, _, bias = make_layer(40, 96, bias=True)
    sd = layer.state_dict()
    sd["bias"] = sd["bias"][:1].clone()
    with pytest.raises(RuntimeError, match=r"bias: checkpoint shape \[1\] does not match the layer's \[40\]"):
        layer.load_state_dict(sd)
    assert torch.equal(layer.bias, bias)
    other, _, other_bias = make_layer(40, 96, bias=True, seed=3)
    layer.bias.requires_grad_(True)
    layer.load_state_dict(other.state_dict(), assign=True)
    assert torch.equal(layer.bias, other_bias)
    assert layer.bias.requires_grad


def test_subclass_of_bnb_linear4bit_and_bnb_dequantize_agrees() -> None:
    layer, record, _ = make_layer(32, 200, nested=True)
    assert isinstance(layer, bnb.nn.Linear4bit)
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(w.view(torch.int16), layer.dequantize().view(torch.int16))
    assert torch.equal(w.view(torch.int16), record.dequantize().view(torch.int16))


@pytest.mark.parametrize("bad", [None, "bfloat", "auto", 16])
def test_dtype_from_name_refuses_what_it_cannot_name(bad) -> None:
    """``load_quantized(..., dtype=None)`` (transformers' habit) is a ValueError naming the choices, not
    an AttributeError from inside the parser."""
    with pytest.raises(ValueError, match="expected one of float32, float16, bfloat16"):
        dtype_from_name(bad)
    assert dtype_from_name("torch.float16") is torch.float16
    assert dtype_from_name("half") is torch.float16  # any torch name of a kernel dtype, as transformers
    assert dtype_from_name("float") is torch.float32
    assert dtype_from_name("bf16") is torch.bfloat16  # convert's and dequantize's short names too


@pytest.mark.parametrize("bias", [False, True])
def test_codes_replaced_in_place_are_the_ones_the_forward_reads(bias: bool) -> None:
    """``layer.weight.data = codes`` (same shape and dtype) swaps the codes under the layer's prepared
    kernel arguments: every path (the lean CPU launch, the prepared launch with a bias or a cast, the
    dequantize path) computes with the new codes, as a layer built from them does, bit for bit (the same
    kernel on the same bytes); it computed with the old ones."""
    layer, _, b = make_layer(48, 128, bias=bias, nested=True, seed=1)
    other, _, _ = make_layer(48, 128, nested=True, seed=2)
    codes = other.weight.data.clone()
    x1 = torch.randn(1, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x3 = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    inputs = [x1, x3, x1.half(), torch.randn(12, 128, dtype=torch.bfloat16)]  # 12 tokens: dequantize
    before = [layer(x) for x in inputs]
    layer.weight.data = codes
    fresh = Linear4bit(codes, layer.weight.quant_state, bias=b)
    for x, old in zip(inputs, before, strict=True):
        want = fresh(x)
        assert not torch.equal(want, old)  # the swap changes the output: the comparison can fail
        assert torch.equal(layer(x), want), (tuple(x.shape), x.dtype)


def test_weight_assigned_or_loaded_is_the_one_the_forward_reads() -> None:
    """The supported ways to give a layer new codes: ``load_state_dict`` and assigning a new 4-bit weight
    (PEFT's merge does): the forward reads them."""
    layer, _, _ = make_layer(48, 128, nested=True, seed=1)
    other, _, _ = make_layer(48, 128, nested=False, seed=2)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want = other(x)
    assert not torch.equal(layer(x), want)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), want)
    layer, _, _ = make_layer(48, 128, nested=True, seed=1)
    layer.weight = bnb.nn.Params4bit(
        other.weight.data, requires_grad=False, quant_state=other.weight.quant_state,
        blocksize=64, quant_type="nf4", bnb_quantized=True,
    )  # fmt: skip
    assert torch.equal(layer(x), want)


def test_bf16_prefill_multiplies_in_float32_without_native_bf16_matmuls(monkeypatch) -> None:
    """More than 8 bf16 tokens under no_grad on a CPU without AVX512_BF16 (a path below avx512bf16, as
    QM_CPU_ISA forces it): one float32 GEMM of the exact float32 weight, rounded once to bf16, within
    the GEMM's bound of the float64 product; ``use_gemv = False`` and training keep bitsandbytes' bf16
    call."""
    layer, record, bias = make_layer(48, 128, bias=True, nested=True, blocksize=64)
    x = torch.randn(12, 128).to(torch.bfloat16)
    w32 = reference_weight(record, torch.float32)
    monkeypatch.setenv("QM_CPU_ISA", "avx2" if "avx2" in _kernels.cpu_isas() else "scalar")
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(y, F.linear(x.float(), w32, bias.float()).to(torch.bfloat16))
        ref, bound = dot_bound(x, w32, out_dtype=torch.bfloat16, bias=bias)  # float32 sums of K terms
        assert worst_ratio(y, ref, bound) <= 1.0
        layer.use_gemv = False
        assert torch.equal(layer(x), F.linear(x, w32.to(torch.bfloat16), bias))
    layer.use_gemv = True  # grad enabled (training): bitsandbytes' bf16 call too
    assert torch.equal(layer(x), F.linear(x, w32.to(torch.bfloat16), bias))
