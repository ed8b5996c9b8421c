"""The quality statistics kernel against a float64 numpy reference, on every CPU path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from converter import _kernels
from converter.kernels import bnb4bit as kernels
from converter.record.quality import Codes, count_nonfinite, measure
from formats import codebooks
from formats.quant_types import QuantType

U = 2.0**-24  # float32 unit roundoff

CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def gamma(k: int) -> float:
    return k * U / (1 - k * U)


def reference(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, qt: QuantType, blocksize: int):
    """sum x^2, sum e^2, max |e| in float64, v = the float32 values dequantize_4bit gives."""
    qmap = torch.from_numpy(codebooks.as_f32(qt.codebook))
    v = kernels.dequantize_4bit(
        packed, absmax, n=x.numel(), blocksize=blocksize, quant_map=qmap, out_dtype=torch.float32
    )
    xd = x.float().double().numpy()
    e = xd - v.double().numpy()
    return float(np.sum(xd * xd)), float(np.sum(e * e)), float(np.max(np.abs(e)))


def paths() -> list[str]:
    return ["scalar", *(["avx2"] if "avx2" in kernels.cpu_isas() else [])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "blocksize"), [(4096 * 3 + 17, 64), (1000, 32), (70_001, 4096), (129, 128)])
@pytest.mark.parametrize("qt", [QuantType.NF4, QuantType.FP4])
def test_stats_match_float64_reference(dtype: torch.dtype, n: int, blocksize: int, qt: QuantType) -> None:
    g = torch.Generator().manual_seed(n + blocksize)
    x = (torch.randn(n, generator=g) * 0.02).to(dtype)
    packed, absmax = kernels.quantize_4bit(x, blocksize=blocksize, quant_type=qt)
    sx_ref, se_ref, m_ref = reference(x, packed, absmax, qt, blocksize)
    qmap = codebooks.as_f32(qt.codebook)
    for isa in paths():
        sx, se, m, bad = _kernels.quant_error_stats(
            x.data_ptr(), str(dtype).removeprefix("torch."), n, blocksize, packed.data_ptr(),
            absmax.data_ptr(), qmap.ctypes.data, isa, 3,
        )  # fmt: skip
        # Per block the kernel sums in float32 (at most `blocksize` terms, in lanes: <= gamma(blocksize)
        # relative for a sum of nonnegative terms), e = x - v is rounded once (e^2: 2u + u for the
        # square) and block sums are added in float64 (negligible).
        tol = gamma(blocksize) + 4 * U
        assert sx == pytest.approx(sx_ref, rel=tol)
        assert se == pytest.approx(se_ref, rel=tol)
        assert m == pytest.approx(m_ref, rel=2 * U)  # |x - v| rounded once to float32
        assert bad == 0


def test_stats_do_not_depend_on_threads() -> None:
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(1)).bfloat16()
    packed, absmax = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4)
    qmap = codebooks.as_f32(QuantType.NF4.codebook)
    results = {
        _kernels.quant_error_stats(
            x.data_ptr(),
            "bfloat16",
            x.numel(),
            64,
            packed.data_ptr(),
            absmax.data_ptr(),
            qmap.ctypes.data,
            "auto",
            threads,
        )
        for threads in (1, 2, 7)
    }
    assert len(results) == 1  # fixed groups of blocks, added in order


def test_nested_absmax_is_decoded_as_a_loader_does() -> None:
    x = torch.randn(64 * 1000, generator=torch.Generator().manual_seed(2)).bfloat16()
    packed, absmax = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4)
    q, nabs, offset = kernels.quantize_nested(absmax)
    nmap = torch.from_numpy(codebooks.as_f32(codebooks.DYNAMIC8))
    decoded = kernels.dequantize_nested(q, nabs, offset, nmap)
    sx_ref, se_ref, _ = reference(x, packed, decoded, QuantType.NF4, 64)
    got = measure("w", x, "BF16", Codes(packed, q, (q, nabs, offset)), QuantType.NF4, 64)
    tol = gamma(64) + 4 * U  # as in test_stats_match_float64_reference
    assert got.sum_x2 == pytest.approx(sx_ref, rel=tol)
    assert got.sum_e2 == pytest.approx(se_ref, rel=tol)
    assert got.rel_rmse == pytest.approx(math.sqrt(se_ref / sx_ref), rel=tol)
    assert got.snr_db == pytest.approx(10 * math.log10(sx_ref / se_ref), rel=1e-4)
    # The nested absmax differs from the exact one, so the error differs from the unnested error.
    plain = measure("w", x, "BF16", Codes(packed, absmax), QuantType.NF4, 64)
    assert plain.sum_e2 != got.sum_e2


def test_nonfinite_counts() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(3))
    packed, absmax = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4)
    broken = absmax.clone()
    broken[5] = math.inf  # a corrupt absmax: all 64 values of block 5 are non-finite
    broken[7] = math.nan
    got = measure("w", x, "F32", Codes(packed, broken), QuantType.NF4, 64)
    assert got.nonfinite == 128
    assert got.max_abs_err == math.inf
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        y = torch.zeros(100_003, dtype=dtype)
        y[[0, 17, 50_000, 100_002]] = torch.tensor([math.nan, math.inf, -math.inf, math.nan], dtype=dtype)
        y[1] = torch.finfo(dtype).max  # the largest finite value is not counted
        assert count_nonfinite(y, CODES[dtype]) == 4
        assert count_nonfinite(y.to(torch.int32), "I32") == 0


def test_zero_tensor_has_zero_error() -> None:
    x = torch.zeros(256)
    packed, absmax = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4)
    got = measure("w", x, "F32", Codes(packed, absmax), QuantType.NF4, 64)
    assert (got.sum_x2, got.sum_e2, got.rel_rmse, got.snr_db) == (0.0, 0.0, 0.0, None)


_INT8_THREADS_SCRIPT = """
import json, os, sys
import numpy as np
import torch

