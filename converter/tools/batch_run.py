"""Running a batch plan: up-to-date jobs skipped, several jobs at once within a budget, fail-fast.

Each job converts ``job.source`` into ``output_root / job.output`` with converter.convert. A job is
up to date, and skipped without reading any tensor, when its preflight (headers only) finds the
output folder complete for the same plan fingerprint (source commit or file identities, options,
tool and format version) and the folder's files are verified: by the stamp the batch wrote after it
last finished or verified that folder (``OUTPUT_ROOT/.quantize-model-batch/<output>.json``: size and
mtime of every file), or else by a full ``verify`` (hashes), after which the stamp is written.
``force`` redoes every job from scratch. A folder the batch wrote for a job whose plan changed since
(new source commit, options, tool version) is replaced; a folder it did not write is refused.

``parallel`` > 1 runs jobs in threads (conversions release the GIL in I/O and kernels) and starts a
job only while the running jobs' preflight estimates (peak memory above this process, disk for the
shards) fit the budgets; a job that fits nowhere runs alone, where its own preflight may refuse it.
One failure never stops the others unless ``fail_fast``: then jobs not yet started are reported as
cancelled and running ones finish.

Ctrl-C (or SIGTERM, which the CLI turns into the same) raises ``BatchInterrupted`` carrying the
report so far: finished jobs as they ended, the running ones ``interrupted`` (resumable: a rerun
continues them from their last finished shard), the rest ``cancelled``. A CI job cancelled or timed
out then still gets its JUnit/JSON report. With ``parallel`` > 1 the running conversions' threads
cannot be stopped from outside; the CLI ends the process once the reports are written.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.errors import ConverterError
from converter.tools.batch import STATE_DIR
from converter.tools.plan_file import Job

#: Statuses of a job (JUnit: failed -> failure, interrupted -> error, cancelled -> skipped, the rest pass).
#: ``refreshed``: the output was finished for the same weights, and only the files convert copies from the
#: source (tokenizer, licence, config...) that changed since were rewritten (no shard redone).
STATUSES = ("converted", "resumed", "refreshed", "up-to-date", "failed", "interrupted", "cancelled")


@dataclass
class ItemResult:
    item: Job
    ok: bool
    seconds: float
    error: str | None = None
    exit_code: int = 0
    result: Any = None  # ConversionResult when converted, resumed or refreshed
    status: str = "converted"
    bytes_out: int = 0
    quality: dict | None = None  # the report's quality summary
    pushed_to: str | None = None  # the Hub repo this run uploaded the folder to (None: no upload)

    def to_json(self) -> dict:
        return {
            "source": self.item.source,
            "output": self.item.output,
            "revision": self.item.revision,
            "status": self.status,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "error": self.error,
            "seconds": self.seconds,
            "bytes_out": self.bytes_out,
            "quality": self.quality,
            "pushed_to": self.pushed_to,
            "result": self.result.to_json() if self.result is not None else None,
        }


@dataclass
class BatchResult:
    items: list[ItemResult] = field(default_factory=list)

    @property
    def failed(self) -> list[ItemResult]:
        return [i for i in self.items if not i.ok]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> dict:
        counts = {s: sum(1 for i in self.items if i.status == s) for s in STATUSES}
        return {"ok": self.ok, "counts": counts, "items": [i.to_json() for i in self.items]}


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the batch. ``result``: every job, finished, interrupted or cancelled.
    ``threads_running``: conversions still running in worker threads (parallel runs)."""

    def __init__(self, result: BatchResult, *, signum: int = signal.SIGINT, threads_running: bool = False):
        super().__init__(f"batch interrupted by {signal.Signals(signum).name}")
        self.result = result
        self.signum = signum
        self.threads_running = threads_running


def _signum(exc: BaseException) -> int:
    return getattr(exc, "signum", signal.SIGINT)


def _interrupted(job: Job, seconds: float, signum: int) -> ItemResult:
    name = signal.Signals(signum).name
    return ItemResult(job, False, seconds, f"interrupted by {name}; rerun the same batch to resume it",
                      128 + signum, status="interrupted")  # fmt: skip


def _not_started(job: Job, signum: int) -> ItemResult:
    name = signal.Signals(signum).name
    return ItemResult(job, False, 0.0, f"not started: the batch was interrupted by {name}", 128 + signum,
                      status="cancelled")  # fmt: skip


# --- up-to-date state ---------------------------------------------------------------------------
def _stamp_path(root: Path, job: Job) -> Path:
    return root / STATE_DIR / f"{job.output}.json"


