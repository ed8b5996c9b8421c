"""converter.tools.peak_rss: the one RSS sampler the memory tests' and benchmarks' child scripts share
(tests/loader/test_loader_offload_memory.py, bench/bench_dequantize_memory.py,
bench/bench_load_cast_memory.py each carried their own copy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from converter.tools.peak_rss import status

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")


def test_the_peak_of_a_block_is_what_it_held_at_most() -> None:
    """64 MiB touched then freed inside the block: the peak is above the baseline by about that, and the
    process as the block ends is back near the baseline. In a fresh interpreter, as the memory tests and
    benchmarks use it: inside the long test process the allocator may hand out pages it already holds
    (resident before the block), so nothing grows there (seen on CI: RssAnon grown 4096)."""
    script = """
import json, time
from converter.tools.peak_rss import PeakRss
size = 64 << 20
with PeakRss(("RssAnon", "VmRSS")) as rss:
    block = b"\\x01" * size  # every page written, so resident
    deadline = time.monotonic() + 10  # held until the sampler thread has seen it
    while rss.peak["RssAnon"] < rss.before["RssAnon"] + size // 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    del block
print(json.dumps({"grown": rss.grown, "before": rss.before, "after": rss.after, "peak": rss.peak}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    rss = json.loads(out.strip().splitlines()[-1])
    size = 64 << 20
    assert set(rss["grown"]) == {"RssAnon", "VmRSS"}
    assert size - (4 << 20) <= rss["grown"]["RssAnon"] <= size + (16 << 20), rss["grown"]
    assert rss["after"]["RssAnon"] - rss["before"]["RssAnon"] < 16 << 20, (rss["before"], rss["after"])
    assert rss["peak"]["VmRSS"] >= rss["before"]["VmRSS"] + size - (4 << 20)


def test_status_reads_the_fields_asked_in_bytes_and_names_a_missing_one() -> None:
    got = status(("VmRSS", "RssAnon", "RssFile"))
    assert list(got) == ["VmRSS", "RssAnon", "RssFile"]
    assert got["VmRSS"] >= got["RssAnon"] > 0
    assert got["VmRSS"] % 1024 == 0
    with pytest.raises(KeyError, match="no field NotAField"):
        status(("RssAnon", "NotAField"))
