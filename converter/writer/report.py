"""The conversion result object and ``quantization_report.json``.

The result counts what the plan did (tensors and parameters quantized or kept, the share of
parameters left in 16 bit, bytes in and out, bits per parameter) and how long it took. Timings go
only to the result and the report, never into shards, index or config (reruns give equal bytes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from converter.version import tool_version

REPORT_NAME = "quantization_report.json"


def read_report_tensors(path: Path) -> list[Any] | None:
    """The per-tensor entries of the report at ``path``; None where it is missing or is no report a run
    could have written (cut short, not JSON, not an object with its ``tensors`` list)."""
    try:
        report = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    tensors = report.get("tensors") if isinstance(report, dict) else None
    return tensors if isinstance(tensors, list) else None


@dataclass
class ConversionResult:
    output: Path
    shards: list[str]
    tensors_quantized: int
    tensors_kept: int
    params_quantized: int
    params_kept: int
    bytes_in: int  # source bytes of every tensor (whether or not read this run)
    bytes_out: int  # bytes of the output shards
    seconds: float
    skipped_modules: list[str] = field(default_factory=list)
    resumed: bool = False
    noop: bool = False
    bytes_read: int = 0  # source bytes read by this run (less than bytes_in when resumed)
    shards_reused: int = 0  # shards a resumed run found complete and kept
    #: a finished conversion whose other files (config.json, tokenizer...) changed in the source since:
    #: those rewritten, every shard kept (``resumed`` is True too: the run went through the resume path)
    refreshed: bool = False
    bytes_quantized: int = 0  # stored bytes of the quantized weights (codes, absmax, maps, quant state)
    bytes_kept: int = 0  # stored bytes of the tensors kept unquantized
    pushed_to: str | None = None
    notes: list[str] = field(default_factory=list)  # e.g. why --device cuda fell back to the CPU
    quality: dict | None = None  # converter.record.quality.summarize: totals and the worst tensors
    preflight: Any = None  # converter.plan.preflight.Preflight of a dry run (nothing written)
    moe: Any = None  # converter.plan.moe.MoeSummary (MoE checkpoints): experts quantized or kept, loaders

    @property
    def params_total(self) -> int:
        return self.params_quantized + self.params_kept

    @property
    def kept_share(self) -> float:
        """Share of parameters left unquantized (16/32 bit)."""
        return self.params_kept / self.params_total if self.params_total else 0.0

    @property
    def bits_per_param(self) -> float:
        """Stored bits per parameter over the whole checkpoint (kept tensors included): tensor data, as
        ``inspect`` and ``--dry-run`` count it (the shard headers, in ``bytes_out``, are left out: they
        weigh on tiny models only)."""
        stored = self.bytes_quantized + self.bytes_kept
        return 8 * stored / self.params_total if self.params_total else 0.0

    @property
    def quantized_bits_per_param(self) -> float:
        """Stored bits per parameter of the quantized weights alone."""
        return 8 * self.bytes_quantized / self.params_quantized if self.params_quantized else 0.0

    @property
    def throughput(self) -> float:
        """Source bytes read per second by this run."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        d["preflight"] = self.preflight.to_json() if self.preflight is not None else None
        d["moe"] = self.moe.to_json() if self.moe is not None else None
        d.update(
            params_total=self.params_total,
            kept_share=self.kept_share,
            bits_per_param=self.bits_per_param,
            quantized_bits_per_param=self.quantized_bits_per_param,
            throughput_bytes_per_s=self.throughput,
        )
        return d


def make_result(
    output: Path,
    plan: Any,
    *,
    resumed: bool,
    noop: bool,
    seconds: float,
    bytes_read: int,
    shards_reused: int,
) -> ConversionResult:
    q = plan.quantized
    k = plan.kept
    opts = plan.options
    bytes_out = bytes_quantized = 0
    for s in plan.shards:
        path = output / s.name
        bytes_out += path.stat().st_size if path.exists() else s.nbytes
        keys = {k for t in s.tensors if t.quantize for k in opts.method.layout(t, opts)}
        bytes_quantized += _quantized_bytes(path, keys)
    return ConversionResult(
        output=output,
        shards=[s.name for s in plan.shards],
        tensors_quantized=len(q),
        tensors_kept=len(k),
        params_quantized=sum(t.info.numel for t in q),
        params_kept=sum(t.info.numel for t in k),
        bytes_in=sum(t.info.nbytes for t in plan.tensors),
        bytes_out=bytes_out,
        seconds=seconds,
        skipped_modules=list(plan.skip_modules),
        resumed=resumed,
        noop=noop,
        bytes_read=bytes_read,
        shards_reused=shards_reused,
        bytes_quantized=bytes_quantized,
        bytes_kept=sum(t.out_nbytes for t in k),
        moe=plan_moe_summary(plan),
    )


