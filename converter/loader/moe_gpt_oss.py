"""gpt-oss's routed experts in 4 bit, run only for the experts the router picked.

A gpt-oss folder written with ``--moe-experts quantize`` holds unsloth's per-expert ``nn.Linear``
records (converter/sources/gpt_oss.py): ``<layer>.mlp.experts.gate_up_projs.<e>.weight`` ``[2I, H]``
(gate/up rows interleaved) and ``down_projs.<e>.weight`` ``[H, I]`` as bnb 4-bit records, their
``.bias`` 16-bit. :func:`attach_gpt_oss_experts` replaces each ``GptOssExperts`` by a
:class:`QuantGptOssExperts4bit`, stacked like every 4-bit experts layer
(:class:`converter.loader.moe.QuantExperts4bit`: ``packed [E, I*H + H*I/2]``, per expert the gate_up
codes then the down codes, ``absmax [E, 2*I*H/bs + H*I/bs]`` float32), the biases ``[E, 2I]`` / ``[E, H]``
beside them, and called as ``GptOssExperts`` is: ``experts(hidden_states [T, H], router_indices [T, k],
routing_weights [T, k])``.

The forward is transformers' eager loop over the hit experts (ascending, the (slot, token) pairs of an
expert slot-major as ``torch.where(expert_mask[e])`` gives them):
``gate_up = x @ W_gu + b_gu`` (a matmul rounded to the compute dtype, then the bias added: not
``F.linear`` with a bias, which fuses the add), ``GptOssExperts._apply_gate`` (interleaved gate/up,
clamped, ``(up + 1) * gate * sigmoid(alpha * gate)``), ``y = h @ W_dn + b_dn``, the routing weight and
the sum over slots in the model dtype. With ``use_gemv = False`` the weights are decoded and laid out
as transformers holds them (``x @ W`` orientation, contiguous), so the output equals, bit for bit, that
of the dequantized bf16 folder loaded by transformers. By default decode (at most 8 tokens on the CPU,
whole blocks per row) runs one grouped 4-bit GEMV per projection over the (token, slot) rows, and an
expert with at most 8 tokens one fused GEMV per projection; the biases and the gate as above.

Saving writes the records again under unsloth's names; ``model.dequantize()`` puts transformers'
``GptOssExperts`` back with the fused tensors (:meth:`QuantGptOssExperts4bit.dense_module`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from converter.loader import ops
from converter.loader.module import dtype_from_name, state_from_record
from converter.loader.moe import (
    SOURCE_MODULE,
    QuantExperts4bit,
    _dequant,
    _expert_rows,
    _gemv,
    _grouped_gemv_rows,
    _grouped_ok,
    _has_repeats,
    _needs_autograd,
    _own_gate,
)
from converter.loader.moe_records import MoeLoadError, _own, host, span_record
from converter.sources.gpt_oss import EXPERT_KEY
from formats.quant_types import NESTED_BLOCKSIZE
from formats.record import QuantizedTensor

__all__ = ["QuantGptOssExperts4bit", "attach_gpt_oss_experts"]

#: The two projections of a gpt-oss expert, as unsloth names their ModuleLists.
PROJS = ("gate_up_projs", "down_projs")


def _shapes(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    return {"gate_up_projs": (2 * inter, hidden), "down_projs": (hidden, inter)}


def _nested_count(blocks: int) -> int:
    return -(-blocks // NESTED_BLOCKSIZE)


def stack_gpt_oss(
    experts: Mapping[int, Mapping[str, tuple[str, Any]]],
    where: str,
    name: str,
    hidden: int,
    inter: int,
    device: torch.device,
) -> dict[str, Any]:
    """The layer's buffers from its per-expert records (``experts[e][proj] = (key, record)``): packed
    codes, float32 absmax (nested absmax decoded as the kernels decode it), the code table, and the nested
    codes / absmax / offsets kept on the host for saving (None where a record is not nested)."""
    shapes = _shapes(hidden, inter)
    first_key, first = experts[0]["gate_up_projs"]
    bs = first.blocksize
    for e in range(len(experts)):
        for proj in PROJS:
            key, rec = experts[e][proj]
            if not isinstance(rec, QuantizedTensor):
                msg = (
                    f"{where}: {key!r} is not quantized but other experts of {name!r} are (a --skip or "
                    "--include glob split the layer's experts); convert again keeping or quantizing "
                    "whole layers' experts"
                )
                raise MoeLoadError(msg)
            if tuple(rec.shape) != shapes[proj]:
                msg = f"{where}: {key!r} has shape {list(rec.shape)}, the model wants {list(shapes[proj])}"
                raise MoeLoadError(msg)
            same = torch.equal(rec.quant_map.float(), first.quant_map.float())
            if rec.blocksize != bs or rec.quant_type != first.quant_type or not same:
                msg = f"{where}: {key!r} is quantized differently from {first_key!r} (type, blocksize or map)"
                raise MoeLoadError(msg)
    if (inter * hidden) % bs:
        msg = f"{where}: {name}: {inter}x{hidden} expert weights do not fill whole {bs}-element blocks"
        raise MoeLoadError(msg)
    num = len(experts)
    gu_bytes, dn_bytes = inter * hidden, hidden * inter // 2
    gu_blocks, dn_blocks = 2 * inter * hidden // bs, inter * hidden // bs
    gu_nested, dn_nested = _nested_count(gu_blocks), _nested_count(dn_blocks)
    quant_map = first.quant_map.float().contiguous()
    out: dict[str, Any] = {"blocksize": bs, "quant_type": first.quant_type, "dtype": first.dtype}
    if device.type == "meta":  # sizes only
        out["packed"] = torch.empty(num, gu_bytes + dn_bytes, dtype=torch.uint8, device=device)
        out["absmax"] = torch.empty(num, gu_blocks + dn_blocks, dtype=torch.float32, device=device)
        out["quant_map"], out["nested"] = quant_map.to(device), None
        return out
    work = first.packed.device
    packed = torch.empty(num, gu_bytes + dn_bytes, dtype=torch.uint8, device=work)
    absmax = torch.empty(num, gu_blocks + dn_blocks, dtype=torch.float32, device=work)
    nested_map = first.nested.nested_quant_map.float() if first.nested is not None else None
    keep_nested = nested_map is not None and all(
        rec.nested is not None and torch.equal(rec.nested.nested_quant_map.float(), nested_map)
        for parts in experts.values()
        for _, rec in parts.values()
    )
    if keep_nested:
        codes = torch.empty(num, gu_blocks + dn_blocks, dtype=torch.uint8)
        nabs = torch.empty(num, gu_nested + dn_nested, dtype=torch.float32)
        offsets = torch.empty(num, 2, dtype=torch.float32)
    spans = {"gate_up_projs": (0, 0, 0), "down_projs": (gu_bytes, gu_blocks, gu_nested)}
    for e in range(num):
        for r, proj in enumerate(PROJS):
            _, rec = experts[e][proj]
            po, ao, no = spans[proj]
            data = ops.packed_bytes(rec.packed)
            packed[e, po : po + data.numel()] = data
            amax = ops.decoded_absmax(state_from_record(rec)).reshape(-1)
            absmax[e, ao : ao + amax.numel()] = amax
            if keep_nested:
                c = rec.absmax.reshape(-1)
                codes[e, ao : ao + c.numel()] = c.cpu()
                na = rec.nested.nested_absmax.reshape(-1)
                nabs[e, no : no + na.numel()] = na.cpu()
                offsets[e, r] = float(rec.nested.offset)
    out["packed"], out["absmax"], out["quant_map"] = (
        packed.to(device),
        absmax.to(device),
        quant_map.to(device),
    )
    out["nested"] = (
        {"codes": codes, "absmax": nabs, "offset": offsets, "map": host(nested_map)} if keep_nested else None
    )
    return out


def _gpt_oss_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    m: QuantGptOssExperts4bit,
    use_gemv: bool,
) -> torch.Tensor:
    """transformers' GptOssExperts loop with 4-bit weights (module docstring)."""
    packed, absmax, quant_map, bs = m.packed, m.absmax, m.quant_map, m.blocksize
    hidden_dim, inter = m.hidden_dim, m.intermediate_dim
    gu_bytes, gu_blocks = inter * hidden_dim, 2 * inter * hidden_dim // bs
    gu_bias, dn_bias = m.gate_up_bias, m.down_bias
    gate = m.apply_gate
    if use_gemv and _grouped_ok(hidden, inter, bs):
        tokens, k = top_k_index.shape
        ids = top_k_index.reshape(-1).to(torch.int64).contiguous()
        gate_up = _grouped_gemv_rows(
            hidden, ids, packed, absmax, quant_map, x_share=k, byte_offset=0, block_offset=0,
            out_features=2 * inter, in_features=hidden_dim, blocksize=bs,
        )  # fmt: skip
        h = gate(gate_up + gu_bias[ids]).contiguous()
        y = _grouped_gemv_rows(
            h, ids, packed, absmax, quant_map, x_share=1, byte_offset=gu_bytes, block_offset=gu_blocks,
            out_features=hidden_dim, in_features=inter, blocksize=bs,
        )  # fmt: skip
        y = (y + dn_bias[ids]).view(tokens, k, hidden_dim) * top_k_weights.reshape(tokens, k, 1)
        y = y.sum(dim=1)
        return y if y.dtype == hidden.dtype else y.to(hidden.dtype)
    out = torch.zeros_like(hidden)
    repeats = _has_repeats(top_k_index)
    backend = ops.kernel_backend(hidden.device) is not None
    gemv_gu = use_gemv and backend and hidden_dim % bs == 0
    gemv_dn = use_gemv and backend and inter % bs == 0
    for e, slot, token_idx in _expert_rows(top_k_index, packed.shape[0]):
        n = token_idx.shape[0]
        x = hidden[token_idx]
        p, a = packed[e], absmax[e]
        if gemv_gu and n <= ops.GEMV_MAX_TOKENS:
            gate_up = _gemv(x, p[:gu_bytes], a[:gu_blocks], quant_map, 2 * inter, hidden_dim, bs)
        else:  # transformers' x @ W with W [H, 2I] as it holds it (contiguous): the same matmul
            w = _dequant(p[:gu_bytes], a[:gu_blocks], quant_map, 2 * inter * hidden_dim, bs, x.dtype)
            gate_up = x @ w.view(2 * inter, hidden_dim).T.contiguous()
        h = gate(gate_up + gu_bias[e])
        if gemv_dn and n <= ops.GEMV_MAX_TOKENS:
            y = _gemv(h, p[gu_bytes:], a[gu_blocks:], quant_map, hidden_dim, inter, bs)
        else:
            w = _dequant(p[gu_bytes:], a[gu_blocks:], quant_map, hidden_dim * inter, bs, h.dtype)
            y = h @ w.view(hidden_dim, inter).T.contiguous()
        y = (y + dn_bias[e]) * top_k_weights[token_idx, slot, None]
        if repeats:
            out.index_add_(0, token_idx, y.to(out.dtype))
        else:  # transformers' index_add_, bit for bit (each token once per expert: one rounding)
            out[token_idx] = out[token_idx] + y.to(out.dtype)
    return out


