"""Loading MoE experts: a folder's per-expert records into the model's experts modules.

:func:`attach_experts` replaces each transformers experts module whose records are 4-bit by the 4-bit
layer for its family (converter/loader/moe.py's :class:`QuantExperts4bit`; Llama 4's routed-only
:class:`QuantLlama4Experts4bit`, converter/loader/moe_llama4.py; gpt-oss's
:class:`QuantGptOssExperts4bit`, converter/loader/moe_gpt_oss.py) and stacks 16-bit ones into the
module's own parameters. Apart from the layers it builds, so that those modules import none of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from converter.loader.moe import (
    SOURCE_MODULE,
    QuantExperts4bit,
    _is_fused_experts,
    _model_module_name,
    _own_gate,
    _renamed_key,
)
from converter.loader.moe_fused import keep_fused_names_on_save, orient_kept, split_fused
from converter.loader.moe_gpt_oss import attach_gpt_oss_experts
from converter.loader.moe_llama4 import (
    QuantLlama4Experts4bit,
    is_llama4_sequential,
    route_block,
    route_sequential,
)
from converter.loader.moe_records import MoeLoadError, stack_records
from converter.loader.moe_ungated import check_ungated, ungated_layer
from converter.plan.moe import EXPERT_KEY
from converter.plan.moe import PROJ_ROLE as _ROLE
from formats.record import QuantizedTensor

__all__ = ["attach_experts"]


def _group(state: Mapping[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """checkpoint experts module -> expert index -> role -> record or tensor."""
    groups: dict[str, dict[int, dict[str, Any]]] = {}
    for key, value in state.items():
        m = EXPERT_KEY.match(key)
        if m is not None:
            groups.setdefault(m["module"], {}).setdefault(int(m["index"]), {})[_ROLE[m["proj"]]] = (
                key,
                value,
            )
    return groups


def _split_text_vision(
    model: nn.Module,
    groups: dict[str, dict[int, dict[str, Any]]],
    modules: Mapping[str, nn.Module],
    state: dict[str, Any],
) -> dict[str, str]:
    """ERNIE-4.5-VL: a checkpoint experts module (``model.layers.1.mlp.experts``) holds the layer's text
    experts, then its vision experts, which transformers builds as two fused modules of their own widths
    (``mlp.text_moe.experts``, ``mlp.vision_moe.experts``). Such a group is split in ``groups`` (in place)
    into one per model module, its experts numbered from 0 in each, keyed by the model module's name;
    returns those names (key -> model module name) for the caller to use as they are. The layer's routers
    move in ``state`` as transformers' conversion moves them: ``mlp.gate.weight`` ``[H, E]`` transposed
    into ``text_moe.gate.weight``, ``gate.weight_1`` into ``vision_moe``'s, and
    ``moe_statics.e_score_correction_bias`` ``[2, E]`` one row to each gate's ``moe_statics``."""
    targets: dict[str, str] = {}
    for ckpt_name in list(groups):
        if _model_module_name(model, ckpt_name, modules) is not None:
            continue
        parent = _model_module_name(model, ckpt_name.rpartition(".")[0], modules)
        subs = [f"{parent}.{g}.experts" for g in ("text_moe", "vision_moe")] if parent else []
        if not subs or not all(n in modules and _is_fused_experts(modules[n]) for n in subs):
            continue
        sizes = [int(modules[n].gate_up_proj.shape[0]) for n in subs]
        experts = groups[ckpt_name]
        if sorted(experts) != list(range(sum(sizes))):
            continue  # attach_experts names what is missing or extra, as for any layer
        del groups[ckpt_name]
        start = 0
        for sub, size in zip(subs, sizes, strict=True):
            groups[sub] = {e - start: experts[e] for e in range(start, start + size)}
            targets[sub] = sub
            start += size
        layer = ckpt_name.rpartition(".")[0]
        bias = state.pop(f"{layer}.moe_statics.e_score_correction_bias", None)
        for i, (group, leaf) in enumerate((("text_moe", "weight"), ("vision_moe", "weight_1"))):
            gate = state.pop(f"{layer}.gate.{leaf}", None)
            if isinstance(gate, torch.Tensor):
                state[f"{parent}.{group}.gate.weight"] = gate.t().contiguous()
            if isinstance(bias, torch.Tensor) and bias.dim() == 2 and bias.shape[0] == 2:
                state[f"{parent}.{group}.gate.moe_statics.e_score_correction_bias"] = bias[i : i + 1].clone()
    return targets


def _gate_only(x: torch.Tensor) -> torch.Tensor:
    """The act_fn of experts that gate with their own ``_apply_gate`` and have none: never called."""
    msg = "these experts gate with their class's own _apply_gate: no act_fn to run"
    raise RuntimeError(msg)


