"""The bitsandbytes state-dict entries of one quantized weight, from numpy kernel outputs.

The torch-free twin of ``formats.record.QuantizedTensor.from_kernel_outputs(...).state_dict()``, used
by the converter so the CPU path never imports torch (--device cuda hands its pinned results in
as numpy views too). Same keys, same bytes: tests/converter/test_records.py compares both.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np

from formats import codebooks
from formats.bnb_compat import quant_state_json, quant_state_key
from formats.quant_types import QuantType

Buffer = np.ndarray | memoryview


@cache
def _table(values: tuple[float, ...]) -> np.ndarray:
    table = np.asarray(values, dtype=np.float32)
    table.flags.writeable = False
    return table


def record_entries(
    name: str,
    shape: Sequence[int],
    dtype: str,
    quant_type: QuantType,
    blocksize: int,
    packed: np.ndarray,
    absmax: np.ndarray,
    nested: tuple[np.ndarray, np.ndarray, float] | None,
) -> list[tuple[str, Buffer]]:
    """(key, data) for every bnb key of weight ``name``, in bnb's ``_save_to_state_dict`` order.

    Args:
        name: the weight key ("...down_proj.weight"); shape: its original ``[out, in]``; dtype: its
            torch dtype name (the dequantized dtype written into the quant state).
        packed, absmax: ``quantize_4bit``'s outputs (uint8, float32); nested: ``quantize_nested``'s
            ``(codes, nested_absmax, offset)`` or None.

    The packed codes are handed over as raw bytes: every ``--quant-storage`` dtype is a view of the
    same bytes, and the writer checks their count against the planned slot.
    """
    out: list[tuple[str, Buffer]] = [(name, memoryview(np.ascontiguousarray(packed).reshape(-1)).cast("B"))]
    if nested is None:
        out += [(f"{name}.absmax", absmax), (f"{name}.quant_map", _table(quant_type.codebook))]
        offset = None
    else:
        codes, nested_absmax, offset = nested
        out += [
            (f"{name}.absmax", codes),
            (f"{name}.quant_map", _table(quant_type.codebook)),
            (f"{name}.nested_absmax", nested_absmax),
            (f"{name}.nested_quant_map", _table(codebooks.DYNAMIC8)),
        ]
    js = quant_state_json(quant_type, blocksize, dtype, shape, offset)
    out.append((quant_state_key(name, quant_type), np.frombuffer(js, dtype=np.uint8)))
    return out
