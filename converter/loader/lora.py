"""LoRA on our 4-bit layers through PEFT's custom-module API (for installs without bitsandbytes).

With bitsandbytes installed nothing is needed: a process that imports PEFT imports it (PEFT itself up
to 0.21, converter/loader/bnb_optional.py from 0.22), which makes our layers ``bnb.nn.Linear4bit``
instances, and plain ``peft.get_peft_model`` wraps them with PEFT's own 4-bit LoRA layer.
Without bitsandbytes, register this module's layer on the config first::

    from peft import LoraConfig, get_peft_model
    from converter.loader.lora import register_lora

    config = register_lora(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(model, config)

``merge``/``merge_and_unload`` decode the weight exactly, add the adapter's delta and quantize the
sum again with our kernels (same quant type, blocksize and nesting), as PEFT does with bitsandbytes;
``lora_bias`` goes into the layer's bias. Plain LoRA only (:data:`SUPPORTED`): DoRA and PEFT's other
variants are refused by name. ``target_modules="all-linear"`` needs the model:
``register_lora(config, model)``. A saved adapter reloads with
``PeftModel.from_pretrained(model, path, config=register_lora(LoraConfig.from_pretrained(path)))``.

4-bit layers only: LLM.int8 layers (``QuantLinear8bit``) get PEFT's 8-bit LoRA layer when bitsandbytes
is installed (they are then ``bnb.nn.Linear8bitLt``); without it PEFT refuses them. 4-bit MoE experts
(``--moe-experts quantize``) take no LoRA: they are packed buffers, neither the linear modules PEFT wraps
nor the ``nn.Parameter``s its ``target_parameters`` wraps. :func:`check_targets` refuses a config that
names them, with a ValueError that says what to do instead (``register_lora(config, model)`` calls it;
plain ``get_peft_model`` gives PEFT's generic errors, as no code of ours runs there); and the LoRA
layer ``register_lora`` registers for the experts module refuses to be built (``target_modules``
naming the experts module itself).
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import torch
from torch import nn

from converter.kernels import bnb4bit as kernels
from converter.loader.module import QuantLinear4bit, make_weight, state_from_record
from converter.user_frame import user_stacklevel
from formats.quant_types import QuantType
from formats.record import QuantizedTensor

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def requantize(layer: QuantLinear4bit, weight: torch.Tensor) -> None:
    """Replace ``layer``'s codes by ``weight`` quantized with the layer's own options."""
    state = layer.weight.quant_state
    qt = QuantType.parse(state.quant_type)
    w = weight.to(state.dtype).contiguous()
    packed, absmax = kernels.quantize_4bit(w, blocksize=state.blocksize, quant_type=qt)
    nested = kernels.quantize_nested(absmax) if state.nested else None
    storage = _DTYPE_NAMES.get(layer.weight.dtype, "uint8")
    record = QuantizedTensor.from_kernel_outputs(
        "weight", tuple(state.shape), _DTYPE_NAMES[state.dtype], qt, state.blocksize, packed, absmax, nested,
        quant_storage=storage,
    )  # fmt: skip
    layer._set_weight(make_weight(record.packed, state_from_record(record)))


#: What our LoRA layer runs: plain LoRA (PEFT's variants need their own forward and merge).
SUPPORTED = (
    "plain LoRA (r, lora_alpha, lora_dropout, use_rslora, lora_bias merged into the layer's bias, "
    "several adapters, mixed batches with adapter_names=)"
)

#: LoraConfig fields that ask for a LoRA variant, with the value that leaves it off.
_VARIANT_FIELDS = (
    ("use_dora", False),
    ("alora_invocation_tokens", None),
    ("arrow_config", None),
    ("velora_config", None),
)


def _unsupported(what: str) -> ValueError:
    return ValueError(
        f"{what} is not supported by register_lora's LoRA layer for quantize-model's 4-bit layers, "
        f"which runs {SUPPORTED}. With bitsandbytes installed, leave register_lora out: plain "
        "get_peft_model wraps the layers with PEFT's own 4-bit LoRA layer, which has the variants."
    )


def _lora_class() -> type:
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class LoraLinear4bit(nn.Module, LoraLayer):
        """PEFT LoRA around a :class:`QuantLinear4bit` (PEFT's conventions: lora_A/lora_B/scaling)."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0,
                     lora_alpha: int = 1, **kwargs: Any) -> None:  # fmt: skip
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> None:
            """No variant: DoRA, aLoRA, Arrow, VeLoRA (and any other) are refused by name."""
            for name, off in _VARIANT_FIELDS:
                if getattr(config, name, off) != off:
                    what = f"LoraConfig({name}={getattr(config, name)!r})"
                    raise _unsupported(what)
            try:
                variant = super().resolve_lora_variant(config=config, **kwargs)
            except ValueError as exc:
                what = f"this LoraConfig ({exc})"
                raise _unsupported(what) from exc
            if variant is not None:
                what = f"this LoraConfig (it asks for {type(variant).__name__})"
                raise _unsupported(what)

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

        def _delta_bias(self, adapter: str) -> torch.Tensor | None:
            """What the adapter adds to the layer's bias (lora_B's bias, scaled as in the forward)."""
            if not self.lora_bias.get(adapter, False):
                return None
            if self.get_base_layer().bias is None:
                msg = (
                    f"cannot merge adapter {adapter!r} (lora_bias=True) into {self.get_base_layer()!r}: "
                    "the layer has no bias to merge its bias into; keep the adapter unmerged"
                )
                raise RuntimeError(msg)
            return self.lora_B[adapter].bias.float() * self.scaling[adapter]

        def _apply(self, adapter: str, sign: int, safe_merge: bool = False) -> None:
            """Add (sign 1) or subtract (-1) the adapter's delta: weight re-quantized, bias in place."""
            base = self.get_base_layer()
            bias = self._delta_bias(adapter)
            w = base.dequantize(torch.float32) + sign * self.get_delta_weight(adapter).float()
            b = None if bias is None else base.bias.float() + sign * bias
            if safe_merge and not (torch.isfinite(w).all() and (b is None or torch.isfinite(b).all())):
                msg = f"NaNs detected in the merged weights; the adapter {adapter} seems to be broken"
                raise ValueError(msg)
            requantize(base, w)
            if b is not None:
                base.bias.data = b.detach().to(base.bias.dtype)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            adapter_names = check_adapters_to_merge(self, adapter_names)
            for adapter in adapter_names:
                if adapter not in self.lora_A:
                    continue
                warnings.warn("Merging LoRA into a 4-bit layer re-quantizes it (rounding)", stacklevel=2)
                self._apply(adapter, 1, safe_merge)
                self.merged_adapters.append(adapter)

        def unmerge(self) -> None:
            while self.merged_adapters:
                adapter = self.merged_adapters.pop()
                if adapter in self.lora_A:
                    self._apply(adapter, -1)

        def _lora_out(self, adapter: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            h = self.lora_dropout[adapter](x.to(lora_a.weight.dtype))
            return (lora_b(lora_a(h)) * self.scaling[adapter]).to(dtype)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)  # adapter_names: one per row, nothing merged
            adapter_names = kwargs.pop("adapter_names", None)
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return self.base_layer(x, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            if adapter_names is not None:  # a mixed batch: row i takes adapter_names[i] ("__base__": none)
                result = result.clone()
                for adapter in dict.fromkeys(adapter_names):
                    if adapter in self.lora_A:
                        rows = [i for i, a in enumerate(adapter_names) if a == adapter]
                        result[rows] += self._lora_out(adapter, x[rows], result.dtype)
                return result
            if self.merged:
                return result
            for adapter in self.active_adapters:
                if adapter in self.lora_A:
                    result = result + self._lora_out(adapter, x, result.dtype)
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return LoraLinear4bit


_CLASS: type | None = None


def lora_layer_class() -> type:
    """The LoRA layer class for :class:`QuantLinear4bit` (built on first use: PEFT is imported then)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _lora_class()
    return _CLASS


def register_lora(config: Any, model: nn.Module | None = None) -> Any:
    """Register our LoRA layer for our 4-bit layers on a ``peft.LoraConfig``; returns the config.

    ``target_modules="all-linear"``: PEFT expands it to ``nn.Linear`` / ``Conv1D`` modules only, which
    our 4-bit layers are not without bitsandbytes (with it they are ``bnb.nn.Linear4bit``). Pass the
    ``model`` and it is expanded here, as PEFT would with bitsandbytes: every 4-bit layer and every
    other linear layer PEFT picks, the output head (and a classification head) excluded. Without the
    model and without bitsandbytes it is refused (a ValueError), as PEFT would find none of them.
    """
    from converter.loader import module
    from converter.loader.moe import QuantExperts4bit

    if model is not None:
        check_targets(config, model)
    if _is_all_linear(config):
        if model is not None:
            config.target_modules = _all_linear(config, model)
        elif not module.HAS_BITSANDBYTES:
            msg = (
                "target_modules='all-linear' makes PEFT pick nn.Linear/Conv1D layers only, and without "
                "bitsandbytes quantize-model's 4-bit layers are neither: pass the model, "
                "register_lora(config, model), to expand it to the 4-bit layers (output head excluded, "
                "as PEFT does), or name the modules (target_modules=['q_proj', ...])"
            )
            raise ValueError(msg)
    config._register_custom_module({QuantLinear4bit: lora_layer_class(), QuantExperts4bit: _RefusedExperts})
    return config


def _experts_refusal(what: str, experts: list[str] | nn.Module) -> ValueError:
    """``experts``: the names of the model's 4-bit experts modules, or the one PEFT was wrapping."""
    if isinstance(experts, nn.Module):
        where = f"QuantExperts4bit({experts.extra_repr()})"
    else:
        where = _some(experts)
    return ValueError(
        f"{what} name 4-bit MoE experts ({where}): quantize-model keeps them as packed 4-bit buffers run "
        "by its own kernels (QuantExperts4bit), neither the linear modules PEFT wraps nor the nn.Parameters "
        "its target_parameters wraps (PEFT would say that the module is not supported, or that it found no "
        "target_modules / target_parameters), and LoRA on 4-bit experts is not supported. Train the "
        "other layers (target_modules such as ['q_proj', 'k_proj', 'v_proj', 'o_proj']; gradients flow "
        "through the 4-bit experts), or give the model 16-bit experts, which target_parameters wraps: "
        "convert with --moe-experts keep, or call model.dequantize() before get_peft_model"
    )


class _RefusedExperts:
    """What ``register_lora`` registers for :class:`QuantExperts4bit`: PEFT building a LoRA layer around
    the experts module (``target_modules`` naming it) gets our refusal instead of its generic one."""

    def __init__(self, target: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        raise _experts_refusal(_shown("target_modules", kwargs["config"].target_modules), target)


def _shown(field: str, targets: Any) -> str:
    return f"{field} {targets if isinstance(targets, str) else sorted(targets)!r}"


def check_targets(config: Any, model: nn.Module) -> None:
    """A ValueError, saying what to do instead, for a ``peft.LoraConfig`` that names ``model``'s 4-bit
    MoE experts (no-op for a model without them): ``target_parameters`` on them
    (``mlp.experts.gate_up_proj``), ``target_modules`` naming the experts module (``experts``), or naming
    their per-expert projections (``gate_proj``, Mixtral's ``w1``...), which PEFT maps onto the fused
    experts' parameters under transformers 5 (or finds nowhere else). Warns where ``get_peft_model``
    would wrap other layers than named: a target that also names the experts' projections (they get no
    adapter), or a regex that PEFT 0.22's conversion widens to leaf names. Call it before plain
    ``get_peft_model``, whose own errors for these do not say why; ``register_lora(config, model)``
    calls it."""
    from converter.loader.moe import QuantExperts4bit

    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts4bit)}
    if not modules:
        return
    experts = list(modules)
    params = sorted(getattr(config, "target_parameters", None) or ())
    named = [
        t for t in params if any(n == (mod := t.rpartition(".")[0]) or n.endswith(f".{mod}") for n in experts)
    ]
    if named:
        raise _experts_refusal(_shown("target_parameters", named), experts)
    targets = getattr(config, "target_modules", None)
    if targets is None:  # PEFT's defaults for the model type: attention projections
        return
    conversion = _PeftConversion(config, model)
    if any(_is_match(config, n) for n in experts) or _names_projections(conversion, modules):
        raise _experts_refusal(_shown("target_modules", targets), experts)
    if _is_all_linear(config):  # expanded to module names by register_lora, the experts left out
        return
    # names of other linear layers (DeepSeek's shared_experts.gate_proj, a dense MLP's down_proj) that
    # PEFT's transformers-5 conversion takes, by their leaf name, for the experts' fused parameters
    # (PEFT up to 0.21; 0.22 where those layers are not nn.Linear): get_peft_model would wrap none of them
    if conversion.maps_onto_experts:
        raise _mapped_refusal(_shown("target_modules", targets), experts)
    _warn_about_partial_targets(conversion, modules)


