"""The eager CUDA decode launches (converter/loader/cuda_gemv.py), their plumbing checked on the CPU.

No GPU runs here, so the CUDA entry points are replaced by adapters that hand the very same pointers to
the CPU kernels (the same decode and arithmetic on every device): an argument in the wrong slot, a
stale address or a wrong size gives other bits than the general route (or no launch). The CUDA tests
(tests/loader/test_loader_siblings_cuda.py, test_loader_cuda.py) run the real launches on a GPU.
"""

from __future__ import annotations

import copy
import gc
import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from loader_helpers import inputs_an_eager_launch_declines, make_layer

from converter import _kernels
from converter.kernels import bnb4bit_cuda
from converter.kernels.checks import KERNEL_DTYPE_CODES, KERNEL_DTYPE_NAMES
from converter.loader import cuda_gemv, module, ops, siblings
from converter.loader.cuda_gemv import CudaGemv, CudaGemvGroup
from converter.loader.model import load_quantized

NAMES = {code: KERNEL_DTYPE_NAMES[dtype] for dtype, code in KERNEL_DTYPE_CODES.items()}
STREAM = 0xC0FFEE


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """CPU weights take the CUDA launches, through adapters onto the CPU kernels; records each launch."""
    seen: list[str] = []

    def single(
        dev, x, dtype, batch, n, k, bs, packed, am, nc, na, off, m8, qmap, y, stream, variant, scratch
    ):
        assert (stream, variant) == (STREAM, bnb4bit_cuda.GEMV_DEFAULT_VARIANT)
        seen.append("single")
        _kernels.gemv_4bit(x, NAMES[dtype], batch, k, n, bs, packed, qmap, am, nc, na, off, m8, y, "auto", 1)

    def multi(
        dev, x, dtype, batch, k, bs, outs, packed, am, nc, na, off, m8, qmaps, ys, stream, variant, scratch
    ):
        assert (stream, variant) == (STREAM, bnb4bit_cuda.GEMV_DEFAULT_VARIANT)
        seen.append(f"multi{len(outs)}")
        _kernels.gemv_4bit_multi(
            x, NAMES[dtype], batch, k, bs, outs, packed, qmaps, am, nc, na, off, m8, ys, "auto", 1
        )

    fake = SimpleNamespace(cuda_gemv_4bit=single, cuda_gemv_4bit_multi=multi)
    monkeypatch.setattr(bnb4bit_cuda, "_kernels", fake)
    monkeypatch.setattr(bnb4bit_cuda, "_gemv_scratch", lambda *a: 0)
    monkeypatch.setattr(bnb4bit_cuda, "_gemv_multi_scratch", lambda *a: 0)
    monkeypatch.setattr(cuda_gemv, "_raw_stream", lambda dev: STREAM)
    monkeypatch.setattr(cuda_gemv, "_applies", lambda args: args.gemv and args.impls is not None)
    monkeypatch.setattr(module, "_eager_launch", lambda args: CudaGemv(args) if args.gemv else None)
    monkeypatch.setattr(siblings, "FUSED_DEVICE_TYPES", {"cpu", "cuda"})
    return seen


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_layer_launch_gives_the_general_route_bits(
    launches: list[str], nested: bool, dtype: torch.dtype
) -> None:
    layer, _, _ = make_layer(48, 128, nested=nested, blocksize=64, compute_dtype=dtype)
    assert isinstance(layer._eager_gemv, CudaGemv)
    with torch.no_grad():
        for shape in [(1, 128), (1, 1, 128), (3, 128), (2, 4, 128)]:
            x = torch.randn(shape).to(dtype)
            assert torch.equal(layer(x), ops.linear(x, layer._kernel_args, None)), shape
    assert launches == ["single"] * 4


def test_layer_launch_declines_what_it_cannot_take(launches: list[str]) -> None:
    layer, _, _ = make_layer(48, 128, blocksize=64)
    for x in inputs_an_eager_launch_declines(128):
        assert layer._eager_gemv(x) is None, (x.shape, x.dtype, x.device)
    assert launches == []


