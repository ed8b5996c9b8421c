"""The loader on a CUDA device: moves keep the bytes, decode is bit-exact, forward and models agree.

Needs an NVIDIA GPU (skipped otherwise). bitsandbytes is not required.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from error_bounds import dot_bound, worst_ratio
from loader_helpers import gemv_bound, linear4bit_outputs, make_layer, reference_weight

from converter.loader import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _bytes(layer) -> list[torch.Tensor]:
    s = layer.weight.quant_state
    out = [layer.weight.data.reshape(-1).view(torch.uint8), s.absmax, s.code]
    if s.nested:
        out += [s.state2.absmax, s.state2.code, s.offset]
    return [t.detach().cpu().clone() for t in out]


@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_cuda_round_trip_keeps_bytes(storage: str) -> None:
    layer, _, _ = make_layer(64, 256, bias=True, storage=storage)
    before = _bytes(layer)
    layer.cuda()
    s = layer.weight.quant_state
    tensors = (layer.weight, s.absmax, s.code, s.offset, s.state2.absmax, s.state2.code, layer.bias)
    assert {t.device.type for t in tensors} == {"cuda"}
    layer.half().to("cpu").to(torch.device("cuda", 0)).cpu()
    assert all(torch.equal(a, b) for a, b in zip(before, _bytes(layer), strict=True))


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(96, 256), (33, 200)], ids=["whole-blocks", "blocks-cross-rows"])
def test_cuda_decode_bit_exact_and_forward(nested: bool, shape: tuple[int, int]) -> None:
    layer, record, bias = make_layer(*shape, bias=True, nested=nested)
    cpu_w = layer.dequantize()
    layer.cuda()
    assert torch.equal(layer.dequantize().cpu().view(torch.int16), cpu_w.view(torch.int16))
    w32 = reference_weight(record, torch.float32)
    for tokens in (1, 5, 8, 40):
        x = torch.randn(tokens, shape[1], dtype=torch.bfloat16)
        layer.use_gemv = False
        y = layer(x.cuda())
        expected = F.linear(x.cuda(), reference_weight(record, torch.bfloat16).cuda(), bias.cuda())
        assert torch.equal(y, expected)  # exact decode, then the same cuBLAS call
        layer.use_gemv = True
        if tokens <= 8:  # the fused GEMV (40 tokens: the cuBLAS call checked bit for bit above)
            ref, bound = gemv_bound(x, w32, bias, device_type="cuda")
            assert worst_ratio(layer(x.cuda()), ref, bound) <= 1.0, tokens


def test_cuda_torch_fallback_equals_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, _, _ = make_layer(48, 320, nested=True)
    layer.cuda()
    with_kernels = layer.dequantize()
    monkeypatch.setattr(ops, "kernel_backend", lambda device: None)
    assert torch.equal(layer.dequantize().view(torch.int16), with_kernels.view(torch.int16))


def test_cuda_gradient_to_input() -> None:
    layer, record, _ = make_layer(48, 128, dtype=torch.float32)
    layer.cuda()
    x = torch.randn(6, 128, device="cuda", requires_grad=True)
    g = torch.randn(6, 48, device="cuda")
    (layer(x) * g).sum().backward()
    # grad_x = g @ W: a float32 cuBLAS matmul (TF32 off, torch's default), K = 48 terms in any order.
    ref, bound = dot_bound(g, record.dequantize().T, out_dtype=torch.float32)
    assert worst_ratio(x.grad, ref, bound) <= 1.0


def test_load_quantized_on_cuda(our_folder: Path) -> None:
    from converter.loader.model import linear4bit_modules, load_quantized

    ids = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64]])
    gpu = load_quantized(our_folder, device="cuda")
    assert all(m.weight.is_cuda for m in linear4bit_modules(gpu).values())
    with torch.no_grad():
        out = gpu.generate(ids[:, :3].cuda(), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    # Every quantized layer of a real forward (8 tokens: the GPU's fused GEMV) within the bound derived
    # from the kernel's arithmetic, against float64 with the exact decode of the same weight. End-to-end
    # CPU-vs-GPU logits have no derivable tolerance (attention and softmax amplify rounding).
    calls = linear4bit_outputs(gpu, ids.cuda())
    assert len(calls) == len(linear4bit_modules(gpu))
    for name, layer, x, y in calls:
        ref, bound = gemv_bound(x, layer.dequantize(torch.float32), layer.bias, device_type="cuda")
        assert worst_ratio(y.reshape(ref.shape), ref, bound) <= 1.0, name
