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
from converter.loader.decode import graphed_greedy
from converter.loader.model import load_quantized

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

IDS = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64]])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    from converter.writer.pipeline import convert

    root = tmp_path_factory.mktemp("siblings")
    plain = save_tiny_llama(root / "plain", hidden_size=512, intermediate_size=1024, num_attention_heads=8)
    convert(plain, root / "nf4", progress=False, compute_dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_quantized(root / "nf4", device="cuda").eval()


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_grouped_layers_within_the_gemv_bound(model, monkeypatch: pytest.MonkeyPatch, tokens: int) -> None:
    seen: list[int] = []
    real = ops.gemv_prepared_multi
    monkeypatch.setattr(
        ops, "gemv_prepared_multi", lambda x2d, a, w=None: seen.append(len(a)) or real(x2d, a, w)
    )
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