def plan_moe_summary(plan: Any) -> Any:
    """The MoE summary (which loaders read the folder) of a plan; None for a dense model."""
    from converter.plan import moe

    opts = plan.options
    quantized = [t.name for t in plan.quantized]
    shapes = [(t.name, t.out_shape, getattr(opts, "blocksize", 0) or 0) for t in plan.quantized]
    formats = {(opts.method.name, str(getattr(opts, "quant_storage", "uint8") or "uint8"))}
    sizes = {t.name: t.out_shape for t in plan.quantized} | {t.name: t.info.shape for t in plan.kept}
    partial = moe.partial_block_experts(shapes)
    others = moe.other_experts([t.info for t in plan.kept])  # Granite's, DBRX's experts: 16-bit
    kept = [t.name for t in plan.kept]
    return moe.summarize(quantized, kept, partial, formats, sizes, others, getattr(plan, "model_type", None))


def _quantized_bytes(path: Path, keys: set[str]) -> int:
    """Stored bytes of the quantized weights' keys in one shard (every key their method writes: 4-bit
    codes, absmax, maps and quant state; int8 codes, SCB and weight_format), from its header; 0 if absent."""
    if not keys or not path.exists():
        return 0
    import json
    import struct

    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for key, entry in header.items():
        if key in keys:
            begin, end = entry["data_offsets"]
            total += end - begin
    return total


def build_report(
    result: ConversionResult,
    plan: Any,
    identity: dict,
    selection: Any,
    stats: Any,
    shards: dict[str, dict] | None = None,
    meter: Any = None,
) -> dict:
    """The content of quantization_report.json (the only output file with timings).

    ``shards`` are the manifest's finished shards: their recorded quality statistics cover the
    tensors a resumed run did not quantize again; ``meter`` (converter.record.quality.QualityMeter) adds
    how long measuring took this run.
    """
    from converter.record.quality import from_manifest, summarize

    quality, kept_nonfinite = from_manifest(shards or {})
    result.quality = summarize(quality, kept_nonfinite) if quality or kept_nonfinite else None

    kept_reasons: dict[str, int] = {}
    for t in plan.kept:
        kept_reasons[t.reason] = kept_reasons.get(t.reason, 0) + t.info.numel
    # The report travels with the folder (and to the Hub on --push-to): no local paths or mtimes.
    source = {k: v for k, v in identity.items() if k != "path"}
    if isinstance(source.get("files"), dict):
        source["files"] = {
            name: {k: v for k, v in info.items() if k != "mtime_ns"} if isinstance(info, dict) else info
            for name, info in source["files"].items()
        }
    summary = result.to_json()
    for key in ("output", "quality", "preflight"):  # quality has its own section; preflight is dry-run only
        summary.pop(key, None)
    return {
        "tool": "quantize-model",
        "tool_version": tool_version(),
        "source": source,
        "options": plan.options.to_json(),
        "model_dtype": plan.model_dtype,
        "compute_dtype": plan.compute_dtype,
        "selection_mode": getattr(selection, "mode", None),
        "selection_via": getattr(
            selection, "via", None
        ),  # live | cache | table (converter.plan.selection_table)
        "summary": summary,
        "timings": {
            "seconds_total": result.seconds,
            "seconds_read": stats.seconds_read,
            "seconds_quantize": stats.seconds_quantize,
            "seconds_write": stats.seconds_write,
            "shards_written_this_run": stats.shards_written,
            # Measured on a background thread (overlapping the pipeline): its own time, and what the
            # pipeline spent waiting for it.
            "seconds_quality": meter.seconds if meter is not None else 0.0,
            "seconds_quality_waited": meter.seconds_waited if meter is not None else 0.0,
        },
        "quality": result.quality,
        "kept_params_by_reason": dict(sorted(kept_reasons.items())),
        "tensors": [
            {
                "name": t.name,
                "shard": s.name,
                "source_dtype": t.info.dtype,
                "shape": list(t.info.shape),
                "action": "quantize" if t.quantize else "keep",
                "transposed": t.transpose,
                "out_dtype": t.out_dtype,
                **({} if t.quantize else {"reason": t.reason}),
                **_tensor_quality(t.name, quality, kept_nonfinite),
            }
            for s in plan.shards
            for t in s.tensors
        ],
    }


def _tensor_quality(name: str, quality: dict, kept_nonfinite: dict[str, int]) -> dict:
    if name in quality:
        q = quality[name].to_json()
        return {k: q[k] for k in ("rel_rmse", "max_abs_err", "snr_db", "nonfinite")}
    if name in kept_nonfinite:
        return {"nonfinite": kept_nonfinite[name]}
    return {}
