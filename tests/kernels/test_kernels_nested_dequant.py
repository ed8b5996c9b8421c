"""quantize_nested / dequantize_nested / dequantize_4bit == formats.reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from error_bounds import U32, gamma, underflow
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import DTYPES, as_f32_numpy, codebook_tensor, edge_case_input

from converter.kernels import bnb4bit as kernels
from formats import codebooks, reference
from formats.quant_types import BLOCKSIZES, QuantType


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()


@pytest.mark.parametrize("nb", [1, 2, 255, 256, 257, 1023, 1024, 1025, 5000, 70001])
def test_quantize_nested_equals_reference(nb):
    rng = np.random.default_rng(nb)
    absmax = (np.abs(rng.standard_normal(nb)) * rng.uniform(0.01, 3.0)).astype(np.float32)
    if nb > 300:
        absmax[256:512] = absmax[256]  # a constant nested block: centered values all equal
    ref_codes, ref_nested, ref_offset = reference.quantize_nested(absmax)
    for isa in kernels.cpu_isas():
        for threads in (1, 2, 7):
            codes, nested, offset = kernels.quantize_nested(
                torch.from_numpy(absmax), isa=isa, threads=threads
            )
            assert np.array_equal(codes.numpy(), ref_codes), f"isa={isa} threads={threads}"
            assert np.array_equal(nested.numpy().view(np.uint32), ref_nested.view(np.uint32))
            assert float(offset).hex() == float(ref_offset).hex()


def test_quantize_nested_empty():
    codes, nested, offset = kernels.quantize_nested(torch.empty(0))
    assert (codes.numel(), nested.numel(), offset) == (0, 0, 0.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_quantize_nested_non_finite_raises(bad):
    absmax = torch.rand(3000)
    absmax[2047] = bad
    for isa in kernels.cpu_isas():
        with pytest.raises(kernels.NonFiniteInputError, match="absmax contains NaN or Inf"):
            kernels.quantize_nested(absmax, isa=isa)


@pytest.mark.parametrize("nb", [1, 300, 70001])
def test_dequantize_nested_equals_reference(nb):
    rng = np.random.default_rng(nb)
    codes = rng.integers(0, 256, nb, dtype=np.uint8)
    nested = rng.uniform(0.1, 2.0, -(-nb // 256)).astype(np.float32)
    offset = float(np.float32(0.7351))
    nested_map = np.asarray(codebooks.DYNAMIC8, dtype=np.float32)
    nested_map[0] = -1.0  # a bnb <= 0.49 CPU checkpoint: the stored map is used, not a built-in one
    ref = reference.dequantize_nested(codes, nested, offset, nested_map)
    for threads in (1, 2, 7):
        got = kernels.dequantize_nested(
            torch.from_numpy(codes),
            torch.from_numpy(nested),
            offset,
            torch.from_numpy(nested_map),
            threads=threads,
        )
        assert np.array_equal(got.numpy().view(np.uint32), ref.view(np.uint32))


def _reference_cast(w: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.float32:
        return w.view(np.int32)
    if dtype == torch.bfloat16:
        return reference.f32_to_bf16_bits(w).view(np.int16)
    with np.errstate(over="ignore"):  # overflow to inf is the expected rounding
        return w.astype(np.float16).view(np.int16)  # numpy's f32 -> f16 rounds to nearest even


@pytest.mark.parametrize("quant_type", [QuantType.NF4, QuantType.FP4], ids=lambda q: q.label)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_dequantize_equals_reference_cast(quant_type, out_dtype, blocksize):
    for seed, n in enumerate([1, 3, 65, 1001, 5 * blocksize + 33]):
        x = edge_case_input(n, blocksize, torch.float32, seed)
        packed, absmax = kernels.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        qm = codebook_tensor(quant_type)
        ref = reference.dequantize_4bit(packed.numpy(), absmax.numpy(), n, blocksize, qm.numpy())
        expected = _reference_cast(ref, out_dtype)
        for isa in kernels.cpu_isas():
            for threads in (1, 2, 7):
                out = kernels.dequantize_4bit(
                    packed,
                    absmax,
                    n=n,
                    blocksize=blocksize,
                    quant_map=qm,
                    out_dtype=out_dtype,
                    isa=isa,
                    threads=threads,
                )
                assert np.array_equal(_bits(out), expected), f"n={n} isa={isa} threads={threads}"


def test_dequantize_f16_rounding_edges():
    # Products that land on f16 ties, subnormals, the overflow boundary and beyond: every path == numpy.
    values = np.asarray(
        [
            65504.0,
            65519.99,
            65520.0,
            1e6,
            2.0**-24,
            2.0**-25,
            3 * 2.0**-26,
            2.0**-14 * (1 - 2.0**-12),
            1 + 2.0**-11,
            1 + 3 * 2.0**-11,
            6.1e-5,
            -(2.0**-25),
            -65520.0,
            0.0,
        ],
        dtype=np.float32,
    )
    n = 64
    qm = torch.zeros(16)
    qm[1] = 1.0
    codes = np.zeros(n, dtype=np.uint8)
    codes[: values.size] = 1
    packed = torch.from_numpy(((codes[0::2] << 4) | codes[1::2]).astype(np.uint8))
    for value in values:
        absmax = torch.tensor([value], dtype=torch.float32)
        products = (qm.numpy()[codes] * np.float32(value)).astype(np.float32)  # 0 * negative = -0.0
        with np.errstate(over="ignore"):
            expected = products.astype(np.float16).view(np.int16)
        for isa in kernels.cpu_isas():
            out = kernels.dequantize_4bit(
                packed, absmax, n=n, blocksize=64, quant_map=qm, out_dtype=torch.float16, isa=isa
            )
            assert np.array_equal(_bits(out), expected), f"value={value!r} isa={isa}"


def test_dequantize_writes_into_out_and_checks_sizes():
    x = torch.randn(1000)
    packed, absmax = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4)
    out = torch.empty(1000, dtype=torch.bfloat16)
    got = kernels.dequantize_4bit(
        packed,
        absmax,
        n=1000,
        blocksize=64,
        quant_map=codebook_tensor(QuantType.NF4),
        out_dtype=torch.bfloat16,
        out=out,
    )
    assert got is out
    with pytest.raises(ValueError, match=r"absmax has 15 elements \(shape \(15,\)\), expected 16"):
        kernels.dequantize_4bit(
            packed,
            absmax[:15],
            n=1000,
            blocksize=64,
            quant_map=codebook_tensor(QuantType.NF4),
            out_dtype=torch.float32,
        )


def _code_gap_terms(codebook, thresholds) -> tuple[float, float]:
    """(largest half gap between neighbouring code values, largest distance of a decision threshold
    from the true midpoint it stands for), in float64. FP4 decides on |s| (sign apart)."""
    values = np.asarray(codebook, dtype=np.float64)
    if len(thresholds) < len(values) - 1:  # FP4: thresholds on the magnitude
        values = np.unique(np.abs(values))
    values = np.sort(values)
    mids = (values[1:] + values[:-1]) / 2
    return float(np.max(np.diff(values))) / 2, float(
        np.max(np.abs(np.asarray(thresholds, np.float64) - mids))
    )


_GAP_TERMS = {
    QuantType.NF4: _code_gap_terms(codebooks.NF4, codebooks.NF4_THRESHOLDS),
    QuantType.FP4: _code_gap_terms(codebooks.FP4, codebooks.FP4_THRESHOLDS),
}


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=3000),
    blocksize=st.sampled_from(BLOCKSIZES),
    quant_type=st.sampled_from([QuantType.NF4, QuantType.FP4]),
)
def test_round_trip_error_is_bounded_by_half_the_largest_code_gap(values, blocksize, quant_type):
    x = torch.tensor(values, dtype=torch.float32)
    packed, absmax = kernels.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    w = kernels.dequantize_4bit(
        packed,
        absmax,
        n=x.numel(),
        blocksize=blocksize,
        quant_map=codebook_tensor(quant_type),
        out_dtype=torch.float32,
    )
    per_element_absmax = absmax.double().repeat_interleave(blocksize)[: x.numel()]
    # Blocks with absmax below 1e-38 are scaled by 1/1e-38 (the clamp), so s stays below 1 and only
    # |x - w| <= absmax holds there.
    # Elsewhere, with a = absmax: s = fl(x * fl(1/a)) is within gamma_2 of x/a (|x/a| <= 1); the code
    # picked is the nearest to s up to the thresholds' own distance from the true midpoints (thr);
    # decoding fl(code * a) adds u * a, or half a subnormal where it underflows. So
    # |x - w| <= a * (half_gap + thr + gamma_2 + u) + eta.
    tiny = float(np.float32(1e-38))
    half_gap, thr = _GAP_TERMS[quant_type]
    rel = torch.where(per_element_absmax >= tiny, half_gap + thr + gamma(2) + U32, 1.0 + U32)
    bound = per_element_absmax * rel + underflow(torch.float32)
    assert bool(((x.double() - w.double()).abs() <= bound).all())
    assert np.array_equal(absmax.numpy(), reference.quantize_4bit(as_f32_numpy(x), blocksize, quant_type)[1])
