"""The MoE router after its linear layer as one op: ``quantize_model::route_topk``.

transformers' top-k routers (``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter``, ``OlmoeTopKRouter``,
``MixtralTopKRouter``) run, per layer and decode step, F.linear then softmax in float32, topk, sum,
divide and cast: six launches on CUDA, of which everything after the linear is here one op:

    probs = softmax(logits.float(), dim=-1); w, i = topk(probs, k, dim=-1)  # sorted
    if renorm: w = w / w.sum(-1, keepdim=True)
    if out_dtype is not None: w = w.to(out_dtype)

- CPU (and any device without our kernel): exactly those torch ops in that order, so bit-identical to
  transformers by construction.
- CUDA (``csrc/cuda/route_topk.cu``; E <= 1024 experts, k <= 32): one launch that reproduces torch's
  CUDA arithmetic (persistent warp softmax, gather top-k + bitonic sort, Reduce.cuh's sum). Two things
  depend on the torch build: the order of the renormalisation sum's warp reduction (offsets increasing
  in older torch, decreasing in newer) and the order in which top-k returns equal probabilities. On
  first use per (device, dtype, E, k, renorm, out_dtype) a self-check runs a fixed seeded batch of
  logits (random, peaked, flat, repeated maxima, coarse values with many ties) through the kernel in
  each configuration and through the torch ops, adopts the first configuration that matches bit for bit
  (weights and indices) and otherwise keeps the torch ops for that key, with one logged message. The
  check never runs during CUDA-graph capture (then the torch ops run until an eager call decides) and
  the loader runs it eagerly at load time (:func:`prewarm`); torch.compile sees the op's fake.

:func:`install` swaps each router whose forward is exactly transformers' pattern (its class name, its
attributes and its forward's source are checked) to a cached subclass that calls the op, so the module
stays an instance of its class (transformers' OutputRecorder for ``router_logits`` still finds it).
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import textwrap
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from converter.kernels.checks import KERNEL_DTYPE_CODES
from converter.kernels.cuda_launch import current_stream, device_index
from converter.loader import moe_cuda

logger = logging.getLogger(__name__)

#: Shapes the CUDA kernel takes (csrc/cuda/moe_cuda.h: kRouteMaxExperts, kRouteMaxK).
MAX_EXPERTS = 1024
MAX_K = 32

#: Kernel configurations (sum_order, tie_mode) the self-check tries, in order: newer torch's decreasing
#: warp offsets first, torch's gather + bitonic tie order first.
CONFIGS: tuple[tuple[int, int], ...] = ((1, 0), (0, 0), (1, 1), (0, 1))

#: Rows of the self-check batch.
CHECK_ROWS = 256

#: (device, logits dtype, E, k, renorm, out_dtype) -> adopted (sum_order, tie_mode), or None: torch ops.
_decisions: dict[tuple[Any, ...], tuple[int, int] | None] = {}


def route_torch(
    logits: torch.Tensor, k: int, renorm: bool, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' router after its linear, op for op (the reference and the fallback)."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # = softmax(logits.float()): exact widening
    weights, indices = torch.topk(probs, k, dim=-1)
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if out_dtype is not None:
        weights = weights.to(out_dtype)
    return weights, indices


@functools.cache
def _kernel() -> Any | None:
    ext = moe_cuda._ext()
    return getattr(ext, "cuda_route_topk", None) if ext is not None else None


def kernel_ok(logits: torch.Tensor, k: int, out_dtype: torch.dtype | None) -> bool:
    """Whether the CUDA kernel takes these logits (else the torch ops run)."""
    experts = logits.shape[-1] if logits.dim() else 0
    return (
        logits.is_cuda
        and logits.dtype in KERNEL_DTYPE_CODES
        and (out_dtype is None or out_dtype in KERNEL_DTYPE_CODES)
        and 1 <= k <= min(MAX_K, experts)
        and experts <= MAX_EXPERTS
        and _kernel() is not None
    )


def launch(
    logits: torch.Tensor,
    k: int,
    renorm: bool,
    out_dtype: torch.dtype | None,
    sum_order: int,
    tie_mode: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel in one configuration (no check: :func:`route_topk` decides which one is exact)."""
    x = logits if logits.is_contiguous() else logits.contiguous()
    experts = x.shape[-1]
    shape = (*x.shape[:-1], k)
    w_dtype = out_dtype if out_dtype is not None else torch.float32
    weights = torch.empty(shape, dtype=w_dtype, device=x.device)
    indices = torch.empty(shape, dtype=torch.int64, device=x.device)
    rows = x.numel() // experts
    if rows:
        device = x.device
        _kernel()(
            device_index(device), x.data_ptr(), KERNEL_DTYPE_CODES[x.dtype], rows, experts, k, renorm,
            KERNEL_DTYPE_CODES[w_dtype], sum_order, tie_mode, weights.data_ptr(), indices.data_ptr(),
            current_stream(device),
        )  # fmt: skip
    return weights, indices


