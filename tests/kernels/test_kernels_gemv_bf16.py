"""gemv_bf16 (csrc/gemv_bf16.cpp) vs a float64 matmul, within the derived float32-accumulation bound.

What every path computes: x widened exactly to float32, each bf16 weight widened exactly to float32
(a bf16 is the top half of an f32), the K products summed in float32 (AVX2 / AVX-512: FMA lanes, a
tree reduction, a scalar tail for K not a multiple of the vector width) or float64 (scalar path),
then one rounding to x's dtype: error_bounds.dot_bound with weight_rel 0 covers all of it. torch's
own bf16 matmul (the call it replaces in the lm_head) accumulates in float32 too, so it meets the same
bound, and the two differ by at most twice that bound.
"""

from __future__ import annotations

import pytest
import torch
from error_bounds import dot_bound, worst_ratio
from kernel_helpers import DTYPES

from converter.kernels import bnb4bit as kernels
from converter.kernels.gemv_bf16 import gemv_bf16, gemv_bf16_op


def _w(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("out_features", "in_features"),
    [(1, 16), (37, 576), (130, 100), (19, 5), (64, 1536)],  # 100 and 5: the SIMD paths' scalar tail
)
def test_gemv_bf16_within_the_float32_accumulation_bound(dtype, out_features, in_features):
    w = _w(out_features, in_features)
    for batch in range(1, 9):
        x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(batch)).to(dtype)
        ref, bound = dot_bound(x, w, out_dtype=dtype)
        for isa in kernels.cpu_isas():
            y = gemv_bf16(x, w, isa=isa, threads=3)
            assert y.dtype == dtype
            assert y.shape == (batch, out_features)
            worst = worst_ratio(y, ref, bound)
            assert worst <= 1.0, f"batch={batch} isa={isa}: error {worst:.3g} x the derived bound"


def test_bound_catches_one_wrong_weight():
    """The bound is tight enough to matter: one weight of a row 8 bf16 ulps off (3-6% of it) moves
    that row's output outside it (a wrong row stride or tile offset would do far worse)."""
    w = _w(24, 576, seed=3)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(7))
    ref, bound = dot_bound(x, w, out_dtype=torch.float32)
    row = 5
    k = int((x[0].double() * w[row].double()).abs().argmax())  # the largest term of that row
    bad = w.clone()
    bad.view(torch.int16)[row, k] += 8  # 8 ulps: the mantissa has 7 bits
    for isa in kernels.cpu_isas():
        assert worst_ratio(gemv_bf16(x, w, isa=isa), ref, bound) <= 1.0, isa
        err = (gemv_bf16(x, bad, isa=isa).double() - ref).abs() / bound
        assert float(err[0, row]) > 1.0, isa
        assert float(torch.cat([err[0, :row], err[0, row + 1 :]]).max()) <= 1.0, isa


def test_gemv_bf16_and_torch_linear_agree_within_twice_the_bound():
    """The call it replaces: torch's bf16 F.linear, SmolLM2-135M's head width, batch 1 and 8."""
    w = _w(4096, 576, seed=1)
    for batch in (1, 8):
        x = torch.randn(batch, 576, generator=torch.Generator().manual_seed(batch)).to(torch.bfloat16)
        ref, bound = dot_bound(x, w, out_dtype=torch.bfloat16)
        theirs = torch.nn.functional.linear(x, w)
        assert worst_ratio(theirs, ref, bound) <= 1.0  # torch too accumulates in float32
        ours = gemv_bf16(x, w)
        assert float(((ours.double() - theirs.double()).abs() / (2 * bound)).max()) <= 1.0


def test_thread_count_never_changes_a_result():
    w = _w(1000, 576, seed=2)
    x = torch.randn(3, 576).to(torch.bfloat16)
    for isa in kernels.cpu_isas():
        one = gemv_bf16(x, w, isa=isa, threads=1)
        assert torch.equal(one, gemv_bf16(x, w, isa=isa, threads=7)), isa
        assert torch.equal(one, gemv_bf16(x, w, isa=isa, threads=0)), isa


def test_gemv_bf16_refuses_what_it_cannot_take():
    w = _w(8, 64)
    with pytest.raises(ValueError, match=r"gemv_bf16 takes \[1\.\.8, 64\]"):
        gemv_bf16(torch.randn(9, 64), w)
    with pytest.raises(ValueError, match=r"gemv_bf16 takes \[1\.\.8, 64\]"):
        gemv_bf16(torch.randn(1, 63), w)
    with pytest.raises(ValueError, match="w must be a 2-D bfloat16"):
        gemv_bf16(torch.randn(1, 64), w.float())
    with pytest.raises(ValueError, match=r"x has dtype torch\.int32"):
        gemv_bf16(torch.ones(1, 64, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        gemv_bf16(torch.empty(1, 64, device="meta"), w)


def test_op_passes_opcheck_and_equals_the_function():
    w = _w(48, 128)
    x = torch.randn(2, 128).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.quantize_model.gemv_bf16.default, (x, w))
    assert torch.equal(gemv_bf16_op(x, w), gemv_bf16(x, w))
