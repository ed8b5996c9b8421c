"""gpt-oss's routed experts in 4 bit, run only for the experts the router picked.

A gpt-oss folder written with ``--moe-experts quantize`` holds unsloth's per-expert ``nn.Linear``
records (converter/sources/gpt_oss.py): ``<layer>.mlp.experts.gate_up_projs.<e>.weight`` ``[2I, H]``
(gate/up rows interleaved) and ``down_projs.<e>.weight`` ``[H, I]`` as bnb 4-bit records, their
``.bias`` 16-bit. :func:`attach_gpt_oss_experts` replaces each ``GptOssExperts`` by a
:class:`QuantGptOssExperts4bit`, stacked by the shared stacker (converter/loader/moe_records.py
``stack_records`` with this layout's two projections: ``packed [E, I*H + H*I/2]``, per expert the
gate_up codes then the down codes, ``absmax [E, 2*I*H/bs + H*I/bs]`` float32), the biases ``[E, 2I]`` /
``[E, H]`` beside them, and called as ``GptOssExperts`` is: ``experts(hidden_states [T, H],
router_indices [T, k], routing_weights [T, k])``.

The forward is the shared experts forward (converter/loader/moe.py ``_experts_forward`` /
``_experts_forward_cuda``) with the biases and ``GptOssExperts._apply_gate`` (interleaved gate/up,
clamped, ``(up + 1) * gate * sigmoid(alpha * gate)``): ``gate_up = x @ W_gu + b_gu`` (a matmul rounded to
the compute dtype, then the bias added: not ``F.linear`` with a bias, which fuses the add), the gate,
``y = h @ W_dn + b_dn``, the routing weight and the sum over slots.

- ``use_gemv = False`` (any device): transformers' eager loop over the hit experts (ascending, the
  (slot, token) pairs of an expert slot-major as ``torch.where(expert_mask[e])`` gives them) on weights
  decoded and laid out as transformers holds them (``x @ W`` orientation, contiguous), the sum over
  slots in the model dtype: the output equals, bit for bit, that of the dequantized bf16 folder loaded
  by transformers.
- decode (at most 8 tokens, whole blocks per row): one grouped 4-bit GEMV per projection over the
  (token, slot) rows, the biases gathered by expert id (``bias[ids]``), the gate between the launches,
  then the weighted float32-accumulated sum over the k slots. On the CPU the C++ grouped GEMV; on CUDA
  ``moe_cuda.grouped_gemv``, which reads the expert ids on the device: no host sync, so a decode step
  (any token count while a CUDA graph is captured) records into a CUDA graph and replays for any routing.
- prefill (more tokens; on CUDA too, and where the kernels do not take the layout): the per-expert
  loop, an expert with at most 8 tokens through the fused GEMV, one with more dequantized once and
  multiplied with all its tokens.

Under ``torch.compile`` the layer is one node, ``quantize_model::moe_experts_4bit_gated_keyed`` (a
custom op with a fake implementation; the codes its only input from the layer, the scales, code
table, biases and gate read by key: converter/kernels/prepared.py) whose implementation is the eager
forward above, so ``fullgraph=True`` traces a loaded model and gives the eager logits. A call that
needs gradients (adapters trained elsewhere) runs the eager loop instead (the op has no autograd
formula); ``torch.export`` of these layers is not supported (no keyed ops there, and the eager forward
calls the kernels directly).

Saving writes the records again under unsloth's names; ``model.dequantize()`` puts transformers'
``GptOssExperts`` back with the fused tensors (:meth:`QuantGptOssExperts4bit.dense_module`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from converter.loader import ops
from converter.loader.moe import (
    SOURCE_MODULE,
    ExpertBiases,
    QuantExperts4bit,
    _experts_forward,
    _experts_forward_cuda,
    _needs_autograd,
    _own_gate,
    moe_experts_4bit_gated_keyed,
)
from converter.loader.moe_records import (
    ExpertsLayout,
    MoeLoadError,
    Projection,
    _own,
    expert_state_dict,
    stack_records,
)
from converter.sources.gpt_oss import EXPERT_KEY
from formats.record import QuantizedTensor

__all__ = ["QuantGptOssExperts4bit", "attach_gpt_oss_experts"]

#: The two projections of a gpt-oss expert, as unsloth names their ModuleLists.
PROJS = ("gate_up_projs", "down_projs")


def _projs(hidden: int, inter: int) -> tuple[Projection, ...]:
    """The layer's buffer layout: the fused gate_up ``[2I, H]`` (gate/up rows interleaved), then down."""
    return (("gate_up_projs", 2 * inter, hidden), ("down_projs", hidden, inter))


def _stack_biases(biases: Mapping[str, list[torch.Tensor]], device: torch.device, dtype: torch.dtype):
    """(gate_up_bias [E, 2I], down_bias [E, H]) on ``device`` in ``dtype`` from the per-expert biases."""
    return tuple(torch.stack(biases[proj]).to(device, dtype) for proj in PROJS)


