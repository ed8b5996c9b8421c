"""Routed experts without a gate projection, in 4 bit: NemotronH's ``down(act(up(x)))`` experts.

transformers' ``NemotronHExperts`` holds ``up_proj [E, I, H]`` and ``down_proj [E, H, I]`` (H: the
hidden size, or ``moe_latent_size`` where the block projects to a latent width around its experts)
and runs ``act_fn`` (``relu2``: relu, then square) between them. A folder written with
``--moe-experts quantize`` has one bnb record per expert per projection
(``<layer>.mixer.experts.<e>.up_proj.weight`` / ``down_proj.weight``);
:func:`converter.loader.moe_attach.attach_experts` stacks a layer's records into one buffer as for the
gated experts (converter/loader/moe.py; per expert up's codes, then down's) and puts a
:class:`QuantUngatedExperts4bit` where the module was.

The forward is ``NemotronHExperts.forward`` with 4-bit weights:

- decode (at most 8 tokens, or any count inside a CUDA-graph capture), CPU and CUDA: every (token, slot)
  pair is a row of one grouped 4-bit GEMV per projection indexed by the routed expert ids
  (``moe._decode_grouped`` with one up row per intermediate row), the activation between them, then the
  routing weights and a sum over the k slots in the weights' dtype;
- otherwise the hit experts in ascending order, each through the fused GEMV (at most 8 tokens) or
  dequantized and multiplied (``F.linear``), weighted and summed with ``index_add_`` as that class sums
  them (in the routing weights' dtype up to transformers 5.24, in the hidden states' from 5.25:
  :func:`sums_in_weights_dtype`), so that with ``use_gemv = False`` the output is the dequantized
  model's, bit for bit.

Under ``torch.compile`` the layer is one custom op, ``quantize_model::moe_experts_4bit_ungated`` (an
activation known by name: relu2 or one of the gated experts' ``_ACTS``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from converter.loader import moe_cuda, ops
from converter.loader.moe import (
    _ACTS,
    SOURCE_MODULE,
    QuantExperts4bit,
    _cuda_decode,
    _cuda_kernels_take,
    _decode_grouped,
    _dequant,
    _dequant_linear,
    _expert_rows,
    _gemv,
    _grouped_gemv_rows,
    _grouped_ok,
    _needs_autograd,
)
from converter.loader.moe_records import (
    ExpertsLayout,
    MoeLoadError,
    Projection,
    expert_state_dict,
    stack_records,
)

__all__ = ["QuantUngatedExperts4bit", "ungated_layer"]

#: The checkpoint's leaf names of the two projections (per-expert records and the module's parameters).
PROJ_NAMES = ("up_proj", "down_proj")


def _relu2(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``ReLUSquaredActivation`` (``ACT2FN["relu2"]``), op for op: relu, then square."""
    return torch.square(F.relu(x))


#: Activations the op knows by name (the module's ``config.mlp_hidden_act``).
ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {**_ACTS, "relu2": _relu2}


def projections(hidden: int, inter: int) -> tuple[Projection, ...]:
    """The layer's buffer layout: ``up [I, H]``, then ``down [H, I]``."""
    return (("up", inter, hidden), ("down", hidden, inter))


def _grouped_decode(
    hidden: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, inter: int, bs: int
) -> bool:
    """Whether decode takes the two grouped GEMVs (the gated experts' conditions, converter/loader/moe.py)."""
    if not hidden.is_cuda:
        return _grouped_ok(hidden, inter, bs)
    return _cuda_decode(hidden) and _cuda_kernels_take(hidden, packed, absmax, inter, bs)


