"""convert(): plan -> stream tensors through a quantizer -> shards -> index -> config.

Tensors are memory-mapped from their source files (file-backed pages), cast if asked, and written
into their planned slots by a streaming ShardWriter in plan order. Within a shard the tensors to
quantize are streamed through a ``converter.quantize.host_quantizer`` quantizer (``quantize_many``): on the
CPU
it quantizes each one as it is read (one tensor in memory at a time); with ``--device cuda``
(``converter.quantize.cuda_host``) the GPU quantizes the next tensor while the current one is written (at most
``depth`` = 2 in flight). Results come back in order, so kept (unquantized) tensors interleaved in
the plan are written when their turn comes and the bytes do not depend on the device.
Shards land under temp names and are renamed when complete; the manifest records each finished
shard's sha256 so a killed run resumes where it stopped; extra files, the report, the index and
config.json are written last, and the manifest is marked complete after them (converter/writer/manifest.py
has the re-run rules).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConversionFailedError, InputError, NonFiniteTensorError, OutputExistsError
from converter.kernels import MAX_THREADS, threads_beyond_limit
from converter.kernels.bnb4bit_np import NonFiniteInputError
from converter.kernels.isa_env import forced_isa
from converter.plan import moe
from converter.plan.preflight import ISFINITE_CHUNK
from converter.plan.selection import select_tensors
from converter.plan.selection_facts import unmatched_globs
from converter.plan.tensor_plan import (
    DTYPE_CODES,
    Options,
    Plan,
    PlannedTensor,
    ShardPlan,
    build_plan,
    load_dtype,
    normalize_dtype,
    parse_size,
)
from converter.quantize.cuda_host import CudaHostQuantizer
from converter.quantize.host_quantizer import HostQuantizer, HostResult
from converter.record.quality import QualityMeter
from converter.sources import Source, TensorInfo, open_source
from converter.sources.base import CODE_NAMES
from converter.sources.local import older_identity
from converter.sources.mapped import MappedFile
from converter.version import tool_version
from converter.writer.manifest import (
    MANIFEST_NAME,
    Action,
    FolderLock,
    Manifest,
    atomic_write_bytes,
    dangling_link,
    decide,
    file_above,
    not_a_folder,
    same_plan,
    shard_chunks_json,
    shard_info,
    source_overlap,
    temp_files,
    would_refuse,
    writing_to,
)
from converter.writer.outputs import (
    changed_files,
    config_bytes,
    copied_file,
    gone_files,
    provenance_of,
    recorded_files,
    weight_map_of,
)
from converter.writer.report import REPORT_NAME, ConversionResult, build_report, make_result
from formats import index, metadata
from formats.quant_types import BLOCKSIZES
from formats.writer import ShardWriter, TensorSlot, temp_path

#: Called after each tensor with (tensor name, input bytes done); the CLI drives its progress bar.
ProgressHook = Callable[[str, int], None]


def resolve_device(device: str) -> tuple[str, str | None]:
    """The device a conversion runs on, and a note when ``cuda`` was asked for but cannot be used.

    Without a usable CUDA backend (no CUDA build, no GPU, a driver too old) the conversion falls back
    to the CPU kernels, which write the same bytes; the note says why.
    """
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        msg = f"--device {device!r} is not supported: use cpu or cuda"
        raise InputError(msg)
    if device == "cpu":
        return device, None
    from converter.quantize import cuda_host  # torch-free: the extension answers

    usable, why = cuda_host.cuda_status()
    if not usable:
        return "cpu", f"--device {device}: no usable CUDA backend, {why}; converting on the CPU (same bytes)"
    try:
        cuda_host.warm_up(cuda_host.device_index(device))  # the CUDA context, while planning runs
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return device, None


def _patterns(value: str | Sequence[str] | None, option: str = "skip") -> tuple[str, ...]:
    """``skip`` / ``include``: one glob as a string, or several (a bare string is not split into letters);
    None is none."""
    if value is None:
        return ()
    globs = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Iterable) else None
    if globs is None or not all(isinstance(g, str) for g in globs):
        msg = f"{option}={value!r}: give glob strings ('*.down_proj') or a list of them"
        raise InputError(msg)
    return globs


def _check_python_types(**options: object) -> None:
    """convert()'s options as Python gives them, checked as the CLI's parser checks its own: a truthy
    string (double_quant='no') or a truncated float (blocksize=64.5) changed the bytes without a word,
    and None or a number where a string goes raised TypeError / AttributeError."""
    for name in (
        "double_quant",
        "overwrite",
        "keep_downloads",
        "allow_pickle",
        "private",
        "dry_run",
        "preflight",
    ):
        value = options[name]
        if isinstance(value, str) or value not in (True, False):
            msg = f"{name}={value!r}: pass True or False"
            raise InputError(msg)
    blocksize = options["blocksize"]
    if isinstance(blocksize, bool) or not (
        isinstance(blocksize, numbers.Integral)
        or (isinstance(blocksize, numbers.Real) and float(blocksize).is_integer())
        or (isinstance(blocksize, str) and blocksize.strip().isdigit())
    ):
        msg = f"blocksize {blocksize!r} is not supported: expected one of {', '.join(map(str, BLOCKSIZES))}"
        raise InputError(msg)
    for name in ("quant_type", "device", "int8_scale", "quant_storage", "moe_experts"):
        value = options[name]
        if not isinstance(value, str):
            flag = "--" + name.replace("_", "-")
            label = name if name == "quant_type" else flag
            msg = f"{label} {value!r} is not supported: pass a string, as the CLI's {flag}"
            raise InputError(msg)
    size = options["max_shard_size"]
    if isinstance(size, bool) or not isinstance(size, numbers.Integral | str):
        msg = f"invalid size {size!r}: use a number of bytes or a string with a unit, e.g. '5GB' or '2GiB'"
        raise InputError(msg)


def _no_config(src: Source) -> str:
    """Why a source without config.json cannot be converted, naming it ("the source has no config.json"
    named no path); a PEFT adapter folder (adapter_model.safetensors) is said to be one, as the advice
    to add the model's config.json does not apply to it."""
    root = getattr(src, "root", None)  # a local source's folder
    label = str(root) if root is not None else str(src.describe().get("repo_id") or "the source")
    if "adapter_model.safetensors" in src.weight_files():
        base = None
        try:
            base = json.loads((Path(root) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        of = f" ({base})" if isinstance(base, str) and base else ""
        return (
            f"{label}: a PEFT adapter (adapter_config.json), not a model: convert its base model{of} and "
            "load the adapter on the loaded model (PeftModel.from_pretrained)"
        )
    return (
        f"{label}: no config.json, so the layers transformers would quantize cannot be known; add the "
        "model's config.json, or name the weights to quantize with --include globs"
    )


def convert(
    source: str | Path | Source,
    output: str | Path,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: str | None = None,
    dtype: str | None = None,
    quant_storage: str = "uint8",
    int8_threshold: float = 6.0,
    int8_scale: str = "cpu",
    skip: str | Sequence[str] = (),
    include: str | Sequence[str] = (),
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    revision: str | None = None,
    keep_downloads: bool = False,
    allow_pickle: bool = False,
    push_to: str | None = None,
    private: bool = False,
    progress: bool | ProgressHook = True,
    dry_run: bool = False,
    preflight: bool = True,
    moe_experts: str = "keep",
    warn: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Convert ``source`` (local path, Hub repo id or an open Source) into a quantized folder ``output``.

    Raises converter.errors exceptions (InputError subclasses for bad input, exit code 2;
    ConversionFailedError when writing fails, exit code 1). ``progress`` True shows a rich progress
    bar on stderr; a callable receives (tensor name, input bytes done) instead.
    ``dry_run`` plans only and writes nothing: the result's ``preflight`` (converter.plan.preflight) says
    what each tensor becomes and what the run needs; ``preflight`` refuses, before writing anything, a
    run whose output cannot fit on the disk.
    ``moe_experts`` "keep" leaves routed MoE experts 16-bit (stock transformers loads the folder),
    "quantize" writes them as per-expert 4-bit records (converter/plan/moe.py). ``warn`` receives advice
    printed before the work starts (default: Python warnings).
    """
    forced_isa()  # a bad QM_CPU_ISA is refused before the source is opened or the output created
    for name, value in (("source", source), ("output", output)):
        if isinstance(value, str) and value == "":  # Path("") is the current folder: never meant
            msg = f"{name}='': an empty path; give the {name} folder ('.' for the current folder)"
            raise InputError(msg)
    if private is True and not push_to:  # it would do nothing: refused, as --revision with a local path
        msg = (
            "--private makes the --push-to repo private, but nothing is pushed: add --push-to REPO_ID, "
            "or leave it out"
        )
        raise InputError(msg)
    if push_to is not None:  # "" too: `--push-to "$REPO"` with REPO unset converted and pushed nothing
        from converter.tools.push import check_online, check_repo_id, check_token

        check_repo_id(push_to)  # before the conversion, not after it
        if not dry_run:
            check_online(push_to)
            check_token(push_to)
    started = time.perf_counter()
    _check_python_types(
        double_quant=double_quant,
        overwrite=overwrite,
        keep_downloads=keep_downloads,
        allow_pickle=allow_pickle,
        private=private,
        dry_run=dry_run,
        preflight=preflight,
        blocksize=blocksize,
        quant_type=quant_type,
        device=device,
        int8_scale=int8_scale,
        quant_storage=quant_storage,
        moe_experts=moe_experts,
        max_shard_size=max_shard_size,
    )
    shard_size = max_shard_size if isinstance(max_shard_size, str) else int(max_shard_size)  # numpy ints
    try:
        options = Options(
            quant_type=quant_type.lower(),
            blocksize=int(float(blocksize)),
            double_quant=bool(double_quant),
            compute_dtype=normalize_dtype(compute_dtype, "--compute-dtype"),
            dtype=normalize_dtype(dtype, "--dtype"),
            quant_storage=quant_storage,
            skip=_patterns(skip, "skip"),
            include=_patterns(include, "include"),
            max_shard_size=parse_size(shard_size),
            int8_threshold=int8_threshold,
            int8_scale=int8_scale,
            moe_experts=str(moe_experts).lower(),
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        msg = f"threads={threads!r}: give a positive number of threads, or None for every core"
        raise InputError(msg)
    if threads is not None and threads > MAX_THREADS:  # the kernels' pool would run MAX_THREADS silently
        msg = f"threads={threads}: {threads_beyond_limit(threads)}, or None for every core"
        raise InputError(msg)
    device, fallback_note = resolve_device(device)

    output = Path(output).expanduser()
    dangling = dangling_link(output)
    if dangling is not None:
        raise InputError(dangling)
    above = file_above(output)  # an output file itself is refused by the manifest
    if above is not None:
        raise InputError(above)
    if output.exists() and not output.is_dir() and not overwrite and not dry_run:  # before the plan's
        raise OutputExistsError(not_a_folder(output))  # warnings (a dry run reports the plan and the refusal)
    local = Path(source).expanduser() if isinstance(source, str | Path) else None
    if local is not None and local.exists():  # refused before the source is read (a Hub id: not here)
        overlap = source_overlap(output, local, remedy="choose another output folder")
        if overlap is not None:
            raise OutputExistsError(overlap)
    src = (
        source
        if isinstance(source, Source)
        else open_source(
            source,
            revision=revision,
            keep_downloads=keep_downloads,
            allow_pickle=allow_pickle,
            output_dir=output,  # Hub only: the disk check covers the output; downloads go beside it
            stream_large=True,  # Hub only: a file larger than the free disk is read by HTTP range
        )
    )
    try:
        src = _wrap_fp8(src)  # FP8 with block scales: dequantized to bf16 on read
        src = _wrap_llama4(src)  # Llama 4's fused experts: per-expert weights, as transformers loads them
        if options.moe_experts == "quantize":  # gpt-oss's fused experts: unsloth's per-expert records
            src = _wrap_gpt_oss(src, options)
        conversion = _Conversion(src, output, options, threads=threads, device=device, started=started)
        conversion.dry_run, conversion.check_fit = dry_run, preflight
        conversion.warn = warn
        result = conversion.run(overwrite=overwrite, progress=progress)
    finally:
        src.close()
    if fallback_note:
        result.notes.append(fallback_note)
    if push_to and not dry_run:
        from converter.tools.push import push_folder

        result.pushed_to = push_folder(output, push_to, private=private)
    return result


@dataclass
class _Stats:
    bytes_in: int = 0
    seconds_read: float = 0.0
    seconds_quantize: float = 0.0
    seconds_write: float = 0.0
    shards_written: list[str] = field(default_factory=list)
    #: --device cuda: the GPU quantizer's split (staging, PCIe up/down, kernels, host waits), seconds.
    device: dict[str, Any] = field(default_factory=dict)


Quantizer = HostQuantizer | CudaHostQuantizer


def new_quantizer(options: Options, device: str, threads: int | None) -> Quantizer:
    """The quantizer a conversion streams its tensors through (``device`` as resolve_device gives it)."""
    return options.method.quantizer(options, device, threads)


class _Conversion:
    def __init__(
        self, src: Source, output: Path, options: Options, *, threads: int | None, device: str, started: float
    ) -> None:
        self.src, self.output, self.options = src, output, options
        self.threads, self.device, self.started = threads, device, started
        self.stats = _Stats()
        self.notes: list[str] = []
        self.dry_run, self.check_fit = False, True
        self.quality: QualityMeter | None = None
        self.warn: Callable[[str], None] | None = None
        self.keep_others = False  # resuming a finished folder: leave files a run does not write
        self.refreshed = False  # a finished folder whose other files changed in the source (run())
        #: tensors whose --dtype cast turned finite values into Inf: name -> (target code, largest |w|)
        self.cast_overflow: dict[str, tuple[str, float]] = {}

    def _tell(self, note: str) -> None:
        """Say ``note`` now (the CLI's warning printer, else Python's warnings) and keep it for the result."""
        if self.warn is not None:
            self.warn(note)
        else:
            import warnings

            warnings.warn(note, UserWarning, stacklevel=3)  # the frame that calls the caller, as before
        self.notes.append(note)

    def _tell_unlisted_shards(self) -> None:
        """A finished folder keeps what else it holds, but a ``*.safetensors`` file its index does not
        list (an older conversion's shard left by a copy over the folder) is read by loaders that glob
        ``*.safetensors`` (vLLM) beside the index's shards; ``verify`` reports it and ``push`` refuses
        the folder: a rerun that said "nothing to do" about it passed the folder in CI."""
        listed = {s.name for s in self.plan.shards}
        stray = sorted(p.name for p in self.output.glob("*.safetensors") if p.name not in listed)
        if stray:
            self._tell(
                f"{self.output}: {', '.join(stray)}: not a shard of this conversion (its index does not list "
                "it; loaders that glob *.safetensors would read it, verify reports it and push refuses the "
                "folder); remove it"
            )

    # --- the whole run ---------------------------------------------------------------------
    def run(self, *, overwrite: bool, progress: bool | ProgressHook) -> ConversionResult:
        src, options = self.src, self.options
        config = src.config()
        tensors = src.tensors()
        for note in src.notes():  # e.g. an index transformers ignores (sources/base.py)
            self._tell(note)
        if not self.dry_run and (overwrite or not (self.output / MANIFEST_NAME).exists()):
            # A fresh run needs every file: let a Hub source start downloading during planning.
            self._announce_needed(src.weight_files())
        for option, globs in (("--skip", options.skip), ("--include", options.include)):
            # fnmatch on whole names: '--skip down_proj' (as llm_int8_skip_modules is written) kept
            # nothing and said nothing
            for glob, example, better in unmatched_globs(globs, [t.name for t in tensors]):
                does = "keeps nothing 16-bit" if option == "--skip" else "selects nothing"
                hint = f"; did you mean {better!r}?" if better else ""
                self._tell(
                    f"{option} {glob!r} matches no tensor or module of the checkpoint, so it {does}: globs "
                    f"match whole dotted names such as {example!r}{hint}"
                )
        if config is None and not options.include:  # select_tensors' refusal, naming the source
            raise InputError(_no_config(src))
        # float64 weights are judged as cast to --dtype, else to the dtype transformers loads the model in
        # (a float64 q_proj beside bf16 ones is cast and quantized by transformers + bitsandbytes)
        cast = options.dtype or load_dtype(config, tensors)
        selection = select_tensors(
            config,
            tensors,
            skip=options.skip,
            include=options.include,
            cast_to=DTYPE_CODES[cast] if cast else None,
        )
        moe.check_experts(tensors, config, options.moe_experts)
        selection = moe.apply_moe_mode(
            selection, tensors, options.moe_experts, skip=options.skip, include=options.include, config=config
        )
        method = options.method
        advice = moe.keep_advice(
            tensors,
            options.moe_experts,
            quant_type=method.name,
            quantizes_experts=method.quantizes_experts,
            quantized=list(selection.quantize),
            model_type=(config or {}).get("model_type"),
        ) or moe.mixed_advice(list(selection.quantize), list(selection.keep))
        if advice:
            self._tell(advice)
        note = moe.no_effect_note(tensors, options.moe_experts, list(selection.quantize))
        if note:  # recorded as keep: options, fingerprint and bytes of the conversion it equals
            self._tell(note)
            options = self.options = dataclasses.replace(options, moe_experts="keep")
        identity = src.describe()
        tensors, selection = self._drop_tied_copies(tensors, selection, identity)
        plan = build_plan(tensors, selection, options, config=config, source_identity=identity)
        self.plan = plan
        advice = options.method.loader_advice(plan)
        if advice:
            self._tell(advice)
        tv = tool_version()
        if not overwrite:
            plan = self.plan = as_recorded(plan, self.output, tv)
        plan_json = plan.to_json(tv)
        fingerprint = plan.fingerprint(tv)
        protected = (Path(identity["path"]),) if identity.get("kind") == "local" else ()
        if self.dry_run or self.check_fit:  # before the output folder is created or touched
            from converter.plan.preflight import preflight_of

            report = preflight_of(
                plan, self.src, self.output, fingerprint, overwrite=overwrite, device=self.device
            )
            if self.dry_run:
                from converter.writer.report import plan_moe_summary

                report.moe = plan_moe_summary(plan)
                report.refused = would_refuse(
                    self.output, fingerprint, plan_json, overwrite=overwrite, protected=protected
                )
                return self._dry_result(report)
            report.refuse_if_cannot_fit()
        if not self.output.exists():  # exist_ok: a second run may create it first; the lock decides
            self.output.mkdir(parents=True, exist_ok=True)
        # Locked before deciding, so two runs into one folder cannot both resume or clear it.
        lock = FolderLock(self.output) if self.output.is_dir() else None
        try:
            # The fingerprint covers the weights; config.json and the copied files are compared here.
            changed = [] if overwrite else changed_files(self.src, plan, self.output)
            decision = decide(
                self.output,
                fingerprint,
                plan_json,
                overwrite=overwrite,
                protected=protected,
                refresh=bool(changed),
            )
            # every shard reused: a finished folder, only its other files to rewrite (the CLI says so
            # instead of "resumed an interrupted conversion")
            resumed = decision.action is Action.RESUME
            self.refreshed = bool(changed) and resumed and len(decision.done) == len(plan.shards)
            if changed and decision.action is Action.RESUME:
                gone = set(gone_files(self.src, self.output, decision.manifest))
                rewritten = [n for n in changed if n not in gone]
                if rewritten:
                    note = (
                        f"{', '.join(rewritten)}: not what this conversion writes (changed in the source "
                        "since, or edited in the output); rewritten, the shards kept"
                    )
                    self._tell(note)
                if gone:
                    note = (
                        f"{', '.join(sorted(gone))}: gone from the source since it was "
                        "converted; removed from the output, the shards kept"
                    )
                    self._tell(note)
                # A finished folder has no partial files: what else it holds was put there since
                # (a git checkout to push from, evaluation results) and stays.
                self.keep_others = True
            if decision.action is not Action.CREATE:  # a rerun into a folder that keeps its other files
                self._tell_unlisted_shards()
            if decision.action is Action.NOOP:
                return self._result(decision.action, reused=len(decision.done))
            self.output.mkdir(parents=True, exist_ok=True)
            lock = lock or FolderLock(self.output)
            result = self._convert(decision, config, identity, selection, progress)
        finally:
            if lock is not None:
                lock.release()
        return result

    def _drop_tied_copies(
        self, tensors: list[TensorInfo], selection: Any, identity: dict
    ) -> tuple[list[TensorInfo], Any]:
        """Leave out the second copy of a tied pair the checkpoint stores twice with equal values (a tied
        lm_head beside the input embedding), as transformers' save_pretrained does: it ties them on load
        and writes the source only. Unequal values stay (transformers warns and does not tie them).
        Compared only where the data is on disk (a local source): a Hub source keeps both."""
        tied = getattr(selection, "tied", None) or {}
        if not tied or identity.get("kind") != "local":
            return tensors, selection
        if not selection.quantize:  # refused by build_plan: the refusal's example may be the copy the
            return tensors, selection  # user named (--include lm_head), and it would say "written once"
        info = {t.name: t for t in tensors}
        drop: set[str] = set()
        for target, source in sorted(tied.items()):
            a, b = info[target], info[source]
            if target in selection.quantize or source in selection.quantize or source in drop:
                continue
            if (a.dtype, a.shape) != (b.dtype, b.shape) or not self._same_bytes(a, b):
                continue
            drop.add(target)
            note = (
                f"{target} holds the same values as {source}, which config.json ties it to: written once "
                f"(as {source}), as transformers' save_pretrained does; both loaders tie them again"
            )
            self._tell(note)
        if not drop:
            return tensors, selection
        keep = {k: v for k, v in selection.keep.items() if k not in drop}
        return [t for t in tensors if t.name not in drop], dataclasses.replace(selection, keep=keep)

    def _same_bytes(self, a: TensorInfo, b: TensorInfo) -> bool:
        files: dict[str, Any] = {}
        try:
            for t in (a, b):
                if t.file not in files:
                    files[t.file] = self.src.open_file(t.file)
            x, _ = _get_array(files[a.file], a.name)
            y, _ = _get_array(files[b.file], b.name)
            return bool(np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)))
        finally:
            for name, f in files.items():
                getattr(f, "close", lambda: None)()
                self.src.release(name)

    def _convert(
        self, decision: Any, config: dict | None, identity: dict, selection: Any, progress: Any
    ) -> ConversionResult:
        plan, manifest = self.plan, decision.manifest
        if not self.keep_others:
            self._clean_leftovers(set(decision.done))
        manifest.save(self.output)

        todo = [s for s in plan.shards if s.name not in decision.done]
        needed = {t.info.file for s in todo for t in s.tensors}
        self._announce_needed([f for f in self.src.weight_files() if f in needed])
        hook = _progress_hook(progress, sum(t.info.nbytes for s in todo for t in s.tensors))
        if isinstance(hook, _RichHook):
            hook.show_downloads(self.src)
        try:
            self._write_shards(todo, manifest, hook)
        finally:
            hook.close()
        self._check_source_unchanged(identity)
        self._write_extras(manifest)
        result = self._result(decision.action, reused=len(decision.done))
        # the plan's identity: the one the folder recorded where a rerun adopted an older record of it
        report = build_report(
            result, plan, plan.source_identity, selection, self.stats, manifest.shards, self.quality
        )
        if self.stats.device:
            report["timings"]["device"] = self.stats.device
        atomic_write_bytes(self.output / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode())
        self._write_index(manifest)
        self._write_config(config)
        manifest.state = "complete"
        manifest.save(self.output)
        return result

    def _check_source_unchanged(self, identity: dict) -> None:
        """Refuse to finish when a local source's weight file changed (its identity) since the plan:
        shards read before and after the change would mix two checkpoints in a folder that verifies.
        The folder is left unfinished (no index, no config.json). A Hub source is pinned by its commit.
        """
        if identity.get("kind") != "local":
            return
        before = identity.get("files") or {}
        now = self.src.describe().get("files") or {}
        for name, was in before.items():
            is_ = now.get(name) or {}
            if is_ != was:  # size, mtime, header, sampled data
                msg = (
                    f"{Path(str(identity.get('path'))) / name}: changed while it was being converted, so the "
                    "output could mix old and new weights; it is left unfinished: once the source no longer "
                    "changes, rerun with --overwrite"
                )
                raise ConversionFailedError(msg)

    def _announce_needed(self, files: list[str]) -> None:
        """Tell a source that prefetches (HubSource.set_needed) which files will be acquired, in order."""
        set_needed = getattr(self.src, "set_needed", None)
        if callable(set_needed):
            set_needed(files)

    def _clean_leftovers(self, done: set[str]) -> None:
        """Remove what a killed run left (partial shards, unfinished outputs); keep verified shards.
        Only the files this conversion writes, and their temp names, are removed: anything else in the
        folder was put there by someone else (notes, evaluation results) and stays."""
        names = [s.name for s in self.plan.shards]
        names += [index.INDEX_NAME, REPORT_NAME, "config.json"]
        names += [n for n in self.src.extra_files() if copied_file(n)]
        for name in names:
            path = self.output / name
            for p in (path, temp_path(path), *temp_files(path)):
                if (p != path or name not in done) and (p.is_file() or p.is_symlink()):
                    p.unlink()

    # --- shards ----------------------------------------------------------------------------
    def _write_shards(self, shards: list[ShardPlan], manifest: Manifest, hook: _Hook) -> None:
        # Reference counts per source file: acquire on first use, release after its last tensor,
        # so a Hub source never downloads files whose shards are already done.
        remaining = Counter(t.info.file for s in shards for t in s.tensors)
        mapped: dict[str, MappedFile] = {}
        quantizer = new_quantizer(self.options, self.device, self.threads)
        self.quality = self.quality or self.options.method.quality_meter(self.options, self.threads)
        if quantizer.fallback_reason:
            self.notes.append(quantizer.fallback_reason)
        try:
            for shard in shards:
                info = self._write_shard(shard, quantizer, mapped, remaining, hook)
                manifest.shards[shard.name] = {
                    "sha256": info.sha256,
                    "size": info.size,
                    **shard_chunks_json(info),
                    **self.quality.shard_entry([p.name for p in shard.tensors]),
                }
                manifest.save(self.output)
                self.stats.shards_written.append(shard.name)
        finally:
            for note in getattr(quantizer, "notes", ()):  # e.g. int8 rows past float16's range: said now
                self._tell(note)
            self.quality.close()
            for file in list(mapped):
                mapped.pop(file)
                self.src.release(file)
            if isinstance(quantizer, CudaHostQuantizer):
                q = quantizer.stats
                self.stats.device = {
                    "device": str(quantizer.device),
                    "tensors": q.tensors,
                    "bytes_in": q.bytes_in,
                    "seconds_stage": q.seconds_stage,
                    "seconds_upload": q.seconds_upload,
                    "seconds_kernels": q.seconds_kernels,
                    "seconds_download": q.seconds_download,
                    "seconds_wait": q.seconds_wait,
                }

    def _provenance(self, shard: ShardPlan | None) -> dict:
        return provenance_of(self.src, self.plan, shard)

    def _write_shard(
        self, shard: ShardPlan, quantizer: Quantizer, mapped: dict, remaining: Counter, hook: _Hook
    ) -> Any:
        opts = self.options
        slots: list[TensorSlot] = []
        for p in shard.tensors:
            if p.quantize:
                slots.extend(opts.method.plan_slots(p, opts))
            else:
                slots.append(TensorSlot(p.name, p.out_dtype, p.info.shape))
        meta = metadata.build_metadata(
            {p.name: _tensor_record(p, opts) for p in shard.tensors},
            self._provenance(shard),
            version=tool_version(),
            format_version=self.plan.format_version,
        )
        path = self.output / shard.name
        writer = ShardWriter(path, slots, meta)
        # Each tensor's successor in the plan (read ahead while this one is quantized).
        following = dict(zip((p.name for p in shard.tensors), [*shard.tensors[1:], None], strict=True))
        # The quantizer pulls the tensors to quantize from this generator when it wants them: on the
        # CPU at their turn, on a GPU up to two ahead of the one being written.
        inputs = (p for p in shard.tensors if p.quantize)
        results = quantizer.quantize_many(self._read_many(inputs, mapped, following))
        try:
            for p in shard.tensors:
                if p.quantize:
                    self._write_quantized(p, results, writer)
                else:
                    kept = self._read(p, mapped, following[p.name])
                    self.quality.kept(p.name, kept, p.out_dtype)
                    self._write_kept(p, kept, writer)
                    del kept
                file = p.info.file
                remaining[file] -= 1
                if remaining[file] == 0:  # every tensor of this file is written: none is still read
                    mapped.pop(file, None)
                    self.src.release(file)
                self.stats.bytes_in += p.info.nbytes
                hook(p.name, p.info.nbytes)
            extra = next(results, None)  # runs the reader to its end; the plan had every tensor
            if extra is not None:
                msg = f"internal error: the quantizer returned {extra[0]!r} after {shard.name}'s last tensor"
                raise RuntimeError(msg)
            return writer.close()
        except OSError as exc:
            writer.abort()
            msg = (
                f"{path}: writing failed ({exc.strerror or exc}); "
                "free disk space or fix the folder, then rerun the same command to resume"
            )
            raise ConversionFailedError(msg) from exc
        except BaseException:
            writer.abort()
            raise
        finally:
            results.close()  # on an error: drops (and waits for) what is still in flight

    def _read(
        self, p: PlannedTensor, mapped: dict, following: PlannedTensor | None, to: str | None = None
    ) -> np.ndarray:
        """Tensor ``p`` from its source file (memory-mapped numpy, bf16 as uint16 bits), cast to ``to``
        (default: its planned dtype ``p.out_dtype``)."""
        to = to or p.out_dtype
        t0 = time.perf_counter()
        file = p.info.file
        if file not in mapped:
            mapped[file] = self.src.open_file(file)
        if following is not None and following.info.file == file:
            mapped[file].prefetch(following.name)  # read ahead while this one is quantized
        x, code = _get_array(mapped[file], p.name)
        if code != to and p.quantize and code in _FLOAT_CODES:
            x = self._cast_input(p, x, code, to)
        elif code != to and not p.quantize and code in _FLOAT_CODES and to in _FLOAT_CODES:
            x = self._cast_kept(p, x, code, to)
        elif code != to and (code in _FLOAT_CODES or p.quantize):
            x = _cast(x, code, to)  # --dtype (packed/absmax/maps are produced after it, never cast)
        self.stats.seconds_read += time.perf_counter() - t0
        return x

    def _cast_kept(self, p: PlannedTensor, x: np.ndarray, code: str, to: str) -> np.ndarray:
        """The --dtype cast of a tensor kept unquantized. A finite value past ``to``'s range becomes Inf,
        as in transformers' cast, and is written so; the run says so, naming the tensor (it was silent:
        only quantization_report.json counted the Inf, verify passed, the model computed NaN)."""
        import torch

        source, y = _torch_cast(x, code, to)
        narrower = y.dtype.itemsize < source.dtype.itemsize or y.dtype == torch.float16
        # no tensor-sized temporaries unless a value is not finite (an embedding may be a GB)
        if narrower and y.numel() and not all(torch.isfinite(m) for m in torch.aminmax(y)):
            over = torch.isinf(y)
            over &= _isfinite(source)  # chunked: no |source| of the tensor's size
            if bool(over.any()):
                name, count, largest = CODE_NAMES[to], int(over.sum()), float(source[over].abs().max())
                # without --dtype the cast is to config.json's dtype: 'without --dtype' is no fix then
                cast, fix = (
                    (name, "--dtype float32, or without --dtype where the checkpoint's own dtype holds it")
                    if self.options.dtype
                    else (
                        f"config.json's dtype {name} (the one transformers loads the model in)",
                        "--dtype float32",
                    )
                )
                self._tell(
                    f"tensor {p.name!r} in {p.info.file} holds {count} value(s) past {name}'s range (|w| up "
                    f"to {largest:.4g}), which the cast to {cast} turns into Inf, written as such "
                    "(transformers' cast does the same): the model computes Inf/NaN from it; "
                    f"convert with {fix}"
                )
        return _as_numpy(y)

    def _cast_input(self, p: PlannedTensor, x: np.ndarray, code: str, to: str) -> np.ndarray:
        """The --dtype cast of a weight to quantize. A finite value past ``to``'s range becomes Inf, as
        in transformers' cast. LLM.int8 rounds its input to float16 itself: there the Inf is saturated
        to ``to``'s largest finite value, which that rounding takes to float16 Inf, the row's inf SCB
        bitsandbytes stores; other methods refuse the Inf, and the error names the cast as its cause."""
        import torch

        source, y = _torch_cast(x, code, to)
        inf = torch.isinf(y)
        if bool(inf.any()):
            over = _isfinite(source)  # chunked: no |source| of the tensor's size
            over &= inf
            if bool(over.any()):
                if self.options.method.rounds_to_float16:
                    y[over] = torch.finfo(y.dtype).max * torch.sign(source[over]).to(y.dtype)
                else:
                    self.cast_overflow[p.name] = (to, float(source[over].abs().max()))
        return _as_numpy(y)

    def _read_many(
        self, planned: Iterator[PlannedTensor], mapped: dict, following: dict
    ) -> Iterator[tuple[str, np.ndarray, str]]:
        """(name, C-contiguous array, dtype code) of each tensor to quantize, read when the quantizer
        asks for it. Holds no reference while the quantizer has the tensor: it is freed once quantized
        or staged."""
        for p in planned:
            code = self._input_dtype(p)
            read = functools.partial(self._read_input, p, mapped, following[p.name], code)
            copy = p.transpose or code != p.info.dtype  # anonymous memory, not file pages
            yield p.name, self.quality.remember(p.name, read, code, copy), code

    def _input_dtype(self, p: PlannedTensor) -> str:
        """The dtype code tensor ``p`` reaches the quantizer in: ``p.out_dtype``, except a --dtype
        float16 cast of F32/BF16 that the method's kernel does itself (LLM.int8, the same rounding).
        Left to the kernel, a finite value past float16's range becomes the row's inf SCB, as
        bitsandbytes stores it, rather than an Inf the checkpoint does not hold."""
        code = self.options.method.kernel_input_dtype(p.info.dtype, p.out_dtype)
        if code != p.out_dtype and p.name in getattr(self.src, "fp8_weights", ()):
            return "F32"  # a dequantized FP8 weight reaches the kernel as its float32 product: one rounding
        return code

    def _read_input(
        self, p: PlannedTensor, mapped: dict, following: PlannedTensor | None, to: str
    ) -> np.ndarray:
        x = self._read(p, mapped, following, to)
        return np.ascontiguousarray(x.swapaxes(-1, -2) if p.transpose else x)

    def _write_kept(self, p: PlannedTensor, x: np.ndarray, writer: ShardWriter) -> None:
        t0 = time.perf_counter()
        # bf16 has no numpy dtype: its uint16 bits go in as bytes (the writer checks their count).
        writer.write(p.name, memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))
        del x
        self.stats.seconds_write += time.perf_counter() - t0

    def _write_quantized(
        self, p: PlannedTensor, results: Iterator[tuple[str, HostResult]], writer: ShardWriter
    ) -> None:
        t0, read0 = time.perf_counter(), self.stats.seconds_read
        try:
            got = next(results, None)
        except NonFiniteInputError as exc:
            bad = getattr(exc, "tensor", p.name)
            where = next((t for t in self.plan.tensors if t.name == bad), p)
            skip = f"--skip '{bad.rsplit('.', 1)[0]}'"
            msg = (
                f"tensor {bad!r} in {where.info.file} holds NaN or Inf: it cannot be quantized; "
                f"fix the checkpoint or pass {skip}"
            )
            if bad in self.cast_overflow:  # the checkpoint holds none: the --dtype cast made them
                to, largest = self.cast_overflow[bad]
                name = CODE_NAMES[to]
                # without --dtype the cast is to config.json's dtype: 'convert without --dtype' was no fix
                cast, fix = (
                    (f"--dtype {name}", "convert without --dtype (or with --dtype float32)")
                    if self.options.dtype
                    else (
                        f"the cast to config.json's dtype {name} (the one transformers loads the model in)",
                        "convert with --dtype float32",
                    )
                )
                msg = (
                    f"tensor {bad!r} in {where.info.file} holds a value past {name}'s range (|w| up to "
                    f"{largest:.4g}), which {cast} turns into Inf: 4-bit quantization cannot store it "
                    f"(bitsandbytes writes an inf absmax that loads as NaN); {fix}, or pass {skip}"
                )
            raise NonFiniteTensorError(msg) from None
        t1 = time.perf_counter()
        # Reading the next input happens inside next(): that time is the reader's, not the kernels'.
        self.stats.seconds_quantize += (t1 - t0) - (self.stats.seconds_read - read0)
        if got is None or got[0] != p.name:
            msg = f"internal error: the quantizer returned {got and got[0]!r} where {p.name!r} was due"
            raise RuntimeError(msg)
        r = got[1]
        self.quality.measured_result(p.name, r)
        entries = self.options.method.record_entries(p, self.options, r)
        del got, r
        for key, value in entries:
            writer.write(key, value)
        del entries
        self.stats.seconds_write += time.perf_counter() - t1

    # --- the rest of the folder ------------------------------------------------------------
    def _write_extras(self, manifest: Manifest) -> None:
        """Copy the source's extra files, after removing those an earlier run copied (its manifest
        records them) that are gone from the source since: a fresh run would not write them."""
        names = [n for n in self.src.extra_files() if copied_file(n)]
        for name in gone_files(self.src, self.output, manifest):
            path = self.output / name
            path.unlink()
            if path.parent != self.output and not any(path.parent.iterdir()):
                path.parent.rmdir()  # a module folder (1_Pooling/) left empty
        manifest.copied = names
        manifest.save(self.output)  # a run killed from here on removes them too (its rerun resumes)
        for name in names:
            dest = self.output / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with writing_to(dest) as tmp:
                self.src.copy_extra_file(name, tmp)

    def _write_index(self, manifest: Manifest) -> None:
        shards = [shard_info(self.output / s.name, manifest.shards[s.name]) for s in self.plan.shards]
        index.write_index(
            self.output,
            shards,
            weight_map_of(self.plan),
            provenance_of(self.src, self.plan, None),
            format_version=self.plan.format_version,
            # config.json's digest from the bytes _write_config writes next (of the same src.config())
            files=recorded_files(self.src, self.plan, self.src.config(), self.output),
        )

    def _write_config(self, config: dict | None) -> None:
        atomic_write_bytes(self.output / "config.json", config_bytes(self.plan, config))

    def _dry_result(self, report: Any) -> ConversionResult:
        result = make_result(self.output, self.plan, resumed=False, noop=False, seconds=0.0, bytes_read=0,
                             shards_reused=0)  # fmt: skip
        result.preflight = report
        return result

    def _result(self, action: Action, *, reused: int) -> ConversionResult:
        result = make_result(
            self.output,
            self.plan,
            resumed=action is Action.RESUME,
            noop=action is Action.NOOP,
            seconds=time.perf_counter() - self.started,
            bytes_read=self.stats.bytes_in,
            shards_reused=reused if action is Action.RESUME else 0,
        )
        result.refreshed = self.refreshed
        result.notes.extend(self.notes)
        return result


def as_recorded(plan: Plan, output: Path, tool_version: str) -> Plan:
    """``plan``, or ``plan`` with the source identity the conversion in ``output`` recorded where that is
    an older record of the same source (``sources.local.older_identity``: a Hugging Face cache snapshot
    recorded by its path alone). A rerun then resumes that folder, or leaves it as it is, and writes
    what its finished shards already say of the source, instead of refusing it as another source's."""
    older = older_identity(plan.source_identity)
    manifest = Manifest.load(output) if older is not None and output.is_dir() else None
    if manifest is None or manifest.state == "clearing":  # "clearing": emptied whatever it records
        return plan
    if same_plan(manifest, plan.fingerprint(tool_version), plan.to_json(tool_version)):
        return plan
    was = dataclasses.replace(plan, source_identity=older)
    return was if same_plan(manifest, was.fingerprint(tool_version), was.to_json(tool_version)) else plan


def _torch_name(code: str) -> str:
    return {v: k for k, v in DTYPE_CODES.items()}[code]


_FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})


