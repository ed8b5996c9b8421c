"""The contract of a quantization method: everything the converter and the loader ask of one.

A method (``nf4``/``fp4`` blockwise 4-bit, ``int8`` LLM.int8, and later others) is one object in
``converter.methods``' registry; pipeline, plan, CLI and loader ask it instead of testing the quant
type. Each module under ``converter/methods/`` implements this class for one format and imports its
kernels, records and runtime module lazily, so ``import converter.methods`` (the CLI's option
parsing) stays free of torch.

Per layer of the flow:
- plan:     ``check_options`` / ``options_json`` / ``check_tensor`` / ``out_nbytes`` / ``working_set``
            / ``plan_label``
- kernels:  ``quantizer`` (an object with ``quantize_many`` and ``fallback_reason``)
- record:   ``layout`` / ``plan_slots`` / ``record`` / ``metadata_record``
- config:   ``quantization_config``
- loader:   ``runtime_layer`` (the ``nn.Module`` class built from a record of this method)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # annotations only: plan.py imports this package
    from converter.plan.tensor_plan import Options, Plan, PlannedTensor
    from formats.writer import TensorSlot


class DeviceFootprint(NamedTuple):
    """What a method's quantizer adds to host memory on a device, beside one tensor's input and output
    at a time (``QuantMethod.device_footprint``; counted by ``converter.plan.preflight``)."""

    #: bytes held for the whole run (``--device cuda``'s pinned staging buffers)
    pinned: int = 0
    #: tensors submitted at once (each one's input and output alive meanwhile)
    in_flight: int = 1
    #: the quantizer imports torch (when the process has not yet)
    imports_torch: bool = False


class QuantMethod(ABC):
    """One quantization method. Instances are registered by name (the ``--quant-type`` value)."""

    #: ``--quant-type`` value, e.g. "nf4"
    name: str
    #: one line for ``--help`` and the model card, e.g. "4-bit NormalFloat, blockwise absmax"
    description: str
    #: Options fields only this method reads (other methods drop them from the options JSON)
    own_options: tuple[str, ...] = ()
    #: The loaded layers compute in their input's dtype unless the folder names a compute dtype
    #: (LLM.int8); otherwise they take the load's ``dtype``.
    computes_in_input_dtype: bool = False
    #: The quantizer rounds its F32/BF16 input to float16 itself, as bitsandbytes does (LLM.int8):
    #: the pipeline leaves a --dtype float16 cast of the weights to it.
    rounds_to_float16: bool = False
    #: Routed MoE experts can be quantized with this method (``--moe-experts quantize``)
    quantizes_experts: bool = True

    # -- plan ------------------------------------------------------------------------------------
    def check_options(self, options: Options) -> None:  # noqa: B027 - optional hook
        """Raise ValueError for option values this method cannot honour."""

    @abstractmethod
    def check_tensor(
        self, file: str, name: str, shape: tuple[int, ...], dtype: str, options: Options
    ) -> None:
        """Refuse (formats.validate.UnsupportedOption) a selected weight this method cannot store."""

    @abstractmethod
    def out_nbytes(self, numel: int, shape: tuple[int, ...], options: Options) -> int:
        """Upper bound of the stored bytes of one quantized weight (cuts output shards)."""

    def working_set(self, numel: int, shape: tuple[int, ...], options: Options) -> int:
        """Anonymous bytes the quantizer's output of one weight holds (the preflight's peak memory):
        by default its stored bytes."""
        return self.out_nbytes(numel, shape, options)

    def kernel_input_dtype(self, source: str, out: str) -> str:
        """The dtype code a weight stored as ``source`` and planned as ``out`` reaches the quantizer in:
        ``out``, but ``source`` where the kernel does a float16 cast of F32/BF16 itself
        (``rounds_to_float16``: LLM.int8, the same rounding; no cast copy then)."""
        if self.rounds_to_float16 and out == "F16" and source in ("F32", "BF16"):
            return source
        return out

    def plan_label(self, options: Options) -> str:
        """What a quantized tensor becomes, for ``--dry-run``'s table, e.g. "nf4 blocksize 64"."""
        return self.name

    # -- record ----------------------------------------------------------------------------------
    @abstractmethod
    def layout(self, p: PlannedTensor, options: Options) -> Mapping[str, tuple[str, tuple[int, ...] | None]]:
        """The keys one quantized weight writes -> (safetensors dtype code, shape; None = sized later)."""

    def plan_slots(self, p: PlannedTensor, options: Options) -> list[TensorSlot]:
        from formats.writer import TensorSlot

        return [TensorSlot(k, code, shape) for k, (code, shape) in self.layout(p, options).items()]

    @abstractmethod
    def metadata_record(self, p: PlannedTensor, options: Options) -> dict[str, Any]:
        """The ``quantize_model.tensors`` record of one quantized weight."""

    @abstractmethod
    def record_entries(self, p: PlannedTensor, options: Options, result: Any) -> list[tuple[str, Any]]:
        """(key, data) of every key of ``p`` from what ``quantizer`` yielded, in bnb's order (the
        shard writer takes numpy arrays, torch tensors or bytes)."""

    # -- kernels ---------------------------------------------------------------------------------
    @abstractmethod
    def quantizer(self, options: Options, device: str, threads: int | None) -> Any:
        """An object with ``quantize_many((name, array, dtype code), ...) -> iterator of (name, result)``
        (results in order; NaN/Inf -> kernels.NonFiniteInputError with ``.tensor``), ``fallback_reason``
        ("" or why the asked device is not used) and ``notes`` (things the user should know)."""

    def device_footprint(self, options: Options, device: str) -> DeviceFootprint:
        """What ``quantizer(options, device, ...)`` adds to host memory (the CPU quantizers: nothing)."""
        return DeviceFootprint()

    @abstractmethod
    def quality_meter(self, options: Options, threads: int | None) -> Any:
        """The ``converter.record.quality.QualityMeter`` measuring this method's error (its
        ``measured_result(name, result)`` takes what ``quantizer`` yielded)."""

    def loader_advice(self, plan: Plan) -> str | None:
        """A warning about loaders that cannot run some of the planned weights (None: all can)."""
        return None

    # -- config.json -----------------------------------------------------------------------------
    @abstractmethod
    def quantization_config(self, plan: Plan) -> dict[str, Any]:
        """transformers' ``quantization_config`` for a folder of this method."""

    def options_json(self, options: dict[str, Any], others: tuple[str, ...]) -> dict[str, Any]:
        """The options as recorded in plans and shards: fields owned by other methods dropped."""
        return {k: v for k, v in options.items() if k not in others or k in self.own_options}

    # -- config.json, read back ---------------------------------------------------------------------
    @abstractmethod
    def matches_config(self, qconfig: Mapping[str, Any]) -> bool:
        """Whether a ``quantization_config`` describes a folder of this method."""

    @abstractmethod
    def config_summary(self, qconfig: Mapping[str, Any]) -> str:
        """One line for ``inspect``: the settings of ``qconfig`` that matter for this method."""

    # -- model card (push) -------------------------------------------------------------------------
    @abstractmethod
    def card(self, qconfig: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[list[str], str, list]:
        """(Hub tags, headline such as "NF4 4-bit", rows of (setting, value)) for the model card."""

    # -- loader ----------------------------------------------------------------------------------
    #: the model attribute PEFT / transformers read to know the layers' kind
    loaded_flag: str = "is_loaded_in_4bit"

    def describe(self, record: Any) -> str:
        """A short label of a record for ``inspect``, e.g. "nf4 blocksize 64 nested"."""
        return self.name

    @abstractmethod
    def dequantize(self, record: Any, dtype: Any) -> Any:
        """The full weight of ``record`` in torch dtype ``dtype`` (its stored shape)."""

    def compute_dtype(self, quantization_config: Mapping[str, Any]) -> str | None:
        """The matmul dtype config.json asks for (None: the input's dtype)."""
        return None

    def layer_kwargs(self, quantization_config: Mapping[str, Any]) -> dict[str, Any]:
        """Extra keyword arguments of ``runtime_layer().from_record`` taken from config.json."""
        return {}

    @abstractmethod
    def reads(self, record: object) -> bool:
        """Whether ``record`` (a ``formats`` record read from a shard) is of this method."""

    @abstractmethod
    def runtime_layer(self) -> type:
        """The frozen ``nn.Module`` class the loader builds from a record of this method
        (``cls.from_record(record, bias=..., compute_dtype=...)``)."""
