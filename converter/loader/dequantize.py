"""Back to a plain checkpoint: every quantized weight dequantized, every other tensor copied.

Streams tensor by tensor: the plan (names, shapes, dtypes, shard split) is made from the records
alone, then each shard is written by ``formats.writer.ShardWriter`` (temp name, fsync, rename) with
one dequantized weight in memory at a time. A tensor of three or more dimensions (the fused MoE experts
tensors: Llama 4's and gpt-oss's, fused back from their per-expert records, Qwen3-VL-MoE's fused 3-D
records, 16-bit fused experts kept) is never built whole: it is written block by block along its first
dimension (one expert's block at a time, ``ShardWriter.write_part``), so the memory a write takes is
one expert's block, not the fused tensor (21.5 GB in bf16 for one of Llama 4 Maverick's
``gate_up_proj``). Floating-point tensors are written in ``dtype``
(integer tensors such as ``position_ids`` keep theirs). ``config.json`` loses its
``quantization_config`` and gets ``dtype`` / ``torch_dtype``; tokenizer and other files are copied
(with the sentence-transformers module folders convert copies: ``1_Pooling/config.json``).
The index is written last, so a folder with an index is complete.

GPT-2 style ``Conv1D`` weights (and Qwen3-VL-MoE's fused experts, ``[E, in, out]`` on the Hub) are stored
``[in, out]`` by transformers but quantized as ``[out, in]``
(bitsandbytes' layout): they are written back transposed (a fused 3-D record expert by expert, each
expert's run of blocks decoded alone), so that plain transformers loads the folder.
Which weights those are: the ``transposed`` flag of our per-tensor metadata, or, for a folder another
tool wrote (transformers + bitsandbytes' ``save_pretrained``), the ``Conv1D`` modules of the model that
``config.json`` describes (built on the meta device).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from converter.errors import ConverterError, InputError, OutputExistsError
from converter.kernels.isa_env import forced_isa
from converter.loader.config_file import read_config
from converter.loader.module import dtype_from_name
from converter.loader.state import INDEX_NAME, load_quantized_state, resolve_folder
from converter.methods import for_record
from converter.plan.preflight import WontFitError, disk_free, read_only
from converter.plan.selection_facts import ModelFacts
from converter.plan.tensor_plan import normalize_dtype, parse_size, shard_names
from converter.sources.local import extra_files_in, read_header, sample_digest
from converter.writer.manifest import (
    FolderLock,
    atomic_write_bytes,
    clear_folder,
    dangling_link,
    file_above,
    is_temp_file,
    source_overlap,
    writing_to,
)
from formats.quant_types import NESTED_BLOCKSIZE
from formats.record import NestedAbsmax, QuantizedTensor
from formats.writer import DTYPE_CODES, ShardWriter, TensorSlot

#: Present in the output until the plain checkpoint is complete (the last step removes it).
UNFINISHED_NAME = ".quantize-model-dequantize.unfinished"

#: Written when the plain checkpoint is complete: what it was made from and what it holds, so that a
#: rerun with the same arguments has nothing to do.
DONE_NAME = ".quantize-model-dequantize.json"

#: Files of a quantized folder that are not copied to the plain one.
_NOT_COPIED = {"config.json", INDEX_NAME, "quantization_report.json"}


@dataclass
class DequantizeResult:
    output: Path
    dtype: str
    shards: list[str] = field(default_factory=list)
    tensors_dequantized: int = 0
    tensors_copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    up_to_date: bool = False  # the output already held this plain checkpoint: nothing was written
    #: warnings of the run: tensors with finite values the cast to ``dtype`` made Inf
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "dtype": self.dtype,
            "shards": self.shards,
            "tensors_dequantized": self.tensors_dequantized,
            "tensors_copied": self.tensors_copied,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "up_to_date": self.up_to_date,
            "notes": self.notes,
        }


def _out_dtype(value: QuantizedTensor | torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    if not isinstance(value, torch.Tensor) or value.is_floating_point():
        return dtype
    return value.dtype


def _transposed_weights(
    folder: Path,
    state: dict,
    meta_model: Callable[[], torch.nn.Module | None],
    facts: Callable[[], ModelFacts | None],
) -> set[str]:
    """The quantized weights that are GPT-2 ``Conv1D`` weights (``[in, out]`` in a plain checkpoint);
    ``meta_model``: the folder's model on the meta device (``_meta_model``), built on first use only,
    when ``facts`` (``_table_facts``) has none."""
    from safetensors import safe_open

    quantized = {k for k, v in state.items() if not isinstance(v, torch.Tensor)}
    found, described = set(), False
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            meta = (f.metadata() or {}).get("quantize_model.tensors")
        if meta is not None:
            described = True
            found |= {k for k, rec in json.loads(meta).items() if (rec or {}).get("transposed")}
    if described:
        return found & quantized
    known = facts()
    if known is not None:  # transformers' facts without transformers: the shipped table or the user cache
        return {k for k in quantized if known.keys[k].transpose}
    return _conv1d_weights(meta_model()) & quantized


def _table_facts(config: dict | None, state: dict) -> ModelFacts | None:
    """What transformers' model says of every key of ``state`` (dtype plan, Conv1D weights) from the
    converter's shipped selection table or per-user cache, without importing transformers or building
    the model (seconds of a small model's dequantize); None when they do not cover every key."""
    if not isinstance(config, dict):
        return None
    from converter.plan import selection_table

    try:
        found = selection_table.lookup(config, list(state))
    except Exception:  # an odd config the table cannot read: the model decides, as before
        return None
    if found is None or not set(state) <= set(found[0].keys):
        return None
    return found[0]


def _meta_model(folder: Path) -> torch.nn.Module | None:
    """The model ``folder/config.json`` describes, on the meta device (None when the config is missing
    or names no model transformers can build)."""
    if not (folder / "config.json").is_file():
        return None
    try:
        import transformers

        from converter.loader.model_build import class_to_build

        config = transformers.AutoConfig.from_pretrained(folder)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            return class_to_build(config)(config)
    except Exception:  # not a transformers model
        return None


def _conv1d_weights(model: torch.nn.Module | None) -> set[str]:
    """``<module>.weight`` of every ``Conv1D`` of ``model`` (none without a model: a config missing or
    naming no model transformers can build)."""
    if model is None:  # not a transformers model: nothing is known to be transposed
        return set()
    from transformers.pytorch_utils import Conv1D

    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Conv1D)}


