"""NF4 / FP4 blockwise 4-bit (bitsandbytes ``Linear4bit``): the method the converter started with.

Kernels ``converter.kernels.bnb4bit_np`` / ``converter.kernels.bnb4bit`` through
``converter.quantize.host_quantizer``;
record ``formats.record.QuantizedTensor``; config ``formats.bnb_compat.quantization_config``; runtime
layer ``converter.loader.module.Linear4bit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from converter.methods.base import DeviceFootprint, QuantMethod
from converter.sources.base import CODE_NAMES

if TYPE_CHECKING:
    from converter.plan.tensor_plan import Options, Plan, PlannedTensor

#: Bytes a quantized tensor adds beyond its payload: quant_map (16 f32), nested map (256 f32) and
#: the quant_state JSON blob (a few hundred bytes). Only used to cut shards, so an upper bound.
_TABLE_BYTES = 16 * 4 + 256 * 4 + 1024


def _grouped(tensors: list[PlannedTensor], most: int = 8) -> str:
    """Tensor names with layer indices as ``*`` and how many each stands for, with the row width:
    "model.layers.*.mlp.down_proj.weight (2, 96 inputs per row)"."""
    import re

    groups: dict[tuple[str, int], int] = {}
    for p in tensors:
        key = (re.sub(r"\.\d+(?=\.)", ".*", p.name), p.out_shape[-1])
        groups[key] = groups.get(key, 0) + 1
    shown = [f"{name} ({n}, {width} inputs per row)" for (name, width), n in list(groups.items())[:most]]
    more = f"; and {len(groups) - most} more name(s)" if len(groups) > most else ""
    return "; ".join(shown) + more


def _dtype_name(code: str) -> str:
    return CODE_NAMES[code]


class Bnb4bitMethod(QuantMethod):
    # options of 4-bit only: plans, fingerprints and provenance of other methods leave them out, so an
    # int8 conversion's bytes and resumption do not depend on flags that do not apply to it
    own_options = ("blocksize", "double_quant", "compute_dtype", "quant_storage")

    def __init__(self, name: str, description: str) -> None:
        self.name, self.description = name, description

    def _qtype(self) -> Any:
        from formats.quant_types import QuantType

        return QuantType.parse(self.name)

    def loader_advice(self, plan: Plan) -> str | None:
        # bitsandbytes 0.50 on the CPU, for rows that do not hold whole blocks, whoever quantized them:
        # the AVX512-BF16 repack on the first no_grad forward reshapes the absmax to
        # [rows, in // blocksize] and fails ("shape '[64, 1]' is invalid for input of size 96"); its
        # AVX-512 dequantize (csrc/cpu_ops.cpp, taken when the width is a multiple of 16) indexes the
        # absmax as [rows, in // blocksize] too and decodes such weights wrongly once they have more
        # than one block (measured: widths 16..320 at blocksizes 32..256), its scalar one (other widths,
        # CPUs without AVX-512) runs over the flattened weight. Its CUDA dequantize runs over the flattened
        # weight and its CUDA matmul falls back to it for such rows (backends/cuda/ops.py), as our loader.
        from converter.plan.moe import partial_block_experts

        bs = plan.options.blocksize
        split = [p for p in plan.tensors if p.quantize and p.out_shape[-1] % bs]
        if not split:
            return None
        partial = partial_block_experts([(p.name, p.out_shape, bs) for p in split])
        flattened = "(its kernels take blocks over the flattened weight)"
        if not partial:
            right = (
                "quantize-model's load_quantized decodes them right, and so does bitsandbytes on CUDA "
                + flattened
            )
        else:
            right = (
                f"bitsandbytes on CUDA decodes them right {flattened}, and quantize-model's load_quantized "
                f"decodes them right but not MoE experts whose weights do not fill whole blocks "
                f"({len(partial)}, e.g. {partial[0]}): it cannot load this folder"
            )
        wrong = [p for p in split if p.out_shape[-1] % 16 == 0 and p.info.numel > bs]
        if not wrong:  # its AVX-512 path errs only for widths that are multiples of 16, past one block
            odd = sum(1 for p in split if p.out_shape[-1] % 16)
            why = (
                "widths right: none is a multiple of 16"
                if odd == len(split)
                else "right: each is a single block" + (" or of a width not a multiple of 16" if odd else "")
            )
            elsewhere = f" (its CPU dequantize decodes these {why})"
        else:
            which = "them" if len(wrong) == len(split) else f"{len(wrong)} of them ({_grouped(wrong)})"
            elsewhere = (
                f", and on other CPUs with AVX-512 (and in training on any of them) its CPU dequantize "
                f"decodes {which} wrongly (widths that are multiples of 16: it takes the blocks per row), "
                f"so it silently computes with wrong weights"
            )
        return (
            f"{len(split)} quantized weight(s) have rows that are not whole {bs}-element blocks: "
            f"{_grouped(split)}. transformers + bitsandbytes 0.50 on the CPU does not run them as they are: "
            f"its inference forward fails on CPUs with AVX512-BF16{elsewhere}; {right}. A --blocksize "
            f"that divides every input width avoids it"
        )

    def check_options(self, options: Options) -> None:
        from formats.quant_types import check_blocksize

        check_blocksize(options.blocksize)

    def check_tensor(
        self, file: str, name: str, shape: tuple[int, ...], dtype: str, options: Options
    ) -> None:
        from formats.validate import check_quant_options

        check_quant_options(file, name, shape, dtype, options.blocksize, options.quant_storage)

    def out_nbytes(self, numel: int, shape: tuple[int, ...], options: Options) -> int:
        from formats.quant_types import quantized_nbytes

        return quantized_nbytes(numel, options.blocksize, options.double_quant) + _TABLE_BYTES

    def working_set(self, numel: int, shape: tuple[int, ...], options: Options) -> int:
        from formats.quant_types import n_blocks, n_nested_blocks

        nb = n_blocks(numel, options.blocksize)
        codes = (numel + 1) // 2 + 4 * nb
        if options.double_quant:
            codes += nb + 4 * n_nested_blocks(nb) + 4 * nb  # codes, nested absmax, decoded absmax
        return codes

    def plan_label(self, options: Options) -> str:
        return f"{self.name} blocksize {options.blocksize}"

    def layout(self, p: PlannedTensor, options: Options) -> dict:
        from formats.validate import quant_layout

        return quant_layout(
            p.name, p.out_shape, self._qtype(), options.blocksize, options.double_quant, options.quant_storage
        )

    def metadata_record(self, p: PlannedTensor, options: Options) -> dict[str, Any]:
        from formats import metadata

        return metadata.quantized_record(
            shape=p.out_shape,
            dtype=_dtype_name(p.out_dtype),
            quant_type=self._qtype(),
            blocksize=options.blocksize,
            nested=options.double_quant,
            quant_storage=options.quant_storage,
            transposed=p.transpose,
        )

    def record_entries(self, p: PlannedTensor, options: Options, result: Any) -> list:
        from converter.record.records import record_entries

        return record_entries(
            p.name,
            p.out_shape,
            _dtype_name(p.out_dtype),
            self._qtype(),
            options.blocksize,
            result.packed,
            result.absmax,
            result.nested,
        )

    def quantizer(self, options: Options, device: str, threads: int | None) -> Any:
        from converter.quantize.host_backends import make_host_quantizer

        return make_host_quantizer(self._qtype(), options.blocksize, options.double_quant, device, threads)

    def device_footprint(self, options: Options, device: str) -> DeviceFootprint:
        if device == "cpu":
            return DeviceFootprint()
        from converter.quantize import cuda_host  # the quantizer make_host_quantizer builds for a GPU

        return DeviceFootprint(pinned=cuda_host.pinned_bytes(), in_flight=cuda_host.DEPTH)

    def quality_meter(self, options: Options, threads: int | None) -> Any:
        from converter.record.quality import QualityMeter

        return QualityMeter(self._qtype(), options.blocksize, threads)

    def quantization_config(self, plan: Plan) -> dict[str, Any]:
        from formats import bnb_compat

        options = plan.options
        return bnb_compat.quantization_config(
            quant_type=self._qtype(),
            double_quant=options.double_quant,
            compute_dtype=plan.compute_dtype,
            skip_modules=plan.skip_modules,
            quant_storage=options.quant_storage,
        )

    def matches_config(self, qconfig: Any) -> bool:
        return bool(qconfig.get("load_in_4bit")) and qconfig.get("bnb_4bit_quant_type") == self.name

    def config_summary(self, qconfig: Any) -> str:
        return (
            f"{self.name}, double quant {qconfig.get('bnb_4bit_use_double_quant')}, "
            f"compute {qconfig.get('bnb_4bit_compute_dtype')}, skip {qconfig.get('llm_int8_skip_modules')}"
        )

    def card(self, qconfig: Any, options: Any) -> tuple[list[str], str, list]:
        label = self.name.upper()
        rows = [
            ("Quantization", f"{label} 4-bit, blockwise absmax (bitsandbytes `Linear4bit` layout)"),
            ("Block size", str(options.get("blocksize", 64))),
            (
                "Double (nested) quantization",
                "yes" if qconfig.get("bnb_4bit_use_double_quant", True) else "no",
            ),
            ("Compute dtype", str(qconfig.get("bnb_4bit_compute_dtype") or "-")),
            (
                "Quant storage",
                str(qconfig.get("bnb_4bit_quant_storage") or options.get("quant_storage") or "uint8"),
            ),
        ]
        return ["bitsandbytes", "4-bit", self.name], f"{label} 4-bit", rows

    def describe(self, record: Any) -> str:
        return f"{record.quant_type.label} blocksize {record.blocksize}{' nested' if record.nested else ''}"

    def dequantize(self, record: Any, dtype: Any) -> Any:
        from converter.loader import ops
        from converter.loader.module import state_from_record

        return ops.dequantize(record.packed, state_from_record(record), dtype)

    def compute_dtype(self, quantization_config: Any) -> str | None:
        name = quantization_config.get("bnb_4bit_compute_dtype")
        return name if isinstance(name, str) else None

    def reads(self, record: object) -> bool:
        from formats.record import QuantizedTensor

        return isinstance(record, QuantizedTensor) and record.quant_type.label == self.name

    def runtime_layer(self) -> type:
        from converter.loader.module import Linear4bit

        return Linear4bit
