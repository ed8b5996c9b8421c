"""`quantize-model inspect org/name`: a quantized Hub repo summarised from HTTP range reads only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_hub import FakeHub
from hub_helpers import qm

pytestmark = pytest.mark.hub


def test_inspect_hub_repo_reads_headers_by_range(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    out = tmp_path / "nf4"
    assert (
        qm("convert", checkpoint_dir, out, "--max-shard-size", "40KB", "--skip", "lm_head", "-q").exit_code
        == 0
    )
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2
    commit = fake_hub.add_repo("org/tiny-nf4", out)
    local = json.loads(qm("inspect", out, "--json").stdout)

    fake_hub.requests.clear()
    r = qm("inspect", "org/tiny-nf4", "--json")
    assert r.exit_code == 0, r.stderr
    remote = json.loads(r.stdout)
    assert remote["path"] == f"org/tiny-nf4@{commit}"
    for key in ("path", "bytes_read"):
        remote.pop(key), local.pop(key)
    assert remote == local  # the same summary as from the files themselves

    # Every read of a shard was a range request; nothing close to a shard's size came down.
    shard_reads = [
        (s, p, rng)
        for s, m, p, rng in fake_hub.requests
        if m == "GET" and (s == "cdn" or p.endswith(".safetensors"))
    ]
    assert shard_reads
    assert all(rng is not None and rng.startswith("bytes=") for _, _, rng in shard_reads)
    total = sum(p.stat().st_size for p in shards)
    assert r.exit_code == 0
    read = json.loads(qm("inspect", "org/tiny-nf4", "--json").stdout)["bytes_read"]
    assert read < total / 4
    assert not list((hf_home / "hub").rglob("*.safetensors"))  # nothing went into the cache


def test_inspect_missing_repo_is_one_line(fake_hub: FakeHub, hf_home: Path) -> None:
    r = qm("inspect", "org/missing")
    assert r.exit_code == 2
    assert r.stderr.startswith("Error: org/missing: repository not found")


def test_inspect_memory_of_a_hub_revision(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    """`inspect REPO --memory --revision REV` estimates that branch, as the folder of that branch gives;
    it used to be refused (the estimate fetched the default branch only)."""
    nf4, int8 = tmp_path / "nf4", tmp_path / "int8"
    assert qm("convert", checkpoint_dir, nf4, "-q").exit_code == 0
    assert qm("convert", checkpoint_dir, int8, "--quant-type", "int8", "-q").exit_code == 0
    fake_hub.add_repo("org/tiny", nf4)
    fake_hub.add_repo("org/tiny", int8, branch="int8")
    args = ("--memory", "--device-map", "cpu", "--json")
    by_branch = {}
    for branch, folder in (("main", nf4), ("int8", int8)):
        r = qm("inspect", "org/tiny", "--revision", branch, *args)
        assert r.exit_code == 0, r.stderr
        by_branch[branch] = json.loads(r.stdout)
        assert by_branch[branch] == json.loads(qm("inspect", folder, *args).stdout)
    assert by_branch["main"]["total"] < by_branch["int8"]["total"]


def test_inspect_hub_moe_fp4_experts_not_for_vllm(tmp_path: Path, fake_hub: FakeHub, hf_home: Path) -> None:
    """A repo with FP4 MoE experts: the remote summary says, as the local one does, that vLLM (whose
    fused-expert loader decodes every expert as NF4) does not read it."""
    from tiny_models import make_tiny

    src = make_tiny("qwen3_moe", tmp_path / "src")
    out = tmp_path / "fp4"
    r = qm("convert", src, out, "--quant-type", "fp4", "--moe-experts", "quantize", "-q")
    assert r.exit_code == 0, r.stderr
    fake_hub.add_repo("org/tiny-moe-fp4", out)
    local = json.loads(qm("inspect", out, "--json").stdout)["moe"]
    r = qm("inspect", "org/tiny-moe-fp4", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["moe"] == local
    assert not any("vLLM" in x for x in local["loaders"])
    assert any("vLLM" in x and "fp4" in x for x in local["not_loaders"])


def test_inspect_hub_int8_repo_is_the_local_summary(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path
) -> None:
    """An LLM.int8 repo (``<m>.weight`` I8 + ``<m>.SCB``): the remote summary counted no quantized
    tensor and listed the codes and scales as kept I8/F32 tensors; it is the local one."""
    out = tmp_path / "int8"
    assert qm("convert", checkpoint_dir, out, "--quant-type", "int8", "-q").exit_code == 0
    fake_hub.add_repo("org/tiny-int8", out)
    local = json.loads(qm("inspect", out, "--json").stdout)
    r = qm("inspect", "org/tiny-int8", "--json")
    assert r.exit_code == 0, r.stderr
    remote = json.loads(r.stdout)
    for key in ("path", "bytes_read"):
        remote.pop(key), local.pop(key)
    assert local["tensors_quantized"] > 0
    assert remote == local


def test_inspect_hub_int8_moe_experts_are_the_local_summary(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path
) -> None:
    """A repo of per-expert LLM.int8 records (transformers 4.x + bitsandbytes' Mixtral): the remote
    summary called them 4-bit experts that load_quantized and vLLM read; it is the local one."""
    from tiny_models import int8_experts, make_tiny

    out = tmp_path / "int8"
    src = make_tiny("mixtral", tmp_path / "src")
    assert qm("convert", src, out, "--quant-type", "int8", "-q").exit_code == 0
    int8_experts(out)
    fake_hub.add_repo("org/tiny-moe-int8", out)
    local = json.loads(qm("inspect", out, "--json").stdout)["moe"]
    r = qm("inspect", "org/tiny-moe-int8", "--json")
    assert r.exit_code == 0, r.stderr
    assert local["layout"] == "experts quantized (per-expert bnb int8 records)"
    assert json.loads(r.stdout)["moe"] == local


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_estimate_of_a_hub_repo_reads_headers_only(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, quant_type: str
) -> None:
    """`estimate` (`inspect REPO --memory`) downloaded every shard of the repo, while it needs only their
    headers: it reads them by HTTP range requests as `inspect` does, and gives the folder's estimate."""
    from converter.loader.estimate import estimate

    out = tmp_path / quant_type
    args = ("--max-shard-size", "40KB", "--quant-type", quant_type, "-q")
    assert qm("convert", checkpoint_dir, out, *args).exit_code == 0
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2
    fake_hub.add_repo("org/tiny-q", out)
    fake_hub.add_repo("org/nested", {f"sub/{p.name}": p for p in out.iterdir() if p.is_file()})
    local = estimate(out, "cpu")
    for repo, sub in (("org/tiny-q", ""), ("org/nested", "sub")):
        fake_hub.requests.clear()
        assert estimate(repo, "cpu", subfolder=sub) == local
        shard_reads = [
            rng
            for s, m, p, rng in fake_hub.requests
            if m == "GET" and (s == "cdn" or p.endswith(".safetensors"))
        ]
        assert shard_reads
        assert all(rng is not None and rng.startswith("bytes=") for rng in shard_reads)
        # the length prefixes, headers and the small tensors whose values are checked (4-bit quant-state
        # JSON and code tables, int8 weight_format), those at most MERGE_GAP apart in one request with
        # the bytes between: no other byte of codes, absmax, SCB or kept weights
        asked = [r for s, m, p, r in fake_hub.requests if m == "GET" and p.endswith(".safetensors")]
        sizes = [int(b) - int(a) + 1 for a, b in (r.removeprefix("bytes=").split("-") for r in asked)]
        assert sum(sizes) == sum(_header_and_validated_bytes(p) for p in shards)
        assert len(asked) == sum(2 + len(_value_blocks(p)) for p in shards)
        assert not list((hf_home / "hub").rglob("*.safetensors"))  # no shard went into the cache
    r = qm("inspect", "org/tiny-q", "--memory", "--device-map", "cpu", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == qm("inspect", out, "--memory", "--device-map", "cpu", "--json").stdout


def _value_spans(shard: Path) -> tuple[int, list[tuple[int, int]]]:
    """(8 + header length, file spans of the quant-state, quant_map, nested_quant_map and weight_format
    tensors) of ``shard``."""
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    spans = [
        (8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1])
        for k, e in header.items()
        if ".quant_state." in k or k.endswith((".quant_map", ".nested_quant_map", ".weight_format"))
    ]
    return 8 + n, spans


def _value_blocks(shard: Path) -> list[tuple[int, int]]:
    """The value spans of ``shard`` as the estimate requests them: merged across gaps of at most
    MERGE_GAP bytes."""
    from converter.sources import hub_ranges

    return hub_ranges.merge_spans(_value_spans(shard)[1], hub_ranges.MERGE_GAP)


def _header_and_validated_bytes(shard: Path) -> int:
    """Bytes of the length prefix, the header, and the value tensors of ``shard`` with the gaps of at
    most MERGE_GAP bytes between them."""
    return _value_spans(shard)[0] + sum(b - a for a, b in _value_blocks(shard))


def test_estimate_of_a_hub_moe_repo_is_the_folders(tmp_path: Path, fake_hub: FakeHub, hf_home: Path) -> None:
    """The header-only estimate of a repo with 4-bit MoE experts (stacked from meta tensors) is the
    folder's."""
    from tiny_models import make_tiny

    from converter.loader.estimate import estimate

    out = tmp_path / "q"
    src = make_tiny("qwen3_moe", tmp_path / "src")
    assert qm("convert", src, out, "--moe-experts", "quantize", "-q").exit_code == 0
    fake_hub.add_repo("org/tiny-moe", out)
    assert estimate("org/tiny-moe", "cpu") == estimate(out, "cpu")
    # a dict map: accelerate's check_device_map lists the skeleton's state_dict, whose per-expert records
    # were copied off the meta device, then their nested offsets read ("Tensor.item() cannot be called
    # on meta tensors"; inspect REPO --memory --device-map '{...}' failed, exit 1)
    device_map = {"model.layers.1": "disk", "": "cpu"}
    assert estimate("org/tiny-moe", device_map) == estimate(out, device_map)
    r = qm("inspect", "org/tiny-moe", "--memory", "--device-map", json.dumps(device_map), "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["bytes_per_device"] == estimate(out, device_map)[1]
    assert not list((hf_home / "hub").rglob("*.safetensors"))


def _range_reads(fake_hub: FakeHub) -> list[tuple[int, int]]:
    """The (start, end) of every range request of a shard the fake Hub saw, in order."""
    out = []
    for _, m, p, rng in list(fake_hub.requests):
        if m == "GET" and p.endswith(".safetensors") and rng:
            a, b = rng.removeprefix("bytes=").split("-")
            out.append((int(a), int(b) + 1))
    return out


def test_hub_estimate_of_per_expert_records_is_few_concurrent_requests(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo of per-expert 4-bit records (Qwen3-MoE) took one range request per quantized weight, one
    after the other (each weight's code tables sit between the previous weight's tables): minutes at
    Hub latency for a 30B MoE. Spans at most MERGE_GAP apart share a request, and the requests that
    remain run concurrently, at most WORKERS at once; the estimate and the inspect summary are unchanged."""
    import threading
    import time

    from tiny_models import make_tiny

    from converter.loader.estimate import estimate
    from converter.sources import hub_ranges

    out = tmp_path / "q"
    src = make_tiny("qwen3_moe", tmp_path / "src")
    assert qm("convert", src, out, "--moe-experts", "quantize", "-q").exit_code == 0
    (shard,) = out.glob("*.safetensors")
    fake_hub.add_repo("org/tiny-moe", out)
    local, local_summary = estimate(out, "cpu"), json.loads(qm("inspect", out, "--json").stdout)
    head, spans = _value_spans(shard)
    weights = sum(".quant_state." in k for k in json.loads(shard.read_bytes()[8:head]))
    assert weights >= 30
    assert len(hub_ranges.merge_spans(spans, 0)) > weights  # one request or more per weight, before

    fake_hub.requests.clear()
    assert estimate("org/tiny-moe", "cpu") == local
    reads = _range_reads(fake_hub)
    assert len(reads) <= 4  # length prefix, header, the value tensors in one or two blocks; was 35
    assert sum(b - a for a, b in reads) == _header_and_validated_bytes(shard)  # gaps ≤ MERGE_GAP

    # Spans too far apart to merge: one request each, every value byte exactly, WORKERS in flight.
    monkeypatch.setattr(hub_ranges, "MERGE_GAP", 0)
    monkeypatch.setattr(hub_ranges, "WORKERS", 4)
    lock, flight, peak = threading.Lock(), [0], [0]
    get = hub_ranges.RangeReader.get

    def slow_get(self, file, start=None, length=None):
        with lock:
            flight[0] += 1
            peak[0] = max(peak[0], flight[0])
        try:
            time.sleep(0.02)
            return get(self, file, start, length)
        finally:
            with lock:
                flight[0] -= 1

    monkeypatch.setattr(hub_ranges.RangeReader, "get", slow_get)
    fake_hub.requests.clear()
    assert estimate("org/tiny-moe", "cpu") == local
    reads = _range_reads(fake_hub)
    assert sorted(reads[2:]) == hub_ranges.merge_spans(spans, 0)
    assert 1 < peak[0] <= 4
    r = qm("inspect", "org/tiny-moe", "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    for key in ("path", "bytes_read"):
        summary.pop(key), local_summary.pop(key)
    assert summary == local_summary


def test_hub_estimate_range_read_failure_names_the_range_and_stops(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range request that keeps failing while others are queued: the error names the file and the
    byte range, comes back after the requests in flight, and the queued ones are never sent."""
    import threading

    from fake_hub import Fault
    from tiny_models import make_tiny

    from converter.errors import ConversionFailedError
    from converter.loader.estimate import estimate
    from converter.sources import hub_ranges

    out = tmp_path / "q"
    src = make_tiny("qwen3_moe", tmp_path / "src")
    assert qm("convert", src, out, "--moe-experts", "quantize", "-q").exit_code == 0
    fake_hub.add_repo("org/tiny-moe", out)
    monkeypatch.setattr(hub_ranges, "MERGE_GAP", 0)
    monkeypatch.setattr(hub_ranges, "WORKERS", 2)
    get = hub_ranges.RangeReader.get
    fault = Fault(path=r"\.safetensors$", status=503, headers={"Retry-After": "0"}, times=10**6)

    def failing_get(self, file, start=None, length=None):
        if threading.current_thread().name.startswith("hub-range") and fault not in fake_hub.faults:
            fake_hub.add_fault(fault)  # the value reads fail, the header reads did not
        return get(self, file, start, length)

    monkeypatch.setattr(hub_ranges.RangeReader, "get", failing_get)
    (shard,) = out.glob("*.safetensors")
    blocks = hub_ranges.merge_spans(_value_spans(shard)[1], 0)
    fake_hub.requests.clear()
    match = r"org/tiny-moe: range read of bytes \d+-\d+ of model\.safetensors failed after 5 attempt\(s\)"
    with pytest.raises(ConversionFailedError, match=match):
        estimate("org/tiny-moe", "cpu")
    sent = set(_range_reads(fake_hub)[2:])
    assert len(blocks) > 30
    assert len(sent) <= 8  # those in flight when the first one failed, not all of them


@pytest.mark.parametrize(
    ("quant_type", "split"), [("nf4", "mlp.down_proj.weight"), ("int8", "mlp.down_proj.SCB")]
)
def test_inspect_hub_joins_a_weight_split_across_shards(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, quant_type: str, split: str
) -> None:
    """A repo saved by transformers' save_pretrained may hold a weight's codes in one shard and its
    quant state in the next: the remote summary counted those codes as a kept uint8 tensor (as the
    local one did), not as part of the quantized weight."""
    from tiny_models import resharded_as_transformers

    out = tmp_path / quant_type
    assert qm("convert", checkpoint_dir, out, "--quant-type", quant_type, "-q").exit_code == 0
    whole = json.loads(qm("inspect", out, "--json").stdout)
    folder = resharded_as_transformers(out, tmp_path / "split", f"model.layers.0.{split}")
    fake_hub.add_repo("org/split", folder)
    r = qm("inspect", "org/split", "--json")
    assert r.exit_code == 0, r.stderr
    remote = json.loads(r.stdout)
    local = json.loads(qm("inspect", folder, "--json").stdout)
    counts = ("tensors_quantized", "tensors_kept", "kept_dtypes", "quant_types", "params_kept", "bytes_kept")
    for key in counts:
        assert remote[key] == local[key] == whole[key], key