def _out_dtypes(
    state: dict,
    dtype: torch.dtype,
    meta_model: Callable[[], torch.nn.Module | None],
    facts: Callable[[], ModelFacts | None],
) -> dict[str, torch.dtype]:
    """The dtype each tensor is written in: ``dtype`` for floats, except the kept tensors transformers'
    dtype plan holds in float32 for ``dtype`` (``_keep_in_fp32_modules`` under float16,
    ``_keep_in_fp32_modules_strict`` under float16 or bfloat16: T5's ``wo``), which its ``save_pretrained``
    of the model loaded in ``dtype`` writes in float32 too; integer tensors as they are."""
    out = {k: _out_dtype(v, dtype) for k, v in state.items()}
    if dtype not in (torch.float16, torch.bfloat16):
        return out
    known = facts()
    if known is not None:  # the same plan, from the facts: strict under fp16 and bf16, the other under fp16
        for k, v in state.items():
            f = known.keys[k]
            if (
                isinstance(v, torch.Tensor)
                and v.is_floating_point()
                and (f.fp32_strict or (f.fp32 and dtype == torch.float16))
            ):
                out[k] = torch.float32
        return out
    model = meta_model()
    if model is None:
        return out
    from converter.loader.model import dtype_plan

    planned = dtype_plan(model, dtype)
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and planned(k) == torch.float32:
            out[k] = torch.float32
    return out


