"""`batch PLAN.toml`: up-to-date skips, failures isolated, exit codes, JUnit/JSON reports, dry runs,
preflight refusals, --only / --jobs / --fail-fast, and `verify` catching a corrupted shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import swap_data_keeping_stat


def _plan(tmp_path: Path, src: Path, *, extra: str = "") -> Path:
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f"""
[defaults]
quant_type = "nf4"
output_root = "out"

[[job]]
source = "{src}"
variants = [{{quant_type = "nf4"}}, {{quant_type = "fp4"}}]

[[job]]
source = "{src}"
output = "b128"
blocksize = 128
{extra}"""
    )
    return plan


def _shard_state(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.glob("*/*.safetensors"))
    }


def test_plan_runs_then_second_run_does_no_work(qm, tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    plan = _plan(tmp_path, tiny_llama)
    r = qm("batch", plan, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert [(i["output"], i["status"]) for i in data["items"]] == [
        ("tiny-llama-nf4", "converted"),
        ("tiny-llama-fp4", "converted"),
        ("b128", "converted"),
    ]
    root = tmp_path / "out"
    before = _shard_state(root)
    assert len(before) == 3

    import functools

    import converter.writer.pipeline

    @functools.wraps(converter.writer.pipeline.convert)  # the plan's keys are checked against its signature
    def no_work(*a, **k):
        msg = "an up-to-date job must not be planned or converted"
        raise AssertionError(msg)

    monkeypatch.setattr(converter.writer.pipeline, "convert", no_work)
    r = qm("batch", plan, "--json")
    assert r.exit_code == 0, r.stderr
    assert [i["status"] for i in json.loads(r.stdout)["items"]] == ["up-to-date"] * 3
    assert _shard_state(root) == before  # not rewritten, not even touched
    monkeypatch.undo()

    r = qm("batch", plan, "--json", "--force", "--only", "1/3")
    assert r.exit_code == 0, r.stderr
    assert [i["status"] for i in json.loads(r.stdout)["items"]] == ["converted"]


def test_changed_files_are_verified_before_skipping(qm, tiny_llama: Path, tmp_path: Path) -> None:
    plan = _plan(tmp_path, tiny_llama)
    assert qm("batch", plan, "-q").exit_code == 0
    shard = tmp_path / "out" / "b128" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # same size, new mtime: the stamp no longer matches, the hash check fails
    shard.write_bytes(bytes(data))
    r = qm("batch", plan, "--json")
    assert r.exit_code == 0, r.stderr
    statuses = {i["output"]: i["status"] for i in json.loads(r.stdout)["items"]}
    assert statuses == {"tiny-llama-nf4": "up-to-date", "tiny-llama-fp4": "up-to-date", "b128": "converted"}
    assert qm("verify", tmp_path / "out" / "b128").exit_code == 0


def test_a_source_shard_swapped_with_its_mtime_restored_is_not_up_to_date(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """batch's up-to-date check compared only the sizes and mtimes of a local source's files, so a
    weight file swapped for another of the same size and header with its mtime restored (`cp -p`,
    `rsync -t`) was skipped as up to date, over shards made from the old weights, where `convert`
    names the change (its source identity has sampled data windows). batch now compares the same
    identity, and converts the job again."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    plan = _plan(tmp_path, src)
    assert qm("batch", plan, "-q").exit_code == 0, "first run"
    before = _shard_state(tmp_path / "out")
    weights = src / "model.safetensors"
    swap_data_keeping_stat(weights)
    r = qm("batch", plan, "--json")
    assert r.exit_code == 0, r.stderr
    assert {i["status"] for i in json.loads(r.stdout)["items"]} == {"converted"}
    after = _shard_state(tmp_path / "out")
    assert all(after[k][1] != before[k][1] for k in before), "shards must be made from the new weights"
    r = qm("batch", plan, "--json")
    assert {i["status"] for i in json.loads(r.stdout)["items"]} == {"up-to-date"}


