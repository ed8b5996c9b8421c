"""`batch` with Hub jobs against the fake Hub: a nightly rerun costs one API call per job, and a new
commit on the source makes the job convert again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_hub import FakeHub
from hub_helpers import qm

pytestmark = pytest.mark.hub


def _run(plan: Path) -> dict:
    """The one job's item of ``batch PLAN --json``, the batch having exited 0."""
    r = qm("batch", plan, "--json")
    assert r.exit_code == 0, r.stderr
    [item] = json.loads(r.stdout)["items"]
    return item


def test_hub_job_up_to_date_costs_one_api_call(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    fake_hub.add_repo("org/tiny", checkpoint_dir)
    plan = tmp_path / "plan.toml"
    plan.write_text('[defaults]\noutput_root = "out"\n\n[[job]]\nsource = "org/tiny"\nrevision = "main"\n')
    assert _run(plan)["status"] == "converted"

    fake_hub.requests.clear()
    assert _run(plan)["status"] == "up-to-date"
    assert [(m, p) for _, m, p, _ in fake_hub.requests] == [("GET", "/api/models/org/tiny/revision/main")]

    # A new commit on main: the job is planned and converted again.
    fake_hub.add_repo("org/tiny", {"README.md": b"new card\n"})
    assert _run(plan)["status"] == "converted"


def test_a_pushed_job_is_not_pushed_again(
    tmp_path: Path,
    fake_hub: FakeHub,
    hf_home: Path,
    checkpoint_dir: Path,
    tiny_checkpoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stamp recorded the pushed repo's URL and compared it with the repo id: every later run of a
    job with push_to missed the cheap check, re-hashed the folder and pushed it again ("A job with
    push_to pushes once"). It is up to date without a push; a stamp with the URL counts as pushed."""
    from hub_helpers import TOKEN

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    plan = tmp_path / "plan.toml"
    src = tiny_checkpoint("llama")
    plan.write_text(f'[defaults]\noutput_root = "out"\n\n[[job]]\nsource = "{src}"\npush_to = "me/pushed"\n')
    item = _run(plan)
    assert (item["status"], item["pushed_to"]) == ("converted", "me/pushed")
    assert "README.md" in fake_hub.repos["me/pushed"].commits[fake_hub.repos["me/pushed"].refs["main"]]

    def no_push(*a, **k):
        msg = "pushed again"
        raise AssertionError(msg)

    import converter.tools.push

    monkeypatch.setattr(converter.tools.push, "push_folder", no_push)
    fake_hub.requests.clear()
    item = _run(plan)
    assert (item["status"], item["pushed_to"]) == ("up-to-date", None)
    assert fake_hub.requests == []  # a local source: not even one API call

    stamp = tmp_path / "out" / ".quantize-model-batch" / f"{src.name}.json"  # as earlier versions wrote it
    data = json.loads(stamp.read_text())
    data["pushed_to"] = f"{fake_hub.endpoint}/me/pushed"
    stamp.write_text(json.dumps(data))
    assert _run(plan)["status"] == "up-to-date"


def test_a_job_pinned_to_a_commit_is_up_to_date_without_any_call(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    """A commit never moves: the job's source state is its revision, no API call (there was one per run)."""
    sha = fake_hub.add_repo("org/tiny", checkpoint_dir)
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[defaults]\noutput_root = "out"\n\n[[job]]\nsource = "org/tiny"\nrevision = "{sha}"\n')
    assert _run(plan)["status"] == "converted"
    fake_hub.requests.clear()
    assert _run(plan)["status"] == "up-to-date"
    assert fake_hub.requests == []


def test_offline_up_to_date_hub_jobs_are_skipped_from_the_cached_ref(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HF_HUB_OFFLINE=1 the commit could not be asked for, so every up-to-date Hub job was planned
    from the cached snapshot and its whole output re-hashed: the cache's ref of the revision (kept
    downloads record it) is the commit an offline run reads, and the stamp decides, as online."""
    from huggingface_hub import constants

    fake_hub.add_repo("org/tiny", checkpoint_dir)
    plan = tmp_path / "plan.toml"
    plan.write_text(
        '[defaults]\noutput_root = "out"\nkeep_downloads = true\n\n[[job]]\nsource = "org/tiny"\n'
    )
    _run(plan)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    import functools

    import converter.writer.pipeline

    @functools.wraps(converter.writer.pipeline.convert)  # plan keys are checked against its signature
    def no_work(*a, **k):
        msg = "an up-to-date job must not be planned or converted"
        raise AssertionError(msg)

    monkeypatch.setattr(converter.writer.pipeline, "convert", no_work)
    fake_hub.requests.clear()
    assert _run(plan)["status"] == "up-to-date"
    assert fake_hub.requests == []


def test_a_job_whose_revision_does_not_exist_names_the_plan_not_the_option(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    """The job's error said 'give an existing branch, tag or commit to --revision', an option batch
    refuses (exit 2): the revision of a batch job is the plan's key or the JSON item's field."""
    fake_hub.add_repo("org/tiny", checkpoint_dir)
    plan = tmp_path / "plan.toml"
    plan.write_text('[defaults]\noutput_root = "out"\n\n[[job]]\nsource = "org/tiny"\nrevision = "v9"\n')
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"source": "org/tiny", "revision": "v9"}]))
    for args, where in (([plan], f"{plan}:4"), ([listing, tmp_path / "out2"], str(listing))):
        r = qm("batch", *args, "--json")
        assert r.exit_code == 1, r.stderr
        [item] = json.loads(r.stdout)["items"]
        assert (item["status"], item["exit_code"]) == ("failed", 2)
        assert item["error"] == (
            "org/tiny: revision 'v9' not found; give an existing branch, tag or commit as the job's "
            f"revision ({where})"
        )
    r = qm("batch", plan, "--dry-run")
    assert r.exit_code == 2
    assert r.stderr.endswith(f"give an existing branch, tag or commit as the job's revision ({plan}:4)\n")