def _plan(state: dict, dtypes: dict[str, torch.dtype], max_shard_size: int) -> list[list[str]]:
    """Names per shard, in checkpoint order, each shard at most ``max_shard_size`` bytes (unless one
    tensor alone is larger, as transformers does)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, value in state.items():
        n = math.prod(value.shape) * torch.empty(0, dtype=dtypes[name]).element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


@dataclass(frozen=True)
class _Fused:
    """A Llama 4 or gpt-oss fused experts tensor written from its per-expert weights (16-bit or quantized):
    ``gate_up_proj [E, H, 2I]`` (expert e: ``cat([gate_e.T, up_e.T], 1)``; gpt-oss: ``gate_up_e.T``) or
    ``down_proj [E, I, H]``; gpt-oss's biases ``[E, 2I]`` / ``[E, H]`` stacked."""

    parts: tuple[tuple[QuantizedTensor | torch.Tensor, ...], ...]  # per expert: (gate, up) or (down,)
    shape: tuple[int, ...]
    stack_only: bool = False  # gpt-oss's biases: stacked as they are (no transpose)

    def block(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``e``'s block ``[*shape[1:]]`` of the fused tensor in ``dtype`` (never the whole tensor:
        it is written block by block, ``_parts``)."""
        from converter.sources.llama4 import fused_block

        pieces = [_tensor(p, dtype, False) for p in self.parts[e]]
        return pieces[0] if self.stack_only else fused_block(pieces)


def _fuse_llama4(state: dict, config: dict | None) -> dict:
    """``state`` with Llama 4's per-expert weights (converter/sources/llama4.py) fused back into the
    ``gate_up_proj`` / ``down_proj`` tensors plain transformers loads, each where its first part stood.
    Other models, and an experts module missing a part, are left as they are."""
    from converter.sources.llama4 import EXPERT_KEY, is_llama4

    if not is_llama4(config):
        return state
    groups: dict[str, dict[tuple[int, str], str]] = {}
    for k in state:
        m = EXPERT_KEY.match(k)
        if m is not None:
            groups.setdefault(m["module"], {})[(int(m["e"]), m["p"])] = k
    fused: dict[str, tuple[str, _Fused]] = {}  # first part's key -> (fused name, fused tensor)
    position = {k: i for i, k in enumerate(state)}
    for module, parts in groups.items():
        num = 1 + max(e for e, _ in parts)
        if set(parts) != {(e, p) for e in range(num) for p in ("gate", "up", "down")}:
            continue
        inter, hidden = (int(d) for d in state[parts[(0, "gate")]].shape)
        gate_up = tuple((state[parts[(e, "gate")]], state[parts[(e, "up")]]) for e in range(num))
        down = tuple((state[parts[(e, "down")]],) for e in range(num))
        keys = sorted(parts.values(), key=position.__getitem__)
        fused[keys[0]] = (f"{module}.gate_up_proj", _Fused(gate_up, (num, hidden, 2 * inter)))
        fused[keys[1]] = (f"{module}.down_proj", _Fused(down, (num, inter, hidden)))
        for k in keys[2:]:
            fused[k] = ("", _Fused((), ()))  # dropped
    return _replaced(state, fused)


def _replaced(state: dict, fused: dict[str, tuple[str, _Fused]]) -> dict:
    """``state`` with each key of ``fused`` replaced, where it stood, by its (fused name, fused tensor),
    or dropped where the name is empty (the other parts of a fused tensor)."""
    out: dict = {}
    for k, v in state.items():
        if k not in fused:
            out[k] = v
        elif fused[k][0]:
            out[fused[k][0]] = fused[k][1]
    return out


def _fuse_gpt_oss(state: dict) -> dict:
    """``state`` with gpt-oss's per-expert records (unsloth's ``experts.gate_up_projs.<e>.weight`` /
    ``.bias``, ``down_projs``: converter/sources/gpt_oss.py) fused back into the ``gate_up_proj [E, H, 2I]``,
    ``gate_up_proj_bias``, ``down_proj [E, I, H]`` and ``down_proj_bias`` tensors plain transformers
    loads, each where expert 0's record stood. An experts module missing a record is left as it is."""
    from converter.sources.gpt_oss import EXPERT_KEY

    groups: dict[tuple[str, str, str], dict[int, str]] = {}
    for k in state:
        m = EXPERT_KEY.match(k)
        if m is not None:
            groups.setdefault((m["module"], m["proj"], m["kind"]), {})[int(m["e"])] = k
    fused: dict[str, tuple[str, _Fused]] = {}
    for (module, proj, kind), experts in groups.items():
        num = len(experts)
        if set(experts) != set(range(num)):
            continue
        parts = tuple((state[experts[e]],) for e in range(num))
        shape = tuple(int(d) for d in state[experts[0]].shape)
        name = f"{module}.{proj.removesuffix('s')}" + ("_bias" if kind == "bias" else "")
        full = (num, *shape) if kind == "bias" else (num, shape[1], shape[0])
        fused[experts[0]] = (name, _Fused(parts, full, stack_only=kind == "bias"))
        for e in range(1, num):
            fused[experts[e]] = ("", _Fused((), ()))  # dropped
    return _replaced(state, fused) if fused else state


def _tensor(value: QuantizedTensor | torch.Tensor, dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):  # a quantized record: its method decodes it
        w = for_record(value).dequantize(value, dtype)
        return w.transpose(-2, -1) if transposed else w
    return value.to(dtype)


