"""Batch plans: a TOML plan file (defaults, jobs, variants) or a text/JSON list, as a list of Jobs.

Every job is checked before any work starts: an unknown key or a bad value is refused with one
line naming the file, the line and the key (``plan.toml:12: job 2: key 'quant_typ' is unknown ...``).

TOML format (docs/ci.md)::

    [defaults]                  # any convert() keyword, plus output_root (relative to the plan file)
    quant_type = "nf4"
    output_root = "converted"

    [[job]]
    source = "org/model"        # required: local path (relative to the plan file) or Hub repo id
    output = "model-nf4"        # folder under output_root (default: as for text lists)
    revision = "main"
    push_to = "my-org/model-nf4"
    variants = [{quant_type = "nf4"}, {quant_type = "fp4", output = "model-fp4"}]
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.errors import InputError
from converter.kernels import MAX_THREADS, threads_beyond_limit
from converter.tools.batch import BatchItem, default_name, output_name_problem, read_list

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: Keys of a job that are not convert() options.
JOB_KEYS = {"source", "output", "revision", "push_to", "private", "variants"}
#: convert() keywords a plan may not set (they belong to the batch command itself).
_NOT_PLAN_OPTIONS = {
    "source",
    "output",
    "overwrite",
    "progress",
    "revision",
    "push_to",
    "private",
    "dry_run",
    "preflight",
    "warn",
}


@dataclass(frozen=True)
class Job:
    """One conversion of a batch: source -> output_root / output with convert() keywords."""

    source: str
    output: str  # folder name under the output root; also the job's identity (partition, state)
    revision: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    push_to: str | None = None
    private: bool = False
    where: str = ""  # "plan.toml:12" / "list.txt" (messages)

    @property
    def partition_key(self) -> int:
        """A number that depends on the output name alone: the same part whatever the job order."""
        return int.from_bytes(hashlib.sha256(self.output.encode()).digest()[:8], "big")

    def convert_kwargs(self) -> dict[str, Any]:
        kw = dict(self.options)
        if self.revision is not None:
            kw["revision"] = self.revision
        if self.push_to:
            kw["push_to"], kw["private"] = self.push_to, self.private
        return kw

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "revision": self.revision,
            "push_to": self.push_to,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(self.options.items())},
        }


@dataclass
class BatchPlan:
    jobs: list[Job]
    output_root: Path | None  # from [defaults] output_root; None for lists (the CLI must give one)
    path: Path
    #: one line per job key its quant type does not read ("plan.toml:9: job 2: ... does not apply")
    warnings: list[str] = field(default_factory=list)


def convert_parameters() -> dict[str, inspect.Parameter]:
    """convert()'s keyword options a plan may set, with their defaults (read from its signature, so
    options other engineers add to convert() are accepted without touching this module)."""
    from converter.writer.pipeline import convert

    params = inspect.signature(convert).parameters
    return {k: p for k, p in params.items() if k not in _NOT_PLAN_OPTIONS}


def load_plan(path: str | os.PathLike, cli_options: dict[str, Any] | None = None) -> BatchPlan:
    """A TOML plan (``.toml``) or a text/JSON list (anything else), a path as a str or a Path;
    ``cli_options`` are convert() keywords given on the command line: for a list they apply to every
    item, for a TOML plan they override [defaults] (a job's own keys still win)."""
    path = Path(path)
    cli_options = dict(cli_options or {})
    if path.suffix.lower() != ".toml":
        if "moe_experts" in not_read_by_method(cli_options)[1]:  # every item would fail alike: refused once
            qt = cli_options["quant_type"]
            msg = f"--moe-experts quantize writes 4-bit expert records: use it with nf4 / fp4, not {qt}"
            raise InputError(msg)
        items = read_list(path)
        jobs = [_job_from_item(i, cli_options, path) for i in items]
        # the command line's options are every item's: none is another method's own, none is ignored
        _refuse_duplicates(jobs, [i.label for i in items], [[] for _ in items], convert_parameters())
        return BatchPlan(jobs, None, path)
    return _load_toml(path, cli_options)


def _job_from_item(item: BatchItem, options: dict[str, Any], path: Path) -> Job:
    where = f"{path}:{item.line}" if item.line is not None else str(path)
    return Job(item.source, item.output, item.revision, not_read_by_method(options)[0], where=where)


def not_read_by_method(options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``options`` without the keys their quant type does not read (another method's own options:
    ``double_quant`` on int8, ``int8_threshold`` on nf4; ``QuantMethod.own_options``), and those keys.
    They never change the output, so they must not change a job's name, key or identity either."""
    from converter.methods import foreign_options, get_method

    quant_type = options.get("quant_type", "nf4")
    foreign = [k for k in foreign_options(quant_type) if k in options]
    if options.get("moe_experts", "keep") != "keep" and not get_method(quant_type).quantizes_experts:
        # experts are quantized by the 4-bit types only: [defaults] moe_experts = "quantize" beside an
        # int8 variant (convert refuses the pair) is the int8 conversion, as double_quant is
        foreign.append("moe_experts")
    return {k: v for k, v in options.items() if k not in foreign}, foreign


def conversion_identity(job: Job, params: dict[str, inspect.Parameter]) -> str:
    """What decides a job's output bytes: source, revision and every ``Options`` field (convert()'s
    default where the job does not set it; other methods' options left out), and where it is pushed
    (one conversion mirrored to two repos is two jobs). Equal identities, byte-identical folders."""
    from dataclasses import fields

    from converter.plan.tensor_plan import Options, parse_size

    values = {f.name: job.options.get(f.name, params[f.name].default) for f in fields(Options)}
    values = not_read_by_method(values)[0]
    values["quant_type"] = str(values["quant_type"]).lower()
    values["max_shard_size"] = parse_size(values["max_shard_size"])
    for key in ("skip", "include"):
        value = values[key]
        values[key] = [value] if isinstance(value, str) else list(value)  # the order is recorded
    local = Path(job.source).expanduser()  # ./m, m and /abs/m: one source (a list's paths are as given)
    source = str(local.resolve()) if local.exists() else job.source
    return json.dumps([source, job.revision, job.push_to, values], sort_keys=True, default=str)


class _Lines:
    """Finds the line of a key in the plan text (tomllib reports no positions for valid TOML)."""

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([\w.\"' -]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r"^\s*([\w-]+|\"[^\"]*\"|'[^']*')\s*=")

    def __init__(self, text: str) -> None:
        # (section label, job index or -1) of each line; section "" before any header.
        self.keys: dict[tuple[str, int, str], int] = {}
        self.headers: dict[tuple[str, int], int] = {}
        section, jobs = "", 0  # jobs: [[job]] tables seen so far
        for no, line in enumerate(text.splitlines(), 1):
            m = self._HEADER.match(line)
            if m:
                name = m.group(2).strip()
                if name == "job" and m.group(1) == "[[":
                    jobs += 1
                section = name
                self.headers.setdefault((section, self._job(section, jobs)), no)
                continue
            k = self._KEY.match(line)
            if k:
                self.keys.setdefault((section, self._job(section, jobs), k.group(1).strip("\"'")), no)

    @staticmethod
    def _job(section: str, jobs: int) -> int:
        """The index of the job a line belongs to ([[job]] and its sub-tables), else -1."""
        return jobs - 1 if section == "job" or section.startswith("job.") else -1

    def of(self, section: str, job: int, key: str | None) -> int | None:
        if key is not None:
            found = self.keys.get((section, job, key))
            if found is not None:
                return found
        return self.headers.get((section, job))


_TABLES = "a plan has [defaults] and [[job]] only"


def _load_toml(path: Path, cli_options: dict[str, Any]) -> BatchPlan:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is no part of the first line
    except OSError as exc:
        msg = f"{path}: cannot read the plan ({exc.strerror}); check the path"
        raise InputError(msg) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = f"{path}:{m.group(1)}" if m else str(path)
        what = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        msg = f"{where}: not valid TOML ({what}); fix the plan"
        raise InputError(msg) from None
    lines = _Lines(text)
    params = convert_parameters()

    def fail(section: str, job: int, key: str | None, what: str) -> InputError:
        no = lines.of(section, job, key)
        where = f"{path}:{no}" if no else str(path)
        label = f"job {job + 1}: " if job >= 0 else f"[{section}]: " if section else ""
        return InputError(f"{where}: {label}{what}")

    for top, value in data.items():
        if top in ("defaults", "job"):
            continue
        if not isinstance(value, dict):  # a key before the first table: it was called a table, no line
            where = "put it under [defaults]" if top in params or top == "output_root" else _TABLES
            before_tables = ""  # the section of the lines above the first table
            raise fail(before_tables, -1, top, f"key {top!r} is outside any table: {where}")
        raise fail(top, -1, None, f"unknown table {top!r}: {_TABLES}")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        msg_0 = ""
        raise fail(msg_0, -1, "defaults", "'defaults' must be a table: [defaults]")
    output_root: Path | None = None
    defaults = dict(defaults)
    if "output_root" in defaults:
        value = defaults.pop("output_root")
        if not isinstance(value, str) or not value:
            msg_0 = "defaults"
            raise fail(msg_0, -1, "output_root", "key 'output_root' must be a folder path (a string)")
        output_root = (path.parent / Path(value).expanduser()).resolve()
    base: dict[str, Any] = {}
    for key, value in defaults.items():
        if key not in params:
            msg_0 = "defaults"
            raise fail(msg_0, -1, key, _unknown(key, params))
        try:
            base[key] = check_value(key, value, params[key])
        except ValueError as exc:
            msg_0 = "defaults"
            raise fail(msg_0, -1, key, f"key {key!r}: {exc}") from None
    base.update(cli_options)

    raw_jobs = data.get("job", [])
    if not isinstance(raw_jobs, list) or not raw_jobs:
        msg_0 = ""
        raise fail(msg_0, -1, None, "the plan has no jobs; add a [[job]] table with a 'source'")
    jobs: list[Job] = []
    labels: list[str] = []  # "job 2" / "job 2, variant 3", for messages
    ignored: list[list[str]] = []  # the keys each job sets that its quant type does not read
    warnings: list[str] = []
    for k, raw in enumerate(raw_jobs):
        for job, label, foreign, line in _expand_job(k, raw, base, params, path, fail):
            jobs.append(job)
            labels.append(label)
            ignored.append(foreign)
            if foreign:
                them = "them" if len(foreign) > 1 else "it"
                warnings.append(f"{line}: {label}: {_not_apply(foreign, job)}; leave {them} out")
    _refuse_duplicates(jobs, labels, ignored, params)
    seen: dict[str, Job] = {}
    for j in jobs:
        if j.output in seen:
            msg = (
                f"{j.where}: jobs {seen[j.output].source} ({seen[j.output].where}) and {j.source} would "
                f"both write {j.output!r}; give one of them another 'output'"
            )
            raise InputError(msg)
        seen[j.output] = j
    return BatchPlan(jobs, output_root, path, warnings)


def _option_fields() -> set[str]:
    from dataclasses import fields

    from converter.plan.tensor_plan import Options

    return {f.name for f in fields(Options)}


def _not_apply(keys: list[str], job: Job) -> str:
    verb = "do" if len(keys) > 1 else "does"
    return f"{', '.join(keys)} {verb} not apply to quant_type {job.options.get('quant_type', 'nf4')!r}"


def _refuse_duplicates(
    jobs: list[Job], labels: list[str], ignored: list[list[str]], params: dict[str, inspect.Parameter]
) -> None:
    """Two jobs (or variants) that resolve to the same conversion would write byte-identical folders
    under two names (``{quant_type = "int8", double_quant = false}`` beside plain int8): refused,
    naming both, rather than converting twice or silently dropping one (docs/ci.md)."""
    first: dict[str, int] = {}
    for b, job in enumerate(jobs):
        a = first.setdefault(conversion_identity(job, params), b)
        if a == b:
            continue
        notes = [_not_apply(ignored[i], jobs[i]) for i in (a, b) if ignored[i]]
        free = sorted(
            k for k in {*jobs[a].options, *job.options} if jobs[a].options.get(k) != job.options.get(k)
        )
        # not Options fields (those differ only as spelled: a default given, "a" for ["a"])
        free = [k for k in free if k not in _option_fields()]
        if free:  # device, threads, keep_downloads...: how it runs, not what it writes
            verb = "do" if len(free) > 1 else "does"
            notes.append(f"{', '.join(free)} {verb} not change the output")
        why = "; ".join(notes)
        same = (
            f"both would write {job.output!r}"
            if jobs[a].output == job.output
            else f"{jobs[a].output!r} and {job.output!r} would be byte-identical"
        )
        msg = (
            f"{job.where}: {labels[b]} is the same conversion as {labels[a]} ({jobs[a].where}): "
            f"{job.source} with the same effective options{f' ({why})' if why else ''}, so {same}; "
            "remove one of them"
        )
        raise InputError(msg)


#: convert() keywords the batch command sets itself, and the command's option for them (if any)
_COMMAND_OPTIONS = {
    "overwrite": "--force",
    "dry_run": "--dry-run",
    "progress": "-q",
    "preflight": "",
    "warn": "",
}


def _unknown(key: str, params: dict[str, Any]) -> str:
    """Why a key a table sets is not one of its keys (for [defaults], a job's own keys are not: said so,
    not "key 'revision' is unknown; did you mean 'revision'?")."""
    import difflib

    if key in JOB_KEYS:
        where = "a [[job]] table" if key in ("source", "variants") else "a [[job]] table or a variant"
        return f"key {key!r} belongs in {where}, not in [defaults]"
    if key in _COMMAND_OPTIONS:
        flag = _COMMAND_OPTIONS[key]
        return f"key {key!r} is not a plan key: the batch command sets it" + (
            f" (give `batch {flag}`)" if flag else ""
        )
    close = difflib.get_close_matches(key, [*params, *JOB_KEYS], n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see docs/ci.md for the plan keys"
    return f"key {key!r} is unknown; {hint}"


def _expand_job(
    k: int, raw: Any, base: dict, params: dict, path: Path, fail: Any
) -> list[tuple[Job, str, list[str], str]]:
    """The job's variants as (job, label for messages, keys the job or variant sets that its quant
    type does not read, "plan.toml:LINE" of the first of them)."""
    if not isinstance(raw, dict):
        msg = "job"
        raise fail(msg, k, None, "each [[job]] must be a table")
    if not isinstance(raw.get("source"), str) or not raw["source"]:
        msg = "job"
        raise fail(msg, k, "source", "key 'source' (a local path or a Hub repo id) is required")
    variants = raw.get("variants", [{}])
    if not isinstance(variants, list) or not variants or not all(isinstance(v, dict) for v in variants):
        msg = "job"
        raise fail(msg, k, "variants", "key 'variants' must be a non-empty list of tables")
    out: list[tuple[Job, str, list[str], str]] = []
    for n, v in enumerate(variants):
        if "variants" in v or "source" in v:
            msg = "job"
            raise fail(msg, k, "variants", "a variant cannot set 'source' or 'variants'")
        merged = {key: value for key, value in raw.items() if key != "variants"}
        merged.update(v)
        options = dict(base)
        for key, value in merged.items():
            if key in JOB_KEYS:
                continue
            if key not in params:
                msg = "job"
                raise fail(msg, k, key if key in raw else "variants", _unknown(key, params))
            try:
                options[key] = check_value(key, value, params[key])
            except ValueError as exc:
                msg = "job"
                raise fail(msg, k, key if key in raw else "variants", f"key {key!r}: {exc}") from None
        options, foreign = not_read_by_method(options)
        foreign = [key for key in foreign if key in merged]  # [defaults] apply to every quant type
        for key, kind in (("output", str), ("revision", str), ("push_to", str), ("private", bool)):
            if key in merged and not isinstance(merged[key], kind):
                where_key = key if key in raw else "variants"
                msg = "job"
                raise fail(msg, k, where_key, f"key {key!r} must be a {kind.__name__}")
        if "push_to" in merged:  # "everything is checked before any work starts" (docs/ci.md)
            from converter.tools.push import check_repo_id

            try:
                check_repo_id(merged["push_to"])
            except InputError as exc:
                msg = "job"
                raise fail(msg, k, "push_to" if "push_to" in raw else "variants", str(exc)) from None
        if merged.get("private") and not merged.get("push_to"):  # nothing to make private: refused now,
            msg = "job"  # as convert refuses --private without --push-to, not when the job runs
            raise fail(
                msg,
                k,
                "private" if "private" in raw else "variants",
                "key 'private' makes the push_to repo private, but the job has no push_to; add push_to, or "
                "leave private out",
            )
        source = merged["source"]
        local = Path(source).expanduser()
        looks_local = source.startswith(("./", "../", "~")) or (path.parent / local).exists()
        if not local.is_absolute() and looks_local:
            source = str((path.parent / local).resolve())  # local paths are relative to the plan file
        name = merged.get("output")
        if name is None:
            name = default_name(merged["source"] if not Path(source).exists() else source)
            if len(variants) > 1:  # a revision tells variants apart too (main / dev)
                parts = [
                    _slug(key, x)
                    for key, x in v.items()
                    if (key not in JOB_KEYS or key == "revision") and key not in foreign
                ]
                name += "-" + "-".join(parts) if parts else ""
        problem = output_name_problem(name)
        if problem is not None:
            msg = "job"
            raise fail(msg, k, "output", f"output name {name!r} {problem}")
        line = fail("job", k, None, "").args[0].split(": ", 1)[0]
        job = Job(
            source,
            name,
            merged.get("revision"),
            options,
            merged.get("push_to"),
            bool(merged.get("private", False)),
            where=line,
        )
        label = f"job {k + 1}" + (f", variant {n + 1}" if len(variants) > 1 else "")
        at = line
        if foreign:
            at = fail("job", k, foreign[0] if foreign[0] in raw else "variants", "").args[0].split(": ")[0]
        out.append((job, label, foreign, at))
    return out


def _slug(key: str, value: Any) -> str:
    """A variant's part of a default output name: the value, or the key for a flag (no- when off)."""
    if isinstance(value, bool):
        return ("" if value else "no-") + key.replace("_", "-")
    text = "-".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^\w.-]+", "-", text).strip("-.").lower() or "x"


def check_value(key: str, value: Any, param: inspect.Parameter) -> Any:
    """``value`` as convert() takes it, or ValueError saying what is expected."""
    from converter.methods import get_method
    from converter.plan.tensor_plan import QUANT_STORAGES, normalize_dtype, parse_size
    from formats.quant_types import BLOCKSIZES

    default = param.default
    try:
        if key == "quant_type":
            get_method(str(value))  # nf4 / fp4 / int8 (converter.methods registry)
            return str(value).lower()
        if key == "blocksize":
            if isinstance(value, bool) or int(value) not in BLOCKSIZES:
                raise ValueError
            return int(value)
        if key in ("dtype", "compute_dtype"):
            return normalize_dtype(value, key)
        if key == "quant_storage":
            if value not in QUANT_STORAGES:
                raise ValueError
            return value
        if key == "max_shard_size":
            parse_size(value)
            return value
        if key == "moe_experts":
            from converter.plan.moe import MOE_MODES

            if str(value).lower() not in MOE_MODES:
                raise ValueError
            return str(value).lower()
        if key == "int8_scale":
            if value not in ("cpu", "cuda"):
                raise ValueError
            return value
        if key == "device":  # the spelling only: whether this machine has that GPU is the job's concern
            if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", value):
                raise ValueError
            return value
    except (ValueError, InputError, TypeError):
        allowed = {
            "quant_type": "nf4, fp4 or int8",
            "blocksize": ", ".join(map(str, BLOCKSIZES)),
            "dtype": "float32, float16 or bfloat16",
            "compute_dtype": "float32, float16 or bfloat16",
            "quant_storage": ", ".join(QUANT_STORAGES),
            "max_shard_size": "a size such as 5GB or 500MB",
            "moe_experts": "keep or quantize",
            "int8_scale": "cpu or cuda",
            "device": "cpu, cuda or cuda:N",
        }[key]
        msg = f"{value!r} is not valid: use {allowed}"
        raise ValueError(msg) from None
    # Other options: checked against the type of convert()'s default.
    if isinstance(default, bool):
        if not isinstance(value, bool):
            msg_0 = f"{value!r} is not valid: use true or false"
            raise ValueError(msg_0)
        return value
    if isinstance(default, int) and not isinstance(value, bool) and isinstance(value, int):
        return value
    if isinstance(default, float):  # int8_threshold: TOML writes 6 and 6.0 alike
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
            msg_0 = f"{value!r} is not valid: use a finite number >= 0"
            raise ValueError(msg_0)
        return float(value)
    if isinstance(default, tuple | list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            msg_0 = f"{value!r} is not valid: use a list of strings"
            raise ValueError(msg_0)
        return tuple(value)
    if isinstance(default, str) and isinstance(value, str):
        return value
    if default is None and isinstance(value, str | int | float) and not isinstance(value, bool):
        if key == "threads" and (not isinstance(value, int) or value < 1):
            msg_0 = f"{value!r} is not valid: use a whole number >= 1"
            raise ValueError(msg_0)
        if key == "threads" and value > MAX_THREADS:
            raise ValueError(threads_beyond_limit(value))
        return value
    kind = type(default).__name__ if default is not None else "a string or number"
    msg_0 = f"{value!r} is not valid: expected {kind}"
    raise ValueError(msg_0)


def select_part(jobs: list[Job], only: str | None) -> list[Job]:
    """The jobs of part ``i/N`` (1-based): jobs sorted by their output-name hash, dealt round-robin.

    Deterministic, each job in exactly one part, independent of the order of the plan; parts differ
    in size by one job at most.
    """
    if only is None:
        return list(jobs)
    i, n = parse_only(only)
    ranked = sorted(jobs, key=lambda j: (j.partition_key, j.output))
    mine = {j.output for r, j in enumerate(ranked) if r % n == i - 1}
    return [j for j in jobs if j.output in mine]


def parse_only(only: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", only)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        msg = f"--only {only!r}: use I/N with 1 <= I <= N, e.g. --only 3/8"
        raise InputError(msg)
    return int(m.group(1)), int(m.group(2))
