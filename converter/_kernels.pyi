"""Typing stub of the private C++ extension converter._kernels (csrc/bindings.cpp).

Use converter.kernels.bnb4bit: it documents shapes and dtypes, validates, and passes data_ptr() ints here.
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

def gemv_bf16(
    x: int,
    dtype: str,
    batch: int,
    in_features: int,
    out_features: int,
    w: int,
    y: int,
    isa: str = "auto",
    threads: int = 0,
) -> None:
    """y[b, o] = sum_k x[b, k] * W[o, k] for batch 1..8, W bfloat16 [out, in], float32 accumulation."""

# CUDA backend (present only when has_cuda_build(); csrc/cuda/bindings_cuda.cpp). Device pointers are
# raw addresses on `device`; `stream` is a cudaStream_t address (torch.cuda.current_stream().cuda_stream);
# dtype codes and the nested inputs are documented in converter/kernels/bnb4bit_cuda.py, the only caller.

def cuda_available() -> tuple[int, str]:
    """(device_count, reason): device_count 0 with a one-line reason when no CUDA device is usable."""

def cuda_device_info(device: int) -> dict[str, object]:
    """name, capability, multiprocessors, total_memory, l2_bytes of `device`."""

def cuda_quantize_4bit(
    device: int,
    x: int,
    dtype: int,
    n: int,
    blocksize: int,
    quant_type: int,
    packed: int,
    absmax: int,
    flag: int,
    stream: int,
) -> None:
    """Blockwise 4-bit quantization on the GPU; `flag` (int32 on device) is set when a block holds NaN/Inf."""

def cuda_quantize_nested(
    device: int,
    absmax: int,
    nb: int,
    mids: int,
    chunk_sums: int,
    offset_out: int,
    codes: int,
    nested_absmax: int,
    stream: int,
) -> None:
    """Nested absmax quantization with the deterministic float64 chunked offset sum (same bits as CPU)."""

def cuda_dequantize_nested(
    device: int,
    codes: int,
    nb: int,
    nested_absmax: int,
    offset: float,
    map8: int,
    absmax_out: int,
    stream: int,
) -> None:
    """absmax = map8[codes] * nested_absmax[i // 256] + offset (separate multiply and add)."""

def cuda_dequantize_4bit(
    device: int,
    packed: int,
    n: int,
    blocksize: int,
    absmax: int,
    ncodes: int,
    nested_absmax: int,
    offset: float,
    map8: int,
    quant_map: int,
    out_dtype: int,
    out: int,
    stream: int,
) -> None:
    """Dequantize to out_dtype; with ncodes != 0 the nested absmax is decoded inline."""

def cuda_gemv_4bit(
    device: int,
    x: int,
    dtype: int,
    batch: int,
    N: int,
    K: int,
    blocksize: int,
    packed: int,
    absmax: int,
    ncodes: int,
    nested_absmax: int,
    offset: float,
    map8: int,
    quant_map: int,
    y: int,
    stream: int,
    variant: int = 0,
) -> None:
    """Fused 4-bit GEMV, batch 1..8; `variant` selects a kernel configuration (benchmarks only)."""

# MoE on CUDA (csrc/cuda/bindings_moe_cuda.cpp; used through converter.loader.moe_cuda)
def cuda_gemv_4bit_grouped(
    device: int,
    x: int,
    dtype: int,
    groups: int,
    x_share: int,
    N: int,
    K: int,
    blocksize: int,
    ids: int,
    experts: int,
    packed: int,
    packed_stride: int,
    absmax: int,
    absmax_stride: int,
    quant_map: int,
    y: int,
    stream: int,
) -> None:
    """y[g, o] = sum_k x[g // x_share, k] * W_ids[g][o, k]; ids int64 on the device (no host sync)."""

def cuda_gemv_4bit_grouped_glu(
    device: int,
    x: int,
    dtype: int,
    groups: int,
    x_share: int,
    I: int,
    K: int,
    blocksize: int,
    ids: int,
    experts: int,
    packed: int,
    packed_stride: int,
    absmax: int,
    absmax_stride: int,
    quant_map: int,
    h: int,
    stream: int,
) -> None:
    """h[g] = silu(x[g // x_share] @ W_gate.T) * (x[g // x_share] @ W_up.T), W of expert ids[g]."""

def cuda_gemv_4bit_grouped_sum(
    device: int,
    h: int,
    dtype: int,
    tokens: int,
    k: int,
    N: int,
    K: int,
    blocksize: int,
    ids: int,
    experts: int,
    weights: int,
    w_dtype: int,
    packed: int,
    packed_stride: int,
    absmax: int,
    absmax_stride: int,
    quant_map: int,
    y: int,
    stream: int,
) -> None:
    """y[t] = sum_j weights[t k + j] * (h[t k + j] @ W_ids[t k + j].T), float32, one rounding; k <= 32."""

def cuda_dequantize_4bit_grouped(
    device: int,
    ids: int,
    count: int,
    experts: int,
    packed: int,
    packed_stride: int,
    absmax: int,
    absmax_stride: int,
    n: int,
    blocksize: int,
    quant_map: int,
    out_dtype: int,
    out: int,
    stream: int,
) -> None:
    """out[i, :n] = the dequantized weights of expert ids[i]."""

def quant_error_stats(
    x: int,
    dtype: str,
    n: int,
    blocksize: int,
    packed: int,
    absmax: int,
    quant_map: int,
    isa: str = "auto",
    threads: int = 0,
) -> tuple[float, float, float, int]:
    """(sum x^2, sum (x - v)^2, max |x - v|, non-finite count), v = quant_map[q] * absmax[block] (f32)."""

def int8_error_stats(
    x: int, dtype: str, rows: int, cols: int, codes: int, scb: int, threads: int = 0
) -> tuple[float, float, float, int]: ...
def count_nonfinite(x: int, dtype: str, n: int, threads: int = 0) -> int:
    """Number of NaN / Inf elements of x (float32 / float16 / bfloat16)."""

# LLM.int8 (csrc/bindings_int8.cpp, csrc/int8_cpu.h; used through converter.kernels.int8)
int8_scale_table_size: int
int8_inv127_bits: int
gemv_int8_max_batch: int

def quantize_int8(
    x: int,
    dtype: str,
    rows: int,
    cols: int,
    codes: int,
    scb: int,
    scale_table: int = 0,
    isa: str = "auto",
    threads: int = 0,
) -> int:
    """Row-wise int8 codes + SCB; scale_table 0 = bnb's CPU scale. Returns rows holding NaN/Inf."""

def dequantize_int8(
    codes: int, scb: int, rows: int, cols: int, out: int, out_dtype: str, isa: str = "auto", threads: int = 0
) -> None:
    """out = f32(f32(codes * SCB[row]) * f32(1/127)) cast to out_dtype."""

def gemv_int8(
    x: int,
    dtype: str,
    batch: int,
    in_features: int,
    out_features: int,
    codes: int,
    scb: int,
    y: int,
    isa: str = "auto",
    threads: int = 0,
) -> None:
    """y = x @ (codes * SCB / 127).T for batch 1..8 (float32 sums)."""

def cuda_quantize_int8(
    device: int,
    x: int,
    dtype: int,
    rows: int,
    cols: int,
    table: int,
    codes: int,
    scb: int,
    flag: int,
    stream: int,
) -> None:
    """CUDA int8 quantize (csrc/cuda/int8.cu); table 0 = bnb's CPU scale, else the __fdividef table."""

def cuda_dequantize_int8(
    device: int, codes: int, scb: int, rows: int, cols: int, out_dtype: int, out: int, stream: int
) -> None:
    """CUDA int8 dequantize to out_dtype."""

def cuda_gemv_int8(
    device: int,
    x: int,
    dtype: int,
    batch: int,
    N: int,
    K: int,
    codes: int,
    scb: int,
    bias: int,
    y: int,
    stream: int,
    variant: int = 0,
) -> None:
    """CUDA int8 GEMV (csrc/cuda/gemv_int8.cu): y[b, n] = x @ (codes * SCB / 127).T (+ bias, 0 = none)."""

# Torch-free --device cuda (csrc/cuda/host_pipeline.*, bindings_host_pipeline.cpp; caller:
# converter/quantize/cuda_host.py). Host buffers are numpy addresses, kept alive until wait() returns.

def cuda_init(device: int) -> None:
    """Create the CUDA context of `device` now (cudaSetDevice + cudaFree(0)), GIL released."""

class CudaHostPipeline:
    """One worker thread quantizing submitted host tensors in order through pinned chunks."""

    def __init__(
        self,
        device: int,
        quant_type: int,
        blocksize: int,
        nested: bool,
        chunk_bytes: int,
        threads: int,
        mids: list[float],
    ) -> None: ...
    def submit(
        self, x: int, dtype: int, n: int, packed: int, absmax: int, codes: int, nested_absmax: int
    ) -> int:
        """Queue n elements of dtype code (0 f32, 1 f16, 2 bf16); returns a ticket."""
    def wait(self, ticket: int) -> tuple[bool, float, float, float, float, float]:
        """(nonfinite, offset, seconds stage, upload, kernels, download) once the ticket is done."""