def check_batch(experts: int, dtype: torch.dtype, rows: int = CHECK_ROWS, seed: int = 0) -> torch.Tensor:
    """A fixed seeded [rows, experts] batch of logits (CPU) that exercises what can differ: random rows
    of several scales (flat to very peaked), rows whose maximum repeats, rows of coarse values (many equal
    probabilities, also at the k-th place) and constant rows."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.01, 0.3, 1.0, 3.0, 30.0])
    x = torch.randn(rows, experts, generator=g) * scales[torch.arange(rows) % len(scales), None]
    q = rows // 8
    for r in range(q, 2 * q):  # a repeated maximum (at a random second place)
        j = int(torch.randint(experts, (1,), generator=g))
        x[r, j] = x[r].max()
    x[2 * q : 4 * q] = torch.round(x[2 * q : 4 * q] * 2) / 2  # coarse: ties everywhere
    x[4 * q : 4 * q + 2] = 0.5  # all equal
    return x.to(dtype)


def decide(
    device: torch.device,
    dtype: torch.dtype,
    experts: int,
    k: int,
    renorm: bool,
    out_dtype: torch.dtype | None,
) -> tuple[int, int] | None:
    """The kernel configuration adopted for this key (running the self-check once), or None."""
    key = (str(device), dtype, experts, k, renorm, out_dtype)
    if key in _decisions:
        return _decisions[key]
    logits = check_batch(experts, dtype).to(device)
    ref_w, ref_i = route_torch(logits, k, renorm, out_dtype)
    adopted = None
    for config in CONFIGS:
        w, i = launch(logits, k, renorm, out_dtype, *config)
        if torch.equal(i, ref_i) and _same_bits(w, ref_w):
            adopted = config
            break
    _decisions[key] = adopted
    what = f"E={experts}, k={k}, renorm={renorm}, {dtype} -> {out_dtype}, {device}"
    if adopted is None:
        logger.warning("fused MoE router: the kernel does not match torch bit for bit (%s); torch ops", what)
    else:
        logger.info("fused MoE router: sum order %d, tie mode %d match torch (%s)", *adopted, what)
    return adopted


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))


def route(
    logits: torch.Tensor, k: int, renorm: bool, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's implementation on any device (eager callers skip the custom op's dispatch)."""
    if not kernel_ok(logits, k, out_dtype):
        return route_torch(logits, k, renorm, out_dtype)
    key = (str(logits.device), logits.dtype, logits.shape[-1], k, renorm, out_dtype)
    if key in _decisions:
        config = _decisions[key]
    elif torch.cuda.is_current_stream_capturing():  # no self-check inside a capture: torch's ops
        config = None
    else:
        config = decide(logits.device, logits.dtype, logits.shape[-1], k, renorm, out_dtype)
    if config is None:
        return route_torch(logits, k, renorm, out_dtype)
    return launch(logits, k, renorm, out_dtype, *config)


@torch.library.custom_op("quantize_model::route_topk", mutates_args=())
def route_topk(
    logits: torch.Tensor, k: int, renorm: bool, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [..., k], indices [..., k] int64): softmax in float32, top-k, optional renormalisation and
    cast (module docstring)."""
    return route_torch(logits, k, renorm, out_dtype)


@route_topk.register_kernel("cuda")
def _(
    logits: torch.Tensor, k: int, renorm: bool, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return route(logits, k, renorm, out_dtype)


@route_topk.register_fake
def _(
    logits: torch.Tensor, k: int, renorm: bool, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*logits.shape[:-1], k)
    w_dtype = out_dtype if out_dtype is not None else torch.float32
    return logits.new_empty(shape, dtype=w_dtype), logits.new_empty(shape, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# transformers' routers

# The forwards we replace, as transformers 5.x writes them (comments and blank lines dropped, spaces
# collapsed): "cast" routers renormalise when norm_topk_prob and cast back to the logits' dtype;
# Mixtral's always renormalises and keeps float32.
_CAST_FORWARD = """
def forward(self, hidden_states):
hidden_states = hidden_states.reshape(-1, self.hidden_dim)
router_logits = F.linear(hidden_states, self.weight)
router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
if self.norm_topk_prob:
router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
router_top_value = router_top_value.to(router_logits.dtype)
router_scores = router_top_value
return router_logits, router_scores, router_indices
"""
_MIXTRAL_FORWARD = """
def forward(self, hidden_states):
hidden_states = hidden_states.reshape(-1, self.hidden_dim)
router_logits = F.linear(hidden_states, self.weight)
router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
router_scores = router_top_value
return router_logits, router_scores, router_indices
"""
#: Router class name -> the forward it must have ("cast" or "mixtral" semantics).
ROUTERS: dict[str, tuple[str, str]] = {
    "Qwen2MoeTopKRouter": ("cast", _CAST_FORWARD),
    "Qwen3MoeTopKRouter": ("cast", _CAST_FORWARD),
    "OlmoeTopKRouter": ("cast", _CAST_FORWARD),
    "MixtralTopKRouter": ("mixtral", _MIXTRAL_FORWARD),
}


def _normalized(source: str) -> str:
    lines = (re.sub(r"\s+#.*$", "", ln).strip() for ln in textwrap.dedent(source).splitlines())
    return "\n".join(re.sub(r"\s+", " ", ln) for ln in lines if ln)


@functools.cache
def _router_kind(cls: type) -> str | None:
    """ "cast" / "mixtral" when ``cls`` is one of transformers' routers with exactly the known forward."""
    spec = ROUTERS.get(cls.__name__)
    if spec is None or not cls.__module__.startswith("transformers.models."):
        return None
    kind, expected = spec
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):  # no source (frozen install): not provably the pattern
        return None
    return kind if _normalized(source) == _normalized(expected) else None