def _ungated_forward(
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
    sum_in_weights_dtype: bool = False,
) -> torch.Tensor:
    """``NemotronHExperts.forward`` with 4-bit weights, [T, H] -> [T, H] (module docstring);
    ``sum_in_weights_dtype``: the routes summed in the routing weights' dtype, then cast once
    (transformers 5.24's class), else in the hidden states' (5.25's)."""
    if use_gemv and _grouped_decode(hidden, packed, absmax, intermediate, blocksize):
        gemv = moe_cuda.grouped_gemv if hidden.is_cuda else _grouped_gemv_rows
        args = (hidden, top_k_index, top_k_weights, packed, absmax, quant_map, intermediate, blocksize)
        return _decode_grouped(*args, act, gemv, act, up_rows=1)
    hidden_dim = hidden.shape[1]
    up_bytes, up_blocks = intermediate * hidden_dim // 2, intermediate * hidden_dim // blocksize
    kernels = use_gemv and ops.kernel_backend(hidden.device) is not None
    gemv_up, gemv_dn = kernels and hidden_dim % blocksize == 0, kernels and intermediate % blocksize == 0
    f32 = use_gemv and ops.f32_prefill(hidden)  # bf16 on a CPU without native bf16 matmuls: float32
    out = torch.zeros_like(hidden, dtype=top_k_weights.dtype if sum_in_weights_dtype else hidden.dtype)
    for e, slot, token_idx in _expert_rows(top_k_index, packed.shape[0]):
        x = hidden[token_idx]
        p, a = packed[e], absmax[e]
        up = (p[:up_bytes], a[:up_blocks], quant_map, intermediate, hidden_dim, blocksize)
        dn = (p[up_bytes:], a[up_blocks:], quant_map, hidden_dim, intermediate, blocksize)
        small = token_idx.shape[0] <= ops.GEMV_MAX_TOKENS
        h = act(_gemv(x, *up) if gemv_up and small else _dequant_linear(x, *up, False, f32))
        y = _gemv(h, *dn) if gemv_dn and small else _dequant_linear(h, *dn, False, f32)
        y = y * top_k_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out if out.dtype == hidden.dtype else out.to(hidden.dtype)


def sums_in_weights_dtype(module: nn.Module) -> bool:
    """Whether the experts class sums its routes in the routing weights' dtype and casts once at the end
    (``zeros_like(hidden_states, dtype=top_k_weights.dtype)``: NemotronHExperts up to transformers 5.24)
    rather than in the hidden states' dtype (5.25 and later, as the gated experts): read from the class's
    source, the one place the difference shows (same shapes, same names)."""
    return _class_sums_in_weights_dtype(type(module))


@functools.cache  # inspect.getsource parses the whole modeling file (~10 ms): once per class, not per layer
def _class_sums_in_weights_dtype(cls: type) -> bool:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen install): the gated experts' rule
        return False
    return "dtype=top_k_weights.dtype" in source


@torch.library.custom_op("quantize_model::moe_experts_4bit_ungated", mutates_args=())
def moe_experts_4bit_ungated(
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
    sum_in_weights_dtype: bool,
) -> torch.Tensor:
    """Routed experts without a gate of one layer: [T, H] -> [T, H] (the module docstring)."""
    args = (hidden, top_k_index, top_k_weights, packed, absmax, quant_map, intermediate, blocksize)
    return _ungated_forward(*args, ACTS[act], use_gemv, sum_in_weights_dtype)


@moe_experts_4bit_ungated.register_fake
def _(hidden: torch.Tensor, *rest: Any) -> torch.Tensor:
    return torch.empty_like(hidden)


