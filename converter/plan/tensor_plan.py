"""The conversion plan: what happens to every tensor and which output shard it lands in.

Built from the source headers and the selection alone, before any tensor data is read, so bad
tensors (unsupported dtype, unquantizable shape, >= 2**31 elements) are refused up front. The plan
is also the identity a resumed run must match (converter/writer/manifest.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from converter.errors import InputError, UnsupportedTensorError
from converter.methods import QuantMethod, get_method, own_options
from converter.plan.moe import check_mode, is_expert_weight, other_experts
from converter.plan.moe_fused import FUSED_EXPERT_KEY, swap_last
from converter.plan.selection_facts import SUBCLASS_REASON, user_reason
from converter.sources.base import CODE_NAMES, DTYPE_SIZES, FLOAT_DTYPES, QUANTIZABLE_DTYPES, TensorInfo
from formats.quant_types import MAX_BNB_ELEMENTS, QuantType
from formats.validate import FORMAT_VERSION, FUSED_EXPERTS_FORMAT_VERSION, UnsupportedOption

#: torch dtype names accepted by --dtype / --compute-dtype, and their safetensors codes.
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "half": "float16",
    "float": "float32",
}
#: Storage dtypes bitsandbytes accepts for packed weights (bnb_4bit_quant_storage).
QUANT_STORAGES = {"uint8": "U8", "int8": "I8", "float16": "F16", "bfloat16": "BF16", "float32": "F32"}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal, as transformers), '512MiB' -> 536_870_912, 1000 -> 1000.

    A decimal value is huggingface_hub's ``parse_size_to_int`` to the byte (what transformers'
    ``save_pretrained(max_shard_size=...)`` uses): ``int(float(value) * unit)``, so '4.1MB' is 4_099_999
    bytes, as there; the binary units (which it lacks) are accelerate's ``convert_file_size_to_int``."""
    if isinstance(text, bool) or not isinstance(text, int | str):  # True is an int: 1 byte
        msg = f"invalid size {text!r}: use a whole number of bytes or a number with a unit, e.g. 5GB, 2GiB"
        raise InputError(msg)
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(text)
        if not m:
            msg = f"invalid size {text!r}: use a number with a unit, e.g. 5GB, 500MB, 2GiB"
            raise InputError(msg)
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        msg = f"invalid size {text!r}: must be positive"
        raise InputError(msg)
    return value


def normalize_dtype(name: str | None, option: str) -> str | None:
    """'bf16' / 'torch.bfloat16' / 'bfloat16' -> 'bfloat16'; None stays None."""
    if name is None:
        return None
    key = str(name).removeprefix("torch.").lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_CODES:
        msg = f"{option} {name!r} is not supported: use float32, float16 or bfloat16"
        raise InputError(msg)
    return key