def _folder_files(folder: Path) -> dict[str, list[int]]:
    """Size and mtime of the output's files: its top-level ones and those of its subfolders (copied
    sentence-transformers modules: 1_Pooling/config.json), hidden subfolders (a .git checkout) left out."""
    out = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts[:-1]):
            st = f.stat()
            out[rel.as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def source_state(job: Job) -> Any:
    """What identifies the source's content: the Hub commit the revision names (one API call), or the
    size and mtime of every file of a local source, and for its weight files what else ``convert``'s
    source identity holds (header and sampled data: ``_weight_identity``). None when unknown."""
    local = Path(job.source).expanduser()
    if local.is_file():
        from converter.sources.local import extra_files_in

        # the files convert copies from the file's folder (tokenizer, licence, generation config: a
        # new tokenizer_config.json there left the job up to date with the old one, where a rerun of
        # convert rewrites it), beside the weights and config.json
        extras = [local.parent / rel for rel in extra_files_in(local.parent)]
        files = sorted({local, local.with_name("config.json"), *extras})
    elif local.is_dir():
        # hidden files inside the source are left out; the folders above it may be hidden (~/.cache/...)
        files = sorted(
            p
            for p in local.rglob("*")
            if not any(part.startswith(".") for part in p.relative_to(local).parts)
        )
    else:
        return _hub_state(job)
    return {
        str(p): [p.stat().st_size, p.stat().st_mtime_ns, *_weight_identity(p)] for p in files if p.is_file()
    }


def _hub_state(job: Job) -> dict[str, str] | None:
    """The commit a Hub job's revision names: a full commit sha as given (a commit never moves: no API
    call), with HF_HUB_OFFLINE=1 the cache's ref of the revision (the snapshot an offline run reads;
    the API call fails offline, and every up-to-date job was planned and re-hashed, or failed without
    kept downloads), else one API call. None when unknown."""
    import re

    revision = job.revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return {"commit": revision}
    try:
        from huggingface_hub import HfApi, constants

        if constants.is_offline_mode():
            from huggingface_hub.file_download import repo_folder_name

            folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=job.source, repo_type="model")
            commit = (folder / "refs" / revision).read_text().strip()
            return {"commit": commit} if commit else None
        return {"commit": HfApi().model_info(job.source, revision=job.revision).sha}
    except Exception:
        return None


def _weight_identity(path: Path) -> list[str | None]:
    """For a weight file, the rest of its identity in ``LocalSource.describe`` (what a rerun of
    ``convert`` compares): the sha256 of its safetensors header and its ``sample_digest`` (512 KiB
    read), which tell a file swapped for another of the same size with its mtime restored. None for
    a header that cannot be read (the conversion names the file)."""
    import hashlib

    from converter.sources.local import PICKLE_SUFFIXES, read_header, sample_digest

    if path.suffix in PICKLE_SUFFIXES:
        return [sample_digest(path, path.stat().st_size)]
    if path.suffix != ".safetensors":
        return []
    try:
        header: str | None = hashlib.sha256(read_header(path, str(path))[0]).hexdigest()
    except ConverterError:
        header = None
    return [header, sample_digest(path, path.stat().st_size)]


#: job keywords that never change the output's bytes, left out of the up-to-date key: how the job runs
#: (threads, device, kept downloads, progress) and where it is pushed (the stamp records pushes)
_NOT_IN_KEY = ("progress", "threads", "device", "keep_downloads", "push_to", "private")


