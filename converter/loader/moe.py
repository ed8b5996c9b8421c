"""MoE experts in the loader: per-expert 4-bit records -> one :class:`QuantExperts4bit` per layer.

transformers 5.x keeps a layer's routed experts in one module (``Qwen3MoeExperts``,
``MixtralExperts``, ``OlmoeExperts``, ``DeepseekV3Experts``...) with fused 3-D parameters
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` and calls it as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``. A folder written with
``--moe-experts quantize`` has one bnb record per expert per projection
(``<layer>.mlp.experts.<e>.gate_proj.weight``; Mixtral ``block_sparse_moe.experts.<e>.w1``).

:func:`converter.loader.moe_attach.attach_experts` replaces each such module by a
:class:`QuantExperts4bit` whose codes and scales are one buffer per layer: ``packed [E, I*H +
H*I/2]`` (per expert: gate rows, up rows, then down) and ``absmax [E, 2*I*H/bs + H*I/bs]`` float32
(nested absmax decoded at load, exactly as the kernels decode it), so every expert's weights are
zero-copy views. The forward
(``quantize_model::moe_experts_4bit``, a torch custom op with a fake implementation, so
``torch.compile`` traces the model with the experts as one node; there its keyed twin
``moe_experts_4bit_keyed``, which reads the absmax and code table the layer registered under a key,
converter/kernels/prepared.py) runs only the experts the router picked:

- decode (at most 8 tokens on the CPU, whole blocks per row): every (token, slot) pair is a row of one
  grouped 4-bit GEMV per projection (``csrc/gemv_grouped.cpp``, indexed by the routed expert ids),
  then act(gate) * up, the routing weight and a float32-accumulated sum over the k slots;
- on CUDA (``converter.loader.moe_cuda``, the op's CUDA kernel): decode (at most 8 tokens, or any count
  inside a CUDA-graph capture) runs grouped GEMVs on the GPU with the expert ids and routing weights read
  on the device (no host sync): for SiLU experts two launches, act(gate) * up fused into the first and
  the weighted k-slot sum into the second, otherwise the CPU's sequence; prefill sorts tokens by
  expert, dequantizes the hit experts in one launch per projection and runs one grouped matmul (bf16)
  or one F.linear per hit expert;
- otherwise (prefill on the CPU, ``use_gemv = False``, shapes the GEMV cannot take) tokens are
  sorted by expert and the hit experts run in ascending order as transformers' eager loop does: an
  expert with at most 8 tokens through the fused GEMV, one with more dequantized once and multiplied
  with all its tokens (F.linear).
  Everything else is transformers' own arithmetic (act(gate) * up, routing weight, index_add_ in the
  model dtype), so with ``use_gemv = False`` the output is bit-identical to the dequantized bf16
  model's.

Experts whose class gates with its own ``_apply_gate`` (DeepSeek-V4, GLM-5) run that gate between
the two grouped GEMVs on decode (CPU and CUDA), and in the per-expert loop otherwise. gpt-oss' biased
experts (converter/loader/moe_gpt_oss.py) run the same forward with per-expert biases (:class:`ExpertBiases`)
and their gate: grouped GEMVs on decode (CPU and CUDA), the loop otherwise, and compile through
``moe_experts_4bit_gated_keyed``.

A folder whose experts were kept 16-bit (``--moe-experts keep``) has per-expert tensors too; they
are stacked into the fused parameters here (transformers' own loader does the same merge).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from converter.kernels import prepared
from converter.kernels.checks import KERNEL_DTYPE_NAMES
from converter.kernels.cpu_threads import gemv_threads
from converter.loader import moe_cuda, ops
from converter.loader.module import dtype_from_name
from converter.loader.moe_fused import (
    fused_state_dict,
    split_record,
)
from converter.loader.moe_records import (
    ROLES,
    MoeLoadError,
    StackedExperts,
    expert_state_dict,
    host,
    region_pointers,
    stack_records,
)
from formats.record import QuantizedTensor

#: Activations the custom op knows by name (config.hidden_act); others run the module's own act_fn.
_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class ExpertBiases(NamedTuple):
    """Per-expert biases (gpt-oss: converter/loader/moe_gpt_oss.py), added after each projection."""

    gate_up: torch.Tensor  # [E, 2I]
    down: torch.Tensor  # [E, H]


def _experts_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    intermediate: int,
    blocksize: int,
    act: Callable[[torch.Tensor], torch.Tensor],
    use_gemv: bool,
    apply_gate: Callable[[torch.Tensor], torch.Tensor] | None = None,
    biases: ExpertBiases | None = None,
) -> torch.Tensor:
    """transformers' eager experts loop with 4-bit weights (module docstring). ``apply_gate``: the
    experts class's own gating of the gate/up output (DeepSeek-V4's clamped SwiGLU, gpt-oss' interleaved
    one), instead of ``act(gate) * up``.

    ``biases`` (gpt-oss' ``GptOssExperts``): each projection rounded, then its expert's bias added (not
    ``F.linear`` with a bias, which fuses the add), before the gate and before the routing weight; the
    dequantize path multiplies as that class does, ``x @ W`` with W laid out ``[in, out]`` contiguous as
    it holds it (the same matmul, bit for bit). Decode of biased experts takes the grouped GEMV with
    their gate, as does a class's own gate without biases (DeepSeek-V4)."""
    hidden_dim = hidden.shape[1]
    num_experts = packed.shape[0]
    gu_bytes, gu_blocks = intermediate * hidden_dim, 2 * intermediate * hidden_dim // blocksize
    if use_gemv and _grouped_ok(hidden, intermediate, blocksize):
        return _decode_grouped(
            hidden, top_k_index, top_k_weights, packed, absmax, quant_map, intermediate, blocksize, act,
            _grouped_gemv_rows, apply_gate, biases,
        )  # fmt: skip
    out = torch.zeros_like(hidden)
    # a token routed to one expert in two of its slots (a custom router, or top-k past the experts with
    # nonzero weight) is two rows of that expert: both count, as in transformers' index_add_
    repeats = _has_repeats(top_k_index)
    gemv_gu = use_gemv and hidden_dim % blocksize == 0 and ops.kernel_backend(hidden.device) is not None
    gemv_dn = use_gemv and intermediate % blocksize == 0 and ops.kernel_backend(hidden.device) is not None
    f32 = use_gemv and ops.f32_prefill(hidden)  # bf16 on a CPU without native bf16 matmuls: float32
    x_at_w = biases is not None
    for e, slot, token_idx in _expert_rows(top_k_index, num_experts):
        n = token_idx.shape[0]
        x = hidden[token_idx]
        p, a = packed[e], absmax[e]
        gu = (p[:gu_bytes], a[:gu_blocks], quant_map, 2 * intermediate, hidden_dim, blocksize)
        dn = (p[gu_bytes:], a[gu_blocks:], quant_map, hidden_dim, intermediate, blocksize)
        small = n <= ops.GEMV_MAX_TOKENS
        gate_up = _gemv(x, *gu) if gemv_gu and small else _dequant_linear(x, *gu, x_at_w, f32)
        if biases is not None:
            gate_up = gate_up + biases.gate_up[e]
        if apply_gate is not None:
            h = apply_gate(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = act(gate) * up
        y = _gemv(h, *dn) if gemv_dn and small else _dequant_linear(h, *dn, x_at_w, f32)
        if biases is not None:
            y = y + biases.down[e]
        y = y * top_k_weights[token_idx, slot, None]
        if repeats:  # a token more than once in token_idx: transformers' own index_add_ (accumulates)
            out.index_add_(0, token_idx, y.to(out.dtype))
        else:
            # out.index_add_(0, token_idx, y) as transformers does, bit for bit (a token appears once per
            # expert, each sum rounds once to out's dtype); bf16 index_add_ is ~10^4 times slower on CPU.
            out[token_idx] = out[token_idx] + y.to(out.dtype)
    return out


def _dequant_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    out_features: int,
    in_features: int,
    blocksize: int,
    x_at_w: bool,
    f32: bool,
) -> torch.Tensor:
    """One expert's projection of ``x`` by its dequantized weight: in x's dtype (transformers' loop on
    the decoded weights), or with ``f32`` (``ops.f32_prefill``) the exact float32 weight and x widened,
    rounded once to x's dtype, as the 4-bit linear layers' prefill there."""
    dtype = torch.float32 if f32 else x.dtype
    w = _dequant(packed, absmax, quant_map, out_features * in_features, blocksize, dtype)
    w = w.view(out_features, in_features)
    return _dense_linear(x.float(), w, x_at_w).to(x.dtype) if f32 else _dense_linear(x, w, x_at_w)


def _dense_linear(x: torch.Tensor, w: torch.Tensor, x_at_w: bool) -> torch.Tensor:
    """x @ w.T for a decoded weight w [out, in]: ``F.linear`` (transformers' fused-experts loop), or with
    ``x_at_w`` the matmul of a class holding W as ``[in, out]`` (gpt-oss: ``x @ W``, W contiguous)."""
    return x @ w.T.contiguous() if x_at_w else F.linear(x, w)


def _has_repeats(top_k_index: torch.Tensor) -> bool:
    """Whether some token has the same expert in two of its top-k slots (a host sync)."""
    if top_k_index.shape[1] < 2:
        return False
    ids = top_k_index.sort(dim=1).values
    return bool((ids[:, 1:] == ids[:, :-1]).any())


def _expert_rows(
    top_k_index: torch.Tensor, num_experts: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, slots, tokens) of every hit expert, ascending: the (slot, token) pairs sorted by expert,
    inside an expert slot-major like transformers' torch.where(expert_mask[e]) (the same rows in the
    same order)."""
    tokens = top_k_index.shape[0]
    flat = top_k_index.t().reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        yield e, rows // tokens, rows % tokens


def _grouped_ok(hidden: torch.Tensor, intermediate: int, blocksize: int) -> bool:
    """Decode on the CPU: few tokens, whole blocks per row in both projections, the C++ kernel built."""
    return (
        hidden.device.type == "cpu"
        and hidden.shape[0] <= ops.GEMV_MAX_TOKENS
        and hidden.shape[1] % blocksize == 0
        and intermediate % blocksize == 0
        and hidden.dtype in KERNEL_DTYPE_NAMES
        and _grouped_kernel() is not None
    )


@functools.cache
def _grouped_kernel() -> Any | None:
    k = ops.kernel_backend(torch.device("cpu"))
    ext = getattr(k, "_kernels", None) if k is not None else None
    return getattr(ext, "gemv_4bit_grouped", None)


def _grouped_gemv(
    x: torch.Tensor,
    ids: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    *,
    byte_offset: int,
    block_offset: int,
    out_features: int,
    in_features: int,
    blocksize: int,
) -> torch.Tensor:
    """y [G, out] with row g = x[g] (or x[0] for every g when x has one row) @ W_ids[g].T.

    W_e is the region of expert e's codes starting ``byte_offset`` bytes into ``packed[e]`` and of its
    absmax starting ``block_offset`` entries into ``absmax[e]`` (gate_up at 0, down after it).
    """
    groups = ids.numel()
    y = torch.empty(groups, out_features, dtype=x.dtype)
    kernel = _grouped_kernel()
    kernel(
        x.data_ptr(),
        0 if x.shape[0] == 1 else in_features,
        KERNEL_DTYPE_NAMES[x.dtype],
        groups,
        in_features,
        out_features,
        blocksize,
        ids.data_ptr(),
        packed.shape[0],
        *region_pointers(packed, absmax, byte_offset, block_offset),
        quant_map.data_ptr(),
        y.data_ptr(),
        "auto",
        gemv_threads(groups * out_features * in_features // 2),
    )
    return y


def _decode_grouped(
    hidden, top_k_index, top_k_weights, packed, absmax, quant_map, intermediate, bs, act, gemv,
    apply_gate=None, biases=None, *, up_rows=2,
):  # fmt: skip
    """Decode: every (token, slot) pair is one row of a grouped GEMV indexed by the routed expert ids,
    one launch per projection (``gemv``: :func:`_grouped_gemv_rows` on the CPU,
    ``moe_cuda.grouped_gemv`` on CUDA); the k expert outputs of a token are weighted and summed.
    ``apply_gate`` / ``biases``: as :func:`_experts_forward` (the biases gathered by expert id on the
    device: ``bias[ids]``, no host sync). ``up_rows``: the first projection's rows per intermediate
    row (2: gate and up; 1: experts without a gate, converter/loader/moe_ungated.py, whose activation
    comes as ``apply_gate``)."""
    tokens, hidden_dim = hidden.shape
    k = top_k_index.shape[1]
    ids = moe_cuda.flat_ids(top_k_index)
    gate_up = gemv(
        hidden, ids, packed, absmax, quant_map, x_share=k, byte_offset=0, block_offset=0,
        out_features=up_rows * intermediate, in_features=hidden_dim, blocksize=bs,
    )  # fmt: skip
    if biases is not None:
        gate_up = gate_up + biases.gate_up[ids]
    if apply_gate is not None:
        h = apply_gate(gate_up)
    else:
        # act(gate) * up: a new contiguous tensor (one dispatch per op here: decode is host-bound)
        h = act(gate_up[:, :intermediate]).mul_(gate_up[:, intermediate:])
    if not h.is_contiguous():  # a module's own act_fn may keep the slice's strides; the GEMV reads rows
        h = h.contiguous()
    y = gemv(
        h, ids, packed, absmax, quant_map, x_share=1, byte_offset=up_rows * intermediate * hidden_dim // 2,
        block_offset=up_rows * intermediate * hidden_dim // bs, out_features=hidden_dim,
        in_features=intermediate, blocksize=bs,
    )  # fmt: skip
    if biases is not None:
        y = y + biases.down[ids]
    # y * w in the promoted dtype as before (in place when that is y's), then a sum over the k slots
    y, w = y.view(tokens, k, hidden_dim), top_k_weights.reshape(tokens, k, 1)
    y = (y.mul_(w) if w.dtype == y.dtype else y * w).sum(dim=1)
    return y if y.dtype == hidden.dtype else y.to(hidden.dtype)


def _grouped_gemv_rows(
    x: torch.Tensor, ids: torch.Tensor, *args: Any, x_share: int, **kw: Any
) -> torch.Tensor:
    """The CPU grouped GEMV with group g reading x row g // x_share (the CUDA kernel's convention)."""
    if x.shape[0] > 1 and x_share > 1:
        x = x.repeat_interleave(x_share, dim=0)
    return _grouped_gemv(x, ids, *args, **kw)