def _is_ungated_experts(module: nn.Module | None, experts: Mapping[int, Mapping[str, Any]]) -> bool:
    """Fused experts without a gate projection (NemotronH's ``up_proj`` / ``down_proj`` [E, out, in]:
    ``down(act(up(x)))``) and a checkpoint group of their up/down weights only."""
    return (
        module is not None
        and not hasattr(module, "gate_up_proj")
        and isinstance(getattr(module, "up_proj", None), torch.Tensor)
        and isinstance(getattr(module, "down_proj", None), torch.Tensor)
        and module.up_proj.dim() == 3
        and {r for parts in experts.values() for r in parts} == {"up", "down"}
    )


def _text_config(model: nn.Module) -> Any:
    """The model's text config (its config for a text-only model; None without one)."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _zero_experts_without_rows(
    model: nn.Module, experts: Mapping[int, Mapping[str, Any]], num: int
) -> list[int]:
    """LongCat-Flash's zero-computation (identity) experts whose gate/up rows the model has no place
    for: transformers 5.25 and later build ``LongcatFlashExperts.gate_up_proj`` for the
    ``n_routed_experts`` routed experts only, where 5.24 and earlier gave each of the ``zero_expert_num``
    identity experts a (never used) row too, and so wrote their gate/up weights, without a down weight,
    in ``save_pretrained``. A folder from such a checkpoint holds experts ``num..num + zero_expert_num - 1``
    with gate and up only; no version's forward reads them. Empty for any other checkpoint."""
    zero = getattr(_text_config(model), "zero_expert_num", None)
    if type(zero) is not int or zero <= 0:
        return []
    extra = sorted(e for e in experts if e >= num)
    if extra != list(range(num, num + zero)) or any(set(experts[e]) != {"gate", "up"} for e in extra):
        return []
    return extra


def _stack_ungated(module: nn.Module, experts: Mapping[int, Mapping[str, Any]]) -> None:
    """Stack 16-bit per-expert up/down weights (checked: ``check_ungated``) into the module's ``up_proj`` /
    ``down_proj`` as transformers' conversion does."""
    num = int(module.up_proj.shape[0])
    for role, name in (("up", "up_proj"), ("down", "down_proj")):
        target = getattr(module, name).dtype
        stacked = torch.stack([experts[e][role][1] for e in range(num)]).to(target)
        setattr(module, name, nn.Parameter(stacked, requires_grad=False))


