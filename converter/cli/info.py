"""quantize-model info: versions, the kernel backends this installation can use and the selection table."""

from __future__ import annotations

from typing import Any

import click

from converter.cli._app import App, table
from converter.units import human_bytes


def backend_report() -> dict[str, Any]:
    """Tool and format versions, CPU kernel paths, the CUDA backend (or why it is not usable) and the
    transformers versions the shipped selection table is valid for.

    A bad ``QM_CPU_ISA`` does not stop the report (it is what one runs to find out what is wrong): the
    error convert and dequantize refuse it with is ``cpu.forced_error``, ``cpu.forced`` None."""
    from converter import __version__
    from converter.errors import InputError
    from converter.kernels import bnb4bit as kernels
    from converter.kernels.bnb4bit_cuda import cuda_status
    from converter.kernels.isa_env import forced_isa
    from converter.plan.selection_table import table_info
    from formats.validate import FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS

    backends = kernels.available_backends()
    usable, why = cuda_status()
    try:
        forced, forced_error = forced_isa(), None
    except InputError as exc:
        forced, forced_error = None, str(exc)
    return {
        "version": __version__,
        "format_version": FORMAT_VERSION,  # written; 2 where a folder holds fused experts records
        "format_versions_read": list(SUPPORTED_FORMAT_VERSIONS),
        "cpu": {**backends["cpu"], "forced": forced, "forced_error": forced_error},
        "cuda": backends.get("cuda") if usable else None,
        "cuda_unavailable_reason": None if usable else why,
        # the shipped selection table: the transformers versions it is valid for, whether this one is
        "selection_table": table_info(),
    }


def _selection_row(t: dict[str, Any]) -> str:
    if not t["transformers"]:
        return "no shipped table (each model config takes the live rule once, then the per-user cache)"
    n = len(t["architectures"])
    listed = f"shipped table of {n} architectures for transformers {', '.join(t['transformers'])}"
    if t["used"]:
        return f"{listed} (used: {t['installed']} is installed)"
    installed = f"transformers {t['installed']} is installed" if t["installed"] else "no transformers"
    return f"{listed} (not used: {installed})"


@click.command(short_help="Show versions and kernel backends")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.pass_obj
def info(app: App, as_json: bool) -> None:
    """Show the tool and format versions and which kernel backends (CPU paths, CUDA devices) work here."""
    app.configure(json=as_json)
    r = backend_report()
    if r["cpu"]["forced_error"]:  # on stderr, before the report (stdout stays the report alone)
        app.warn(r["cpu"]["forced_error"])
    if app.json:
        app.print_json(r)
        return
    t = table()
    t.add_row("quantize-model", r["version"])
    read = " and ".join(map(str, r["format_versions_read"]))
    t.add_row("Format version", f"{r['format_version']} (2 with fused experts records; reads {read})")
    forced = f"; QM_CPU_ISA forces {r['cpu']['forced']}" if r["cpu"]["forced"] else ""
    t.add_row("CPU kernels", f"{', '.join(r['cpu']['isa'])} ({r['cpu']['threads']} threads{forced})")
    if r["cuda"] is None:
        t.add_row("CUDA kernels", f"not usable: {r['cuda_unavailable_reason']}")
    else:
        for d in r["cuda"].get("devices", []):
            details = f"sm {d['capability']}, {human_bytes(d['total_memory'])}, {d['multiprocessors']} SMs"
            t.add_row("CUDA kernels", f"{d['name']} ({details})")
    t.add_row("Selection", _selection_row(r["selection_table"]))
    app.print_table(t)
