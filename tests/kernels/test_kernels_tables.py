"""The C++ tables == formats.codebooks == bitsandbytes, bit for bit; the extension's identity."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import converter
from converter import _kernels
from converter.kernels import bnb4bit as kernels
from formats import codebooks
from formats.quant_types import QuantType


def _hex(values) -> list[str]:
    return [float(np.float32(v)).hex() for v in values]


@pytest.mark.parametrize(
    ("key", "python_table"),
    [
        ("nf4", codebooks.NF4),
        ("nf4_thresholds", codebooks.NF4_THRESHOLDS),
        ("fp4", codebooks.FP4),
        ("fp4_thresholds", codebooks.FP4_THRESHOLDS),
        ("dynamic8", codebooks.DYNAMIC8),
        ("dynamic8_midpoints", codebooks.DYNAMIC8_MIDPOINTS),
    ],
)
def test_cpp_tables_equal_python_tables(key, python_table):
    cpp = _kernels.tables()[key]
    assert len(cpp) == len(python_table)
    assert _hex(cpp) == _hex(python_table)
    # float.hex does not tell -0.0 from +0.0 for a zero: compare the sign bits too.
    assert [np.signbit(np.float32(v)) for v in cpp] == [np.signbit(np.float32(v)) for v in python_table]


def test_cpp_scalars_equal_python():
    t = _kernels.tables()
    assert list(t["fp4_tree_codes"]) == list(codebooks.FP4_TREE_CODES)
    assert t["fp4_sign_bit"] == codebooks.FP4_SIGN_BIT
    assert t["nf4_zero_code"] == codebooks.NF4_ZERO_CODE
    assert t["fp4_zero_code"] == codebooks.FP4_ZERO_CODE
    assert float(t["tiny"]).hex() == float(np.float32(1e-38)).hex()


def test_tables_equal_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    t = _kernels.tables()
    assert _hex(t["nf4"]) == _hex(bnb_f.get_4bit_type("nf4", device="cpu").tolist())
    assert _hex(t["fp4"]) == _hex(bnb_f.get_4bit_type("fp4", device="cpu").tolist())
    dynamic = bnb_f.create_dynamic_map(signed=True).to("cpu")
    assert _hex(t["dynamic8"]) == _hex(dynamic.tolist())
    digest = hashlib.sha256(np.asarray(t["dynamic8"], dtype="<f4").tobytes()).hexdigest()
    assert digest == codebooks.DYNAMIC8_SHA256


def test_version_matches_package():
    assert _kernels.__version__ == converter.__version__


def test_backends_report_cpu():
    backends = kernels.available_backends()
    assert backends["cpu"]["isa"][0] == "scalar"
    assert backends["cpu"]["threads"] >= 1
    assert set(kernels.cpu_isas()) <= {"scalar", "avx2", "avx512", "avx512bf16"}
    if not _kernels.has_cuda_build():
        assert "cuda" not in backends


def test_other_devices_are_refused_with_the_device_named():
    x = torch.empty(128, device="meta")
    with pytest.raises(ValueError, match="x is on meta: only CPU and CUDA tensors are supported"):
        kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4)


@pytest.mark.skipif(_kernels.has_cuda_build(), reason="this build has the CUDA backend")
def test_cuda_dispatch_without_a_cuda_build_says_how_to_get_one():
    kernels._cuda_module.cache_clear()
    with pytest.raises(RuntimeError, match=r"no CUDA backend: reinstall it on a machine with nvcc"):
        kernels._cuda_module()


def test_float32_tables_equal_numpy_float32_arithmetic():
    """formats.codebooks derives its thresholds in pure Python (struct's float32 rounding) so that importing
    it does not import numpy; they are the float32 arithmetic numpy does, sign of zero included."""

    def numpy_midpoints(values):
        c = np.asarray(values, dtype=np.float32)
        return [float(m) for m in ((c[:-1] + c[1:]) * np.float32(0.5)).astype(np.float32)]

    for table in (codebooks.NF4, codebooks.FP4, codebooks.DYNAMIC8):
        got = codebooks._f32_midpoints(table)
        assert _hex(got) == _hex(numpy_midpoints(table))
        assert [np.signbit(v) for v in got] == [np.signbit(v) for v in numpy_midpoints(table)]
    assert codebooks.NF4_THRESHOLDS == tuple(numpy_midpoints(codebooks.NF4))
    assert codebooks.DYNAMIC8_MIDPOINTS == tuple(numpy_midpoints(codebooks.DYNAMIC8))
    raw = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
    assert codebooks.FP4_THRESHOLDS == tuple(float(np.float32(v)) for v in raw)
    for v in (0.1, -0.1, 1e-45, 3.4028234663852886e38, -0.0, 1 / 3, 2.0**-149 * 0.5):
        assert _hex([codebooks.f32(v)]) == _hex([float(np.float32(v))])
        assert np.signbit(codebooks.f32(v)) == np.signbit(np.float32(v))
