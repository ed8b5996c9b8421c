"""``Linear4bit``: a frozen 4-bit linear layer read from a pre-quantized checkpoint.

The layer keeps bitsandbytes' representation, so PEFT and bnb tooling see what they expect:
``self.weight`` is a ``Params4bit`` (bnb's own class once bitsandbytes is imported) holding the
packed codes, with ``weight.quant_state`` holding absmax, the 16-entry quant map and, when nested,
the 8-bit absmax codes, their scales, offset and 256-entry map. The weight is registered as a
*buffer*, not a parameter: ``model.parameters()`` never hands it to an optimizer.

``QuantLinear4bit`` holds all the behaviour. Once the process has imported bitsandbytes (a process
importing PEFT does; the loader alone never does: bnb_optional), ``Linear4bit`` subclasses it and
``bnb.nn.Linear4bit``, so ``peft.get_peft_model`` wraps it with PEFT's own 4-bit LoRA layer (and
``merge_and_unload`` dequantizes it with bnb); bnb's constructor is not run (it would allocate a
full-precision weight first), and layers built before that import are upgraded in place
(:func:`upgrade_to_bitsandbytes`).
Until then, and without bitsandbytes, ``Linear4bit`` is ``QuantLinear4bit`` and
``converter.loader.lora.register_lora`` plugs it into PEFT.

Forward: the fused GEMV of ``converter.kernels.bnb4bit`` (CPU, or CUDA when built) for 1..8 tokens when
``in_features`` is a multiple of the blocksize, otherwise an exact dequantize + ``F.linear`` in the
compute dtype (the same call bitsandbytes makes; plain torch ops where no kernel exists). Gradients flow
to the input (``grad_x = grad_y @ W``); the weight is frozen.

``.to()``, ``.cuda()``, ``.cpu()``, ``.half()`` move the packed codes and every quant-state tensor
to the new device and never cast them (bitsandbytes#1527, #1664, #2078 are this bug class).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from converter.kernels import prepared
from converter.kernels.checks import KERNEL_DTYPE_NAMES
from converter.loader import bnb_optional, dynamo_marks, ops
from converter.loader.cpu_gemv import CpuGemv
from converter.loader.cuda_gemv import CudaGemv
from formats.bnb_compat import quant_state_json
from formats.quant_types import NESTED_BLOCKSIZE, QuantType
from formats.record import QuantizedTensor

if TYPE_CHECKING:  # the annotation only: siblings.py imports this module for QuantLinear4bit
    from converter.loader.siblings import SiblingGroup

# bitsandbytes' classes, once the process has imported it (bnb_optional: we never import it ourselves):
# then our layers are also ``bnb.nn.Linear4bit`` and PEFT recognizes them as its own 4-bit type.
_BnbParams4bit: type | None = None
_BnbQuantState: type | None = None

_DTYPES = {v: k for k, v in KERNEL_DTYPE_NAMES.items()}
_SHORT_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

#: A tensor's ``data_ptr()`` without the ``__torch_function__`` of bitsandbytes' ``Params4bit`` (1.3 µs a
#: call there against 0.1 µs, per eager forward); the public method on a torch without this binding.
_data_address: Callable[[torch.Tensor], int] = getattr(torch._C, "_data_address", torch.Tensor.data_ptr)


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """torch dtype from "bfloat16" / "torch.float16" / any other name of a torch dtype the kernels
    compute in ("half", "float": transformers' ``getattr(torch, name)``) / a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.") if isinstance(name, str) else None
    # the short names convert, dequantize_checkpoint and the CLI's --dtype take ("bf16" was refused here)
    key = _SHORT_NAMES.get(key, key) if key is not None else None
    dtype = _DTYPES.get(key) if key is not None else None
    if dtype is None and key is not None and not key.startswith("_"):
        alias = getattr(torch, key, None)
        dtype = alias if isinstance(alias, torch.dtype) and alias in KERNEL_DTYPE_NAMES else None
    if dtype is None:
        also = "bf16, fp16, fp32, half, float"
        msg = f"unsupported dtype {name!r}: expected one of {', '.join(_DTYPES)} (or {also})"
        raise ValueError(msg)
    return dtype


class QuantState4bit:
    """bitsandbytes' ``QuantState`` attribute names, for installs without bitsandbytes."""

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: torch.Size | None = None,
        code: torch.Tensor | None = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: torch.dtype | None = None,
        offset: torch.Tensor | None = None,
        state2: QuantState4bit | None = None,
    ) -> None:
        self.absmax = absmax
        self.shape = shape
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None


