"""Quantization types and their storage layout: one enum, one table.

Strings such as ``"nf4"`` exist only at the edges (CLI options, bnb JSON); inside the code a
``QuantType`` is passed. Numeric values are part of the C++ ABI (``csrc/codebooks.h``) and are never
reused: a retired type stays here as a comment.
"""

from __future__ import annotations

from enum import IntEnum

from formats import codebooks


class QuantType(IntEnum):
    NF4 = 1
    FP4 = 2

    @property
    def label(self) -> str:
        """The name bitsandbytes uses ("nf4" / "fp4")."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> QuantType:
        try:
            return cls[text.upper()]
        except KeyError:
            msg = f"unknown quant type {text!r}: expected one of 'nf4', 'fp4'"
            raise ValueError(msg) from None

    @property
    def codebook(self) -> tuple[float, ...]:
        return codebooks.NF4 if self is QuantType.NF4 else codebooks.FP4

    @property
    def zero_code(self) -> int:
        """Code written for an all-zero block and for the pad nibble of an odd tail."""
        return codebooks.NF4_ZERO_CODE if self is QuantType.NF4 else codebooks.FP4_ZERO_CODE


#: Block sizes bitsandbytes accepts for 4-bit (transformers always uses 64).
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCKSIZE = 64

#: Nested (double) quantization of the absmax constants: fixed by bnb's ``matmul_4bit``.
NESTED_BLOCKSIZE = 256
#: Chunk length of the deterministic float64 offset sum (design.md, exactness rules).
OFFSET_CHUNK = 1024

#: Inputs must stay below 2**31 elements: bitsandbytes indexes with 32-bit ints.
MAX_BNB_ELEMENTS = 2**31 - 1

# Storage per block of ``blocksize`` elements, written as a sum of fields (bytes):
#   packed codes: blocksize // 2   (two 4-bit codes per byte, first element in the high nibble)
#   absmax:       4 (float32)       or, nested: 1 (uint8 code) + 4 / NESTED_BLOCKSIZE (float32 per 256 blocks)
PACKED_BITS_PER_ELEMENT = 4


def packed_nbytes(n: int) -> int:
    """Bytes of packed codes for ``n`` elements (an odd tail is padded to a whole byte)."""
    return (n + 1) // 2


def n_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def n_nested_blocks(n_absmax: int) -> int:
    return -(-n_absmax // NESTED_BLOCKSIZE)


def quantized_nbytes(n: int, blocksize: int, nested: bool) -> int:
    """Payload bytes of one quantized tensor (codes + absmax + nested absmax), tables excluded."""
    nb = n_blocks(n, blocksize)
    if nested:
        return packed_nbytes(n) + nb * 1 + n_nested_blocks(nb) * 4
    return packed_nbytes(n) + nb * 4


def check_blocksize(blocksize: int) -> int:
    if blocksize not in BLOCKSIZES:
        msg = f"blocksize {blocksize} is not supported: expected one of {', '.join(map(str, BLOCKSIZES))}"
        raise ValueError(msg)
    return blocksize