def _some(names: list[str], what: str = "layer") -> str:
    """``3 layers, e.g. 'model.layers.1.mlp.experts'``."""
    return f"{len(names)} {what}{'s' if len(names) > 1 else ''}, e.g. {names[0]!r}"


def _warn_about_partial_targets(conversion: _PeftConversion, modules: dict[str, nn.Module]) -> None:
    """Warn where get_peft_model would wrap other layers than ``config.target_modules`` name: more (a
    regex PEFT widens), or not the experts' projections they also name (4-bit: no LoRA)."""
    config = conversion.config
    targets, user = config.target_modules, user_stacklevel()
    if wider := conversion.widened():
        warnings.warn(
            f"target_modules {targets!r}: PEFT's transformers-5 conversion (peft.utils.transformers_weight_"
            "conversion) turns this regex into the leaf names of the layers it names, so get_peft_model "
            f"would also wrap layers it does not name ({_some(wider)}); give target_modules as a list of "
            "names (such as ['shared_experts.gate_proj']) to wrap only those",
            UserWarning,
            stacklevel=user,
        )
    if partly := _also_naming_projections(config, modules):
        warnings.warn(
            f"target_modules {partly!r} also name the per-expert projections of 4-bit MoE experts "
            f"({_some(list(modules))}), which take no LoRA: only the other layers they name get adapters "
            "(convert with --moe-experts keep, or call model.dequantize() before get_peft_model, to train "
            "the experts too)",
            UserWarning,
            stacklevel=user,
        )


