"""quantize_4bit: the same bytes as formats.reference on every ISA path and thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_helpers import DTYPES, as_f32_numpy, edge_case_input

from converter.kernels import bnb4bit as kernels
from formats import reference
from formats.quant_types import BLOCKSIZES, QuantType

QUANT_TYPES = (QuantType.NF4, QuantType.FP4)


def _sizes(blocksize: int) -> list[int]:
    return [1, 2, 3, 63, 65, 1001, blocksize, 3 * blocksize + 17, 5 * blocksize - 1]


def _assert_same(packed, absmax, ref_packed, ref_absmax, what: str) -> None:
    got = packed.numpy()
    bad = np.flatnonzero(got != ref_packed)
    assert bad.size == 0, f"{what}: {bad.size} packed bytes differ, first at {bad[:5]}"
    assert absmax.numpy().view(np.uint32).tolist() == ref_absmax.view(np.uint32).tolist(), f"{what}: absmax"


@pytest.mark.parametrize("quant_type", QUANT_TYPES, ids=lambda q: q.label)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_equals_reference_on_every_path(quant_type, dtype, blocksize):
    for seed, n in enumerate(_sizes(blocksize)):
        x = edge_case_input(n, blocksize, dtype, seed)
        ref_packed, ref_absmax = reference.quantize_4bit(as_f32_numpy(x), blocksize, quant_type)
        for isa in kernels.cpu_isas():
            for threads in (1, 2, 7):
                packed, absmax = kernels.quantize_4bit(
                    x, blocksize=blocksize, quant_type=quant_type, isa=isa, threads=threads
                )
                _assert_same(packed, absmax, ref_packed, ref_absmax, f"n={n} isa={isa} threads={threads}")


@pytest.mark.parametrize("quant_type", QUANT_TYPES, ids=lambda q: q.label)
def test_large_tensor_paths_agree(quant_type):
    # Over 2**24 elements the AVX-512 path streams its stores past the cache: still the same bytes.
    n = (1 << 24) + 77
    x = torch.randn(n, dtype=torch.bfloat16)
    ref_packed, ref_absmax = kernels.quantize_4bit(x, blocksize=64, quant_type=quant_type, isa="scalar")
    head = 3 * 1024 * 1024  # and the scalar path itself against the numpy reference, on a prefix
    np_packed, np_absmax = reference.quantize_4bit(as_f32_numpy(x[:head]), 64, quant_type)
    _assert_same(ref_packed[: head // 2], ref_absmax[: head // 64], np_packed, np_absmax, "scalar")
    for isa in kernels.cpu_isas():
        packed, absmax = kernels.quantize_4bit(x, blocksize=64, quant_type=quant_type, isa=isa)
        assert torch.equal(packed, ref_packed), f"isa={isa}"
        assert torch.equal(absmax.view(torch.int32), ref_absmax.view(torch.int32)), f"isa={isa}"


def test_known_bytes():
    # First element in the high nibble; all-zero block -> NF4 0x77; odd tail padded with the zero code.
    x = torch.tensor([1.0, -1.0] + [0.0] * 62 + [0.0] * 64 + [0.5], dtype=torch.float32)
    packed, absmax = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4)
    assert packed[0].item() == 0xF0
    assert packed[32:64].tolist() == [0x77] * 32
    assert packed[64].item() == 0xF7
    assert absmax.tolist() == [1.0, 0.0, 0.5]
    packed, _ = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.FP4)
    assert packed[0].item() == 0x3B  # +1.0 -> 0b0011, -1.0 -> 0b1011
    assert packed[64].item() == 0x30


def test_ties_go_to_the_lower_code():
    from formats import codebooks

    t = torch.tensor([1.0, *codebooks.NF4_THRESHOLDS], dtype=torch.float32)
    packed, _ = kernels.quantize_4bit(t, blocksize=32, quant_type=QuantType.NF4)
    codes = reference.unpack_codes(packed.numpy(), t.numel())
    assert codes.tolist() == [15, *range(15)]


def test_empty_tensor():
    packed, absmax = kernels.quantize_4bit(torch.empty(0), blocksize=64, quant_type=QuantType.NF4)
    assert packed.numel() == 0
    assert absmax.numel() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_input_raises(bad, dtype):
    x = torch.randn(1000).to(dtype)
    x[517] = bad
    for isa in kernels.cpu_isas():
        with pytest.raises(
            kernels.NonFiniteInputError, match=r"input contains NaN or Inf \(in 1 of 16 blocks"
        ):
            kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4, isa=isa)
    assert issubclass(kernels.NonFiniteInputError, ValueError)


def test_bad_arguments_have_clear_errors():
    x = torch.randn(8, 64)
    with pytest.raises(ValueError, match="blocksize 48 is not supported"):
        kernels.quantize_4bit(x, blocksize=48, quant_type=QuantType.NF4)
    with pytest.raises(ValueError, match=r"x is not contiguous .* call \.contiguous\(\)"):
        kernels.quantize_4bit(x.t(), blocksize=64, quant_type=QuantType.NF4)
    with pytest.raises(ValueError, match=r"x has dtype float64: expected float32, float16, bfloat16"):
        kernels.quantize_4bit(x.double(), blocksize=64, quant_type=QuantType.NF4)
    with pytest.raises(TypeError, match=r"quant_type must be a formats\.quant_types\.QuantType"):
        kernels.quantize_4bit(x, blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match="unknown isa 'sse'"):
        kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4, isa="sse")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4, threads=0)