class QuantGptOssExperts4bit(QuantExperts4bit):
    """A gpt-oss layer's routed experts in 4 bit, called as ``GptOssExperts`` is (module docstring)."""

    #: The biases and the gate are registered with the codes' scales for the keyed op
    #: (``moe_experts_4bit_gated_keyed``): a new bias tensor (a move, a cast, an assignment) a new key.
    _prepared_buffers = ("packed", "absmax", "quant_map", "gate_up_bias", "down_bias")

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
        self._prepare()  # now with the biases (QuantExperts4bit.__init__ ran before they were there)

    def _prepared_extras(self) -> dict[str, Any]:
        return {"apply_gate": self.apply_gate}

    def _projections(self) -> tuple[Projection, ...]:
        return _projs(self.hidden_dim, self.intermediate_dim)

    def _record_key(self, prefix: str, e: int, r: int) -> str:
        return f"{prefix}{PROJS[r]}.{e}.weight"  # unsloth's ModuleList names

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        router_indices: torch.Tensor | None = None,
        routing_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states if dtype == self.compute_dtype else hidden_states.to(self.compute_dtype)
        w = routing_weights
        grad = _needs_autograd(x, w)
        key = self._prepared_key
        if key >= 0 and not grad and ops.keyed_tracing():
            # compiled: one op node, the layer's codes its only input (absmax, code table, biases and the
            # gate read by key), running the eager implementation below
            y = moe_experts_4bit_gated_keyed(
                x, router_indices, w, self.packed, key, self.intermediate_dim, self.blocksize, self.use_gemv
            )
        else:
            forward = _experts_forward_cuda if x.is_cuda else _experts_forward
            y = forward(
                x, router_indices, w, self.packed, self.absmax, self.quant_map, self.intermediate_dim,
                self.blocksize, self.act_fn, self.use_gemv and not grad, self.apply_gate,
                ExpertBiases(self.gate_up_bias, self.down_bias),
            )  # fmt: skip
        return y if y.dtype == dtype else y.to(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # unsloth's per-expert records again: each weight's bnb record, then its bias in the model dtype
        biases = {"gate_up_projs": self.gate_up_bias, "down_projs": self.down_bias}

        def bias(e: int, r: int, proj: str) -> dict[str, torch.Tensor]:
            return {f"{prefix}{proj}.{e}.bias": _own(biases[proj][e])}

        h, i = self.hidden_dim, self.intermediate_dim
        lay = ExpertsLayout(h, i, self.blocksize, _projs(h, i))

        def key(e: int, r: int, proj: str) -> str:
            return self._record_key(prefix, e, r)

        destination.update(expert_state_dict(self, prefix, lay, key=key, extra=bias))

    def _take_extra_state(self, groups, prefix, missing_keys):
        # the biases (<proj>.<e>.bias), stacked in the layer's bias dtype
        biases: dict[str, list[Any]] = {p: [] for p in PROJS}
        for e in range(self.num_experts):
            for proj in PROJS:
                bias = f"{prefix}{proj}.{e}.bias"
                group = groups.pop(bias, None)
                if group is None or bias not in group:
                    missing_keys.append(bias)
                else:
                    biases[proj].append(group[bias])
        if any(len(b) != self.num_experts for b in biases.values()):
            return None
        dtype = self.gate_up_bias.dtype

        def buffers(device: torch.device) -> dict[str, torch.Tensor]:
            gu, dn = _stack_biases(biases, device, dtype)
            return {"gate_up_bias": gu, "down_bias": dn}

        return buffers

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
        biases = {p: [experts[e]["bias"][p][1] for e in range(num)] for p in PROJS}
        quantized = [isinstance(v, QuantizedTensor) for parts in weights.values() for _, v in parts.values()]
        if all(quantized):
            st = stack_records(weights, where, ckpt_name, hidden, inter, dev, _projs(hidden, inter))
            gu_bias, dn_bias = _stack_biases(biases, dev, bias_dtype)
            layer = QuantGptOssExperts4bit.from_stacked(
                st,
                hidden_dim=hidden,
                intermediate=inter,
                compute_dtype=compute_dtype,
                act_name=None,
                act_fn=torch.sigmoid,  # unused: the class's own gate runs
                apply_gate=_own_gate(module) or module._apply_gate,  # GptOssExperts' clamped gate
                gate_up_bias=gu_bias,
                down_bias=dn_bias,
                config=module.config,
            )
            layer.__dict__[SOURCE_MODULE] = module
            model.set_submodule(name, layer)
        elif not any(quantized):  # 16-bit per-expert records: transformers' fused parameters
            target = module.gate_up_proj.dtype
            params = {
                "gate_up_proj": torch.stack([weights[e]["gate_up_projs"][1].T for e in range(num)]),
                "gate_up_proj_bias": torch.stack(biases["gate_up_projs"]),
                "down_proj": torch.stack([weights[e]["down_projs"][1].T for e in range(num)]),
                "down_proj_bias": torch.stack(biases["down_projs"]),
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