def _wrap_fp8(src: Source) -> Source:
    """converter.sources.fp8's block-scaled FP8 view of ``src`` when its config declares one (torch is
    imported only then: dequantizing FP8 takes it)."""
    qc = (src.config() or {}).get("quantization_config")
    if not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() != "fp8":
        return src
    from converter.sources.fp8 import wrap_if_block_fp8

    return wrap_if_block_fp8(src)


def _wrap_llama4(src: Source) -> Source:
    """converter.sources.llama4's per-expert view of ``src`` when it is Llama 4 with fused experts."""
    from converter.sources.llama4 import wrap_if_llama4

    return wrap_if_llama4(src)


def _wrap_gpt_oss(src: Source, options: Options) -> Source:
    """converter.sources.gpt_oss's per-expert view of ``src`` when it is gpt-oss with fused bf16 experts
    and --skip / --include leave some expert weight to quantize (else the fused tensors, as keep writes
    them: the run then says --moe-experts quantize had no effect, and records keep)."""
    from converter.sources.gpt_oss import wrap_if_gpt_oss

    view = wrap_if_gpt_oss(src)
    if view is src:
        return src
    names = (t.name for t in view.tensors())
    return view if moe.globs_select_an_expert(names, options.skip, options.include) else src


def _get_array(reader: Any, name: str) -> tuple[np.ndarray, str]:
    """(numpy array, dtype code) of tensor ``name`` from an open file; a reader with only ``get``
    (converter.sources.fp8's dequantizing view) hands a torch tensor, viewed as numpy here."""
    get_array = getattr(reader, "get_array", None)
    if get_array is not None:
        return get_array(name)
    import torch

    from formats.writer import DTYPE_CODES as TORCH_CODES

    t = reader.get(name).contiguous()
    code = TORCH_CODES[t.dtype]
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy(), code
    if t.element_size() == 1 and t.dtype not in (torch.uint8, torch.int8, torch.bool):
        return t.view(torch.uint8).numpy(), code  # float8 bits
    return t.numpy(), code


