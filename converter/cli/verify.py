"""quantize-model verify PATH: hashes and structure of a converted folder; exit 1 on any problem."""

from __future__ import annotations

from pathlib import Path

import click

from converter.cli._app import App


@click.command(short_help="Check shard hashes and structure")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.pass_obj
def verify(app: App, path: Path, as_json: bool) -> None:
    """Re-hash every shard of PATH against its index and validate every shard and quantized record.

    Exits 1 if anything does not match (each problem on its own line on stderr).
    """
    from converter.inspection import verify_path

    app.configure(json=as_json)
    r = verify_path(path)
    if app.json:
        app.print_json(r.to_json())
    for problem in r.problems:
        app.error(problem)
    if not r.ok:
        app.error(f"{path}: {len(r.problems)} problem(s) found; reconvert with --overwrite")
        raise click.exceptions.Exit(1)
    if not app.json:
        app.out.print(f"OK: {len(r.shards)} shard(s), {r.tensors} tensors verified in {path}")
