"""MoE experts on CUDA: the launches of ``csrc/cuda/gemv_grouped.cu`` and the prefill forward.

A layer's experts are one buffer (``converter.loader.moe``): ``packed [E, gate_up + down bytes]`` uint8
and ``absmax [E, gate_up + down blocks]`` float32, so expert ``e``'s projection is the region at a
fixed byte / block offset into row ``e``. Both kernels take the expert ids as an int64 tensor on the
device and read it themselves: a decode step launches without waiting for the host, and a CUDA graph
captured once replays for any routing.

- :func:`decode_silu` (decode, SiLU experts: Qwen, Mixtral, OLMoE, DeepSeek): two launches per
  layer, the first projection with act(gate) * up fused in, the second with the routing-weighted sum
  over the k slots fused in; :func:`grouped_gemv` (other activations): ``y[g] = x[g // x_share] @
  W_ids[g].T`` for every routed (token, slot) pair, one launch per projection.
- :func:`grouped_dequantize` + :func:`prefill` (more tokens): tokens sorted by expert, the hit
  experts dequantized in one launch per projection (in chunks that bound the scratch), then one
  grouped matmul (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``, bf16 on sm80+) or, where
  that is unavailable, one ``F.linear`` per hit expert. Prefill reads the expert counts on the host
  once per layer (the hit experts' number sizes the scratch); it is not meant for CUDA-graph capture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from converter.kernels.checks import KERNEL_DTYPE_CODES
from converter.kernels.cuda_launch import current_stream, device_index
from converter.loader.moe_records import region_pointers

#: Largest top-k of the fused decode (the second kernel's CTA holds rows x k slots of 8+ lanes, 256 threads).
FUSED_MAX_K = 32

#: ``lanes`` of :func:`decode_silu` that forces its tensor-core kernels (moe_cuda.h: kGroupedLanesMma).
MMA_LANES = 1

#: Bound on the dequantized scratch of one prefill chunk (bytes); a chunk holds at least one expert.
PREFILL_SCRATCH_BYTES = 512 << 20


@functools.cache
def _ext():
    """The extension module when it has the CUDA MoE kernels and a usable device, else None."""
    try:
        from converter import _kernels
        from converter.kernels import bnb4bit_cuda as kernels_cuda
    except ImportError:  # no extension built: the loader's torch paths run
        return None
    if not hasattr(_kernels, "cuda_gemv_4bit_grouped") or not kernels_cuda.cuda_status()[0]:
        return None
    return _kernels


def available() -> bool:
    """Whether this build has the CUDA MoE kernels (a CUDA build with a usable device)."""
    return _ext() is not None


def layout_ok(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, in_features: int, bs: int) -> bool:
    """The kernels' layout conditions: whole blocks per row, 16-byte aligned rows of x and of every
    expert's codes (the loader's buffers always are; a view at an odd offset is not)."""
    return (
        x.dtype in KERNEL_DTYPE_CODES
        and in_features % bs == 0
        and bs >= 32
        and packed.is_contiguous()
        and absmax.is_contiguous()
        and packed.data_ptr() % 16 == 0
        and packed.stride(0) % 16 == 0
    )


def _launch_args(t: torch.Tensor) -> tuple[int, int]:
    """(device index, raw current stream) of t's device: the first and last argument of every launch."""
    device = t.device
    return device_index(device), current_stream(device)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous (a Python check costs less than a ``.contiguous()`` dispatch)."""
    return t if t.is_contiguous() else t.contiguous()


def flat_ids(top_k_index: torch.Tensor) -> torch.Tensor:
    """The routed expert ids as one contiguous int64 vector: the router's own tensor viewed when it is one
    (the kernels read the ids by pointer)."""
    ids = _dense(top_k_index.reshape(-1))  # reshape may give a strided view of a strided tensor
    return ids if ids.dtype == torch.int64 else ids.to(torch.int64)


def grouped_gemv(
    x: torch.Tensor,
    ids: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    *,
    x_share: int,
    byte_offset: int,
    block_offset: int,
    out_features: int,
    in_features: int,
    blocksize: int,
    lanes: int = 0,
) -> torch.Tensor:
    """y [G, out] with row g = x[g // x_share] @ W_ids[g].T, x's dtype, float32 accumulation.

    ``ids`` int64 [G] on x's device (an id outside the layer's experts gives a NaN row: the host never
    sees the ids). W_e: the codes ``byte_offset`` bytes into ``packed[e]``, the absmax ``block_offset``
    entries into ``absmax[e]``. ``lanes``: threads per output row, 0 (chosen by in_features) or a
    forced 8 / 16 / 32 (tests and benchmarks).
    """
    groups = ids.numel()
    if x.shape[0] * x_share != groups or x.shape[1] != in_features or byte_offset % 16:
        msg = (
            f"grouped GEMV: x {tuple(x.shape)} with x_share {x_share} does not match {groups} expert ids "
            f"and in_features {in_features} (or byte offset {byte_offset} is not a multiple of 16)"
        )
        raise ValueError(msg)
    x = x.contiguous()
    if x.data_ptr() % 16:  # a view at an odd offset: the kernel reads x in 16-byte words
        x = x.clone()
    ids = ids.to(torch.int64).contiguous()
    y = torch.empty(groups, out_features, dtype=x.dtype, device=x.device)
    device, stream = _launch_args(x)
    _ext().cuda_gemv_4bit_grouped(
        device,
        x.data_ptr(),
        KERNEL_DTYPE_CODES[x.dtype],
        groups,
        x_share,
        out_features,
        in_features,
        blocksize,
        ids.data_ptr(),
        packed.shape[0],
        *region_pointers(packed, absmax, byte_offset, block_offset),
        quant_map.data_ptr(),
        y.data_ptr(),
        stream,
        lanes,
    )
    return y


def decode_silu(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    intermediate: int,
    bs: int,
    lanes: int = 0,
) -> torch.Tensor:
    """Decode with SiLU experts in two launches: ``h = silu(x Wg.T) * (x Wu.T)`` for every routed (token,
    slot) row, then ``y[t] = sum_j w[t, j] * h[t k + j] Wd.T``; float32 inside each kernel, one rounding
    of h and of y to x's dtype. Ids and weights are read on the device (no host sync).

    ``lanes``: 0 picks the kernels: for 16-bit x the tensor-core ones where the layout allows (K a
    multiple of 256, blocksize >= 64, k <= 8; code values rounded to x's dtype, as the dense fused GEMV
    does), else the CUDA-core ones with threads per output row chosen by each projection's K. Tests and
    benchmarks force :data:`MMA_LANES` (tensor cores; a ``RuntimeError`` where the layout does not
    allow them) or 8 / 16 / 32 threads per row on CUDA cores (the second launch needs k <= 256 / lanes)."""
    tokens, hidden_dim = hidden.shape
    k = top_k_index.shape[1]
    # Python checks before each copy: an eager decode step is host-bound, every dispatch counts
    x = hidden if hidden.is_contiguous() else hidden.contiguous()
    if x.data_ptr() % 16:  # a view at an odd offset: the kernel reads x in 16-byte words
        x = x.clone()
    ids = flat_ids(top_k_index)
    weights = _dense(top_k_weights.reshape(-1))
    if weights.dtype not in KERNEL_DTYPE_CODES:
        weights = weights.float()
    h = torch.empty(tokens * k, intermediate, dtype=x.dtype, device=x.device)
    y = torch.empty(tokens, hidden_dim, dtype=x.dtype, device=x.device)
    device, stream = _launch_args(x)
    ext = _ext()
    ext.cuda_gemv_4bit_grouped_glu(
        device, x.data_ptr(), KERNEL_DTYPE_CODES[x.dtype], tokens * k, k, intermediate, hidden_dim, bs,
        ids.data_ptr(), packed.shape[0], *region_pointers(packed, absmax, 0, 0), quant_map.data_ptr(),
        h.data_ptr(), stream, lanes,
    )  # fmt: skip
    gu_bytes, gu_blocks = intermediate * hidden_dim, 2 * intermediate * hidden_dim // bs
    ext.cuda_gemv_4bit_grouped_sum(
        device, h.data_ptr(), KERNEL_DTYPE_CODES[x.dtype], tokens, k, hidden_dim, intermediate, bs,
        ids.data_ptr(), packed.shape[0], weights.data_ptr(), KERNEL_DTYPE_CODES[weights.dtype],
        *region_pointers(packed, absmax, gu_bytes, gu_blocks), quant_map.data_ptr(), y.data_ptr(), stream,
        lanes,
    )  # fmt: skip
    return y


def grouped_dequantize(
    ids: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    *,
    byte_offset: int,
    block_offset: int,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[len(ids), n] of ``dtype``: each listed expert's region dequantized as ``dequantize_4bit`` does."""
    if n % 32 or byte_offset % 16:
        msg = f"grouped dequantize: n {n} is not a multiple of 32 or byte offset {byte_offset} of 16"
        raise ValueError(msg)
    ids = ids.to(torch.int64).contiguous()
    out = torch.empty(ids.numel(), n, dtype=dtype, device=packed.device)
    device, stream = _launch_args(packed)
    _ext().cuda_dequantize_4bit_grouped(
        device,
        ids.data_ptr(),
        ids.numel(),
        packed.shape[0],
        *region_pointers(packed, absmax, byte_offset, block_offset),
        n,
        blocksize,
        quant_map.data_ptr(),
        KERNEL_DTYPE_CODES[dtype],
        out.data_ptr(),
        stream,
    )
    return out