class QuantUngatedExperts4bit(QuantExperts4bit):
    """A layer's routed experts without a gate projection in 4 bit, called as ``NemotronHExperts`` is."""

    def __init__(
        self, *args: Any, act_name: str | None = None, sum_in_weights_dtype: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, act_name=act_name, **kwargs)
        self.act_name = act_name if act_name in ACTS else None  # relu2 too (the base knows gated ones)
        self.proj_names = PROJ_NAMES
        # how the replaced class sums the routes (sums_in_weights_dtype): the same here, bit for bit
        self.sum_in_weights_dtype = sum_in_weights_dtype

    def _projections(self) -> tuple[Projection, ...]:
        return projections(self.hidden_dim, self.intermediate_dim)

    def _record_key(self, prefix: str, e: int, r: int) -> str:
        return f"{prefix}{e}.{PROJ_NAMES[r]}.weight"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # one bnb record per expert per projection under the checkpoint's names
        lay = ExpertsLayout(self.hidden_dim, self.intermediate_dim, self.blocksize, self._projections())
        key = lambda e, r, role: self._record_key(prefix, e, r)  # noqa: E731
        destination.update(expert_state_dict(self, prefix, lay, key))

    def _load_from_state_dict(self, state_dict, prefix, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.proj_names = PROJ_NAMES  # (stacking names the roles)

    def expert_weights(self, e: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [I, H], down [H, I]) of expert ``e``, dequantized (float64: the float32 weights, cast)."""
        dtype = dtype or self.dtype
        work = torch.float32 if dtype == torch.float64 else dtype
        h, i, bs = self.hidden_dim, self.intermediate_dim, self.blocksize
        p, a = self.packed[e], self.absmax[e]
        up = _dequant(p[: i * h // 2], a[: i * h // bs], self.quant_map, i * h, bs, work)
        down = _dequant(p[i * h // 2 :], a[i * h // bs :], self.quant_map, i * h, bs, work)
        return up.view(i, h).to(dtype), down.view(h, i).to(dtype)

    def dense_module(self, dtype: torch.dtype) -> nn.Module:
        """transformers' experts module this layer replaced, its ``up_proj`` / ``down_proj`` filled with the
        dequantized weights (``model.dequantize()``)."""
        source: Any = self.__dict__[SOURCE_MODULE]
        pairs = [self.expert_weights(e, dtype) for e in range(self.num_experts)]
        source.up_proj = nn.Parameter(torch.stack([up for up, _ in pairs]), requires_grad=False)
        source.down_proj = nn.Parameter(torch.stack([dn for _, dn in pairs]), requires_grad=False)
        return source

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states if dtype == self.compute_dtype else hidden_states.to(self.compute_dtype)
        w = top_k_weights  # as the router gives them (float32 from NemotronH's)
        args = self._op_args(x, top_k_index, w)
        grad = _needs_autograd(x, w)  # training adapters elsewhere: torch's autograd through the loop
        if self.act_name is not None and not grad and torch.compiler.is_compiling():
            # one node for torch.compile
            y = moe_experts_4bit_ungated(*args, self.act_name, self.use_gemv, self.sum_in_weights_dtype)
        else:
            act = ACTS[self.act_name] if self.act_name is not None else self.act_fn
            y = _ungated_forward(*args, act, self.use_gemv and not grad, self.sum_in_weights_dtype)
        return y if y.dtype == dtype else y.to(dtype)


def check_ungated(
    module: nn.Module, experts: Mapping[int, Mapping[str, Any]], *, where: str, ckpt_name: str
) -> None:
    """Every expert of the module has an up and a down weight of the module's shapes, and no other."""
    num = int(module.up_proj.shape[0])
    for e in range(num):
        for role, param in (("up", module.up_proj), ("down", module.down_proj)):
            if role not in experts.get(e, {}):
                msg = f"{where}: {ckpt_name!r} needs {num} experts x up/down; expert {e} {role} is missing"
                raise MoeLoadError(msg)
            key, value = experts[e][role]
            if tuple(value.shape) != tuple(param.shape[1:]):
                msg = (
                    f"{where}: {key!r} has shape {list(value.shape)}, the model wants {list(param.shape[1:])}"
                )
                raise MoeLoadError(msg)
    extra = sorted(e for e in experts if not 0 <= e < num)
    if extra:
        msg = f"{where}: {ckpt_name!r} also holds expert(s) {extra[:5]}; config.json and the shards disagree"
        raise MoeLoadError(msg)


def ungated_layer(
    module: nn.Module,
    experts: dict[int, dict[str, tuple[str, Any]]],
    compute_dtype: torch.dtype | None,
    act_name: str | None,
    *,
    where: str,
    ckpt_name: str,
    device: torch.device,
) -> QuantUngatedExperts4bit:
    """The 4-bit layer for the module's per-expert up/down records (checked), on ``device``."""
    inter, hidden = (int(d) for d in module.up_proj.shape[1:])
    st = stack_records(experts, where, ckpt_name, hidden, inter, device, projections(hidden, inter))
    layer = QuantUngatedExperts4bit.from_stacked(
        st,
        hidden_dim=hidden,
        intermediate=inter,
        compute_dtype=compute_dtype,
        act_name=act_name,
        act_fn=module.act_fn,
        sum_in_weights_dtype=sums_in_weights_dtype(module),
    )
    layer.__dict__[SOURCE_MODULE] = module  # transformers' module (meta parameters), for model.dequantize()
    return layer
