"""Typing stub of the private C++ extension converter._kernels (csrc/bindings.cpp).

Use converter.kernels: it documents shapes and dtypes, validates, and passes data_ptr() ints here.
Pointers are raw addresses owned by the caller; dtype names are "float32" | "float16" | "bfloat16";
isa is "auto" | "scalar" | "avx2" | "avx512"; threads <= 0 means one per CPU of the affinity mask.
"""

__version__: str

def tables() -> dict[str, list[float] | list[int] | float | int]:
    """The code tables compiled into the kernels (float32 values widened to Python floats)."""

def cpu_isas() -> list[str]:
    """Kernel paths this CPU can run, best last: a subset of ['scalar', 'avx2', 'avx512']."""

def default_threads() -> int:
    """Threads used when threads <= 0: CPUs in the affinity mask."""

def has_cuda_build() -> bool:
    """Whether this extension was compiled with the CUDA backend."""

def quantize_4bit(
    x: int,
    dtype: str,
    n: int,
    blocksize: int,
    quant_type: int,
    packed: int,
    absmax: int,
    isa: str = "auto",
    threads: int = 0,
) -> int:
    """Blockwise 4-bit quantization into packed [(n+1)//2] u8 and absmax [ceil(n/blocksize)] f32.

    Returns the number of blocks that hold a NaN or Inf (0 when the input is finite).
    """

def quantize_nested(
    absmax: int, nb: int, codes: int, nested_absmax: int, isa: str = "auto", threads: int = 0
) -> float:
    """Nested quantization of nb f32 absmax into codes [nb] u8 and nested_absmax [ceil(nb/256)] f32.

    Returns the float32 offset, or NaN when absmax holds a NaN or Inf.
    """

def dequantize_nested(
    codes: int, nb: int, nested_absmax: int, offset: float, nested_map: int, out: int, threads: int = 0
) -> None:
    """absmax = nested_map[codes] * nested_absmax[i // 256] + offset."""

def dequantize_4bit(
    packed: int,
    absmax: int,
    n: int,
    blocksize: int,
    quant_map: int,
    out: int,
    out_dtype: str,
    isa: str = "auto",
    threads: int = 0,
) -> None:
    """out[k] = quant_map[q[k]] * absmax[k // blocksize] in f32, cast to out_dtype (round to nearest even)."""

def gemv_4bit(
    x: int,
    dtype: str,
    batch: int,
    in_features: int,
    out_features: int,
    blocksize: int,
    packed: int,
    quant_map: int,
    absmax: int,
    absmax_codes: int,
    nested_absmax: int,
    offset: float,
    nested_map: int,
    y: int,
    isa: str = "auto",
    threads: int = 0,
) -> None:
    """y[b, o] = sum_k x[b, k] * W[o, k] for batch 1..8 (absmax == 0: nested absmax). y has x's dtype."""
