"""HubSource against the fake Hub: selection, pinning, prefetch bounds, cache safety, faults, errors."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from fake_hub import FakeHub, Fault
from hub_helpers import TOKEN, make_checkpoint

from converter.errors import ConversionFailedError, InputError, PickleOnlyError, SourceNotFoundError
from converter.sources.hub import (
    DiskTooSmallError,
    HubAccessError,
    HubDownloadError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubSource,
)

pytestmark = pytest.mark.hub

REPO = "org/tiny"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def repo(fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path) -> str:
    return fake_hub.add_repo(REPO, checkpoint_dir)


def _open(tmp_path: Path, **kw) -> HubSource:
    kw.setdefault("output_dir", tmp_path / "out")
    kw.setdefault("attempts", 3)
    return HubSource(REPO, **kw)


def test_lists_only_what_conversion_needs(tmp_path: Path, fake_hub: FakeHub, repo: str) -> None:
    with _open(tmp_path) as src:
        assert src.commit == repo
        assert src.describe()["commit"] == repo
        assert src.describe()["kind"] == "hub"
        assert src.weight_files() == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
        assert src.config()["model_type"] == "llama"
        extras = src.extra_files()
        assert {
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "LICENSE",
            "README.md",
        } <= set(extras)
        assert not any(e.startswith("original/") or "consolidated" in e or e.endswith(".bin") for e in extras)
        names = [t.name for t in src.tensors()]
        assert "lm_head.weight" in names
        assert len(names) == len(set(names))
    # Headers came from range reads; nothing else was fetched, and never the duplicates.
    fetched = [p for _, m, p, _ in fake_hub.requests if m == "GET"]
    assert not any("original/" in p or "consolidated" in p or p.endswith(".bin") for p in fetched)
    assert all(r is not None for s, m, p, r in fake_hub.requests if m == "GET" and s == "cdn")
    # Every request after model_info names the pinned commit, not "main".
    resolves = [p for _, _, p, _ in fake_hub.requests if "/resolve/" in p]
    assert resolves
    assert all(f"/resolve/{repo}/" in p for p in resolves)


def test_downloads_verify_prefetch_and_delete(
    tmp_path: Path, fake_hub: FakeHub, repo: str, checkpoint_dir: Path
) -> None:
    seen_bytes: list[tuple[str, int, int]] = []
    src = _open(tmp_path, on_download=lambda f, d, t: seen_bytes.append((f, d, t)))
    paths = []
    for f in src.weight_files():
        p = src.acquire(f)
        assert _sha(p) == _sha(checkpoint_dir / f)
        assert len(src._live) <= 2
        src.release(f)
        assert not p.exists(), "a consumed private download must be deleted"
        paths.append(p)
    assert src.peak_live == 2  # one shard ahead, never more
    total = sum((checkpoint_dir / f).stat().st_size for f in src.weight_files())
    assert src.bytes_downloaded == total
    assert seen_bytes[-1][1] == seen_bytes[-1][2]  # the callback reached each file's size
    dl_dir = paths[0].parent
    src.close()
    assert not dl_dir.exists()
    # Nothing went to the shared cache.
    assert not list((tmp_path / "hf-home" / "hub").rglob("*.safetensors"))


def test_model_safetensors_beside_an_index_is_what_transformers_reads(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    """A repo with model.safetensors and an index naming other shards: transformers downloads
    model.safetensors (it tries that name first) and never the index's shards; so does the source,
    and it says why."""
    repo_dir = tmp_path / "both"
    shutil.copytree(checkpoint_dir, repo_dir)
    single = make_checkpoint(tmp_path / "single", shards=1, seed=7)
    shutil.copy(single / "model.safetensors", repo_dir / "model.safetensors")
    fake_hub.add_repo(REPO, repo_dir)
    with _open(tmp_path) as src:
        assert src.weight_files() == ["model.safetensors"]
        (note,) = src.notes()
        assert "as transformers' from_pretrained does" in note
        assert {t.name for t in src.tensors()} == {t.name for t in _single_tensors(single)}


def _single_tensors(folder: Path) -> list:
    from converter.sources.local import LocalSource

    with LocalSource(folder) as src:
        return src.tensors()


def test_cached_repo_is_read_in_place_and_never_deleted(tmp_path: Path, fake_hub: FakeHub, repo: str) -> None:
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download(REPO, revision=repo, allow_patterns=["*.safetensors", "*.json"]))
    before = {p: _sha(p) for p in snap.rglob("*.safetensors")}
    n_get = fake_hub.count("GET", r"/blobs/")
    with _open(tmp_path) as src:
        for f in src.weight_files():
            p = src.acquire(f)
            assert p.parent == snap
            src.release(f)
    assert fake_hub.count("GET", r"/blobs/") == n_get, "cached shards must not be downloaded again"
    assert {p: _sha(p) for p in snap.rglob("*.safetensors")} == before


def test_offline_mode_reads_the_cache(tmp_path: Path, fake_hub: FakeHub, repo: str, monkeypatch) -> None:
    from huggingface_hub import constants, snapshot_download

    snapshot_download(REPO)  # as a user would: main, which records refs/main in the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(fake_hub.requests)
    with _open(tmp_path) as src:
        assert src.commit == repo
        for f in src.weight_files():
            assert src.acquire(f).is_file()
            src.release(f)
    assert len(fake_hub.requests) == n, "offline mode must not touch the network"


def test_offline_without_cache_is_a_clear_error(
    tmp_path: Path, fake_hub: FakeHub, repo: str, monkeypatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceNotFoundError, match="HF_HUB_OFFLINE=1; unset HF_HUB_OFFLINE"):
        _open(tmp_path)


def test_offline_with_only_the_config_cached_says_the_weights_are_not_cached(
    tmp_path: Path, fake_hub: FakeHub, repo: str, monkeypatch
) -> None:
    """transformers (AutoConfig / AutoTokenizer) cached the repo's config.json but no weights: offline,
    the conversion said "no safetensors weights (no model.safetensors or model.safetensors.index.json);
    is this a model repo with transformers weights?", of a repo that has them: the listing offline is
    the cached snapshot's, so it now says they are not in the cache."""
    from huggingface_hub import constants, hf_hub_download

    hf_hub_download(REPO, "config.json")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceNotFoundError) as err:
        _open(tmp_path)
    assert str(err.value) == (
        f"{REPO}@{repo[:12]}: its weights are not in the local Hugging Face cache (the cached snapshot "
        "holds 1 file(s): config.json) and HF_HUB_OFFLINE=1; unset HF_HUB_OFFLINE to download them "
        "(or download the whole repo first)"
    )


