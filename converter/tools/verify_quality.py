"""``verify OUT --against SRC``: recompute every quantized tensor's error statistics from the stored
shards and the source, and compare them with ``quantization_report.json``.

The stored codes and absmax (nested absmax decoded as a loader does) are measured against the source
tensor, cast to the dtype it was quantized in (but for LLM.int8's float16, whose rounding the kernel does,
as during conversion) and transposed as recorded (GPT-2 Conv1D), with the same
kernel as during conversion (converter/record/quality.py). A recomputed relative RMSE that differs from the
report's by more than ``REL_TOL`` is a problem: the shard or the report does not describe the source.
A source the folder was not made from (other names or shapes, or most tensors off the report) is one
problem, not one per tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converter.record.quality import Codes, TensorQuality, measure, summarize
from converter.units import first_of
from converter.writer.report import REPORT_NAME, read_report_tensors

#: Allowed relative difference between the report's rel_rmse and the recomputed one. Both come from
#: the same codes; only the summation order may differ (another machine's kernel path: scalar vs 8
#: lanes). Per block the sums run in f32 over at most 4096 terms, so each nonnegative sum carries a
#: relative error below gamma_4096 = 4096 u / (1 - 4096 u) ~ 2.4e-4 (u = 2^-24); rel_rmse is a square
#: root of a ratio of two such sums: below (2 * 2.4e-4) / 2 = 2.4e-4. 1e-3 covers it with margin.
REL_TOL = 1e-3
#: Without the report's figure (no quantization_report.json: deleted, damaged, a transformers +
#: bitsandbytes save_pretrained), a relative RMSE above this says the source is another: a tensor's own
#: quantization errs by less than the tensor itself, zero being one of the codes (int8, NF4, FP4), so
#: its relative RMSE stays below 1 (~0.006 int8, ~0.1 NF4), where an unrelated tensor of the same shape
#: gives ~1.4.
MAX_OWN_REL_RMSE = 1.0

if TYPE_CHECKING:
    import torch

    from formats.int8 import Int8Tensor
    from formats.record import QuantizedTensor

_TORCH_TO_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _has_gpt_oss_records(folder: Path, names: list[str]) -> bool:
    """Whether the folder's shards hold gpt-oss's per-expert records (converter/sources/gpt_oss.py)."""
    from converter.sources.gpt_oss import EXPERT_KEY
    from formats.reader import open_shard

    for shard_name in names:
        with open_shard(folder / shard_name) as shard:
            if any(EXPERT_KEY.match(k) for k in shard.quantized):
                return True
    return False


def verify_against(
    folder: Path, source: str, *, revision: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """(quality summary with per-tensor statistics, problems) of ``folder`` against ``source``."""
    import torch

    from converter.errors import AlreadyQuantizedError, InputError
    from converter.sources import open_source
    from formats import index as index_mod
    from formats.reader import open_checkpoint, open_shard

    problems: list[str] = []
    foreign: list[str] = []  # tensors the source does not hold as stored: another source was given
    off: list[str] = []  # tensors whose recomputed relative RMSE is not the report's
    if folder.is_file():  # one shard: `verify SHARD --against SRC` (the report is the folder's)
        folder, names = folder.parent, [folder.name]
    else:
        names = index_mod.read_index(folder, require_files=False).files
    try:
        src = open_source(source, revision=revision)
    except AlreadyQuantizedError as exc:  # convert's advice ("convert the original checkpoint instead")
        message = str(exc).replace("; convert the original checkpoint instead", "")
        msg = f"{message}; give --against the original checkpoint this folder was converted from"
        raise AlreadyQuantizedError(msg) from None
    try:  # a block-scaled FP8 source is measured as convert read it: dequantized to bf16
        from converter.sources.fp8 import wrap_if_block_fp8

        src = wrap_if_block_fp8(src)
        from converter.sources.llama4 import wrap_if_llama4

        src = wrap_if_llama4(src)  # Llama 4's fused experts: measured as convert wrote them, per expert
        if _has_gpt_oss_records(folder, names):  # gpt-oss's experts, as --moe-experts quantize wrote them
            from converter.sources.gpt_oss import wrap_if_gpt_oss

            src = wrap_if_gpt_oss(src)
    except BaseException:
        src.close()
        raise
    infos = {t.name: t for t in src.tensors()}
    report = _report_tensors(folder)
    measured: dict[str, TensorQuality] = {}
    mapped: dict[str, Any] = {}
    try:
        # The whole folder as one checkpoint: transformers' save_pretrained may put a weight's codes and
        # its quant state in two shards, and a shard read alone left that weight out, unmeasured. One
        # shard given alone is read as it is (its split weights' pieces cannot be joined).
        paths = [folder / n for n in names]
        with open_checkpoint(paths) if len(paths) > 1 else open_shard(paths[0]) as checkpoint:
            shards = getattr(checkpoint, "shards", [checkpoint])
            metas: dict[str, dict] = {}  # shard name -> its per-tensor metadata of ours ({}: none)
            for key in checkpoint.quantized:
                shard = next(s for s in shards if key in s)
                shard_name = shard.path.name
                if shard_name not in metas:
                    metas[shard_name] = json.loads(
                        (shard.raw_metadata or {}).get("quantize_model.tensors", "{}")
                    )
                tensor_meta = metas[shard_name]
                rec = checkpoint.record(key)
                info = infos.get(key)
                if info is None:
                    foreign.append(f"tensor {key!r} in {shard_name}: not in the source {source}")
                    continue
                if info.file not in mapped:
                    mapped[info.file] = src.open_file(info.file)
                x = mapped[info.file].get(key)
                want = getattr(torch, rec.dtype) if rec.dtype is not None else x.dtype
                if x.dtype != want and not _kernel_rounds_to_float16(rec, x.dtype, want):
                    x = x.to(want)
                if (tensor_meta.get(key) or {}).get("transposed"):
                    x = x.transpose(-2, -1)
                x = x.contiguous()
                if tuple(x.shape) != tuple(rec.shape):
                    foreign.append(
                        f"tensor {key!r} in {shard_name}: shape {list(rec.shape)} but the source has "
                        f"{list(x.shape)}"
                    )
                    continue
                q = _measure(key, x, rec)
                measured[key] = q
                stored = (report.get(key) or {}).get("rel_rmse")
                if stored is not None and abs(stored - q.rel_rmse) > REL_TOL * max(q.rel_rmse, 1e-12):
                    off.append(
                        f"tensor {key!r} in {shard_name}: relative RMSE {q.rel_rmse:.6g} against the "
                        f"source, but quantization_report.json says {stored:.6g}"
                    )
                elif stored is None and q.rel_rmse > MAX_OWN_REL_RMSE:
                    off.append(
                        f"tensor {key!r} in {shard_name}: relative RMSE {q.rel_rmse:.6g} against the "
                        "source, more than the tensor itself (quantization_report.json has none to compare)"
                    )
                if q.nonfinite:
                    hint = _nonfinite_hint(key, rec)
                    problems.append(f"tensor {key!r} in {shard_name}: {q.nonfinite} NaN/Inf values{hint}")
    except InputError:
        raise
    finally:
        mapped.clear()
        src.close()
    # The shards verified before this ran: most tensors off the report means another source (same
    # shapes: another seed, a fine-tune) rather than that many damaged tensors.
    elsewhere = 2 * len(off) > len(measured)
    if foreign:  # one line, not one per tensor: the folder was made from something else
        problems.insert(0, f"{first_of(foreign)}; the folder was not converted from {source}")
    elif elsewhere:
        problems.insert(0, f"{first_of(off)}; the folder does not look converted from {source}")
    if not (foreign or elsewhere):
        problems[:0] = [f"{line}; reconvert the folder" for line in off]
    summary = summarize(measured, {})
    summary["tensors"] = {k: v.to_json() for k, v in sorted(measured.items())}
    summary["tensors_not_in_source"] = len(foreign)
    summary["not_from_source"] = bool(foreign) or elsewhere
    return summary, problems


def _nonfinite_hint(key: str, rec: QuantizedTensor | Int8Tensor) -> str:
    """Why a verified int8 record decodes to NaN and the remedy: its source is finite (a NaN/Inf weight
    is refused), so a row past float16's range was stored as bitsandbytes stores it (SCB = inf);
    reconverting alone writes the same bytes."""
    from formats.int8 import Int8Tensor

    if not isinstance(rec, Int8Tensor):
        return ""
    module = key.removesuffix(".weight")
    return (
        f" (rows past float16's range, stored as bitsandbytes stores them: SCB = inf); reconvert with "
        f"--skip {module!r} to keep it unquantized"
    )


def _kernel_rounds_to_float16(
    rec: QuantizedTensor | Int8Tensor, have: torch.dtype, want: torch.dtype
) -> bool:
    """Whether the conversion left a --dtype float16 cast of this weight to its kernel (LLM.int8 rounds
    a float32/bfloat16 weight to float16 itself: its method's ``kernel_input_dtype``) and
    measured the report against the weight as the checkpoint holds it: then so does this."""
    import torch

    from formats.int8 import Int8Tensor

    return isinstance(rec, Int8Tensor) and want == torch.float16 and have in (torch.float32, torch.bfloat16)


def _measure(key: str, x: torch.Tensor, rec: QuantizedTensor | Int8Tensor) -> TensorQuality:
    """The record's error statistics against its source tensor ``x`` (same shape and dtype)."""
    import torch

    from formats.int8 import Int8Tensor

    if isinstance(rec, Int8Tensor):
        from converter.record.int8_quality import measure_int8

        return measure_int8(key, x, rec.codes, rec.scb)
    codes = Codes(
        rec.packed.reshape(-1).view(torch.uint8),
        rec.absmax,
        (rec.absmax, rec.nested.nested_absmax, rec.nested.offset) if rec.nested else None,
        rec.nested.nested_quant_map if rec.nested else None,
    )
    return measure(
        key, x, _TORCH_TO_CODE[rec.dtype], codes, rec.quant_type, rec.blocksize, quant_map=rec.quant_map
    )


def _report_tensors(folder: Path) -> dict[str, dict]:
    tensors = read_report_tensors(folder / REPORT_NAME) or []
    return {t["name"]: t for t in tensors if isinstance(t, dict) and "name" in t}