class QuantGptOssExperts4bit(QuantExperts4bit):
    """A gpt-oss layer's routed experts in 4 bit, called as ``GptOssExperts`` is (module docstring)."""

    def __init__(
        self,
        *args: Any,
        gate_up_bias: torch.Tensor,
        down_bias: torch.Tensor,
        config: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("gate_up_bias", gate_up_bias, persistent=False)
        self.register_buffer("down_bias", down_bias, persistent=False)
        self.config = config  # GptOssExperts(config) again for model.dequantize()
        self.proj_names = PROJS

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        router_indices: torch.Tensor | None = None,
        routing_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states if dtype == self.compute_dtype else hidden_states.to(self.compute_dtype)
        use_gemv = self.use_gemv and not _needs_autograd(x, routing_weights)
        y = _gpt_oss_forward(x, router_indices, routing_weights, self, use_gemv)
        return y if y.dtype == dtype else y.to(dtype)

    def _spans(self, proj: str) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        h, i, bs = self.hidden_dim, self.intermediate_dim, self.blocksize
        gu_b, dn_b = 2 * i * h // bs, i * h // bs
        gu_n, dn_n = _nested_count(gu_b), _nested_count(dn_b)
        if proj == "gate_up_projs":
            return (0, i * h), (0, gu_b), (0, gu_n)
        return (i * h, i * h + h * i // 2), (gu_b, gu_b + dn_b), (gu_n, gu_n + dn_n)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # unsloth's per-expert records again: the weights' bnb records, the biases in the model dtype
        shapes = _shapes(self.hidden_dim, self.intermediate_dim)
        nested = self.nested_buffers()
        biases = {"gate_up_projs": self.gate_up_bias, "down_projs": self.down_bias}
        for e in range(self.num_experts):
            for r, proj in enumerate(PROJS):
                name = f"{prefix}{proj}.{e}.weight"
                rec = span_record(self, nested, name, shapes[proj], e, self._spans(proj), r)
                destination.update(rec.state_dict())
                destination[f"{prefix}{proj}.{e}.bias"] = _own(biases[proj][e])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        groups: dict[str, dict[str, Any]] = {}
        for key, value in state_dict.items():
            if key.startswith(prefix):
                name = prefix + ".".join(key[len(prefix) :].split(".", 3)[:3])  # <proj>.<e>.weight|bias
                groups.setdefault(name, {})[key] = value
        experts: dict[int, dict[str, tuple[str, Any]]] = {}
        biases: dict[str, list[Any]] = {p: [None] * self.num_experts for p in PROJS}
        for e in range(self.num_experts):
            for proj in PROJS:
                name, bias = f"{prefix}{proj}.{e}.weight", f"{prefix}{proj}.{e}.bias"
                group, bgroup = groups.pop(name, None), groups.pop(bias, None)
                if bgroup is None or bias not in bgroup:
                    missing_keys.append(bias)
                else:
                    biases[proj][e] = bgroup[bias]
                if group is None or name not in group:
                    missing_keys.append(name)
                    continue
                try:
                    experts.setdefault(e, {})[proj] = (name, QuantizedTensor.from_state_dict(name, group))
                except ValueError as err:
                    error_msgs.append(str(err))
        unexpected_keys.extend(key for group in groups.values() for key in group)
        if len(experts) != self.num_experts or any(len(p) != 2 for p in experts.values()):
            return
        if any(b is None for bs in biases.values() for b in bs):
            return
        device = (
            self.packed.device if not self.packed.is_meta else experts[0]["gate_up_projs"][1].packed.device
        )
        try:
            where, name = "load_state_dict", prefix.removesuffix(".") or type(self).__name__
            st = stack_gpt_oss(experts, where, name, self.hidden_dim, self.intermediate_dim, device)
        except MoeLoadError as err:
            error_msgs.append(str(err))
            return
        self.blocksize, self.quant_type = st["blocksize"], st["quant_type"].label
        self.dtype, self._nested = dtype_from_name(st["dtype"]), st["nested"]
        target = self.gate_up_bias.dtype
        self._buffers.update(
            packed=st["packed"],
            absmax=st["absmax"],
            quant_map=st["quant_map"],
            gate_up_bias=torch.stack(biases["gate_up_projs"]).to(device, target),
            down_bias=torch.stack(biases["down_projs"]).to(device, target),
        )
        self._prepare()

    def dense_module(self, dtype: torch.dtype) -> nn.Module:
        """transformers' ``GptOssExperts`` with these weights (``x @ W`` orientation: ``gate_up_proj[e] =
        W_gu.T``, ``down_proj[e] = W_dn.T``, the biases), for ``model.dequantize()``."""
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        with torch.device("meta"):
            fused = GptOssExperts(self.config)
        pairs = [self.expert_weights(e, dtype) for e in range(self.num_experts)]
        params = {
            "gate_up_proj": torch.stack([gu.T for gu, _ in pairs]).contiguous(),
            "gate_up_proj_bias": self.gate_up_bias.to(dtype),
            "down_proj": torch.stack([dn.T for _, dn in pairs]).contiguous(),
            "down_proj_bias": self.down_bias.to(dtype),
        }
        for k, v in params.items():
            setattr(fused, k, nn.Parameter(v.detach().clone(), requires_grad=False))
        return fused

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bias=True"


def is_gpt_oss_experts(module: nn.Module | None) -> bool:
    """Whether ``module`` is transformers' ``GptOssExperts``."""
    return module is not None and type(module).__name__ == "GptOssExperts"


def attach_gpt_oss_experts(
    model: nn.Module,
    state: dict[str, Any],
    compute_dtype: torch.dtype | None,
    *,
    where: str,
    device: str | torch.device,
    module_name: Callable[[str], str | None],
) -> None:
    """Replace each ``GptOssExperts`` whose per-expert records ``state`` holds by a
    :class:`QuantGptOssExperts4bit` (16-bit records: stacked into the module's fused parameters, as
    transformers holds them); the records leave ``state``."""
    groups: dict[str, dict[int, dict[str, dict[str, tuple[str, Any]]]]] = {}
    for key, value in state.items():
        m = EXPERT_KEY.match(key)
        if m is not None:
            e = groups.setdefault(m["module"], {}).setdefault(int(m["e"]), {})
            e.setdefault(m["kind"], {})[m["proj"]] = (key, value)
    for ckpt_name, experts in groups.items():
        name = module_name(ckpt_name)
        module = model.get_submodule(name) if name else None
        if not is_gpt_oss_experts(module):
            kind = type(module).__name__ if module is not None else "no module"
            msg = f"{where}: gpt-oss expert records under {ckpt_name!r} have no GptOssExperts module ({kind})"
            raise MoeLoadError(msg)
        num, hidden, inter = module.num_experts, module.hidden_size, module.intermediate_size
        missing = [
            f"{ckpt_name}.{p}.{e}.{kind}"
            for e in range(num)
            for kind in ("weight", "bias")
            for p in PROJS
            if p not in experts.get(e, {}).get(kind, {})
        ]
        extra = sorted(e for e in experts if not 0 <= e < num)
        if missing or extra:
            what = f"{missing[0]} is missing" if missing else f"the folder also holds expert(s) {extra[:5]}"
            msg = f"{where}: {ckpt_name!r} needs {num} experts x gate_up/down weight and bias; {what}"
            raise MoeLoadError(msg)
        weights = {e: experts[e]["weight"] for e in range(num)}
        bias_dtype = module.gate_up_proj_bias.dtype
        dev = torch.device(device)
        gu_bias = torch.stack([experts[e]["bias"]["gate_up_projs"][1] for e in range(num)])
        dn_bias = torch.stack([experts[e]["bias"]["down_projs"][1] for e in range(num)])
        quantized = [isinstance(v, QuantizedTensor) for parts in weights.values() for _, v in parts.values()]
        if all(quantized):
            st = stack_gpt_oss(weights, where, ckpt_name, hidden, inter, dev)
            layer = QuantGptOssExperts4bit(
                st["packed"],
                st["absmax"],
                st["quant_map"],
                hidden_dim=hidden,
                intermediate=inter,
                blocksize=st["blocksize"],
                quant_type=st["quant_type"].label,
                dtype=dtype_from_name(st["dtype"]),
                compute_dtype=compute_dtype,
                act_name=None,
                act_fn=torch.sigmoid,  # unused: the class's own gate runs
                apply_gate=_own_gate(module) or module._apply_gate,  # GptOssExperts' clamped gate
                nested=None,
                gate_up_bias=gu_bias.to(dev, bias_dtype),
                down_bias=dn_bias.to(dev, bias_dtype),
                config=module.config,
            )
            layer._nested = st["nested"]
            layer.__dict__[SOURCE_MODULE] = module
            model.set_submodule(name, layer)
        elif not any(quantized):  # 16-bit per-expert records: transformers' fused parameters
            target = module.gate_up_proj.dtype
            params = {
                "gate_up_proj": torch.stack([weights[e]["gate_up_projs"][1].T for e in range(num)]),
                "gate_up_proj_bias": gu_bias,
                "down_proj": torch.stack([weights[e]["down_projs"][1].T for e in range(num)]),
                "down_proj_bias": dn_bias,
            }
            for k, v in params.items():
                setattr(module, k, nn.Parameter(v.to(dev, target).contiguous(), requires_grad=False))
        else:
            msg = (
                f"{where}: {ckpt_name!r} mixes 4-bit and 16-bit experts; convert again keeping or quantizing "
                "whole layers' experts"
            )
            raise MoeLoadError(msg)
        for parts in experts.values():
            for kinds in parts.values():
                for key, _ in kinds.values():
                    del state[key]
