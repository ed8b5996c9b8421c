"""quantize-model convert SOURCE OUTPUT: one checkpoint to a quantized folder."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from converter.cli._app import App, not_empty, not_empty_path, sigterm_as_interrupt, table
from converter.cli._moe_rows import moe_rows
from converter.errors import InputError
from converter.methods import method_names
from converter.plan.tensor_plan import QUANT_STORAGES, normalize_dtype, parse_size
from converter.units import human_bytes, human_count
from formats.quant_types import BLOCKSIZES

EPILOG = """\b
Examples:
  quantize-model convert ./my-model ./my-model-nf4
  quantize-model convert meta-llama/Llama-3.2-1B ./llama-nf4 --revision main --dtype bfloat16
  quantize-model convert ./gpt2 ./gpt2-fp4 --quant-type fp4 --no-double-quant --skip 'transformer.h.0.*'
  quantize-model convert ./llama-8b ./llama-8b-int8 --quant-type int8 --int8-threshold 6.0

Rerunning the same command resumes an interrupted conversion, or does nothing if it finished.
Exit codes: 0 ok, 1 conversion failed, 2 usage or input error, 75 another process is writing OUTPUT
(retry once it ends), 130 interrupted (Ctrl-C; 143 for SIGTERM; rerun to resume).
"""

#: as dequantize takes them: the short names too (normalized by _dtype_name, so a batch's key is one)
_DTYPES = click.Choice(["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"], case_sensitive=False)


def _dtype_name(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """'bf16' / 'BF16' -> 'bfloat16': one spelling downstream (plans, batch keys, messages)."""
    return normalize_dtype(value, f"--{param.name.replace('_', '-')}") if value else value


def _check_device(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """The spelling, before any work (batch ran every job to fail each with it); whether this machine
    has that GPU is resolve_device's concern."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        msg = f"{value!r} is not valid: use cpu, cuda or cuda:N"
        raise click.BadParameter(msg)
    return value


