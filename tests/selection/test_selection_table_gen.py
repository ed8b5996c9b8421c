"""python -m converter.plan.selection_table_gen: one table for every transformers version that generates
exactly its content.

The merge is checked with simulated versions (``generate`` replaced by a fixed table, temp table files);
one test regenerates the whole table with the installed transformers and compares it with the shipped
one, which is what listing that version claims.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from converter.plan import selection_table, selection_table_gen
from converter.plan.selection_table import TABLE_FORMAT

TABLE = selection_table.load_table()

ARCHS = {
    "LlamaForCausalLM": {"model_type": "llama", "variants": {"[false]": {"keys": {"a": 1}}}},
    "GPT2LMHeadModel": {"model_type": "gpt2", "variants": {"[]": {"keys": {"b": 2}}}},
    "T5ForConditionalGeneration": {"model_type": "t5", "variants": {"[]": {"keys": {"c": 3}}}},
}


def _table(versions: list[str], archs: dict | None = None, fmt: int = TABLE_FORMAT) -> dict:
    return {"format": fmt, "transformers": versions, "archs": json.loads(json.dumps(archs or ARCHS))}


def _run(monkeypatch, out: Path, version: str, archs: dict | None = None, *args: str) -> None:
    """The generator's main as under transformers ``version`` generating ``archs``."""
    monkeypatch.setattr(selection_table_gen, "generate", lambda names=None: _table([version], archs))
    selection_table_gen.main(["--out", str(out), *args])


def _write(path: Path, table: dict) -> bytes:
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    path.write_text(text, encoding="utf-8")
    return text.encode()


def test_same_content_adds_the_version_sorted_once(tmp_path, monkeypatch, capsys):
    out = tmp_path / "table.json"
    _write(out, _table(["5.24.0"]))
    _run(monkeypatch, out, "5.25.0")
    got = json.loads(out.read_text())
    assert got == _table(["5.24.0", "5.25.0"])  # the content kept, the version added
    assert "3 architectures for transformers 5.24.0, 5.25.0" in capsys.readouterr().out
    _run(monkeypatch, out, "5.25.0")  # again: listed once
    _run(monkeypatch, out, "5.24.0")
    _run(monkeypatch, out, "5.9.1")  # version order, not string order
    assert json.loads(out.read_text())["transformers"] == ["5.9.1", "5.24.0", "5.25.0"]


def test_other_content_is_refused_naming_what_differs(tmp_path, monkeypatch):
    out = tmp_path / "table.json"
    before = _write(out, _table(["5.24.0", "5.25.0"]))
    archs = json.loads(json.dumps(ARCHS))
    archs["LlamaForCausalLM"]["variants"]["[false]"]["keys"]["a"] = 9  # decided differently
    del archs["GPT2LMHeadModel"]  # not tabled any more
    archs["BertModel"] = {"model_type": "bert"}  # tabled now
    with pytest.raises(SystemExit) as exc:
        _run(monkeypatch, out, "5.26.0", archs)
    msg = str(exc.value)
    assert "differs from" in msg
    assert "(transformers 5.24.0, 5.25.0)" in msg
    assert "in 3 of 4 architectures" in msg
    assert "1 decided differently (LlamaForCausalLM)" in msg
    assert "1 only in the file (GPT2LMHeadModel)" in msg
    assert "1 only in the generated table (BertModel)" in msg
    assert "Nothing written" in msg
    assert "selection_table_gen --replace" in msg
    assert out.read_bytes() == before
    # a listed version whose generation changed (the generator's code did) is refused as well
    with pytest.raises(SystemExit, match="in 3 of 4 architectures"):
        _run(monkeypatch, out, "5.25.0", archs)
    assert out.read_bytes() == before


def test_replace_writes_the_installed_version_alone(tmp_path, monkeypatch):
    out = tmp_path / "table.json"
    _write(out, _table(["5.24.0", "5.25.0"]))
    archs = {"LlamaForCausalLM": {"model_type": "llama"}}
    _run(monkeypatch, out, "5.26.0", archs, "--replace")
    assert json.loads(out.read_text()) == _table(["5.26.0"], archs)


def test_no_file_another_format_or_no_table(tmp_path, monkeypatch):
    out = tmp_path / "table.json"
    _run(monkeypatch, out, "5.25.0")  # no file yet: written
    assert json.loads(out.read_text()) == _table(["5.25.0"])
    before = _write(out, {"format": 1, "transformers": "5.24.0", "archs": ARCHS})  # the old format
    with pytest.raises(SystemExit, match=f"in table format 1, this generator writes {TABLE_FORMAT}"):
        _run(monkeypatch, out, "5.25.0")
    assert out.read_bytes() == before
    out.write_text("{not json")
    with pytest.raises(SystemExit, match="not a table"):
        _run(monkeypatch, out, "5.25.0")
    _run(monkeypatch, out, "5.25.0", None, "--replace")
    assert json.loads(out.read_text()) == _table(["5.25.0"])


@pytest.mark.skipif(
    transformers.__version__ not in TABLE.get("transformers", []),
    reason=f"the shipped table does not list transformers {transformers.__version__}",
)
def test_the_installed_transformers_generates_the_shipped_table():
    """What a listed version claims: generating under it gives exactly the shipped content."""
    generated = selection_table_gen.generate()
    assert generated["transformers"] == [transformers.__version__]
    assert generated["format"] == TABLE["format"]
    new, old = generated["archs"], TABLE["archs"]
    assert sorted(a for a in set(new) | set(old) if new.get(a) != old.get(a)) == []
    assert selection_table_gen.merge(TABLE, generated) == TABLE  # the merge changes nothing