def _grouped_mm_fn(x: torch.Tensor) -> Callable | None:
    """torch's grouped matmul for these activations, or None (then one F.linear per expert)."""
    if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
        return None
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _linear_sorted(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of x sorted by expert, ``counts[i]`` rows for ``w[i]`` ([n, out, in]): x_i @ w[i].T stacked."""
    mm = _grouped_mm_fn(x)
    if mm is not None:
        offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x.device)
        return mm(x, w.transpose(-2, -1), offs=offs)
    return torch.cat([F.linear(part, w[i]) for i, part in enumerate(x.split(counts))])


def prefill(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    intermediate: int,
    bs: int,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """[T, H]: every (token, slot) pair sorted by expert, hit experts dequantized per chunk, grouped matmuls,
    act(gate) * up, the routing weight, and a float32 sum over each token's k slots."""
    tokens, hidden_dim = hidden.shape
    k = top_k_index.shape[1]
    gu_n, dn_n = 2 * intermediate * hidden_dim, hidden_dim * intermediate
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts_all = torch.bincount(flat, minlength=packed.shape[0])
    hit = torch.nonzero(counts_all).reshape(-1)
    counts = counts_all[hit].tolist()  # the one host synchronisation
    hit_ids = hit.to(torch.int64)
    rows_x = hidden[order // k]
    weights = top_k_weights.reshape(-1)[order]
    per_expert = (gu_n + dn_n) * hidden.element_size()
    chunk = max(1, PREFILL_SCRATCH_BYTES // per_expert)
    out = torch.zeros(tokens, hidden_dim, dtype=torch.float32, device=hidden.device)
    start = 0
    for c0 in range(0, len(counts), chunk):
        ids, cnt = hit_ids[c0 : c0 + chunk], counts[c0 : c0 + chunk]
        stop = start + sum(cnt)
        common = dict(blocksize=bs, dtype=hidden.dtype)
        w_gu = grouped_dequantize(
            ids, packed, absmax, quant_map, byte_offset=0, block_offset=0, n=gu_n, **common
        )
        gate_up = _linear_sorted(rows_x[start:stop], w_gu.view(-1, 2 * intermediate, hidden_dim), cnt)
        del w_gu
        gate, up = gate_up.chunk(2, dim=-1)
        h = act(gate) * up
        w_dn = grouped_dequantize(
            ids, packed, absmax, quant_map, byte_offset=intermediate * hidden_dim,
            block_offset=gu_n // bs, n=dn_n, **common,
        )  # fmt: skip
        y = _linear_sorted(h, w_dn.view(-1, hidden_dim, intermediate), cnt)
        del w_dn
        y = y * weights[start:stop, None]
        out.index_add_(0, order[start:stop] // k, y.float())
        start = stop
    return out.to(hidden.dtype)