class Packed4bit(nn.Parameter):
    """Frozen packed 4-bit codes with their ``quant_state`` (used when bitsandbytes is absent)."""

    def __new__(cls, data: torch.Tensor, quant_state: Any = None, **_: Any) -> Packed4bit:
        self = torch.Tensor._make_subclass(cls, data, False)
        self.quant_state = quant_state
        return self

    def __deepcopy__(self, memo: dict) -> Packed4bit:
        return Packed4bit(self.data.clone(), _state_to(self.quant_state, None, clone=True))

    def __reduce_ex__(self, protocol: int) -> tuple:
        # Pickled (torch.save of a whole model) as itself: nn.Parameter's own reduce rebuilds a plain
        # Parameter, which loses the type that the upgrade to bitsandbytes' classes looks for.
        return (Packed4bit, (self.data, self.quant_state))


def quant_state_class() -> type:
    """The class of new quant states: bnb's ``QuantState`` once bitsandbytes is imported, else ours."""
    return _BnbQuantState or QuantState4bit


def make_quant_state(
    *,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    quant_map: torch.Tensor,
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
    nested: tuple[torch.Tensor, torch.Tensor, float | torch.Tensor] | None = None,
) -> Any:
    """A quant state (bnb's class once bitsandbytes is imported).

    ``nested`` = (nested_absmax, nested_quant_map, offset)."""
    state2 = offset = None
    if nested is not None:
        nested_absmax, nested_map, off = nested
        state2 = quant_state_class()(
            absmax=nested_absmax, code=nested_map, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
        )
        if not isinstance(off, torch.Tensor):  # with the state's other tensors (a device-loaded record)
            off = torch.tensor(float(off), dtype=torch.float32, device=nested_absmax.device)
        offset = off
    return quant_state_class()(
        absmax=absmax,
        shape=torch.Size(shape),
        code=quant_map,
        blocksize=int(blocksize),
        quant_type=quant_type,
        dtype=dtype,
        offset=offset,
        state2=state2,
    )


def _move(t: torch.Tensor | None, device: torch.device | None, clone: bool) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.detach()
    if device is not None:
        t = t.to(device)  # a device move only: never a dtype cast of packed, absmax or maps
    return t.clone() if clone else t


def _state_to(state: Any, device: torch.device | None, clone: bool = False) -> Any:
    """A new quant state (same class) with every tensor on ``device``; the old one is left untouched."""
    state2 = None
    if state.nested:
        s2 = state.state2
        state2 = type(s2)(
            absmax=_move(s2.absmax, device, clone),
            code=_move(s2.code, device, clone),
            blocksize=s2.blocksize,
            dtype=s2.dtype,
        )
    return type(state)(
        absmax=_move(state.absmax, device, clone),
        shape=state.shape,
        code=_move(state.code, device, clone),
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
        offset=_move(state.offset, device, clone),
        state2=state2,
    )


def _eager_launch(args: ops.KernelArgs) -> CpuGemv | CudaGemv | None:
    """The eager decode launch of prepared arguments on the CPU or a CUDA GPU, else None."""
    if CpuGemv.applies(args):
        return CpuGemv(args)
    return CudaGemv(args) if CudaGemv.applies(args) else None


def make_weight(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """The ``weight`` object of a layer: bnb ``Params4bit`` (or :class:`Packed4bit`), frozen, quantized."""
    if _BnbParams4bit is None:
        return Packed4bit(packed, quant_state=state)
    return _BnbParams4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=packed.dtype,
        module=None,
        bnb_quantized=True,
    )


def state_from_record(record: QuantizedTensor) -> Any:
    """The quant state of a record (its tensors shared, not copied)."""
    nested = None
    if record.nested is not None:
        nested = (record.nested.nested_absmax, record.nested.nested_quant_map, record.nested.offset)
    return make_quant_state(
        absmax=record.absmax,
        shape=record.shape,
        quant_map=record.quant_map,
        blocksize=record.blocksize,
        quant_type=record.quant_type.label,
        dtype=dtype_from_name(record.dtype),
        nested=nested,
    )