def test_a_copied_file_deleted_from_a_subfolder_of_the_output_is_not_up_to_date(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """batch's stamp listed the output's top-level files only, so a copied file in a subfolder (a
    sentence-transformers `1_Pooling/config.json`) deleted from the output left the job `up-to-date`
    without it, where `convert` restores it. The stamp now lists the subfolders' files too."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    plan = _plan(tmp_path, src)
    assert qm("batch", plan, "-q").exit_code == 0, "first run"
    copied = tmp_path / "out" / "b128" / "1_Pooling" / "config.json"
    assert copied.is_file()
    copied.unlink()
    r = qm("batch", plan, "--json")
    assert r.exit_code == 0, r.stderr
    statuses = {i["output"]: i["status"] for i in json.loads(r.stdout)["items"]}
    assert statuses["b128"] != "up-to-date"
    assert copied.read_text() == '{"pooling_mode_mean_tokens": true}'


def test_failing_job_is_isolated_and_reported_in_junit(qm, tiny_llama: Path, tmp_path: Path) -> None:
    from junitparser import Failure, JUnitXml

    plan = _plan(tmp_path, tiny_llama, extra='\n[[job]]\nsource = "./does-not-exist"\noutput = "missing"\n')
    junit, report = tmp_path / "ci" / "junit.xml", tmp_path / "ci" / "report.json"
    r = qm("batch", plan, "--junit", junit, "--json", report, "-q")
    assert r.exit_code == 1
    assert (
        r.stderr.splitlines()[-1] == "Error: 1 of 4 conversion(s) failed; fix them and rerun the same batch"
    )
    data = json.loads(report.read_text())
    assert data["counts"]["converted"] == 3
    assert data["counts"]["failed"] == 1
    failed = data["items"][3]
    assert failed["exit_code"] == 2
    # A relative local path is relative to the plan file, and the error names it in full.
    assert failed["error"].startswith(f"{tmp_path}/does-not-exist: no such file or folder")

    xml = JUnitXml.fromfile(str(junit))
    suites = list(xml)
    assert len(suites) == 1
    suite = suites[0]
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (4, 1, 0, 0)
    cases = {c.name: c for c in suite}
    assert set(cases) == {"tiny-llama-nf4", "tiny-llama-fp4", "b128", "missing"}
    bad = cases["missing"]
    assert [type(x) for x in bad.result] == [Failure]
    assert bad.result[0].message == failed["error"]
    assert bad.result[0].type == "exit 2"
    ok = cases["b128"]
    assert ok.is_passed
    assert ok.time >= 0
    assert f"({data['items'][2]['bytes_out']} bytes)" in ok.system_out


def test_fail_fast_cancels_the_rest(qm, tiny_llama: Path, tmp_path: Path) -> None:
    from junitparser import JUnitXml, Skipped

    plan = tmp_path / "plan.toml"
    plan.write_text(f'[[job]]\nsource = "./nope"\n\n[[job]]\nsource = "{tiny_llama}"\n')
    junit = tmp_path / "junit.xml"
    r = qm("batch", plan, tmp_path / "out", "--fail-fast", "--junit", junit, "--json")
    assert r.exit_code == 1
    assert [i["status"] for i in json.loads(r.stdout)["items"]] == ["failed", "cancelled"]
    # the summary counted the cancelled job as failed: "2 of 2 conversion(s) failed"
    assert r.stderr.splitlines()[-1] == (
        "Error: 1 of 2 conversion(s) failed (1 not started: --fail-fast); fix them and rerun the same batch"
    )
    assert not (tmp_path / "out" / "tiny-llama").exists()
    suite = next(iter(JUnitXml.fromfile(str(junit))))
    assert (suite.tests, suite.failures, suite.skipped) == (2, 1, 1)
    assert isinstance(next(c for c in suite if c.name == "tiny-llama").result[0], Skipped)


def test_bad_plan_exits_2_before_any_work(qm, tiny_llama: Path, tmp_path: Path) -> None:
    plan = _plan(tmp_path, tiny_llama, extra="quant_storage = 'uint4'\n")
    r = qm("batch", plan)
    assert r.exit_code == 2
    assert r.stderr.startswith(f"Error: {plan}:14: job 2: key 'quant_storage': 'uint4' is not valid")
    assert not (tmp_path / "out").exists()


def test_a_missing_output_root_is_asked_for_where_it_can_be_given(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """A text or JSON list without OUTPUT_ROOT was told to "set output_root in [defaults]", which only
    a TOML plan has."""
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[[job]]\nsource = "{tiny_llama}"\n')
    r = qm("batch", plan)
    assert (r.exit_code, r.stderr) == (
        2, f"Error: {plan}: no OUTPUT_ROOT: give one after the plan, or set output_root in [defaults]\n"
    )  # fmt: skip
    for name, text in (("list.txt", f"{tiny_llama}\n"), ("list.json", json.dumps([str(tiny_llama)]))):
        (tmp_path / name).write_text(text)
        r = qm("batch", tmp_path / name)
        assert (r.exit_code, r.stderr) == (
            2, f"Error: {tmp_path / name}: no OUTPUT_ROOT: give one after the list (a list cannot set it)\n"
        )  # fmt: skip


def test_parallel_jobs_give_the_same_bytes(qm, tiny_llama: Path, tmp_path: Path) -> None:
    plan = _plan(tmp_path, tiny_llama)
    assert qm("batch", plan, tmp_path / "seq", "-q").exit_code == 0
    r = qm("batch", plan, tmp_path / "par", "--jobs", "3", "--json")
    assert r.exit_code == 0, r.stderr
    assert [i["status"] for i in json.loads(r.stdout)["items"]] == ["converted"] * 3
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert {k: v[1] for k, v in _shard_state(seq).items()} == {k: v[1] for k, v in _shard_state(par).items()}
    r = qm("batch", plan, tmp_path / "par", "--jobs", "3", "--json")
    assert [i["status"] for i in json.loads(r.stdout)["items"]] == ["up-to-date"] * 3


def test_batch_dry_run_writes_nothing(qm, tiny_llama: Path, tmp_path: Path) -> None:
    plan = _plan(tmp_path, tiny_llama)
    r = qm("batch", plan, "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)["jobs"]
    assert [(x["job"]["output"], x["action"]) for x in rows] == [
        ("tiny-llama-nf4", "convert"),
        ("tiny-llama-fp4", "convert"),
        ("b128", "convert"),
    ]
    assert not (tmp_path / "out").exists()
    assert qm("batch", plan, "-q", "--only", "2/3").exit_code == 0
    rows = json.loads(qm("batch", plan, "--dry-run", "--json").stdout)["jobs"]
    assert sorted(x["action"] for x in rows) == ["convert", "convert", "skip (up to date)"]


def test_batch_dry_run_fails_when_a_job_would(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """docs/ci.md runs `batch --dry-run` as a CI preflight step: it exited 0 with a job shown "fail"."""
    plan = _plan(tmp_path, tiny_llama, extra=f'\n[[job]]\nsource = "{tmp_path / "missing"}"\noutput = "m"\n')
    for args in ((), ("--json",)):
        r = qm("batch", plan, "--dry-run", *args)
        assert r.exit_code == 2, r.output
        assert "missing: no such file or folder" in r.output
    rows = json.loads(qm("batch", plan, "--dry-run", "--json").stdout)["jobs"]
    assert [x["action"] for x in rows] == ["convert", "convert", "convert", "fail"]
    assert not (tmp_path / "out").exists()


def test_dry_runs_fail_for_an_output_folder_the_run_refuses(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """A folder with someone else's files (or another conversion) was shown as "convert", exit 0, by
    both dry runs; the real run then refused it."""
    plan = _plan(tmp_path, tiny_llama)
    (tmp_path / "out" / "b128").mkdir(parents=True)
    (tmp_path / "out" / "b128" / "notes.txt").write_text("mine\n")
    r = qm("batch", plan, "--dry-run", "--json")
    assert r.exit_code == 2, r.output
    rows = {x["job"]["output"]: x for x in json.loads(r.stdout)["jobs"]}
    assert [x["action"] for x in rows.values()] == ["convert", "convert", "fail"]
    assert "holds files quantize-model did not write (notes.txt)" in rows["b128"]["error"]
    assert qm("batch", plan, "--dry-run", "--force").exit_code == 0  # --force empties it

    # A folder the batch wrote for the job, with older options, is replaced, not refused.
    (tmp_path / "out" / "b128" / "notes.txt").unlink()
    assert qm("batch", plan, "-q").exit_code == 0
    plan.write_text(plan.read_text().replace("blocksize = 128", "blocksize = 256"))
    r = qm("batch", plan, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    assert [x["action"] for x in json.loads(r.stdout)["jobs"]] == ["skip (up to date)"] * 2 + ["convert"]

    out = tmp_path / "out" / "b128"
    r = qm("convert", tiny_llama, out, "--dry-run", "--quant-type", "fp4")
    assert r.exit_code == 2, r.output
    assert "holds a conversion with different options or a different source" in r.stderr
    assert qm("convert", tiny_llama, out, "--dry-run", "--blocksize", "128").exit_code == 0
    assert qm("convert", tiny_llama, out, "--dry-run", "--quant-type", "fp4", "--overwrite").exit_code == 0


def test_convert_dry_run_lists_every_tensor_and_writes_nothing(qm, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = qm("convert", tiny_llama, out, "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert not out.exists()
    from safetensors import safe_open

    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {t["name"] for t in data["tensors"]} == names
    fates = {t["name"]: (t["action"], t["reason"]) for t in data["tensors"]}
    assert fates["model.layers.0.mlp.up_proj.weight"] == ("quantize", "nf4 blocksize 64")
    assert fates["model.norm.weight"][0] == "keep"
    assert "RMSNorm" in fates["model.norm.weight"][1]
    assert data["fits"]
    assert data["disk_needed"] == data["bytes_out"] > 0
    assert data["peak_ram"] > 0
    assert data["bits_per_param"] > 4
    # The plan's size is an upper bound of what a real run writes.
    assert qm("convert", tiny_llama, out, "-q").exit_code == 0
    assert sum(p.stat().st_size for p in out.glob("*.safetensors")) <= data["bytes_out"]
    human = qm("convert", tiny_llama, tmp_path / "other", "--dry-run")
    assert "model.layers.1.self_attn.q_proj.weight" in human.stdout
    assert "Fits" in human.stdout


def test_too_small_disk_is_refused_up_front(qm, tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    import converter.plan.preflight

    monkeypatch.setattr(converter.plan.preflight, "disk_free", lambda path: (1000, tmp_path))
    out = tmp_path / "out"
    r = qm("convert", tiny_llama, out)
    assert r.exit_code == 2
    assert r.stderr.startswith(f"Error: {out}: the conversion needs ")
    assert (
        "but " + str(tmp_path) + " has 1.00 kB free; free some space or choose another output folder"
        in r.stderr
    )
    assert not out.exists()  # refused before the folder was created
    r = qm("convert", tiny_llama, out, "--dry-run")
    assert r.exit_code == 2
    assert "Fits           NO" in r.stdout
    assert not out.exists()


def test_an_output_on_a_read_only_filesystem_is_refused_up_front(
    qm, tiny_llama: Path, tmp_path: Path, monkeypatch
) -> None:
    """`convert --dry-run` (and `batch --dry-run`, a CI preflight) said "Fits yes" for an output on a
    read-only filesystem, with its free space; the run then failed creating the folder ("Read-only file
    system; check the path and rerun", exit 1). The preflight names the folder that cannot be written."""
    from read_only import mark_read_only

    mark_read_only(monkeypatch, tmp_path)
    out = tmp_path / "out"
    said = f"Error: {out}: {tmp_path} is on a read-only filesystem; choose another output folder\n"
    r = qm("convert", tiny_llama, out)
    assert (r.exit_code, r.stderr.splitlines()[-1] + "\n") == (2, said)
    assert not out.exists()
    r = qm("convert", tiny_llama, out, "--dry-run")
    assert r.exit_code == 2
    assert "Fits           NO" in r.stdout
    assert not out.exists()


def test_verify_catches_a_corrupted_shard_and_recomputes_quality(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert qm("convert", tiny_llama, out, "-q").exit_code == 0
    r = qm("verify", out, "--against", tiny_llama, "--json")
    assert r.exit_code == 0, r.stderr
    recomputed = json.loads(r.stdout)["quality"]
    report = json.loads((out / "quantization_report.json").read_text())
    assert recomputed["tensors_measured"] == report["quality"]["tensors_measured"] == 14
    for t in report["tensors"]:
        if t["action"] == "quantize":  # same codes, same kernel, same machine: the same numbers
            assert recomputed["tensors"][t["name"]]["rel_rmse"] == t["rel_rmse"]
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x55
    shard.write_bytes(bytes(data))
    r = qm("verify", out)
    assert r.exit_code == 1
    assert "sha256" in r.stderr


@pytest.mark.parametrize("option", ["--revision"])
def test_batch_refuses_a_batch_wide_revision(qm, tiny_llama: Path, tmp_path: Path, option: str) -> None:
    r = qm("batch", _plan(tmp_path, tiny_llama), option, "main")
    assert r.exit_code == 2
    assert "--revision cannot apply to a whole batch" in r.stderr


def test_jobs_wait_for_the_budget(tiny_llama: Path, tmp_path: Path) -> None:
    """--jobs N starts a job only while the running ones' estimates fit; a tiny budget serialises."""
    from converter.tools.batch_run import Budget, run_batch
    from converter.tools.plan_file import load_plan

    plan = load_plan(_plan(tmp_path, tiny_llama))
    events: list[tuple[str, str]] = []
    result = run_batch(
        plan.jobs,
        tmp_path / "out",
        parallel=3,
        budget=Budget(memory=None, disk=1),  # every job needs more disk than that: one at a time
        on_start=lambda k, job: events.append(("start", job.output)),
        on_done=lambda k, r: events.append(("done", r.item.output)),
    )
    assert result.ok
    assert [e[0] for e in events] == ["start", "done"] * 3
    events.clear()
    result = run_batch(
        plan.jobs, tmp_path / "out2", parallel=3, budget=Budget(memory=None, disk=None),
        on_start=lambda k, job: events.append(("start", job.output)),
        on_done=lambda k, r: events.append(("done", r.item.output)),
    )  # fmt: skip
    assert result.ok
    assert [e[0] for e in events[:3]] == ["start"] * 3  # no budget: all three at once


def test_load_plan_and_run_batch_take_str_paths(tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    """docs/python-api.md's `load_plan(path)` and `run_batch(jobs, output_root)` with plain strings,
    as convert() takes them: load_plan("plan.toml") raised AttributeError ('str' object has no
    attribute 'suffix') and run_batch(jobs, "out") TypeError (str / str)."""
    from converter.tools.batch_run import run_batch
    from converter.tools.plan_file import load_plan

    monkeypatch.chdir(tmp_path)
    _plan(tmp_path, tiny_llama)
    (tmp_path / "list.txt").write_text(f"{tiny_llama} from-list\n")
    plan = load_plan("plan.toml")
    assert [j.output for j in plan.jobs] == [j.output for j in load_plan(tmp_path / "plan.toml").jobs]
    assert [j.output for j in load_plan("list.txt").jobs] == ["from-list"]
    result = run_batch(plan.jobs[:1], "out-str")
    assert result.ok
    assert (tmp_path / "out-str" / plan.jobs[0].output / "config.json").is_file()


def test_variants_of_one_conversion_are_refused_and_foreign_options_warned(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """`variants = [{quant_type = "int8"}, {quant_type = "int8", double_quant = false}]` converted the
    same bytes into two folders (llama-int8, llama-int8-no-double-quant), exit 0: now exit 2 before any
    work, naming both variants; an option another method owns is a warning naming the line."""
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[defaults]\noutput_root = "out"\n[[job]]\nsource = "{tiny_llama}"\n'
        'variants = [{quant_type = "int8"}, {quant_type = "int8", double_quant = false}]\n'
    )
    r = qm("batch", plan)
    assert r.exit_code == 2
    assert "job 1, variant 2 is the same conversion as job 1, variant 1" in r.stderr
    assert "double_quant does not apply to quant_type 'int8'" in r.stderr
    assert not (tmp_path / "out").exists()

    plan.write_text(
        f'[defaults]\noutput_root = "out"\n[[job]]\nsource = "{tiny_llama}"\n'
        'variants = [{quant_type = "int8", double_quant = false}, {quant_type = "nf4"}]\n'
    )
    r = qm("batch", plan, "--json", "-")
    assert r.exit_code == 0, r.stderr
    assert [i["output"] for i in json.loads(r.stdout)["items"]] == ["tiny-llama-int8", "tiny-llama-nf4"]
    assert f"{plan}:5: job 1, variant 1: double_quant does not apply to quant_type 'int8'" in r.stderr

    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama} listed\n")
    r = qm("batch", listing, tmp_path / "out2", "--quant-type", "int8", "--blocksize", "128", "-q")
    assert r.exit_code == 0, r.stderr
    assert "--blocksize: not used by --quant-type int8" in r.stderr


def test_moe_experts_quantize_in_defaults_does_not_fail_the_int8_variants(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """`[defaults] moe_experts = "quantize"` with `variants = [{quant_type = "nf4"}, {quant_type =
    "int8"}]`: the nf4 variant converted, then every int8 variant failed at run time ("--moe-experts
    quantize writes 4-bit expert records ... not int8"), exit 1, though a plan is checked before any
    work. Experts are quantized by the 4-bit types only, so int8 variants take moe_experts as they take
    double_quant: left out (a warning where the job sets it); a list with both on the command line is
    refused before any job (each item failed alike)."""
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[defaults]\noutput_root = "out"\nmoe_experts = "quantize"\n[[job]]\nsource = "{tiny_llama}"\n'
        'variants = [{quant_type = "nf4"}, {quant_type = "int8"}]\n'
    )
    r = qm("batch", plan, "--json", "-")
    assert r.exit_code == 0, r.stderr
    items = json.loads(r.stdout)["items"]
    assert [(i["output"], i["status"]) for i in items] == [
        ("tiny-llama-nf4", "converted"),
        ("tiny-llama-int8", "converted"),
    ]
    assert "does not apply" not in r.stderr  # [defaults] apply to every quant type

    plan.write_text(
        f'[defaults]\noutput_root = "out"\n[[job]]\nsource = "{tiny_llama}"\n'
        'variants = [{quant_type = "int8", moe_experts = "quantize"}, {quant_type = "int8"}]\n'
    )
    r = qm("batch", plan)
    assert r.exit_code == 2
    assert "job 1, variant 2 is the same conversion as job 1, variant 1" in r.stderr
    assert "moe_experts does not apply to quant_type 'int8'" in r.stderr

    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama} listed\n")
    r = qm("batch", listing, tmp_path / "out2", "--quant-type", "int8", "--moe-experts", "quantize")
    assert r.exit_code == 2
    assert "--moe-experts quantize writes 4-bit expert records: use it with nf4 / fp4, not int8" in r.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("option", ["--json", "--junit"])
def test_a_report_path_that_cannot_be_written_is_refused_before_any_job(
    qm, tiny_llama: Path, tmp_path: Path, option: str
) -> None:
    """`--json reports/r.json` where `reports` is a file (a typo, a read-only folder) ran every job and
    then failed the batch at its end, exit 1, naming a hidden temp file: now exit 2 before any work."""
    plan = _plan(tmp_path, tiny_llama)
    (tmp_path / "reports").write_text("a file, not a folder")
    r = qm("batch", plan, option, tmp_path / "reports" / "r.json", "-q")
    assert r.exit_code == 2
    assert f"{tmp_path / 'reports' / 'r.json'}: {option} cannot write its report there" in r.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "folder").mkdir()
    r = qm("batch", plan, option, tmp_path / "folder", "-q")
    assert r.exit_code == 2
    assert f"{tmp_path / 'folder'}: {option} cannot write its report there (is a folder)" in r.stderr


def test_a_first_run_interrupted_mid_job_is_replaced_after_the_source_changed(
    qm, tiny_llama: Path, tmp_path: Path, monkeypatch
) -> None:
    """A job's first run stopped mid-conversion (CI timeout, pre-emption) left an unfinished folder and no
    stamp; once the source changed (a new commit on main), every rerun refused that folder as one the
    batch did not write ("holds a conversion with ... a different source; pass --overwrite"), night
    after night. The batch claims the folder when it starts the job, so the rerun replaces it."""
    import functools
    import shutil

    import converter.writer.pipeline

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[defaults]\noutput_root = "out"\n\n[[job]]\nsource = "{src}"\n')
    real = converter.writer.pipeline.convert

    @functools.wraps(real)
    def stopped_mid_job(*a, **k):
        def hook(name: str, done: int) -> None:
            if done:
                raise KeyboardInterrupt  # Ctrl-C while the first shard is being written

        return real(*a, **{**k, "progress": hook})

    monkeypatch.setattr(converter.writer.pipeline, "convert", stopped_mid_job)
    r = qm("batch", plan, "-q")
    assert r.exit_code == 130, r.stderr
    assert not (tmp_path / "out" / "src" / "config.json").exists()  # unfinished
    monkeypatch.undo()

    swap_data_keeping_stat(src / "model.safetensors")
    r = qm("batch", plan, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["items"][0]["status"] == "converted"
    assert qm("verify", tmp_path / "out" / "src", "-q").exit_code == 0
