"""model.safetensors.index.json: round trip, checksum verification, and transformers loading our folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from fmt_helpers import reference_record, shard_plan

from formats import bnb_compat
from formats.index import (
    INDEX_NAME,
    FileDigest,
    read_index,
    recorded_file_problems,
    shard_name,
    verify_shards,
    write_index,
)
from formats.quant_types import QuantType
from formats.reader import open_checkpoint, open_folder, open_shard
from formats.record import QuantizedTensor
from formats.validate import (
    BadIndex,
    DuplicateTensor,
    MissingQuantComponent,
    MissingShard,
    UnknownFormatVersion,
)
from formats.writer import ShardInfo, ShardWriter

PROV = {"source": "test", "files": [], "options": {}}


def _write_two_shards(folder: Path) -> tuple[list[ShardInfo], dict[str, str]]:
    infos, weight_map = [], {}
    for k in (1, 2):
        rec = reference_record(f"layer{k}.weight", torch.randn(8, 64), QuantType.NF4, 64, nested=True)
        slots, meta = shard_plan([rec], {f"layer{k}.bias": torch.zeros(8)})
        path = folder / shard_name(k, 2)
        with ShardWriter(path, slots, meta) as w:
            for name, t in {**rec.state_dict(), f"layer{k}.bias": torch.zeros(8)}.items():
                w.write(name, t)
                weight_map[name] = path.name
        infos.append(w.info)
    return infos, weight_map


def test_index_round_trip_and_bytes(tmp_path: Path) -> None:
    infos, wm = _write_two_shards(tmp_path)
    path = write_index(tmp_path, infos, wm, PROV, version="0.1.0")
    text = path.read_text()
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    index = read_index(tmp_path)
    assert index.weight_map == wm
    assert index.format_version == 1
    assert index.files == [shard_name(1, 2), shard_name(2, 2)]
    assert index.shards[shard_name(1, 2)].sha256 == infos[0].sha256
    assert index.total_size == sum(open_shard(i.path).data_size for i in infos)
    assert verify_shards(tmp_path) == []
    assert not (tmp_path / f".{INDEX_NAME}.partial").exists()


def test_verify_detects_corruption_and_missing(tmp_path: Path) -> None:
    infos, wm = _write_two_shards(tmp_path)
    write_index(tmp_path, infos, wm, PROV)
    p = infos[1].path
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(raw)
    problems = verify_shards(tmp_path, threads=2)
    assert len(problems) == 1
    assert f"{p}: xxh3_128 of chunk 0 " in problems[0]  # one chunk: the shard is smaller than 16 MiB
    (line,) = verify_shards(tmp_path, algo="sha256")
    assert f"{p}: sha256 of chunk 0 " in line
    assert infos[1].sha256 in line  # one chunk: its sha256 is the file's
    p.unlink()
    assert verify_shards(tmp_path) == [f"{p}: missing"]
    with pytest.raises(MissingShard, match=shard_name(2, 2)):
        read_index(tmp_path)


def test_index_refusals(tmp_path: Path) -> None:
    infos, wm = _write_two_shards(tmp_path)
    with pytest.raises(BadIndex, match="not written"):
        write_index(tmp_path, infos[:1], wm, PROV)
    write_index(tmp_path, infos, wm, PROV)
    obj = json.loads((tmp_path / INDEX_NAME).read_text())
    obj["metadata"]["quantize_model"]["format"]["version"] = 7
    (tmp_path / INDEX_NAME).write_text(json.dumps(obj))
    with pytest.raises(UnknownFormatVersion, match="format version 7"):
        read_index(tmp_path)
    obj["metadata"]["quantize_model"]["format"]["version"] = 1
    obj["weight_map"]["layer1.weight"] = "../escape.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(obj))
    with pytest.raises(BadIndex, match="not a file name inside the folder"):
        read_index(tmp_path)
    (tmp_path / INDEX_NAME).write_text("{")
    with pytest.raises(BadIndex, match="not a JSON file"):
        read_index(tmp_path)


def test_index_records_the_digests_of_the_small_json_files(tmp_path: Path) -> None:
    """``files`` (optional): config.json's sha256 and size, recorded before config.json is written (its
    bytes are known); recorded_file_problems names a file whose bytes differ or that is missing. An index
    without it (written before) reads as recording none."""
    infos, wm = _write_two_shards(tmp_path)
    write_index(tmp_path, infos, wm, PROV)
    assert read_index(tmp_path).file_digests is None
    assert recorded_file_problems(read_index(tmp_path)) == []
    config = b'{"num_hidden_layers": 2}\n'
    write_index(tmp_path, infos, wm, PROV, files={"config.json": FileDigest.of(config)})
    obj = json.loads((tmp_path / INDEX_NAME).read_text())
    digest = obj["metadata"]["quantize_model"]["files"]["config.json"]
    assert digest == {"sha256": hashlib.sha256(config).hexdigest(), "size": len(config)}
    index = read_index(tmp_path)
    assert set(index.file_digests or {}) == {"config.json"}
    path = tmp_path / "config.json"
    assert recorded_file_problems(index) == [f"{path}: missing (the index records its sha256)"]
    assert recorded_file_problems(index, skip_missing=("config.json",)) == []
    path.write_bytes(config)
    assert recorded_file_problems(index) == []
    edited = b'{"num_hidden_layers": 1}\n'
    path.write_bytes(edited)
    assert recorded_file_problems(index) == [
        f"{path}: sha256 {hashlib.sha256(edited).hexdigest()}, index says {digest['sha256']} (changed since "
        "the conversion wrote it)"
    ]


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ([], "must map file names"),
        ({"../config.json": {"sha256": "0" * 64, "size": 1}}, "not a file name inside the folder"),
        ({"config.json": {"sha256": "0" * 63, "size": 1}}, "64 lowercase hex digits"),
        ({"config.json": {"sha256": "0" * 64, "size": "1"}}, "64 lowercase hex digits"),
        ({"config.json": "0" * 64}, r"must be \{'sha256', 'size'\}"),
    ],
)
def test_index_refuses_a_malformed_files_record(tmp_path: Path, files: object, match: str) -> None:
    infos, wm = _write_two_shards(tmp_path)
    write_index(tmp_path, infos, wm, PROV)
    obj = json.loads((tmp_path / INDEX_NAME).read_text())
    obj["metadata"]["quantize_model"]["files"] = files
    (tmp_path / INDEX_NAME).write_text(json.dumps(obj))
    with pytest.raises(BadIndex, match=match):
        read_index(tmp_path)


def test_transformers_loads_our_folder(tmp_path: Path) -> None:
    """A tiny Llama, its Linear weights quantized with formats.reference, split over two shards."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    sd = model.state_dict()
    linear = [k for k in sd if ".layers." in k and k.endswith("proj.weight")]
    records = {k: reference_record(k, sd[k], QuantType.NF4, 64, nested=True) for k in linear}
    per_shard = [
        [k for k in sd if ".layers.0." in k or "embed" in k],
        [k for k in sd if not (".layers.0." in k or "embed" in k)],
    ]
    infos, wm = [], {}
    for i, keys in enumerate(per_shard, start=1):
        recs = [records[k] for k in keys if k in records]
        passthrough = {k: sd[k] for k in keys if k not in records}
        slots, meta = shard_plan(recs, passthrough)
        path = tmp_path / shard_name(i, 2)
        with ShardWriter(path, slots, meta) as w:
            tensors = {**{n: t for r in recs for n, t in r.state_dict().items()}, **passthrough}
            for n, t in tensors.items():
                w.write(n, t)
                wm[n] = path.name
        infos.append(w.info)
    write_index(tmp_path, infos, wm, PROV)
    qc = bnb_compat.quantization_config(
        quant_type=QuantType.NF4, double_quant=True, compute_dtype="bfloat16", skip_modules=["lm_head"]
    )
    config = bnb_compat.update_config(cfg.to_dict(), qc, "bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    quantized = {n + ".weight" for n, m in loaded.named_modules() if isinstance(m, Linear4bit)}
    assert quantized == set(linear)
    import bitsandbytes.functional as bnbf

    for name in linear[:3]:
        module = loaded.get_submodule(name.removesuffix(".weight"))
        got = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert torch.equal(got.view(torch.int16), records[name].dequantize().view(torch.int16)), name
    with torch.no_grad():
        logits = loaded(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_reads_a_folder_transformers_saved(tmp_path: Path) -> None:
    """bnb + transformers' own save_pretrained output: no quantize_model metadata, same bnb keys."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    src = tmp_path / "src"
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
    bnb_cfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src, quantization_config=bnb_cfg, device_map="cpu"
    )
    out = tmp_path / "bnb"
    model.save_pretrained(out, max_shard_size="10KB")
    index = read_index(out)
    assert index.format_version is None
    assert index.shards == {}
    assert len(index.files) > 1
    assert verify_shards(out) == []
    for name in index.files:
        assert open_shard(out / name).metadata is None
    split = [open_shard(out / n) for n in index.files if open_shard(out / n).partial]
    assert split, "transformers split no weight over two shards; shrink max_shard_size"
    with pytest.raises(MissingQuantComponent, match="split across shards"):
        split[0].records()
    with open_folder(out) as ckpt:
        records = ckpt.records()
    assert set(records) == set(model.state_dict()) - {
        k for k in model.state_dict() if ".weight." in k
    }  # one record per quantized weight: its auxiliary keys are folded in
    q_proj = records["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q_proj, QuantizedTensor)
    assert q_proj.nested is not None
    assert q_proj.shape == (64, 64)
    import bitsandbytes.functional as bnbf

    for name, rec in records.items():
        if isinstance(rec, QuantizedTensor):
            weight = model.get_submodule(name.removesuffix(".weight")).weight
            theirs = bnbf.dequantize_4bit(weight.data, weight.quant_state)
            assert torch.equal(theirs.view(torch.int16), rec.dequantize().view(torch.int16)), name


def test_checkpoint_refuses_duplicates_and_wrong_weight_map(tmp_path: Path) -> None:
    infos, wm = _write_two_shards(tmp_path)
    write_index(tmp_path, infos, wm, PROV)
    with open_folder(tmp_path) as ckpt:
        assert sorted(ckpt.quantized) == ["layer1.weight", "layer2.weight"]
        assert sorted(ckpt.passthrough) == ["layer1.bias", "layer2.bias"]
    obj = json.loads((tmp_path / INDEX_NAME).read_text())
    obj["weight_map"]["layer1.bias"] = shard_name(2, 2)
    (tmp_path / INDEX_NAME).write_text(json.dumps(obj))
    with pytest.raises(BadIndex, match=r"'layer1\.bias' is mapped to 'model-00002-of-00002\.safetensors'"):
        open_folder(tmp_path)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(infos[0].path.read_bytes())
    with pytest.raises(DuplicateTensor, match="is also in"):
        open_checkpoint([infos[0].path, copy])