@dataclass(frozen=True)
class Options:
    """Everything that decides the output bytes (threads and device do not: results are identical)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str | None = None
    dtype: str | None = None
    quant_storage: str = "uint8"
    skip: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    max_shard_size: int = 5 * 10**9
    int8_threshold: float = 6.0  # int8 only: llm_int8_threshold (forward pass; never changes the bytes)
    int8_scale: str = "cpu"  # int8 only: "cpu" / "cuda" row scale (bitsandbytes' CPU or GPU bytes)
    moe_experts: str = "keep"  # converter/plan/moe.py: keep routed experts 16-bit, or quantize them

    def __post_init__(self) -> None:
        self.method.check_options(self)  # get_method raises ValueError with the accepted names
        check_mode(self.moe_experts)
        if self.quant_storage not in QUANT_STORAGES:
            msg = (
                f"--quant-storage {self.quant_storage!r} is not supported: "
                f"use one of {', '.join(QUANT_STORAGES)}"
            )
            raise InputError(msg)

    @property
    def method(self) -> QuantMethod:
        """The quant method of ``quant_type`` (converter.methods registry)."""
        return get_method(self.quant_type)

    @property
    def qtype(self) -> QuantType:
        return QuantType.parse(self.quant_type)

    def to_json(self) -> dict:
        d = asdict(self)
        d["skip"], d["include"] = list(self.skip), list(self.include)
        if d["moe_experts"] == "keep":  # the default: fingerprints and provenance as before the option
            del d["moe_experts"]
        return self.method.options_json(d, own_options())


@dataclass(frozen=True)
class PlannedTensor:
    info: TensorInfo
    quantize: bool
    transpose: bool = False  # [.., in, out] quantized as [.., out, in]: GPT-2 Conv1D, Hub fused experts
    out_dtype: str = ""  # safetensors code written (kept tensors) or of the dequantized weight
    reason: str = ""  # why a tensor is kept
    out_nbytes: int = 0

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def out_shape(self) -> tuple[int, ...]:
        s = self.info.shape
        return swap_last(s) if self.transpose else s

    def to_json(self) -> dict:
        return {
            "name": self.info.name,
            "file": self.info.file,
            "dtype": self.info.dtype,
            "shape": list(self.info.shape),
            "quantize": self.quantize,
            "transpose": self.transpose,
            "out_dtype": self.out_dtype,
        }


@dataclass
class ShardPlan:
    name: str
    tensors: list[PlannedTensor] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class Plan:
    options: Options
    tensors: list[PlannedTensor]
    shards: list[ShardPlan]
    skip_modules: list[str]
    model_dtype: str  # torch name of the dtype the model is saved in (config.json "dtype")
    compute_dtype: str
    source_identity: dict
    model_type: str | None = None  # config.json's (which loaders read an MoE folder); not fingerprinted

    @property
    def quantized(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if t.quantize]

    @property
    def kept(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if not t.quantize]

    @functools.cached_property  # asked per shard written: computed once
    def format_version(self) -> int:
        """The folder's format version: 2 where a fused 3-D experts record is written (a version-1
        reader would run random experts), else 1 (formats/validate.py)."""
        fused = any(t.quantize and len(t.info.shape) == 3 for t in self.tensors)
        return FUSED_EXPERTS_FORMAT_VERSION if fused else FORMAT_VERSION

    def weight_map(self) -> dict[str, str]:
        """Planned tensor name -> shard file (the quantized record's own keys are added by the writer)."""
        return {t.name: s.name for s in self.shards for t in s.tensors}

    def to_json(self, tool_version: str) -> dict:
        return {
            "tool_version": tool_version,
            "format_version": str(self.format_version),
            "source": self.source_identity,
            "options": self.options.to_json(),
            "model_dtype": self.model_dtype,
            "compute_dtype": self.compute_dtype,
            "skip_modules": self.skip_modules,
            "shards": [{"name": s.name, "tensors": [t.to_json() for t in s.tensors]} for s in self.shards],
        }

    def fingerprint(self, tool_version: str) -> str:
        blob = json.dumps(self.to_json(tool_version), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def check_quantizable(t: TensorInfo, cast_to: str | None) -> None:
    """Refuse, before reading any data, a tensor selected for quantization that we cannot quantize."""
    skip_hint = f"pass --skip '{_module_of(t.name)}' to keep it unquantized"
    where = f"tensor {t.name!r} in {t.file}"
    if t.dtype not in QUANTIZABLE_DTYPES and not (cast_to and t.dtype in FLOAT_DTYPES):
        msg = f"{where} is {t.dtype}: only F32, F16 and BF16 weights can be quantized; {skip_hint}"
        if t.dtype == "F64":
            msg += " or --dtype float32 to cast"
        raise UnsupportedTensorError(msg)
    fused = len(t.shape) == 3 and FUSED_EXPERT_KEY.match(t.name) is not None  # --moe-experts quantize
    if not (len(t.shape) == 2 or fused) or t.numel == 0:
        msg = (
            f"{where} has shape {_shape_text(t.shape)}: only non-empty 2-D (Linear) weights and fused "
            f"3-D MoE experts can be quantized; {skip_hint}"
        )
        raise UnsupportedTensorError(msg)
    if t.numel > MAX_BNB_ELEMENTS:
        msg = (
            f"{where} has {t.numel} elements (shape {_shape_text(t.shape)}): bitsandbytes indexes with "
            f"32-bit ints, so tensors of 2^31 elements or more cannot be stored; {skip_hint}"
        )
        raise UnsupportedTensorError(msg)


def _kept_dtype(t: TensorInfo, cast_to: str | None, fp32: str | None) -> str:
    """Passthrough tensors are cast by --dtype like transformers does: floats only. ``fp32`` applies
    transformers' dtype plan (PreTrainedModel._get_dtype_plan) to the dtype the tensor would get:
    "fp16" (``_keep_in_fp32_modules``) keeps it float32 when that is float16, "strict"
    (``_keep_in_fp32_modules_strict``) when it is float16 or bfloat16."""
    if t.dtype not in FLOAT_DTYPES:
        return t.dtype
    target = DTYPE_CODES[cast_to] if cast_to is not None else t.dtype
    if (fp32 == "strict" and target in ("F16", "BF16")) or (fp32 == "fp16" and target == "F16"):
        return "F32"
    return target


def shard_names(n: int) -> list[str]:
    """model.safetensors for one shard (as transformers writes it), else model-0000k-of-0000n."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def _check_no_key_collision(planned: Sequence[PlannedTensor], options: Options) -> None:
    """Refuse a kept tensor named like a key a quantized weight writes (``<m>.weight_format``,
    ``W.absmax``) or lying under one (``W.x``: loaders refuse keys under a quantized weight's keys), from
    the names alone, before anything is written."""
    owner = {key: p.name for p in planned if p.quantize for key in options.method.layout(p, options)}
    for p in planned:
        if p.quantize:
            continue
        name = p.name
        while name not in owner and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in owner:
            module = _module_of(owner[name])
            what = "is a key" if name == p.name else f"lies under {name!r}, a key"
            msg = (
                f"tensor {p.name!r} in {p.info.file} {what} that quantizing {owner[name]!r} writes; pass "
                f"--skip {module!r} to keep that weight unquantized, or remove the tensor from the checkpoint"
            )
            raise UnsupportedTensorError(msg)


def build_plan(
    tensors: Sequence[TensorInfo],
    selection: object,
    options: Options,
    *,
    config: dict | None,
    source_identity: dict,
) -> Plan:
    """Decide every tensor's fate and cut the output into shards of at most ``max_shard_size`` bytes.

    ``selection`` is converter.plan.selection.Selection: ``quantize`` (name -> spec with ``transpose``),
    ``keep`` (name -> reason), ``skip_modules``, ``keep_fp32``, ``keep_fp32_strict``.
    """
    quantize: dict = dict(selection.quantize)  # type: ignore[attr-defined]
    keep: dict = dict(selection.keep)  # type: ignore[attr-defined]
    keep_fp32: set = set(getattr(selection, "keep_fp32", ()) or ())
    keep_fp32_strict: set = set(getattr(selection, "keep_fp32_strict", ()) or ())

    def fp32_rule(name: str) -> str | None:
        if name in keep_fp32_strict or _module_of(name) in keep_fp32_strict:
            return "strict"
        if name in keep_fp32 or _module_of(name) in keep_fp32:
            return "fp16"
        return None

    cast_to = options.dtype
    # Without --dtype, float tensors still get the one dtype transformers loads the model in (a checkpoint
    # that mixes float32 norms with bf16 linears is cast on load, then quantized and saved in it); float64
    # ones too (transformers casts every float tensor: a float64 norm written as such failed its forward).
    load_as = load_dtype(config, tensors)

    def target(t: TensorInfo) -> str | None:
        return cast_to or (load_as if t.dtype in QUANTIZABLE_DTYPES or t.dtype == "F64" else None)

    planned: list[PlannedTensor] = []
    for t in tensors:
        if t.name in quantize:
            check_quantizable(t, cast_to or load_as)
            spec = quantize[t.name]
            transpose = bool(getattr(spec, "transpose", False))
            n = t.numel
            out_bytes = options.method.out_nbytes(n, t.shape, options)
            out_dtype = DTYPE_CODES[to] if (to := target(t)) else t.dtype
            if out_dtype == "F64":
                out_dtype = "F32"
            out_shape = swap_last(t.shape) if transpose else t.shape
            try:
                options.method.check_tensor(t.file, t.name, out_shape, CODE_NAMES[out_dtype], options)
            except UnsupportedOption as exc:
                raise UnsupportedTensorError(str(exc)) from None
            planned.append(PlannedTensor(t, True, transpose, out_dtype, "", out_bytes))
        else:
            reason = keep.get(t.name, "not a linear weight")
            dt = _kept_dtype(t, target(t), fp32_rule(t.name))
            nbytes = t.numel * DTYPE_SIZES.get(dt, 1)
            planned.append(PlannedTensor(t, False, False, dt, reason, nbytes))

    _check_no_key_collision(planned, options)
    if not any(p.quantize for p in planned):
        f64 = next((p for p in planned if p.reason.startswith("dtype F64")), None)
        weights = [p for p in planned if p.info.name.endswith(".weight")]
        # the reason a 2-D weight was kept says more than a norm's, and a linear of the model's own
        # class (Falcon's FalconLinear) more than the head, which every model keeps
        matrices = [p for p in weights if len(p.info.shape) == 2]
        # the weights --skip / --include leave to the selection say why they were kept (the head's
        # reason is no answer to "--include '*experts*'")
        selected = [
            p
            for p in planned
            if user_reason(options.skip, options.include, p.name, _module_of(p.name)) is None
        ]
        # weights of any shape: --include '*input_linear*' naming Granite's 3-D experts is answered by
        # their reason, not by the head's
        wanted = [p for p in selected if p.info.name.endswith(".weight")]
        # an --include that names no weight (biases): one of the tensors it named, not the head
        named = selected if options.include and not wanted else []
        matrices = [p for p in wanted if len(p.info.shape) == 2] or wanted or matrices
        own_class = next((p for p in matrices if p.reason.startswith(SUBCLASS_REASON)), None)
        # routed experts, kept 16-bit by --moe-experts keep
        keep_experts = options.moe_experts == "keep"
        experts = next((p for p in wanted if keep_experts and is_expert_weight(p.name)), None)
        # a linear weight of an int / bool / fp8 dtype (every linear weight is one): its reason says why,
        # where the head's ('lm_head (output embedding)') did not
        non_float = [p for p in matrices if p.reason.startswith("dtype ")][:1]
        example = f64 or own_class or experts or (named or non_float or matrices or [None])[0]
        example = example or (weights[0] if weights else planned[0] if planned else None)
        detail = f" (e.g. {example.name!r}: {example.reason})" if example else ""
        if f64:
            hint = "pass --dtype float32 (or bfloat16) to cast float64 weights, or the checkpoint's dtype"
        elif own_class:
            hint = "transformers + bitsandbytes would load this model unquantized too"
        elif experts:
            hint = "routed MoE experts stay 16-bit with --moe-experts keep (the default); pass "
            hint += "--moe-experts quantize"
        elif example is not None and other_experts([example.info]):
            hint = (
                "routed MoE experts stored in this layout stay 16-bit (quantize-model does not quantize it)"
            )
        else:
            hint = "check --include/--skip, or the checkpoint's dtype"
        msg = (
            f"nothing to quantize: no tensor is a float32/float16/bfloat16 linear weight selected for "
            f"quantization{detail}; {hint}"
        )
        raise InputError(msg)
    groups: list[ShardPlan] = []
    for p in planned:
        if not groups or (groups[-1].tensors and groups[-1].nbytes + p.out_nbytes > options.max_shard_size):
            groups.append(ShardPlan(""))
        groups[-1].tensors.append(p)
        groups[-1].nbytes += p.out_nbytes
    if not groups:
        msg = "the source has no tensors; check that it is a model checkpoint"
        raise InputError(msg)
    for shard, name in zip(groups, shard_names(len(groups)), strict=True):
        shard.name = name

    model_dtype = _model_dtype(config, planned, cast_to or load_as)
    compute = options.compute_dtype or model_dtype
    if compute not in DTYPE_CODES:
        compute = "float32"
    return Plan(
        options=options,
        tensors=planned,
        shards=groups,
        skip_modules=list(selection.skip_modules),  # type: ignore[attr-defined]
        model_dtype=model_dtype,
        compute_dtype=compute,
        source_identity=source_identity,
        model_type=(config or {}).get("model_type"),
    )


def load_dtype(config: dict | None, tensors: Sequence[TensorInfo]) -> str | None:
    """The dtype ``from_pretrained(dtype="auto")`` builds the model in (``modeling_utils._get_dtype``):
    config.json's ``dtype``, else the first float tensor of the first weight file (keys in name order,
    float8 left out). None when that is not float32/float16/bfloat16, or without a config.json (no
    transformers model to load: no cast then)."""
    if config is None:
        return None
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str):
            value = value.removeprefix("torch.")
            return value if value in DTYPE_CODES else None
    if not tensors:
        return None
    first = min(t.file for t in tensors)
    for t in sorted((t for t in tensors if t.file == first), key=lambda t: t.name):
        if t.dtype in FLOAT_DTYPES:
            return CODE_NAMES.get(t.dtype) if t.dtype in QUANTIZABLE_DTYPES else None
    return None


def _model_dtype(config: dict | None, planned: Sequence[PlannedTensor], cast_to: str | None) -> str:
    if cast_to:
        return cast_to
    if config:
        for key in ("dtype", "torch_dtype"):
            value = config.get(key)
            if isinstance(value, str) and value.removeprefix("torch.") in DTYPE_CODES:
                return value.removeprefix("torch.")
    for p in planned:
        if p.quantize:
            return CODE_NAMES.get(p.info.dtype, "float32")
    return "float32"
