"""gemv_4bit vs dequantize + matmul: fast-hadamard's rule, err <= 2 x torch's own same-dtype error + atol."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import DTYPES, codebook_tensor, dynamic8_tensor

from converter import kernels
from formats.quant_types import QuantType


def _weight(out_features, in_features, blocksize, quant_type, nested, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g, dtype=torch.float32).to(torch.bfloat16)
    packed, absmax = kernels.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    qm = codebook_tensor(quant_type)
    record = None
    if nested:
        codes, nested_absmax, offset = kernels.quantize_nested(absmax)
        record = kernels.NestedAbsmax(codes, nested_absmax, offset, dynamic8_tensor())
        absmax = kernels.dequantize_nested(*record)
    dense = kernels.dequantize_4bit(
        packed, absmax, n=w.numel(), blocksize=blocksize, quant_map=qm, out_dtype=torch.float32
    ).view(out_features, in_features)
    return packed, (None if nested else absmax), record, qm, dense


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["f32-absmax", "nested"])
@pytest.mark.parametrize(
    ("out_features", "in_features", "blocksize", "quant_type"),
    [
        (1, 64, 64, QuantType.NF4),
        (37, 256, 32, QuantType.NF4),
        (300, 1024, 64, QuantType.NF4),
        (64, 4096, 4096, QuantType.NF4),
        (23, 384, 128, QuantType.FP4),
        (18, 4096, 2048, QuantType.FP4),
    ],
    ids=lambda v: v.label if isinstance(v, QuantType) else str(v),
)
def test_gemv_matches_dequantize_matmul(dtype, nested, out_features, in_features, blocksize, quant_type):
    packed, absmax, record, qm, dense = _weight(out_features, in_features, blocksize, quant_type, nested, 0)
    for batch in range(1, 9):
        x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(batch)).to(dtype)
        ref = x.double() @ dense.double().T  # the exact answer for this quantized weight
        torch_out = F.linear(x, dense.to(dtype))  # torch's own error in this dtype
        atol = torch.finfo(dtype).eps * float((x.double().abs() @ dense.double().abs().T).max())
        bound = 2 * float((torch_out.double() - ref).abs().max()) + atol
        for isa in kernels.cpu_isas():
            y = kernels.gemv_4bit(
                x,
                packed,
                absmax,
                out_features=out_features,
                in_features=in_features,
                blocksize=blocksize,
                quant_map=qm,
                nested=record,
                isa=isa,
                threads=3,
            )
            assert y.dtype == dtype
            assert y.shape == (batch, out_features)
            err = float((y.double() - ref).abs().max())
            assert err <= bound, f"batch={batch} isa={isa}: error {err:.3g} > bound {bound:.3g}"


def test_gemv_fp4_and_one_dimensional_input():
    packed, absmax, _, qm, dense = _weight(48, 128, 32, QuantType.FP4, False, 1)
    x = torch.randn(128)
    y = kernels.gemv_4bit(x, packed, absmax, out_features=48, in_features=128, blocksize=32, quant_map=qm)
    assert y.shape == (48,)
    torch.testing.assert_close(y, dense @ x, rtol=1e-5, atol=1e-5)


def test_gemv_refuses_what_it_cannot_fuse():
    packed, absmax, _, qm, _ = _weight(8, 96, 32, QuantType.NF4, False, 2)
    args = dict(out_features=8, in_features=96, blocksize=64, quant_map=qm)
    with pytest.raises(ValueError, match="in_features 96 is not a positive multiple of blocksize 64"):
        kernels.gemv_4bit(torch.randn(1, 96), packed, absmax[:12], **args)
    args["blocksize"] = 32
    with pytest.raises(ValueError, match=r"x has batch 9: the fused GEMV takes 1\.\.8"):
        kernels.gemv_4bit(torch.randn(9, 96), packed, absmax, **args)
    with pytest.raises(ValueError, match=r"x has shape \(1, 95\): expected \[B, 96\]"):
        kernels.gemv_4bit(torch.randn(1, 95), packed, absmax, **args)
    with pytest.raises(ValueError, match="pass exactly one of absmax"):
        kernels.gemv_4bit(torch.randn(1, 96), packed, None, **args)
