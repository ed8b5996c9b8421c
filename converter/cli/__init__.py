"""The ``quantize-model`` command: a Click group, one module per command, all thin over the library.

Each command module defines one Click command; it is registered below, one line each. Commands take
the App (``@click.pass_obj``), call a library function that returns a result object, and print
through the App. Errors raised by the library become one line and an exit code in ``_Group.invoke``
(exit codes: 0 ok, 1 failed, 2 usage or input error; docs/cli.md).
"""

from __future__ import annotations

import json

import click

from converter.cli._app import App


def _version_message() -> str:
    from converter import __version__

    try:
        from converter.quantize.host_backends import available_backends  # torch only where a GPU is present

        backends = available_backends()
        parts = []
        for name, info in backends.items():
            if name == "cpu" and isinstance(info, dict):
                parts.append(f"cpu ({', '.join(info.get('isa', []))}; {info.get('threads', '?')} threads)")
            else:
                parts.append(name)
        kernels = ", ".join(parts) or "none"
    except ImportError as exc:
        kernels = f"unavailable ({exc}); reinstall with: pip install -e ."
    return f"quantize-model {__version__}\nkernels: {kernels}"


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_version_message())
        ctx.exit(0)


def _json_on_stdout(group: click.Group, ctx: click.Context) -> bool:
    """Whether the command's arguments ask for JSON on stdout: its ``--json`` flag, or batch's
    ``--json`` without a FILE (``--json FILE`` puts the report in FILE; stdout is not JSON then)."""
    args = ctx.args
    if "--json=-" in args:
        return True
    if "--json" not in args:
        return False
    names = getattr(ctx, "_protected_args", None) or ctx.protected_args
    command = group.get_command(ctx, names[0]) if names else None
    option = next((p for p in command.params if "--json" in p.opts), None) if command else None
    if option is None or getattr(option, "is_flag", True):
        return True
    value = args[args.index("--json") + 1 :][:1]  # an optional value: the next word, unless an option
    return not value or value[0].startswith("-")


class _Group(click.Group):
    """Turns library exceptions into the error table's one-line messages and exit codes."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        # The command's own arguments, before it parses them: a usage error happens before --json is
        # known to the command, and docs/cli.md promises the JSON error object for every error.
        wants_json = _json_on_stdout(self, ctx)
        try:
            return super().invoke(ctx)
        except click.exceptions.UsageError as exc:
            if wants_json:
                error = {"ok": False, "error": exc.format_message(), "exit_code": exc.exit_code}
                click.echo(json.dumps(error, indent=2))
            raise
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            app = ctx.obj if isinstance(ctx.obj, App) else App()
            app.fail_with(exc)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_version,
    help="Show the version and the kernel backends, then exit.",
)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Pre-quantize Hugging Face checkpoints to bitsandbytes-compatible 4-bit (NF4/FP4) shards."""
    ctx.obj = App()


def _register() -> None:
    # One line per command (click lists them alphabetically in --help).
    from converter.cli.batch import batch
    from converter.cli.convert import convert
    from converter.cli.dequantize import dequantize
    from converter.cli.info import info
    from converter.cli.inspect import inspect
    from converter.cli.push import push
    from converter.cli.verify import verify

    cli.add_command(convert)
    cli.add_command(batch)
    cli.add_command(inspect)
    cli.add_command(verify)
    cli.add_command(push)
    cli.add_command(dequantize)
    cli.add_command(info)


_register()


def main() -> None:
    """Console-script entry point (``quantize-model``)."""
    cli(prog_name="quantize-model")
