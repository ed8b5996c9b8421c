"""q/k/v and gate/up in one launch on the GPU (converter/loader/siblings.py), with shapes that take the
tensor-core stream kernel (in_features a multiple of 256). Needs an NVIDIA GPU (skipped otherwise).

The fused launch may split rows and K differently from a single-weight launch, so outputs are held to
the bound derived from the kernel's arithmetic (tests/error_bounds.py) against float64, layer by layer;
whole-model logits have no derivable tolerance (attention and softmax amplify rounding).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from error_bounds import worst_ratio
from loader_helpers import gemv_bound, greedy_reference, linear4bit_outputs, save_tiny_llama

from converter.loader import ops
from converter.loader.cuda_gemv import CudaGemv, CudaGemvGroup
from converter.loader.decode import graphed_greedy
from converter.loader.model import load_quantized

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

IDS = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    from converter.writer.pipeline import convert

    root = tmp_path_factory.mktemp("siblings")
    plain = save_tiny_llama(root / "plain", hidden_size=512, intermediate_size=1024, num_attention_heads=8)
    convert(plain, root / "nf4", progress=False, compute_dtype="bfloat16")
    return root / "nf4"


def _load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_quantized(folder, device="cuda").eval()


@pytest.fixture(scope="module")
def model(folder):
    return _load(folder)


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_grouped_layers_within_the_gemv_bound(model, monkeypatch: pytest.MonkeyPatch, tokens: int) -> None:
    seen: list[int] = []  # eager: the groups' prepared launch (loader/cuda_gemv.py), not ops' general one
    real = CudaGemvGroup.__call__
    monkeypatch.setattr(
        CudaGemvGroup, "__call__", lambda g, x, fit: seen.append(len(g.args)) or real(g, x, fit)
    )
    monkeypatch.setattr(ops, "gemv_prepared_multi", lambda *a: pytest.fail("the general group launch"))
    calls = linear4bit_outputs(model, IDS[:, :tokens].cuda())
    layers = len(model.model.layers)
    assert sorted(seen) == [2] * layers + [3] * layers
    for name, layer, x, y in calls:
        ref, bound = gemv_bound(x, layer.dequantize(torch.float32), layer.bias, device_type="cuda")
        assert worst_ratio(y.reshape(ref.shape), ref, bound) <= 1.0, name


def test_graphed_greedy_with_groups_gives_transformers_greedy_tokens(model) -> None:
    ids = IDS.cuda()
    kw = {"max_new_tokens": 20, "min_new_tokens": 20, "pad_token_id": 0}
    want = greedy_reference(model, ids, **kw)  # the same grouped layers in transformers' own loop
    got = model.generate(ids, custom_generate=graphed_greedy, steps_per_graph=4, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_prepared_eager_launches_give_the_general_route_bits(model, tokens: int) -> None:
    """The eager launches without per-call checks (loader/cuda_gemv.py) run the general route's kernel
    with its arguments: the same bits, for every layer alone and every group."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "_eager_gemv", None), CudaGemv)]
    assert len(layers) == 7 * len(model.model.layers)
    g = torch.Generator(device="cuda").manual_seed(tokens)
    with torch.no_grad():
        for layer in layers:
            x = torch.randn(tokens, layer.in_features, device="cuda", generator=g).to(torch.bfloat16)
            assert torch.equal(layer._eager_gemv(x), ops.linear(x, layer._kernel_args, None))
        for block in model.model.layers:
            for first in (block.self_attn.q_proj, block.mlp.gate_proj):
                group = first._siblings
                x = torch.randn(tokens, first.in_features, device="cuda", generator=g).to(torch.bfloat16)
                fast = group._eager_group(x)
                assert isinstance(fast, CudaGemvGroup)
                want = ops.gemv_prepared_multi(x, [m._kernel_args for m in group.members])
                for got, ref in zip(fast(x, fast.fits(x)), want, strict=True):
                    assert torch.equal(got, ref)


def test_prepared_eager_launches_follow_the_current_stream_and_graph_capture(model) -> None:
    layer = model.model.layers[0].self_attn.o_proj
    group = model.model.layers[0].mlp.gate_proj._siblings
    x = torch.randn(1, layer.in_features, device="cuda").to(torch.bfloat16)
    fast = group._eager_group(x)
    with torch.no_grad():
        want = layer(x)
        want_group = fast(x, fast.fits(x))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # queued on the side stream: ready once it is synchronised
            got = layer(x)
        side.synchronize()
        assert torch.equal(got, want)
        graph = torch.cuda.CUDAGraph()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x), fast(x, fast.fits(x))  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            captured = layer(x)
            captured_group = fast(x, fast.fits(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, want)
        for got_g, ref in zip(captured_group, want_group, strict=True):
            assert torch.equal(got_g, ref)


def test_a_model_moved_off_the_gpu_keeps_no_group_launch_on_it(folder) -> None:
    """The groups' eager launches hold their members' prepared tensors: moving the model to the CPU drops
    them with the members' arguments (nothing keeps the GPU copies of q/k/v, gate/up alive)."""
    model = _load(folder)
    with torch.no_grad():
        model(IDS[:, :1].cuda())  # a decode-sized step makes every group's launch
    groups = [m._siblings for m in model.modules() if getattr(m, "_siblings", None) is not None]
    assert groups
    assert all(isinstance(g._eager, CudaGemvGroup) for g in groups)
    model.cpu()
    assert all(g._eager is None and g._eager_for == () for g in groups)
    with torch.no_grad():  # and it still runs, on the CPU
        model(IDS[:, :1])
