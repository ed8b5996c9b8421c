"""Ours vs bitsandbytes 0.50.2 on CPU: NF4 bytes and absmax, and bnb decoding our nested records.

bnb's listed deviations (bnb-4bit.md section 2, design.md): its default CPU path divides x / absmax in
the partial last block where we multiply by the reciprocal (codes may differ there, only where the two
land on different sides of a threshold), and it codes nested absmax with an approximate 8-bit lookup
table. Each is counted and explained; everything else must be equal.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from bnb_signed_zero import fp4_code8_as_plus_zero
from kernel_helpers import DTYPES, as_f32_numpy, bnb_quant_state, dynamic8_tensor

from converter.kernels import bnb4bit as kernels
from formats import reference
from formats.quant_types import BLOCKSIZES, QuantType

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
bnb_f = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_nf4_bytes_equal_bitsandbytes(dtype, blocksize):
    rng = np.random.default_rng(blocksize)
    n = 37 * blocksize + 2 * (blocksize // 3) + 1  # partial, odd-length last block
    x = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype)
    x[blocksize : 2 * blocksize] = 0.0  # an all-zero block: bnb 0.50 CPU also writes 0x77
    ours, absmax = kernels.quantize_4bit(x, blocksize=blocksize, quant_type=QuantType.NF4)
    theirs, state = bnb_f.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    theirs = theirs.view(-1)
    assert torch.equal(absmax.view(torch.int32), state.absmax.view(torch.int32))
    assert ours[2 * blocksize // 2 - 1].item() == 0x77  # inside the zero block

    full = (n // blocksize) * blocksize // 2  # bytes of the full blocks
    assert torch.equal(ours[:full], theirs[:full])
    # The partial last block: every difference is bnb's true division x / absmax.
    diff = torch.nonzero(ours[full:] != theirs[full:]).view(-1)
    assert diff.numel() <= 2
    if diff.numel():
        tail = as_f32_numpy(x)[2 * full :]
        am = np.float32(absmax[-1].item())
        by_division = reference.encode_nf4((tail / am).astype(np.float32))
        if tail.size % 2:
            by_division = np.append(by_division, np.uint8(7))
        expected = (by_division[0::2] << 4) | by_division[1::2]
        assert np.array_equal(theirs[full:].numpy(), expected)


def test_nf4_tiny_tail_block_division_deviation_is_rare():
    # 20k partial blocks of 33 elements: count bnb's division deviations and bound them.
    rng = np.random.default_rng(7)
    differing = 0
    for trial in range(200):
        x = torch.from_numpy(rng.standard_normal(64 * 3 + 33).astype(np.float32))
        ours, _ = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4)
        theirs, _ = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4")
        differing += int((ours != theirs.view(-1)).sum())
        assert torch.equal(ours[:96], theirs.view(-1)[:96]), f"trial {trial}: a full block differs"
    # f32: x*(1/a) and x/a are both correctly rounded (the same on every IEEE CPU) and differ by <= 1
    # ulp, so a code differs only where s sits within an ulp of one of 15 thresholds: ~15 * 2 * 2^-24
    # per element, ~0.01 expected over these 6600 elements; 10 is a generous bound on a rare event.
    assert differing <= 10


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", [QuantType.NF4, QuantType.FP4], ids=lambda q: q.label)
def test_bitsandbytes_decodes_our_nested_record_bit_exactly(out_dtype, quant_type):
    rng = np.random.default_rng(3)
    shape = (300, 448)  # 2100 blocks of 64: 9 nested blocks, the last partial
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(torch.bfloat16)
    packed, absmax = kernels.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    codes, nested_absmax, offset = kernels.quantize_nested(absmax)
    state = bnb_quant_state(codes, shape, out_dtype, 64, quant_type, nested=(codes, nested_absmax, offset))
    theirs = bnb_f.dequantize_4bit(packed.view(-1, 1), state)

    ours_absmax = kernels.dequantize_nested(codes, nested_absmax, offset, dynamic8_tensor())
    ours = kernels.dequantize_4bit(
        packed,
        ours_absmax,
        n=x.numel(),
        blocksize=64,
        quant_map=torch.tensor(quant_type.codebook),
        out_dtype=out_dtype,
    )
    assert theirs.dtype == out_dtype
    # bitsandbytes' own sign of FP4 code 8's zero depends on its CPU path (tests/bnb_signed_zero.py)
    theirs = fp4_code8_as_plus_zero(theirs, packed, quant_type.label)
    assert torch.equal(
        ours.view(shape).view(torch.uint8 if out_dtype != torch.float32 else torch.int32).view(-1),
        theirs.view(torch.uint8 if out_dtype != torch.float32 else torch.int32).view(-1),
    )


def test_nested_against_bitsandbytes_lists_its_lookup_table_deviation():
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.standard_normal(4096 * 512).astype(np.float32)).to(torch.bfloat16)
    _, absmax = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4)
    codes, nested_absmax, offset = kernels.quantize_nested(absmax)
    _, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    # bnb's offset is a float32 torch.mean: equal to ours or an ulp away (then nested_absmax may move too).
    assert abs(offset - float(state.offset)) <= 2 * np.spacing(np.float32(offset))
    if offset == float(state.offset):
        assert torch.equal(nested_absmax, state.state2.absmax)
    # bnb 0.50 CPU codes through a 65536-bin lookup table: a few codes differ, each by one step.
    diff = (codes.int() - state.absmax.int()).abs()
    assert int(diff.max()) <= 1
    assert int((diff != 0).sum()) <= codes.numel() // 100
