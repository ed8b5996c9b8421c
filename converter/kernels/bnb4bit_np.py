"""The CPU quantization kernels on numpy arrays: the converter's path that never imports torch.

``converter.kernels.bnb4bit`` is the torch face of the same C++ extension (``converter._kernels``, which takes
raw pointers and owns no memory); this module hands it numpy buffers instead, so ``quantize-model
convert`` on the CPU, ``--version``, ``inspect`` and ``verify`` start without torch (~1 s of imports on
a small VM). Bytes are identical to ``converter.kernels.bnb4bit.quantize_4bit`` / ``quantize_nested``: both
call the same kernel entry points with the same arguments.

bfloat16 has no numpy dtype: a bf16 tensor is passed as its uint16 bit pattern with ``dtype="BF16"``.
"""

from __future__ import annotations

import math

import numpy as np

from converter import _kernels
from converter.errors import NonFiniteInputError
from converter.kernels import MAX_THREADS, threads_beyond_limit
from formats.quant_types import (
    NESTED_BLOCKSIZE,
    OFFSET_CHUNK,
    QuantType,
    check_blocksize,
    n_blocks,
    n_nested_blocks,
)

__all__ = [
    "KERNEL_DTYPES",
    "NonFiniteInputError",
    "address",
    "check_input",
    "cpu_backend_info",
    "default_threads",
    "dequantize_nested",
    "quantize_4bit",
    "quantize_nested",
    "threads_arg",
]

#: safetensors dtype code -> (kernel dtype name, numpy dtype holding the bits).
KERNEL_DTYPES: dict[str, tuple[str, np.dtype]] = {
    "F32": ("float32", np.dtype("<f4")),
    "F16": ("float16", np.dtype("<f2")),
    "BF16": ("bfloat16", np.dtype("<u2")),
}


def check_input(x: np.ndarray, dtype: str) -> str:
    """The kernel dtype name of ``x`` holding ``dtype`` values; ValueError unless it is a C-contiguous
    little-endian array of that element size (bf16 as uint16 bits). Shared with
    converter.quantize.cuda_host."""
    if dtype not in KERNEL_DTYPES:
        msg = f"x has dtype {dtype}: expected F32, F16 or BF16"
        raise ValueError(msg)
    name, np_dtype = KERNEL_DTYPES[dtype]
    if x.dtype.itemsize != np_dtype.itemsize or x.dtype.kind not in "fui" or x.dtype.byteorder == ">":
        msg = f"x is a numpy {x.dtype} array: a {dtype} tensor needs {np_dtype} elements"
        raise ValueError(msg)
    if not x.flags.c_contiguous:
        msg = f"x is not C-contiguous (shape {x.shape}): pass np.ascontiguousarray(x)"
        raise ValueError(msg)
    return name


def threads_arg(threads: int | None) -> int:
    """The extension's thread count argument: 0 (one per CPU) for None; ValueError below 1 or above
    MAX_THREADS (the C++ pool would run MAX_THREADS without a word)."""
    if threads is None:
        return 0
    if threads < 1:
        msg = f"threads must be >= 1 or None (one per CPU), got {threads}"
        raise ValueError(msg)
    if threads > MAX_THREADS:
        msg = f"{threads_beyond_limit(threads)}, or None (one per CPU)"
        raise ValueError(msg)
    return int(threads)


def address(a: np.ndarray) -> int:
    """The address of a numpy array's first element (what the extension's pointer arguments take)."""
    return int(a.__array_interface__["data"][0])