def _cuda_kernels_take(
    hidden: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, intermediate: int, blocksize: int
) -> bool:
    """Whether the CUDA MoE kernels take this layer: built, whole blocks per row in both projections,
    the buffers' layout (``moe_cuda.layout_ok``)."""
    return (
        moe_cuda.available()
        and intermediate % blocksize == 0
        and moe_cuda.layout_ok(hidden, packed, absmax, hidden.shape[1], blocksize)
    )


def _cuda_decode(hidden: torch.Tensor) -> bool:
    """Decode on CUDA: at most 8 tokens, or any count while a CUDA graph is being captured (no host sync)."""
    return hidden.shape[0] <= ops.GEMV_MAX_TOKENS or torch.cuda.is_current_stream_capturing()


def _experts_forward_cuda(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    intermediate: int,
    blocksize: int,
    act: Callable[[torch.Tensor], torch.Tensor],
    use_gemv: bool,
    apply_gate: Callable[[torch.Tensor], torch.Tensor] | None = None,
    biases: ExpertBiases | None = None,
) -> torch.Tensor:
    """CUDA: decode (<= 8 tokens, or any count while a CUDA graph is being captured: no host sync) as
    grouped GEMVs (SiLU: two fused launches; experts with their class's own gate, gpt-oss and
    DeepSeek-V4 / GLM-5: the two grouped launches with the biases, if any, gathered and the gate between
    them); prefill sorted by expert, grouped dequantize + grouped matmul (own gate: the per-expert loop,
    the fused kernels compute ``act(gate) * up``). Layouts the kernels do not take and
    ``use_gemv = False`` run :func:`_experts_forward`."""
    args = (hidden, top_k_index, top_k_weights, packed, absmax, quant_map, intermediate, blocksize, act)
    if not (use_gemv and _cuda_kernels_take(hidden, packed, absmax, intermediate, blocksize)):
        return _experts_forward(*args, use_gemv, apply_gate, biases)
    decode = _cuda_decode(hidden)
    if decode and apply_gate is None and act is F.silu and top_k_index.shape[1] <= moe_cuda.FUSED_MAX_K:
        return moe_cuda.decode_silu(*args[:-1])
    if decode:
        return _decode_grouped(*args, moe_cuda.grouped_gemv, apply_gate, biases)
    if apply_gate is not None:  # own-gate prefill: transformers' per-expert loop (GEMV or dequant + mm)
        return _experts_forward(*args, use_gemv, apply_gate, biases)
    return moe_cuda.prefill(*args)


