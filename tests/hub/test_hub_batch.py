"""`batch` with Hub jobs against the fake Hub: a nightly rerun costs one API call per job, and a new
commit on the source makes the job convert again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_hub import FakeHub
from hub_helpers import qm

pytestmark = pytest.mark.hub


def test_hub_job_up_to_date_costs_one_api_call(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    fake_hub.add_repo("org/tiny", checkpoint_dir)
    plan = tmp_path / "plan.toml"
    plan.write_text('[defaults]\noutput_root = "out"\n\n[[job]]\nsource = "org/tiny"\nrevision = "main"\n')
    r = qm("batch", plan, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["items"][0]["status"] == "converted"

    fake_hub.requests.clear()
    r = qm("batch", plan, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["items"][0]["status"] == "up-to-date"
    assert [(m, p) for _, m, p, _ in fake_hub.requests] == [("GET", "/api/models/org/tiny/revision/main")]

    # A new commit on main: the job is planned and converted again.
    fake_hub.add_repo("org/tiny", {"README.md": b"new card\n"})
    r = qm("batch", plan, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["items"][0]["status"] == "converted"
