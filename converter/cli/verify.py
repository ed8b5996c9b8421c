"""quantize-model verify PATH: hashes and structure of a converted folder; exit 1 on any problem."""

from __future__ import annotations

from pathlib import Path

import click

from converter.cli._app import App, describe_error, not_empty, not_empty_path


@click.command(short_help="Check shard hashes and structure")
@click.argument("path", callback=not_empty_path)
@click.option(
    "--against",
    "against",
    metavar="SRC",
    default=None,
    callback=not_empty,  # --against "$SRC" with SRC unset: not the current folder
    help="Also recompute each quantized tensor's error statistics against the source SRC.",
)
@click.option("--revision", default=None, help="Hub branch, tag or commit of --against (Hub sources only).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but the problems: the exit code says.")
@click.pass_obj
def verify(
    app: App, path: Path, against: str | None, revision: str | None, as_json: bool, quiet: bool
) -> None:
    """Re-hash every shard of PATH against its index and validate every shard and quantized record.

    With --against SRC, also recompute relative RMSE, max absolute error, SNR and non-finite counts
    of every quantized tensor against SRC and compare them with quantization_report.json.
    Exits 1 if anything does not match (each problem on its own line on stderr).
    """
    from converter.tools.inspection import verify_path
    from formats.validate import FormatError

    app.configure(json=as_json, quiet=quiet)
    if revision is not None and against is None:  # it names the --against repo's branch: never ignored
        msg = f"--revision {revision!r} is the revision of --against SRC: add --against, or leave it out"
        app.abort(msg, 2)
    try:
        r = verify_path(path)
    except FormatError as exc:  # an index it cannot read: a problem verify found (exit 1, not 2)
        app.abort(describe_error(exc)[0], 1)
    quality = None
    if against is not None and r.ok:
        from converter.tools.verify_quality import verify_against

        quality, problems = verify_against(path, against, revision=revision)
        r.problems.extend(problems)
        if quality["not_from_source"]:  # the folder may be fine: the source is another
            r.remedy = "give --against the source this folder was converted from"
    if app.json:
        app.print_json({**r.to_json(), "quality": quality})
    for note in r.notes:
        app.info(f"Note: {note}")
    for problem in r.problems:
        app.error(problem)
    if not r.ok:
        remedy = f"; {r.remedy}" if r.remedy else ""
        app.error(f"{path}: {len(r.problems)} problem(s) found{remedy}")
        raise click.exceptions.Exit(1)
    if not (app.json or app.quiet):
        app.out.print(f"OK: {len(r.shards)} shard(s), {r.tensors} tensors verified in {path}")
        if quality is not None:
            worst = quality["worst"][0] if quality["worst"] else None
            app.out.print(
                f"Against {against}: {quality['tensors_measured']} quantized tensors, relative RMSE "
                f"{quality['rel_rmse']:.4f}, SNR {quality['snr_db']:.2f} dB, max abs error "
                f"{quality['max_abs_err']:.4g}"
                + (f"; worst {worst['name']} ({worst['rel_rmse']:.4f})" if worst else "")
            )