def job_key(job: Job, options: dict[str, Any], state: Any) -> str:
    """Source state, the job's options, tool and format version: equal keys, equal output. A stamp of
    an older key (device and keep_downloads in it) matches no key: the job is planned once, found up to
    date by its fingerprint and files (``stamp_matches``: nothing converted or hashed) and stamped anew."""
    import hashlib

    from converter import __version__
    from formats.validate import FORMAT_VERSION

    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(job_kwargs(job, options).items())}
    for key in _NOT_IN_KEY:
        kw.pop(key, None)
    blob = json.dumps([job.source, kw, __version__, str(FORMAT_VERSION), state], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_stamp(
    root: Path, job: Job, fingerprint: str, pushed_to: str | None, key: str | None = None
) -> None:
    from converter.writer.manifest import atomic_write_bytes

    path = _stamp_path(root, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "fingerprint": fingerprint,
        "job_key": key,
        "files": _folder_files(root / job.output),
        "pushed_to": pushed_to,
    }
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def read_stamp(root: Path, job: Job) -> dict | None:
    try:
        data = json.loads(_stamp_path(root, job).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stamp_matches(root: Path, job: Job, fingerprint: str) -> bool:
    stamp = read_stamp(root, job)
    return (
        bool(stamp)
        and stamp.get("fingerprint") == fingerprint
        and stamp.get("files") == _folder_files(root / job.output)
    )


def cheap_key(job: Job, options: dict[str, Any]) -> str | None:
    state = source_state(job)
    return job_key(job, options, state) if state is not None else None


def stamped_up_to_date(job: Job, root: Path, key: str | None, push_to: str | None) -> bool:
    """The cheap check: the stamp of the last run names the same source state, options and
    versions, and the folder's files are as that run left them (no plan, no tensor, no import of
    torch or transformers)."""
    stamp = read_stamp(root, job) if key else None
    if (
        not stamp
        or stamp.get("job_key") != key
        or stamp.get("files") != _folder_files_or_none(root / job.output)
    ):
        return False
    return not push_to or pushed_already(stamp, push_to)


def pushed_already(stamp: dict, push_to: str) -> bool:
    """Whether the stamp records a push of the folder to ``push_to``: the repo id, or the repo URL that
    earlier versions recorded (which never equalled the id, so every run pushed again)."""
    pushed = stamp.get("pushed_to")
    return isinstance(pushed, str) and (pushed == push_to or pushed.endswith("/" + push_to))


# --- one job ----------------------------------------------------------------------------------
def _describe(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, ConverterError):
        return str(exc), exc.exit_code
    from converter.cli._app import describe_error

    return describe_error(exc)


def job_kwargs(job: Job, options: dict[str, Any]) -> dict[str, Any]:
    kw = {**options, **job.convert_kwargs()}
    if kw.get("keep_downloads") and Path(job.source).expanduser().exists():
        # a batch-wide --keep-downloads (or [defaults] keep_downloads) is for the plan's Hub jobs: a
        # local one downloads nothing (convert() refuses it there, as --revision)
        kw["keep_downloads"] = False
    return kw


def preflight_job(
    job: Job,
    root: Path,
    options: dict[str, Any],
    *,
    force: bool = False,
    warn: Callable[[str], None] = lambda _: None,
) -> Any:
    """The job's preflight (converter.plan.preflight.Preflight), from headers only; nothing written.
    Its warnings go to ``warn`` (by default nowhere: the conversion that follows says them)."""
    from converter.writer.pipeline import convert

    kw = job_kwargs(job, options)
    for key in ("push_to", "private", "progress"):
        kw.pop(key, None)
    return convert(
        job.source, root / job.output, dry_run=True, overwrite=force, progress=False, warn=warn, **kw
    ).preflight


def run_job(
    job: Job,
    root: Path,
    options: dict[str, Any],
    *,
    force: bool,
    pre: Any = None,
    warn: Callable[[str], None] | None = None,
) -> ItemResult:
    """Convert one job (or skip it when up to date); never raises for a failed conversion. The
    conversion's warnings go to ``warn`` (None: Python's warnings)."""
    from converter.writer.pipeline import convert

    t0 = time.perf_counter()
    out = root / job.output
    kw = job_kwargs(job, options)
    push_to, private = kw.pop("push_to", None), kw.pop("private", False)
    try:
        key = cheap_key(job, options)
        if not force and stamped_up_to_date(job, root, key, push_to):
            return ItemResult(job, True, time.perf_counter() - t0, status="up-to-date",
                              bytes_out=_shard_bytes(out), quality=_quality(out))  # fmt: skip
        pre = pre if pre is not None else None if force else preflight_job(job, root, options)
        if not force and pre is not None and pre.up_to_date:
            fresh = stamp_matches(root, job, pre.fingerprint)
            if not fresh:
                from converter.tools.inspection import verify_path

                fresh = verify_path(out).ok
            if fresh:
                stamp = read_stamp(root, job) or {}
                pushed = None
                if push_to and not pushed_already(stamp, push_to):  # converted before, not pushed yet
                    from converter.tools.push import push_folder

                    push_folder(out, push_to, private=private)
                    pushed = push_to
                write_stamp(root, job, pre.fingerprint, push_to or stamp.get("pushed_to"), key)
                return ItemResult(job, True, time.perf_counter() - t0, status="up-to-date",
                                  bytes_out=_shard_bytes(out), quality=_quality(out),
                                  pushed_to=pushed)  # fmt: skip
            force_this = True  # complete by its manifest but its files do not verify: redo it
        else:
            force_this = force or (pre is not None and replaces_stale_output(job, root, pre))
        claim(root, job)
        result = convert(
            job.source, out, overwrite=force_this, push_to=push_to, private=private, warn=warn, **kw
        )
        fingerprint = _fingerprint(out)
        pushed = push_to if result.pushed_to else None  # the repo id (result.pushed_to is its URL)
        write_stamp(root, job, fingerprint, pushed, key)
        # refreshed: a finished folder whose copied files were rewritten; resumed says a killed run
        status = "refreshed" if result.refreshed else "resumed" if result.resumed else "converted"
        return ItemResult(job, True, time.perf_counter() - t0, result=result, status=status,
                          bytes_out=result.bytes_out, quality=result.quality,
                          pushed_to=pushed)  # fmt: skip
    except Exception as exc:  # any failure is this job's one-line error (Ctrl-C is not caught)
        message, code = _describe(exc)
        return ItemResult(job, False, time.perf_counter() - t0, in_plan_terms(message, exc, job),
                          code or 1, status="failed")  # fmt: skip


def in_plan_terms(message: str, exc: BaseException, job: Job) -> str:
    """A job's error in the terms of the plan: a revision that does not exist is the job's ``revision``
    (a plan key, a JSON item's field), not ``--revision``, which batch refuses."""
    from converter.sources.hub_client import HubRevisionNotFoundError

    if isinstance(exc, HubRevisionNotFoundError):
        where = f" ({job.where})" if job.where else ""
        return message.replace("to --revision", f"as the job's revision{where}")
    return message


def claim(root: Path, job: Job) -> None:
    """Stamp a job's folder as the batch's before its first conversion starts (no key, no fingerprint:
    never up to date), when nothing is there yet. A first run killed mid-job left an unfinished
    folder without a stamp, which a rerun after a new source commit refused as a folder the batch did
    not write, every night, until --force."""
    out = root / job.output
    if read_stamp(root, job) is None and (not out.exists() or (out.is_dir() and not any(out.iterdir()))):
        write_stamp(root, job, "", None)


def replaces_stale_output(job: Job, root: Path, pre: Any) -> bool:
    """Whether the job's folder is one this batch wrote for it (its stamp says so) holding an older
    plan (a new source commit, changed options, a new tool version): it is replaced. A folder nobody
    stamped is refused by convert() as usual."""
    return read_stamp(root, job) is not None and _fingerprint(root / job.output) not in ("", pre.fingerprint)


def _folder_files_or_none(folder: Path) -> dict | None:
    return _folder_files(folder) if folder.is_dir() else None


def _fingerprint(out: Path) -> str:
    from converter.writer.manifest import Manifest

    m = Manifest.load(out)
    return m.fingerprint if m is not None else ""


def _shard_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def _quality(out: Path) -> dict | None:
    try:
        return json.loads((out / "quantization_report.json").read_text()).get("quality")
    except (OSError, ValueError):
        return None


# --- the batch --------------------------------------------------------------------------------
@dataclass
class Budget:
    memory: int | None  # bytes the running jobs' working sets may take together (None: no limit)
    disk: int | None

    def fits(self, need: tuple[int, int], used: tuple[int, int]) -> bool:
        mem_ok = self.memory is None or used[0] + need[0] <= self.memory
        disk_ok = self.disk is None or used[1] + need[1] <= self.disk
        return mem_ok and disk_ok


def default_budget(root: Path) -> Budget:
    from converter.plan.preflight import disk_free, ram_available

    return Budget(ram_available(), disk_free(root)[0])


def run_batch(
    jobs: list[Job],
    output_root: str | os.PathLike,
    *,
    parallel: int = 1,
    fail_fast: bool = False,
    force: bool = False,
    budget: Budget | None = None,
    on_start: Callable[[int, Job], None] | None = None,
    on_done: Callable[[int, ItemResult], None] | None = None,
    on_warning: Callable[[int, str], None] | None = None,
    **options: Any,
) -> BatchResult:
    """Run every job (see the module docstring); results come back in plan order. A job's warnings
    (MoE experts kept 16-bit, partial blocks) go to ``on_warning(k, text)`` (None: Python's warnings).
    ``output_root``: a str or a Path."""
    output_root = Path(output_root)

    def warner(k: int) -> Callable[[str], None] | None:
        return None if on_warning is None else functools.partial(on_warning, k)

    options.setdefault("progress", False)
    if parallel > 1 and options.get("threads") is None:
        options["threads"] = max(1, (os.cpu_count() or 1) // parallel)
    results: dict[int, ItemResult] = {}
    if parallel <= 1:
        for k, job in enumerate(jobs):
            t0 = time.perf_counter()
            try:
                if fail_fast and any(not r.ok for r in results.values()):
                    results[k] = _cancelled(job)
                else:
                    if on_start:
                        on_start(k, job)
                    results[k] = run_job(job, output_root, options, force=force, warn=warner(k))
            except KeyboardInterrupt as exc:
                signum = _signum(exc)
                results[k] = _interrupted(job, time.perf_counter() - t0, signum)
                raise BatchInterrupted(_rest_not_started(jobs, results, signum), signum=signum) from None
            if on_done:
                on_done(k, results[k])
        return BatchResult([results[k] for k in range(len(jobs))])

    budget = budget or default_budget(output_root)
    # Each job's needs, from its preflight (headers only). A job whose preflight fails is run anyway,
    # alone: it then fails with the same one-line error as any other failure.
    needs: dict[int, tuple[int, int]] = {}
    pres: dict[int, Any] = {}
    from converter.plan.preflight import process_rss

    base = process_rss()
    try:
        for k, job in enumerate(jobs):
            push_to = job_kwargs(job, options).get("push_to")
            if not force and stamped_up_to_date(job, output_root, cheap_key(job, options), push_to):
                needs[k] = (0, 0)  # will be skipped: no preflight needed
                continue
            try:
                pre = preflight_job(job, output_root, options, force=force)
                pres[k] = None if force else pre
                needs[k] = (max(0, pre.peak_ram - base), pre.disk_needed)
            except Exception:
                needs[k] = (0, 0)
    except KeyboardInterrupt as exc:  # nothing started yet
        raise BatchInterrupted(_rest_not_started(jobs, {}, _signum(exc)), signum=_signum(exc)) from None
    pending = list(range(len(jobs)))
    running: dict[Future[ItemResult], int] = {}
    started: dict[int, float] = {}
    failed = False
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="qm-batch")
    try:
        while pending or running:
            while pending and len(running) < parallel and not (fail_fast and failed):
                used = (
                    sum(needs[i][0] for i in running.values()),
                    sum(needs[i][1] for i in running.values()),
                )
                k = pending[0]
                if running and not budget.fits(needs[k], used):
                    break  # wait for a running job to free its share
                pending.pop(0)
                if on_start:
                    on_start(k, jobs[k])
                fut = pool.submit(run_job, jobs[k], output_root, options, force=force, pre=pres.get(k),
                                  warn=warner(k))  # fmt: skip
                running[fut] = k
                started[k] = time.perf_counter()
            if fail_fast and failed:
                for k in pending:
                    results[k] = _cancelled(jobs[k])
                    if on_done:
                        on_done(k, results[k])
                pending = []
            if not running:
                continue
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                k = running.pop(fut)
                results[k] = fut.result()
                failed = failed or not results[k].ok
                if on_done:
                    on_done(k, results[k])
    except KeyboardInterrupt as exc:
        signum, now = _signum(exc), time.perf_counter()
        for fut, k in running.items():
            finished = fut.done() and not fut.cancelled() and fut.exception() is None
            seconds = now - started.get(k, now)
            results[k] = fut.result() if finished else _interrupted(jobs[k], seconds, signum)
        threads_running = any(not fut.done() for fut in running)
        pool.shutdown(wait=False, cancel_futures=True)
        result = _rest_not_started(jobs, results, signum)
        raise BatchInterrupted(result, signum=signum, threads_running=threads_running) from None
    pool.shutdown(wait=True)
    return BatchResult([results[k] for k in range(len(jobs))])


def _rest_not_started(jobs: list[Job], results: dict[int, ItemResult], signum: int) -> BatchResult:
    return BatchResult([results.get(k) or _not_started(job, signum) for k, job in enumerate(jobs)])


def interrupted_before_start(jobs: list[Job], signum: int) -> BatchInterrupted:
    """The interruption of a batch stopped by ``signum`` before its first job started."""
    return BatchInterrupted(_rest_not_started(jobs, {}, signum), signum=signum)


def _cancelled(job: Job) -> ItemResult:
    return ItemResult(job, False, 0.0, "not started: an earlier job failed and --fail-fast was given", 1,
                      status="cancelled")  # fmt: skip
