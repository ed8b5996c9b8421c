"""quantize-model batch LIST_FILE OUTPUT_ROOT: convert many checkpoints with the same options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from converter.cli._app import App
from converter.cli.convert import conversion_kwargs, conversion_options
from converter.units import human_bytes

EPILOG = """\b
LIST_FILE: one source per line (local path or Hub repo id, optional output name as a second
column, '#' comments), or a JSON list of sources / {"source", "output", "revision"} objects.
Each source goes to OUTPUT_ROOT/<name>. Failures are reported and the batch goes on; the exit
code is 1 if any item failed. Rerunning resumes unfinished items and skips finished ones.
"""


@click.command(short_help="Convert many checkpoints", epilog=EPILOG)
@click.argument("list_file", type=click.Path(path_type=Path))
@click.argument("output_root", type=click.Path(path_type=Path))
@conversion_options
@click.option("--overwrite", is_flag=True, help="Replace whatever each output folder holds.")
@click.option("--json", "as_json", is_flag=True, help="Print per-item results as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.pass_obj
def batch(app: App, list_file: Path, output_root: Path, **params: Any) -> None:
    """Convert every source listed in LIST_FILE into its own folder under OUTPUT_ROOT."""
    from converter.batch import read_list, run_batch

    app.configure(json=params["as_json"], quiet=params["quiet"])
    items = read_list(list_file)
    kwargs = conversion_kwargs(params)
    if kwargs["revision"] is not None:
        app.abort("--revision cannot apply to a whole batch; give it per item in a JSON list", 2)
    del kwargs["revision"]
    n = len(items)

    def on_done(k: int, r: Any) -> None:
        if r.ok:
            how = "no-op" if r.result.noop else "resumed" if r.result.resumed else "converted"
            app.info(f"[{k + 1}/{n}] {r.item.source} -> {r.item.output}: {how} in {r.seconds:.1f} s")
        else:
            app.error(f"[{k + 1}/{n}] {r.item.source}: {r.error}")

    result = run_batch(
        items,
        output_root,
        on_done=on_done,
        overwrite=params["overwrite"],
        progress=app.show_progress,
        **kwargs,
    )
    if app.json:
        app.print_json({"ok": result.ok, "items": [r.to_json() for r in result.items]})
    else:
        from rich.table import Table

        t = Table(show_edge=False)
        for col in ("source", "output", "status", "size out", "time"):
            t.add_column(col, no_wrap=col != "status")
        for r in result.items:
            size = human_bytes(r.result.bytes_out) if r.ok else ""
            t.add_row(r.item.source, r.item.output, "ok" if r.ok else "FAILED", size, f"{r.seconds:.1f} s")
        app.print_table(t)
    if not result.ok:
        app.error(f"{len(result.failed)} of {n} conversion(s) failed; fix them and rerun the same batch")
        raise click.exceptions.Exit(1)
