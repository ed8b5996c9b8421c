"""quantize-model batch PLAN [OUTPUT_ROOT]: convert the jobs of a TOML plan or a text/JSON list."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from converter.cli._app import App, not_empty_path
from converter.cli.convert import conversion_kwargs, conversion_options, options_not_for
from converter.units import human_bytes

EPILOG = """\b
PLAN: a TOML plan (.toml: [defaults] and [[job]] tables, see docs/ci.md), or a list: one source per
line (local path or Hub repo id, optional output name as a second column, '#' comments), or a JSON
list of sources / {"source", "output", "revision"} objects. Each job goes to OUTPUT_ROOT/<name>
(OUTPUT_ROOT may come from the plan's output_root). Up-to-date jobs are skipped; failures are
reported and the batch goes on. Exit codes: 0 all ok, 1 some job failed, 2 bad plan or options,
75 every failed job's folder was being written by another process (rerun once it ends), 130/143
interrupted by Ctrl-C/SIGTERM (the reports are still written; rerun to resume).
\b
Examples:
  quantize-model batch plan.toml --junit junit.xml --json report.json
  quantize-model batch plan.toml --only 3/8          # part 3 of an 8-way CI matrix
  quantize-model batch plan.toml --dry-run           # what would run, and why
"""


@click.command(short_help="Convert many checkpoints", epilog=EPILOG)
@click.argument("plan_file", type=click.Path(path_type=Path))
@click.argument("output_root", required=False, callback=not_empty_path)
@conversion_options
@click.option("--only", metavar="I/N", default=None, help="Run part I of N (a stable split of the jobs).")
@click.option(
    "--jobs",
    "parallel",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Jobs run at once, within the memory and disk their preflights need.",
)
@click.option("--fail-fast", is_flag=True, help="Start no further job once one failed.")
@click.option("--force", is_flag=True, help="Redo every job from scratch, even up-to-date ones.")
@click.option("--overwrite", is_flag=True, hidden=True, help="Same as --force.")
@click.option("--dry-run", is_flag=True, help="Print what each job would do and write nothing.")
@click.option(
    "--junit",
    "junit_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a JUnit XML report (one test case per job) to this file.",
)
@click.option(
    "--json",
    "json_path",
    is_flag=False,
    flag_value="-",
    default=None,
    metavar="[FILE]",
    help="Write the results as JSON to FILE, or to stdout without FILE.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but warnings and errors.")
@click.pass_context
def batch(ctx: click.Context, plan_file: Path, output_root: Path | None, **params: Any) -> None:
    """Convert every job of PLAN_FILE into its own folder under OUTPUT_ROOT."""
    from converter import batch_signals

    batch_signals.install()  # Ctrl-C and SIGTERM recorded until the jobs are known (the console script
    try:  # installs it before importing the CLI)
        _batch(ctx, plan_file, output_root, **params)
    finally:
        _deliver(batch_signals.restore())


# convert's --revision, which a batch refuses (a job's revision is the plan's): its help said "Hub
# branch, tag or commit (Hub sources only)" as if it applied to every job
_REVISION = next(p for p in batch.params if p.name == "revision")
_REVISION.help = "Refused: give a revision per job in the plan or JSON list."


def _deliver(signum: int | None) -> None:
    """Act on a signal recorded while the batch started and not reported (a bad plan, --dry-run):
    again, now that the previous handler is back (Ctrl-C: KeyboardInterrupt, SIGTERM: the end)."""
    if signum is not None:
        os.kill(os.getpid(), signum)


def _batch(ctx: click.Context, plan_file: Path, output_root: Path | None, **params: Any) -> None:
    from converter import batch_signals
    from converter.errors import FolderBusyError
    from converter.kernels.isa_env import forced_isa
    from converter.tools.batch_run import BatchInterrupted, interrupted_before_start, run_batch
    from converter.tools.plan_file import load_plan, select_part

    app: App = ctx.obj
    to_stdout = params["json_path"] == "-"
    app.configure(json=to_stdout, quiet=params["quiet"])
    kwargs = conversion_kwargs(params)
    if kwargs["revision"] is not None:
        app.abort("--revision cannot apply to a whole batch; give it per job in the plan or JSON list", 2)
    del kwargs["revision"]
    is_plan = plan_file.suffix.lower() == ".toml"
    if is_plan:  # only options given on the command line override the plan's [defaults]
        kwargs = {k: v for k, v in kwargs.items() if _given(ctx, k)}
    plan = load_plan(plan_file, kwargs)
    forced_isa()  # a bad QM_CPU_ISA: refused once before any job (exit 2), as convert refuses it
    if not is_plan:  # a list: the command line's quant type is every job's (a plan's jobs may set theirs)
        note = options_not_for(ctx, params["quant_type"])
        if note:
            app.warn(note)
    for note in plan.warnings:  # a job's or variant's keys its quant type does not read
        app.warn(note)
    root = output_root or plan.output_root
    if root is None:  # a list has no [defaults]: there only the command line can give it
        how = "the plan, or set output_root in [defaults]" if is_plan else "the list (a list cannot set it)"
        app.abort(f"{plan_file}: no OUTPUT_ROOT: give one after {how}", 2)
    device = kwargs.get("device")
    if device not in (None, "cpu"):  # a GPU index past this machine's is refused here, not per job
        from converter.writer.pipeline import resolve_device

        _, fallback_note = resolve_device(device)
        if fallback_note:
            app.warn(fallback_note)  # once, as convert does; each job falls back the same way
    jobs = select_part(plan.jobs, params["only"])
    not_a_folder = _file_in_the_way(Path(root))
    if not_a_folder is not None:  # every job failed alike on it (exit 1): refused once, as a bad option
        where = "" if not_a_folder == Path(root) else f"{not_a_folder} "
        app.abort(f"{root}: {where}is a file, not a folder; choose another OUTPUT_ROOT", 2)
    overlaps = _outputs_in_sources(jobs, root)
    if overlaps:  # refused once before any job (each job refused it alone, after the others ran)
        app.abort(overlaps, 2)
    force = params["force"] or params["overwrite"]
    n = len(jobs)
    if params["dry_run"]:
        _deliver(batch_signals.restore())  # a dry run writes no report: Ctrl-C stops it at once
        _dry_run(app, jobs, root, force)
        return
    for option, report in (("--junit", params["junit_path"]), ("--json", params["json_path"])):
        if report is not None and report != "-":
            _check_report_path(app, option, Path(report))

    def on_warning(k: int, text: str) -> None:
        app.warn(f"[{k + 1}/{n}] {jobs[k].source}: {text}")

    def on_done(k: int, r: Any) -> None:
        if r.ok:
            app.info(f"[{k + 1}/{n}] {r.item.source} -> {r.item.output}: {_how(r)} in {r.seconds:.1f} s")
        else:
            app.error(f"[{k + 1}/{n}] {r.item.source}: {r.error}")

    try:
        try:  # a signal from the batch's start on: every job is reported as not started
            signum = batch_signals.start_raising()  # from now on a signal raises KeyboardInterrupt
            if signum is not None:
                raise interrupted_before_start(jobs, signum)
        except BatchInterrupted:
            raise
        except KeyboardInterrupt as exc:
            raise interrupted_before_start(jobs, getattr(exc, "signum", signal.SIGINT)) from None
        result = run_batch(jobs, root, parallel=params["parallel"], fail_fast=params["fail_fast"],
                           force=force, on_done=on_done, on_warning=on_warning)  # fmt: skip
    except BatchInterrupted as stop:
        _report(app, stop.result, plan_file, params, interrupted=signal.Signals(stop.signum).name)
        r = stop.result
        counts = {s: sum(1 for i in r.items if i.status == s) for s in ("interrupted", "cancelled")}
        app.error(
            f"interrupted by {signal.Signals(stop.signum).name}: {n - sum(counts.values())} of {n} job(s) "
            f"ended, {counts['interrupted']} interrupted, {counts['cancelled']} not started; rerun the "
            "same batch to resume"
        )
        if stop.threads_running:  # conversions in worker threads cannot be stopped; each resumes
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + stop.signum)
        raise click.exceptions.Exit(128 + stop.signum) from None
    _report(app, result, plan_file, params)
    if not result.ok:
        failed = [i for i in result.items if i.status == "failed"]
        cancelled = len(result.failed) - len(failed)  # --fail-fast: not started, not failed
        if failed and not cancelled and all(i.exit_code == FolderBusyError.exit_code for i in failed):
            # nothing to fix: retried once those processes end, the same batch goes on (CI can retry 75)
            app.error(
                f"{len(failed)} of {n} job(s) found their folder being written by another quantize-model "
                "process; rerun the same batch once it ends"
            )
            raise click.exceptions.Exit(FolderBusyError.exit_code)
        not_started = f" ({cancelled} not started: --fail-fast)" if cancelled else ""
        app.error(
            f"{len(failed)} of {n} conversion(s) failed{not_started}; fix them and rerun the same batch"
        )
        raise click.exceptions.Exit(1)


def _report(app: App, result: Any, plan_file: Path, params: dict, interrupted: str | None = None) -> None:
    """The JUnit and JSON reports and the terminal table, for a whole or an interrupted batch."""
    to_stdout = params["json_path"] == "-"
    if params["junit_path"]:
        from converter.tools.junit import write_junit

        write_junit(result, params["junit_path"])
    data = {"plan": str(plan_file), "only": params["only"], "interrupted": interrupted, **result.to_json()}
    if params["json_path"] and not to_stdout:
        import json

        from converter.writer.manifest import atomic_write_bytes

        Path(params["json_path"]).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            Path(params["json_path"]), (json.dumps(data, indent=2, default=str) + "\n").encode()
        )
    if to_stdout:
        app.print_json(data)
    else:
        app.print_table(_table(result))


def _file_in_the_way(root: Path) -> Path | None:
    """The output root itself, or the nearest of its parents that exists, when it is not a folder (a
    file): no job can make its folder under it."""
    for candidate in (root, *root.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _outputs_in_sources(jobs: list, root: Path) -> str | None:
    """The error for jobs whose output folder (``root / output``) is, contains or lies inside a local
    source of the batch (an output root inside a source folder): convert refuses each such job, and the
    batch's own state files would land in that source too."""
    from converter.writer.manifest import source_overlap

    sources = {Path(j.source).expanduser() for j in jobs if Path(j.source).expanduser().exists()}
    for job in jobs:
        for src in sorted(sources):
            overlap = source_overlap(root / job.output, src, remedy="choose another output root")
            if overlap:
                return f"{job.where or job.source}: {overlap}"
    return None


def _check_report_path(app: App, option: str, path: Path) -> None:
    """Refuse, before any job runs, a report path that cannot be written (a typo, a read-only folder):
    found only after the last job, it failed the whole batch at its end."""
    import errno
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        app.abort(f"{path}: {option} cannot write its report there ({reason}); choose another path", 2)


def _given(ctx: click.Context, key: str) -> bool:
    source = ctx.get_parameter_source(key)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _how(r: Any) -> str:
    how = "no-op" if r.status == "up-to-date" and not r.pushed_to else r.status
    return f"{how}, pushed to {r.pushed_to}" if r.pushed_to else how


def _table(result: Any) -> Any:
    from rich.table import Table

    t = Table(show_edge=False)
    for col in ("source", "output", "status", "size out", "rel. RMSE", "time"):
        t.add_column(col, no_wrap=col != "status")
    for r in result.items:
        q = (r.quality or {}).get("rel_rmse")
        t.add_row(r.item.source, r.item.output, "FAILED" if r.status == "failed" else r.status,
                  human_bytes(r.bytes_out) if r.ok else "", f"{q:.4f}" if q is not None else "",
                  f"{r.seconds:.1f} s")  # fmt: skip
    return t


def _dry_run(app: App, jobs: list, root: Path, force: bool) -> None:
    """Each job's preflight: up to date (skipped), or what it would write and need; nothing written."""
    from rich.table import Table

    from converter.cli._app import describe_error
    from converter.tools.batch_run import in_plan_terms, preflight_job, replaces_stale_output, stamp_matches

    rows = []
    for k, job in enumerate(jobs):
        prefix = f"[{k + 1}/{len(jobs)}] {job.source}: "
        try:
            pre = preflight_job(job, root, {}, force=force, warn=lambda t, p=prefix: app.warn(p + t))
        except Exception as exc:
            error = in_plan_terms(describe_error(exc)[0], exc, job)
            rows.append({"job": job.to_json(), "action": "fail", "error": error})
            continue
        if pre.up_to_date and not force:
            action = "skip (up to date)" if stamp_matches(root, job, pre.fingerprint) else "verify, then skip"
        elif pre.refused and not replaces_stale_output(job, root, pre):
            rows.append({"job": job.to_json(), "action": "fail", "error": pre.refused})
            continue
        elif not pre.fits:
            action = "refuse (does not fit)"
        elif pre.refresh:  # every shard kept, the changed files rewritten: the run reports "refreshed"
            action = "refresh"
        else:
            action = "convert" if pre.disk_needed >= pre.bytes_out else "resume"
        rows.append({"job": job.to_json(), "action": action, "preflight": pre.to_json() | {"tensors": None},
                     "error": pre.problems[0] if pre.problems else None})  # fmt: skip
    # a preflight step in CI must fail when a job would: exit 2, as `convert --dry-run` that cannot fit
    failing = any(r["action"] in ("fail", "refuse (does not fit)") for r in rows)
    if app.json:
        app.print_json({"dry_run": True, "jobs": rows})
        if failing:
            raise click.exceptions.Exit(2)
        return
    t = Table(show_edge=False)
    for col in ("source", "output", "would", "size out", "bits/param", "peak RAM", "disk needed"):
        t.add_column(col, no_wrap=True)
    for r in rows:
        p = r.get("preflight") or {}
        sizes = (
            [human_bytes(p["bytes_out"]), f"{p['bits_per_param']:.2f}", human_bytes(p["peak_ram"]),
             human_bytes(p["disk_needed"])] if p else ["", "", "", ""]
        )  # fmt: skip
        t.add_row(r["job"]["source"], r["job"]["output"], r["action"], *sizes)
    app.print_table(t)
    for r in rows:
        if r.get("error"):
            source, error = r["job"]["source"], r["error"]
            app.error(error if error.startswith(source) else f"{source}: {error}")
    if failing:
        raise click.exceptions.Exit(2)
