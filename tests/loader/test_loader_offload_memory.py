"""Peak host memory of a load with disk offload and a dtype cast, measured in a fresh interpreter.

Anonymous memory (RssAnon: heap, tensors) is what the load really costs; file-backed pages (RssFile:
the memory-mapped shards and offload files) are the page cache's and reclaimable, so the bounds here
are on RssAnon. Linux only (/proc/self/status).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from loader_helpers import save_tiny_llama

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")

#: A Llama whose unquantized tensors dominate: the untied embedding and head, 131072 x 64 each
#: (33.5 MB each in float32), next to two tiny 4-bit layers.
VOCAB, HIDDEN = 131072, 64

_PEAK_ANON = """
import json, sys, torch
from converter.loader.model import load_quantized
from converter.tools.peak_rss import PeakRss

with PeakRss(("RssAnon",)) as rss:  # sampled every 0.5 ms, and once more as the load returns
    model = load_quantized(sys.argv[1], dtype=getattr(torch, sys.argv[2]), device_map=json.loads(sys.argv[3]),
                           offload_folder=sys.argv[4], verify=False)
print(json.dumps({"peak": rss.grown["RssAnon"]}))
"""


def _peak_anon(folder: Path, dtype: str, device_map: dict[str, str], offload: Path) -> int:
    """Peak RssAnon of ``load_quantized`` above the interpreter's before the call, in bytes."""
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "TORCHDYNAMO_DISABLE": "1",
        # every allocation above 128 KiB its own mapping, returned when freed: glibc's dynamic threshold
        # would otherwise keep freed tensors of up to 32 MiB in the heap and blur the peak
        "MALLOC_MMAP_THRESHOLD_": "131072",
    }
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_ANON, str(folder), dtype, json.dumps(device_map), str(offload)],
        env=env, cwd=root, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from converter.writer.pipeline import convert

    tmp = tmp_path_factory.mktemp("offload_memory")
    plain = save_tiny_llama(tmp / "plain", vocab_size=VOCAB, hidden_size=HIDDEN)
    return convert(plain, tmp / "nf4", progress=False).output


def test_a_cast_disk_load_holds_one_cast_tensor_at_a_time(big_vocab: Path, tmp_path: Path) -> None:
    """The whole model on disk, its bf16 embedding and head loaded as float32 (so written to
    offload_folder): every float32 copy used to be made in RAM first (at the fill, before placement
    was planned) and all of them were held until the last one was written: peak RssAnon was every
    cast tensor at once (67 MB here), though none stays in RAM.

    Bound: the same load without a cast (bfloat16: every tensor a view of the shards, nothing copied)
    is the loader's own cost (parsing, module objects); a cast disk load adds at most the float32
    copy of one tensor in flight between its cast and offload_folder (the largest: VOCAB x HIDDEN x 4
    bytes), nothing of it resident after, plus 8 MiB for the allocator and the sampler's slack."""
    whole_disk = {"": "disk"}
    plain = _peak_anon(big_vocab, "bfloat16", whole_disk, tmp_path / "off-bf16")
    cast = _peak_anon(big_vocab, "float32", whole_disk, tmp_path / "off-f32")
    largest = VOCAB * HIDDEN * 4
    assert cast - plain <= largest + (8 << 20), (
        f"peak RssAnon {cast / 1e6:.1f} MB with the cast vs {plain / 1e6:.1f} MB without: "
        f"more than one {largest / 1e6:.1f} MB tensor in flight"
    )


def _shard_pages(folder: Path) -> int:
    """Resident bytes of this process's mappings of ``folder``'s shards (/proc/self/smaps)."""
    from converter.loader.state import shard_files

    paths = {str(p.resolve()) for p in shard_files(folder)[0]}
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if not head[0].endswith(":"):  # a mapping's first line: address range, perms, ..., path
            inside = len(head) == 6 and head[5] in paths
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


@pytest.mark.parametrize("device_map", [None, {"": "disk"}], ids=["cpu", "disk"])
def test_the_shard_pages_of_cast_tensors_leave_the_process(
    big_vocab: Path, tmp_path: Path, device_map: dict[str, str] | None
) -> None:
    """A float32 load of bf16 tensors reads each from its mapped shard once, for the cast; those pages
    then stayed in the process's RSS for as long as the model lived (33.5 MB here, the bf16 embedding
    and head; half the float32 model's size again on top of it), though nothing reads them again.
    File-backed and reclaimable, but counted in VmRSS (and by the OOM killer). Bound: the bytes of the
    tensors still read from the shards (the 4-bit layers; with "disk", dropped after the load too),
    plus 1 MiB of page rounding and the kernel's fault-around."""
    import gc

    import torch

    from converter.loader.file_mappings import file_mappings, inside
    from converter.loader.footprint import module_tensors
    from converter.loader.model import load_quantized
    from converter.loader.state import shard_files

    gc.collect()
    model = load_quantized(
        big_vocab, dtype=torch.float32, device_map=device_map, offload_folder=tmp_path / "off", verify=False
    )
    mappings = file_mappings(shard_files(big_vocab)[0])
    viewed = sum(t.numel() * t.element_size() for _, t, _ in module_tensors(model) if inside(t, mappings))
    assert model.model.embed_tokens.weight.dtype == torch.float32
    resident = _shard_pages(big_vocab)
    assert resident <= viewed + (1 << 20), f"{resident / 1e6:.1f} MB of shard pages for {viewed / 1e6:.1f} MB"