torch.set_num_threads(2)  # a team to wake whatever the CPU count: an OpenMP op starts its second thread
from converter.kernels import int8 as kernels_int8
from converter.record.int8_quality import measure_int8

x32 = np.random.default_rng(0).standard_normal((1536, 576), dtype=np.float32)
x32[3, 5] = 99840.0  # past fp16's range: its row is stored as SCB = inf and decodes to NaN
x = torch.from_numpy(x32)
q, scb = kernels_int8.quantize_int8(x, threads=1)
before = len(os.listdir("/proc/self/task"))
t = measure_int8("w", x, q, scb)
after = len(os.listdir("/proc/self/task"))
w = kernels_int8.dequantize_int8(q, scb, out_dtype=torch.float32, threads=1).double().numpy()
xd = x32.astype(np.float64)
e = np.where(np.isfinite(w), xd - w, xd)
print(json.dumps({"before": before, "after": after, "n": t.n, "nonfinite": t.nonfinite,
                  "sum_x2": [t.sum_x2, float(np.sum(xd * xd))], "sum_e2": [t.sum_e2, float(np.sum(e * e))],
                  "max": [t.max_abs_err, float(np.max(np.abs(e)))]}))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_int8_statistics_run_on_the_measuring_thread_alone() -> None:
    """The int8 statistics (quantization_report.json, verify --against) ran torch element-wise ops that
    woke torch's OpenMP team from the converter's background measuring thread for every weight, beside
    the kernel pool and the writer: an int8 conversion of SmolLM2-135M on 2 cores took 15-59 s instead
    of 3-5 s. They now run on the calling thread alone (no thread is started), with the same values as a
    float64 reference: sums of n non-negative float64 terms within gamma_n (u = 2^-53) in any order,
    the max exact, the NaN row's 576 elements counted as non-finite."""
    import json
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _INT8_THREADS_SCRIPT],
        capture_output=True,
        text=True,
        env=os.environ,
        check=True,
    ).stdout
    r = json.loads(out)
    assert r["after"] == r["before"], r
    assert r["n"] == 1536 * 576
    assert r["nonfinite"] == 576
    bound = r["n"] * 2.0**-53 / (1 - r["n"] * 2.0**-53)
    for got, want in (r["sum_x2"], r["sum_e2"]):
        assert abs(got - want) <= bound * want, (got, want)
    assert r["max"][0] == r["max"][1]


@pytest.mark.parametrize("code", ["F32", "F16", "BF16"])
def test_int8_error_stats_kernel_any_thread_count_and_dtype(code: str) -> None:
    """The extension's one-pass int8 statistics (the converter's measuring thread calls it with one
    thread): the same result for any thread count (float64 sums per row, added in row order), the
    values of a float64 reference over W = f32(f32(q * SCB) * f32(1/127)) (sums of n non-negative terms
    within gamma_n, the max exact; x - W is exact in float32, Sterbenz), a row stored as SCB = inf
    counted as lost (its x is the error) and non-finite."""
    from converter.kernels import int8_np

    rng = np.random.default_rng(1)
    x32 = rng.standard_normal((67, 300), dtype=np.float32)
    x32[5, 7] = 99840.0  # past fp16's range: SCB = inf, the row decodes to NaN
    if code == "F32":
        x = x32
    elif code == "F16":
        x32[5, 7] = 60000.0  # fp16 input holds no such value; a large one instead
        x = x32.astype(np.float16)
        x32 = x.astype(np.float32)
    else:
        x = (x32.view(np.uint32) >> 16).astype(np.uint16)  # truncated bf16 bits
        x32 = (x.astype(np.uint32) << 16).view(np.float32)
    q, scb = int8_np.quantize_int8(x, code, threads=1)
    one = int8_np.error_stats(x, code, q, scb, threads=1)
    assert int8_np.error_stats(x, code, q, scb, threads=3) == one
    w = int8_np.dequantize_int8(q, scb, threads=1).astype(np.float64)
    xd = x32.astype(np.float64)
    e = np.where(np.isfinite(w), xd - w, xd)
    n = x32.size
    bound = n * 2.0**-53 / (1 - n * 2.0**-53)
    sx, se, m, bad = one
    assert abs(sx - np.sum(xd * xd)) <= bound * np.sum(xd * xd)
    assert abs(se - np.sum(e * e)) <= bound * np.sum(e * e)
    assert m == np.max(np.abs(e))
    assert bad == (300 if code != "F16" else 0)