def quantize_4bit(
    x: np.ndarray,
    dtype: str,
    *,
    blocksize: int,
    quant_type: QuantType,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise 4-bit quantization of ``x`` (flattened in C order); see
    converter.kernels.bnb4bit.quantize_4bit.

    Args:
        x: a C-contiguous array holding ``dtype`` values (bf16 as uint16 bits); may be a read-only
            memory map (the kernel only reads it).
        dtype: safetensors code of x: ``"F32"``, ``"F16"`` or ``"BF16"``.

    Returns:
        ``(packed uint8 [(n+1)//2], absmax float32 [ceil(n/blocksize)])``.

    Raises:
        NonFiniteInputError: x holds NaN or Inf.
    """
    name = check_input(x, dtype)
    check_blocksize(blocksize)
    if not isinstance(quant_type, QuantType):
        msg = f"quant_type must be a formats.quant_types.QuantType, got {quant_type!r}"
        raise TypeError(msg)
    n = x.size
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty(n_blocks(n, blocksize), dtype=np.float32)
    if n == 0:
        return packed, absmax
    bad_blocks = _kernels.quantize_4bit(
        address(x),
        name,
        n,
        blocksize,
        int(quant_type),
        address(packed),
        address(absmax),
        "auto",
        threads_arg(threads),
    )
    if bad_blocks:
        raise NonFiniteInputError.in_blocks(bad_blocks, absmax.size, blocksize)
    return packed, absmax


def quantize_nested(
    absmax: np.ndarray, *, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Nested (double) quantization of float32 absmax values; see converter.kernels.bnb4bit.quantize_nested.

    Returns ``(codes uint8 [nb], nested_absmax float32 [ceil(nb/256)], offset)``.
    """
    if absmax.dtype != np.float32 or not absmax.flags.c_contiguous:
        msg = f"absmax must be a C-contiguous float32 array, got {absmax.dtype}"
        raise ValueError(msg)
    nb = absmax.size
    codes = np.empty(nb, dtype=np.uint8)
    nested_absmax = np.empty(n_nested_blocks(nb), dtype=np.float32)
    offset = _kernels.quantize_nested(
        address(absmax), nb, address(codes), address(nested_absmax), "auto", threads_arg(threads)
    )
    if math.isnan(offset):  # the kernel's signal for a NaN or Inf absmax
        raise NonFiniteInputError.in_absmax()
    return codes, nested_absmax, float(offset)


def dequantize_nested(
    codes: np.ndarray, nested_absmax: np.ndarray, offset: float, nested_map: np.ndarray, *, threads=None
) -> np.ndarray:
    """absmax[i] = nested_map[codes[i]] * nested_absmax[i // 256] + offset (float32); see
    converter.kernels.bnb4bit.dequantize_nested."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    nested_absmax = np.ascontiguousarray(nested_absmax, dtype=np.float32)
    nested_map = np.ascontiguousarray(nested_map, dtype=np.float32)
    nb = codes.size
    if nested_absmax.size != n_nested_blocks(nb) or nested_map.size != 256:
        msg = f"nested_absmax has {nested_absmax.size} values, nested_map {nested_map.size}: expected "
        msg += f"{n_nested_blocks(nb)} and 256 for {nb} codes"
        raise ValueError(msg)
    out = np.empty(nb, dtype=np.float32)
    if nb:
        _kernels.dequantize_nested(
            address(codes),
            nb,
            address(nested_absmax),
            float(offset),
            address(nested_map),
            address(out),
            threads_arg(threads),
        )
    return out


def cpu_backend_info() -> dict:
    """``{"isa": [...], "threads": int}``: what ``converter.kernels.bnb4bit.available_backends()["cpu"]``
    says; threads: what a launch with the default runs (one per CPU, at most MAX_THREADS)."""
    return {"isa": list(_kernels.cpu_isas()), "threads": default_threads()}


def default_threads() -> int:
    """The threads of a kernel launch with the default (None): one per CPU of the affinity mask, at most
    MAX_THREADS (the extension's ``default_threads`` is the CPU count, which its pool caps)."""
    return min(int(_kernels.default_threads()), MAX_THREADS)


def _check_extension_layout() -> None:
    """The extension must be built from the same layout constants as ``formats`` (a stale build is not)."""
    tables = _kernels.tables()
    compiled = (tables["nested_blocksize"], tables["offset_chunk"])
    if compiled != (NESTED_BLOCKSIZE, OFFSET_CHUNK):
        msg = (
            f"converter._kernels was built with nested blocksize / offset chunk {compiled}, formats expects "
            f"{(NESTED_BLOCKSIZE, OFFSET_CHUNK)}: rebuild it (pip install --no-build-isolation -e .)"
        )
        raise ImportError(msg)


_check_extension_layout()
