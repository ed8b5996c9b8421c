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
- memory: this process now, plus the largest per-tensor working set: a cast or transposed copy of
  the input (inputs are memory-mapped: file-backed pages, not counted otherwise), the packed codes,
  absmax and nested absmax, and the absmax the quality check decodes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from converter.errors import InputError
from converter.sources.base import DTYPE_SIZES
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


def working_set(p: Any, options: Any) -> int:
    """Anonymous bytes alive while tensor ``p`` (converter.plan.tensor_plan.PlannedTensor) is processed
    with ``options`` (converter.plan.tensor_plan.Options): its cast or transposed copy, and the
    quantizer's output (the method's: LLM.int8 holds a byte per element, 4-bit half a byte)."""
    info = p.info
    cast = p.out_dtype != info.dtype
    copy = info.numel * DTYPE_SIZES.get(p.out_dtype, 4) if (cast or p.transpose) else 0
    if not p.quantize:
        return copy
    return copy + options.method.working_set(info.numel, tuple(p.out_shape), options)


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


def preflight_of(plan: Any, src: Any, output: Path, fingerprint: str, *, overwrite: bool) -> Preflight:
    """The preflight of ``plan`` (converter.plan.tensor_plan.Plan) converting ``src`` into ``output``."""
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
    peak = process_rss() + max((working_set(p, opts) for p in plan.tensors), default=0)
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
            f"{label}: the conversion needs about {human_bytes(peak)} of memory (the largest tensor's "
            f"working set) but {human_bytes(available)} is available; close other programs or use a "
            "machine with more memory"
        )
    return report