def _torch_cast(x: np.ndarray, code: str, to: str) -> tuple[Any, Any]:
    """(x as a torch tensor, x cast to safetensors dtype ``to``): a --dtype cast, rounded by torch as
    transformers casts (torch is imported for casts only)."""
    from converter.sources.mapped import as_torch
    from formats.writer import TORCH_DTYPES

    source = as_torch(x, code)
    return source, source.to(TORCH_DTYPES[to])


def _isfinite(x: Any) -> Any:
    """``torch.isfinite(x)`` a chunk of ``ISFINITE_CHUNK`` elements at a time: torch computes it through
    ``|x|`` and two bool masks, which a whole tensor made (a float32 weight: 7 bytes per element beside
    the cast's result, the preflight's peak memory; converter/plan/preflight.py)."""
    import torch

    flat = x.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.bool)
    for i in range(0, flat.numel(), ISFINITE_CHUNK):
        out[i : i + ISFINITE_CHUNK] = torch.isfinite(flat[i : i + ISFINITE_CHUNK])
    return out.view(x.shape)


def _as_numpy(y: Any) -> np.ndarray:
    """A cast torch tensor as the numpy array the writer takes (bf16 as its uint16 bits)."""
    import torch

    return y.view(torch.uint16).numpy() if y.dtype == torch.bfloat16 else y.numpy()


