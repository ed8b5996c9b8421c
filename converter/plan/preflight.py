"""Preflight of a conversion: what every tensor becomes and what the run needs, before any write.

Built from the plan alone (headers, no tensor data): each tensor's fate and reason, the output size
and bits per parameter, the peak memory and the disk the run needs, against what this machine has.
``convert --dry-run`` prints it; every real run checks it first and refuses, before creating or
touching the output folder, a run that clearly cannot fit (more disk needed than free, or a working
set larger than the memory available).

Estimates (upper bounds, so a refusal is never a false alarm from rounding):
- disk: the planned shard sizes (payload + tables + a quant-state allowance per tensor + a header
  allowance), less the
  shards a resumed run keeps; an --overwrite frees the folder's current content. Hub downloads are
  checked by the Hub source itself (converter/sources/hub.py) when it opens.
- memory: this process now, plus the conversion's anonymous working set (``working_set_bound``),
  the larger of two moments. While a tensor is quantized: its cast or transposed copy of the input
  (inputs are memory-mapped: file-backed pages, reclaimable, not counted), the cast's temporaries
  (torch's Inf checks: up to three bool masks of its size), its quantized output, and the outputs of the
  ``MAX_PENDING`` tensors before it that the quality meter (converter/record/quality.py) still holds
  while it measures them on its thread: the ``MAX_PENDING + 1`` largest outputs of the plan. While a
  shard is closed: those pending outputs, the last tensor's input copy, and the shard's hash buffers
  (``hash_file``: ``threads + 1`` chunks of ``CHUNK_BYTES``, at most the shard's size). Plus a fixed
  allowance for the run's threads and small objects, and torch's import when a float cast (or the
  quantizer) needs it. With ``--device cuda``, the method's ``device_footprint``: the 4-bit quantizer's
  pinned staging buffers (``converter.quantize.cuda_host.pinned_bytes``) for the whole run, and the
  tensor it keeps submitted beside the one read (one more input copy and output).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from converter.errors import InputError
from converter.sources.base import DTYPE_SIZES, FLOAT_DTYPES
from converter.units import human_bytes


class WontFitError(InputError):
    """The run needs more disk or memory than this machine has (refused before writing anything)."""


@dataclass
class Preflight:
    source: str
    output: str
    fingerprint: str
    tensors: list[dict[str, Any]]
    params_quantized: int
    params_kept: int
    bytes_in: int
    bytes_out: int
    disk_needed: int
    disk_free: int
    disk_path: str
    peak_ram: int
    ram_available: int | None
    download_bytes: int = 0
    up_to_date: bool = False  # the output folder already holds this exact conversion
    #: the output holds this conversion's shards, all reused, but these other files a run rewrites
    #: (config.json, the index, copied tokenizer / licence files changed in the source or edited in the
    #: output): the run "refreshes" the folder (ConversionResult.refreshed); empty otherwise
    refresh: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: dry runs: why a run would refuse the output folder (foreign files, another conversion), or None
    refused: str | None = None
    #: dry runs of MoE checkpoints: converter.plan.moe.MoeSummary (experts quantized or kept, loaders)
    moe: Any = None

    @property
    def bits_per_param(self) -> float:
        """Stored bits per parameter (tensor data, as convert's summary and ``inspect`` count it; the
        shard headers, in ``bytes_out``, are left out)."""
        total = self.params_quantized + self.params_kept
        stored = sum(t["bytes_out"] for t in self.tensors)
        return 8 * stored / total if total else 0.0

    @property
    def fits(self) -> bool:
        return not self.problems

    def refuse_if_cannot_fit(self) -> None:
        if self.problems:
            raise WontFitError(self.problems[0])

    def to_json(self) -> dict[str, Any]:
        moe = self.moe.to_json() if self.moe is not None else None
        return {**asdict(self), "moe": moe, "bits_per_param": self.bits_per_param, "fits": self.fits}


def disk_free(path: Path) -> tuple[int, Path]:
    """Free bytes on the filesystem that will hold ``path`` (its first existing ancestor)."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free, p