def router_kind(module: nn.Module) -> str | None:
    """The fused semantics for ``module``, or None (it keeps transformers' forward)."""
    cls = type(module)
    if getattr(cls, "_qm_fused_router", None) is not None:
        return cls._qm_fused_router
    kind = _router_kind(cls)
    if kind is None or "forward" in vars(module):  # an instance-level forward (a hook) would be bypassed
        return None
    weight = getattr(module, "weight", None)
    top_k, hidden = getattr(module, "top_k", None), getattr(module, "hidden_dim", None)
    ok = (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and isinstance(top_k, int)
        and isinstance(hidden, int)
        and weight.shape[1] == hidden
        and 1 <= top_k <= weight.shape[0]
        and (kind == "mixtral" or isinstance(getattr(module, "norm_topk_prob", None), bool))
    )
    return kind if ok else None


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor):
    weight = self.weight
    if self.training or (torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad)):
        # the op has no backward: transformers' forward. Through the class the router had before
        # install, not super(type(self)): a subclass made later (a weight parametrization, which
        # PEFT's LoRA on the router adds) is type(self), and super() of it would land here again.
        return type(self)._qm_base.forward(self, hidden_states)
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, weight)
    if self._qm_fused_router == "mixtral":  # not type(self).: a Python aliasing guard per layer
        renorm, out_dtype = True, None
    else:
        renorm, out_dtype = self.norm_topk_prob, router_logits.dtype
    if torch.compiler.is_compiling():  # one node for torch.compile
        scores, indices = torch.ops.quantize_model.route_topk(router_logits, self.top_k, renorm, out_dtype)
    else:  # eager: the implementation without the custom op's Python dispatch (decode is host-bound)
        scores, indices = route(router_logits, self.top_k, renorm, out_dtype)
    return router_logits, scores, indices


def _fused_reduce_ex(self: nn.Module, protocol: int) -> tuple:
    """Pickled as (base class, kind) + state: the fused class has the base's name, so pickle's lookup of
    it by name would find transformers' class instead ("it's not the same object")."""
    cls = type(self)
    if "_qm_fused_router" not in cls.__dict__:  # a subclass made after install: torch's own rules
        return super(cls, self).__reduce_ex__(protocol)
    return _new_fused, (cls._qm_base, cls._qm_fused_router), self.__getstate__()


def _new_fused(base: type, kind: str) -> nn.Module:
    """An empty instance of the fused class of ``base`` (its state is set by pickle)."""
    cls = _fused_class(base, kind)
    return cls.__new__(cls)


@functools.cache
def _fused_class(cls: type, kind: str) -> type:
    attrs = {
        "forward": _fused_forward,
        "__reduce_ex__": _fused_reduce_ex,
        "_qm_fused_router": kind,
        "_qm_base": cls,
        "__module__": cls.__module__,
    }
    return type(cls.__name__, (cls,), {**attrs, "__qualname__": cls.__qualname__})


def install(model: nn.Module) -> list[str]:
    """Swap every router with exactly transformers' pattern to the fused forward; returns their names."""
    done = []
    for name, module in model.named_modules():
        kind = router_kind(module)
        if kind is None or getattr(type(module), "_qm_fused_router", None) is not None:
            continue
        module.__class__ = _fused_class(type(module), kind)
        done.append(name)
    return done


def uninstall(model: nn.Module) -> None:
    """Back to transformers' forwards (tests compare both)."""
    for module in model.modules():
        cls = type(module)
        if getattr(cls, "_qm_fused_router", None) is None:
            continue
        if "_qm_fused_router" in cls.__dict__:  # the fused class itself
            module.__class__ = cls._qm_base
        else:  # a subclass made after install (torch's parametrizations): the same, on the original base
            own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, (cls._qm_base,), own)


def prewarm(model: nn.Module) -> None:
    """Run the self-check now, eagerly, for every fused router on a CUDA device (not later inside a
    torch.compile trace or a CUDA-graph capture)."""
    for module in model.modules():
        kind = getattr(type(module), "_qm_fused_router", None)
        weight = getattr(module, "weight", None)
        if kind is None or not isinstance(weight, torch.Tensor) or weight.device.type != "cuda":
            continue
        renorm = True if kind == "mixtral" else module.norm_topk_prob
        out_dtype = None if kind == "mixtral" else weight.dtype
        probe = torch.empty(1, weight.shape[0], dtype=weight.dtype, device=weight.device)
        if kernel_ok(probe, module.top_k, out_dtype):
            decide(weight.device, weight.dtype, weight.shape[0], module.top_k, renorm, out_dtype)
