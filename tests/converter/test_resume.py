"""A conversion killed with SIGKILL at various points resumes to the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from killed_child import run_until_killed
from test_pipeline import output_hashes

from converter.writer.manifest import MANIFEST_NAME
from converter.writer.pipeline import convert

# The child converts and SIGKILLs itself at the chosen point: a real kill, no cleanup handlers run.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from converter.writer import pipeline
    from converter.writer.manifest import MANIFEST_NAME

    src, out, stage = sys.argv[1:4]
    calls = 0

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def hook(name, done):
        global calls
        calls += 1
        if stage == "first-tensor" and calls == 1:
            die()
        if stage == "second-shard":
            shards = json.loads((Path(out) / MANIFEST_NAME).read_text())["shards"]
            if shards:
                die()

    if stage == "before-config":
        pipeline._Conversion._write_config = lambda self, config: die()
    pipeline.convert(src, out, max_shard_size="40KB", progress=hook)
    """
)


@pytest.mark.parametrize("stage", ["first-tensor", "second-shard", "before-config"])
def test_resume_after_sigkill(stage: str, tiny_llama_sharded: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    convert(tiny_llama_sharded, reference, max_shard_size="40KB", progress=False)

    out = tmp_path / "out"
    script = CHILD.format(tests=str(Path(__file__).parent))
    run_until_killed(script, tiny_llama_sharded, out, stage)

    # Nothing looks complete: no config.json (transformers needs it), manifest still in progress.
    assert not (out / "config.json").exists()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["state"] == "in_progress"

    r = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert r.resumed
    assert r.shards_reused == len(manifest["shards"])
    if stage == "second-shard":
        assert r.shards_reused == 1
    assert output_hashes(out) == output_hashes(reference)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")]


def test_kill_before_the_first_manifest_rename_does_not_block_the_rerun(
    tiny_llama_sharded: Path, tmp_path: Path
) -> None:
    """SIGKILL between writing the first manifest's temp file and renaming it leaves only that file:
    the rerun converts (found by the random kills of test_kill_batch under load), instead of
    refusing the folder as holding files quantize-model did not write."""
    reference = tmp_path / "reference"
    convert(tiny_llama_sharded, reference, max_shard_size="40KB", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / f".{MANIFEST_NAME}.tmp").write_bytes(b'{"fingerprint": "tru')  # cut mid-write (before)
    (out / f".{MANIFEST_NAME}.0a1b2c3d.tmp").write_bytes(b'{"fingerprint": "tru')  # (now: a temp name each)
    convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert output_hashes(out) == output_hashes(reference)
    assert not (out / f".{MANIFEST_NAME}.tmp").exists()
    assert not (out / f".{MANIFEST_NAME}.0a1b2c3d.tmp").exists()


def test_two_writers_of_the_same_file_never_interleave(tmp_path: Path) -> None:
    """atomic_write_bytes wrote every file through one fixed temp name (``.<name>.tmp``): two processes
    writing the same file at once (two batch runs' stamps, a JUnit report) truncated and renamed each
    other's temp file, failing with FileNotFoundError or leaving a mix of both. Each call now writes a
    temp file of its own (another writer's is never touched), renamed whole onto the target."""
    import threading

    from converter.writer.manifest import atomic_write_bytes

    target = tmp_path / "stamp.json"
    other = tmp_path / ".stamp.json.tmp"  # another writer's temp file, mid-write
    other.write_bytes(b"theirs")
    errors: list[BaseException] = []

    def writer(byte: int) -> None:
        try:
            for _ in range(150):
                atomic_write_bytes(target, bytes([byte]) * (256 << 10))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(b,)) for b in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = target.read_bytes()
    assert len(data) == 256 << 10
    assert data in (b"\x01" * len(data), b"\x02" * len(data))
    assert other.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stamp.json.tmp", "stamp.json"]


@pytest.mark.parametrize("where", ["missing folder", "folder in its place"])
def test_a_failed_atomic_write_names_the_file_asked_for(tmp_path: Path, where: str) -> None:
    """A report path in a missing folder, or a folder where the file should go, failed naming the
    hidden temp file (`.r.json.1a2b3c4d.tmp: Is a directory`), not the path the user gave."""
    from converter.writer.manifest import atomic_write_bytes

    target = tmp_path / "missing" / "r.json" if where == "missing folder" else tmp_path / "r.json"
    if where != "missing folder":
        target.mkdir()
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"{}")
    assert err.value.filename == str(target)
    assert [p.name for p in tmp_path.rglob(".*.tmp")] == []


