"""``quantize-model dequantize SOURCE OUTPUT``: a quantized folder back to a plain safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from converter.cli._app import App, not_empty, not_empty_path, sigterm_as_interrupt, table
from converter.cli.convert import check_size
from converter.sources import looks_like_repo_id
from converter.units import human_bytes

EPILOG = """\b
Examples:
  quantize-model dequantize ./llama-nf4 ./llama-bf16
  quantize-model dequantize ./llama-nf4 ./llama-fp32 --dtype fp32 --max-shard-size 2GB
  quantize-model dequantize org/llama-nf4 ./llama-bf16 --revision main

Exit codes: 0 ok, 1 failed, 2 usage or input error, 75 another process is writing OUTPUT (retry once it
ends).
"""


@click.command("dequantize", short_help="Write a plain checkpoint from a quantized one", epilog=EPILOG)
@click.argument("source", callback=not_empty)
@click.argument("output", callback=not_empty_path)
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"],
              case_sensitive=False), default="bf16", show_default=True,
              help="dtype of every floating-point tensor written.")  # fmt: skip
@click.option(  # a bad size is a usage error naming the option, as convert's (it said only "invalid size")
    "--max-shard-size", default="5GB", show_default=True, callback=check_size, help="Largest output shard."
)
@click.option("--no-verify", is_flag=True, help="Skip the check of the shards against the index's digests.")
@click.option("--overwrite", is_flag=True, help="Replace whatever the output folder holds.")
@click.option("--revision", default=None, help="Hub branch, tag or commit (Hub repo ids only).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but warnings and errors.")
@click.pass_obj
def dequantize(
    app: App,
    source: str,
    output: Path,
    dtype: str,
    max_shard_size: str,
    no_verify: bool,
    overwrite: bool,
    revision: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Dequantize SOURCE (a quantized folder or Hub repo id) into the folder OUTPUT.

    Quantized weights are decoded exactly as bitsandbytes decodes them; other tensors are copied
    (floating-point ones cast to --dtype). config.json loses its quantization_config.
    """
    from converter.loader.dequantize import dequantize_checkpoint

    app.configure(json=as_json, quiet=quiet)
    if revision is not None and (Path(source).exists() or not looks_like_repo_id(source)):
        app.abort(f"--revision {revision!r} applies to Hub repos only, but {source!r} is a local path", 2)
    with sigterm_as_interrupt():  # a CI job cancelled or timed out: the one line (and JSON), exit 143
        result = dequantize_checkpoint(
            source,
            output,
            dtype=dtype,
            max_shard_size=max_shard_size,
            verify=not no_verify,
            overwrite=overwrite,
            revision=revision,
            warn=app.warn,
        )
    if app.json:
        app.print_json({"ok": True, **result.to_json()})
        return
    if result.up_to_date:
        app.info(f"{result.output}: already dequantized from the same source and options; nothing to do")
        return
    t = table()
    t.add_row("Output", str(result.output))
    t.add_row("dtype", result.dtype)
    t.add_row("Shards", str(len(result.shards)))
    t.add_row("Tensors dequantized", str(result.tensors_dequantized))
    t.add_row("Tensors copied", str(result.tensors_copied))
    t.add_row("Written", human_bytes(result.bytes_written))
    t.add_row("Time", f"{result.seconds:.1f} s")
    app.print_table(t)
