from __future__ import annotations

import json
from pathlib import Path

import pytest

from converter.errors import InputError
from converter.tools.batch import BatchItem, default_name, read_list


def test_default_names(tmp_path: Path) -> None:
    (tmp_path / "my model").mkdir()
    assert default_name("meta-llama/Llama-3.2-1B") == "meta-llama--Llama-3.2-1B"
    assert default_name("gpt2") == "gpt2"
    assert default_name(str(tmp_path / "my model")) == "my--model"
    single = tmp_path / "weights.safetensors"
    single.write_bytes(b"")
    assert default_name(str(single)) == "weights"


def test_text_list_with_comments_and_names(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("# models\n\norg/a   # first\norg/b  b-nf4\n")
    assert read_list(listing) == [BatchItem("org/a", "org--a"), BatchItem("org/b", "b-nf4")]


def test_json_list_with_revision(tmp_path: Path) -> None:
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps(["org/a", {"source": "org/b", "output": "b", "revision": "v1"}]))
    assert read_list(listing) == [BatchItem("org/a", "org--a"), BatchItem("org/b", "b", "v1")]


def test_bad_lists(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("org/a out extra\n")
    with pytest.raises(InputError, match=r"list.txt:1: expected 'SOURCE \[OUTPUT_NAME\]', got 3 fields"):
        read_list(listing)
    listing.write_text("# nothing\n")
    with pytest.raises(InputError, match="the list has no sources"):
        read_list(listing)
    listing.write_text("org/a ../escape\n")
    with pytest.raises(InputError, match="must be a plain folder name"):
        read_list(listing)
    bad_json = tmp_path / "list.json"
    bad_json.write_text(json.dumps([{"output": "x"}]))
    with pytest.raises(InputError, match="item 0 must be a string or an object with a 'source' string"):
        read_list(bad_json)


def test_text_list_paths_with_a_hash_or_spaces(tmp_path: Path) -> None:
    """A '#' inside a path (`runs/exp#3`) began a comment: the line's source became `runs/exp`, another
    folder, silently. A '#' starts a comment only at the start of a field, as in shell. A path with
    spaces could not be listed at all ("got 3 fields; fix the line", with no way to fix it): a field
    may be quoted."""
    listing = tmp_path / "list.txt"
    listing.write_text(
        "runs/exp#3\n"
        "runs/exp#4 out#4  # a comment\n"
        '"my models/llama one"   # spaces, quoted\n'
        "'my models/llama two' two\n"
        "org/a#b#c\n"
    )
    assert read_list(listing) == [
        BatchItem("runs/exp#3", "runs--exp--3"),
        BatchItem("runs/exp#4", "out#4"),
        BatchItem("my models/llama one", "my--models--llama--one"),
        BatchItem("my models/llama two", "two"),
        BatchItem("org/a#b#c", "org--a--b--c"),
    ]
    listing.write_text("my models/llama one\n")
    with pytest.raises(InputError, match=r"got 3 fields; quote a path that holds spaces"):
        read_list(listing)


def test_json_list_item_keys_it_does_not_read_are_refused(tmp_path: Path) -> None:
    """An item's per-job option ("quant_type": "int8") or a misspelt key ("revison", "ouptut") was
    ignored: the job converted with the command line's options (nf4 into a folder named tl-int8) or
    from the main branch, and the batch passed. Each is refused with the list, naming the item."""
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps(["org/a", {"source": "org/b", "output": "b-int8", "quant_type": "int8"}]))
    with pytest.raises(InputError) as err:
        read_list(listing)
    assert str(err.value) == (
        f"{listing}: item 1: key 'quant_type' is unknown (an item has source, output, revision); per-job "
        "options (quant_type, skip, ...) need a TOML plan (docs/ci.md), or give them on the command line "
        "for every item"
    )
    for typo, meant in (("revison", "revision"), ("ouptut", "output"), ("sources", "source")):
        listing.write_text(json.dumps([{"source": "org/b", typo: "v1"}]))
        with pytest.raises(
            InputError, match=rf"item 0: key '{typo}' is unknown .*; did you mean '{meant}'\?$"
        ):
            read_list(listing)
    listing.write_text(json.dumps([{"source": "org/b", "revision": 5}]))
    with pytest.raises(
        InputError, match=r"item 0: 'revision' must be a non-empty string, got 5; fix the list"
    ):
        read_list(listing)
    listing.write_text(json.dumps([{"source": "org/b", "output": ["b"]}]))
    with pytest.raises(InputError, match=r"item 0: 'output' must be a non-empty string, got \[\"b\"\]"):
        read_list(listing)
    # the keys an item has, an empty output (the default name) and nulls still work
    listing.write_text(json.dumps([{"source": "org/b", "output": "", "revision": None}]))
    assert read_list(listing) == [BatchItem("org/b", "org--b")]


def test_cli_batch_refuses_a_json_item_option_before_any_job(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from converter.cli import cli

    listing = tmp_path / "list.json"
    listing.write_text(
        json.dumps([{"source": str(tmp_path / "m"), "output": "m-int8", "quant_type": "int8"}])
    )
    r = CliRunner().invoke(cli, ["batch", str(listing), str(tmp_path / "out"), "--json"])
    assert r.exit_code == 2
    assert json.loads(r.stdout)["error"].startswith(f"{listing}: item 0: key 'quant_type' is unknown")
    assert not (tmp_path / "out").exists()