def test_a_finished_folder_on_a_read_only_mount_is_a_no_op(
    tiny_llama_sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rerunning a finished conversion whose folder is read-only did nothing and exits 0, as documented:
    it failed with EROFS, unlinking a stray manifest temp file that did not exist (unlink fails with
    EROFS on a read-only mount even for a missing file)."""
    import errno

    out = tmp_path / "out"
    convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    real_unlink = Path.unlink

    def read_only_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.parent == out:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only_unlink)
    r = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert r.noop


def test_a_stranger_file_is_still_refused(tiny_llama_sharded: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match=r"holds files quantize-model did not write \(notes.txt\)"):
        convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)


def test_disk_full_fails_cleanly_then_resumes(
    tiny_llama_sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from converter.errors import ConversionFailedError
    from formats import writer

    reference = tmp_path / "reference"
    convert(tiny_llama_sharded, reference, max_shard_size="40KB", progress=False)

    real_pwrite = os.pwrite

    def pwrite_until_full(fd: int, data, offset: int) -> int:
        # The first shard fits; the disk fills up while the second is written.
        if "model-00002-of-00004" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", pwrite_until_full)
    out = tmp_path / "out"
    with pytest.raises(ConversionFailedError) as exc:
        convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert exc.value.exit_code == 1
    shard2 = out / "model-00002-of-00004.safetensors"
    assert str(exc.value).startswith(f"{shard2}: writing failed (No space left on device)")
    assert str(exc.value).endswith("free disk space or fix the folder, then rerun the same command to resume")
    # The partial shard is gone; only the finished shard and the manifest remain.
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "model-00001-of-00004.safetensors"]

    monkeypatch.setattr(writer.os, "pwrite", real_pwrite)
    r = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert r.resumed
    assert r.shards_reused == 1
    assert output_hashes(out) == output_hashes(reference)


def test_resume_counts_shards_it_rewrites_as_free_disk(
    tiny_llama_sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard renamed into place whose manifest entry was never saved (the disk filled up writing the
    manifest, or a kill between the two): the rerun deletes it and writes it again, but its preflight
    counted it as used disk, so once the user freed just the space the conversion needs, as the error
    said, the rerun was refused ('needs 52.75 MB of disk ... but has 15.21 MB free') and could never
    resume. The files the run replaces count as free."""
    from converter.plan import preflight

    reference = tmp_path / "reference"
    convert(tiny_llama_sharded, reference, max_shard_size="40KB", progress=False)
    out = tmp_path / "out"
    convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    kept = "model-00001-of-00004.safetensors"
    manifest["shards"] = {kept: manifest["shards"][kept]}  # shards 2-4 on disk, not in the manifest
    manifest["state"] = "in_progress"
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    for name in ("config.json", "model.safetensors.index.json"):
        (out / name).unlink()
    stale = sum((out / f"model-0000{k}-of-00004.safetensors").stat().st_size for k in (2, 3, 4))
    dry = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False, dry_run=True).preflight
    assert dry.disk_needed > stale
    # the disk holds the stale shards and just what the rerun needs once they are deleted
    monkeypatch.setattr(preflight, "disk_free", lambda path: (dry.disk_needed - stale + 1, out))
    r = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert r.resumed
    assert r.shards_reused == 1
    assert output_hashes(out) == output_hashes(reference)


