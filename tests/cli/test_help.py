"""`--help` against docs/cli.md: every option a command takes is documented in its section, and the
help says what the option does (the words docs/cli.md uses)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from converter.cli import cli

DOC = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()


def _section(command: str) -> str:
    """docs/cli.md's '## `COMMAND ...`' section(s); batch also takes convert's options."""
    parts = re.split(r"\n## ", DOC)
    names = (command, "convert") if command == "batch" else (command,)
    return "\n".join(p for p in parts if any(p.startswith(f"`{n}") for n in names))


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_option_is_documented(command: str) -> None:
    """push and dequantize took --json, -q, --private, --revision, --no-verify, --overwrite that
    docs/cli.md did not name."""
    section = _section(command)
    assert section, command
    params = [p for p in cli.commands[command].params if isinstance(p, click.Option)]
    options = {o for p in params for o in (*p.opts, *p.secondary_opts)}  # -q and --no-double-quant too
    hidden = {o for p in params if p.hidden for o in p.opts}
    missing = sorted(
        o for o in options - hidden - {"--help"} if not re.search(rf"(?<![\w-]){o}(?![\w-])", section)
    )
    assert not missing, f"{command}: {missing} not in docs/cli.md"


def test_the_tools_own_options_are_documented() -> None:
    """`quantize-model --version` and the help options (-h as well as --help, on every command) are in
    docs/cli.md's opening section."""
    top = re.split(r"\n## ", DOC)[0]
    names = [*cli.context_settings["help_option_names"], *(o for p in cli.params for o in p.opts)]
    missing = [o for o in names if not re.search(rf"(?<![\w-]){o}(?![\w-])", top)]
    assert not missing, f"{missing} not in docs/cli.md's opening section"


def test_help_says_what_quiet_and_device_do(qm) -> None:
    """-q said "Print nothing but errors" (warnings print: docs/cli.md); --device said "cpu or cuda"
    (cuda:N picks a GPU); convert's exit codes left out 130."""
    for command in ("convert", "batch", "push", "dequantize"):
        r = qm(command, "--help")
        assert "Print nothing but warnings and errors." in " ".join(r.stdout.split()), command
    text = " ".join(qm("convert", "--help").stdout.split())
    assert "Where to quantize: cpu, cuda or cuda:N." in text
    assert "130 interrupted" in text


def test_batch_help_says_its_revision_is_refused(qm) -> None:
    """batch --help showed convert's "--revision TEXT  Hub branch, tag or commit (Hub sources only)."
    though a batch refuses it (exit 2; docs/cli.md: give it per job)."""
    text = " ".join(qm("batch", "--help").stdout.split())
    assert "--revision TEXT Refused: give a revision per job in the plan or JSON list." in text
    assert "Hub branch, tag or commit" in " ".join(qm("convert", "--help").stdout.split())


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_documented_option_exists(command: str) -> None:
    """The other direction: each `--option` docs/cli.md names in a command's section is one that
    command takes (or, written "`other --option", one of that other command's)."""
    section = "\n".join(p for p in re.split(r"\n## ", DOC) if p.startswith(f"`{command}"))
    wrong = []
    for other, option in re.findall(r"(?:`(\w+) )?(?<![\w-])(--[a-z][a-z0-9-]*)", section):
        owner = other if other in cli.commands else command
        if option not in {o for p in cli.commands[owner].params for o in (*p.opts, *p.secondary_opts)}:
            wrong.append(f"{owner} {option}")
    assert not wrong, f"docs/cli.md names options that do not exist: {wrong}"