def _record_rows(record: QuantizedTensor, index: int, dtype: torch.dtype) -> torch.Tensor:
    """``record``'s block ``index`` along its first dimension (``[*shape[1:]]``: one expert of a fused 3-D
    record) decoded in ``dtype``, the same bits as that block of the whole record's decode: the run of
    4-bit blocks that holds it (widened to whole 256-block nested groups, so that each absmax is decoded
    from its own nested block, with the record's offset) is decoded as a record of its own."""
    per = math.prod(record.shape[1:])
    start, stop, bs = index * per, (index + 1) * per, record.blocksize
    b0, b1 = start // bs, -(-stop // bs)
    nested = None
    if record.nested is not None:
        g0, g1 = b0 // NESTED_BLOCKSIZE, -(-b1 // NESTED_BLOCKSIZE)
        b0, b1 = g0 * NESTED_BLOCKSIZE, min(g1 * NESTED_BLOCKSIZE, record.n_blocks)
        nested_absmax = record.nested.nested_absmax.reshape(-1)[g0:g1]
        nested = NestedAbsmax(nested_absmax, record.nested.nested_quant_map, record.nested.offset)
    e0, e1 = b0 * bs, min(b1 * bs, record.n)
    from converter.loader.ops import packed_bytes

    piece = QuantizedTensor(
        record.name,
        (e1 - e0,),
        record.dtype,
        record.quant_type,
        bs,
        packed_bytes(record.packed)[e0 // 2 : (e1 + 1) // 2].reshape(-1, 1),
        record.absmax.reshape(-1)[b0:b1],
        record.quant_map,
        nested,
        prechecked=True,  # views of a checked record
    )
    flat = for_record(piece).dequantize(piece, dtype).reshape(-1)
    return flat[start - e0 : stop - e0].reshape(record.shape[1:])


def _streamed(value: QuantizedTensor | torch.Tensor | _Fused) -> bool:
    """Whether ``value`` is written block by block along its first dimension (three or more dimensions:
    fused experts), not built whole."""
    if isinstance(value, _Fused):
        return bool(value.parts) and math.prod(value.shape) > 0
    if isinstance(value, (torch.Tensor, QuantizedTensor)):
        return len(value.shape) >= 3 and math.prod(value.shape) > 0
    return False  # another method's record (int8: 2-D only): whole


def _parts(
    value: QuantizedTensor | torch.Tensor | _Fused, dtype: torch.dtype, transposed: bool, name: str = ""
) -> Iterator[tuple[torch.Tensor, Callable[[], torch.Tensor | None]]]:
    """The tensor ``value`` is written as, in ``dtype``, in consecutive C-contiguous parts in file order:
    each with a callable giving the same part decoded in float32 (a 16-bit tensor: as it is; None where
    there is none), for the overflow check. A tensor of three or more dimensions comes block by block
    along its first dimension (one expert at a time); any other tensor whole, in one part. ``name``: the
    tensor's, for the error a fused tensor's expert of another shape than expert 0's gets."""
    if isinstance(value, _Fused) and not _streamed(value):  # no element: one empty part
        yield torch.empty(value.shape, dtype=dtype), lambda: None
        return
    if not _streamed(value):
        assert not isinstance(value, _Fused)
        whole = value
        if isinstance(whole, torch.Tensor):
            yield whole.to(dtype).contiguous(), lambda: whole
        else:
            yield (
                _tensor(whole, dtype, transposed).contiguous(),
                lambda: _tensor(whole, torch.float32, transposed),
            )
        return
    for e in range(value.shape[0]):

        def block(dtype_: torch.dtype, e: int = e) -> torch.Tensor:
            if isinstance(value, _Fused):
                return value.block(e, dtype_)
            if isinstance(value, torch.Tensor):
                return value[e].to(dtype_)
            w = _record_rows(value, e, dtype_)
            return w.transpose(-2, -1) if transposed else w

        part = block(dtype).contiguous()
        if isinstance(value, _Fused) and tuple(part.shape) != value.shape[1:]:
            # per-expert weights of other shapes than expert 0's (a folder not written by us, edited)
            msg = (
                f"tensor {name!r}: expert {e}'s weights make a block of shape {list(part.shape)}, the fused "
                f"tensor's experts are {list(value.shape[1:])} (expert 0's): the per-expert weights disagree"
            )
            raise InputError(msg)
        if isinstance(value, torch.Tensor):
            yield part, lambda e=e: value[e]
        else:
            yield part, lambda block=block: block(torch.float32)


class _Overflow:
    """The float16 / bfloat16 overflow check of one tensor written in parts: finite values (decoded in
    float32) the cast to the written dtype made Inf, counted over the parts into one note."""

    def __init__(self, name: str, value: QuantizedTensor | torch.Tensor | _Fused, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype
        # a cast that can overflow: to float16, or a float32/float64 tensor to bf16 (bf16's range is
        # float32's, so a bf16 run pays no extra pass over its decoded 4-bit weights, whose values are
        # float32 products)
        wide = isinstance(value, torch.Tensor) and value.dtype in (torch.float32, torch.float64)
        self.checked = dtype == torch.float16 or (wide and dtype != value.dtype)
        self.count, self.largest = 0, 0.0

    def add(self, written: torch.Tensor, source: Callable[[], torch.Tensor | None]) -> None:
        """Count the part ``written`` (``source()``: the same part decoded, only called when ``written``
        holds a value that is not finite). No part-sized temporary otherwise."""
        if not self.checked or not written.numel():
            return
        if all(torch.isfinite(m) for m in torch.aminmax(written)):
            return
        decoded = source()
        if decoded is None or decoded.numel() != written.numel() or not decoded.is_floating_point():
            return
        decoded = decoded.reshape(written.shape)
        over = torch.isinf(written) & torch.isfinite(decoded)
        if bool(over.any()):
            self.count += int(over.sum())
            self.largest = max(self.largest, float(decoded[over].abs().max()))

    def note(self) -> str | None:
        """The warning for the tensor (values past the dtype's range that the cast made Inf: written so,
        as transformers' cast makes them), else None."""
        if not self.count:
            return None
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"tensor {self.name!r} holds {self.count} value(s) past {dtype}'s range (|w| up to "
            f"{self.largest:.4g}), which the cast to {dtype} turns into Inf, written as such "
            "(transformers' cast does the same): the model computes Inf/NaN from it; use --dtype fp32 or bf16"
        )


def _nan_rows_note(name: str, value: object) -> str | None:
    """The warning for an int8 weight whose rows decode to NaN, else None: a row past float16's range
    when it was quantized, stored as bitsandbytes stores it (SCB = inf, zero codes; convert warns of it).
    Read from the SCB, not the decoded weight (no pass over it)."""
    from formats.int8 import Int8Tensor

    if not isinstance(value, Int8Tensor):
        return None
    rows = int((~torch.isfinite(value.scb)).sum())
    if not rows:
        return None
    return (
        f"tensor {name!r}: {rows} row(s) decode to NaN (SCB = inf: values past float16's range when it was "
        "quantized, stored as bitsandbytes stores them), written as such: the model computes NaN from it; "
        f"convert the source again with --skip {name.removesuffix('.weight')!r} to keep it unquantized"
    )


def _shape(value: QuantizedTensor | torch.Tensor, transposed: bool) -> tuple[int, ...]:
    shape = tuple(int(d) for d in value.shape)
    return (*shape[:-2], shape[-1], shape[-2]) if transposed else shape


def _refuse_if_the_disk_cannot_hold(out: Path, state: dict, dtype: torch.dtype) -> None:
    """Refuse, before the output is touched, a plain checkpoint the output's filesystem cannot hold, as
    convert's preflight does (it ran into the full disk part-way: exit 1, a folder left to resume). The
    size is a lower bound (every float tensor in ``dtype``; a float32-planned one is larger), counting
    the bytes an unfinished output already holds as free."""
    needed = sum(math.prod(_shape(v, False)) * _out_dtype(v, dtype).itemsize for v in state.values())
    free, where = disk_free(out)
    if out.is_dir():
        free += sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    if needed > free:
        msg = (
            f"{out}: the plain checkpoint needs at least {needed / 1e9:.2f} GB, {where} has "
            f"{free / 1e9:.2f} GB free; free some space or choose another output folder"
        )
        raise WontFitError(msg)


def dequantize_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "bfloat16",
    max_shard_size: str | int = "5GB",
    verify: bool = True,
    overwrite: bool = False,
    progress: Callable[[str], None] | bool | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    subfolder: str = "",
    warn: Callable[[str], None] | None = None,
) -> DequantizeResult:
    """Write ``output``: a plain safetensors checkpoint of the quantized folder (or Hub repo) ``source``.

    ``dtype`` ("bfloat16" / "bf16", "float16" / "fp16", "float32" / "fp32") is the dtype of every
    floating-point tensor written, but those transformers' dtype plan keeps in float32 for it (T5's ``wo``
    under float16), written in float32 as its ``save_pretrained`` writes them. ``output`` must be absent
    or empty unless ``overwrite`` (or hold an unfinished dequantize: a rerun after a kill or a full disk
    starts again there).
    ``progress`` is called with each tensor name as it is written (False or None: no calls, as
    ``convert(progress=False)``). A Hub repo id is fetched at ``revision`` (branch, tag or commit;
    default main) with ``token``, ``cache_dir``, ``force_download`` and ``local_files_only`` as
    ``load_quantized`` fetches it; ``subfolder``: the checkpoint is that folder of ``source``.
    ``warn`` is given each warning (a tensor whose finite values the cast to ``dtype`` made Inf; also in
    ``result.notes``); default: Python's ``warnings``.
    """
    forced_isa()  # a bad QM_CPU_ISA is named before any work, not as the decode kernel's ValueError
    if progress is False:
        progress = None
    if progress is not None and not callable(progress):
        msg = f"progress: a callable taking each tensor name, False or None, not {progress!r}"
        raise TypeError(msg)
    started = time.perf_counter()
    name = normalize_dtype(str(dtype).replace("torch.", ""), "--dtype")
    torch_dtype = dtype_from_name(name)
    limit = parse_size(max_shard_size)
    folder = resolve_folder(
        source,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        subfolder=subfolder,
        modules=True,
    )
    out = Path(output).expanduser()
    # (with overwrite a link as OUTPUT is replaced by a folder below: only the folders above count)
    dangling = dangling_link(out.parent if overwrite and out.is_symlink() else out)
    if dangling is not None:
        raise InputError(dangling)
    above = file_above(out)  # as convert refuses it (mkdir failed: exit 1, "Not a directory")
    if above is not None:
        raise InputError(above)
    if out.exists() and not out.is_dir() and not overwrite:
        msg = f"{out}: exists and is not a folder; choose another folder or pass --overwrite"
        raise OutputExistsError(msg)
    overlap = source_overlap(out, folder, remedy="write the plain checkpoint somewhere else")
    if overlap is not None:
        raise OutputExistsError(overlap)
    identity = {"source": _source_identity(folder), "dtype": name, "max_shard_size": limit}
    done = _finished(out, identity) if out.is_dir() and not overwrite else None
    if done is not None:
        return done
    holder = next(p for p in (out.resolve(), *out.resolve().parents) if p.exists())
    if read_only(holder):  # as convert's preflight refuses it (mkdir failed: exit 1, the OS's message)
        msg = f"{out}: {holder} is on a read-only filesystem; choose another output folder"
        raise InputError(msg)
    if out.is_dir() and not overwrite and not _restartable(out) and _damaged(out, identity) is None:
        change = _what_changed(out, identity)
        if change is not None:  # our finished output of other options: named, as convert names them
            msg = (
                f"{out}: holds a checkpoint dequantized with other options or from another source "
                f"({change}); choose another folder or pass --overwrite"
            )
        else:
            msg = f"{out}: exists and is not empty; choose another folder or pass --overwrite"
        raise OutputExistsError(msg)
    # The source (config and digests) is read before anything of the output is touched: a bad source
    # leaves an existing output as it was.
    config = read_config(folder)
    state = load_quantized_state(folder, verify=verify)
    _refuse_if_the_disk_cannot_hold(out, state, torch_dtype)
    linked_or_file = out.is_symlink() or (out.exists() and not out.is_dir())
    if linked_or_file and overwrite and (not out.is_dir() or any(out.iterdir())):
        out.unlink()  # a file, or a link to a full folder: the link goes, never what it points to
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out):  # a second run into the same folder is refused, not interleaved
        # Our finished output of the same source and options with a file deleted or resized since:
        # written again, keeping the files the user added (as convert does with its own output).
        ours = None if overwrite or _finished(out, identity) is not None else _damaged(out, identity)
        kept: set[str] = set()  # the user's files: neither removed nor recorded as the output's
        # Marks the folder as an unfinished dequantize until the very end: a rerun after a kill or a
        # full disk starts again in it instead of refusing a folder that is not empty.
        marker = json.dumps({"source": str(folder), "dtype": name}).encode()
        if ours is not None:
            atomic_write_bytes(out / UNFINISHED_NAME, marker)  # before any file of it is removed
            for file in [DONE_NAME, *sorted(ours)]:
                if (out / file).is_file() or (out / file).is_symlink():
                    (out / file).unlink()
            kept = {p.name for p in out.iterdir() if not p.name.startswith(".")}
        else:
            if any(out.iterdir()):
                if not overwrite and not _restartable(out):  # filled by another process meanwhile
                    msg = f"{out}: exists and is not empty; choose another folder or pass --overwrite"
                    raise OutputExistsError(msg)
                clear_folder(out)
            atomic_write_bytes(out / UNFINISHED_NAME, marker)
        if warn is None:
            import warnings

            def warn(note: str) -> None:
                warnings.warn(note, UserWarning, stacklevel=4)

        result = _write_plain(folder, out, state, config, name, torch_dtype, limit, progress, warn)
        files = {
            p.name: p.stat().st_size
            for p in sorted(out.iterdir())
            if not p.name.startswith(".") and p.name not in kept and p.is_file()
        }
        files |= {rel: (out / rel).stat().st_size for rel in _copied_files(folder) if "/" in rel}
        counts = {k: getattr(result, k) for k in _COUNTS}  # no timings: a rerun writes the same bytes
        done = {**identity, "files": files, "result": counts}
        atomic_write_bytes(out / DONE_NAME, (json.dumps(done, indent=2, sort_keys=True) + "\n").encode())
        (out / UNFINISHED_NAME).unlink()
    result.seconds = time.perf_counter() - started
    return result