def _gemv(x, packed, absmax, quant_map, out_features, in_features, blocksize) -> torch.Tensor:
    k = ops.kernel_backend(x.device)
    return k.gemv_4bit(
        x.contiguous(),
        packed,
        absmax,
        out_features=out_features,
        in_features=in_features,
        blocksize=blocksize,
        quant_map=quant_map,
        nested=None,
    )


def _dequant(packed, absmax, quant_map, n, blocksize, dtype) -> torch.Tensor:
    k = ops.kernel_backend(packed.device)
    if k is not None:
        return k.dequantize_4bit(
            packed, absmax, n=n, blocksize=blocksize, quant_map=quant_map, out_dtype=dtype
        )
    return ops._dequantize_torch(packed, absmax, n, blocksize, quant_map, dtype)


def _expert_weights(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    intermediate: int,
    hidden_dim: int,
    blocksize: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2I, H], down [H, I]) of one expert (its row of ``packed`` / ``absmax``), dequantized.

    float64 (no kernel dtype; ``model.double().dequantize()``): the float32 weights, cast, as the 4-bit
    linear layers decode them (float64 holds each float32 product exactly)."""
    if dtype == torch.float64:
        gu, dn = _expert_weights(
            packed, absmax, quant_map, intermediate, hidden_dim, blocksize, torch.float32
        )
        return gu.to(dtype), dn.to(dtype)
    gu_bytes, gu_blocks = intermediate * hidden_dim, 2 * intermediate * hidden_dim // blocksize
    gu = _dequant(packed[:gu_bytes], absmax[:gu_blocks], quant_map, 2 * gu_bytes, blocksize, dtype)
    dn = _dequant(packed[gu_bytes:], absmax[gu_blocks:], quant_map, gu_bytes, blocksize, dtype)
    return gu.view(2 * intermediate, hidden_dim), dn.view(hidden_dim, intermediate)


@torch.library.custom_op("quantize_model::moe_experts_4bit", mutates_args=())
def moe_experts_4bit(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    intermediate: int,
    blocksize: int,
    act: str,
    use_gemv: bool,
) -> torch.Tensor:
    """Routed experts of one layer: [T, H] -> [T, H] (see the module docstring)."""
    args = (hidden, top_k_index, top_k_weights, packed, absmax, quant_map, intermediate, blocksize)
    return _experts_forward(*args, _ACTS[act], use_gemv)


# The op's schema is moe_experts_4bit's signature; the CUDA kernel and the fake take the same positional
# arguments (the dispatcher passes them positionally: none is keyword-only).
@moe_experts_4bit.register_kernel("cuda")
def _(*args: Any) -> torch.Tensor:
    *tensors_and_sizes, act, use_gemv = args
    return _experts_forward_cuda(*tensors_and_sizes, _ACTS[act], use_gemv)


@moe_experts_4bit.register_fake
def _(hidden: torch.Tensor, *rest: Any) -> torch.Tensor:
    return torch.empty_like(hidden)


#: The derivative of each activation the op knows by name: (grad of act(z), z) -> grad of z (aten's own
#: backward kernels, as autograd runs them for the eager activations above).
_ACT_BACKWARDS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "silu": torch.ops.aten.silu_backward,
    "swish": torch.ops.aten.silu_backward,
    "relu": lambda g, z: torch.ops.aten.threshold_backward(g, z, 0),
    "gelu": lambda g, z: torch.ops.aten.gelu_backward(g, z, approximate="none"),
    "gelu_pytorch_tanh": lambda g, z: torch.ops.aten.gelu_backward(g, z, approximate="tanh"),
}


def _experts_backward(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    intermediate: int,
    blocksize: int,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``moe_experts_4bit`` for its input and routing weights (the 4-bit weights are frozen):
    each hit expert's forward recomputed with its weights dequantized (nothing was saved but the inputs),
    then y = w_k * down(act(gate) * up) differentiated by hand, in the forward's dtypes, the per-token
    sums over slots accumulated in float32."""
    tokens, hidden_dim = hidden.shape
    grad_hidden = torch.zeros(tokens, hidden_dim, dtype=torch.float32, device=hidden.device)
    grad_weights = torch.zeros(top_k_weights.shape, dtype=torch.float32, device=hidden.device)
    act_fn, act_backward = _ACTS[act], _ACT_BACKWARDS[act]
    for e, slot, token_idx in _expert_rows(top_k_index, packed.shape[0]):
        x, g = hidden[token_idx], grad_out[token_idx].to(hidden.dtype)
        w_gu, w_dn = _expert_weights(
            packed[e], absmax[e], quant_map, intermediate, hidden_dim, blocksize, x.dtype
        )
        gate, up = F.linear(x, w_gu).chunk(2, dim=-1)
        act_gate = act_fn(gate)
        y = F.linear(act_gate * up, w_dn)
        weight = top_k_weights[token_idx, slot]
        grad_weights[token_idx, slot] = (g.float() * y.float()).sum(-1)
        grad_h = F.linear(g * weight[:, None].to(g.dtype), w_dn.t())
        grad_gate = act_backward(grad_h * up, gate)
        grad_x = F.linear(torch.cat((grad_gate, grad_h * act_gate), dim=-1), w_gu.t())
        grad_hidden.index_add_(0, token_idx, grad_x.float())
    return grad_hidden.to(hidden.dtype), grad_weights.to(top_k_weights.dtype)


