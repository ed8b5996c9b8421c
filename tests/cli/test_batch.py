from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def test_batch_continues_past_failures(qm, tiny_llama: Path, tmp_path: Path) -> None:
    other = shutil.copytree(tiny_llama, tmp_path / "other")  # one source twice is refused as a duplicate
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two good, one bad\n{tiny_llama}\n./does/not/exist\n{other} second\n")
    root = tmp_path / "outs"
    r = qm("batch", listing, root, "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert [i["ok"] for i in data["items"]] == [True, False, True]
    assert [i["output"] for i in data["items"]] == ["tiny-llama", "exist", "second"]
    assert data["items"][1]["exit_code"] == 2
    assert data["items"][1]["error"].startswith("./does/not/exist: no such file or folder")
    assert (root / "tiny-llama" / "config.json").exists()
    assert (root / "second" / "config.json").exists()
    assert (
        r.stderr.splitlines()[-1] == "Error: 1 of 3 conversion(s) failed; fix them and rerun the same batch"
    )


def test_batch_json_list_and_rerun_is_noop(qm, tiny_llama: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"source": str(tiny_llama), "output": "a"}]))
    root = tmp_path / "outs"
    assert qm("batch", listing, root, "-q").exit_code == 0
    r = qm("batch", listing, root)
    assert r.exit_code == 0
    assert "[1/1] " + str(tiny_llama) + " -> a: no-op in" in r.stderr


def test_batch_duplicate_outputs_exit_2(qm, tiny_llama: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama}\n{tiny_llama}\n")
    r = qm("batch", listing, tmp_path / "outs")
    assert r.exit_code == 2
    assert r.stderr == (
        f"Error: {listing}: {tiny_llama} and {tiny_llama} would both write 'tiny-llama'; "
        'name the outputs (second column, or "output" in JSON)\n'
    )


def test_batch_list_of_the_same_conversion_twice_exit_2_before_any_job(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """Two list lines of one source under two names converted it twice into byte-identical folders
    (a TOML plan refused it); refused before any work, exit 2, naming both lines."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama} a\n{tiny_llama} b\n")
    r = qm("batch", listing, tmp_path / "outs")
    assert r.exit_code == 2
    assert r.stderr == (
        f"Error: {listing}:2: line 2 is the same conversion as line 1 ({listing}:1): {tiny_llama} with the "
        "same effective options, so 'a' and 'b' would be byte-identical; remove one of them\n"
    )
    assert not (tmp_path / "outs").exists()


def test_a_changed_source_under_a_hidden_folder_is_converted_again(qm, tmp_path: Path) -> None:
    """A local source under a folder whose name starts with '.' (~/.cache/..., or given as ../model)
    had no files in its stamp key, so new weights there were reported up-to-date: a stale folder."""
    from qm_checkpoints import make_tiny_llama

    src = make_tiny_llama(tmp_path / ".models" / "m", seed=0)
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"source": str(src), "output": "m"}]))
    root = tmp_path / "outs"
    assert qm("batch", listing, root, "-q").exit_code == 0
    (src / "model.safetensors").unlink()
    make_tiny_llama(src, seed=1)  # same names and sizes, other weights
    r = qm("batch", listing, root, "--json")
    assert r.exit_code == 0, r.stderr
    assert [i["status"] for i in json.loads(r.stdout)["items"]] == ["converted"]
    assert qm("verify", root / "m", "--against", src).exit_code == 0


def test_batch_bad_device_is_a_usage_error_before_any_job(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """--device gpu ran every job and failed each ("[1/2] ...: --device 'gpu' is not supported"), exit 1."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama}\n")
    for command in (["batch", listing, tmp_path / "outs"], ["convert", tiny_llama, tmp_path / "out"]):
        r = qm(*command, "--device", "gpu")
        assert r.exit_code == 2, command
        assert r.stderr.splitlines()[-1] == (
            "Error: Invalid value for '--device': 'gpu' is not valid: use cpu, cuda or cuda:N"
        )
    assert not (tmp_path / "outs").exists()
    assert not (tmp_path / "out").exists()