_COUNTS = ("shards", "tensors_dequantized", "tensors_copied", "bytes_written")


def _source_identity(folder: Path) -> dict:
    """The quantized folder as a rerun compares it: its path and each file's (those of the module
    folders it copies too) size, mtime, safetensors header (sha256) and ``sample_digest`` (as convert
    identifies a local source: a shard re-made with other values of the same size and header, its
    mtime restored, is not the same input; a file no larger than the sampled windows is hashed whole)."""
    files = {}
    deeper = [folder / rel for rel in extra_files_in(folder) if "/" in rel]  # copied: 1_Pooling/config.json
    for p in [*sorted(folder.iterdir()), *deeper]:
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            header: list[str | None] = []
            if p.suffix == ".safetensors":
                try:
                    header = [hashlib.sha256(read_header(p, str(p))[0]).hexdigest()]
                except ConverterError:  # load_quantized_state names the damaged file
                    header = [None]
            rel = p.relative_to(folder).as_posix()
            files[rel] = [st.st_size, st.st_mtime_ns, *header, sample_digest(p, st.st_size)]
    return {"path": str(folder.resolve()), "files": files}


def _same_identity(done: dict, identity: dict) -> bool:
    """Whether the record ``done`` of a finished output was made with ``identity``. A record written
    before the input's files were identified by their header and sampled data too (size and mtime
    only) still counts as the same, as convert does with its older manifests."""
    recorded = {k: done.get(k) for k in identity}
    source = identity["source"]
    older = {**source, "files": {name: value[:2] for name, value in source["files"].items()}}
    return recorded in (identity, {**identity, "source": older})