def _check_threads(_ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
    """More threads than the kernels run is a usage error naming the limit (their pool capped it silently)."""
    from converter.kernels import MAX_THREADS, threads_beyond_limit

    if value is not None and value > MAX_THREADS:
        msg = f"{threads_beyond_limit(value)}, or leave it out for one per CPU"
        raise click.BadParameter(msg)
    return value


def check_size(_ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A size the writer takes ('5GB', '2GiB'), checked as a usage error that names the option."""
    try:
        parse_size(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def conversion_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options shared by ``convert`` and ``batch`` (everything that shapes one conversion)."""
    options = [
        click.option("--quant-type", type=click.Choice(list(method_names()), case_sensitive=False),
                     default="nf4", show_default=True,
                     help="nf4 / fp4: 4-bit (Linear4bit); int8: LLM.int8 8-bit (Linear8bitLt)."),
        click.option("--int8-threshold", type=click.FloatRange(min=0), default=6.0, show_default=True,
                     help="int8: llm_int8_threshold in config.json (outlier split at inference)."),
        click.option("--int8-scale", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="int8: row scale of bitsandbytes on CPU, or on CUDA (__fdividef) to reproduce "
                          "GPU-made bytes."),
        click.option("--double-quant/--no-double-quant", default=True, show_default=True,
                     help="Quantize the absmax constants too (nested quantization)."),
        click.option("--blocksize", type=click.Choice([str(b) for b in BLOCKSIZES]),
                     default="64", show_default=True, help="Elements per absmax block."),
        click.option("--compute-dtype", type=_DTYPES, default=None, callback=_dtype_name,
                     help="bnb_4bit_compute_dtype in config.json [default: the model dtype]."),
        click.option("--dtype", type=_DTYPES, default=None, callback=_dtype_name,
                     help="Cast weights to this dtype before quantizing, as transformers does."),
        click.option("--quant-storage", type=click.Choice(list(QUANT_STORAGES)),
                     default="uint8", show_default=True, help="dtype the packed weights are stored as."),
        click.option("--skip", multiple=True, metavar="GLOB",
                     help="Keep modules/tensors matching GLOB unquantized (repeatable)."),
        click.option("--include", multiple=True, metavar="GLOB",
                     help="Quantize only modules/tensors matching GLOB (repeatable)."),
        click.option("--max-shard-size", default="5GB", show_default=True, callback=check_size,
                     help="Largest output shard."),
        click.option("--threads", type=click.IntRange(min=1), default=None, callback=_check_threads,
                     help="Kernel threads, at most 256 [default: the CPUs this process may use]."),
        click.option("--device", default="cpu", show_default=True, callback=_check_device,
                     help="Where to quantize: cpu, cuda or cuda:N."),
        click.option("--revision", default=None, help="Hub branch, tag or commit (Hub sources only)."),
        click.option("--keep-downloads", is_flag=True, help="Keep downloaded Hub files in the cache."),
        click.option("--allow-pickle", is_flag=True,
                     help="Accept pickle (.bin) weights from a source you trust."),
        click.option("--moe-experts", type=click.Choice(["keep", "quantize"], case_sensitive=False),
                     default="keep", show_default=True,
                     help="MoE routed experts: keep 16-bit (stock transformers loads the folder) or "
                          "quantize to 4 bit (quantize-model, vLLM, transformers 4.x, unsloth load it)."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def options_not_for(ctx: click.Context, quant_type: str) -> str | None:
    """The warning for options given on the command line that this quant type does not read (another
    method's own options: ``--int8-threshold`` on an nf4 run; docs/cli.md: they do not apply), so that
    none is dropped without a word; None when there are none."""
    from click.core import ParameterSource

    from converter.methods import foreign_options

    params = {p.name: p for p in ctx.command.params}
    given = [
        " / ".join(params[name].opts + params[name].secondary_opts)
        for name in foreign_options(quant_type)
        if name in params and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    ]
    if not given:
        return None
    them = "them" if len(given) > 1 else "it"
    return f"{', '.join(given)}: not used by --quant-type {quant_type}; leave {them} out"


def conversion_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """Click parameters -> keyword arguments of converter.writer.pipeline.convert."""
    return {
        "quant_type": params["quant_type"].lower(),
        "double_quant": params["double_quant"],
        "blocksize": int(params["blocksize"]),
        "compute_dtype": params["compute_dtype"],
        "dtype": params["dtype"],
        "quant_storage": params["quant_storage"],
        "int8_threshold": params["int8_threshold"],
        "int8_scale": params["int8_scale"],
        "skip": tuple(params["skip"]),
        "include": tuple(params["include"]),
        "max_shard_size": params["max_shard_size"],
        "threads": params["threads"],
        "device": params["device"],
        "revision": params["revision"],
        "keep_downloads": params["keep_downloads"],
        "allow_pickle": params["allow_pickle"],
        "moe_experts": params["moe_experts"].lower(),
    }


@click.command(short_help="Quantize one checkpoint", epilog=EPILOG)
@click.argument("source", callback=not_empty)
@click.argument("output", callback=not_empty_path)
@conversion_options
@click.option("--overwrite", is_flag=True, help="Replace whatever the output folder holds.")
@click.option("--push-to", metavar="REPO_ID", default=None, help="Upload the result to this Hub repo.")
@click.option("--private", is_flag=True, help="Create the --push-to repo as private.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but warnings and errors.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Plan only: each tensor's fate, output size, memory and disk needed; write nothing.",
)
@click.pass_obj
def convert(app: App, source: str, output: Path, **params: Any) -> None:
    """Quantize SOURCE (a local folder, a .safetensors file or a Hub repo id) into the folder OUTPUT."""
    from converter.writer.pipeline import convert as run_convert
    from converter.writer.pipeline import resolve_device

    app.configure(json=params["as_json"], quiet=params["quiet"])
    if unused := options_not_for(click.get_current_context(), params["quant_type"].lower()):
        app.warn(unused)
    if params["dry_run"]:
        from converter.cli._preflight import show_preflight

        kwargs = conversion_kwargs(params)
        dry = run_convert(
            source,
            output,
            overwrite=params["overwrite"],
            push_to=params["push_to"],  # checked, not pushed: --private without it is refused
            private=params["private"],
            progress=False,
            dry_run=True,
            warn=app.warn,
            **kwargs,
        )
        show_preflight(app, dry.preflight)
        return
    _, fallback_note = resolve_device(params["device"])
    if fallback_note:
        app.warn(fallback_note)  # before the long work starts; convert() falls back the same way
    with sigterm_as_interrupt():  # a CI job cancelled or timed out: the one line (and JSON), exit 143
        result = run_convert(
            source,
            output,
            overwrite=params["overwrite"],
            push_to=params["push_to"],
            private=params["private"],
            progress=app.show_progress,
            warn=app.warn,
            **conversion_kwargs(params),
        )
    if app.json:
        app.print_json({"ok": True, **result.to_json()})
        return
    if result.noop:
        app.info(f"{result.output}: already converted with the same source and options; nothing to do")
    elif result.refreshed:
        app.info(
            f"{result.output}: already converted; the files that changed in the source since were "
            f"rewritten ({result.shards_reused} shard(s) kept)"
        )
    elif result.resumed:
        app.info(
            f"{result.output}: resumed an interrupted conversion ({result.shards_reused} shard(s) reused)"
        )
    app.print_table(summary_table(result))


def summary_table(result: Any) -> Any:
    t = table()
    t.add_row("Output", str(result.output))
    t.add_row("Shards", str(len(result.shards)))
    t.add_row(
        "Tensors quantized", f"{result.tensors_quantized} ({human_count(result.params_quantized)} params)"
    )
    t.add_row(
        "Tensors kept",
        f"{result.tensors_kept} ({human_count(result.params_kept)} params, "
        f"{100 * result.kept_share:.1f}% of parameters left in 16/32 bit)",
    )
    t.add_row("Bytes in / out", f"{human_bytes(result.bytes_in)} / {human_bytes(result.bytes_out)}")
    t.add_row(
        "Bits per parameter",
        f"{result.bits_per_param:.2f} overall, {result.quantized_bits_per_param:.2f} in quantized weights",
    )
    t.add_row("Time", f"{result.seconds:.2f} s")
    if not result.noop and result.bytes_read:  # a rerun that rewrote only small files read no shard
        t.add_row("Throughput", f"{human_bytes(result.throughput)}/s")
    if result.pushed_to:
        t.add_row("Pushed to", result.pushed_to)
    moe_rows(t, result.moe)
    return t
