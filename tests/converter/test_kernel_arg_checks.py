"""converter.kernels.bnb4bit and converter.kernels.bnb4bit_cuda check dequantize / GEMV arguments with one
shared helper.

Runs without a GPU: bad arguments are refused by the shared checks before any device is needed, so
both modules must give the same exception and message; good arguments reach kernels_cuda's launch,
whose pointers are checked here against a recording stand-in for the CUDA binding.
"""

from __future__ import annotations

import pytest
import torch

from converter.kernels import bnb4bit as kernels
from converter.kernels import bnb4bit_cuda as kernels_cuda
from formats import codebooks
from formats.quant_types import QuantType

OUT_F, IN_F, BS = 8, 128, 64
N = OUT_F * IN_F
NB = N // BS


def _record(nested: bool):
    w = torch.randn(OUT_F, IN_F)
    packed, absmax = kernels.quantize_4bit(w, blocksize=BS, quant_type=QuantType.NF4)
    qmap = torch.tensor(QuantType.NF4.codebook, dtype=torch.float32)
    if not nested:
        return packed, absmax, qmap, None
    codes, nabs, off = kernels.quantize_nested(absmax)
    return packed, None, qmap, kernels.NestedAbsmax(codes, nabs, off, torch.tensor(codebooks.DYNAMIC8))


def _gemv_kwargs(nested_record: bool, **change):
    packed, absmax, qmap, nest = _record(nested_record)
    args = {
        "x": torch.randn(2, IN_F, dtype=torch.bfloat16),
        "packed": packed,
        "absmax": absmax,
        "out_features": OUT_F,
        "in_features": IN_F,
        "blocksize": BS,
        "quant_map": qmap,
        "nested": nest,
    }
    args.update(change)
    return args


def _deq_kwargs(**change):
    packed, absmax, qmap, _ = _record(False)
    args = {
        "packed": packed,
        "absmax": absmax,
        "n": N,
        "blocksize": BS,
        "quant_map": qmap,
        "out_dtype": torch.bfloat16,
        "out": None,
    }
    args.update(change)
    return args


def _raised(fn, kwargs):
    kwargs = dict(kwargs)
    positional = [kwargs.pop(k) for k in ("x", "packed", "absmax") if k in kwargs]
    with pytest.raises((ValueError, TypeError)) as exc:
        fn(*positional, **kwargs)
    return type(exc.value), str(exc.value)