def test_batch_says_once_that_cuda_falls_back(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """convert --device cuda warns when it converts on the CPU; batch said nothing."""
    from converter.writer.pipeline import resolve_device

    _, note = resolve_device("cuda")
    if note is None:
        pytest.skip("a usable CUDA backend: nothing falls back")
    other = shutil.copytree(tiny_llama, tmp_path / "other")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama}\n{other} second\n")
    r = qm("batch", listing, tmp_path / "outs", "--device", "cuda", "-q")
    assert r.exit_code == 0
    assert r.stderr == f"Warning: {note}\n"


def test_batch_warnings_name_the_job(qm, tmp_path: Path) -> None:
    """batch (and both dry runs) gave a job's warnings to Python's warnings module: printed as
    "/.../pipeline.py:191: UserWarning: routed MoE experts ..." with a line of our code, naming no
    job. Now "Warning: [k/n] SOURCE: ...", once per job, as convert prints it."""
    from tiny_models import make_tiny

    src = make_tiny("qwen3_moe", tmp_path / "moe")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{src}\n")
    warning = "Warning: routed MoE experts hold 54.0% of the parameters and stay 16-bit"
    for args, prefix in (
        (["batch", listing, tmp_path / "outs", "--dry-run"], f"[1/1] {src}: "),
        (["batch", listing, tmp_path / "outs", "-q"], f"[1/1] {src}: "),
        (["convert", src, tmp_path / "out", "--dry-run"], ""),
    ):
        r = qm(*args)
        assert r.exit_code == 0, (args, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1, (args, r.stderr)
        assert lines[0].startswith(warning.replace("Warning: ", f"Warning: {prefix}")), args


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """An up-to-date job is neither planned (preflight) nor converted: both go through convert()."""
    import functools

    import converter.writer.pipeline

    @functools.wraps(converter.writer.pipeline.convert)
    def no_work(*a, **k):
        msg = "an up-to-date job must not be planned or converted"
        raise AssertionError(msg)

    monkeypatch.setattr(converter.writer.pipeline, "convert", no_work)


def _shards(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.glob("*/*.safetensors"))}


def test_device_and_keep_downloads_do_not_make_a_job_stale(
    qm, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The up-to-date key held --device and --keep-downloads, which change no byte of the output: a rerun
    with another of them planned every job again (and verified it) instead of skipping it from its stamp."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama} a\n")
    root = tmp_path / "outs"
    assert qm("batch", listing, root, "-q").exit_code == 0
    before = _shards(root)
    _no_work(monkeypatch)
    for extra in (["--keep-downloads"], ["--device", "cuda"], ["--device", "cuda", "--keep-downloads"]):
        r = qm("batch", listing, root, "--json", *extra)
        assert r.exit_code == 0, (extra, r.stderr)
        assert [i["status"] for i in json.loads(r.stdout)["items"]] == ["up-to-date"], extra
    assert _shards(root) == before


