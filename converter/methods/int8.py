"""LLM.int8 (bitsandbytes ``Linear8bitLt``, ``load_in_8bit``): row-wise int8 codes + fp16 row absmax.

Kernels ``converter.kernels.int8_np`` (CPU, no torch) or ``converter.kernels.int8`` (CUDA) through
``converter.quantize.int8_quantizer``; record and math
``formats.int8``; config ``formats.int8.quantization_config`` (13 keys, ``load_in_8bit``); runtime
layer ``converter.loader.module_int8.Linear8bit``. Options it owns: ``int8_threshold`` (only used by
the forward pass: bnb's stored bytes do not depend on it) and ``int8_scale`` ("cpu": bnb's CPU bytes,
"cuda": the bytes bitsandbytes writes on a GPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from converter.methods.base import DeviceFootprint, QuantMethod
from converter.sources.base import CODE_NAMES

if TYPE_CHECKING:
    from converter.plan.tensor_plan import Options, Plan, PlannedTensor

SCALES = ("cpu", "cuda")
#: The weights whose linear transformers feeds a 4-D input (MLA attention's expand_kv), which
#: bitsandbytes' CPU int8 matmul cannot take (``Int8Method.loader_advice``).
MLA_4D_INPUT = ".kv_b_proj.weight"


class Int8Method(QuantMethod):
    name = "int8"
    computes_in_input_dtype = True
    rounds_to_float16 = True
    quantizes_experts = False
    description = "8-bit LLM.int8, row-wise absmax (bitsandbytes Linear8bitLt, load_in_8bit)"
    own_options = ("int8_threshold", "int8_scale")

    def check_options(self, options: Options) -> None:
        if options.int8_scale not in SCALES:
            msg = f"--int8-scale {options.int8_scale!r} is not supported: use one of {', '.join(SCALES)}"
            raise ValueError(msg)
        if getattr(options, "moe_experts", "keep") != "keep":
            msg = "--moe-experts quantize writes 4-bit expert records: use it with nf4 / fp4, not int8"
            raise ValueError(msg)
        t = options.int8_threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t < float("inf"):
            msg = f"--int8-threshold {t!r} must be a finite number >= 0 (0 disables the outlier split)"
            raise ValueError(msg)

    def check_tensor(
        self, file: str, name: str, shape: tuple[int, ...], dtype: str, options: Options
    ) -> None:
        from formats.validate import UnsupportedOption

        if not name.endswith(".weight") or len(shape) != 2:
            msg = f"{file}: tensor {name!r}: int8 quantizes a module's 2-D '.weight', got shape {list(shape)}"
            raise UnsupportedOption(msg)

    def out_nbytes(self, numel: int, shape: tuple[int, ...], options: Options) -> int:
        return numel + 4 * shape[0] + 1

    def plan_label(self, options: Options) -> str:
        return "int8 row-wise"  # as inspect describes the record; LLM.int8 has no blocks

    def layout(self, p: PlannedTensor, options: Options) -> dict:
        from formats.int8 import int8_layout

        return int8_layout(p.name, p.out_shape)

    def metadata_record(self, p: PlannedTensor, options: Options) -> dict[str, Any]:
        from formats import metadata

        return metadata.int8_record(
            shape=p.out_shape,
            dtype=_dtype_name(p.out_dtype),
            scale=options.int8_scale,
            transposed=p.transpose,
        )

    def record_entries(self, p: PlannedTensor, options: Options, result: Any) -> list:
        """bnb's keys in its ``_save_to_state_dict`` order (weight, SCB, weight_format), numpy arrays
        (the converter's int8 path imports no torch), checked against the planned layout."""
        import numpy as np

        from formats.validate import WEIGHT_FORMAT_ROW, int8_layout
        from formats.writer import NUMPY_DTYPES

        layout = int8_layout(p.name, p.out_shape)
        values = [result.codes, result.scb, np.array(WEIGHT_FORMAT_ROW, dtype=np.uint8)]
        for (key, (code, shape)), value in zip(layout.items(), values, strict=True):
            if value.dtype != NUMPY_DTYPES[code] or tuple(value.shape) != shape:
                got = f"{value.dtype} {list(value.shape)}"
                msg = f"internal error: {key!r} is {got}, planned {code} {list(shape)}"
                raise RuntimeError(msg)
        return list(zip(layout, values, strict=True))

    def quantizer(self, options: Options, device: str, threads: int | None) -> Any:
        from converter.quantize.int8_quantizer import Int8Quantizer

        return Int8Quantizer(options.int8_scale, device, threads)

    def loader_advice(self, plan: Plan) -> str | None:
        # transformers 5 feeds MLA attention's kv_b_proj (DeepSeek-V2/V3 and Kimi-K2, GLM-4.7-Flash,
        # MiniCPM3, Youtu, ...: their expand_kv) a 4-D input, [batch, 1, seq, kv_lora_rank].
        # bitsandbytes 0.50's Linear8bitLt (MatMul8bitLt) flattens 3-D inputs only: on the CPU its
        # int8_vectorwise_quant then takes the row absmax over dim 1 ("The size of tensor a (5) must
        # match the size of tensor b (16)", on every CPU), on CUDA its int8_linear_matmul refuses the
        # input ("Only two or three dimensional matrices are supported for argument A";
        # bitsandbytes-foundation/bitsandbytes#980). Our int8 layer flattens every leading dimension.
        mla = [p.name for p in plan.tensors if p.quantize and p.name.endswith(MLA_4D_INPUT)]
        if not mla:
            return None
        return (
            f"{len(mla)} int8 weight(s) are MLA attention's kv_b_proj (e.g. {mla[0]}), whose input "
            "transformers feeds as a 4-D tensor: transformers + bitsandbytes 0.50 fails in the forward of "
            "this folder (its int8 matmul takes 2-D and 3-D inputs only), as it does with its own "
            "load_in_8bit of this model; quantize-model's load_quantized runs it. --skip '*.kv_b_proj' "
            "keeps them 16-bit for stock transformers + bitsandbytes"
        )

    def device_footprint(self, options: Options, device: str) -> DeviceFootprint:
        # on a GPU each tensor goes through torch (.to(device), .cpu()): no staging of its own
        return DeviceFootprint(imports_torch=device != "cpu")

    def quality_meter(self, options: Options, threads: int | None) -> Any:
        from converter.record.int8_quality import Int8QualityMeter

        return Int8QualityMeter(threads)

    def quantization_config(self, plan: Plan) -> dict[str, Any]:
        from formats.int8 import quantization_config

        # An explicit skip list, as for 4-bit: transformers then builds Linear8bitLt exactly where we
        # quantized, and vLLM (which reads only this list) keeps the same modules unquantized.
        return quantization_config(threshold=plan.options.int8_threshold, skip_modules=plan.skip_modules)

    loaded_flag = "is_loaded_in_8bit"

    def matches_config(self, qconfig: Any) -> bool:
        return bool(qconfig.get("load_in_8bit"))

    def config_summary(self, qconfig: Any) -> str:
        return (
            f"int8 (load_in_8bit), threshold {qconfig.get('llm_int8_threshold')}, "
            f"skip {qconfig.get('llm_int8_skip_modules')}"
        )

    def card(self, qconfig: Any, options: Any) -> tuple[list[str], str, list]:
        scale = options.get("int8_scale", "cpu")
        rows = [
            ("Quantization", "LLM.int8 8-bit, row-wise absmax (bitsandbytes `Linear8bitLt` layout)"),
            ("llm_int8_threshold", str(qconfig.get("llm_int8_threshold", 6.0))),
            (
                "Row scale",
                "bitsandbytes' CUDA bytes (__fdividef)" if scale == "cuda" else "bitsandbytes' CPU bytes",
            ),
        ]
        return ["bitsandbytes", "8-bit", "int8"], "LLM.int8 8-bit", rows

    def describe(self, record: Any) -> str:
        return "int8 row-wise"

    def dequantize(self, record: Any, dtype: Any) -> Any:
        from converter.loader import int8_ops

        return int8_ops.dequantize(record.codes, record.scb, dtype)

    def layer_kwargs(self, quantization_config: Any) -> dict[str, Any]:
        threshold = quantization_config.get("llm_int8_threshold", 6.0)
        return {"threshold": float(threshold) if isinstance(threshold, (int, float)) else 6.0}

    def reads(self, record: object) -> bool:
        from formats.int8 import Int8Tensor

        return isinstance(record, Int8Tensor)

    def runtime_layer(self) -> type:
        from converter.loader.module_int8 import Linear8bit

        return Linear8bit


def _dtype_name(code: str) -> str:
    return CODE_NAMES[code]