GEMV_BAD = {
    "batch 9": dict(x=torch.randn(9, IN_F)),
    "x shape": dict(x=torch.randn(2, IN_F - 1)),
    "x dtype": dict(x=torch.randn(2, IN_F, dtype=torch.float64)),
    "x not contiguous": dict(x=torch.randn(IN_F, 2).t()),
    "in_features": dict(x=torch.randn(2, 96), in_features=96),
    "blocksize": dict(blocksize=48),
    "packed size": dict(packed=torch.zeros(N // 2 - 1, dtype=torch.uint8)),
    "quant_map size": dict(quant_map=torch.zeros(15)),
    "both absmax and nested": dict(nested=_record(True)[3]),
    "absmax size": dict(absmax=torch.ones(NB + 1)),
    "absmax dtype": dict(absmax=torch.ones(NB, dtype=torch.float16)),
}
NESTED_BAD = {
    "codes size": lambda n: n._replace(codes=n.codes[:-1]),
    "nested_absmax dtype": lambda n: n._replace(nested_absmax=n.nested_absmax.half()),
    "nested_map size": lambda n: n._replace(nested_map=n.nested_map[:255]),
}
DEQ_BAD = {
    "n": dict(n=-1),
    "packed size": dict(packed=torch.zeros(N // 2 + 1, dtype=torch.uint8)),
    "absmax size": dict(absmax=torch.ones(NB - 1)),
    "no absmax": dict(absmax=None),
    "quant_map dtype": dict(quant_map=torch.zeros(16, dtype=torch.float64)),
    "out_dtype": dict(out_dtype=torch.int8),
    "out size": dict(out=torch.empty(N - 1, dtype=torch.bfloat16)),
    "out on meta": dict(out=torch.empty(N, dtype=torch.bfloat16, device="meta")),
}


@pytest.mark.parametrize("case", GEMV_BAD, ids=str)
def test_gemv_refusals_are_the_same_on_both_modules(case: str) -> None:
    kwargs = _gemv_kwargs(False, **GEMV_BAD[case])
    assert _raised(kernels_cuda.gemv_4bit, kwargs) == _raised(kernels.gemv_4bit, kwargs)


@pytest.mark.parametrize("case", NESTED_BAD, ids=str)
def test_gemv_nested_refusals_are_the_same_on_both_modules(case: str) -> None:
    kwargs = _gemv_kwargs(True)
    kwargs["nested"] = NESTED_BAD[case](kwargs["nested"])
    kind, msg = _raised(kernels.gemv_4bit, kwargs)
    assert (kind, msg) == _raised(kernels_cuda.gemv_4bit, kwargs)
    assert msg.startswith("nested.")


@pytest.mark.parametrize("case", DEQ_BAD, ids=str)
def test_dequantize_refusals_are_the_same_on_both_modules(case: str) -> None:
    kwargs = _deq_kwargs(**DEQ_BAD[case])
    assert _raised(kernels_cuda.dequantize_4bit, kwargs) == _raised(kernels.dequantize_4bit, kwargs)


def test_checked_cpu_tensors_are_refused_by_the_cuda_launch() -> None:
    kwargs = _deq_kwargs()
    with pytest.raises(ValueError, match=r"^packed is on cpu: the CUDA kernels take CUDA tensors$"):
        kernels_cuda.dequantize_4bit(kwargs.pop("packed"), kwargs.pop("absmax"), **kwargs)


class _Binding:
    """Stands in for converter._kernels' CUDA functions: records each call's arguments."""

    def __init__(self) -> None:
        self.calls: dict[str, tuple] = {}

    def __getattr__(self, name: str):
        if not name.startswith("cuda_"):
            raise AttributeError(name)
        return lambda *args: self.calls.__setitem__(name, args)


@pytest.fixture
def binding(monkeypatch: pytest.MonkeyPatch) -> _Binding:
    fake = _Binding()
    monkeypatch.setattr(kernels_cuda, "_kernels", fake)
    monkeypatch.setattr(kernels_cuda, "_require", lambda t, name: 0)
    monkeypatch.setattr(kernels_cuda, "current_stream", lambda device: 77)
    return fake


@pytest.mark.parametrize("nested", [False, True])
def test_gemv_launch_passes_the_checked_pointers(nested: bool, binding: _Binding) -> None:
    packed, absmax, qmap, nest = _record(nested)
    x = torch.randn(2, IN_F, dtype=torch.bfloat16)
    y = kernels_cuda.gemv_4bit(
        x,
        packed,
        absmax,
        out_features=OUT_F,
        in_features=IN_F,
        blocksize=BS,
        quant_map=qmap,
        nested=nest,
        variant=3,
    )
    assert y.shape == (2, OUT_F)
    assert y.dtype == torch.bfloat16
    expected_nested = (
        (nest.codes.data_ptr(), nest.nested_absmax.data_ptr(), nest.offset, nest.nested_map.data_ptr())
        if nested
        else (0, 0, 0.0, 0)
    )
    assert binding.calls["cuda_gemv_4bit"] == (
        0,
        x.data_ptr(),
        2,
        2,
        OUT_F,
        IN_F,
        BS,
        packed.data_ptr(),
        0 if nested else absmax.data_ptr(),
        *expected_nested,
        qmap.data_ptr(),
        y.data_ptr(),
        77,
        3,
        0,  # no scratch: only the stream kernel's K slices use one
    )


@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_launch_passes_the_checked_pointers(nested: bool, binding: _Binding) -> None:
    packed, absmax, qmap, nest = _record(nested)
    out = torch.empty(N, dtype=torch.float16)
    got = kernels_cuda.dequantize_4bit(
        packed, absmax, n=N, blocksize=BS, quant_map=qmap, out_dtype=torch.float16, out=out, nested=nest
    )
    assert got is out
    args = binding.calls["cuda_dequantize_4bit"]
    expected_nested = (
        (nest.codes.data_ptr(), nest.nested_absmax.data_ptr(), nest.offset, nest.nested_map.data_ptr())
        if nested
        else (0, 0, 0.0, 0)
    )
    assert args == (
        0,
        packed.data_ptr(),
        N,
        BS,
        0 if nested else absmax.data_ptr(),
        *expected_nested,
        qmap.data_ptr(),
        1,
        out.data_ptr(),
        77,
    )
