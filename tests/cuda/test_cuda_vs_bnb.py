"""Our CUDA kernels vs bitsandbytes 0.50.2 CUDA on the same GPU: counted deviations, all else equal.

Deviations (design.md): bnb CUDA writes 0x00 for an all-zero NF4 block (ours 0x77); its fast-math
reciprocal can move a code where s sits within an ulp or so of a threshold; its nested offset is a
float32 torch.mean on the device. The counts are printed (pytest -s) for docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from converter.kernels import bnb4bit as kernels
from formats.quant_types import QuantType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "golden"))
from error_bounds import U32
from golden_cases import classify_code_diffs

pytestmark = pytest.mark.cuda
bnbf = pytest.importorskip("bitsandbytes.functional")

SHAPES = ((4096, 4096), (14336, 4096), (1001, 333))


def _input(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)
    flat = x.view(-1)
    flat[64 * 7 : 64 * 9] = 0  # two all-zero blocks of 64
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_codes_match_bnb_except_counted_cases(dtype, quant_type, shape):
    x = _input(shape, dtype, seed=shape[0] + 7 * shape[1] + (1 if quant_type == "fp4" else 0))
    packed_b, state = bnbf.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    packed_o, absmax_o = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.parse(quant_type))
    assert torch.equal(absmax_o, state.absmax), "absmax (max|x|) must be bit-equal"
    counts = classify_code_diffs(
        x.float().view(-1).cpu().numpy(),
        absmax_o.cpu().numpy(),
        packed_o.cpu().numpy(),
        packed_b.view(-1).cpu().numpy(),
        64,
        quant_type,
    )
    print(f"\nbnb-vs-ours {quant_type} {str(dtype)[6:]} {shape}: {counts}")
    assert counts["unexplained"] == 0, counts
    # A count, not a rounding tolerance (the codes are decided, not accumulated): bnb's approximate
    # reciprocal only matters for s within a few ulp of a threshold, so such codes stay rare.
    # bf16/f16 inputs put s exactly on FP4's exact-binary thresholds (e.g. 11/128) often, where the
    # approximate reciprocal decides; NF4's thresholds are rarely hit exactly.
    bound = 1e-3 if quant_type == "fp4" else 1e-5
    assert counts["reciprocal"] <= bound * x.numel() + 2, counts
    if quant_type == "nf4":
        assert counts["zero_block"] == 128, counts  # 2 blocks x 64 codes: bnb 0x00, ours 0x77


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nested_and_dequantize_of_bnb_record(dtype, quant_type):
    x = _input((4096, 4096), dtype, seed=7)
    packed_b, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type=quant_type)
    _, absmax_o = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.parse(quant_type))
    codes_o, nabs_o, off_o = kernels.quantize_nested(absmax_o)
    off_b = float(state.offset.item())
    # nested_absmax = max |absmax - offset| per nested block (one float32 subtraction): it moves by at
    # most the offsets' difference plus that rounding (u * nabs) on each side.
    nabs_b = state.state2.absmax.double().to(nabs_o.device)
    nabs_bound = abs(off_o - off_b) + U32 * (nabs_o.double().abs() + nabs_b.abs())
    assert bool(((nabs_o.double() - nabs_b).abs() <= nabs_bound).all())
    ulps = abs(int(np.float32(off_o).view(np.int32)) - int(np.float32(off_b).view(np.int32)))
    code_diff = (codes_o.int() - state.absmax.int()).abs()
    print(
        f"\nnested {quant_type} {str(dtype)[6:]}: offset ulps {ulps}, "
        f"nested codes differing {int((code_diff != 0).sum())} of {code_diff.numel()}"
    )
    assert ulps <= 4
    assert int(code_diff.max()) <= 1
    # Our dequantization of bnb's record is bnb's CUDA dequantization, bit for bit (FP4 -0.0 aside).
    from converter.kernels import bnb4bit_cuda as kernels_cuda

    ours = kernels_cuda.dequantize_4bit(
        packed_b.view(-1),
        None,
        n=x.numel(),
        blocksize=64,
        quant_map=state.code,
        out_dtype=dtype,
        nested=(state.absmax, state.state2.absmax, off_b, state.state2.code),
    )
    theirs = bnbf.dequantize_4bit(packed_b, state).view(-1)
    same = (ours == theirs) | (ours.isnan() & theirs.isnan())  # -0.0 == +0.0 compares equal
    assert bool(same.all())
    if quant_type == "nf4":
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(ours.view(bits), theirs.view(bits))