def _legacy_job_key(job, options, state) -> str:
    """job_key as batch computed it before --device and --keep-downloads left it."""
    import hashlib

    from converter import __version__
    from converter.tools.batch_run import job_kwargs
    from formats.validate import FORMAT_VERSION

    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(job_kwargs(job, options).items())}
    for key in ("progress", "threads", "push_to", "private"):
        kw.pop(key, None)
    blob = json.dumps([job.source, kw, __version__, str(FORMAT_VERSION), state], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def test_a_stamp_with_the_previous_key_is_checked_once_and_never_reconverted(
    qm, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stamp written with the previous key (device and keep_downloads in it) no longer matches the
    cheap check: the job is planned once, found up to date by its fingerprint and files (no conversion,
    no hashing), and its stamp rewritten with the new key, so the run after skips it from the stamp."""
    import converter.tools.batch_run
    import converter.tools.inspection

    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama} a\n")
    root = tmp_path / "outs"
    stamp = root / ".quantize-model-batch" / "a.json"
    monkeypatch.setattr(converter.tools.batch_run, "job_key", _legacy_job_key)
    assert qm("batch", listing, root, "-q").exit_code == 0
    old_key = json.loads(stamp.read_text())["job_key"]
    monkeypatch.undo()
    before = _shards(root)

    def no_hashing(*a, **k):
        msg = "a folder whose stamp matches its fingerprint and files is not hashed again"
        raise AssertionError(msg)

    monkeypatch.setattr(converter.tools.inspection, "verify_path", no_hashing)
    r = qm("batch", listing, root, "--json")
    assert r.exit_code == 0, r.stderr
    assert [i["status"] for i in json.loads(r.stdout)["items"]] == ["up-to-date"]
    assert json.loads(stamp.read_text())["job_key"] not in (None, old_key)
    _no_work(monkeypatch)
    r = qm("batch", listing, root, "--json", "--device", "cuda")
    assert r.exit_code == 0, r.stderr
    assert [i["status"] for i in json.loads(r.stdout)["items"]] == ["up-to-date"]
    assert _shards(root) == before


def test_a_job_whose_folder_another_process_is_writing_reports_exit_75(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """The job's exit code in the reports tells a busy folder (retry) from a bad input (2)."""
    from converter.writer.manifest import FolderLock

    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama} a\n")
    root = tmp_path / "outs"
    (root / "a").mkdir(parents=True)
    with FolderLock(root / "a"):
        r = qm("batch", listing, root, "--json")
    assert r.exit_code == 75  # every failure was a busy folder: the batch, retried, goes on
    assert "1 of 1 job(s) found their folder being written by another quantize-model process" in r.stderr
    [item] = json.loads(r.stdout)["items"]
    assert (item["status"], item["exit_code"]) == ("failed", 75)
    assert item["error"].endswith(
        "another quantize-model process is writing this folder; wait for it to finish"
    )
    listing.write_text(f"{tiny_llama} a\n{tmp_path / 'missing'} b\n")
    with FolderLock(root / "a"):
        r = qm("batch", listing, root, "--json")
    assert r.exit_code == 1  # another failure needs a fix first


def test_a_bad_forced_isa_is_refused_once_before_any_job(
    qm, tiny_llama: Path, tmp_path: Path, monkeypatch
) -> None:
    """QM_CPU_ISA=neon failed every job with convert's message (exit 2 each, batch exit 1): refused
    once before any job, exit 2, nothing written."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama} a\n")
    monkeypatch.setenv("QM_CPU_ISA", "neon")
    r = qm("batch", listing, tmp_path / "outs")
    assert r.exit_code == 2
    assert "QM_CPU_ISA='neon': unknown kernel path" in r.stderr
    assert not (tmp_path / "outs").exists()


def test_an_output_root_inside_a_source_folder_is_refused_before_any_job(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """An output root inside a job's source folder failed that job alone (after the others had run) and
    left the batch's state files in the source: refused once before any work, exit 2, naming both."""
    other = shutil.copytree(tiny_llama, tmp_path / "other")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{other} a\n{tiny_llama} b\n")
    root = tiny_llama / "outs"
    r = qm("batch", listing, root)
    assert r.exit_code == 2
    assert r.stderr == (
        f"Error: {listing}:1: {root.resolve() / 'a'}: the output folder is inside the source folder "
        f"{tiny_llama.resolve()}; choose another output root\n"
    )
    assert not root.exists()
    assert not (tmp_path / "outs").exists()


def test_batch_keep_downloads_is_for_the_hub_jobs(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """`batch list --keep-downloads` serves the list's Hub jobs: its local jobs, which download nothing
    (`convert --keep-downloads` of a local path is refused, as `--revision`), convert as without it."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama} a\n")
    r = qm("batch", listing, tmp_path / "out", "--keep-downloads", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "a" / "config.json").is_file()


def test_a_plan_job_private_without_push_to_is_refused_with_the_plan(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """`private = true` in a job without `push_to` is refused before any job, naming the plan line, as
    `convert --private` without `--push-to` is (it would have failed the job when it ran)."""
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[[job]]\nsource = "{tiny_llama}"\nprivate = true\n')
    r = qm("batch", plan, tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "plan.toml:3:" in r.stderr
    assert "key 'private' makes the push_to repo private" in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_file_source_whose_tokenizer_changed_is_not_up_to_date(qm, tmp_path: Path) -> None:
    """A job whose source is one .safetensors file took only that file and the config.json beside it
    into its up-to-date key, but convert copies the folder's tokenizer, licence and generation config
    too: after the tokenizer beside it changed, the batch said up-to-date and the output kept the old
    tokenizer_config.json (a rerun of convert rewrites it)."""
    from qm_checkpoints import make_tiny_llama

    src = make_tiny_llama(tmp_path / "m")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{src / 'model.safetensors'} m\n")
    root = tmp_path / "outs"
    assert qm("batch", listing, root, "-q").exit_code == 0
    new = '{"model_max_length": 4096, "chat_template": "fixed"}\n'
    (src / "tokenizer_config.json").write_text(new)
    r = qm("batch", listing, root, "--json")
    assert r.exit_code == 0, r.stderr
    assert [i["status"] for i in json.loads(r.stdout)["items"]] != ["up-to-date"]
    assert (root / "m" / "tokenizer_config.json").read_text() == new
    r = qm("batch", listing, root, "--json")  # and then it is
    assert [i["status"] for i in json.loads(r.stdout)["items"]] == ["up-to-date"]


def test_an_output_root_that_is_a_file_is_refused_once_before_any_job(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """OUTPUT_ROOT naming a file (or a path under one) failed every job alike ("[1/2] ...: afile is a
    file, not a folder"), batch exit 1 as for a failed conversion: refused once, exit 2, as a bad option."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama} a\n")
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    for root, said in (
        (afile, f"{afile}: is a file"),
        (afile / "sub", f"{afile / 'sub'}: {afile} is a file"),
    ):
        r = qm("batch", listing, root, "--json")
        assert r.exit_code == 2, r.stderr
        assert r.stderr == f"Error: {said}, not a folder; choose another OUTPUT_ROOT\n"
        assert json.loads(r.stdout)["error"] == f"{said}, not a folder; choose another OUTPUT_ROOT"
    assert afile.read_text() == "not a folder\n"


def _finished_job_with_a_new_tokenizer(qm, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(source, list, OUTPUT_ROOT) of a finished one-job batch whose source's tokenizer changed since."""
    from qm_checkpoints import make_tiny_llama

    src = make_tiny_llama(tmp_path / "m")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{src} m\n")
    root = tmp_path / "outs"
    assert qm("batch", listing, root, "-q").exit_code == 0
    (src / "tokenizer_config.json").write_text('{"model_max_length": 4096}\n')
    return src, listing, root


def test_a_job_whose_copied_files_were_refreshed_is_not_called_resumed(qm, tmp_path: Path) -> None:
    """A finished job whose source's tokenizer changed since rewrites that file and keeps every shard:
    the JSON and JUnit reports called it 'resumed', which says a killed run; it is 'refreshed' (counted
    as such, a passing JUnit case), exit 0."""
    import xml.etree.ElementTree as ET

    src, listing, root = _finished_job_with_a_new_tokenizer(qm, tmp_path)
    junit = tmp_path / "junit.xml"
    r = qm("batch", listing, root, "--json", "--junit", junit)
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert [i["status"] for i in data["items"]] == ["refreshed"]
    assert data["counts"]["refreshed"] == 1
    assert data["counts"]["resumed"] == 0
    (case,) = ET.parse(junit).getroot().iter("testcase")
    assert [c.tag for c in case] == ["system-out"]  # passed: no failure, error or skipped
    assert case.find("system-out").text.startswith(f"{src} -> m: refreshed in ")
    r = qm("batch", listing, root)
    assert r.exit_code == 0
    assert f"[1/1] {src} -> m: no-op in" in r.stderr


@pytest.mark.parametrize(
    ("kind", "text", "where", "name", "problem"),
    [
        ("json", json.dumps([{"source": "SRC", "output": "   "}]), "LIST: item 0", "   ", "not blank"),
        (
            "json",
            json.dumps(["SRC", {"source": "SRC", "output": "m\x1b[31m\x00"}]),
            "LIST: item 1",
            "m\x1b[31m\x00",
            "without control characters (it holds U+0000, U+001B)",
        ),
        ("text", 'SRC "  "\n', "LIST:1: line 1", "  ", "not blank"),
        ("text", "SRC a\x7fb\n", "LIST:1: line 1", "a\x7fb", "without control characters (it holds U+007F)"),
        ("toml", '[[job]]\nsource = "SRC"\noutput = "x\\u0007"\n', None, "x\x07", ""),
    ],
    ids=["json-blank", "json-escape", "text-blank", "text-del", "toml-bell"],
)
def test_blank_or_control_character_output_names_are_refused_before_any_job(
    qm, tiny_llama: Path, tmp_path: Path, kind: str, text: str, where: str | None, name: str, problem: str
) -> None:
    """An output name of spaces only, or holding control characters (a generated JSON list), was
    accepted: the folder got that name and the JUnit report, naming the job, was no valid XML. Refused
    before any work, exit 2, naming the item."""
    listing = tmp_path / {"json": "list.json", "text": "list.txt", "toml": "plan.toml"}[kind]
    listing.write_text(text.replace("SRC", str(tiny_llama)), encoding="utf-8")
    root = tmp_path / "outs"
    r = qm("batch", listing, root, "--junit", tmp_path / "junit.xml")
    assert r.exit_code == 2, r.stderr
    if where is None:  # a TOML plan: its line and job
        assert r.stderr.startswith(f"Error: {listing}:3: job 1: output name {name!r} must be a plain")
        assert "without control characters (it holds U+0007)" in r.stderr
    else:
        said = where.replace("LIST", str(listing))
        assert r.stderr == (
            f"Error: {said}: output name {name!r} for {str(tiny_llama)!r} must be a plain folder name, "
            f"{problem}; fix the list\n".replace("name, without", "name without")
        )
    assert not root.exists()
    assert not (tmp_path / "junit.xml").exists()


def test_junit_report_is_xml_whatever_an_error_message_holds() -> None:
    """An error message (or a source) holding control characters, a lone surrogate (an undecodable file
    name) or U+FFFE made the JUnit report unparsable XML, or made writing it fail; each such character
    is written as its escape, the rest of the text as it is."""
    import xml.etree.ElementTree as ET

    from converter.tools.batch_run import BatchResult, ItemResult
    from converter.tools.junit import junit_xml
    from converter.tools.plan_file import Job

    error = "src\udcff/x: bad\x1b[31m byte \x00, \x0b\ufffe tab\there; line\nnext é"
    job = Job("src\udcff/x\x01", "out", None, {})
    result = BatchResult([ItemResult(job, False, 1.0, error, 2, status="failed")])
    root = ET.fromstring(junit_xml(result))
    (case,) = root.iter("testcase")
    assert case.get("classname") == "src\\udcff/x\\x01"
    said = "src\\udcff/x: bad\\x1b[31m byte \\x00, \\x0b\\ufffe tab\there; line\nnext é"
    failure = case.find("failure")
    assert failure.get("message") == said
    assert failure.text == said
    assert case.find("system-out").text.startswith("src\\udcff/x\\x01 -> out: failed in 1.0 s")


def test_batch_dry_run_names_a_refresh_as_the_run_does(qm, tmp_path: Path) -> None:
    """A finished job whose source's tokenizer changed since is refreshed by the run (that file
    rewritten, every shard kept), but the dry run planned it as 'resume', which says a killed run:
    it now says 'refresh' (the files it rewrites in its preflight, no disk needed for shards), and the run
    that follows reports 'refreshed'; convert --dry-run names those files too."""
    src, listing, root = _finished_job_with_a_new_tokenizer(qm, tmp_path)
    r = qm("batch", listing, root, "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    (row,) = json.loads(r.stdout)["jobs"]
    assert row["action"] == "refresh"
    assert row["preflight"]["refresh"] == ["tokenizer_config.json"]
    assert row["preflight"]["disk_needed"] == 0
    assert not row["preflight"]["up_to_date"]
    r = qm("batch", listing, root, "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert " refresh " in r.stdout
    assert "resume" not in r.stdout
    r = qm("convert", src, root / "m", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "(already converted: a run rewrites tokenizer_config.json, every shard kept)" in r.stdout
    r = qm("batch", listing, root, "--json")
    assert r.exit_code == 0, r.stderr
    assert [i["status"] for i in json.loads(r.stdout)["items"]] == ["refreshed"]
    rows = json.loads(qm("batch", listing, root, "--dry-run", "--json").stdout)["jobs"]
    assert [x["action"] for x in rows] == ["skip (up to date)"]