def attach_experts(
    model: nn.Module,
    state: dict[str, Any],
    compute_dtype: torch.dtype | None,
    *,
    where: str,
    device: str | torch.device = "cpu",
) -> list[str]:
    """Fill the model's fused experts modules from per-expert tensors, which leave ``state`` (in place).
    Returns the per-expert keys of layers the model has no place for (DeepSeek-V3's and GLM-4.5's MTP
    layer), taken out of ``state`` unused, as transformers leaves its unexpected keys.

    4-bit experts are stacked on ``device`` (one copy from the shards' mapping to that device).

    Quantized experts become :class:`QuantExperts4bit` (Llama 4's per-expert
    ``SequentialLlama4TextExperts`` its routed-only twin, converter/loader/moe_llama4.py); 16-bit ones
    are stacked into the module's own ``gate_up_proj`` / ``down_proj`` (Llama 4's stay per-expert
    nn.Linear). Other keys whose names transformers renames on load (Mixtral's router
    ``block_sparse_moe.gate`` -> ``mlp.gate``; the vision-language models' legacy ``model.layers.*`` /
    ``language_model.model.*`` -> ``model.language_model.*``), quantized records included, are renamed.
    """
    modules = dict(model.named_modules())
    # gpt-oss's per-expert records (unsloth's names): QuantGptOssExperts4bit, loader/moe_gpt_oss.py
    attach_gpt_oss_experts(
        model, state, compute_dtype, where=where, device=device,
        module_name=lambda m: _model_module_name(model, m, modules),
    )  # fmt: skip
    # Qwen3-VL-MoE's fused 3-D records, as per-expert pieces
    fused = split_fused(state, where, sizes_only=torch.device(device).type == "meta")
    orient_kept(state, lambda m: _model_module_name(model, m, modules), modules)
    groups = _group(state)
    targets = _split_text_vision(model, groups, modules, state)
    used: set[str] = set()
    unused: list[str] = []
    for ckpt_name, experts in groups.items():
        name = targets.get(ckpt_name) or _model_module_name(model, ckpt_name, modules)
        module = modules.get(name) if name else None
        if module is None and _model_module_name(model, ckpt_name.rpartition(".")[0], modules) is None:
            # no MoE block at all where the experts sit (the MTP layer after the last decoder layer):
            # transformers reports the keys as unexpected and loads; a block without fused experts
            # (a dense MLP where the checkpoint has experts) stays an error below
            keys = sorted(key for parts in experts.values() for key, _ in parts.values())
            unused += keys
            for key in keys:
                del state[key]
            continue
        quantized = any(
            isinstance(v, QuantizedTensor) for parts in experts.values() for _, v in parts.values()
        )
        # Llama 4's experts are each their own linear, so a layer may mix 4-bit and 16-bit experts (a --skip
        # of one expert; stock transformers loads it): only a layer whose experts are all 4-bit is stacked
        every = all(isinstance(v, QuantizedTensor) for parts in experts.values() for _, v in parts.values())
        llama4 = isinstance(module, nn.ModuleList) and every and is_llama4_sequential(module)
        if isinstance(module, nn.ModuleList) and not llama4:
            # per-expert linears (Llama 4's 16-bit experts, built as transformers builds them; the 4-bit
            # ones of a mixed layer become Linear4bit as any quantized linear does), run for the routed
            # experts only
            if is_llama4_sequential(module):
                route_sequential(module, module[0].config.num_experts_per_tok)
            continue
        if _is_ungated_experts(module, experts):  # NemotronH's: down(act(up(x))), loader/moe_ungated.py
            check_ungated(module, experts, where=where, ckpt_name=ckpt_name)
            used.update(key for parts in experts.values() for key, _ in parts.values())
            if not quantized:
                _stack_ungated(module, experts)
                continue
            text = _text_config(model)
            act_name = getattr(text, "mlp_hidden_act", None) or getattr(text, "hidden_act", None)
            layer = ungated_layer(
                module, experts, compute_dtype, act_name, where=where, ckpt_name=ckpt_name,
                device=torch.device(device),
            )  # fmt: skip
            model.set_submodule(name, layer)
            state.update(dict.fromkeys([k for parts in experts.values() for k, _ in parts.values()]))
            experts.clear()
            continue
        if module is None or not (llama4 or _is_fused_experts(module)):
            kind = type(module).__name__ if module is not None else "no module"
            msg = f"{where}: per-expert tensors under {ckpt_name!r} have no fused experts module ({kind})"
            raise MoeLoadError(msg)
        if llama4:  # per-expert nn.Linear on the meta device: gate_proj [I, H]
            num, (inter, hidden) = len(module), (int(d) for d in module[0].gate_proj.weight.shape)
            num_down = num
        else:
            num, inter, hidden = (int(d) for d in module.gate_up_proj.shape)
            inter //= 2
            # LongCat-Flash: gate_up_proj also holds a (never used) row for each of its zero_expert_num
            # zero-computation (identity) experts after the routed ones, down_proj none; its checkpoint
            # has their gate/up weights and no down weight (plan/moe.py's _zero_expert_rows)
            num_down = min(num, int(module.down_proj.shape[0]))
        # transformers >= 5.25's LongcatFlashExperts has rows for the routed experts only: a folder from a
        # checkpoint that 5.24 saved still has the identity experts' gate/up weights, which no forward reads
        rowless = _zero_experts_without_rows(model, experts, num) if not llama4 and num_down == num else []
        missing = [
            (e, r)
            for e in range(num)
            for r in ("gate", "up", "down")
            if r not in experts.get(e, {}) and (r != "down" or e < num_down)
        ]
        extra = sorted(e for e in experts if not 0 <= e < num and e not in rowless) or [
            e for e in range(num_down, num) if "down" in experts.get(e, {})
        ]
        if missing or extra:
            what = (
                f"expert {missing[0][0]} {missing[0][1]} is missing"
                if missing
                else f"the checkpoint also holds expert(s) {extra[:5]}; config.json and the shards disagree"
            )
            needs = "gate/up/down" if num_down == num else f"gate/up, the first {num_down} down too"
            msg = f"{where}: {ckpt_name!r} needs {num} experts x {needs}; {what}"
            raise MoeLoadError(msg)
        # --moe-experts quantize refuses such a source: not ours
        if quantized and (num_down < num or rowless):
            kind = getattr(getattr(model, "config", None), "model_type", None) or type(module).__name__
            msg = (
                f"{where}: {ckpt_name!r} ({kind}) holds 4-bit experts and "
                f"{len(rowless) or num - num_down} zero-computation (identity) experts, whose gate/up rows "
                "have no down weight: load_quantized stacks 4-bit experts with all three projections only; "
                "load a folder whose experts stay 16-bit (quantize-model convert --moe-experts keep)"
            )
            raise MoeLoadError(msg)
        for e in rowless:  # 16-bit: left out and reported unused, as transformers leaves unexpected keys
            for key, _ in experts.pop(e).values():
                unused.append(key)
                del state[key]
        other = next(
            (
                k
                for parts in experts.values()
                for k, v in parts.values()
                if not isinstance(v, (torch.Tensor, QuantizedTensor))
            ),
            None,
        )
        if other is not None:  # LLM.int8 experts (transformers 4.x's load_in_8bit of per-expert Linears)
            msg = (
                f"{where}: {ckpt_name!r}: the experts are LLM.int8 records (e.g. {other!r}); load_quantized "
                "runs 4-bit or 16-bit experts only: `quantize-model dequantize` the folder and load that, "
                "or convert the dequantized checkpoint with --moe-experts quantize"
            )
            raise MoeLoadError(msg)
        used.update(key for parts in experts.values() for key, _ in parts.values())
        if quantized and not llama4 and not hasattr(module, "act_fn") and _own_gate(module) is None:
            msg = (
                f"{where}: {ckpt_name!r}: the experts module {type(module).__name__} has neither an act_fn "
                "nor a gate of its own (_apply_gate): load_quantized cannot run its 4-bit experts; load a "
                "folder whose experts stay 16-bit (quantize-model convert --moe-experts keep)"
            )
            raise MoeLoadError(msg)
        if quantized:
            st = stack_records(experts, where, ckpt_name, hidden, inter, torch.device(device))
            config = getattr(module, "config", None)
            cls: type[QuantExperts4bit] = QuantExperts4bit
            extra: dict[str, Any] = {}
            if llama4:  # its MoE block calls experts(routed_in): the routed-only twin (loader/moe_llama4.py)
                config = module[0].config
                cls, extra = QuantLlama4Experts4bit, {"top_k": config.num_experts_per_tok, "config": config}
            apply_gate = None if llama4 else _own_gate(module)  # checked above: one of the two exists
            act_fn = module[0].activation_fn if llama4 else getattr(module, "act_fn", None)
            layer = cls.from_stacked(
                st,
                hidden_dim=hidden,
                intermediate=inter,
                compute_dtype=compute_dtype,
                act_name=getattr(config, "hidden_act", None),
                # a class with its own gate may have no act_fn (MiniMax-M3-VL's clamped SwiGLU): unused then
                act_fn=act_fn if act_fn is not None else _gate_only,
                apply_gate=apply_gate,
                proj_names=st.proj_names,
                fused=ckpt_name in fused,
                **extra,
            )
            # transformers' module (its parameters on the meta device), for model.dequantize()
            layer.__dict__[SOURCE_MODULE] = module
            model.set_submodule(name, layer)
            if llama4 and type(block := modules.get(name.rpartition(".")[0])).__name__ == "Llama4TextMoe":
                route_block(block)  # hands the experts the routed rows (loader/moe_llama4.py)
            # Release this layer's per-expert tensors now: on a streamed GPU load they are device
            # tensors, and holding every layer's until the end doubled the experts' peak memory.
            # (a comprehension: loop variables left behind would keep the last expert alive)
            state.update(dict.fromkeys([k for parts in experts.values() for k, _ in parts.values()]))
            experts.clear()
        else:
            want = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
            for e in range(num):
                for role, shape in want.items():
                    if role not in experts[e]:  # a zero-computation expert's down (checked above)
                        continue
                    key, value = experts[e][role]
                    if tuple(value.shape) != shape:
                        msg = f"{where}: {key!r} has shape {list(value.shape)}, the model wants {list(shape)}"
                        raise MoeLoadError(msg)
            target = module.gate_up_proj.dtype
            gu = torch.stack([torch.cat([experts[e]["gate"][1], experts[e]["up"][1]]) for e in range(num)])
            dn = torch.stack([experts[e]["down"][1] for e in range(num_down)])
            module.gate_up_proj = nn.Parameter(gu.to(target), requires_grad=False)
            module.down_proj = nn.Parameter(dn.to(target), requires_grad=False)
    if fused:
        keep_fused_names_on_save(model)
    # buffers too: a renaming may target one (DeepSeek-V4's router bias ``ffn.gate.bias`` ->
    # ``mlp.gate.e_score_correction_bias``, which picks the top-k experts)
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    rest: dict[str, Any] = {}
    for key, value in state.items():
        if key in used:
            continue
        if key not in params:  # plain tensors and quantized records alike (Qwen2-VL, LLaVA, Gemma 3)
            key = _renamed_key(model, key, params)
        rest[key] = value
    state.clear()
    state.update(rest)
    return unused