def _cast(x: np.ndarray, code: str, to: str) -> np.ndarray:
    """A --dtype cast of ``x`` (see :func:`_torch_cast`)."""
    return _as_numpy(_torch_cast(x, code, to)[1])


def _tensor_record(p: PlannedTensor, opts: Options) -> dict:
    if not p.quantize:
        return metadata.passthrough_record(
            dtype=p.out_dtype, shape=p.info.shape, reason=p.reason[:200] or "kept"
        )
    return opts.method.metadata_record(p, opts)


class _Hook:
    def __call__(self, name: str, nbytes: int) -> None: ...

    def close(self) -> None: ...


class _CallbackHook(_Hook):
    def __init__(self, fn: ProgressHook) -> None:
        self.fn, self.done = fn, 0

    def __call__(self, name: str, nbytes: int) -> None:
        self.done += nbytes
        self.fn(name, self.done)


class _RichHook(_Hook):
    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True, markup=False, highlight=False, emoji=False)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[tensor]}"),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task("quantizing", total=total, tensor="")
        self.progress.start()

    def show_downloads(self, src: Source) -> None:
        """A second bar for Hub downloads (bytes), fed by HubSource.on_download."""
        plan = getattr(src, "download_plan", None)
        total = sum(plan().values()) if plan is not None else 0
        if not total:
            return
        task = self.progress.add_task("downloading", total=total, tensor="")
        progress = getattr(src, "download_progress", None)
        done: dict[str, int] = progress() if progress is not None else {}  # prefetch began during planning
        self.progress.update(task, completed=sum(done.values()))

        def on_download(file: str, nbytes: int, _size: int) -> None:
            done[file] = nbytes
            self.progress.update(task, completed=sum(done.values()), tensor=file)

        src.on_download = on_download  # type: ignore[attr-defined]

    def __call__(self, name: str, nbytes: int) -> None:
        self.progress.update(self.task, advance=nbytes, tensor=name)

    def close(self) -> None:
        self.progress.stop()


def _progress_hook(progress: bool | ProgressHook, total: int) -> _Hook:
    if callable(progress):
        return _CallbackHook(progress)
    if progress:
        return _RichHook(total)
    return _Hook()