def _what_changed(out: Path, identity: dict) -> str | None:
    """The first difference between the finished dequantize ``out`` holds and ``identity`` (``dtype:
    'float32' -> 'float16'``, the shard size, the source folder or one of its files), or None when
    ``out`` holds no record of a finished dequantize."""
    if (out / UNFINISHED_NAME).exists():
        return None
    try:
        done = json.loads((out / DONE_NAME).read_text(encoding="utf-8"))
        if not isinstance(done, dict):
            return None
        for key in ("dtype", "max_shard_size"):
            if done.get(key) != identity[key]:
                return f"{key}: {done.get(key)!r} -> {identity[key]!r}"
        before, now = done["source"], identity["source"]
        if before["path"] != now["path"]:
            return f"source: {before['path']} -> {now['path']}"
        return _source_files_changed(before["files"], now["files"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".safetensors.index.json"))


def _file_change(name: str, was: list | None, now: list | None) -> str | None:
    """How one source file differs from its record (``[size, mtime_ns, header sha256 (shards only),
    sampled-data digest]``; an older record: size and mtime only), in words, or None."""
    if was is None or now is None:
        return f"{name} ({'added' if was is None else 'removed'})"
    now = now[: len(was)]
    if was == now:
        return None
    fields = ["size", "modification time", "header", "sampled data"]
    if not name.endswith(".safetensors"):
        fields.remove("header")
    said = [f for f, a, b in zip(fields, was, now, strict=False) if a != b]
    if said == ["modification time"] and len(was) > 2:
        same = [f for f in fields[: len(was)] if f != "modification time"]
        said = [f"modification time only: same {', '.join(same[:-1])} and {same[-1]}"]
    return f"{name} ({', '.join(said)})"


