"""``Linear8bit``: a frozen LLM.int8 linear layer read from a pre-quantized 8-bit checkpoint.

The layer keeps bitsandbytes' representation, so PEFT and bnb tooling see what they expect:
``self.weight`` is an ``Int8Params`` (bnb's class once bitsandbytes is imported) holding the int8 codes with
``weight.CB`` / ``weight.SCB``, and ``self.state`` a ``MatmulLtState`` with ``CB``, ``SCB``,
``threshold`` and ``has_fp16_weights=False``. The weight is a buffer: never handed to an optimizer. Once
the process has imported bitsandbytes (a process importing PEFT does; the loader alone never does:
bnb_optional), ``Linear8bit`` subclasses ``bnb.nn.Linear8bitLt`` (bnb's constructor is not run; layers
built before are upgraded in place), so ``peft.get_peft_model`` wraps it with PEFT's own 8-bit LoRA
layer.

Forward paths (``x`` in the compute dtype, default the input's):

- default: ``W = f32(f32(q * SCB) * f32(1/127))`` cast to x's dtype, then ``F.linear`` (exact with
  respect to the stored weight; closer to the unquantized model than bnb's int8 x int8 matmul);
- 1..8 tokens on the CPU or a CUDA device: the fused int8 GEMV (float32 sums, the same result
  within rounding; on CUDA csrc/cuda/gemv_int8.cu, capturable in a CUDA graph);
- more bfloat16 tokens under ``torch.no_grad`` on a CPU without native bf16 matmuls: the default
  path's float32 weight in one float32 GEMM, rounded once (``loader.ops.f32_prefill``, as 4-bit
  layers do: torch's bf16 GEMM there is 4-7x slower);
- ``exact=True``: bitsandbytes' ``MatMul8bitLt`` inference math (activations cast to fp16 and
  quantized per token, outlier columns ``|x| >= threshold`` kept in x's dtype, int32 matmul), the same
  bits as bnb's CPU backend; reimplemented in torch, no bitsandbytes needed. In training mode on the
  CPU it is what bnb's CPU backend runs there instead, ``MatMul8bitFp`` (:func:`training_linear`).
  Like bnb's, its outlier split is data-dependent (a graph break under torch.compile); the default
  path compiles with ``fullgraph=True`` (its kernels are the custom ops of ``converter.loader.int8_ops``).

Gradients flow to the input in every path (the weight is frozen).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from converter.kernels import prepared
from converter.loader import bnb_optional, int8_ops
from converter.loader.ops import check_compute_dtype, f32_prefill, linear_f32, not_a_view
from formats.int8 import Int8Tensor, scb_key, weight_format_key

# bitsandbytes' classes, once the process has imported it (bnb_optional: we never import it ourselves):
# then PEFT recognizes our layer as its own 8-bit type.
_bnb: Any = None
_BnbInt8Params: type | None = None

#: bnb's CPU int8_mm_dequant constant (0x388206aa; 18 ppm above 1/127**2, bnb-int8.md §6).
_MM_DEQUANT = 6.200124e-05


class Int8Weight(nn.Parameter):
    """Frozen int8 codes with ``CB`` / ``SCB`` (bnb's ``Int8Params`` names), for installs without bnb."""

    def __new__(
        cls, data: torch.Tensor, CB: torch.Tensor | None = None, SCB: torch.Tensor | None = None, **_: Any
    ):
        self = torch.Tensor._make_subclass(cls, data, False)
        self.CB, self.SCB, self.has_fp16_weights = CB, SCB, False
        return self

    def __deepcopy__(self, memo: dict) -> Int8Weight:
        return Int8Weight(self.data.clone(), CB=self.CB.clone(), SCB=self.SCB.clone())

    def __reduce_ex__(self, protocol: int) -> tuple:  # pickled as itself (see module.Packed4bit)
        return (Int8Weight, (self.data, self.CB, self.SCB))


def make_weight(codes: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    if _BnbInt8Params is None:
        return Int8Weight(codes, CB=codes, SCB=scb)
    return _BnbInt8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb)


def _make_state(codes: torch.Tensor, scb: torch.Tensor, threshold: float) -> Any:
    state = _bnb.MatmulLtState() if _bnb is not None else SimpleNamespace()
    state.CB, state.SCB, state.threshold = codes, scb, float(threshold)
    state.has_fp16_weights, state.is_training = False, False
    return state


def exact_linear(
    x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    """bitsandbytes' ``MatMul8bitLt`` inference on its default (CPU) backend, step for step.

    fp16 activations, outliers (``|x| >= threshold``) zeroed before the per-token absmax and, for more
    than one token, whole outlier columns zeroed in the codes; ``acc = CA @ CB.T`` exact in int32;
    ``out = acc * (SCA * SCB) * 6.200124e-05 (+ bias)`` in float32, cast to x's dtype; then
    ``x[:, cols] @ dequant(CB[:, cols]).T`` added in x's dtype.
    """
    dtype, shape = x.dtype, x.shape
    check_compute_dtype(dtype)
    a = x.reshape(-1, shape[-1])
    h = a.to(torch.float16)  # a copy (or x itself for fp16 x: never written below unless copied)
    cols = None
    if threshold > 0.0:
        outliers = h.abs() >= threshold
        if outliers.any():
            cols = torch.argwhere(outliers.any(dim=0)).view(-1)
            h = h.masked_fill(outliers, 0)
    sca = torch.max(h.abs(), dim=1).values.float()
    ca = torch.round(h * (127.0 / sca.unsqueeze(-1))).to(torch.int8)
    if cols is not None and h.shape[0] > 1:
        ca[:, cols] = 0
    # float64 products of int8 codes and their sums up to 127**2 * K < 2**53 are exact.
    acc = (ca.double() @ codes.double().T).to(torch.int32)
    out = acc * (sca.unsqueeze(-1) * scb.unsqueeze(0)) * _MM_DEQUANT
    if bias is not None:
        out += bias
    out = out.to(dtype)
    if cols is not None:
        sub_b = int8_ops.dequantize(codes[:, cols].contiguous(), scb, torch.float32).to(dtype).t()
        out = out.addmm(a[:, cols].contiguous(), sub_b)
    return out.reshape(*shape[:-1], codes.shape[0])


def bnb_weight(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight bitsandbytes' autograd functions decode for ``grad_x`` (``MatMul8bitLt.backward``) and
    its CPU training forward (``MatMul8bitFp``): ``q.to(dtype) * f32(SCB * f32(1/127))``, rounded to
    ``dtype`` (not ``int8_vectorwise_dequant``'s ``f32(q * SCB) * f32(1/127)``)."""
    return codes.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


def training_linear(
    x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """bitsandbytes' ``MatMul8bitFp``, what its CPU/XPU backend runs for a layer in training mode:
    :func:`bnb_weight` in x's dtype, then ``F.linear``; autograd gives its gradients
    (``grad_x = grad_y @ W``)."""
    check_compute_dtype(x.dtype)
    return F.linear(x, bnb_weight(codes, scb, x.dtype), bias)


def _forward(x, codes, scb, bias, allow_gemv, inference=False):
    out_features, in_features = codes.shape
    x2d = x.reshape(-1, in_features)
    if allow_gemv and int8_ops.gemv_ok(x2d):
        y = int8_ops.gemv(x2d, codes, scb, bias)
        return y.reshape(*x.shape[:-1], out_features)
    if inference and allow_gemv and f32_prefill(x):
        # no native bf16 matmuls on this CPU: the float32 weight in one float32 GEMM (as 4-bit layers do)
        return linear_f32(x, int8_ops.dequantize(codes, scb, torch.float32), bias)
    return F.linear(x, int8_ops.dequantize(codes, scb, x.dtype), bias)


class _Linear8bitFunction(torch.autograd.Function):
    """y = x @ W.T + b with W decoded on the fly (never saved for backward); grad_x = grad_y @ W.

    With ``exact_threshold`` set, y is :func:`exact_linear`'s (bitsandbytes' int8 x int8 math, whose
    rounding steps have no useful derivative) and the gradients are still those of x @ W.T + b, as
    bitsandbytes' ``MatMul8bitLt.backward`` gives them (its bits: W is :func:`bnb_weight`)."""

    @staticmethod
    def forward(ctx, x, codes, scb, bias, allow_gemv, exact_threshold=None):
        ctx.save_for_backward(codes, scb)
        ctx.exact = exact_threshold is not None
        if exact_threshold is not None:
            return not_a_view(exact_linear(x, codes, scb, bias, exact_threshold))
        return not_a_view(_forward(x, codes, scb, bias, allow_gemv))

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_bias = None
        codes, scb = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            decode = bnb_weight if ctx.exact else int8_ops.dequantize  # exact: bnb's bits for grad_x too
            grad_x = grad_y @ decode(codes, scb, grad_y.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None, None


class QuantLinear8bit(nn.Module):
    """A frozen linear layer whose weight is LLM.int8 row-wise codes with an fp16 row absmax (SCB).

    Build it with :meth:`from_record` (or let :func:`converter.load_quantized` do it). ``threshold`` is
    ``llm_int8_threshold`` (used by the ``exact`` path only); ``compute_dtype`` None means x's dtype.
    """

    #: Use the fused GEMV for 1..8 tokens on CPU / CUDA (tests switch it off to compare paths).
    use_gemv: bool = True

    def __init__(
        self,
        codes: torch.Tensor,
        scb: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        threshold: float = 6.0,
        compute_dtype: torch.dtype | None = None,
        exact: bool = False,
    ) -> None:
        nn.Module.__init__(self)  # not bnb's __init__: it would allocate a full-precision weight
        if (
            codes.dim() != 2
            or codes.dtype != torch.int8
            or scb.shape != (codes.shape[0],)
            or not scb.is_floating_point()
        ):
            msg = (
                f"int8 weight must be int8 [out, in] with a float SCB [out], got {codes.dtype} "
                f"{list(codes.shape)} with SCB {scb.dtype} {list(scb.shape)}"
            )
            raise ValueError(msg)
        scb = scb.to(torch.float32)  # the kernels' SCB dtype (exact: the values are float16 numbers)
        self.out_features, self.in_features = (int(d) for d in codes.shape)
        self.compute_dtype = compute_dtype
        self.exact = exact
        self.index = None
        self._set_weight(codes, scb, threshold)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias, requires_grad=False)
        _adoption.track(self)

    def __setstate__(self, state: dict) -> None:  # copies and unpickled layers are tracked too
        super().__setstate__(state)
        _adoption.track(self)

    @classmethod
    def from_record(
        cls,
        record: Int8Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        *,
        threshold: float = 6.0,
        exact: bool = False,
    ) -> QuantLinear8bit:
        """A layer sharing the tensors of a :class:`formats.int8.Int8Tensor` (no copy)."""
        return cls(
            record.codes, record.scb, bias, threshold=threshold, compute_dtype=compute_dtype, exact=exact
        )

    def _set_weight(self, codes: torch.Tensor, scb: torch.Tensor, threshold: float) -> None:
        if "weight" in self._buffers:  # CUDA graphs recorded with the old codes are recorded again
            prepared.retire()
        self._parameters.pop("weight", None)
        self.__dict__.pop("weight", None)
        # the kernels take contiguous tensors (no copy when they are: from_record, the shards' views)
        codes, scb = codes.contiguous(), scb.contiguous()
        self._buffers["weight"] = make_weight(codes, scb)
        self.state = _make_state(codes, scb, threshold)

    @property
    def threshold(self) -> float:
        return self.state.threshold

    @property
    def codes(self) -> torch.Tensor:
        return self.weight.data

    @property
    def scb(self) -> torch.Tensor:
        return self.weight.SCB

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight [out, in] in ``dtype`` (rows with SCB = inf are NaN, as in bitsandbytes)."""
        return int8_ops.dequantize(self.codes, self.scb, dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"int8, threshold={self.threshold}, exact={self.exact}, compute_dtype={self.compute_dtype}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype or inp_dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad)
        )
        if self.exact and self.training and x.device.type in ("cpu", "xpu"):
            # bitsandbytes' CPU/XPU backend trains with dequantize + linear (MatMul8bitFp), not int8 math
            return not_a_view(training_linear(x, self.codes, self.scb, bias)).to(inp_dtype)
        if self.exact and not needs_grad:
            return exact_linear(x, self.codes, self.scb, bias, self.threshold).to(inp_dtype)
        if needs_grad:
            exact = self.threshold if self.exact else None
            y = _Linear8bitFunction.apply(x, self.codes, self.scb, bias, self.use_gemv, exact)
        else:
            y = _forward(x, self.codes, self.scb, bias, self.use_gemv, inference=True)
        return y.to(inp_dtype)

    # -- device moves: codes and SCB move, never cast (.half() must not touch them) ---------------
    def _apply(self, fn, recurse: bool = True):
        # a parameter once PEFT's 8-bit merge / unmerge set a new Int8Params, else our buffer
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
            self._set_weight(weight.data.to(target), weight.SCB.to(target), self.threshold)
        return self

    # -- bnb state-dict layout ---------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        record = Int8Tensor(
            prefix + "weight", (self.out_features, self.in_features), None, self.codes, self.scb
        )
        items = list(record.state_dict().items())
        if self.bias is not None:  # bnb's order: parameters first (weight, bias), then SCB, weight_format
            items.insert(1, (prefix + "bias", self.bias))
        for key, value in items:
            destination[key] = value if keep_vars else value.detach()

    def _check_lone_weight(self, name: str, state_dict: Mapping[str, Any], error_msgs: list[str]) -> None:
        """A ``weight`` without its ``SCB`` that is not this layer's: a 4-bit weight (keys under
        ``weight.``: the same model converted to nf4 / fp4) or another shape. torch reports a size mismatch
        under ``strict=False`` too; the layer kept its weights and listed only the missing SCB."""
        value = state_dict[name]
        if any(k.startswith(name + ".") for k in state_dict):
            error_msgs.append(
                f"{name}: a 4-bit weight (bitsandbytes' Linear4bit layout: packed {list(value.shape)} with "
                f"its {name}.quant_state.* / absmax keys), not an LLM.int8 one; load it into a model loaded "
                "from a 4-bit folder"
            )
        elif tuple(value.shape) != (self.out_features, self.in_features):
            error_msgs.append(
                f"{name}: checkpoint shape {list(value.shape)} does not match the layer's "
                f"{[self.out_features, self.in_features]}"
            )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        name = prefix + "weight"
        keys = (name, scb_key(name), weight_format_key(name))
        if name not in state_dict or keys[1] not in state_dict:
            missing_keys.extend(k for k in keys[:2] if k not in state_dict)
            if name in state_dict:  # codes without SCB: not taken; a mismatch is an error, as torch's
                self._check_lone_weight(name, state_dict, error_msgs)
        else:
            record = Int8Tensor.from_state_dict(
                name, {k: state_dict[k].cpu() for k in keys if k in state_dict}
            )
            if record.shape != (self.out_features, self.in_features):
                error_msgs.append(
                    f"{name}: checkpoint shape {list(record.shape)} does not match the layer's "
                    f"{[self.out_features, self.in_features]}"
                )
            else:
                device = self.weight.device
                codes, scb = record.codes, record.scb
                if device.type != "meta":
                    codes, scb = codes.to(device), scb.to(device)
                self._set_weight(codes, scb, self.threshold)
        bias_key = prefix + "bias"
        if self.bias is None:
            if bias_key in state_dict:
                unexpected_keys.append(bias_key)
        elif bias_key not in state_dict:
            missing_keys.append(bias_key)
        else:
            value = state_dict[bias_key]
            if value.shape != self.bias.shape:
                error_msgs.append(
                    f"{bias_key}: checkpoint shape {list(value.shape)} does not match the layer's "
                    f"{list(self.bias.shape)}"
                )
            elif local_metadata.get("assign_to_params_buffers", False) or self.bias.device.type == "meta":
                self.bias = nn.Parameter(value.to(self.bias.dtype), requires_grad=self.bias.requires_grad)
            else:  # in place, as torch loads a parameter: its device, its requires_grad, an optimizer's hold
                with torch.no_grad():
                    self.bias.copy_(value)


# -- bitsandbytes' classes, taken when the process imports it (bnb_optional) ----------------------------
def _bitsandbytes_class(bnb: Any) -> type:
    """``Linear8bit`` once bitsandbytes is imported; bnb's weight and state classes from then on."""
    global _bnb, _BnbInt8Params

    class Linear8bit(QuantLinear8bit, bnb.nn.Linear8bitLt):
        """:class:`QuantLinear8bit` that is also a ``bnb.nn.Linear8bitLt`` (PEFT's 8-bit LoRA wraps it)."""

    _bnb, _BnbInt8Params = bnb, bnb.nn.Int8Params
    return Linear8bit


def upgrade_to_bitsandbytes(layer: QuantLinear8bit) -> None:
    """``layer`` and its weight become bitsandbytes' classes in place and its state a ``MatmulLtState``
    (bitsandbytes imported); the weight stays the same tensor object."""
    bnb_class = _adoption.bnb_class
    if bnb_class is None or isinstance(layer, bnb_class):
        return
    weight = layer.weight
    if isinstance(weight, Int8Weight):
        weight.__class__ = _BnbInt8Params  # CB, SCB and has_fp16_weights are set already
    old = layer.state
    layer.state = _make_state(old.CB, old.SCB, old.threshold)
    layer.__class__ = bnb_class


_adoption = bnb_optional.Adoption(QuantLinear8bit, _bitsandbytes_class, upgrade_to_bitsandbytes)


def __getattr__(name: str) -> Any:
    # ``Linear8bit`` (the class our loader builds) follows bitsandbytes' import.
    if name == "Linear8bit":
        return _adoption.bnb_class or QuantLinear8bit
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
