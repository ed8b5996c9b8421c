"""Printing a preflight (``convert --dry-run``): every tensor's fate, then what the run needs."""

from __future__ import annotations

from typing import Any

from converter.cli._app import App, table
from converter.cli._moe_rows import moe_rows
from converter.units import human_bytes, human_count


def show_preflight(app: App, pre: Any) -> None:
    """``pre`` is converter.plan.preflight.Preflight; exits 2 when the run would be refused."""
    import click
    from rich.table import Table

    if app.json:
        app.print_json({"ok": pre.fits and not pre.refused, "dry_run": True, **pre.to_json()})
    else:
        t = Table(show_edge=False)
        for col in ("tensor", "shape", "dtype", "fate", "reason", "bytes out"):
            t.add_column(col, no_wrap=True)
        for x in pre.tensors:
            shape = "x".join(map(str, x["shape"])) or "scalar"
            dtype = x["dtype"] if x["out_dtype"] == x["dtype"] else f"{x['dtype']}->{x['out_dtype']}"
            t.add_row(x["name"], shape, dtype, x["action"], x["reason"], human_bytes(x["bytes_out"]))
        app.print_table(t)
        s = table("Plan (nothing written)")
        s.add_row("Source", pre.source)
        note = "  (already converted: a run does nothing)" if pre.up_to_date else ""
        if pre.refresh:
            note = f"  (already converted: a run rewrites {', '.join(pre.refresh)}, every shard kept)"
        s.add_row("Output", pre.output + ("  (a run refuses it: see the error)" if pre.refused else note))
        s.add_row("Tensors", f"{sum(1 for x in pre.tensors if x['action'] == 'quantize')} quantized, "
                             f"{sum(1 for x in pre.tensors if x['action'] == 'keep')} kept")  # fmt: skip
        s.add_row(
            "Parameters",
            f"{human_count(pre.params_quantized)} quantized, {human_count(pre.params_kept)} kept",
        )
        s.add_row("Size in / out", f"{human_bytes(pre.bytes_in)} / {human_bytes(pre.bytes_out)} "
                                   f"({pre.bits_per_param:.2f} bits per parameter)")  # fmt: skip
        ram = human_bytes(pre.ram_available) if pre.ram_available is not None else "unknown"
        s.add_row("Peak memory", f"{human_bytes(pre.peak_ram)} needed, {ram} available")
        s.add_row("Disk", f"{human_bytes(pre.disk_needed)} needed, {human_bytes(pre.disk_free)} free on "
                          f"{pre.disk_path}")  # fmt: skip
        if pre.download_bytes:
            s.add_row("Downloads", human_bytes(pre.download_bytes))
        s.add_row("Fits", "yes" if pre.fits else "NO")
        moe_rows(s, pre.moe)
        app.print_table(s)
    for problem in [*pre.problems, *([pre.refused] if pre.refused else [])]:
        app.error(problem)
    if not pre.fits or pre.refused:
        raise click.exceptions.Exit(2)