def quant_state_tensors(state: Any) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes saves under ``<module>.weight.`` besides the packed codes, in bnb's order."""
    out = {"absmax": state.absmax, "quant_map": state.code}
    if state.nested:
        out["nested_absmax"] = state.state2.absmax
        out["nested_quant_map"] = state.state2.code
    offset = None
    if state.nested:  # a header-only skeleton's offset is meta (estimate of a Hub repo): no value to read
        offset = 0.0 if state.offset.is_meta else float(state.offset.item())
    shape = [int(d) for d in state.shape]
    qt = QuantType.parse(state.quant_type)
    js = quant_state_json(qt, state.blocksize, KERNEL_DTYPE_NAMES[state.dtype], shape, offset)
    blob = torch.frombuffer(bytearray(js), dtype=torch.uint8)
    out[f"quant_state.bitsandbytes__{state.quant_type}"] = blob.to(state.absmax.device)
    return out


def _linear_forward(x, packed, state, bias, allow_gemv, inference=False):
    out_features, in_features = (int(d) for d in state.shape)
    x2d = x.reshape(-1, in_features)
    if allow_gemv and ops.gemv_ok(x2d, in_features, state):
        y = ops.gemv(x2d, packed, state, out_features, in_features).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], out_features)
    if inference and allow_gemv and ops.f32_prefill(x):
        return ops.linear_f32(x, ops.dequantize(packed, state, torch.float32), bias)  # as ops.linear's
    # The caller's shape and bias go to F.linear unchanged: the same GEMM call bitsandbytes makes.
    return F.linear(x, ops.dequantize(packed, state, x.dtype), bias)


