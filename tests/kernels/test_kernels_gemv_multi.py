"""gemv_4bit_multi (several weights of one x in one call) equals gemv_4bit of each weight, bit for bit.

The CPU kernel (csrc/gemv_cpu.cpp: gemv_4bit_multi) widens x once and runs every row through the same
row kernel and the same 16-row tiles as gemv_4bit, so no tolerance applies: each y_i must be identical
to the separate call, on every ISA of this CPU, for every x dtype, batch 1..8, nested or not, and
weights of different out_features (q/k/v: 4096/1024/1024 scaled down; tails that are not multiples of
16 rows, where the tile path changes).
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, codebook_tensor, dynamic8_tensor

from converter import _kernels
from converter.kernels import bnb4bit as kernels
from converter.kernels import custom_ops
from converter.kernels.checks import KERNEL_DTYPE_NAMES
from formats.quant_types import QuantType

K, BS = 512, 64
#: out_features of the weights of one call: q/k/v-like, and tails of 1..15 rows past a 16-row tile.
OUTS = ((96, 32, 32), (37, 130), (1, 17, 250, 64))


def _weight(out_f: int, nested: bool, seed: int, quant_type: QuantType = QuantType.NF4) -> tuple:
    """The op's per-weight arguments (packed, absmax, codes, nested_absmax, nested_map, offset, qmap)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, K, generator=g) * 0.05).to(torch.bfloat16)
    packed, absmax = kernels.quantize_4bit(w, blocksize=BS, quant_type=quant_type)
    qm = codebook_tensor(quant_type)
    if not nested:
        return packed, absmax, None, None, None, 0.0, qm
    codes, nabs, off = kernels.quantize_nested(absmax)
    return packed, None, codes, nabs, dynamic8_tensor(), off, qm


def _lists(weights: list[tuple]) -> list[list]:
    return [list(column) for column in zip(*weights, strict=True)]


def _separate(x: torch.Tensor, weights: list[tuple], outs: tuple[int, ...]) -> list[torch.Tensor]:
    return [custom_ops.IMPLS["cpu"]["gemv_4bit"](x, *w, o, BS) for w, o in zip(weights, outs, strict=True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("outs", OUTS, ids=lambda o: "x".join(map(str, o)))
def test_op_equals_separate_gemv_bit_for_bit(dtype, nested, outs):
    weights = [_weight(o, nested, seed=i) for i, o in enumerate(outs)]
    for batch in (1, 3, 8):
        x = torch.randn(batch, K, generator=torch.Generator().manual_seed(batch)).to(dtype)
        ys = torch.ops.quantize_model.gemv_4bit_multi(x, *_lists(weights), list(outs), BS)
        want = _separate(x, weights, outs)
        assert len(ys) == len(outs)
        for i, (y, w) in enumerate(zip(ys, want, strict=True)):
            assert y.dtype == dtype
            assert y.shape == (batch, outs[i])
            assert y.is_contiguous()
            assert torch.equal(y, w), f"weight {i} ({outs[i]} rows), batch {batch}"


@pytest.mark.parametrize("isa", kernels.cpu_isas())
def test_every_isa_and_thread_count_equals_separate_calls(isa):
    """Mixed NF4/FP4 and nested/flat weights in one call; 7 threads on 2 cores cut chunks across weights."""
    outs = (40, 24, 200)
    weights = [
        _weight(40, True, 1),
        _weight(24, False, 2, QuantType.FP4),
        _weight(200, True, 3, QuantType.FP4),
    ]
    for batch in (1, 2, 5, 8):
        x = torch.randn(batch, K, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(batch))
        ys = [torch.empty(batch, o, dtype=x.dtype) for o in outs]
        packed, absmax, codes, nabs, nmap, offs, qms = _lists(weights)
        ptr = lambda ts: [0 if t is None else t.data_ptr() for t in ts]  # noqa: E731
        _kernels.gemv_4bit_multi(
            x.data_ptr(),
            KERNEL_DTYPE_NAMES[x.dtype],
            batch,
            K,
            BS,
            list(outs),
            ptr(packed),
            ptr(qms),
            ptr(absmax),
            ptr(codes),
            ptr(nabs),
            offs,
            ptr(nmap),
            ptr(ys),
            isa,
            7,
        )
        for (p, a, c, na, nm, off, qm), o, y in zip(weights, outs, ys, strict=True):
            nested = None if c is None else kernels.NestedAbsmax(c, na, off, nm)
            want = kernels.gemv_4bit(
                x,
                p,
                a,
                out_features=o,
                in_features=K,
                blocksize=BS,
                quant_map=qm,
                nested=nested,
                isa=isa,
                threads=1,
            )
            assert torch.equal(y, want), f"{isa}: {o} rows, batch {batch}"


def test_mismatched_in_features_is_one_clear_error():
    q = _weight(64, False, 0)
    g = torch.Generator().manual_seed(1)
    packed, absmax = kernels.quantize_4bit(
        torch.randn(32, 2 * K, generator=g), blocksize=BS, quant_type=QuantType.NF4
    )
    k = (packed, absmax, None, None, None, 0.0, q[-1])
    x = torch.randn(1, K, dtype=torch.bfloat16)
    with pytest.raises(
        ValueError, match=r"weight 1 has 32768 4-bit codes for 32 rows, not 32 x 512 .* share"
    ):
        torch.ops.quantize_model.gemv_4bit_multi(x, *_lists([q, k]), [64, 32], BS)
    with pytest.raises(ValueError, match=r"x has shape \(1, 1024\): the fused GEMV takes \[1\.\.8, 512\]"):
        torch.ops.quantize_model.gemv_4bit_multi(torch.randn(1, 2 * K), *_lists([q, q]), [64, 64], BS)
    with pytest.raises(ValueError, match=r"out_features has 1 entries for 2 weights"):
        torch.ops.quantize_model.gemv_4bit_multi(x, *_lists([q, q]), [64], BS)
    with pytest.raises(ValueError, match=r"takes 1\.\.4 weights, got 5"):
        torch.ops.quantize_model.gemv_4bit_multi(x, *_lists([q] * 5), [64] * 5, BS)


def test_op_passes_opcheck():
    weights = [_weight(48, True, 0), _weight(16, False, 1)]
    x = torch.randn(2, K, dtype=torch.bfloat16)
    torch.library.opcheck(
        torch.ops.quantize_model.gemv_4bit_multi.default, (x, *_lists(weights), [48, 16], BS)
    )
