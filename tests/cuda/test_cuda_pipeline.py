"""converter.cuda_pipeline: overlapped GPU quantization returns the CPU path's bytes, in order."""

from __future__ import annotations

import pytest
import torch

from converter import cuda_pipeline, kernels
from formats.quant_types import QuantType


def _tensors():
    g = torch.Generator().manual_seed(3)
    shapes = [(256, 512), (1, 1), (3, 7), (1000, 333), (4096, 1024), (17,)]
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    out = []
    for i, s in enumerate(shapes):
        x = torch.randn(s, generator=g).to(dtypes[i % 3])
        out.append((f"layer{i}.weight", x))
    out.append(("zeros.weight", torch.zeros(64, 64, dtype=torch.bfloat16)))
    return out


def _expected(x, quant_type, blocksize, nested):
    packed, absmax = kernels.quantize_4bit(x.contiguous(), blocksize=blocksize, quant_type=quant_type)
    return packed, absmax, kernels.quantize_nested(absmax) if nested else None


def _check(results, quant_type, blocksize, nested):
    items = _tensors()
    assert [name for name, _ in results] == [name for name, _ in items]
    for (_, r), (_, x) in zip(results, items, strict=True):
        packed, absmax, nest = _expected(x, quant_type, blocksize, nested)
        assert torch.equal(r.packed.view(-1), packed)
        assert torch.equal(r.absmax, absmax)
        if nested:
            assert torch.equal(r.nested[0], nest[0])
            assert torch.equal(r.nested[1], nest[1])
            assert r.nested[2] == nest[2]
        else:
            assert r.nested is None


def test_cpu_fallback_says_why_and_gives_the_cpu_bytes(monkeypatch):
    from converter import kernels_cuda

    monkeypatch.setattr(kernels_cuda, "cuda_status", lambda: (False, "no CUDA device found"))
    q = cuda_pipeline.make_quantizer(QuantType.NF4, 64, nested=True)
    assert isinstance(q, cuda_pipeline.CpuQuantizer)
    assert "no CUDA device found" in q.fallback_reason
    assert "CPU" in q.fallback_reason
    _check(list(q.quantize_many(_tensors())), QuantType.NF4, 64, True)


@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", [QuantType.NF4, QuantType.FP4], ids=lambda q: q.label)
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cuda_quantizer_matches_cpu_in_order(quant_type, nested, depth):
    q = cuda_pipeline.make_quantizer(quant_type, 64, nested=nested)
    assert isinstance(q, cuda_pipeline.CudaQuantizer)
    assert q.fallback_reason == ""
    results = list(q.quantize_many(_tensors(), depth=depth))
    _check(results, quant_type, 64, nested)
    assert q.stats.tensors == len(results)
    assert q.stats.seconds_kernels > 0


@pytest.mark.cuda
def test_cuda_quantizer_names_a_tensor_with_nan():
    q = cuda_pipeline.CudaQuantizer(QuantType.NF4, 64, nested=True)
    bad = torch.randn(100, 100)
    bad[5, 5] = float("nan")
    items = [("ok.weight", torch.randn(10, 10)), ("bad.weight", bad)]
    with pytest.raises(kernels.NonFiniteInputError, match=r"bad\.weight"):
        list(q.quantize_many(items))
