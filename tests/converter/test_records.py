"""The torch-free CPU path (converter.kernels.bnb4bit_np + converter.record.records) gives the torch path's
bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter.kernels import bnb4bit as kernels
from converter.kernels import bnb4bit_np as kernels_np
from converter.record.records import record_entries
from converter.sources.mapped import as_torch
from formats.quant_types import QuantType
from formats.record import QuantizedTensor


def _bytes(v) -> bytes:
    if isinstance(v, torch.Tensor):
        return v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return bytes(memoryview(np.ascontiguousarray(v)).cast("B"))


@pytest.mark.parametrize("code", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("qt", [QuantType.NF4, QuantType.FP4])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float32"])
def test_numpy_record_equals_torch_record(code, qt, nested, storage):
    # 70 x 100 = 7000 elements: a partial last block of 64 and an even packed length divisible by 4
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((70, 100)).astype(np.float32))
    x = x.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[code])
    arr = x.view(torch.uint16).numpy() if code == "BF16" else x.numpy()
    dtype = str(x.dtype).removeprefix("torch.")

    packed_t, absmax_t = kernels.quantize_4bit(x, blocksize=64, quant_type=qt)
    nested_t = kernels.quantize_nested(absmax_t) if nested else None
    want = QuantizedTensor.from_kernel_outputs(
        "w.weight", (70, 100), dtype, qt, 64, packed_t, absmax_t, nested_t, storage
    ).state_dict()

    packed, absmax = kernels_np.quantize_4bit(arr, code, blocksize=64, quant_type=qt)
    nested_np = kernels_np.quantize_nested(absmax) if nested else None
    got = record_entries("w.weight", (70, 100), dtype, qt, 64, packed, absmax, nested_np)

    assert [k for k, _ in got] == list(want)
    for key, value in got:
        assert _bytes(value) == _bytes(want[key]), key
    assert as_torch(arr, code).equal(x)


def test_numpy_kernel_refuses_nan_and_wrong_arrays():
    x = np.ones(128, dtype=np.float32)
    x[5] = np.nan
    with pytest.raises(kernels_np.NonFiniteInputError, match="NaN or Inf"):
        kernels_np.quantize_4bit(x, "F32", blocksize=64, quant_type=QuantType.NF4)
    assert kernels_np.NonFiniteInputError is kernels.NonFiniteInputError  # one type for both paths
    with pytest.raises(ValueError, match="needs uint16"):
        kernels_np.quantize_4bit(np.ones(64, np.float32), "BF16", blocksize=64, quant_type=QuantType.NF4)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels_np.quantize_4bit(
            np.ones((8, 16), np.float32).T, "F32", blocksize=64, quant_type=QuantType.NF4
        )