def test_keep_downloads_go_to_the_shared_cache(tmp_path: Path, fake_hub: FakeHub, repo: str) -> None:
    with _open(tmp_path, keep_downloads=True) as src:
        for f in src.weight_files():
            p = src.acquire(f)
            src.release(f)
            assert p.exists()
    assert len(list((tmp_path / "hf-home" / "hub").rglob("model-*.safetensors"))) == 3


def test_keep_downloads_then_offline_reads_the_cache(
    tmp_path: Path, fake_hub: FakeHub, repo: str, monkeypatch
) -> None:
    """--keep-downloads downloads by commit sha, which records no refs/main: an offline run (ours, or
    transformers') then said the repo was not in the cache. A partial cache names the missing file as
    missing from the cache, not from the repo."""
    from huggingface_hub import constants

    with _open(tmp_path, keep_downloads=True) as src:
        first = src.weight_files()[0]
        src.acquire(first)
        src.release(first)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceNotFoundError, match="is not in the local cache and HF_HUB_OFFLINE=1"):
        _open(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with _open(tmp_path, keep_downloads=True) as src:
        for f in src.weight_files():
            src.acquire(f)
            src.release(f)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(fake_hub.requests)
    with _open(tmp_path) as src:
        assert src.commit == repo
        for f in src.weight_files():
            assert src.acquire(f).is_file()
            src.release(f)
    assert len(fake_hub.requests) == n, "offline mode must not touch the network"


def test_recording_the_cache_ref_leaves_another_writers_temp_file_alone(
    tmp_path: Path, fake_hub: FakeHub, repo: str
) -> None:
    """The cache's refs/main was written through one fixed temp name (refs/.main.tmp): two runs recording
    it at once (two --keep-downloads conversions of one repo) truncated and renamed each other's temp
    file, which could leave refs/main holding a mix or fail with FileNotFoundError. Each write now has
    a temp file of its own: another writer's is never touched."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    refs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=REPO, repo_type="model") / "refs"
    refs.mkdir(parents=True)
    (refs / ".main.tmp").write_text("another run's, mid-write")
    with _open(tmp_path, keep_downloads=True) as src:
        first = src.weight_files()[0]
        src.acquire(first)
        src.release(first)
    assert (refs / "main").read_text() == repo
    assert (refs / ".main.tmp").read_text() == "another run's, mid-write"
    assert sorted(p.name for p in refs.iterdir()) == [".main.tmp", "main"]


def test_transient_faults_are_retried(
    tmp_path: Path, fake_hub: FakeHub, repo: str, checkpoint_dir: Path
) -> None:
    fake_hub.add_fault(Fault(path=r"^/api/models/org/tiny", status=503, times=2))
    fake_hub.add_fault(
        Fault(path=r"^/blobs/", server="cdn", status=429, headers={"Retry-After": "0"}, times=1)
    )
    with _open(tmp_path) as src:  # model info and a header range read were retried
        assert all(f.times == 0 for f in fake_hub.faults)
        # Downloads: the body drops twice mid-way (huggingface_hub resumes with Range), one HEAD is slow.
        fake_hub.add_fault(Fault(path=r"^/blobs/", server="cdn", action="drop", after_bytes=3000, times=2))
        fake_hub.add_fault(Fault(path=r"/resolve/", method="HEAD", action="slow", delay=0.3, times=1))
        for f in src.weight_files():
            assert _sha(src.acquire(f)) == _sha(checkpoint_dir / f)
            src.release(f)
    assert all(f.times == 0 for f in fake_hub.faults), [f for f in fake_hub.faults if f.times]
    # Each dropped body was fetched again (huggingface_hub resumes from its last 10 MB chunk).
    full_gets = [p for s, m, p, r in fake_hub.requests if s == "cdn" and m == "GET" and r is None]
    assert len(full_gets) == 3 + 2


def test_5xx_on_download_is_retried(tmp_path: Path, fake_hub: FakeHub, repo: str) -> None:
    fake_hub.add_fault(Fault(path=r"^/blobs/", server="cdn", method="GET", status=500, times=1))
    with _open(tmp_path) as src:
        f = src.weight_files()[0]
        # The header range reads are done; the 500 hits the first shard's download.
        assert src.acquire(f).is_file()


def test_persistent_5xx_is_reported(tmp_path: Path, fake_hub: FakeHub, repo: str) -> None:
    fake_hub.add_fault(Fault(path=r"^/api/models/org/tiny", status=502, times=100))
    with pytest.raises(HubDownloadError) as err:
        _open(tmp_path)
    assert str(err.value) == (
        "org/tiny: model info failed after 3 attempt(s) (HTTP 502); "
        "check the connection and rerun the same command (finished shards are kept)"
    )
    assert err.value.exit_code == 1
    assert isinstance(err.value, ConversionFailedError)


def test_checksum_mismatch_is_refused(tmp_path: Path, fake_hub: FakeHub, repo: str) -> None:
    src = _open(tmp_path)
    f = src.weight_files()[1]
    blob = fake_hub.blobs / fake_hub.repos[REPO].commits[repo][f].sha256
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the sha256 check can tell
    blob.write_bytes(bytes(data))
    with pytest.raises(HubDownloadError, match=f"{f} downloaded twice but does not match the Hub's hash"):
        src.acquire(f)
    src.close()


def test_repo_not_found(tmp_path: Path, fake_hub: FakeHub, hf_home: Path) -> None:
    with pytest.raises(HubRepoNotFoundError) as err:
        HubSource("org/missing", attempts=1)
    assert str(err.value) == (
        f"org/missing: repository not found on {fake_hub.endpoint}; check the repo id, "
        "or if it is private run `hf auth login` or set HF_TOKEN"
    )
    assert err.value.exit_code == 2


def test_revision_not_found(tmp_path: Path, fake_hub: FakeHub, repo: str) -> None:
    with pytest.raises(HubRevisionNotFoundError) as err:
        _open(tmp_path, revision="v9")
    assert (
        str(err.value)
        == "org/tiny: revision 'v9' not found; give an existing branch, tag or commit to --revision"
    )
    assert err.value.exit_code == 2


def test_revision_pins_a_branch(tmp_path: Path, fake_hub: FakeHub, repo: str, checkpoint_dir: Path) -> None:
    other = make_checkpoint(tmp_path / "v2", shards=1, seed=5)
    sha = fake_hub.add_repo(REPO, {"model.safetensors": other / "model.safetensors"}, branch="v2")
    with _open(tmp_path, revision="v2") as src:
        assert src.commit == sha
        assert src.describe()["commit"] == sha
        assert src.weight_files() == ["model.safetensors"]


def test_gated_repo(tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path) -> None:
    fake_hub.add_repo("org/gated", checkpoint_dir, gated=True)
    with pytest.raises(HubAccessError) as err:
        HubSource("org/gated", attempts=1)
    assert str(err.value) == (
        f"org/gated: gated repo; request access at {fake_hub.endpoint}/org/gated, then run `hf auth login` "
        "or set HF_TOKEN with an account that has it"
    )
    assert err.value.exit_code == 2
    with HubSource("org/gated", token=TOKEN, attempts=1) as src:  # with a token it works
        assert len(src.weight_files()) == 3


def test_private_repo_and_bad_token(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    fake_hub.add_repo("org/private", checkpoint_dir, private=True)
    with pytest.raises(HubRepoNotFoundError, match="if it is private run `hf auth login` or set HF_TOKEN"):
        HubSource("org/private", attempts=1)
    with pytest.raises(HubAccessError) as err:
        HubSource("org/private", token="hf_wrong", attempts=1)
    assert str(err.value) == (
        "org/private: the Hub rejected the token (HTTP 401); "
        "run `hf auth login` or set HF_TOKEN with a valid token"
    )
    with HubSource("org/private", token=TOKEN, attempts=1) as src:
        assert src.commit


def test_disk_too_small(tmp_path: Path, fake_hub: FakeHub, repo: str, checkpoint_dir: Path) -> None:
    with pytest.raises(DiskTooSmallError) as err:
        _open(tmp_path, disk_budget=20_000)
    assert err.value.exit_code == 2
    sizes = sorted((checkpoint_dir / f"model-0000{k}-of-00003.safetensors").stat().st_size for k in (1, 2, 3))
    two = (sizes[-1] + sizes[-2]) / 1000
    msg = str(err.value)
    assert msg.startswith("org/tiny: needs ")
    assert f"on the disk budget (the two largest source shards {two:.1f} kB + the estimated output " in msg
    assert msg.endswith("but it has 20.0 kB free; free some space or choose another output folder")
    assert fake_hub.count("GET", r"^/blobs/.*", server="cdn") == 3  # headers only, no download started


def test_no_safetensors_weights(tmp_path: Path, fake_hub: FakeHub, hf_home: Path) -> None:
    fake_hub.add_repo("org/empty", {"config.json": b"{}", "README.md": b"# x\n"})
    with pytest.raises(SourceNotFoundError, match=r"no safetensors weights"):
        HubSource("org/empty", attempts=1)


def test_pickle_is_refused_unless_allowed(tmp_path: Path, fake_hub: FakeHub, hf_home: Path) -> None:
    import torch
    from safetensors.torch import load_file

    state = {"a.weight": torch.randn(8, 8), "b.weight": torch.randn(4)}
    state["tied.weight"] = state["a.weight"]  # shared storage, as tied embeddings are saved
    torch.save(state, tmp_path / "pytorch_model.bin")
    fake_hub.add_repo("org/old", {"pytorch_model.bin": tmp_path / "pytorch_model.bin", "config.json": b"{}"})
    with pytest.raises(PickleOnlyError) as err:
        HubSource("org/old", attempts=1)
    assert str(err.value) == (
        "org/old: only pickle weights (pytorch_model.bin); pass --allow-pickle to load them with "
        "torch.load(weights_only=True), or use a repo with safetensors weights"
    )
    assert err.value.exit_code == 2
    assert isinstance(err.value, InputError)
    with HubSource("org/old", allow_pickle=True, attempts=1, output_dir=tmp_path / "o") as src:
        assert src.weight_files() == ["pytorch_model.safetensors"]
        got = load_file(str(src.acquire("pytorch_model.safetensors")))
        assert set(got) == set(state)
        for k, v in state.items():
            assert torch.equal(got[k], v)


def test_pickle_with_code_is_refused_even_when_allowed(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path
) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, ("/nonexistent-quantize-model-test",))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    fake_hub.add_repo("org/evil", {"pytorch_model.bin": tmp_path / "pytorch_model.bin"})
    with pytest.raises(InputError, match=r"cannot be loaded with torch.load\(weights_only=True\)"):
        HubSource("org/evil", allow_pickle=True, attempts=1, output_dir=tmp_path / "o")


def test_range_read_of_one_tensor(tmp_path: Path, fake_hub: FakeHub, repo: str, checkpoint_dir: Path) -> None:
    from safetensors import safe_open

    with _open(tmp_path) as src:
        info = next(t for t in src.tensors() if t.name == "model.layers.0.mlp.up_proj.weight")
        got = src.read_tensor(info)
        with safe_open(str(checkpoint_dir / info.file), framework="pt") as f:
            want = f.get_tensor(info.name)
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        assert got.view(-1).view(dtype=want.dtype).equal(want.view(-1))
    ranges = [r for s, m, p, r in fake_hub.requests if m == "GET" and s == "cdn"]
    assert ranges[-1] is not None
    assert ranges[-1] != "bytes=0-100000"


def test_file_larger_than_the_budget_is_streamed(
    tmp_path: Path, fake_hub: FakeHub, repo: str, checkpoint_dir: Path
) -> None:
    from safetensors import safe_open

    from converter.sources.local import MappedFile

    sizes = {
        f: (checkpoint_dir / f).stat().st_size
        for f in [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    }
    biggest = max(sizes, key=sizes.get)
    budget = sum(sorted(sizes.values())[:2])  # room for the two smaller shards only
    with _open(tmp_path, disk_budget=budget, stream_large=True, output_dir=None) as src:
        assert [f for f in src.weight_files() if src.is_streamed(f)] == [biggest]
        with pytest.raises(ConversionFailedError, match="is read by HTTP range only"):
            src.acquire(biggest)
        for f in src.weight_files():
            opened = src.open_file(f)
            assert isinstance(opened, MappedFile) != src.is_streamed(f)
            with safe_open(str(checkpoint_dir / f), framework="pt") as ref:
                names = list(ref.keys())
                for i, name in enumerate(names):
                    if i + 1 < len(names):
                        opened.prefetch(names[i + 1])  # as the pipeline does for the next tensor
                    assert opened.get(name).equal(ref.get_tensor(name)), name
            src.release(f)
        assert src.peak_live <= 2
    whole = {p for s, m, p, r in fake_hub.requests if s == "cdn" and m == "GET" and r is None}
    sha = fake_hub.repos[REPO].commits[repo][biggest].sha256
    assert f"/blobs/{sha}" not in whole, "the streamed file must never be downloaded whole"


def test_set_needed_prefetches_only_needed_files(tmp_path: Path, fake_hub: FakeHub, repo: str) -> None:
    with _open(tmp_path) as src:
        files = src.weight_files()
        plan = src.download_plan()
        assert sorted(plan) == files
        progress: dict[str, int] = {}
        src.on_download = lambda f, done, total: progress.__setitem__(f, done)  # set after opening
        mark = len(fake_hub.requests)
        src.set_needed(files[1:])  # as a resumed run whose first source file is done
        path = src.acquire(files[1])  # already downloading since set_needed
        src.release(files[1])
        src.acquire(files[2])
        src.release(files[2])
        assert not path.exists()
    commit = fake_hub.repos[REPO].commits[repo]
    whole = [p for s, m, p, r in fake_hub.requests[mark:] if s == "cdn" and m == "GET" and r is None]
    assert sorted(whole) == sorted(f"/blobs/{commit[f].sha256}" for f in files[1:])
    assert progress == {f: plan[f] for f in files[1:]}
    assert src.download_progress() == progress


def test_close_interrupts_an_inflight_download(
    tmp_path: Path, fake_hub: FakeHub, repo: str, monkeypatch
) -> None:
    import time

    from huggingface_hub import constants

    # huggingface_hub reports progress every 10 MB; shrink that so this small shard acts like a big one.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16384)
    src = _open(tmp_path)
    fake_hub.throttle_bps = 10_000  # a shard would take ~11 s
    src.set_needed(src.weight_files())  # prefetch starts
    time.sleep(0.5)
    t = time.monotonic()
    src.close()  # as convert() does after Ctrl-C
    assert time.monotonic() - t < 3, "close() waited for the whole download"
    assert not list((tmp_path).glob(".out.quantize-model-download*")), "the private folder must be removed"


_KILLED_READER = """
import os, signal, sys
from converter.sources.hub import HubSource
src = HubSource(sys.argv[1], attempts=3)
print(src.acquire(src.weight_files()[0]), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_temp_download_folder_is_locked_and_removed_once_its_run_is_killed(
    tmp_path: Path, fake_hub: FakeHub, repo: str, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an output folder (`verify --against org/repo`) a Hub source downloads into a folder
    of its own in $TMPDIR. It was not locked, so a run killed there (SIGKILL, the OOM killer) left
    its downloaded shards for good: nothing could tell the folder from one in use. It is now locked
    while its run lives, and a later Hub source removes it once abandoned (never one still locked)."""
    import os
    import subprocess
    import sys
    import tempfile

    from hub_helpers import hub_env

    from converter.locks import lock_folder

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**hub_env(fake_hub, hf_home), "TMPDIR": str(tmp)}
    root = Path(__file__).resolve().parents[2]
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_READER, REPO], env=env, cwd=root, capture_output=True, text=True
    )
    assert child.returncode == -9, child.stderr
    left = Path(child.stdout.strip())
    assert left.is_file()  # SIGKILL: no clean-up
    killed = next(p for p in tmp.iterdir() if left.is_relative_to(p))

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    held = lock_folder(killed)  # as if its run were alive: left alone
    assert held is not None
    try:
        with HubSource(REPO, attempts=3) as src:
            path = src.acquire(src.weight_files()[0])
            own = next(p for p in tmp.iterdir() if path.is_relative_to(p))
            fd = lock_folder(own)
            if fd is not None:
                os.close(fd)
            assert fd is None, "a live run's download folder must be locked"
        assert killed.is_dir()
    finally:
        os.close(held)
    with HubSource(REPO, attempts=3):
        pass
    assert not killed.exists()
    assert not any(tmp.iterdir())


def test_config_quantization_config_not_an_object(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    """A Hub repo's config.json whose quantization_config is not an object is named with the repo (it was
    an AttributeError from the already-quantized check, exit 1)."""
    import json

    from converter.errors import CorruptFileError

    odd = shutil.copytree(checkpoint_dir, tmp_path / "odd")
    cfg = json.loads((odd / "config.json").read_text())
    cfg["quantization_config"] = "none"
    (odd / "config.json").write_text(json.dumps(cfg))
    fake_hub.add_repo("org/odd", odd)
    with pytest.raises(CorruptFileError) as err:
        HubSource("org/odd", attempts=1, output_dir=tmp_path / "out")
    want = 'org/odd: config.json: quantization_config is "none", not an object; report it to the repo owner'
    assert str(err.value) == want
