"""Fused experts read per expert from the fake Hub (Llama 4, gpt-oss with --moe-experts quantize): whole
downloaded files and files streamed by HTTP range alike give the folder a local conversion gives, and a
streamed file is read one expert block at a time, never as a whole fused tensor."""

from __future__ import annotations

import sys
import warnings
from collections import namedtuple
from pathlib import Path

import pytest
from fake_hub import FakeHub
from test_hub_convert import _assert_same_conversion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moe"))

from moe_helpers import GPT_OSS, LLAMA4, make_gpt_oss, make_llama4

pytestmark = pytest.mark.hub

#: family -> (tiny model builder, its config): both store gate_up_proj [E, H, 2I] fused in bf16
FAMILIES = {"llama4": (make_llama4, LLAMA4), "gpt_oss": (make_gpt_oss, GPT_OSS)}


def _convert(source: str | Path, out: Path):
    from converter.writer.pipeline import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(source, out, progress=False, moe_experts="quantize")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("streamed", [False, True], ids=["downloaded", "streamed"])
def test_hub_per_expert_view_equals_local(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, monkeypatch, family, streamed
) -> None:
    import shutil

    make, config = FAMILIES[family]
    repo = f"org/{family}"
    src = make(tmp_path / "src")
    commit = fake_hub.add_repo(repo, src)
    local = _convert(src, tmp_path / "local")
    if streamed:  # no room for the shard: read by HTTP range, expert by expert
        free = (src / "model.safetensors").stat().st_size - 1024  # the output fits, the shard not beside it
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**13, 10**13 - free, free))
        from converter.sources import hub as hub_mod

        monkeypatch.setattr(hub_mod, "estimate_output_bytes", lambda _t: 1024)
    hub = _convert(repo, tmp_path / "hub")
    assert hub.shards == local.shards
    _assert_same_conversion(tmp_path / "local", tmp_path / "hub")
    if not streamed:
        return
    sha = fake_hub.repos[repo].commits[commit]["model.safetensors"].sha256
    ranged = [r for s, m, p, r in fake_hub.requests if s == "cdn" and m == "GET" and r and sha in p]
    lengths = [int(b) - int(a) + 1 for a, b in (r.removeprefix("bytes=").split("-") for r in ranged)]
    h, inter, e = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    expert = h * 2 * inter * 2  # one expert of gate_up_proj [E, H, 2I] in bf16
    assert lengths.count(expert) == 2 * e  # each expert's block once (2 layers)
    assert max(lengths) < e * expert  # never a whole fused tensor