def read_only(path: Path) -> bool:
    """Whether ``path`` is on a filesystem mounted read-only. Its free space was reported and the
    preflight said the run fits; the run then failed creating the folder (OSError, exit 1)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): the run says it
        return False


def ram_available() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def process_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


#: Elements of a cast's source ``converter.writer.pipeline._isfinite`` checks at a time.
ISFINITE_CHUNK = 1 << 20
#: Chunks ``formats.chunks.hash_file`` holds at once while it hashes a closed shard (its ``threads + 1``).
HASH_CHUNKS_HELD = 3
#: What the run allocates beside its tensors: the threads it starts (kernel pool, quality meter, hashers:
#: stacks and allocator arenas), Python objects, the shard headers and quant-state records.
RUN_OVERHEAD = 8 << 20
#: A --dtype cast imports torch (the CPU path does not otherwise): its anonymous memory once imported
#: (about 125 MiB measured with torch 2.x on Linux), when this process has not imported it yet.
TORCH_IMPORT = 160 << 20


def cast_copy(p: Any, options: Any) -> tuple[int, int]:
    """(bytes of the anonymous copy of tensor ``p``'s input, bytes of the cast's temporaries). A copy
    exists when the input is cast or transposed; LLM.int8 rounds a float16 ``--dtype`` cast itself: no
    copy then. A float cast (torch: converter.writer.pipeline's ``_cast_input`` / ``_cast_kept``) checks
    its result for Inf: ``isinf(y)`` is ``|y| == inf`` (a copy of ``|y|`` and a bool mask). A cast that
    overflows also makes ``isfinite(source)`` beside that mask (its own mask, and ``|source|`` and three
    masks of a chunk); the larger of the two is counted."""
    info = p.info
    # a cast the kernel does itself makes no copy (converter.writer.pipeline._input_dtype)
    to = options.method.kernel_input_dtype(info.dtype, p.out_dtype) if p.quantize else p.out_dtype
    cast = to != info.dtype
    copy = info.numel * DTYPE_SIZES.get(to, 4) if (cast or p.transpose) else 0
    temps = 0
    if cast and to in FLOAT_DTYPES and info.dtype in FLOAT_DTYPES:
        # isinf(y): |y| and a mask; on an overflow, the mask kept beside isfinite(source)'s own mask
        # (converter.writer.pipeline._isfinite: its |source| and masks a chunk at a time)
        temps = (DTYPE_SIZES[to] + 1) * info.numel
        chunk = min(info.numel, ISFINITE_CHUNK) * (DTYPE_SIZES[info.dtype] + 3)
        temps = max(temps, 2 * info.numel + chunk)
    return copy, temps


def output_bytes(p: Any, options: Any) -> int:
    """Bytes of tensor ``p``'s quantized output (0 for a kept tensor)."""
    if not p.quantize:
        return 0
    return options.method.working_set(p.info.numel, tuple(p.out_shape), options)


def working_set_bound(plan: Any, device: str = "cpu") -> int:
    """Upper bound of the anonymous bytes a conversion of ``plan`` adds to the process (the preflight's
    peak memory less the process now): the larger of a tensor being quantized or kept (its copy, the
    cast's temporaries, its output) beside the outputs the quality meter still holds, and a shard being
    hashed as it closes beside those outputs. The meter measures on its own thread and keeps the
    outputs of up to ``MAX_PENDING`` earlier tensors until measured: bounded by the largest outputs of
    the plan (the tensor's own among them). On a GPU (``device``, as the conversion runs on it) the
    method's quantizer adds its ``device_footprint``: pinned staging held for the whole run, and the
    other tensors it keeps submitted (their input copies and outputs) while one is read."""
    from converter.record.quality import QualityMeter
    from formats.chunks import CHUNK_BYTES

    opts = plan.options
    footprint = opts.method.device_footprint(opts, device)
    pending = QualityMeter.MAX_PENDING
    outputs = sorted((output_bytes(p, opts) for p in plan.tensors), reverse=True)
    held = sum(outputs[:pending])  # earlier tensors' outputs the meter holds
    copies = [cast_copy(p, opts) for p in plan.tensors]
    # the tensor read (its copy and the cast's temporaries) beside the input copies of the others in
    # flight: the largest copies of other tensors
    others = footprint.in_flight - 1
    largest = sorted(range(len(copies)), key=lambda i: copies[i][0], reverse=True)[: others + 1]
    tensor = max(
        (
            copy + temps + sum(copies[j][0] for j in [j for j in largest if j != i][:others])
            for i, (copy, temps) in enumerate(copies)
        ),
        default=0,
    )
    # the outputs of the tensors in flight and of those the meter holds
    quantizing = tensor + held + sum(outputs[pending : pending + footprint.in_flight])
    # a shard closes before the meter has measured its last tensors: their outputs, and the last
    # one's input copy, are alive while the shard is hashed (the quantizer has none in flight)
    last_copy = max((copy for copy, _ in copies), default=0)
    chunks = HASH_CHUNKS_HELD * CHUNK_BYTES
    hashing = max((min(s.nbytes + header_bytes(s), chunks) for s in plan.shards), default=0)
    imports_torch = footprint.imports_torch or any(t for _, t in copies)
    torch = TORCH_IMPORT if "torch" not in sys.modules and imports_torch else 0
    return RUN_OVERHEAD + torch + footprint.pinned + max(quantizing, held + last_copy + hashing)


def header_bytes(shard: Any) -> int:
    """An upper bound of a shard's safetensors header: per key its JSON entry (name, dtype, shape,
    offsets: name + ~120 bytes; a quantized weight has up to 7 keys) and its per-tensor metadata
    record (~300 bytes), plus the provenance and format records (4 kB)."""
    total = 4096
    for t in shard.tensors:
        keys = 7 if t.quantize else 1
        total += keys * (len(t.name) + 40 + 120) + 300
    return total


def _existing_bytes(output: Path) -> int:
    if not output.is_dir():
        return 0
    return sum(f.stat().st_size for f in output.rglob("*") if f.is_file() and not f.is_symlink())


def preflight_of(
    plan: Any, src: Any, output: Path, fingerprint: str, *, overwrite: bool, device: str = "cpu"
) -> Preflight:
    """The preflight of ``plan`` (converter.plan.tensor_plan.Plan) converting ``src`` into ``output``
    on ``device`` (as ``pipeline.resolve_device`` gives it: "cpu" when a GPU was asked for but cannot
    be used)."""
    from converter.version import tool_version
    from converter.writer.manifest import Manifest, same_plan
    from converter.writer.outputs import changed_files
    from formats.writer import temp_path

    opts = plan.options
    reusable = 0
    replaced = 0  # bytes of stale shard files (and their temp files) a resumed run deletes first
    up_to_date = False
    refresh: list[str] = []
    manifest = None if overwrite else Manifest.load(output)
    plan_json = plan.to_json(tool_version()) if manifest is not None else {}
    if manifest is not None and same_plan(manifest, fingerprint, plan_json):
        for name, info in manifest.shards.items():
            f = output / name
            if f.is_file() and f.stat().st_size == info.get("size"):
                reusable += int(info["size"])
        # A shard renamed into place whose manifest entry was never saved (a full disk while saving the
        # manifest, a kill between the two) is deleted and written again: its bytes are free for the run.
        for shard in plan.shards:
            f = output / shard.name
            info = manifest.shards.get(shard.name) or {}
            for p in (f, temp_path(f)):
                if (
                    p.is_file()
                    and not p.is_symlink()
                    and not (p == f and p.stat().st_size == info.get("size"))
                ):
                    replaced += p.stat().st_size
        up_to_date = manifest.state == "complete" and reusable == sum(
            int(i.get("size", -1)) for i in manifest.shards.values()
        )
        if up_to_date:  # a run rewrites config.json and the copied files that changed in the source
            refresh = changed_files(src, plan, output)
            up_to_date = not refresh
    bytes_out = sum(s.nbytes + header_bytes(s) for s in plan.shards)
    needed = 0 if up_to_date or refresh else max(0, bytes_out - reusable)
    free, where = disk_free(output)
    if overwrite:
        free += _existing_bytes(output)
    else:
        free += replaced
    peak = process_rss() + working_set_bound(plan, device)
    available = ram_available()
    download = sum(getattr(src, "download_plan", dict)().values()) if hasattr(src, "download_plan") else 0
    tensors = [
        {
            "name": t.name,
            "shard": s.name,
            "shape": list(t.info.shape),
            "dtype": t.info.dtype,
            "action": "quantize" if t.quantize else "keep",
            "reason": t.reason if not t.quantize else opts.method.plan_label(opts),
            "out_dtype": t.out_dtype,
            "bytes_out": t.out_nbytes,
        }
        for s in plan.shards
        for t in s.tensors
    ]
    label = str(plan.source_identity.get("path") or plan.source_identity.get("repo_id") or "source")
    report = Preflight(
        source=label,
        output=str(output),
        fingerprint=fingerprint,
        tensors=tensors,
        params_quantized=sum(t.info.numel for t in plan.quantized),
        params_kept=sum(t.info.numel for t in plan.kept),
        bytes_in=sum(t.info.nbytes for t in plan.tensors),
        bytes_out=bytes_out,
        disk_needed=needed,
        disk_free=free,
        disk_path=str(where),
        peak_ram=peak,
        ram_available=available,
        download_bytes=download,
        up_to_date=up_to_date,
        refresh=refresh,
    )
    if not up_to_date and read_only(where):
        msg = f"{output}: {where} is on a read-only filesystem; choose another output folder"
        report.problems.append(msg)
    elif needed > free:
        report.problems.append(
            f"{output}: the conversion needs {human_bytes(needed)} of disk for its shards but {where} has "
            f"{human_bytes(free)} free; free some space or choose another output folder"
        )
    if available is not None and peak > available:
        report.problems.append(
            f"{label}: the conversion needs about {human_bytes(peak)} of memory (this process and the "
            f"conversion's working set) but {human_bytes(available)} is available; close other programs "
            "or use a machine with more memory"
        )
    return report
