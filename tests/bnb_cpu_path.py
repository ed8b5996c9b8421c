"""bitsandbytes' generic CPU path, for the tests that compare our logits with its own bit for bit."""

from __future__ import annotations

import torch


def bnb_generic_cpu_path(model: torch.nn.Module) -> torch.nn.Module:
    """Keep every bitsandbytes ``Linear4bit`` of ``model`` on its dequantize + ``F.linear`` path.

    On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks each ``Linear4bit`` on its first eval
    forward (``_convert_weight_packed_for_cpu``) and multiplies in bf16 with its own summation order
    (it also crashes on rows that are not whole blocks). Its generic path dequantizes as ours does and
    runs ``F.linear``: our dequantize path equals it bit for bit on every CPU."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model