def _mapped_refusal(what: str, experts: list[str]) -> ValueError:
    return ValueError(
        f"{what}: for this model type PEFT's transformers-5 conversion "
        "(peft.utils.transformers_weight_conversion) maps every target ending in a per-expert projection "
        "name (gate_proj, up_proj, down_proj; Mixtral's w1, w3, w2) onto the routed MoE experts' fused "
        "parameters and drops it from target_modules, so get_peft_model would wrap none of the layers "
        f"these name (shared experts, dense MLP layers), and the 4-bit experts ({_some(experts)}) take "
        "no LoRA. Name other layers (target_modules such as ['q_proj', 'k_proj', 'v_proj', 'o_proj']); "
        "PEFT 0.22 and later keep a target that names nn.Linear layers only, as our 4-bit layers are "
        "where bitsandbytes is installed"
    )


def _projection_keys(modules: dict[str, nn.Module]) -> list[str]:
    """The experts' per-expert projections as the checkpoint names them (``<experts>.<e>.gate_proj``;
    gpt-oss' ``<experts>.gate_up_projs.<e>``), expert 0 of each."""
    return [key for n, m in modules.items() for p in m.proj_names for key in (f"{n}.0.{p}", f"{n}.{p}.0")]


def _each_target(config: Any) -> list[tuple[Any, Any]]:
    """``(target, a copy of config naming it alone)`` for each of ``config.target_modules``."""
    targets = config.target_modules
    pairs = []
    for target in [targets] if isinstance(targets, str) else sorted(targets):
        one = copy.copy(config)
        one.target_modules = target if isinstance(targets, str) else {target}
        pairs.append((target, one))
    return pairs


