"""Chunk digests (formats/chunks.py) of a resumed conversion: shards finished before a SIGKILL keep
the digests their manifest entry recorded, and the index of the resumed folder equals an
uninterrupted run's, chunk digests included, each one the sha256 of its 4 KiB of the shard."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
from killed_child import run_until_killed
from test_pipeline import output_hashes

from converter.writer.manifest import MANIFEST_NAME
from converter.writer.pipeline import convert
from formats.index import read_index, verify_shards

CHUNK = 4096

# The child converts with 4 KiB chunks and SIGKILLs itself once the first shard is in the manifest.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    import formats.chunks
    from converter.writer import pipeline
    from converter.writer.manifest import MANIFEST_NAME

    formats.chunks.CHUNK_BYTES = {chunk}
    src, out = sys.argv[1:3]

    def hook(name, done):
        if json.loads((Path(out) / MANIFEST_NAME).read_text())["shards"]:
            os.kill(os.getpid(), signal.SIGKILL)

    pipeline.convert(src, out, max_shard_size="40KB", progress=hook)
    """
)


def _check_digests(folder: Path) -> None:
    index = read_index(folder)
    for name, entry in index.shards.items():
        data = (folder / name).read_bytes()
        assert entry.chunks is not None
        assert entry.chunks.size == CHUNK
        want = [hashlib.sha256(data[o : o + CHUNK]).hexdigest() for o in range(0, len(data), CHUNK)]
        assert list(entry.chunks.sha256) == want, name
    assert verify_shards(folder) == []


@pytest.mark.parametrize("manifest_chunks", ["kept", "dropped"])
def test_resumed_shards_get_correct_chunk_digests(
    tiny_llama_sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, manifest_chunks: str
) -> None:
    monkeypatch.setattr("formats.chunks.CHUNK_BYTES", CHUNK)
    reference = tmp_path / "reference"
    convert(tiny_llama_sharded, reference, max_shard_size="40KB", progress=False)
    _check_digests(reference)

    out = tmp_path / "out"
    run_until_killed(CHILD.format(chunk=CHUNK), tiny_llama_sharded, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    (entry,) = manifest["shards"].values()
    assert entry["chunks"]["size"] == CHUNK
    if manifest_chunks == "dropped":  # a manifest written before chunk digests: computed on resume
        del entry["chunks"]
        (out / MANIFEST_NAME).write_text(json.dumps(manifest))

    r = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert r.resumed
    assert r.shards_reused == 1
    _check_digests(out)
    got, want = output_hashes(out), output_hashes(reference)
    if manifest_chunks == "dropped":  # the old manifest entry stays as it was; the index gets them
        del got[MANIFEST_NAME], want[MANIFEST_NAME]
    assert got == want  # the index (digests included) too