def _source_files_changed(before: dict, now: dict) -> str | None:
    """The source files that differ from the record, weights first, saying whether the weights (the
    shards and their index) changed: a plain ``cp LICENSE`` into the source changes its mtime, and
    naming that file alone read as if the model had changed."""
    changes = [
        (n, c)
        for n in sorted(before.keys() | now.keys())
        if (c := _file_change(n, before.get(n), now.get(n)))
    ]
    if not changes:
        return None

    def listed(items: list[str]) -> str:
        more = f" and {len(items) - 3} more" if len(items) > 3 else ""
        return ", ".join(items[:3]) + more

    weights = [c for n, c in changes if _is_weights(n)]
    others = [c for n, c in changes if not _is_weights(n)]
    if weights:
        also = f"; files dequantize copies from it changed too: {listed(others)}" if others else ""
        return f"the source's weight files changed: {listed(weights)}{also}"
    return (
        f"the source's weight files did not change, but files dequantize copies from it did: {listed(others)}"
    )


def _done_record(out: Path, identity: dict) -> dict | None:
    """The record of the finished dequantize ``out`` holds, when it was made with ``identity`` (the
    same source, unchanged, dtype and shard size); else None (unfinished, another run's, unreadable)."""
    if (out / UNFINISHED_NAME).exists():
        return None
    try:
        done = json.loads((out / DONE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and _same_identity(done, identity) else None


def _finished(out: Path, identity: dict) -> DequantizeResult | None:
    """The result of that finished dequantize (``_done_record``) when all its files are still there
    with their sizes and none was modified after the record was written (checked as convert checks a
    finished folder: a file edited in place keeps its size, not its mtime); else None."""
    done = _done_record(out, identity)
    try:
        if done is None:
            return None
        written = (out / DONE_NAME).stat().st_mtime_ns
        for file, size in done["files"].items():
            st = (out / file).stat()
            if st.st_size != size or st.st_mtime_ns > written:
                return None
        counts = {k: done["result"][k] for k in _COUNTS}
        return DequantizeResult(out, identity["dtype"], **counts, up_to_date=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _damaged(out: Path, identity: dict) -> set[str] | None:
    """The files that finished dequantize (``_done_record``) holds, whatever happened to them since;
    else None. Only names inside ``out``, at most one folder down: a record edited to name a path
    elsewhere removes nothing there."""
    done = _done_record(out, identity)
    try:
        return None if done is None else {f for f in done["files"] if isinstance(f, str) and _inside(f)}
    except (TypeError, KeyError, AttributeError):
        return None


def _inside(name: str) -> bool:
    """Whether the recorded ``name`` is a file of the output itself or of one of its folders."""
    parts = name.split("/")
    return len(parts) <= 2 and all(part not in ("", ".", "..") and part == Path(part).name for part in parts)


def _write_plain(
    folder: Path,
    out: Path,
    state: dict,
    config: dict | None,
    name: str,
    torch_dtype: torch.dtype,
    limit: int,
    progress: Callable[[str], None] | None,
    warn: Callable[[str], None],
) -> DequantizeResult:
    """The shards, the other files, config.json and (several shards) the index, in that order."""
    state = _fuse_llama4(state, config)  # Llama 4: per-expert weights back into its fused experts
    state = _fuse_gpt_oss(state)  # gpt-oss: unsloth's per-expert records back into its fused experts
    meta_model = functools.cache(lambda: _meta_model(folder))  # built once, and only when needed
    facts = functools.cache(lambda: _table_facts(config, state))
    transposed = _transposed_weights(folder, state, meta_model, facts)
    dtypes = _out_dtypes(state, torch_dtype, meta_model, facts)
    groups = _plan(state, dtypes, limit)
    names = shard_names(len(groups))
    result = DequantizeResult(out, name)
    weight_map: dict[str, str] = {}
    for shard_name, group in zip(names, groups, strict=True):
        slots = [TensorSlot(k, DTYPE_CODES[dtypes[k]], _shape(state[k], k in transposed)) for k in group]
        with ShardWriter(out / shard_name, slots, {}) as writer:
            for k in group:
                # block by block for a tensor of 3+ dimensions (fused experts): one block in memory
                overflow, offset, streamed = _Overflow(k, state[k], dtypes[k]), 0, _streamed(state[k])
                for written, source in _parts(state[k], dtypes[k], k in transposed, k):
                    if streamed:
                        writer.write_part(k, offset, written)
                        offset += written.numel() * written.element_size()
                    else:  # the one part: the whole tensor
                        writer.write(k, written)
                    overflow.add(written, source)
                    del written, source
                for note in (overflow.note(), _nan_rows_note(k, state[k])):
                    if note is not None:
                        result.notes.append(note)
                        warn(note)
                if not isinstance(state[k], torch.Tensor):
                    result.tensors_dequantized += 1
                else:
                    result.tensors_copied += 1
                weight_map[k] = shard_name
                if progress is not None:
                    progress(k)
        result.bytes_written += (out / shard_name).stat().st_size
        result.shards.append(shard_name)

    for rel in _copied_files(folder):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        with writing_to(out / rel) as tmp:  # never a half-copied file under its name
            shutil.copy2(folder / rel, tmp)
    if config is not None:
        config = {k: v for k, v in config.items() if k != "quantization_config"}
        config["dtype"] = name
        config["torch_dtype"] = name
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(out / "config.json", text.encode())
    if len(names) > 1:
        total = sum(
            math.prod(v.shape) * torch.empty(0, dtype=dtypes[k]).element_size() for k, v in state.items()
        )
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_bytes(out / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    return result


def _copied_files(folder: Path) -> list[str]:
    """The files of the quantized ``folder`` copied as they are (relative, '/'-separated): every visible
    top-level file but the weights, config, index and report, and the files of the folders ``convert``
    copies (sentence-transformers modules: ``1_Pooling/config.json``)."""
    top = [
        p.name
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in _NOT_COPIED and not p.name.endswith(".safetensors")
    ]
    deeper = [r for r in extra_files_in(folder) if "/" in r]
    return [n for n in top if not n.startswith(".")] + deeper


def _restartable(out: Path) -> bool:
    """Whether ``out`` is empty or an unfinished dequantize (our marker is in it, or only the marker's
    temp file: killed before its rename): a rerun starts again."""
    return (
        all(is_temp_file(p.name, UNFINISHED_NAME) for p in out.iterdir()) or (out / UNFINISHED_NAME).is_file()
    )
