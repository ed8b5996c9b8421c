"""bitsandbytes' FP4 code 8 (sign bit set, magnitude zero) decodes to -0.0 or +0.0 by backend: its CPU
scalar/AVX2 build (``cpu_ops.cpp`` ``fp4_lut``, ``1 - 2 * sign`` times 0) and CUDA give -0.0, its AVX-512
path and the Python table (``get_4bit_type("fp4")``, the ``quant_map`` stored with every record) +0.0;
we decode by the stored table (+0.0, on every ISA and device: tests/kernels). A zero's sign changes no
product sum, so bit-exact comparisons with bitsandbytes' decode treat that one code's zeros as equal
(../shared/reference/bnb-4bit.md section 1.2)."""

from __future__ import annotations

import torch


def fp4_code8_as_plus_zero(values: torch.Tensor, packed: torch.Tensor, quant_type: str) -> torch.Tensor:
    """``values`` (a decode of ``packed``, any shape, n elements in packing order) with the elements
    whose FP4 code is 8 set to +0.0 (they must be zeros of either sign); unchanged for other quant types."""
    if quant_type != "fp4":
        return values
    flat = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[: values.numel()]
    out = values.reshape(-1).clone()
    assert bool((out[codes == 8] == 0).all()), "FP4 code 8 decoded to a nonzero value"
    out[codes == 8] = 0.0
    return out.reshape(values.shape)
