"""quantize-model inspect PATH: what a quantized folder or shard holds."""

from __future__ import annotations

from pathlib import Path

import click

from converter.cli._app import App, not_empty, table
from converter.methods import for_config
from converter.units import human_bytes, human_count


@click.command(short_help="Summarise a quantized folder, shard or Hub repo")
@click.argument("spec", metavar="PATH", callback=not_empty)
@click.option("--revision", default=None, help="Hub branch, tag or commit (a Hub repo id only).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option(
    "--memory",
    is_flag=True,
    help="Estimate what each device holds when loaded with --device-map/--max-memory "
    "(a folder or Hub repo id).",
)
@click.option(
    "--device-map",
    default="auto",
    show_default=True,
    help="auto, balanced, balanced_low_0, sequential, a device, or JSON {module: device} (with --memory).",
)
@click.option(
    "--max-memory",
    multiple=True,
    metavar="DEVICE=SIZE",
    help="Budget per device for --memory, e.g. 0=30GiB, cpu=64GiB (repeatable).",
)
@click.option(
    "--dtype",
    # the short names too, as convert and dequantize take them ("bf16" was a usage error here)
    type=click.Choice(["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"], case_sensitive=False),
    default="bfloat16",
    show_default=True,
    help="dtype of the non-quantized tensors once loaded (with --memory).",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Run the repository code its config.json names (auto_map) to build the model (with --memory).",
)
@click.pass_obj
def inspect(
    app: App,
    spec: str,
    revision: str | None,
    as_json: bool,
    memory: bool,
    device_map: str,
    max_memory: tuple[str, ...],
    dtype: str,
    trust_remote_code: bool,
) -> None:
    """Summarise PATH (a converted folder, one .safetensors shard, or a Hub repo id read by HTTP range
    requests, nothing downloaded): tensors, quant types, sizes."""
    from converter.sources import looks_like_repo_id
    from converter.tools.inspection import inspect_hub, inspect_path, unfinished_conversion
    from converter.writer.manifest import damaged_manifest

    app.configure(json=as_json)
    path = Path(spec)  # spec as typed: click's Path type turns "./name" into "name", a repo id
    ctx = click.get_current_context()
    options = ("device_map", "max_memory", "dtype", "trust_remote_code")
    given = [f"--{name.replace('_', '-')}" for name in options
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]  # fmt: skip
    if given and not memory:  # they shape only the memory estimate; ignored, they would look applied
        verb = "applies" if len(given) == 1 else "apply"
        msg = f"{', '.join(given)} {verb} to the memory estimate only: add --memory"
        raise click.UsageError(msg)
    hub = not path.exists() and looks_like_repo_id(spec)  # as typed: "./name" is a path, never a repo
    if revision is not None and not hub:
        app.abort(f"--revision applies to Hub repos only, but {path} is a local path", 2)
    if memory:
        from converter.cli.inspect_memory import show_memory

        show_memory(
            app, path, device_map, max_memory, dtype, revision=revision, trust_remote_code=trust_remote_code
        )
        return
    if hub:
        from converter.sources import not_a_local_path_either
        from converter.sources.hub_client import HubRepoNotCachedError, HubRepoNotFoundError

        try:
            r = inspect_hub(spec, revision=revision)
        except (HubRepoNotFoundError, HubRepoNotCachedError) as exc:
            raise not_a_local_path_either(exc, spec) from None
    else:
        r = inspect_path(path)
        for warning in r.warnings:
            app.warn(warning)
        damaged = damaged_manifest(path) if path.is_dir() else None
        if damaged is not None:
            app.warn(damaged)
        elif path.is_dir() and unfinished_conversion(path):
            app.warn(f"{path}: the conversion did not finish (shown: the shards written so far); rerun "
                     f"the same convert command to resume")  # fmt: skip
    if app.json:
        app.print_json(r.to_json())
        return
    t = table()
    t.add_row("Path", r.path)
    if r.source:
        t.add_row("Source", r.source)
    if r.tool_version:
        t.add_row("Written by", f"quantize-model {r.tool_version}")
    t.add_row("Shards", str(len(r.shards)))
    if r.bytes_read is not None:
        t.add_row("Read from the Hub", f"{human_bytes(r.bytes_read)} (headers and quant states only)")
    t.add_row("Quantized", f"{r.tensors_quantized} tensors, {human_count(r.params_quantized)} params")
    for label, count in r.quant_types.items():
        t.add_row("", f"{count} x {label}")
    kept = ", ".join(f"{n} {d}" for d, n in r.kept_dtypes.items()) or "none"
    t.add_row("Kept", f"{r.tensors_kept} tensors, {human_count(r.params_kept)} params ({kept})")
    t.add_row("Size", f"{human_bytes(r.bytes_quantized + r.bytes_kept)} of tensor data")
    t.add_row(
        "Bits per parameter", f"{r.bits_per_param:.2f} overall, {r.quantized_bits_per_param:.3f} quantized"
    )
    if r.moe:
        t.add_row("MoE experts", f"{r.moe.layout}: {r.moe.counts}")
        t.add_row("Loads with", "; ".join(r.moe.loaders))
        if r.moe.not_loaders:
            t.add_row("Not with", "; ".join(r.moe.not_loaders))
    if r.quantization_config:
        q = r.quantization_config
        method = for_config(q)
        t.add_row("quantization_config", method.config_summary(q) if method else str(q)[:200])
    app.print_table(t)
