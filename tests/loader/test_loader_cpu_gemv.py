"""The eager CPU decode launch of Linear4bit (converter/loader/cpu_gemv.py): the same bits as the general
route, taken only where it applies, and safe to copy (it holds raw addresses of the layer's tensors)."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
from loader_helpers import inputs_an_eager_launch_declines, make_layer

from converter.loader import ops
from converter.loader.cpu_gemv import CpuGemv


def _general(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The route every call took before: ops.linear on the prepared arguments."""
    return ops.linear(x, layer._kernel_args, None)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fast_launch_gives_the_general_route_bits(nested: bool, dtype: torch.dtype, monkeypatch) -> None:
    layer, _, _ = make_layer(48, 128, nested=nested, blocksize=64, compute_dtype=dtype)
    assert isinstance(layer._eager_gemv, CpuGemv)
    taken: list[int] = []
    real = CpuGemv.__call__
    monkeypatch.setattr(CpuGemv, "__call__", lambda self, x: taken.append(1) or real(self, x))
    with torch.no_grad():
        for shape in [(1, 128), (1, 1, 128), (3, 128), (2, 4, 128)]:
            x = torch.randn(shape).to(dtype)
            assert torch.equal(layer(x), _general(layer, x)), shape
    assert len(taken) == 4


def test_other_calls_take_the_general_route(monkeypatch) -> None:
    layer, _, _ = make_layer(48, 128, blocksize=64, bias=True)
    assert layer._eager_gemv is not None
    layer_nb, _, _ = make_layer(48, 128, blocksize=64)
    monkeypatch.setattr(CpuGemv, "__call__", lambda self, x: pytest.fail("fast launch taken"))
    with torch.no_grad():
        layer(torch.randn(1, 128).to(torch.bfloat16))  # a bias
        layer_nb(torch.randn(1, 128))  # float32 x, bfloat16 compute dtype: a cast first
    x = torch.randn(1, 128).to(torch.bfloat16).requires_grad_()
    layer_nb(x).sum().backward()  # training
    assert x.grad is not None


def test_fast_launch_declines_what_it_cannot_take() -> None:
    layer, _, _ = make_layer(48, 128, blocksize=64)
    for x in inputs_an_eager_launch_declines(128):
        assert layer._eager_gemv(x) is None, (x.shape, x.dtype, x.device)
    with torch.no_grad():  # and the layer still answers all of them through the general route
        x = torch.randn(9, 128).to(torch.bfloat16)
        assert torch.equal(layer(x), _general(layer, x))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_use_their_own_tensors(how: str) -> None:
    """A copied layer's launch points at the copy's tensors: the original may be freed."""
    layer, _, _ = make_layer(48, 128, nested=True, blocksize=64)
    x = torch.randn(1, 128).to(torch.bfloat16)
    with torch.no_grad():
        want = layer(x)
    twin = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    assert twin._eager_gemv._consts[1] == twin._kernel_args.packed.data_ptr()
    assert twin._eager_gemv._consts[1] != layer._eager_gemv._consts[1]
    del layer
    gc.collect()
    with torch.no_grad():
        assert torch.equal(twin(x), want)
