"""converter.convert() from the fake Hub: same bytes as a local conversion, resume after a kill,
shared cache untouched, bounded private downloads, errors through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from hub_helpers import file_hashes, hub_env, make_checkpoint

pytestmark = pytest.mark.hub

REPO = "org/tiny"
ROOT = Path(__file__).resolve().parents[2]


def _without_provenance(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "quantize_model.provenance"}


def _assert_same_conversion(a: Path, b: Path) -> None:
    """Tensor bytes, shard metadata (but provenance), index weight_map, config and extras all equal.

    Provenance names the source (repo@commit and LFS sha256 vs a folder name), so it differs.
    """
    from safetensors import safe_open

    fa, fb = file_hashes(a), file_hashes(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name.endswith(".safetensors"):
            with safe_open(str(a / name), "pt") as x, safe_open(str(b / name), "pt") as y:
                assert _without_provenance(x.metadata()) == _without_provenance(y.metadata())
                assert list(x.keys()) == list(y.keys())
                for k in x.keys():
                    raw_a = x.get_tensor(k).contiguous().view(-1).view(torch.uint8)
                    raw_b = y.get_tensor(k).contiguous().view(-1).view(torch.uint8)
                    assert raw_a.equal(raw_b), f"{name}:{k}"
        elif name == "model.safetensors.index.json":
            ia, ib = json.loads((a / name).read_text()), json.loads((b / name).read_text())
            assert ia["weight_map"] == ib["weight_map"]
        elif name in (".quantize-model-manifest.json", "quantization_report.json"):
            continue  # fingerprint / timings and source identity differ by design
        else:
            assert fa[name] == fb[name], name


def _convert(source: str | Path, out: Path, **kw):
    from converter.writer.pipeline import convert

    kw.setdefault("max_shard_size", "40KB")
    return convert(source, out, progress=False, **kw)


def test_hub_conversion_equals_local(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    commit = fake_hub.add_repo(REPO, checkpoint_dir)
    local = _convert(checkpoint_dir, tmp_path / "local")
    hub = _convert(REPO, tmp_path / "hub")
    assert hub.shards == local.shards
    _assert_same_conversion(tmp_path / "local", tmp_path / "hub")
    index = json.loads((tmp_path / "hub" / "model.safetensors.index.json").read_text())
    prov = index["metadata"]["quantize_model"]["provenance"]
    assert prov["source"] == f"{REPO}@{commit}"
    assert prov["revision"] == commit
    # The Hub's LFS sha256 of each source shard is recorded.
    want = {f: fake_hub.repos[REPO].commits[commit][f].sha256 for f in fake_hub.repos[REPO].commits[commit]}
    assert all(e["sha256"] == want[e["path"]] for e in prov["files"])
    # No private download is left behind, and nothing landed in the shared cache.
    assert not list((tmp_path / "hf-home" / "hub").rglob("*.safetensors"))


def test_shard_larger_than_the_free_disk_streams_by_range(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, monkeypatch
) -> None:
    """Free disk holds the output and the smaller shards only: the largest shard is read tensor by
    tensor over HTTP range requests, never downloaded whole, and the bytes still equal a local run."""
    import shutil
    from collections import namedtuple

    from safetensors import safe_open

    from converter.sources.base import TensorInfo
    from converter.sources.hub import estimate_output_bytes

    commit = fake_hub.add_repo(REPO, checkpoint_dir)
    shards = sorted(checkpoint_dir.glob("*.safetensors"))
    sizes = {p.name: p.stat().st_size for p in shards}
    biggest = max(sizes, key=lambda f: (sizes[f], f))
    tensors = []
    for p in shards:
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                tensors.append(TensorInfo(k, p.name, sl.get_dtype(), tuple(sl.get_shape())))
    smaller = sorted((v for f, v in sizes.items() if f != biggest), reverse=True)
    free = estimate_output_bytes(tensors) + sum(smaller[:2]) + 1024  # no room for the biggest too
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**12, 10**12 - free, free))

    local = _convert(checkpoint_dir, tmp_path / "local")
    hub = _convert(REPO, tmp_path / "hub")
    assert hub.shards == local.shards
    _assert_same_conversion(tmp_path / "local", tmp_path / "hub")
    sha = fake_hub.repos[REPO].commits[commit][biggest].sha256
    whole = {p for s, m, p, r in fake_hub.requests if s == "cdn" and m == "GET" and r is None}
    assert f"/blobs/{sha}" not in whole, "the streamed shard must never be downloaded whole"
    ranged = [r for s, m, p, r in fake_hub.requests if s == "cdn" and m == "GET" and r and sha in p]
    assert len(ranged) > 1  # header, then tensor by tensor


def test_single_file_repo(tmp_path: Path, fake_hub: FakeHub, hf_home: Path) -> None:
    src = make_checkpoint(tmp_path / "single", shards=1, seed=3)
    fake_hub.add_repo("org/single", src)
    _convert(src, tmp_path / "local")
    _convert("org/single", tmp_path / "hub")
    _assert_same_conversion(tmp_path / "local", tmp_path / "hub")


def test_shared_cache_is_never_deleted(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    from huggingface_hub import hf_hub_download

    commit = fake_hub.add_repo(REPO, checkpoint_dir)
    # Half the repo is in the shared cache (as if transformers had downloaded it).
    cached = [hf_hub_download(REPO, f) for f in ("model-00001-of-00003.safetensors", "config.json")]
    before = file_hashes(tmp_path / "hf-home")
    mark = len(fake_hub.requests)
    _convert(REPO, tmp_path / "hub")
    assert file_hashes(tmp_path / "hf-home") == before, "the shared cache must be left exactly as it was"
    assert all(Path(p).is_file() for p in cached)
    # The cached shard was read in place: only the two others were downloaded (plus header reads).
    sha1 = fake_hub.repos[REPO].commits[commit]["model-00001-of-00003.safetensors"].sha256
    whole = [p for s, m, p, r in fake_hub.requests[mark:] if s == "cdn" and m == "GET" and r is None]
    assert len(whole) == 2
    assert f"/blobs/{sha1}" not in whole


def test_keep_downloads_fills_the_cache(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    fake_hub.add_repo(REPO, checkpoint_dir)
    _convert(REPO, tmp_path / "hub", keep_downloads=True)
    assert len(list((tmp_path / "hf-home" / "hub").rglob("model-*.safetensors"))) == 3
    n = fake_hub.count("GET", "^/blobs/", server="cdn")
    _convert(REPO, tmp_path / "again", keep_downloads=True)  # a second conversion downloads nothing
    assert fake_hub.count("GET", "^/blobs/", server="cdn") == n


_RUN = """
import sys
from converter.writer.pipeline import convert
convert(sys.argv[1], sys.argv[2], progress=False, max_shard_size="40KB")
"""


@pytest.mark.slow
def test_kill_then_resume_gives_identical_bytes(tmp_path: Path, fake_hub: FakeHub, hf_home: Path) -> None:
    src = make_checkpoint(tmp_path / "five", shards=5, seed=11)
    fake_hub.add_repo("org/five", src)
    reference = tmp_path / "reference"
    _convert("org/five", reference)

    env = hub_env(fake_hub, hf_home)
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    manifest = out / ".quantize-model-manifest.json"
    fake_hub.throttle_bps = 150_000  # slow downloads so the kill lands mid-run
    proc = subprocess.Popen([sys.executable, "-c", _RUN, "org/five", str(out)], env=env, cwd=ROOT)
    # Kill once at least one source file is wholly inside finished output shards.
    ref_map = json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"]
    src_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]

    def finished_files(done: dict) -> set[str]:
        return {
            f for f in set(src_map.values()) if all(ref_map[t] in done for t, g in src_map.items() if g == f)
        }

    deadline = time.monotonic() + 120
    done_at_kill: dict = {}
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done_at_kill = json.loads(manifest.read_text())["shards"]
        except (OSError, ValueError, KeyError):
            done_at_kill = {}
        if finished_files(done_at_kill):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the conversion finished before it could be killed; slow the fake Hub more"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = json.loads(manifest.read_text())["shards"]
    assert 0 < len(done_at_kill) < len(list(reference.glob("model-*.safetensors")))

    fake_hub.throttle_bps = None
    mark = len(fake_hub.requests)
    subprocess.run([sys.executable, "-c", _RUN, "org/five", str(out)], env=env, cwd=ROOT, check=True)

    # Every file is identical but the report (timings) and the manifest (dot file).
    def same(folder: Path) -> dict[str, str]:
        return {
            k: v
            for k, v in file_hashes(folder).items()
            if not k.startswith(".") and k != "quantization_report.json"
        }

    assert same(out) == same(reference)

    # Source files whose tensors all went into shards finished before the kill were not downloaded again.
    finished = finished_files(done_at_kill)
    commit = fake_hub.repos["org/five"].refs["main"]
    blobs = {fake_hub.repos["org/five"].commits[commit][f].sha256: f for f in src_map.values()}
    downloaded = {
        blobs[p.rsplit("/", 1)[-1]]
        for s, m, p, r in fake_hub.requests[mark:]
        if s == "cdn" and m == "GET" and r is None
    }
    assert finished, "the kill should land after at least one source file was fully consumed"
    assert not (finished & downloaded), f"re-downloaded finished files {finished & downloaded}"
    # SIGKILL gives no chance to clean up: the killed run's private folder holds at most two shards.
    leftovers = list((tmp_path / "tmp").rglob("*.safetensors"))
    assert len(leftovers) <= 2, leftovers


def test_a_refused_second_convert_leaves_the_first_ones_downloads(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path
) -> None:
    """A second convert of a Hub repo into an output another one is writing is refused (the folder
    lock), but it had opened the source first, downloading into the same folder beside the output
    (``.out.quantize-model-download``), and on its way out deleted that folder: the first run then
    failed with "No such file or directory". The second run now keeps out of a download folder in use."""
    import threading

    from converter.errors import OutputExistsError
    from converter.writer.pipeline import convert

    src = make_checkpoint(tmp_path / "five", shards=5, seed=11)
    fake_hub.add_repo("org/five", src)
    out = tmp_path / "out"
    fake_hub.throttle_bps = 150_000  # the first run is still downloading when the second comes
    ended: dict[str, object] = {}

    def first() -> None:
        try:
            ended["result"] = convert("org/five", out, progress=False, max_shard_size="40KB")
        except BaseException as exc:  # reported by the assertion below
            ended["error"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 60
    while not (out / ".quantize-model-manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # the manifest is written once the first run holds the output's lock
    assert thread.is_alive(), ended
    with pytest.raises(OutputExistsError, match="another quantize-model process is writing this folder"):
        convert("org/five", out, progress=False, max_shard_size="40KB")
    fake_hub.throttle_bps = None
    thread.join(120)
    assert "error" not in ended, ended["error"]
    assert not (tmp_path / ".out.quantize-model-download").exists()
    assert not [p for p in tmp_path.iterdir() if "quantize-model-download" in p.name]


@pytest.mark.parametrize("how", ["cache", "keep_downloads"])
def test_a_rerun_removes_the_download_folder_a_killed_run_left(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, how: str
) -> None:
    """A Hub convert killed mid-run leaves its hidden download folder beside the output (as large as
    the files it was downloading). A rerun that downloads nothing there (everything in the cache, or
    --keep-downloads, which fills the cache) never opened that folder and left it for good; it now
    removes it, unless another run holds it."""
    from converter.sources.hub import _locked_folder

    fake_hub.add_repo(REPO, checkpoint_dir)
    out = tmp_path / "out"
    kw = {"keep_downloads": True}
    if how == "cache":
        _convert(REPO, tmp_path / "first", keep_downloads=True)  # every file now in the cache
        kw = {}
    leftover = tmp_path / ".out.quantize-model-download"
    leftover.mkdir()
    (leftover / "model-00001-of-00002.safetensors").write_bytes(b"part of a download")
    _convert(REPO, out, **kw)
    assert not leftover.exists()

    leftover.mkdir()  # held by another run (its lock): left alone
    fd = _locked_folder(leftover)
    try:
        assert _convert(REPO, out, **kw).noop
        assert leftover.is_dir()
    finally:
        os.close(fd)
    assert _convert(REPO, out, **kw).noop  # and once that run is gone, removed
    assert not leftover.exists()


def test_the_own_download_folder_of_a_second_run_is_locked_and_removed_once_abandoned(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path
) -> None:
    """A run that finds the download folder beside the output locked by another run downloads into a
    folder of its own; that folder was not locked, so a run killed while using it left it (as large as
    the shards it was downloading) for good, and nothing could tell it from one in use. It is now
    locked while its run lives, and a later run into the same output removes it once abandoned (never
    one still locked)."""
    from converter.locks import lock_folder
    from converter.sources.hub import _locked_folder

    src = make_checkpoint(tmp_path / "five", shards=5, seed=11)
    fake_hub.add_repo("org/five", src)
    out = tmp_path / "out"
    env = hub_env(fake_hub, hf_home)
    held = _locked_folder(tmp_path / ".out.quantize-model-download")  # a first run downloads there
    assert held is not None
    fake_hub.throttle_bps = 150_000  # slow downloads so the kill lands mid-download
    proc = subprocess.Popen([sys.executable, "-c", _RUN, "org/five", str(out)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        own: list[Path] = []
        while not own and time.monotonic() < deadline and proc.poll() is None:
            own = list(tmp_path.glob(".*quantize-model-download-*"))
            time.sleep(0.01)
        assert len(own) == 1, (own, proc.poll())
        fd = lock_folder(own[0])
        if fd is not None:
            os.close(fd)
        assert fd is None, "the second run's download folder must be locked while that run lives"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(held)
    fake_hub.throttle_bps = None
    assert own[0].is_dir()  # SIGKILL: no clean-up

    alive = tmp_path / ".out.quantize-model-download-alive"  # another live run's: left alone
    alive.mkdir()
    fd = lock_folder(alive)
    assert fd is not None
    try:
        _convert("org/five", out)
        assert not own[0].exists()
        assert alive.is_dir()
    finally:
        os.close(fd)
    assert _convert("org/five", out).noop  # and once that run is gone, removed
    assert not [p for p in tmp_path.iterdir() if "quantize-model-download" in p.name]


def test_rerun_restores_copied_files_deleted_or_edited_in_the_output(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    """For a Hub source a rerun compared none of the copied files (tokenizer, generation config,
    licence): one deleted or edited in a finished output stayed so, the rerun saying "nothing to do".
    They are now checked against the Hub's listing (hash and size; nothing downloaded when they
    match) and rewritten, the shards kept."""
    fake_hub.add_repo(REPO, checkpoint_dir)
    out, fresh = tmp_path / "hub", tmp_path / "fresh"
    _convert(REPO, fresh)
    _convert(REPO, out)
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    (out / "tokenizer.json").unlink()
    (out / "generation_config.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"generation_config\.json, tokenizer\.json: not what this"):
        again = _convert(REPO, out)
    assert not again.noop
    assert again.shards_reused == len(shards)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == shards
    timed = "quantization_report.json"  # timings
    assert {k: v for k, v in file_hashes(out).items() if k != timed} == {
        k: v for k, v in file_hashes(fresh).items() if k != timed
    }

    def blobs_fetched_by_a_noop(folder: Path) -> int:
        n = fake_hub.count("GET", "^/blobs/", server="cdn")
        assert _convert(REPO, folder).noop
        return fake_hub.count("GET", "^/blobs/", server="cdn") - n

    assert blobs_fetched_by_a_noop(out) == blobs_fetched_by_a_noop(fresh)  # no copied file fetched to check


def test_rerun_naming_the_commit_is_a_noop(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    commit = fake_hub.add_repo(REPO, checkpoint_dir)
    _convert(REPO, tmp_path / "hub", revision="main")
    again = _convert(REPO, tmp_path / "hub", revision=commit)
    assert again.noop
    # A new commit on main is a different source: the folder is refused, not mixed.
    fake_hub.add_repo(REPO, {"generation_config.json": b'{"do_sample": true}'})
    from converter.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        _convert(REPO, tmp_path / "hub")


def test_offline_conversion_from_the_cache_is_identical(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, monkeypatch
) -> None:
    from huggingface_hub import constants, snapshot_download

    fake_hub.add_repo(REPO, checkpoint_dir)
    _convert(REPO, tmp_path / "online")
    snapshot_download(REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(fake_hub.requests)
    _convert(REPO, tmp_path / "offline")
    assert len(fake_hub.requests) == n

    def same(folder: Path) -> dict[str, str]:
        return {
            k: v
            for k, v in file_hashes(folder).items()
            if not k.startswith(".") and k != "quantization_report.json"
        }

    assert same(tmp_path / "offline") == same(tmp_path / "online")  # provenance included


def _cache_snapshot(fake_hub: FakeHub, checkpoint_dir: Path) -> Path:
    """``REPO`` downloaded into the (empty, offline-built) Hugging Face cache: its snapshot folder,
    ``…/models--org--tiny/snapshots/<commit>``, whose files link to ``blobs/<sha256>``."""
    from huggingface_hub import snapshot_download

    fake_hub.add_repo(REPO, checkpoint_dir)
    snapshot = Path(snapshot_download(REPO))
    assert snapshot.parent.name == "snapshots"
    assert snapshot.parent.parent.name == "models--org--tiny"
    return snapshot


def test_a_cache_snapshot_path_is_recorded_as_the_hub_repo_at_its_commit(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    """A source given as the path of a Hugging Face cache snapshot was recorded by the folder's name, the
    commit hash ("source": "<sha>", no revision), so `push` wrote no base_model into the card. It is now
    recorded as the Hub source it is a copy of: the shards, index and config are those of a conversion
    of ``REPO`` from the Hub (provenance included), and the report names the repo and commit."""
    snapshot = _cache_snapshot(fake_hub, checkpoint_dir)
    _convert(REPO, tmp_path / "hub")
    _convert(snapshot, tmp_path / "snapshot")

    def same(folder: Path) -> dict[str, str]:
        return {
            k: v
            for k, v in file_hashes(folder).items()
            if not k.startswith(".") and k != "quantization_report.json"
        }

    assert same(tmp_path / "snapshot") == same(tmp_path / "hub")
    index = json.loads((tmp_path / "snapshot" / "model.safetensors.index.json").read_text())
    prov = index["metadata"]["quantize_model"]["provenance"]
    assert (prov["source"], prov["revision"]) == (f"{REPO}@{snapshot.name}", snapshot.name)
    report = json.loads((tmp_path / "snapshot" / "quantization_report.json").read_text())
    assert (report["source"]["repo_id"], report["source"]["commit"]) == (REPO, snapshot.name)
    assert report["source"]["kind"] == "local"
    assert "path" not in report["source"]
    assert _convert(snapshot, tmp_path / "snapshot").noop


def _convert_as_before(monkeypatch: pytest.MonkeyPatch, snapshot: Path, out: Path, **kw):
    """A conversion of the cache ``snapshot`` as the versions before recorded it (by its path alone)."""
    from converter.sources import local
    from converter.writer.pipeline import convert

    with monkeypatch.context() as m:
        m.setattr(local, "hub_cache_snapshot", lambda root: None)
        return convert(snapshot, out, **{"max_shard_size": "40KB", "progress": False, **kw})


def test_a_folder_converted_from_a_cache_snapshot_before_it_was_recorded_so_is_still_up_to_date(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, monkeypatch
) -> None:
    """Recording a snapshot by its repo id changes the plan's source: a rerun into a folder an earlier
    version converted from the same snapshot must take the old record for the same source (nothing to
    do, dry run too), not refuse the folder as another source's, nor convert it again."""
    snapshot = _cache_snapshot(fake_hub, checkpoint_dir)
    out = tmp_path / "out"
    _convert_as_before(monkeypatch, snapshot, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["quantize_model"]["provenance"]["source"] == snapshot.name  # the old record
    before = file_hashes(out)
    r = _convert(snapshot, out)
    assert r.noop
    assert file_hashes(out) == before
    pre = _convert(snapshot, out, dry_run=True).preflight
    assert pre.refused is None
    assert pre.up_to_date
    # another folder gets the new record
    assert _convert(snapshot, tmp_path / "new").noop is False
    report = json.loads((tmp_path / "new" / "quantization_report.json").read_text())
    assert report["source"]["repo_id"] == REPO


def test_an_interrupted_conversion_from_a_cache_snapshot_made_before_it_was_recorded_so_resumes(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, monkeypatch
) -> None:
    """An unfinished folder of the old record resumes, keeping its shards, and ends as the old version's
    uninterrupted conversion (one record of the source throughout), not refused."""
    from converter.writer.manifest import MANIFEST_NAME

    snapshot = _cache_snapshot(fake_hub, checkpoint_dir)
    reference = tmp_path / "reference"
    _convert_as_before(monkeypatch, snapshot, reference)
    out = tmp_path / "out"

    def stop(name: str, done: int) -> None:
        if json.loads((out / MANIFEST_NAME).read_text())["shards"]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _convert_as_before(monkeypatch, snapshot, out, progress=stop)
    assert json.loads((out / MANIFEST_NAME).read_text())["state"] == "in_progress"
    r = _convert(snapshot, out)
    assert r.resumed
    assert r.shards_reused >= 1
    assert file_hashes(out) == file_hashes(reference) | {
        "quantization_report.json": file_hashes(out)["quantization_report.json"]
    }


def _fp8_with_scales_in_the_next_shard(src: Path, dst: Path) -> Path:
    """``src`` (a sharded bf16 checkpoint) as block-scaled FP8 (Qwen3-FP8 / DeepSeek style), each FP8
    weight's ``weight_scale_inv`` in the shard before the weight's (the first shard's in the last), as
    save_pretrained leaves a weight and its scale on two sides of a shard boundary."""
    from safetensors.torch import load_file, save_file

    index = json.loads((src / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    shards: dict[str, dict] = {f: {} for f in files}
    for i, f in enumerate(files):
        for k, v in load_file(src / f).items():
            if v.dim() == 2 and k.endswith("_proj.weight"):
                scale = v.float().abs().amax().clamp(min=1e-12).reshape(1, 1) / 448.0
                shards[f][k] = (v.float() / scale).to(torch.float8_e4m3fn)
                shards[files[i - 1]][k.removesuffix(".weight") + ".weight_scale_inv"] = scale
            else:
                shards[f][k] = v
    shutil.copytree(src, dst)
    weight_map = {}
    for f, tensors in shards.items():
        save_file(tensors, dst / f, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, f))
    index["weight_map"] = weight_map
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_fp8_scale_in_another_shard_does_not_download_that_shard_again(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    """An FP8 weight whose scale sits in another shard acquired that whole shard for the one scale: a
    shard already converted and deleted was downloaded again (and kept beside the two shards the disk
    budget counts). The scale is read by one HTTP range request; every shard is downloaded once, and the
    folder is the one converted from the same files on disk."""
    src = _fp8_with_scales_in_the_next_shard(checkpoint_dir, tmp_path / "fp8")
    fake_hub.add_repo("org/fp8", src)
    _convert(src, tmp_path / "local")
    _convert("org/fp8", tmp_path / "hub")
    _assert_same_conversion(tmp_path / "local", tmp_path / "hub")
    whole = [p for s, m, p, r in fake_hub.requests if s == "cdn" and m == "GET" and r is None]
    assert len(whole) == len(set(whole)) == 3, whole
