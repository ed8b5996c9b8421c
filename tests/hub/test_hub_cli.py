"""`quantize-model convert REPO_ID ...` against the fake Hub: one-line errors and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_hub import FakeHub, Fault

pytestmark = pytest.mark.hub


def qm(*args: str | Path):
    from converter.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_convert_from_hub(tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path) -> None:
    commit = fake_hub.add_repo("org/tiny", checkpoint_dir)
    r = qm("convert", "org/tiny", tmp_path / "out", "--revision", "main", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True
    report = json.loads((tmp_path / "out" / "quantization_report.json").read_text())
    assert report["source"]["commit"] == commit
    assert report["source"]["repo_id"] == "org/tiny"


def test_repo_not_found(tmp_path: Path, fake_hub: FakeHub, hf_home: Path) -> None:
    r = qm("convert", "org/missing", tmp_path / "out")
    assert r.exit_code == 2
    assert _error_line(r) == (
        f"Error: org/missing: repository not found on {fake_hub.endpoint}; check the repo id, "
        "or if it is private run `hf auth login` or set HF_TOKEN; as a local path, "
        f"{Path('org/missing').absolute()} does not exist either"
    )
    assert not (tmp_path / "out").exists()


def test_a_missing_local_path_shaped_like_a_repo_id_says_it_was_looked_for(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, monkeypatch
) -> None:
    """`convert models/llama out` run from another folder than meant (a CI step's working directory):
    the error was the Hub's alone, "repository not found" or, under HF_HUB_OFFLINE=1, "the repo is not
    in the local Hugging Face cache ...; unset HF_HUB_OFFLINE to download it", never that no such local
    folder exists. Both now say so, with the absolute path looked for."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    r = qm("convert", "models/llama", tmp_path / "out")
    assert r.exit_code == 2
    assert _error_line(r).endswith(
        f"repository not found on {fake_hub.endpoint}; check the repo id, or if it is private run `hf auth "
        f"login` or set HF_TOKEN; as a local path, {tmp_path / 'models' / 'llama'} does not exist either"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for command in (
        ["convert", "models/llama", tmp_path / "out"],
        ["batch", "list.txt", tmp_path / "outs"],
        ["inspect", "models/llama"],
    ):
        (tmp_path / "list.txt").write_text("models/llama\n")
        r = qm(*command)
        assert r.exit_code == (1 if command[0] == "batch" else 2)
        assert r.stderr.splitlines()[0].endswith(
            "models/llama: the repo is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; unset "
            f"HF_HUB_OFFLINE to download it; as a local path, {tmp_path / 'models' / 'llama'} does not "
            "exist either"
        )
    assert not (tmp_path / "out").exists()


def test_gated(tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path) -> None:
    fake_hub.add_repo("org/gated", checkpoint_dir, gated=True)
    r = qm("convert", "org/gated", tmp_path / "out")
    assert r.exit_code == 2
    assert _error_line(r) == (
        f"Error: org/gated: gated repo; request access at {fake_hub.endpoint}/org/gated, "
        "then run `hf auth login` or set HF_TOKEN with an account that has it"
    )


def test_revision_not_found(tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path) -> None:
    fake_hub.add_repo("org/tiny", checkpoint_dir)
    r = qm("convert", "org/tiny", tmp_path / "out", "--revision", "nope")
    assert r.exit_code == 2
    assert _error_line(r) == (
        "Error: org/tiny: revision 'nope' not found; give an existing branch, tag or commit to --revision"
    )


def test_pickle_refused(tmp_path: Path, fake_hub: FakeHub, hf_home: Path) -> None:
    import torch

    torch.save({"w": torch.zeros(4, 4)}, tmp_path / "pytorch_model.bin")
    fake_hub.add_repo("org/old", {"pytorch_model.bin": tmp_path / "pytorch_model.bin"})
    r = qm("convert", "org/old", tmp_path / "out")
    assert r.exit_code == 2
    assert _error_line(r) == (
        "Error: org/old: only pickle weights (pytorch_model.bin); pass --allow-pickle to load them with "
        "torch.load(weights_only=True), or use a repo with safetensors weights"
    )


def test_hub_keeps_failing(tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path) -> None:
    fake_hub.add_repo("org/tiny", checkpoint_dir)
    fake_hub.add_fault(Fault(path=r"^/api/models/org/tiny", status=503, times=1000))
    r = qm("convert", "org/tiny", tmp_path / "out")
    assert r.exit_code == 1
    assert _error_line(r) == (
        "Error: org/tiny: model info failed after 5 attempt(s) (HTTP 503); "
        "check the connection and rerun the same command (finished shards are kept)"
    )


def test_disk_too_small(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, monkeypatch
) -> None:
    import shutil
    from collections import namedtuple

    fake_hub.add_repo("org/tiny", checkpoint_dir)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 50_000, 50_000))
    r = qm("convert", "org/tiny", tmp_path / "out")
    assert r.exit_code == 2
    line = _error_line(r)
    assert line.startswith("Error: org/tiny: needs ")
    # Which parts are named depends on whether the pipeline passes output_dir / stream_large.
    assert "(the two largest source shards " in line or "the estimated output " in line
    assert line.endswith("but it has 50.0 kB free; free some space or choose another output folder")
    whole = [p for s, m, p, r in fake_hub.requests if s == "cdn" and m == "GET" and r is None]
    assert whole == []  # refused before any download


def test_dequantize_revision(tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path) -> None:
    """`dequantize REPO OUT --revision REV` dequantizes that branch (the CLI had no --revision, though
    dequantize_checkpoint takes revision=): the shards are those of the branch's folder dequantized."""
    nf4, int8 = tmp_path / "nf4", tmp_path / "int8"
    assert qm("convert", checkpoint_dir, nf4, "-q").exit_code == 0
    assert qm("convert", checkpoint_dir, int8, "--quant-type", "int8", "-q").exit_code == 0
    fake_hub.add_repo("org/tiny", nf4)
    fake_hub.add_repo("org/tiny", int8, branch="int8")
    for rev, folder in (("int8", int8), ("main", nf4)):
        assert qm("dequantize", folder, tmp_path / f"local-{rev}", "-q").exit_code == 0
        r = qm("dequantize", "org/tiny", tmp_path / f"hub-{rev}", "--revision", rev, "-q")
        assert r.exit_code == 0, r.stderr
        shards = sorted((tmp_path / f"local-{rev}").glob("*.safetensors"))
        assert shards
        for shard in shards:
            assert (tmp_path / f"hub-{rev}" / shard.name).read_bytes() == shard.read_bytes(), rev
    a = sorted((tmp_path / "local-int8").glob("*.safetensors"))[0].read_bytes()
    assert a != sorted((tmp_path / "local-main").glob("*.safetensors"))[0].read_bytes()
    r = qm("dequantize", "org/tiny", tmp_path / "bad", "--revision", "nope")
    assert r.exit_code == 2
    assert "nope" in _error_line(r)
    r = qm("dequantize", nf4, tmp_path / "local", "--revision", "int8")  # it would look applied
    assert r.exit_code == 2
    assert "applies to Hub repos only" in _error_line(r)