def _also_naming_projections(config: Any, modules: dict[str, nn.Module]) -> list[str]:
    """The targets of ``config`` that name the experts' per-expert projections (beside other layers,
    else check_targets refused them)."""
    keys = _projection_keys(modules)
    return [target for target, one in _each_target(config) if any(_is_match(one, key) for key in keys)]


def _names_projections(conversion: _PeftConversion, modules: dict[str, nn.Module]) -> bool:
    """Whether ``config.target_modules`` name the experts' per-expert projections (the checkpoint's
    ``<experts>.<e>.gate_proj``; gpt-oss' ``<experts>.gate_up_projs.<e>``) by a target that names no
    other module (PEFT wraps nothing there, beside other targets without a word), or PEFT would map
    them onto the fused experts' parameters (transformers 5 MoE models)."""
    config, model = conversion.config, conversion.model
    projections = _projection_keys(modules)
    if not any(_is_match(config, key) for key in projections):
        return False
    if conversion.maps_onto_experts:
        return True
    others = [n for n, _ in model.named_modules() if n not in modules]
    # each target on its own: one naming only experts is a no-op even where another names q_proj
    return any(
        any(_is_match(one, key) for key in projections) and not any(_is_match(one, n) for n in others)
        for _, one in _each_target(config)
    )