def test_disk_full_at_the_index_names_it_and_leaves_no_temp_file(
    tiny_llama_sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every shard written, then the disk fills up while the index is written: the error said only "no
    space left on device" (unlike a shard's, which names the file) and a `.model.safetensors.index.json.
    partial` stayed behind. It now names the index, the temp file is gone, and the rerun finishes."""
    import errno

    from formats import index

    reference = tmp_path / "reference"
    convert(tiny_llama_sharded, reference, max_shard_size="40KB", progress=False)
    real_fsync = os.fsync

    def fsync_full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".model.safetensors.index.json.partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(index.os, "fsync", fsync_full)
    out = tmp_path / "out"
    with pytest.raises(OSError) as exc:
        convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert exc.value.errno == errno.ENOSPC
    assert exc.value.filename == str(out / "model.safetensors.index.json")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")]
    assert not (out / "config.json").exists()

    monkeypatch.setattr(index.os, "fsync", real_fsync)
    r = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert r.resumed
    assert output_hashes(out) == output_hashes(reference)


class _Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs (no except/finally clean-up of the code under test)."""


def _unlink_killed_after(folder: Path, deletions: int) -> Callable[..., None]:
    """Path.unlink that deletes ``deletions`` files in ``folder``, then is "killed"."""
    real_unlink = Path.unlink
    deleted = 0

    def unlink(self: Path, missing_ok: bool = False) -> None:
        nonlocal deleted
        if self.parent == folder and deleted == deletions:
            raise _Killed
        real_unlink(self, missing_ok=missing_ok)
        deleted += self.parent == folder

    return unlink


def test_kill_while_overwrite_clears_the_old_output_never_leaves_it_looking_complete(
    tiny_llama_sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`convert --overwrite` empties the old output before converting. Killed after it had deleted some
    of the old files (in directory order), it could leave one without its manifest but with its index,
    config and shards (`verify` said OK and it loaded), or with only config.json and one shard, which the
    loader took for a single-file checkpoint, though the run replacing it had not written a byte. Killed
    after any number of deletions, the folder must now be refused by verify and by the loader as an
    unfinished conversion, and a rerun, even without --overwrite, must finish the job (no old file left,
    though the old run named its shards differently)."""
    from converter import load_quantized_state
    from converter.errors import InputError
    from converter.tools.inspection import verify_path

    reference = tmp_path / "reference"
    convert(tiny_llama_sharded, reference, max_shard_size="40KB", progress=False)
    real_unlink = Path.unlink
    old_files = len(list(reference.iterdir())) - 1  # besides the manifest
    for kill_after in range(1, old_files):  # killed with 1 .. all but one of them deleted
        out = tmp_path / f"out{kill_after}"
        convert(tiny_llama_sharded, out, quant_type="fp4", max_shard_size="20KB", progress=False)
        monkeypatch.setattr(Path, "unlink", _unlink_killed_after(out, kill_after))
        with pytest.raises(_Killed):
            convert(tiny_llama_sharded, out, max_shard_size="40KB", overwrite=True, progress=False)
        monkeypatch.setattr(Path, "unlink", real_unlink)
        r = verify_path(out)
        assert not r.ok
        assert f"{out}: the conversion did not finish; rerun the same convert command to resume" in r.problems
        with pytest.raises(InputError, match="the conversion did not finish"):
            load_quantized_state(out)
        convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)  # even without --overwrite
        assert output_hashes(out) == output_hashes(reference)  # no old shard (they had other names) left


def test_rerun_redoes_a_shard_edited_in_place_with_the_same_size(
    tiny_llama_sharded: Path, tmp_path: Path
) -> None:
    """A finished folder's rerun checked its shards by size only: a shard whose bytes were changed in
    place (same size) was taken as done and the rerun was a no-op. A shard modified after the manifest
    was written is hashed now: the edited one is rewritten, a merely touched one kept; the manifest is
    rewritten by that rerun, so the next rerun is a no-op again."""
    out = tmp_path / "out"
    convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    reference = output_hashes(out)
    edited = out / "model-00002-of-00004.safetensors"
    data = bytearray(edited.read_bytes())
    data[-1] ^= 0xFF
    time.sleep(0.01)  # a later mtime than the manifest's on filesystems with coarse timestamps
    edited.write_bytes(bytes(data))
    (out / "model-00003-of-00004.safetensors").touch()
    r = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert r.resumed
    assert r.shards_reused == 3  # the touched shard hashed right and was kept
    assert output_hashes(out) == reference
    again = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert again.noop


def test_rerun_into_a_finished_folder_with_a_damaged_shard_keeps_the_users_files(
    tiny_llama_sharded: Path, tmp_path: Path
) -> None:
    """A finished folder whose shard was cut short is resumed (the shard rewritten): that deleted every
    file the conversion had not written, e.g. notes or evaluation results the user had put there since.
    Only the conversion's own files (and their temp names) may be removed."""
    reference = tmp_path / "reference"
    convert(tiny_llama_sharded, reference, max_shard_size="40KB", progress=False)
    out = tmp_path / "out"
    convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    shard = out / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    (out / ".model-00003-of-00004.safetensors.partial").write_bytes(b"left by a killed run")
    r = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert r.resumed
    assert r.shards_reused == 3
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "eval" / "results.json").read_text() == "{}"
    (out / "notes.txt").unlink()
    assert output_hashes(out) == output_hashes(reference)  # the damaged shard rewritten, the temp file gone
