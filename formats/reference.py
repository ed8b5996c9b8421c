"""A numpy reference of every quantization rule: the exactness rules of design.md, in code.

Slow and plain on purpose. The C++ kernels, the CUDA kernels and bitsandbytes are all tested
byte-equal against these functions (with bitsandbytes' known deviations listed in the tests).
All arithmetic is float32 unless a comment says otherwise; numpy's float32 ``/`` and ``*`` are IEEE
correctly rounded, which is exactly what the kernels must reproduce.

Arrays are flat: ``x`` is the flattened tensor (C order) already widened to float32 (bf16/f16 -> f32
is exact). Blocks run over the flattened tensor; the last block may be partial.
"""

from __future__ import annotations

import numpy as np

from formats import codebooks
from formats.quant_types import NESTED_BLOCKSIZE, OFFSET_CHUNK, QuantType, n_blocks

F32 = np.float32
#: The reciprocal is taken of max(absmax, TINY): an all-zero block then scales to 0.0, never NaN.
TINY = F32(1e-38)

_NF4_T = codebooks.as_f32(codebooks.NF4_THRESHOLDS)
_FP4_T = codebooks.as_f32(codebooks.FP4_THRESHOLDS)
_FP4_CODES = np.asarray(codebooks.FP4_TREE_CODES, dtype=np.uint8)
_DYN8_MID = codebooks.as_f32(codebooks.DYNAMIC8_MIDPOINTS)


def _blocks(x: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``x`` with zeros to whole blocks; return (blocks [nb, bs], valid mask [nb, bs])."""
    n = x.size
    nb = n_blocks(n, blocksize)
    padded = np.zeros(nb * blocksize, dtype=F32)
    padded[:n] = x
    valid = np.zeros(nb * blocksize, dtype=bool)
    valid[:n] = True
    return padded.reshape(nb, blocksize), valid.reshape(nb, blocksize)


def encode_nf4(s: np.ndarray) -> np.ndarray:
    """NF4 code = number of the 15 float32 midpoints strictly below s (ties go to the lower code)."""
    return np.searchsorted(_NF4_T, s.astype(F32), side="left").astype(np.uint8)


def encode_fp4(s: np.ndarray) -> np.ndarray:
    """bnb CUDA ``dQuantizeFP4``: strict '>' against its literal thresholds on |s|, sign bit for s < 0.

    -0.0 is not < 0, so it gets the positive zero code.
    """
    s = s.astype(F32)
    magnitude = _FP4_CODES[np.searchsorted(_FP4_T, np.abs(s), side="left")]
    sign = np.where(s < 0, np.uint8(codebooks.FP4_SIGN_BIT), np.uint8(0))
    return (magnitude | sign).astype(np.uint8)


def quantize_4bit(x: np.ndarray, blocksize: int, quant_type: QuantType) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise 4-bit quantization.

    Returns (packed uint8 [(n+1)//2], absmax float32 [nb]). absmax is the unclamped max|x| of the
    block's valid items; s = x * (1 / max(absmax, 1e-38)), an IEEE reciprocal then a multiply.
    The first element of a pair goes to the high nibble; an odd tail is padded with the zero code.
    """
    x = np.ascontiguousarray(x, dtype=F32).ravel()
    n = x.size
    blocks, valid = _blocks(x, blocksize)
    absmax = np.abs(blocks).max(axis=1).astype(F32)  # padding zeros never raise a max of |x|
    inv = (F32(1.0) / np.maximum(absmax, TINY)).astype(F32)
    s = (blocks * inv[:, None]).astype(F32).ravel()[:n]
    codes = encode_nf4(s) if quant_type is QuantType.NF4 else encode_fp4(s)
    if n % 2:
        codes = np.append(codes, np.uint8(quant_type.zero_code))
    packed = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)
    del valid
    return packed, absmax


def unpack_codes(packed: np.ndarray, n: int) -> np.ndarray:
    packed = np.ascontiguousarray(packed, dtype=np.uint8).ravel()
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes[:n]


def dequantize_4bit(
    packed: np.ndarray, absmax: np.ndarray, n: int, blocksize: int, quant_map: np.ndarray
) -> np.ndarray:
    """w[k] = quant_map[q[k]] * absmax[k // blocksize] in float32 (cast to the output dtype after).

    ``quant_map`` is the 16-entry table stored with the tensor, never a hard-coded one.
    """
    codes = unpack_codes(packed, n)
    qm = np.asarray(quant_map, dtype=F32)
    am = np.repeat(np.asarray(absmax, dtype=F32), blocksize)[:n]
    return (qm[codes] * am).astype(F32)


def nested_offset(absmax: np.ndarray) -> np.float32:
    """float32(S / nb), S the float64 sum of absmax in a fixed order.

    Sequential within consecutive chunks of OFFSET_CHUNK, then sequential over the chunk sums
    (``np.cumsum`` accumulates strictly left to right; ``np.sum`` would be pairwise).
    """
    a = np.asarray(absmax, dtype=np.float64)
    nb = a.size
    if nb == 0:
        return F32(0.0)
    chunk_sums = [np.cumsum(a[i : i + OFFSET_CHUNK])[-1] for i in range(0, nb, OFFSET_CHUNK)]
    total = np.cumsum(np.asarray(chunk_sums, dtype=np.float64))[-1]
    return F32(total / nb)


def quantize_nested(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Nested (double) quantization of the absmax constants, blocksize 256, signed dynamic map.

    Returns (codes uint8 [nb], nested_absmax float32 [ceil(nb/256)], offset float32).
    v = (absmax - offset) * (1 / max(nested_absmax, 1e-38)); code = #midpoints strictly below v.
    """
    absmax = np.ascontiguousarray(absmax, dtype=F32).ravel()
    offset = nested_offset(absmax)
    centered = (absmax - offset).astype(F32)
    blocks, _ = _blocks(centered, NESTED_BLOCKSIZE)
    nested_absmax = np.abs(blocks).max(axis=1).astype(F32)
    inv = (F32(1.0) / np.maximum(nested_absmax, TINY)).astype(F32)
    v = (blocks * inv[:, None]).astype(F32).ravel()[: absmax.size]
    codes = np.searchsorted(_DYN8_MID, v, side="left").astype(np.uint8)
    return codes, nested_absmax, offset


def dequantize_nested(
    codes: np.ndarray, nested_absmax: np.ndarray, offset: float, nested_map: np.ndarray
) -> np.ndarray:
    """absmax[i] = map8[c[i]] * nested_absmax[i // 256], then + offset: a separate multiply and add."""
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    m = np.asarray(nested_map, dtype=F32)
    na = np.repeat(np.asarray(nested_absmax, dtype=F32), NESTED_BLOCKSIZE)[: codes.size]
    return ((m[codes] * na).astype(F32) + F32(offset)).astype(F32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16, as uint16 bit patterns (NaN kept quiet)."""
    u = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(F32)