def _is_match(config: Any, key: str) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(config, key))  # PEFT's "excluded" marker is falsy


class _PeftConversion:
    """PEFT's transformers-5 conversion of ``config`` for ``model``, run on a copy once, when first asked
    (a deepcopy and passes over every module; check_targets asks up to three times)."""

    def __init__(self, config: Any, model: nn.Module) -> None:
        self.config, self.model = config, model

    @functools.cached_property
    def converted(self) -> Any | None:
        """The converted copy (``config`` itself where this PEFT has no conversion); None where PEFT
        refuses the projections it found (Mixtral's w1 without w3)."""
        try:
            from peft.utils.transformers_weight_conversion import (
                convert_peft_config_for_transformers,
                get_model_conversion_mapping,
            )
        except ImportError:  # a PEFT without the conversion: the names stay module names
            return self.config
        converted = copy.deepcopy(self.config)
        conversions = get_model_conversion_mapping(self.model)
        try:
            convert_peft_config_for_transformers(converted, model=self.model, conversions=conversions)
        except ValueError:
            return None
        return converted

    @property
    def maps_onto_experts(self) -> bool:
        """Whether the conversion targets the experts' fused parameters, or refuses the projections."""
        if self.converted is None:
            return True
        leaves = {t.rpartition(".")[2] for t in getattr(self.converted, "target_parameters", None) or ()}
        return bool(leaves & {"gate_up_proj", "down_proj"})

    def widened(self) -> list[str]:
        """Modules a regex ``target_modules`` does not name but PEFT would wrap: its conversion (0.22)
        turns the regex into the leaf names of what it matched (``shared_experts.gate_proj`` -> every
        ``gate_proj``, a dense MLP's too)."""
        config, converted = self.config, self.converted
        if not isinstance(config.target_modules, str) or converted is None or converted is config:
            return []
        if isinstance(converted.target_modules, str):
            return []
        names = (n for n, _ in self.model.named_modules() if n)
        return [n for n in names if _is_match(converted, n) and not _is_match(config, n)]


def _is_all_linear(config: Any) -> bool:
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

    target = getattr(config, "target_modules", None)
    return isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND


def _all_linear(config: Any, model: nn.Module) -> set[str]:
    """PEFT's "all-linear" expansion for ``model``, our 4-bit layers counted as linear layers."""
    from peft import TaskType
    from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES

    # PEFT's own pick (nn.Linear / Conv1D, the output head excluded), on a copy of the config
    names = set(_maybe_include_all_linear_layers(copy.copy(config), model).target_modules)
    wrapped = [f"{n}." for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    names |= {
        n
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear4bit) and not any(n.startswith(w) for w in wrapped)
    }
    # the heads PEFT leaves out: the output embedding, else a sequence-classification head
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None and getattr(config, "task_type", None) == TaskType.SEQ_CLS:
        head = next((h for name in SEQ_CLS_HEAD_NAMES if (h := getattr(model, name, None)) is not None), None)
    return names - {
        n for n, m in model.named_modules() if (head is not None and m is head) or _scoring_router(n, m)
    }


def _scoring_router(name: str, module: nn.Module) -> bool:
    """A router that subclasses nn.Linear but returns more than its product (Llama 4's ``Llama4Router``:
    scores and logits; Phi-MoE's ``PhimoeTopKRouter``: logits, weights, experts): PEFT's LoRA layer adds
    its update to that output and fails at the first forward ("'tuple' object has no attribute 'dtype'",
    stock transformers + PEFT too), so "all-linear" leaves it out. Routers that compute a plain product
    stay targets."""
    from converter.plan.selection_facts import is_router

    overridden = isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward
    return overridden and is_router(name, module)