def test_convert_table_defaults_are_the_parsers() -> None:
    """Each default docs/cli.md's convert table gives is the one click applies (on/off for flags)."""
    section = _section("convert")
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if line.startswith("| `-"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for option in re.findall(r"`(--[a-z0-9-]+)", cells[0]):
                rows[option] = cells[1]
    wrong = []
    for p in cli.commands["convert"].params:
        if not isinstance(p, click.Option) or p.opts[-1] not in rows:
            continue
        documented = rows[p.opts[-1]]
        if p.is_flag:
            expected = "on" if p.default is True else ("off", "")
        elif p.default is None or p.multiple:
            continue  # "the model dtype", "CPUs of this process", "main": said in words
        else:
            expected = str(p.default)
        if documented not in (expected if isinstance(expected, tuple) else (expected,)):
            wrong.append(f"{p.opts[-1]}: docs say {documented!r}, the parser {p.default!r}")
    assert len(rows) > 15
    assert not wrong, wrong


def test_inspect_help_says_memory_takes_a_hub_repo(qm) -> None:
    """`inspect --memory` said "(a folder)", though it plans a Hub repo id from range reads (docs/cli.md)."""
    text = " ".join(qm("inspect", "--help").stdout.split())
    assert "--device-map/--max-memory (a folder or Hub repo id)." in text


def test_convert_help_examples_run_without_a_warning_about_their_options(
    qm, tiny_llama: Path, tmp_path: Path, monkeypatch
) -> None:
    """The local examples of `convert --help`, planned on tiny checkpoints of their kind: the GPT-2 one
    passed `--skip 'lm_head'`, which a GPT-2 checkpoint (tied head, no lm_head tensor) answers with
    "--skip 'lm_head' matches no tensor or module of the checkpoint"."""
    import shlex
    import shutil

    from tiny_models import make_tiny

    monkeypatch.chdir(tmp_path)
    make_tiny("gpt2", tmp_path / "gpt2")
    for name in ("my-model", "llama-8b"):
        shutil.copytree(tiny_llama, tmp_path / name)
    lines = [line.strip() for line in cli.commands["convert"].epilog.splitlines()]
    examples = [shlex.split(line)[2:] for line in lines if line.startswith("quantize-model convert ./")]
    assert len(examples) == 3
    for args in examples:
        r = qm("convert", *args, "--dry-run", "-q")
        assert r.exit_code == 0, (args, r.output)
        option_warnings = [w for w in r.stderr.splitlines() if "matches no" in w or "not used by" in w]
        assert not option_warnings, (args, option_warnings)


def _json_keys(value: dict, nested: set[str]) -> set[str]:
    """The keys of a JSON object, and those of the objects under ``nested`` keys."""
    return set(value) | {k for n in nested & set(value) if isinstance(value[n], dict) for k in value[n]}


@pytest.mark.parametrize(
    ("command", "option", "marker"),
    [
        ("verify", None, "`--json` for machines (`{"),
        ("inspect", None, "`--json` for machines (`{"),
        ("inspect", "--memory", "(`--json`: `{"),
        ("dequantize", None, "(`--json`: `{"),
        ("info", None, "`--json` for machines (`{"),
    ],
)
def test_documented_json_keys_are_the_commands(
    qm, tiny_llama: Path, tmp_path: Path, command: str, option: str | None, marker: str
) -> None:
    """The `{"key", ...}` docs/cli.md gives for a command's --json output is what it prints (dequantize,
    push and info printed keys no doc named)."""
    import json

    section = "\n".join(p for p in re.split(r"\n## ", DOC) if p.startswith(f"`{command}"))
    start = section.index(marker) + len(marker) - 1
    shown = section[start : section.index("}`", start)]
    documented = set(re.findall(r'"(\w+)"', shown))
    nested = set(re.findall(r'"(\w+)": \{', shown))  # info's "cpu": {...}
    folder = tmp_path / "nf4"
    assert qm("convert", tiny_llama, folder, "-q").exit_code == 0
    args = {"verify": [folder], "inspect": [folder], "dequantize": [folder, tmp_path / "plain"], "info": []}
    r = qm(command, *args[command], *([option] if option else []), "--json")
    assert r.exit_code == 0, r.output
    printed = _json_keys(json.loads(r.stdout), nested)
    assert documented == printed - ({"ok"} - documented)  # "ok": true, cli.md's opening says


def test_convert_json_keys_are_the_ones_python_api_md_lists(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """python-api.md lists ConversionResult.to_json()'s keys, which `convert --json` prints after "ok"."""
    import json

    api = (Path(__file__).parents[2] / "docs" / "python-api.md").read_text()
    marker = 'less its leading `"ok": true`\n(`{'
    start = api.index(marker) + len(marker) - 1
    documented = set(re.findall(r'"(\w+)"', api[start : api.index("}`", start)]))
    r = qm("convert", tiny_llama, tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)) == documented | {"ok"}