@torch.library.custom_op("quantize_model::moe_experts_4bit_backward", mutates_args=())
def moe_experts_4bit_backward(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    intermediate: int,
    blocksize: int,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``moe_experts_4bit`` for its input and routing weights (:func:`_experts_backward`)."""
    args = (packed, absmax, quant_map, intermediate, blocksize, act)
    return _experts_backward(grad_out, hidden, top_k_index, top_k_weights, *args)


@moe_experts_4bit_backward.register_fake
def _(grad_out: torch.Tensor, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
      *rest: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return torch.empty_like(hidden), torch.empty_like(top_k_weights)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    hidden, top_k_index, top_k_weights, packed, absmax, quant_map, intermediate, blocksize, act, _ = inputs
    ctx.save_for_backward(hidden, top_k_index, top_k_weights, packed, absmax, quant_map)
    ctx.sizes = (intermediate, blocksize, act)


def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
    hidden, top_k_index, top_k_weights, packed, absmax, quant_map = ctx.saved_tensors
    intermediate, blocksize, act = ctx.sizes
    grad_hidden, grad_weights = moe_experts_4bit_backward(
        grad_out, hidden, top_k_index, top_k_weights, packed, absmax, quant_map, intermediate, blocksize, act
    )
    return grad_hidden, None, grad_weights, None, None, None, None, None, None, None


moe_experts_4bit.register_autograd(_backward, setup_context=_setup_context)


# -- the keyed ops: a compiled graph's only input from a layer is its codes ----------------------------


class PreparedExperts(NamedTuple):
    """What the keyed ops read besides the layer's codes, registered under ``key`` while the layer lives
    (converter/kernels/prepared.py: one graph input and one tensor guard per layer in a compiled step,
    not three). The tensors are the layer's own buffers (no copies)."""

    packed: torch.Tensor  # uint8 [E, bytes]
    absmax: torch.Tensor  # float32 [E, blocks]
    quant_map: torch.Tensor  # float32 [16]: the layer's own table
    # experts with per-expert biases and their class's own gate (gpt-oss, moe_experts_4bit_gated_keyed);
    # the gate is a method of transformers' replaced module (never of the layer: the registry would keep
    # the layer alive)
    gate_up_bias: torch.Tensor | None = None  # [E, 2I]
    down_bias: torch.Tensor | None = None  # [E, H]
    apply_gate: Callable[[torch.Tensor], torch.Tensor] | None = None
    key: int = -1


def _unkey_experts(packed: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, absmax, quant_map): the codes given, the absmax and code table of the layer that registered
    ``key``. The codes are the registered ones, a copy of them (torch's ``cudagraphs`` backend copies
    non-static inputs) or codes put in place (``packed.data = ...``, which the eager call reads too)."""
    a = _lookup_experts(packed, key)
    return packed, a.absmax, a.quant_map


def _lookup_experts(packed: torch.Tensor, key: int) -> PreparedExperts:
    """The :class:`PreparedExperts` registered under ``key``, checked against the codes given."""
    a = prepared.lookup(key)
    if packed.shape != a.packed.shape or packed.device != a.packed.device:
        msg = (
            f"moe_experts_4bit_keyed: key {key} was registered for experts codes {tuple(a.packed.shape)} on "
            f"{a.packed.device}, called with {tuple(packed.shape)} on {packed.device} (the layer's `packed` "
            "replaced behind it, e.g. `experts._buffers['packed'] = ...`); assign the new tensors as "
            "attributes (`experts.packed = ...`, `experts.absmax = ...`) or load them with load_state_dict"
        )
        raise ValueError(msg)
    return a


@torch.library.custom_op("quantize_model::moe_experts_4bit_keyed", mutates_args=())
def moe_experts_4bit_keyed(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    packed: torch.Tensor,
    key: int,
    intermediate: int,
    blocksize: int,
    act: str,
    use_gemv: bool,
) -> torch.Tensor:
    """``moe_experts_4bit`` with the layer's absmax and code table read by ``key``
    (:class:`PreparedExperts`)."""
    absmax_args = _unkey_experts(packed, key)
    return _experts_forward(
        hidden, top_k_index, top_k_weights, *absmax_args, intermediate, blocksize, _ACTS[act], use_gemv
    )


@moe_experts_4bit_keyed.register_kernel("cuda")
def _(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, packed: torch.Tensor,
      key: int, intermediate: int, blocksize: int, act: str, use_gemv: bool) -> torch.Tensor:  # fmt: skip
    absmax_args = _unkey_experts(packed, key)
    return _experts_forward_cuda(
        hidden, top_k_index, top_k_weights, *absmax_args, intermediate, blocksize, _ACTS[act], use_gemv
    )


@moe_experts_4bit_keyed.register_fake
def _(hidden: torch.Tensor, *rest: Any) -> torch.Tensor:
    return torch.empty_like(hidden)


def _gated_args(packed: torch.Tensor, key: int) -> tuple:
    """(packed, absmax, quant_map) and (apply_gate, biases) of a gated layer registered under ``key``."""
    a = _lookup_experts(packed, key)
    if a.apply_gate is None or a.gate_up_bias is None or a.down_bias is None:
        msg = f"moe_experts_4bit_gated_keyed: key {key} was registered by experts without a gate and biases"
        raise ValueError(msg)
    return (packed, a.absmax, a.quant_map), (a.apply_gate, ExpertBiases(a.gate_up_bias, a.down_bias))


def _no_act(x: torch.Tensor) -> torch.Tensor:  # the gated experts never call the activation
    msg = "gated experts run their own gate"
    raise AssertionError(msg)


@torch.library.custom_op("quantize_model::moe_experts_4bit_gated_keyed", mutates_args=())
def moe_experts_4bit_gated_keyed(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    packed: torch.Tensor,
    key: int,
    intermediate: int,
    blocksize: int,
    use_gemv: bool,
) -> torch.Tensor:
    """Routed experts with per-expert biases and their class's own gate (gpt-oss), everything but the
    codes read by ``key`` (:class:`PreparedExperts`: absmax, code table, biases, the gate): the eager
    forward's own implementation (:func:`_experts_forward`), so a compiled graph gives the eager bits.
    Inference only (no autograd formula: a layer that needs gradients runs eagerly)."""
    buffers, (gate, biases) = _gated_args(packed, key)
    rest = (intermediate, blocksize, _no_act, use_gemv, gate, biases)
    return _experts_forward(hidden, top_k_index, top_k_weights, *buffers, *rest)


@moe_experts_4bit_gated_keyed.register_kernel("cuda")
def _(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, packed: torch.Tensor,
      key: int, intermediate: int, blocksize: int, use_gemv: bool) -> torch.Tensor:  # fmt: skip
    buffers, (gate, biases) = _gated_args(packed, key)
    rest = (intermediate, blocksize, _no_act, use_gemv, gate, biases)
    return _experts_forward_cuda(hidden, top_k_index, top_k_weights, *buffers, *rest)


@moe_experts_4bit_gated_keyed.register_fake
def _(hidden: torch.Tensor, *rest: Any) -> torch.Tensor:
    return torch.empty_like(hidden)


@torch.library.custom_op("quantize_model::moe_experts_4bit_backward_keyed", mutates_args=())
def moe_experts_4bit_backward_keyed(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    packed: torch.Tensor,
    key: int,
    intermediate: int,
    blocksize: int,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_experts_4bit_backward`` with the layer's absmax and code table read by ``key``."""
    absmax_args = _unkey_experts(packed, key)
    return _experts_backward(
        grad_out, hidden, top_k_index, top_k_weights, *absmax_args, intermediate, blocksize, act
    )


@moe_experts_4bit_backward_keyed.register_fake
def _(grad_out: torch.Tensor, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
      *rest: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return torch.empty_like(hidden), torch.empty_like(top_k_weights)


def _setup_context_keyed(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    hidden, top_k_index, top_k_weights, packed, key, intermediate, blocksize, act, _ = inputs
    ctx.save_for_backward(hidden, top_k_index, top_k_weights, packed)
    ctx.sizes = (key, intermediate, blocksize, act)


def _backward_keyed(ctx: Any, grad_out: torch.Tensor) -> tuple:
    hidden, top_k_index, top_k_weights, packed = ctx.saved_tensors
    grad_hidden, grad_weights = moe_experts_4bit_backward_keyed(
        grad_out, hidden, top_k_index, top_k_weights, packed, *ctx.sizes
    )
    return grad_hidden, None, grad_weights, None, None, None, None, None, None


moe_experts_4bit_keyed.register_autograd(_backward_keyed, setup_context=_setup_context_keyed)


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


#: The attribute of a :class:`QuantExperts4bit` holding transformers' experts module it replaced (its
#: parameters on the meta device): ``model.dequantize()`` puts it back (loader/dequantize_inplace.py).
SOURCE_MODULE = "_qm_source_module"

#: The buffers of a :class:`QuantExperts4bit` the keyed ops read (registered as :class:`PreparedExperts`).
_PREPARED_BUFFERS = ("packed", "absmax", "quant_map")


class QuantExperts4bit(nn.Module):
    """A layer's routed experts in 4 bit, called like transformers' experts modules."""

    #: Use the fused GEMV for experts with 1..8 tokens (tests switch it off to compare paths).
    use_gemv: bool = True
    #: The buffers registered under a key for the keyed ops (:meth:`_prepare`); None on the meta device.
    _prepared: PreparedExperts | None = None
    #: ``_prepared.key`` (-1: none), what a compiled graph reads: one int guard, where reading the
    #: NamedTuple guards its type, length and key.
    _prepared_key: int = -1
    #: The buffers registered for the keyed ops, in :class:`PreparedExperts`' field order.
    _prepared_buffers: tuple[str, ...] = _PREPARED_BUFFERS

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        quant_map: torch.Tensor,
        *,
        hidden_dim: int,
        intermediate: int,
        blocksize: int,
        quant_type: str,
        dtype: torch.dtype,
        compute_dtype: torch.dtype | None,
        act_name: str | None,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        nested: dict[str, torch.Tensor] | None = None,
        proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
        apply_gate: Callable[[torch.Tensor], torch.Tensor] | None = None,
        fused: bool = False,
    ) -> None:
        super().__init__()
        # loaded from fused 3-D records (Qwen3-VL-MoE, converter/loader/moe_fused.py): saved as such
        self.fused = fused
        self.num_experts = int(packed.shape[0])
        self.hidden_dim, self.intermediate_dim = hidden_dim, intermediate
        self.blocksize, self.quant_type = blocksize, quant_type
        self.dtype, self.compute_dtype = dtype, compute_dtype or dtype
        # a gate of the experts class's own (gate/up output -> hidden): run by torch, never by the
        # op's named activations, which compute act(gate) * up
        self.apply_gate = apply_gate
        self.act_name = act_name if act_name in _ACTS and apply_gate is None else None
        self.act_fn = act_fn
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("absmax", absmax, persistent=False)
        self.register_buffer("quant_map", quant_map, persistent=False)
        # What the converter wrote besides the decoded absmax (nested codes, nested absmax, offsets, map),
        # kept so that saving writes the source records again (converter/loader/moe_records.py). Host
        # tensors, not buffers: the forward never reads them, so they stay off the GPU (1/64 byte per
        # weight, 2.7% of the experts' bf16 bytes).
        self.proj_names = proj_names
        self._nested = {k: host(t) for k, t in nested.items()} if nested is not None else None
        self._prepare()

    # -- the keyed ops' registration (converter/kernels/prepared.py) ----------------------------------
    def _prepare(self) -> None:
        """Register the buffers under a new key (the old one released): a graph compiled with the old
        key recompiles (the key is a constant of the graph), and CUDA graphs recorded with the old buffers
        are recorded again (``prepared.epoch``)."""
        old = self.__dict__.get("_prepared")
        if old is not None:
            prepared.retire()
            prepared.release(old.key)
        tensors = [self._buffers.get(name) for name in self._prepared_buffers]
        # (a subclass's own buffers are not registered yet while QuantExperts4bit.__init__ runs: it
        # prepares again once they are)
        absent = any(t is None or t.is_meta for t in tensors)
        buffers = None if absent else PreparedExperts(*tensors, **self._prepared_extras())
        self.__dict__["_prepared"] = None if absent else prepared.register(self, buffers)
        self.__dict__["_prepared_key"] = -1 if absent else self.__dict__["_prepared"].key

    def _prepared_extras(self) -> dict[str, Any]:
        """Fields of :class:`PreparedExperts` besides the buffers (a subclass's gate)."""
        return {}

    def _prepared_is_current(self) -> bool:
        p = self.__dict__.get("_prepared")
        return p is not None and all(
            p[i] is self._buffers.get(n) for i, n in enumerate(self._prepared_buffers)
        )

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self._prepared_buffers and "_prepared" in self.__dict__:  # a new buffer: a new key
            self._prepare()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.__dict__.get("_prepared") is not None:  # a copy or unpickled layer: its own key
            self.__dict__["_prepared"] = None  # (the original's key stays the original's)
            self._prepare()

    def _apply(self, fn, recurse: bool = True):
        # The codes' scales and table are float32 whatever the model's dtype: ``.half()`` / ``.to(dtype)``
        # must not cast them (the kernels require float32; a float16 absmax also loses range). Device
        # moves apply to them as to any buffer.
        kept = {name: self._buffers.pop(name) for name in ("absmax", "quant_map")}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)
        for name, t in kept.items():
            target = fn(torch.empty(0, device=t.device)).device
            if target != t.device:
                self._buffers[name] = t.to(target)
        if "_prepared" in self.__dict__ and not self._prepared_is_current():  # moved: a new key
            self._prepare()
        return self

    @classmethod
    def from_stacked(
        cls,
        st: StackedExperts,
        *,
        hidden_dim: int,
        intermediate: int,
        compute_dtype: torch.dtype | None,
        **kwargs: Any,
    ) -> QuantExperts4bit:
        """A layer over ``stack_records``' buffers, with the records' blocksize, quant type, dtype and nested
        scales; ``kwargs``: the rest of ``__init__``'s (and a subclass's) arguments."""
        return cls(
            st.packed,
            st.absmax,
            st.quant_map,
            hidden_dim=hidden_dim,
            intermediate=intermediate,
            blocksize=st.blocksize,
            quant_type=st.quant_type.label,
            dtype=dtype_from_name(st.dtype),
            compute_dtype=compute_dtype,
            nested=st.nested,
            **kwargs,
        )

    def nested_buffers(self) -> dict[str, torch.Tensor] | None:
        """The nested-absmax tensors of the source records (codes, absmax, offset, map), or None."""
        return self._nested

    @property
    def dtype_name(self) -> str:
        return KERNEL_DTYPE_NAMES[self.dtype]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # One bnb record per expert per projection under the checkpoint's names (save_pretrained), or
        # the fused 3-D records the layer was loaded from.
        destination.update(fused_state_dict(self, prefix) if self.fused else expert_state_dict(self, prefix))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The records _save_to_state_dict writes (or a checkpoint's), stacked again as at load.
        if self.fused:  # the fused records, split into the per-expert ones stacked below
            state_dict = self._split_saved(state_dict, prefix, error_msgs)
            if state_dict is None:
                return
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state_dict.items():
            if key.startswith(prefix):
                name = prefix + ".".join(key[len(prefix) :].split(".", 3)[:3])  # <e>.<proj>.weight
                groups.setdefault(name, {})[key] = value
        projs = self._projections()
        roles = ROLES if projs is None else tuple(role for role, _, _ in projs)
        experts: dict[int, dict[str, tuple[str, Any]]] = {}
        for e in range(self.num_experts):
            for r, role in enumerate(roles):
                name = self._record_key(prefix, e, r)
                group = groups.pop(name, None)
                if group is None or name not in group:
                    missing_keys.append(name)
                    continue
                try:
                    rec = group[name]  # a fused record's piece (_split_saved) is a record already
                    if not isinstance(rec, QuantizedTensor):
                        rec = QuantizedTensor.from_state_dict(name, group)
                    experts.setdefault(e, {})[role] = (name, rec)
                except ValueError as err:
                    error_msgs.append(str(err))
        extra = self._take_extra_state(groups, prefix, missing_keys)
        unexpected_keys.extend(key for group in groups.values() for key in group)
        if len(experts) != self.num_experts or any(len(parts) != len(roles) for parts in experts.values()):
            return
        if extra is None:
            return
        device = self.packed.device if not self.packed.is_meta else experts[0][roles[0]][1].packed.device
        try:
            where, name = "load_state_dict", prefix.removesuffix(".") or type(self).__name__
            st = stack_records(experts, where, name, self.hidden_dim, self.intermediate_dim, device, projs)
        except MoeLoadError as err:
            error_msgs.append(str(err))
            return
        self.blocksize, self.quant_type = st.blocksize, st.quant_type.label
        self.dtype, self.proj_names = dtype_from_name(st.dtype), st.proj_names
        self._nested = st.nested
        self._buffers.update(packed=st.packed, absmax=st.absmax, quant_map=st.quant_map)
        self._buffers.update(extra(device))
        self._prepare()

    # -- what a subclass with another layout changes in loading (gpt-oss: converter/loader/moe_gpt_oss.py)
    def _projections(self) -> tuple[tuple[str, int, int], ...] | None:
        """The buffer layout's projections for ``stack_records`` (None: gate, up, down)."""
        return None

    def _record_key(self, prefix: str, e: int, r: int) -> str:
        """The state-dict name of expert ``e``'s projection ``r`` (saved and loaded)."""
        return f"{prefix}{e}.{self.proj_names[r]}.weight"

    def _take_extra_state(
        self, groups: dict[str, dict[str, Any]], prefix: str, missing_keys: list[str]
    ) -> Callable[[torch.device], dict[str, torch.Tensor]] | None:
        """A subclass's own tensors besides the records (taken out of ``groups``, the missing ones added to
        ``missing_keys``): a function giving the buffers to set on the layer's device, None when some are
        missing (the layer is then left as it is)."""
        return lambda device: {}

    def _split_saved(self, state_dict: Mapping[str, Any], prefix: str, error_msgs: list[str]) -> dict | None:
        """``state_dict``'s keys under ``prefix`` with the fused records split per expert (records, not
        bnb keys: the loop above reads them as records too)."""
        records: dict[str, Any] = {}
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            for leaf in ("gate_up_proj", "down_proj"):
                name = prefix + leaf
                group = {k: v for k, v in rest.items() if k == name or k.startswith(name + ".")}
                if name in group:
                    rec = QuantizedTensor.from_state_dict(name, group)
                    records.update(split_record(rec, name, leaf, prefix, "load_state_dict"))
                    for k in group:
                        del rest[k]
        except (ValueError, MoeLoadError) as err:
            error_msgs.append(str(err))
            return None
        return {**rest, **records}  # other keys under prefix: unexpected below

    def expert_weights(self, e: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of expert ``e``, dequantized."""
        return _expert_weights(
            self.packed[e], self.absmax[e], self.quant_map, self.intermediate_dim, self.hidden_dim,
            self.blocksize, dtype or self.dtype,
        )  # fmt: skip

    def _op_args(self, x: torch.Tensor, top_k_index: torch.Tensor, w: torch.Tensor) -> tuple:
        """The forward functions' leading arguments: input, routes, their weights, the layer's codes,
        absmax and code table, its intermediate width and blocksize."""
        return (
            x,
            top_k_index,
            w,
            self.packed,
            self.absmax,
            self.quant_map,
            self.intermediate_dim,
            self.blocksize,
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states if dtype == self.compute_dtype else hidden_states.to(self.compute_dtype)
        w = top_k_weights  # as the router gives them: transformers multiplies in their dtype
        key = self._prepared_key
        if self.act_name is not None and key >= 0 and ops.keyed_tracing():
            # compiled: the op with the absmax and code table by key (PreparedExperts), so the graph's
            # only input from the layer is its codes (absmax and quant_map are not read here: a tensor
            # the traced code touches is guarded)
            y = moe_experts_4bit_keyed(
                x, top_k_index, w, self.packed, key, self.intermediate_dim, self.blocksize,
                self.act_name, self.use_gemv,
            )  # fmt: skip
            return y if y.dtype == dtype else y.to(dtype)
        args = self._op_args(x, top_k_index, w)
        if self.act_name is not None and (torch.compiler.is_compiling() or _needs_autograd(x, w)):
            # the custom op: one node for torch.compile, and gradients to the input and the routing
            # weights (its registered backward) when training adapters elsewhere in the model
            y = moe_experts_4bit(*args, self.act_name, self.use_gemv)
        elif self.apply_gate is not None:  # own gate: grouped decode, else the per-expert loop
            use_gemv = self.use_gemv and not _needs_autograd(x, w)
            forward = _experts_forward_cuda if x.is_cuda else _experts_forward
            y = forward(*args, self.act_fn, use_gemv, self.apply_gate)
        elif _needs_autograd(x, w):  # an activation the op does not know: torch's autograd through
            y = _experts_forward(*args, self.act_fn, use_gemv=False)  # dequantize + F.linear
        else:
            # eager: the op's own implementation, without the custom op's Python dispatch (tens of µs
            # per call, per layer and token: an eager decode step is host-bound)
            act = self.act_fn if self.act_name is None else _ACTS[self.act_name]
            forward = _experts_forward_cuda if x.is_cuda else _experts_forward
            y = forward(*args, act, self.use_gemv)
        return y if y.dtype == dtype else y.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, quant_type={self.quant_type}, "
            f"blocksize={self.blocksize}, compute_dtype={self.compute_dtype}"
        )


# ---------------------------------------------------------------------------------------------
# loading


def _is_fused_experts(module: nn.Module) -> bool:
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gu, torch.Tensor)
        and isinstance(dn, torch.Tensor)
        and gu.dim() == 3
        and dn.dim() == 3
        and not getattr(module, "is_transposed", False)
        and not getattr(module, "has_bias", False)
        and getattr(module, "has_gate", True)
        and getattr(module, "is_concatenated", True)
    )


def _own_gate(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The experts module's ``_apply_gate`` where its class has its own (DeepSeek-V4, GLM-5: a clamped
    SwiGLU), not transformers' default ``act_fn(gate) * up``; None otherwise."""
    fn = getattr(type(module), "_apply_gate", None)
    if fn is None or getattr(fn, "__module__", None) == "transformers.integrations.moe":
        return None
    return module._apply_gate


def _model_module_name(model: nn.Module, ckpt_module: str, modules: Mapping[str, nn.Module]) -> str | None:
    """The model's name for a checkpoint experts module (transformers' renamings, e.g. Mixtral's
    ``block_sparse_moe`` -> ``mlp``; the base-model prefix stripped or added as transformers' loader
    does, e.g. ``model.layers.0.mlp.experts`` into ``Qwen3MoeModel``)."""
    for candidate in prefix_variants(model, ckpt_module):
        if candidate in modules:
            return candidate
        renamed = rename_key(model, candidate + ".gate_up_proj").removesuffix(".gate_up_proj")
        if renamed in modules:
            return renamed
    return None


def prefix_variants(model: nn.Module, name: str) -> list[str]:
    """``name``, then ``name`` with the model's base-model prefix stripped (or added), as transformers'
    loader tries both."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return [name]
    stripped = name.removeprefix(prefix + ".")
    return [name, stripped if stripped != name else f"{prefix}.{name}"]


def _renamed_key(model: nn.Module, key: str, params: Collection[str]) -> str:
    """``key`` after transformers' renamings (Mixtral's ``block_sparse_moe.gate`` -> ``mlp.gate``),
    under either base-model prefix, where that names a parameter or buffer of the model; else ``key``
    (a key that only needs the prefix is left to ``model._match_prefix``)."""
    for candidate in prefix_variants(model, key):
        renamed = rename_key(model, candidate)
        if renamed in params and (candidate == key or renamed != candidate):
            return renamed
        if renamed != candidate:
            # a renaming anchored at the key's start matches it without the base-model prefix, which the
            # model's name has (DeepSeek-V4's own ``embed.weight`` -> ``model.embed_tokens.weight``)
            prefixed = next((n for n in prefix_variants(model, renamed)[1:] if n in params), None)
            if prefixed is not None:
                return prefixed
    return key


def rename_key(model: nn.Module, key: str) -> str:
    """``key`` after transformers' checkpoint renamings for this model (itself without transformers)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:
        return key
    renamings = getattr(model, "_qm_renamings", None)
    if renamings is None:
        try:
            mapping = get_model_conversion_mapping(model, None, None)
        except Exception:  # another transformers version: no renaming
            mapping = []
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        model._qm_renamings = renamings
    return apply_renamings(key, renamings) if renamings else key


def moe_modules(model: nn.Module) -> dict[str, QuantExperts4bit]:
    """The 4-bit experts modules of a model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts4bit)}
