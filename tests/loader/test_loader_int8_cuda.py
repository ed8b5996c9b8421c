"""Linear8bit on the GPU: the fused int8 GEMV op in a CUDA graph and under torch.compile(fullgraph=True).

Needs an NVIDIA GPU and the CUDA backend (skipped otherwise).
"""

from __future__ import annotations

import pytest
import torch
from loader_helpers import assert_compiled_without_breaks, assert_graph_replay_follows_the_stream

from converter.kernels import int8 as kernels_int8
from converter.loader import int8_ops
from converter.loader.module_int8 import Linear8bit

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _linear(out_f: int, in_f: int, seed: int) -> Linear8bit:
    g = torch.Generator().manual_seed(seed)
    codes, scb = kernels_int8.quantize_int8((torch.randn(out_f, in_f, generator=g) * 0.05).to(torch.bfloat16))
    bias = (torch.randn(out_f, generator=g) * 0.1).to(torch.bfloat16)
    return Linear8bit(codes, scb, bias).eval()


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(_linear(512, 256, 1), torch.nn.SiLU(), _linear(256, 512, 2)).cuda()


def test_cuda_layer_takes_the_fused_gemv_op() -> None:
    x = torch.randn(3, 256, dtype=torch.bfloat16, device="cuda")
    assert int8_ops.gemv_ok(x)
    layer = _linear(512, 256, 1).cuda()
    with torch.no_grad():
        want = kernels_int8.gemv_int8(x, layer.codes, layer.scb, layer.bias)
        assert torch.equal(layer(x), want)
    torch.library.opcheck(
        torch.ops.quantize_model.gemv_int8.default, (x, layer.codes, layer.scb, layer.bias.data)
    )


def test_layer_in_a_cuda_graph_on_a_side_stream() -> None:
    """Captured on a non-default stream and replayed: the launch followed torch's current stream."""
    layer = _linear(512, 256, 3).cuda()
    x = torch.randn(1, 256, dtype=torch.bfloat16, device="cuda")
    assert_graph_replay_follows_the_stream(layer, x)


@pytest.mark.parametrize("tokens", [1, 8, 12], ids=["gemv1", "gemv8", "dequantize"])
def test_model_compiles_fullgraph_with_cudagraphs_to_the_eager_result(dynamo, tokens: int) -> None:
    model = _mlp()
    x = torch.randn(tokens, 256, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="cudagraphs")
        for _ in range(3):  # warm-up, record, replay
            got = compiled(x).clone()
    assert_compiled_without_breaks(dynamo)
    assert torch.equal(got, eager)  # the same kernels, replayed from a CUDA graph
