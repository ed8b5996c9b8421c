"""Batch lists: the text/JSON list format of ``quantize-model batch`` (TOML plans: plan_file.py).

The list file is text (one source per line; blank lines and '#' comments ignored; an optional second
column names the output folder) or JSON (a list of strings, or of objects with "source" and optional
"output" and "revision"). Each item's output folder is ``OUTPUT_ROOT/<name>``, where ``<name>`` is the
given name, else the local folder's name or the repo id with '/' turned into '--'. Running a batch:
converter/tools/batch_run.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from converter.errors import InputError

#: The batch's own folder under the output root (its per-job stamps): never a job's output name.
STATE_DIR = ".quantize-model-batch"


def bad_output_name(name: str) -> bool:
    """Whether ``name`` cannot be a job's folder under the output root: not a plain folder name, or
    the batch's own state folder (the job's files and every job's stamps would share it)."""
    return output_name_problem(name) is not None


def _unprintable(c: str) -> bool:
    """A control character (C0, DEL, C1), a lone surrogate or a noncharacter: not for a folder name
    (XML 1.0 forbids most of them, so the JUnit report naming the job could not be parsed)."""
    o = ord(c)
    return o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or o in (0xFFFE, 0xFFFF)


def output_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a job's output folder name ("must be ..."), or None."""
    if "/" in name or name in ("", ".", ".."):
        return "must be a plain folder name"
    if name == STATE_DIR:
        return "must be a plain folder name other than the batch's own state folder"
    if not name.strip():
        return "must be a plain folder name, not blank"
    bad = sorted({c for c in name if _unprintable(c)})
    if bad:
        said = ", ".join(f"U+{ord(c):04X}" for c in bad)
        return f"must be a plain folder name without control characters (it holds {said})"
    return None


@dataclass(frozen=True)
class BatchItem:
    source: str
    output: str  # folder name under the output root
    revision: str | None = None
    #: where the item is, for messages: "line 3" of a text list, "item 2" (0-based) of a JSON list
    label: str = field(default="", compare=False)
    line: int | None = field(default=None, compare=False)  # a text list's line number


def default_name(source: str) -> str:
    path = Path(source)
    name = path.name if (path.exists() or "/" not in source or source.startswith((".", "/", "~"))) else source
    name = name.removesuffix(".safetensors") if path.is_file() else name
    return re.sub(r"[^\w.-]+", "--", name.replace("/", "--")).strip("-.") or "model"


#: a field of a text list: "double-quoted", 'single-quoted', or a run of non-space characters
_FIELD = re.compile(r"\"([^\"]*)\"|'([^']*)'|(\S+)")


def _fields(line: str) -> list[str]:
    """The fields of one text-list line. A '#' starts a comment only where a field would start (as in
    shell): ``runs/exp#3`` is one path (cutting it at the '#' named another folder, silently).
    Quotes keep the spaces of a path in one field."""
    out: list[str] = []
    for m in _FIELD.finditer(line):
        bare = m.group(3)
        if bare is not None and bare.startswith("#"):
            break
        out.append(bare if bare is not None else m.group(1) if m.group(1) is not None else m.group(2))
    return out


#: the keys of a JSON list's object items (per-job options are a TOML plan's: docs/ci.md)
JSON_ITEM_KEYS = ("source", "output", "revision")


def _check_json_item(path: Path, k: int, entry: dict) -> None:
    """Refuse a key a JSON list's item cannot have, and an output or revision that is not a string: an
    item's ``"quant_type": "int8"`` or a misspelt ``"revison"`` was ignored, so the job converted with
    the command line's options (nf4 into a folder named ``-int8``) or the main branch, silently."""
    import difflib

    for key in entry:
        if key in JSON_ITEM_KEYS:
            continue
        close = difflib.get_close_matches(str(key), JSON_ITEM_KEYS, n=1, cutoff=0.75)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else "per-job options (quant_type, skip, ...) need a TOML plan (docs/ci.md), or give them on "
            "the command line for every item"
        )
        msg = f"{path}: item {k}: key {key!r} is unknown (an item has {', '.join(JSON_ITEM_KEYS)}); {hint}"
        raise InputError(msg)
    for key in ("output", "revision"):  # an empty output is the default name, as an absent one
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or (key == "revision" and not value)):
            got = json.dumps(value)
            msg = f"{path}: item {k}: {key!r} must be a non-empty string, got {got}; fix the list"
            raise InputError(msg)


def read_list(path: Path) -> list[BatchItem]:
    """Parse a batch list file; raises InputError naming the file and line on bad content."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is no part of the first line
    except OSError as exc:
        msg = f"{path}: cannot read the list ({exc.strerror}); check the path"
        raise InputError(msg) from None
    items: list[BatchItem] = []
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as exc:
            msg = f"{path}: not valid JSON ({exc}); fix the list"
            raise InputError(msg) from None
        if not isinstance(data, list):
            msg = f"{path}: expected a JSON list of sources; fix the list"
            raise InputError(msg)
        for k, entry in enumerate(data):
            if isinstance(entry, str):
                items.append(BatchItem(entry, default_name(entry), label=f"item {k}"))
            elif isinstance(entry, dict) and isinstance(entry.get("source"), str):
                _check_json_item(path, k, entry)
                src = entry["source"]
                name = str(entry.get("output") or default_name(src))
                items.append(BatchItem(src, name, entry.get("revision"), label=f"item {k}"))
            else:
                msg = f"{path}: item {k} must be a string or an object with a 'source' string; fix the list"
                raise InputError(msg)
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            parts = _fields(line)
            if not parts:
                continue
            if len(parts) > 2:
                msg = (
                    f"{path}:{lineno}: expected 'SOURCE [OUTPUT_NAME]', got {len(parts)} fields; quote a "
                    'path that holds spaces ("my models/llama"), else fix the line'
                )
                raise InputError(msg)
            name = parts[1] if len(parts) == 2 else default_name(parts[0])
            items.append(BatchItem(parts[0], name, label=f"line {lineno}", line=lineno))
    if not items:
        msg = f"{path}: the list has no sources; add one per line"
        raise InputError(msg)
    seen: dict[str, str] = {}
    for it in items:
        problem = output_name_problem(it.output)
        if problem is not None:
            where = f"{path}:{it.line}: line {it.line}" if it.line is not None else f"{path}: {it.label}"
            msg = f"{where}: output name {it.output!r} for {it.source!r} {problem}; fix the list"
            raise InputError(msg)
        if it.output in seen:
            msg = (
                f"{path}: {seen[it.output]} and {it.source} would both write {it.output!r}; "
                'name the outputs (second column, or "output" in JSON)'
            )
            raise InputError(msg)
        seen[it.output] = it.source
    return items