def test_layer_launch_follows_new_codes_and_copies(launches: list[str]) -> None:
    layer, _, _ = make_layer(48, 128, blocksize=64)
    x = torch.randn(1, 128).to(torch.bfloat16)
    with torch.no_grad():
        want = layer(x)
        twin = copy.deepcopy(layer)  # its launch points at the copy's tensors: the original may be freed
        assert twin._eager_gemv._consts[1] == twin._kernel_args.packed.data_ptr()
        assert twin._eager_gemv._consts[1] != layer._eager_gemv._consts[1]
        del layer
        gc.collect()
        assert torch.equal(twin(x), want)
        codes = twin.weight.data
        twin.weight.data = torch.zeros_like(codes)  # codes replaced under the weight: prepared again
        assert twin._eager_gemv._consts[1] == codes.data_ptr()
        zeros = twin(x)  # the general route, preparing the new codes
        assert twin._eager_gemv._consts[1] == twin.weight.data_ptr()
        assert torch.equal(zeros, ops.linear(x, twin._kernel_args, None))
        assert not torch.equal(zeros, want)
        assert torch.equal(twin(x), zeros)
    assert launches == ["single"] * 3


@pytest.fixture
def models(our_folder: Path, launches: list[str]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The tiny Llama grouped and each layer alone, loaded with the adapters in place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grouped, alone = load_quantized(our_folder), load_quantized(our_folder)
    siblings.ungroup_siblings(alone)
    return grouped, alone


@pytest.mark.parametrize("tokens", [1, 3])
def test_group_launch_gives_each_layer_alone_bits(models, launches: list[str], tokens: int) -> None:
    grouped, alone = models
    ids = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64]])[:, :tokens]
    with torch.no_grad():
        want = alone(ids).logits
        del launches[:]
        got = grouped(ids).logits
    layers = len(grouped.model.layers)
    assert sorted(launches) == sorted(["multi3", "multi2"] * layers + ["single"] * 2 * layers)
    assert torch.equal(got, want)  # CPU kernels: each row as the single launch computes it
    assert all(
        isinstance(layer.self_attn.q_proj._siblings._eager, CudaGemvGroup) for layer in grouped.model.layers
    )


def test_group_launch_made_again_for_new_arguments_and_skipped_for_training(
    models, launches: list[str]
) -> None:
    grouped, alone = models
    ids = torch.tensor([[1, 5, 9]])
    attn = grouped.model.layers[0].self_attn
    with torch.no_grad():
        grouped(ids)
        before = attn.q_proj._siblings._eager
        attn.k_proj.weight.data = attn.k_proj.weight.data.clone()  # k prepared again on its next call
        attn.k_proj._prepare()
        # the group's launch is dropped with the old arguments (a model moved off the GPU frees them)
        assert attn.q_proj._siblings._eager is None
        assert attn.q_proj._siblings._eager_for == ()
        del launches[:]
        assert torch.equal(grouped(ids).logits, alone(ids).logits)
    after = attn.q_proj._siblings._eager
    assert after is not before
    assert after.args[1] is attn.k_proj._kernel_args
    assert launches.count("multi3") == len(grouped.model.layers)
    del launches[:]
    x = torch.randn(1, attn.q_proj.in_features).to(torch.bfloat16).requires_grad_()
    attn.q_proj(x).sum().backward()  # training: each layer's own autograd path, no fast launch
    assert launches == []
    assert x.grad is not None


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_groups_make_their_launch_from_their_own_layers(models, launches: list[str], how: str) -> None:
    grouped, alone = models
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        grouped(ids)  # every group made its launch
        twin = copy.deepcopy(grouped) if how == "deepcopy" else pickle.loads(pickle.dumps(grouped))
        groups = [m._siblings for m in twin.modules() if getattr(m, "_siblings", None) is not None]
        assert groups
        assert all(g._eager is None for g in groups)
        assert torch.equal(twin(ids).logits, alone(ids).logits)
    for g in groups:
        assert all(a is m._kernel_args for a, m in zip(g._eager.args, g.members, strict=True))
