"""gpt-oss from the fake Hub with --moe-experts quantize: its fused experts are read per expert (whole
downloaded files and files streamed by HTTP range alike) and the folder equals a local conversion's."""

from __future__ import annotations

import sys
import warnings
from collections import namedtuple
from pathlib import Path

import pytest
from fake_hub import FakeHub
from test_hub_convert import _assert_same_conversion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moe"))

from moe_helpers import GPT_OSS, make_gpt_oss

pytestmark = pytest.mark.hub

REPO = "org/gpt-oss"


def _convert(source: str | Path, out: Path):
    from converter.writer.pipeline import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(source, out, progress=False, moe_experts="quantize")


@pytest.mark.parametrize("streamed", [False, True], ids=["downloaded", "streamed"])
def test_hub_gpt_oss_equals_local(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, monkeypatch, streamed
) -> None:
    import shutil

    src = make_gpt_oss(tmp_path / "src")
    commit = fake_hub.add_repo(REPO, src)
    local = _convert(src, tmp_path / "local")
    if streamed:  # no room for the shard: read by HTTP range, expert by expert
        free = (src / "model.safetensors").stat().st_size - 1024
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**13, 10**13 - free, free))
        from converter.sources import hub as hub_mod

        monkeypatch.setattr(hub_mod, "estimate_output_bytes", lambda _t: 1024)
    hub = _convert(REPO, tmp_path / "hub")
    assert hub.shards == local.shards
    _assert_same_conversion(tmp_path / "local", tmp_path / "hub")
    if not streamed:
        return
    sha = fake_hub.repos[REPO].commits[commit]["model.safetensors"].sha256
    ranged = [r for s, m, p, r in fake_hub.requests if s == "cdn" and m == "GET" and r and sha in p]
    lengths = [int(b) - int(a) + 1 for a, b in (r.removeprefix("bytes=").split("-") for r in ranged)]
    h, inter, e = GPT_OSS["hidden_size"], GPT_OSS["intermediate_size"], GPT_OSS["num_local_experts"]
    expert = h * 2 * inter * 2  # one expert of gate_up_proj [E, H, 2I] in bf16
    assert lengths.count(expert) == 2 * e  # each expert's block once (2 layers)
    assert max(lengths) < e * expert  # never a whole fused tensor