class _Linear4bitFunction(torch.autograd.Function):
    """y = x @ W.T + b with W decoded on the fly; grad_x = grad_y @ W; the weight is frozen."""

    @staticmethod
    def forward(ctx, x, packed, state, bias, allow_gemv):
        ctx.state = state
        ctx.save_for_backward(packed)
        return ops.not_a_view(_linear_forward(x, packed, state, bias, allow_gemv))

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            (packed,) = ctx.saved_tensors
            grad_x = grad_y @ ops.dequantize(packed, ctx.state, grad_y.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None


def linear_4bit(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, allow_gemv: bool = True
) -> torch.Tensor:
    """Functional form of the layer: ``x @ W.T + bias`` in ``x``'s dtype.

    ``allow_gemv=False`` forces the dequantize + ``F.linear`` path (the paths differ only in the
    order of the float sums).
    """
    if bias is not None:
        bias = bias.to(x.dtype)
    state = weight.quant_state
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _Linear4bitFunction.apply(x, weight, state, bias, allow_gemv)
    return _linear_forward(x, weight, state, bias, allow_gemv, inference=True)  # no autograd node


class QuantLinear4bit(nn.Module):
    """A frozen linear layer whose weight is 4-bit NF4/FP4 codes with blockwise absmax.

    All the behaviour lives here; :class:`Linear4bit` adds ``bnb.nn.Linear4bit`` as a base when
    bitsandbytes is installed (so PEFT dispatches to its own 4-bit LoRA layer) and is this class
    otherwise (then register :mod:`converter.loader.peft`'s LoRA layer with PEFT).

    Build it from the pieces of a checkpoint with :meth:`from_quantized` (or let
    :func:`converter.load_quantized` / :func:`converter.replace_linear_layers` do it). ``compute_dtype``
    is the dtype of the matmul (input cast to it, output cast back, as bitsandbytes does); ``None``
    means the dtype of the original weight.
    """

    #: Use the fused GEMV for 1..8 tokens when it applies (tests switch it off to compare paths).
    use_gemv: bool = True
    #: Kernel arguments prepared from ``weight`` (``ops.prepare``) and the weight they were made for.
    _kernel_args: ops.KernelArgs | None = None
    _prepared_for: torch.Tensor | None = None
    #: What a compiled graph reads instead (:func:`_traced_forward`): the registered key of
    #: ``_kernel_args`` (-1: none or unregistered) and ``id(_prepared_for)`` (0: none), one int guard
    #: each; reading ``_kernel_args`` and ``_prepared_for`` costs five guards and a Python aliasing
    #: check (``weight is _prepared_for``) per layer and compiled call.
    _prepared_key: int = -1
    _prepared_id: int = 0
    #: The address of the codes they were prepared from: ``weight.data = codes`` keeps the weight object
    #: but not this address, and the next eager call prepares again (a compiled graph's keyed op reads the
    #: codes it is given).
    _prepared_ptr: int = -1
    #: Those codes, held so that their address is never reused by new codes while it is compared.
    _prepared_data: torch.Tensor | None = None
    #: The eager decode launch of the prepared weight, no per-call Python checks (loader/cpu_gemv.py,
    #: loader/cuda_gemv.py); None where neither applies.
    _eager_gemv: CpuGemv | CudaGemv | None = None
    #: The group of layers reading the same input that share one GEMV launch (loader/siblings.py).
    _siblings: SiblingGroup | None = None
    _sibling_index: int = 0

    def __init__(
        self,
        packed: torch.Tensor,
        quant_state: Any,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not bnb's __init__: it would allocate a full-precision weight
        out_features, in_features = (int(d) for d in quant_state.shape)
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype or quant_state.dtype
        self.compute_type_is_set = True
        self.quant_storage = packed.dtype
        self.support_avx512bf16_for_cpu = False  # bnb's in-place CPU repacking is never used
        self._set_weight(make_weight(packed, quant_state))
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias, requires_grad=False)
        _adoption.track(self)

    def __getstate__(self) -> dict:
        # The prepared arguments are views of the weight, its codes as uint8 where the weight is stored
        # as another dtype (bnb_4bit_quant_storage bfloat16, as for FSDP): torch.save refused such a
        # layer ("Cannot save multiple tensors or storages that view the same data as different
        # types"). They are not pickled: the copy prepares its own from its weight (__setstate__).
        state = super().__getstate__()
        if state.get("_kernel_args") is not None:
            state.update(_kernel_args=True, _eager_gemv=None, _prepared_for=None, _prepared_data=None)
        return state

    def __setstate__(self, state: dict) -> None:  # copies and unpickled layers are tracked too
        super().__setstate__(state)
        _adoption.track(self)
        if self.__dict__.get("_kernel_args") is not None:
            # prepared again from the copy's weight: its own registered key, and codes that are a view
            # of its weight (a deep copy duplicates them otherwise)
            self.__dict__["_kernel_args"] = None
            self._prepare()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls,
        *,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        quant_map: torch.Tensor,
        shape: tuple[int, int],
        blocksize: int,
        quant_type: QuantType | str,
        dtype: torch.dtype | str,
        nested: tuple[torch.Tensor, torch.Tensor, float | torch.Tensor] | None = None,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> QuantLinear4bit:
        """A layer from the tensors of one bnb-layout weight.

        ``nested`` = (nested_absmax, nested_quant_map, offset) when the absmax holds nested codes.
        """
        if len(shape) != 2:
            msg = f"a 4-bit linear weight must be 2-D [out, in], got shape {list(shape)}"
            raise ValueError(msg)
        label = quant_type.label if isinstance(quant_type, QuantType) else QuantType.parse(quant_type).label
        state = make_quant_state(
            absmax=absmax,
            shape=tuple(shape),
            quant_map=quant_map,
            blocksize=blocksize,
            quant_type=label,
            dtype=dtype_from_name(dtype),
            nested=nested,
        )
        return cls(packed, state, bias=bias, compute_dtype=compute_dtype)

    @classmethod
    def from_record(
        cls,
        record: QuantizedTensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> QuantLinear4bit:
        """A layer sharing the tensors of a :class:`formats.record.QuantizedTensor` (no copy)."""
        if len(record.shape) != 2:
            msg = f"tensor {record.name!r}: a 4-bit linear weight is 2-D [out, in], got {list(record.shape)}"
            raise ValueError(msg)
        return cls(record.packed, state_from_record(record), bias=bias, compute_dtype=compute_dtype)

    # -- the weight lives in _buffers (never handed to an optimizer) ----------------------------
    def _set_weight(self, weight: torch.Tensor) -> None:
        self._parameters.pop("weight", None)
        self._buffers.pop("weight", None)
        self.__dict__.pop("weight", None)
        self._buffers["weight"] = weight
        self.quant_state = weight.quant_state
        self._prepare()

    def _prepare(self) -> ops.KernelArgs | None:
        """Compute the kernel arguments of the weight once (forward then only launches)."""
        weight = self.weight
        self._unprepare()
        if weight.device.type == "meta":
            return None
        args = ops.prepare(weight, weight.quant_state)
        # registered: a compiled step reads the small tensors by key (converter/kernels/prepared.py)
        self._kernel_args = prepared.register(self, args) if args.gemv else args
        self.__dict__["_prepared_key"] = self._kernel_args.key
        self._eager_gemv = _eager_launch(self._kernel_args)
        # Not through nn.Module.__setattr__ (it would register a Params4bit as a parameter); a weight
        # swapped in by assignment later (PEFT's merge) is seen as new and takes the general path.
        self.__dict__["_prepared_for"] = weight
        self.__dict__["_prepared_id"] = id(weight)
        self.__dict__["_prepared_data"] = weight.detach()
        self.__dict__["_prepared_ptr"] = _data_address(weight)
        if weight.is_cuda:  # CUDA graphs may keep these addresses: no per-replay copy of the weight
            # (the weight is the keyed op's graph input: dynamo marks module buffers static too; torch's
            # ``cudagraphs`` backend copies it anyway, and the keyed op then reads the copy)
            dynamo_marks.mark_static_address(weight)
            for t in self._kernel_args:
                if isinstance(t, torch.Tensor):
                    dynamo_marks.mark_static_address(t)
        return self._kernel_args

    def _unprepare(self) -> None:
        """Drop the prepared kernel arguments: a graph traced with their key is recompiled (a new key or
        none), and CUDA graphs recorded with their tensors are recorded again (``prepared.epoch``)."""
        old = self.__dict__.get("_kernel_args")
        if old is not None:
            prepared.retire()
            if old.key >= 0:
                prepared.release(old.key)
        self._kernel_args = self._eager_gemv = None
        if self._siblings is not None:  # its group's launch holds these arguments' tensors (e.g. on the GPU)
            self._siblings.forget_launch()
        self.__dict__["_prepared_for"] = self.__dict__["_prepared_data"] = None
        self.__dict__["_prepared_key"], self.__dict__["_prepared_id"] = -1, 0

    def _assigned(self, weight: torch.Tensor) -> None:
        """``weight`` was assigned in place of the one the layer last ran with (PEFT's bnb LoRA merge and
        unmerge assign a new ``Params4bit``): no prepared arguments for it (the general path serves it),
        and CUDA graphs recorded with the one before are recorded again."""
        self._unprepare()
        prepared.retire()
        self.__dict__["_prepared_for"] = weight  # the one now run with: retired once, not at every call
        self.__dict__["_prepared_id"] = id(weight)

    @property
    def quant_type(self) -> str:
        return self.weight.quant_state.quant_type

    @property
    def blocksize(self) -> int:
        return self.weight.quant_state.blocksize

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight [out, in] in ``dtype`` (default: the original weight's dtype)."""
        return ops.dequantize(self.weight.data, self.weight.quant_state, dtype)

    def extra_repr(self) -> str:
        s = self.weight.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"quant_type={s.quant_type}, blocksize={s.blocksize}, nested={s.nested}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._siblings is not None:  # q/k/v, gate/up: one launch for the group (loader/siblings.py)
            y = self._siblings.forward(self, x)
            if y is not None:
                return y
        compiling = torch.compiler.is_compiling()
        if compiling:  # before any read of the layer: dynamo guards each one (see _traced_forward)
            if (y := _traced_forward(self, x)) is not None:
                return y
        elif (  # eager decode, no cast, no bias: one launch without per-call Python checks
            (fast := self._eager_gemv) is not None
            and x.dtype == self.compute_dtype
            and self.use_gemv
            # self.weight unless a weight was assigned as a parameter (not the prepared one then), at a
            # tenth of nn.Module.__getattr__'s cost, and still holding the codes it was prepared from
            and (prepared_weight := self._buffers.get("weight")) is self._prepared_for
            and _data_address(prepared_weight) == self._prepared_ptr
            and self.bias is None
            and not (torch.is_grad_enabled() and x.requires_grad)
        ):
            y = fast(x)
            if y is not None:
                return y
        inp_dtype = x.dtype
        compute = self.compute_dtype or inp_dtype
        bias = self.bias
        weight = self.weight
        args = self._kernel_args
        if compiling:
            pass  # a compiled graph's keyed op reads the codes it is given with the registered absmax
        elif self._prepared_for is not weight:
            self._assigned(weight)  # PEFT's bnb merge or unmerge: the general path serves it
            args = None
        elif args is not None and _data_address(weight) != self._prepared_ptr:
            args = self._prepare()  # weight.data = codes: prepared from the new ones
        if (
            args is None
            or self._prepared_for is not weight
            or (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
        ):  # training, or a weight replaced behind our back: the general path
            bias = bias.to(compute) if bias is not None else None
            return linear_4bit(x.to(compute), weight, bias, allow_gemv=self.use_gemv).to(inp_dtype)
        # Inference on the prepared weight: only casts that are needed, then one launch.
        if inp_dtype != compute:
            x = x.to(compute)
        if bias is not None and bias.dtype != compute:
            bias = bias.to(compute)
        y = ops.linear(x, args, bias, self.use_gemv, weight)
        return y if y.dtype == inp_dtype else y.to(inp_dtype)

    # -- device moves --------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        # Keep the quantized weight out of torch's generic _apply (which would cast a float
        # quant_storage under .half() and never reaches the quant-state tensors); move it here.
        where = self._parameters if "weight" in self._parameters else self._buffers
        weight = where.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            where["weight"] = weight
        if weight.device.type == "meta":
            return self
        target = fn(torch.empty(0, device=weight.device)).device
        if target != weight.device:
            moved = make_weight(weight.data.to(target), _state_to(weight.quant_state, target))
            self._set_weight(moved)
        return self

    # -- bnb state-dict layout -----------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        for key, value in quant_state_tensors(weight.quant_state).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        group = {
            k: v for k, v in state_dict.items() if k == prefix + "weight" or k.startswith(prefix + "weight.")
        }
        if prefix + "weight" not in group:
            missing_keys.append(prefix + "weight")
        else:
            record = QuantizedTensor.from_state_dict(
                prefix + "weight", {k: v.cpu() for k, v in group.items()}
            )
            packed, state = record.packed, state_from_record(record)
            expected = (self.out_features, self.in_features)
            if tuple(state.shape) != expected:
                error_msgs.append(
                    f"{prefix}weight: checkpoint shape {list(state.shape)} does not match "
                    f"the layer's {list(expected)}"
                )
            else:
                device = self.weight.device
                if device.type != "meta" and packed.device != device:
                    packed, state = packed.to(device), _state_to(state, device)
                self._set_weight(make_weight(packed, state))
        bias_key = prefix + "bias"
        if self.bias is None:
            if bias_key in state_dict:
                unexpected_keys.append(bias_key)
        elif bias_key not in state_dict:
            missing_keys.append(bias_key)
        else:
            value = state_dict[bias_key]
            if value.shape != self.bias.shape:  # copy_ would broadcast a [1] bias over every row
                error_msgs.append(
                    f"{bias_key}: checkpoint shape {list(value.shape)} does not match the layer's "
                    f"{list(self.bias.shape)}"
                )
            elif local_metadata.get("assign_to_params_buffers", False) or self.bias.device.type == "meta":
                self.bias = nn.Parameter(value.to(self.bias.dtype), requires_grad=self.bias.requires_grad)
            else:
                with torch.no_grad():
                    self.bias.copy_(value)


def keyed_weight(layer: QuantLinear4bit) -> tuple[int, torch.Tensor] | None:
    """(key, weight) of a layer whose traced call may read its prepared tensors by key: registered, on
    the fused GEMV, and still holding the weight object they were prepared from (``id()``: one
    ``ID_MATCH`` guard; a weight put in its place, PEFT's merge, fails it); None otherwise. What
    :func:`_traced_forward` and a sibling group's traced launch (``siblings.py``) both read of a layer."""
    key = layer._prepared_key
    if key < 0 or not layer.use_gemv:
        return None
    weight = layer.weight
    if id(weight) != layer._prepared_id:
        return None
    return key, weight


def _traced_forward(layer: QuantLinear4bit, x: torch.Tensor) -> torch.Tensor | None:
    """``QuantLinear4bit.forward`` while torch.compile traces (not under export): the fused GEMV of the
    prepared weight, reading as little of the layer as it can, as dynamo checks a guard per attribute
    read before every compiled call (a module function, not a method: a method is one more guard per
    layer). None: the general code of ``forward`` (with its guards) traces the call.

    Read: ``use_gemv``, the key (``_prepared_key``; the launch's sizes are constants of the key,
    ``ops.keyed_launch``), the weight (the graph's input, and its identity: ``id()`` guards it with
    one ``ID_MATCH``) against ``_prepared_id``, the bias and the compute dtype. What each guards:
    a layer prepared again (new weight, device move, codes reloaded) has a new key; a weight assigned
    in place of the prepared one (PEFT's merge) fails the identity guard, and the retraced call takes
    the general path; a ``use_gemv`` or dtype switched fails its guard; codes replaced inside the
    same weight (``weight.data = ...``) are what the keyed op reads, with the registered absmax (the
    weight's quant state), as the eager call does (converter/kernels/custom_ops.py ``_unkey``)."""
    if not ops.keyed_tracing() or (keyed := keyed_weight(layer)) is None:
        return None
    key, weight = keyed
    bias = layer.bias
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    inp_dtype = x.dtype
    compute = layer.compute_dtype or inp_dtype
    xc = x if inp_dtype == compute else x.to(compute)
    if bias is not None and bias.dtype != compute:
        bias = bias.to(compute)
    y = ops.keyed_linear(xc, weight, ops.keyed_launch(key), bias)
    if y is None:
        return None
    return y if y.dtype == inp_dtype else y.to(inp_dtype)


# -- bitsandbytes' classes, taken when the process imports it (bnb_optional) ----------------------------
def _bitsandbytes_class(bnb: Any) -> type:
    """``Linear4bit`` once bitsandbytes is imported; bnb's weight and quant-state classes from then on."""
    global _BnbParams4bit, _BnbQuantState

    class Linear4bit(QuantLinear4bit, bnb.nn.Linear4bit):
        """:class:`QuantLinear4bit` that is also a ``bnb.nn.Linear4bit`` (PEFT's 4-bit LoRA wraps it)."""

    _BnbParams4bit, _BnbQuantState = bnb.nn.Params4bit, bnb.functional.QuantState
    return Linear4bit


def upgrade_to_bitsandbytes(layer: QuantLinear4bit) -> None:
    """``layer``, its weight and quant state become bitsandbytes' classes in place (bitsandbytes imported):
    the same objects and tensors, so references to them (sibling groups, prepared kernel arguments,
    captured graphs) stay valid."""
    bnb_class = _adoption.bnb_class
    if bnb_class is None or isinstance(layer, bnb_class):
        return
    weight = layer.weight
    if isinstance(weight, Packed4bit):
        state = weight.quant_state
        for s in (state, state.state2):
            if type(s) is QuantState4bit:
                s.__class__ = _BnbQuantState
        weight.__class__ = _BnbParams4bit
        # Params4bit's own attributes, as make_weight gives them.
        weight.blocksize, weight.compress_statistics = state.blocksize, state.nested
        weight.quant_type, weight.quant_storage = state.quant_type, weight.dtype
        weight.module, weight.bnb_quantized = None, True
    layer.__class__ = bnb_class


_adoption = bnb_optional.Adoption(QuantLinear4bit, _bitsandbytes_class, upgrade_to_bitsandbytes)


def __getattr__(name: str) -> Any:
    # ``Linear4bit`` (the class our loader builds) and ``HAS_BITSANDBYTES`` follow bitsandbytes' import.
    if name == "Linear4bit":
        return _adoption.bnb_class or QuantLinear4bit
    if name == "HAS_BITSANDBYTES":  # whether our layers are bitsandbytes' classes too
        return _adoption.bnb_class is not None
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def nbytes(layer: QuantLinear4bit) -> int:
    """Bytes held by one layer's quantized weight (codes, absmax, maps), bias excluded."""
    s = layer.weight.quant_state
    total = layer.weight.numel() * layer.weight.element_size()
    for t in (s.absmax, s.code, s.offset) + ((s.state2.absmax, s.state2.code) if s.nested else ()):
        if t is not None:
            total += t.numel() * t.element_size()
    return total
