"""End-to-end conversion of small generated checkpoints through converter.convert()."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import swap_data_keeping_stat

from converter.errors import InputError, OutputExistsError, UnsupportedTensorError
from converter.writer.manifest import MANIFEST_NAME
from converter.writer.pipeline import convert
from formats import metadata


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_hashes(folder: Path) -> dict[str, str]:
    """Every deterministic output file (the report holds timings and is left out)."""
    return {
        p.name: sha(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "quantization_report.json"
    }


def test_single_shard_folder(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = convert(tiny_llama, out, progress=False)
    assert r.shards == ["model.safetensors"]
    # 2 layers x 7 projections quantized; embed, norms and lm_head (the output head) kept.
    assert (r.tensors_quantized, r.tensors_kept) == (14, 7)
    assert r.skipped_modules == ["lm_head"]
    assert not r.resumed
    assert not r.noop
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        MANIFEST_NAME,
        "LICENSE",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "quantization_report.json",
        "tokenizer_config.json",
    ]
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (q["bnb_4bit_quant_type"], q["bnb_4bit_use_double_quant"], q["llm_int8_skip_modules"]) == (
        "nf4",
        True,
        ["lm_head"],
    )
    assert q["bnb_4bit_compute_dtype"] == "bfloat16"
    assert json.loads((out / MANIFEST_NAME).read_text())["state"] == "complete"
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["summary"]["tensors_quantized"] == 14
    assert "seconds_total" in report["timings"]


def test_every_shard_validates_and_index_covers_every_key(tiny_llama_sharded: Path, tmp_path: Path) -> None:
    from formats.validate import validate_file

    out = tmp_path / "out"
    r = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert len(r.shards) > 1
    assert r.shards == [
        f"model-{k:05d}-of-{len(r.shards):05d}.safetensors" for k in range(1, len(r.shards) + 1)
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    keys = {}
    for shard in r.shards:
        path = out / shard
        with path.open("rb") as f:
            validate_file(path, f, path.stat().st_size)
        with safe_open(str(path), "pt") as f:
            metadata.validate_metadata(f.metadata(), file=shard)
            keys.update(dict.fromkeys(f.keys(), shard))
    assert index["weight_map"] == keys


@pytest.mark.parametrize("max_shard_size", ["5GB", "40KB"])
def test_loads_with_transformers_and_bitsandbytes(
    tiny_llama: Path, tmp_path: Path, max_shard_size: str
) -> None:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    r = convert(tiny_llama, out, max_shard_size=max_shard_size, progress=False)
    assert (len(r.shards) == 1) == (max_shard_size == "5GB")
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    quantized_modules = {
        n.removesuffix(".weight") for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
    }
    report = json.loads((out / "quantization_report.json").read_text())
    ours = {t["name"].removesuffix(".weight") for t in report["tensors"] if t["action"] == "quantize"}
    assert quantized_modules == ours
    assert len(ours) == r.tensors_quantized
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        got, want = model(ids).logits.float(), ref(ids).logits.float()
    # NF4 of a random tiny model: logits stay close to the bf16 original. A quality threshold covering
    # the 4-bit quantization error (identical bytes on every CPU); CPU rounding differences are ~1e-3
    # of a bf16 logit at most, far inside the margin.
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.98


def test_deterministic_across_runs_and_threads(tiny_llama_sharded: Path, tmp_path: Path) -> None:
    a = convert(tiny_llama_sharded, tmp_path / "a", max_shard_size="40KB", threads=1, progress=False)
    b = convert(tiny_llama_sharded, tmp_path / "b", max_shard_size="40KB", threads=2, progress=False)
    assert a.shards == b.shards
    assert output_hashes(tmp_path / "a") == output_hashes(tmp_path / "b")


def test_rerun_is_a_noop(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(tiny_llama, out, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = convert(tiny_llama, out, progress=False)
    assert r.noop
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_rerun_after_the_source_config_or_tokenizer_changed_rewrites_them(
    tiny_llama_sharded: Path, tmp_path: Path
) -> None:
    """config.json and the copied files are not in the plan's fingerprint: after an edit of the source's
    config.json or tokenizer file a rerun said "already converted with the same source and options;
    nothing to do" (and a batch "up-to-date") and kept the old files. It now rewrites them, reusing the
    shards untouched, and ends with the files a fresh conversion writes."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_llama_sharded, src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    out = tmp_path / "out"
    convert(src, out, max_shard_size="40KB", progress=False)
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    config = json.loads((src / "config.json").read_text())
    config["eos_token_id"] = 7
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (out / ".git").mkdir()  # put there since the conversion (a checkout to push from): kept

    pre = convert(src, out, max_shard_size="40KB", progress=False, dry_run=True).preflight
    assert not pre.up_to_date  # what batch decides "up-to-date" by
    with pytest.warns(
        UserWarning, match=r"config\.json, tokenizer_config\.json: not what this conversion writes"
    ):
        r = convert(src, out, max_shard_size="40KB", progress=False)
    assert not r.noop
    assert r.shards_reused == len(shards)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == shards
    assert (out / ".git").is_dir()
    (out / ".git").rmdir()
    fresh = tmp_path / "fresh"
    convert(src, fresh, max_shard_size="40KB", progress=False)
    assert output_hashes(out) == output_hashes(fresh)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 7
    assert convert(src, out, max_shard_size="40KB", progress=False).noop


def test_sentence_transformers_module_weights_are_copied(tiny_llama: Path, tmp_path: Path) -> None:
    """A sentence-transformers model with a Dense module (LaBSE, sentence-t5, distiluse: modules.json
    names 2_Dense, whose config.json and model.safetensors sentence-transformers loads it from) lost
    2_Dense/model.safetensors: only the module folders' JSON files were copied, so the output's Dense
    module could not be loaded. Its weights are copied as they are (never quantized, never read as the
    model's), by convert and by dequantize of the output; verify passes and a rerun does nothing."""
    from safetensors.torch import save_file

    from converter.loader.dequantize import dequantize_checkpoint
    from converter.tools.inspection import verify_path

    src = shutil.copytree(tiny_llama, tmp_path / "src")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (src / "modules.json").write_text(json.dumps(modules))
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 64}')
    (src / "2_Dense").mkdir()
    (src / "2_Dense" / "config.json").write_text('{"in_features": 64, "out_features": 32, "bias": true}')
    torch.manual_seed(0)
    dense = {"linear.weight": torch.randn(32, 64), "linear.bias": torch.randn(32)}
    save_file(dense, str(src / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    first = convert(src, out, progress=False)
    for rel in ("modules.json", "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert first.tensors_quantized > 0
    assert "linear.weight" not in json.loads((out / "quantization_report.json").read_text())["tensors"]
    assert verify_path(out).ok
    assert convert(src, out, progress=False).noop
    plain = tmp_path / "plain"
    dequantize_checkpoint(out, plain)
    assert (plain / "2_Dense" / "model.safetensors").read_bytes() == (
        src / "2_Dense" / "model.safetensors"
    ).read_bytes()


def test_rerun_after_a_copied_file_was_deleted_from_the_source_removes_it(
    tiny_llama_sharded: Path, tmp_path: Path
) -> None:
    """A copied file (tokenizer, README, a module folder's config) deleted from the source since a
    finished conversion stayed in the output on rerun ("nothing to do"; batch: up to date), though a
    fresh run no longer writes it. As for a copied file edited in the source, the rerun now removes it
    (warning), the shards kept, ending with what a fresh conversion writes; the user's files stay."""
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_sharded, src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (src / "README.md").write_text("# tiny\n")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("{}")
    out = tmp_path / "out"
    convert(src, out, max_shard_size="40KB", progress=False)
    assert (out / "README.md").is_file()
    assert (out / "1_Pooling" / "config.json").is_file()
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    (src / "README.md").unlink()
    (src / "1_Pooling" / "config.json").unlink()
    (out / "notes.txt").write_text("mine")  # the user's: kept

    pre = convert(src, out, max_shard_size="40KB", progress=False, dry_run=True).preflight
    assert not pre.up_to_date
    with pytest.warns(UserWarning, match=r"1_Pooling/config\.json, README\.md: gone from the source"):
        r = convert(src, out, max_shard_size="40KB", progress=False)
    assert not r.noop
    assert r.shards_reused == len(shards)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == shards
    assert not (out / "README.md").exists()
    assert not (out / "1_Pooling").exists()  # left empty: removed
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    fresh = tmp_path / "fresh"
    convert(src, fresh, max_shard_size="40KB", progress=False)
    assert output_hashes(out) == output_hashes(fresh)
    assert convert(src, out, max_shard_size="40KB", progress=False).noop


@pytest.mark.parametrize("damage", ["truncated", "edited", "deleted report", "damaged report"])
def test_rerun_into_a_finished_folder_with_a_damaged_index_or_no_report_rewrites_them(
    tiny_llama_sharded: Path, tmp_path: Path, damage: str
) -> None:
    """A finished folder whose index was cut short or edited (`verify` fails on it and says to
    reconvert) or whose quantization_report.json was deleted or damaged (not JSON: `verify --against`
    then has no statistics to compare): the rerun said "already converted ...; nothing to do" and left
    it so; --overwrite was the only way out. The index and the report are now checked as config.json
    is: rewritten, the shards kept, ending with what a fresh run writes."""
    from converter.tools.inspection import verify_path

    out = tmp_path / "out"
    convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    index = out / "model.safetensors.index.json"
    text = index.read_text()
    if damage == "truncated":
        index.write_text(text[: len(text) // 2])
    elif damage == "edited":
        index.write_text(text.replace('"total_size": ', '"total_size": 1', 1))
    elif damage == "damaged report":
        report = out / "quantization_report.json"
        report.write_text(report.read_text()[:100])
    else:
        (out / "quantization_report.json").unlink()
    name = "quantization_report.json" if damage.endswith("report") else "model.safetensors.index.json"
    with pytest.warns(UserWarning, match=rf"{name}: not what this conversion writes"):
        r = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    assert not r.noop
    assert r.refreshed  # a finished folder: not an interrupted conversion resumed
    assert r.shards_reused == len(shards)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == shards
    assert (out / "quantization_report.json").is_file()
    assert verify_path(out).ok
    fresh = tmp_path / "fresh"
    convert(tiny_llama_sharded, fresh, max_shard_size="40KB", progress=False)
    assert output_hashes(out) == output_hashes(fresh)
    assert convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False).noop


def test_different_options_refused_then_overwritten(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(tiny_llama, out, progress=False)
    with pytest.raises(OutputExistsError) as exc:
        convert(tiny_llama, out, quant_type="fp4", progress=False)
    assert str(exc.value) == (
        f"{out.resolve()}: holds a conversion with different options or a different source (option "
        "quant_type: 'nf4' -> 'fp4'); choose an empty folder or pass --overwrite"
    )
    r = convert(tiny_llama, out, quant_type="fp4", overwrite=True, progress=False)
    assert not r.noop
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "fp4"


@pytest.mark.parametrize(("first", "then"), [("int8", "nf4"), ("nf4", "int8")])
def test_a_rerun_with_another_method_names_the_quant_type(
    tiny_llama: Path, tmp_path: Path, first: str, then: str
) -> None:
    """A rerun with --quant-type int8 over a 4-bit folder (or back) was refused naming an option the
    user never gave ("option blocksize: None -> 64", the first of the method's own options in
    alphabetical order) instead of the one they changed: the quant type comes first."""
    out = tmp_path / "out"
    convert(tiny_llama, out, quant_type=first, progress=False)
    with pytest.raises(OutputExistsError, match=rf"\(option quant_type: '{first}' -> '{then}'\); choose"):
        convert(tiny_llama, out, quant_type=then, progress=False)


def test_refused_rerun_names_what_changed(tiny_llama_sharded: Path, tmp_path: Path) -> None:
    """A rerun refused because the options or the source changed since the first run said only
    "different options or a different source": it now names the first difference."""
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_sharded, src)
    out = tmp_path / "out"
    convert(src, out, max_shard_size="40KB", progress=False)
    with pytest.raises(OutputExistsError, match=r"\(option max_shard_size: 40000 -> 30000\); choose"):
        convert(src, out, max_shard_size="30KB", progress=False)
    pre = convert(src, out, max_shard_size="30KB", progress=False, dry_run=True).preflight
    assert pre.refused is not None
    assert "(option max_shard_size: 40000 -> 30000)" in pre.refused
    shard = src / "model-00002-of-00004.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    msg = r"\(source file model-00002-of-00004.safetensors changed: modification time\); choose"
    with pytest.raises(OutputExistsError, match=msg):
        convert(src, out, max_shard_size="40KB", progress=False)


def test_a_source_shard_swapped_for_same_size_and_header_with_its_mtime_restored_is_detected(
    tiny_llama_sharded: Path, tmp_path: Path
) -> None:
    """A local source is identified by each weight file's size, mtime and header. A shard replaced by
    another of the same size and header (the same model fine-tuned: other values, same shapes) whose
    mtime was restored (`cp -p`, `rsync -t`, `touch -r`) passed for the same source: the rerun said
    "nothing to do" over shards made from the old weights. Sampled data windows of each file are now
    part of its identity, so the rerun is refused, naming the file."""

    src = tmp_path / "src"
    shutil.copytree(tiny_llama_sharded, src)
    out = tmp_path / "out"
    convert(src, out, max_shard_size="40KB", progress=False)
    shard = src / "model-00002-of-00004.safetensors"
    swap_data_keeping_stat(shard)
    msg = r"\(source file model-00002-of-00004.safetensors changed: sampled data\); choose"
    with pytest.raises(OutputExistsError, match=msg):
        convert(src, out, max_shard_size="40KB", progress=False)


def test_a_folder_converted_before_sampled_data_identified_the_source_is_still_up_to_date(
    tiny_llama_sharded: Path, tmp_path: Path
) -> None:
    """Its manifest's plan has no sample_sha256 (and its fingerprint is of that plan): the rerun does
    nothing, as before, instead of refusing the folder as converted from another source."""
    out = tmp_path / "out"
    convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False)
    data = json.loads((out / MANIFEST_NAME).read_text())
    for f in data["plan"]["source"]["files"].values():
        del f["sample_sha256"]
    blob = json.dumps(data["plan"], sort_keys=True, separators=(",", ":"))
    data["fingerprint"] = hashlib.sha256(blob.encode()).hexdigest()  # Plan.fingerprint of that plan
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    assert convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False).noop
    pre = convert(tiny_llama_sharded, out, max_shard_size="40KB", progress=False, dry_run=True).preflight
    assert pre.refused is None
    assert pre.up_to_date  # batch's test; and no disk needed


def test_foreign_output_folder_refused(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError) as exc:
        convert(tiny_llama, out, progress=False)
    assert exc.value.exit_code == 2
    assert str(exc.value) == (
        f"{out.resolve()}: holds files quantize-model did not write (notes.txt); "
        "choose an empty folder or pass --overwrite"
    )
    assert (out / "notes.txt").read_text() == "mine"


def test_output_inside_source_refused(tiny_llama: Path, tmp_path: Path) -> None:
    src = shutil.copytree(tiny_llama, tmp_path / "src")
    with pytest.raises(OutputExistsError, match="contains the source"):
        convert(src, src.parent, overwrite=True, progress=False)
    assert (src / "model.safetensors").exists()


def test_output_folder_inside_the_source_refused_before_reading_it(tiny_llama: Path, tmp_path: Path) -> None:
    """convert(SRC, SRC/sub) wrote the output inside the source folder; refused (exit 2) before the
    source is read or the output created, naming both folders."""
    src = shutil.copytree(tiny_llama, tmp_path / "src")
    with pytest.raises(OutputExistsError) as exc:
        convert(src, src / "sub" / "nf4", progress=False, dry_run=True)
    assert exc.value.exit_code == 2
    assert str(exc.value) == (
        f"{src / 'sub' / 'nf4'}: the output folder is inside the source folder {src}; "
        "choose another output folder"
    )
    assert not (src / "sub").exists()


def test_dtype_cast_and_compute_dtype(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(tiny_llama, out, dtype="float16", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "float16"
    assert cfg["quantization_config"]["bnb_4bit_compute_dtype"] == "float16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.uint8
        qs = bytes(f.get_tensor("model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4").tolist())
    assert json.loads(qs)["dtype"] == "float16"


def _as_dtype(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """A copy of the checkpoint folder with every float tensor stored as ``dtype``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
    return dst


def _assert_same_tensors(one: Path, other: Path) -> None:
    """The two folders' model.safetensors hold the same tensors, bit for bit."""
    with (
        safe_open(str(one / "model.safetensors"), "pt") as a,
        safe_open(str(other / "model.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_float64_weights_are_quantized_after_a_dtype_cast(tiny_llama: Path, tmp_path: Path) -> None:
    f64 = _as_dtype(tiny_llama, tmp_path / "f64", torch.float64)
    f32 = _as_dtype(tiny_llama, tmp_path / "f32", torch.float32)
    # With --dtype float32 the float64 weights are selected as transformers would load them (float32),
    # cast, and quantized: the same output as converting the float32 checkpoint.
    r = convert(f64, tmp_path / "out64", dtype="float32", progress=False)
    assert (r.tensors_quantized, r.tensors_kept) == (14, 7)
    convert(f32, tmp_path / "out32", dtype="float32", progress=False)
    # (the shards' metadata differ: it records the source dtype and files)
    _assert_same_tensors(tmp_path / "out64", tmp_path / "out32")
    # Without --dtype they get the dtype transformers loads the model in, config.json's (bfloat16), as
    # transformers + bitsandbytes casts and quantizes them: the bf16 checkpoint's tensors (they were
    # refused, 'pass --dtype float32', which gave another model than transformers loads).
    assert json.loads((f64 / "config.json").read_text())["dtype"] == "bfloat16"
    convert(f64, tmp_path / "auto64", progress=False)
    convert(tiny_llama, tmp_path / "bf16", progress=False)
    _assert_same_tensors(tmp_path / "auto64", tmp_path / "bf16")
    # A config.json without a dtype: transformers would build the model in float64 (the first float
    # tensor's dtype), which bitsandbytes cannot quantize: refused before writing, saying how to cast.
    config = json.loads((f64 / "config.json").read_text())
    del config["dtype"]
    (f64 / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        InputError, match=r"dtype F64 is not float32/float16/bfloat16\); pass --dtype float32"
    ):
        convert(f64, tmp_path / "keep", progress=False)
    assert not (tmp_path / "keep" / "model.safetensors").exists()


def test_fp4_without_nesting(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = convert(tiny_llama, out, quant_type="fp4", double_quant=False, blocksize=128, progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        absmax = f.get_tensor("model.layers.1.self_attn.o_proj.weight.absmax")
    assert "model.layers.1.self_attn.o_proj.weight.quant_state.bitsandbytes__fp4" in keys
    assert not any(k.endswith(".nested_absmax") for k in keys)
    assert absmax.dtype == torch.float32
    assert absmax.numel() == 64 * 64 // 128
    assert r.bits_per_param > 4


def test_matches_kernels_byte_for_byte(tiny_llama: Path, tmp_path: Path) -> None:
    from converter.kernels import bnb4bit as kernels
    from formats.quant_types import QuantType

    out = tmp_path / "out"
    convert(tiny_llama, out, double_quant=False, progress=False)
    name = "model.layers.0.mlp.gate_proj.weight"
    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as f:
        w = f.get_tensor(name)
    packed, absmax = kernels.quantize_4bit(w, blocksize=64, quant_type=QuantType.NF4)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor(name).reshape(-1), packed)
        assert torch.equal(f.get_tensor(name + ".absmax"), absmax)


def test_nothing_to_quantize(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^nothing to quantize: .*; check --include/--skip"):
        convert(tiny_llama, tmp_path / "out", include=["no.such.module"], progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("include", "example", "hint"),
    [
        # the experts the glob names are kept by --moe-experts keep: say so, not the head's reason
        (
            "*experts*",
            "'model.layers.0.mlp.experts.0.down_proj.weight': fused MoE experts",
            "routed MoE experts stay 16-bit with --moe-experts keep (the default); pass "
            "--moe-experts quantize",
        ),
        ("*.mlp.gate", "'model.layers.0.mlp.gate.weight': router", "check --include/--skip"),
        ("lm_head", "'lm_head.weight': lm_head (output embedding)", "check --include/--skip"),
        # globs naming no 2-D weight: one of their tensors (it was the head, which they do not name)
        ("*norm*", "'model.layers.0.input_layernorm.weight': ", "check --include/--skip"),
    ],
)
def test_nothing_to_quantize_names_a_weight_the_include_matched(
    include: str, example: str, hint: str, tiny_checkpoint, tmp_path: Path
) -> None:
    """The example of "nothing to quantize" is one of the weights --include named (it was the first 2-D
    weight, the head, whatever the globs: '--include *experts*' of a MoE model was told about lm_head)."""
    with pytest.raises(InputError) as info:
        convert(tiny_checkpoint("qwen3_moe"), tmp_path / "out", include=[include], progress=False)
    msg = str(info.value)
    assert msg.startswith("nothing to quantize: ")
    assert f"(e.g. {example}" in msg
    assert msg.endswith(hint + ("" if "pass" in hint else ", or the checkpoint's dtype"))
    assert not (tmp_path / "out").exists()


def test_nothing_to_quantize_of_int_linear_weights_names_one_and_its_dtype(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A checkpoint whose linear weights are all int32 was told 'e.g. lm_head.weight: lm_head (output
    embedding)', the head every model keeps, not why its linears were not quantized."""
    from safetensors.torch import load_file, save_file

    src = shutil.copytree(tiny_llama, tmp_path / "int32")
    tensors = {k: (v.float() * 100).to(torch.int32) for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError) as info:
        convert(src, tmp_path / "out", progress=False)
    assert str(info.value) == (
        "nothing to quantize: no tensor is a float32/float16/bfloat16 linear weight selected for "
        "quantization (e.g. 'model.layers.0.mlp.down_proj.weight': dtype I32 is not "
        "float32/float16/bfloat16); check --include/--skip, or the checkpoint's dtype"
    )
    assert not (tmp_path / "out").exists()


def _tied_copy(src: Path, dst: Path, store_head: bool) -> Path:
    """The tiny Llama with tie_word_embeddings, its lm_head stored as a copy of the embedding or not."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(dst / "model.safetensors")
    if store_head:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    else:
        del tensors["lm_head.weight"]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_nothing_to_quantize_names_the_tied_head_the_include_named(
    tiny_llama: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """`--include lm_head` of a checkpoint that stores a tied lm_head beside the embedding, with its values:
    the example was 'model.embed_tokens.weight': not nn.Linear (Embedding), a tensor the user did not name,
    after a warning that lm_head would be "written once" by a run that writes nothing. It names the head
    now."""
    src = _tied_copy(tiny_llama, tmp_path / "tied", store_head=True)
    with pytest.raises(InputError) as info:
        convert(src, tmp_path / "out", include=["lm_head"], progress=False)
    msg = str(info.value)
    assert "(e.g. 'lm_head.weight': lm_head (output embedding))" in msg, msg
    assert "embed_tokens" not in msg
    assert not [w for w in recwarn if "written once" in str(w.message)]
    assert not (tmp_path / "out").exists()


def test_include_of_a_head_the_checkpoint_ties_away_suggests_no_glob_that_matches_nothing(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A tied lm_head the checkpoint does not store: `--include lm_head` matches nothing, and the warning
    said "did you mean 'lm_head.*'?", which matches nothing either (its 'lm_head.' was taken for a
    base-model prefix, leaving '*'). It suggests nothing now, and names a tensor that exists."""
    src = _tied_copy(tiny_llama, tmp_path / "tied", store_head=False)
    told: list[str] = []
    with pytest.raises(InputError, match=r"^nothing to quantize"):
        convert(src, tmp_path / "out", include=["lm_head"], progress=False, warn=told.append)
    (note,) = [t for t in told if t.startswith("--include 'lm_head'")]
    assert "matches no tensor or module of the checkpoint" in note
    assert "did you mean" not in note, note


def test_a_glob_that_matches_nothing_is_named_with_the_glob_that_would(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """fnmatch matches whole dotted names: '--skip down_proj' (as transformers' llm_int8_skip_modules
    is written) kept nothing 16-bit and said nothing, every down_proj quantized. Each glob that matches
    no tensor or module (either spelling of the base-model prefix) is a warning, with the glob meant."""
    told: list[str] = []
    result = convert(
        tiny_llama,
        tmp_path / "out",
        skip=["down_proj", "*.up_proj", "nothing*"],
        include=["model.layers.*", "q_proj", "layers.1.*"],
        progress=False,
        warn=told.append,
    )
    unmatched = [m for m in told if "matches no tensor or module" in m]
    assert len(unmatched) == 3
    assert unmatched[0] == (
        "--skip 'down_proj' matches no tensor or module of the checkpoint, so it keeps nothing 16-bit: "
        "globs match whole dotted names such as 'model.layers.0.mlp.down_proj'; did you mean '*.down_proj'?"
    )
    assert unmatched[1].startswith("--skip 'nothing*' matches no tensor or module of the checkpoint, so ")
    assert "did you mean" not in unmatched[1]
    assert unmatched[2] == (
        "--include 'q_proj' matches no tensor or module of the checkpoint, so it selects nothing: globs "
        "match whole dotted names such as 'model.layers.0.self_attn.q_proj'; did you mean '*.q_proj'?"
    )
    assert all(m in result.notes for m in unmatched)  # kept in the result too


def test_a_glob_naming_a_parent_module_or_a_wildcard_prefix_is_warned(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """The selection matches a weight's own names (the key and its module), never a parent's: '--skip
    model.layers.0' and '--skip *.model.layers.*' (no name has a component before 'model') kept nothing
    16-bit, and said nothing, because the check also took parent modules and stripped the glob's '*.'."""
    told: list[str] = []
    result = convert(
        tiny_llama,
        tmp_path / "out",
        skip=["model.layers.0", "*.model.layers.*", "model.layers.1.*"],
        progress=False,
        dry_run=True,
        warn=told.append,
    )
    kept_by_glob = {t["name"] for t in result.preflight.tensors if "--skip" in t["reason"]}
    assert kept_by_glob
    assert all("model.layers.1." in n for n in kept_by_glob)  # the other two kept nothing
    unmatched = [m for m in told if "matches no tensor or module" in m]
    assert unmatched == [
        "--skip 'model.layers.0' matches no tensor or module of the checkpoint, so it keeps nothing 16-bit: "
        "globs match whole dotted names such as 'model.layers.0.input_layernorm'; did you mean "
        "'model.layers.0.*'?",
        "--skip '*.model.layers.*' matches no tensor or module of the checkpoint, so it keeps nothing "
        "16-bit: globs match whole dotted names such as 'model.layers.0.input_layernorm'; did you mean "
        "'model.layers.*'?",
    ]


def test_too_many_elements_refused_from_the_plan(tmp_path: Path) -> None:
    from qm_checkpoints import write_safetensors_header

    src = tmp_path / "big"
    src.mkdir()
    n = 2**31  # 4 GiB of bf16 as a sparse hole: refused before any byte is read
    write_safetensors_header(
        src / "model.safetensors",
        {"layer.weight": {"dtype": "BF16", "shape": [65536, 32768], "data_offsets": [0, 2 * n]}},
        2 * n,
    )
    with pytest.raises(UnsupportedTensorError) as exc:
        convert(src, tmp_path / "out", include=["layer"], progress=False)
    assert str(exc.value) == (
        "tensor 'layer.weight' in model.safetensors has 2147483648 elements (shape [65536, 32768]): "
        "bitsandbytes indexes with 32-bit ints, so tensors of 2^31 elements or more cannot be stored; "
        "pass --skip 'layer' to keep it unquantized"
    )
    assert not (tmp_path / "out").exists()


def test_unquantizable_shape_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "odd"
    src.mkdir()
    save_file({"layer.weight": torch.randn(6, 5)}, src / "model.safetensors")
    with pytest.raises(UnsupportedTensorError) as exc:
        convert(src, tmp_path / "out", include=["layer"], quant_storage="float32", progress=False)
    assert str(exc.value) == (
        "model.safetensors: tensor 'layer.weight': 15 packed bytes are not a whole number of float32 items "
        "(4 bytes); use quant_storage 'uint8'"
    )


def test_non_finite_weight_named(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from converter.errors import NonFiniteTensorError

    src = shutil.copytree(tiny_llama, tmp_path / "src")
    state = load_file(src / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"][3, 7] = float("nan")
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(NonFiniteTensorError) as exc:
        convert(src, out, progress=False)
    assert str(exc.value) == (
        "tensor 'model.layers.1.mlp.down_proj.weight' in model.safetensors holds NaN or Inf: it cannot be "
        "quantized; fix the checkpoint or pass --skip 'model.layers.1.mlp.down_proj'"
    )
    # Nothing that looks complete: no shard under its final name, no config, no index.
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]


def test_local_pickle_with_allow_pickle_matches_safetensors(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder / "config.json")
    torch.save(load_file(tiny_llama / "model.safetensors"), folder / "pytorch_model.bin")
    convert(folder, tmp_path / "a", allow_pickle=True, progress=False)
    convert(tiny_llama, tmp_path / "b", progress=False)
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as fa:
        with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as fb:
            assert set(fa.keys()) == set(fb.keys())
            for key in fa.keys():
                assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key


def test_second_writer_into_the_same_folder_refused(tiny_llama: Path, tmp_path: Path) -> None:
    from converter.writer.manifest import FolderLock

    out = tmp_path / "out"
    out.mkdir()
    with FolderLock(out), pytest.raises(OutputExistsError) as exc:
        convert(tiny_llama, out, progress=False)
    assert str(exc.value) == (
        f"{out}: another quantize-model process is writing this folder; wait for it to finish"
    )
    assert exc.value.exit_code == 75  # transient (EX_TEMPFAIL): the same command works later
    assert list(out.iterdir()) == []
    convert(tiny_llama, out, progress=False)  # the lock is gone with its holder


def test_outputs_hold_no_local_paths(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(tiny_llama, out, progress=False)
    for name in ("quantization_report.json", "model.safetensors.index.json", "config.json"):
        text = (out / name).read_text()
        assert str(tiny_llama) not in text, name
        assert str(tmp_path) not in text, name
    assert str(tiny_llama).encode() not in (out / "model.safetensors").read_bytes()


def test_rerun_rewrites_a_deleted_config(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(tiny_llama, out, progress=False)
    before = output_hashes(out)
    (out / "config.json").unlink()
    r = convert(tiny_llama, out, progress=False)
    assert r.resumed
    assert r.shards_reused == 1
    assert output_hashes(out) == before


def test_a_string_skip_or_include_is_one_pattern(tiny_llama: Path, tmp_path: Path) -> None:
    """The Python API takes ``include="*q_proj*"`` as one glob (it used to be split into its letters:
    every weight quantized, or "nothing to quantize" for ``skip="*mlp*"``)."""
    r = convert(tiny_llama, tmp_path / "inc", include="*q_proj*", progress=False)
    assert r.tensors_quantized == 2  # one q_proj per layer
    r = convert(tiny_llama, tmp_path / "skip", skip="*mlp*", progress=False)
    assert r.tensors_quantized == 14 - 6  # the 3 MLP projections of each of the 2 layers kept


def test_bad_threads_and_an_output_under_a_file_are_input_errors(tiny_llama: Path, tmp_path: Path) -> None:
    """Both refused before anything is written (threads=0 was a ValueError after the manifest; an output
    under a file was an OS error, exit 1)."""
    with pytest.raises(InputError, match="threads=0"):
        convert(tiny_llama, tmp_path / "t", threads=0, progress=False)
    assert not (tmp_path / "t").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        convert(tiny_llama, tmp_path / "afile" / "sub", progress=False)


def test_more_threads_than_the_kernels_run_are_refused_naming_the_limit(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernels' C++ thread pool runs at most 256 threads (kMaxThreads) and capped a larger count without
    a word: --threads 300 ran 256. Every entry point refuses it naming the limit, before anything is
    written; 256 itself converts, byte-equal to the default; the default on a host of more CPUs is 256."""
    from click.testing import CliRunner

    from converter import _kernels
    from converter.cli import cli
    from converter.kernels import MAX_THREADS, bnb4bit, bnb4bit_np
    from converter.tools.plan_file import load_plan

    limit = "257 threads: the kernels run at most 256 threads (the limit of their thread pool); give 1 to 256"
    assert MAX_THREADS == 256
    with pytest.raises(InputError) as err:
        convert(tiny_llama, tmp_path / "api", threads=257, progress=False)
    assert str(err.value) == f"threads=257: {limit}, or None for every core"
    assert not (tmp_path / "api").exists()
    r = CliRunner().invoke(cli, ["convert", str(tiny_llama), str(tmp_path / "cli"), "--threads", "257"])
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '--threads': {limit}, or leave it out for one per CPU" in r.output
    assert not (tmp_path / "cli").exists()
    with pytest.raises(ValueError, match=re.escape(f"{limit}, or None (one per CPU)")):
        bnb4bit_np.threads_arg(257)
    plan = tmp_path / "plan.toml"
    plan.write_text('[[job]]\nsource = "org/m"\nthreads = 257\n')
    with pytest.raises(InputError, match=re.escape(f"plan.toml:3: job 1: key 'threads': {limit}")):
        load_plan(plan)
    convert(tiny_llama, tmp_path / "max", threads=MAX_THREADS, progress=False)
    convert(tiny_llama, tmp_path / "default", progress=False)
    for name in ("model.safetensors", "model.safetensors.index.json"):
        assert (tmp_path / "max" / name).read_bytes() == (tmp_path / "default" / name).read_bytes()
    monkeypatch.setattr(_kernels, "default_threads", lambda: 384)  # a 384-CPU host runs 256 by default
    assert bnb4bit_np.cpu_backend_info()["threads"] == MAX_THREADS
    assert bnb4bit.available_backends()["cpu"]["threads"] == MAX_THREADS


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("double_quant", "no", "double_quant='no': pass True or False"),
        ("overwrite", "false", "overwrite='false': pass True or False"),
        ("blocksize", 64.5, "blocksize 64.5 is not supported"),
        ("blocksize", True, "blocksize True is not supported"),
        ("quant_type", None, "quant_type None is not supported"),
        ("max_shard_size", 1.5, "invalid size 1.5"),
        ("device", 0, "--device 0 is not supported"),
        ("skip", [1], "skip=[1]: give glob strings"),
    ],
)
def test_python_api_option_of_the_wrong_type_is_an_input_error(
    tiny_llama: Path, tmp_path: Path, option: str, value: object, message: str
) -> None:
    """convert()'s options from Python are checked as the CLI's are: double_quant='no' wrote nested
    records (a truthy string), blocksize=64.5 was truncated to 64, and None / numbers where strings go
    raised TypeError or AttributeError (python-api.md: bad input raises an InputError)."""
    with pytest.raises(InputError, match=re.escape(message)):
        convert(tiny_llama, tmp_path / "out", progress=False, **{option: value})
    assert not (tmp_path / "out").exists()


def test_python_api_skip_and_include_none_mean_none(tiny_llama: Path, tmp_path: Path) -> None:
    import numpy as np

    r = convert(tiny_llama, tmp_path / "out", skip=None, include=None, progress=False)
    assert r.tensors_quantized == 14
    # numpy integers and booleans are numbers and booleans
    r = convert(
        tiny_llama,
        tmp_path / "np",
        blocksize=np.int64(64),
        max_shard_size=np.int64(5 * 10**9),
        double_quant=np.bool_(True),
        progress=False,
    )
    assert output_hashes(tmp_path / "np") == output_hashes(tmp_path / "out")


def test_config_field_transformers_refuses_is_an_input_error(tiny_llama: Path, tmp_path: Path) -> None:
    """A config.json field of the wrong type ("num_hidden_layers": "two") failed with 'unexpected
    StrictDataclassFieldValidationError', exit 1; it is an input error naming config.json and the field."""
    src = shutil.copytree(tiny_llama, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = "two"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as info:
        convert(src, tmp_path / "out", progress=False)
    assert info.value.exit_code == 2
    assert str(info.value).startswith("config.json: transformers cannot read it (")
    assert "num_hidden_layers" in str(info.value)
    assert str(info.value).endswith("; fix the config")
    assert not (tmp_path / "out").exists()


def test_config_architectures_as_a_string_is_read_as_one_name(tiny_llama: Path, tmp_path: Path) -> None:
    """ "architectures": "LlamaForCausalLM" (a string, not a list; transformers keeps it as given) was
    read letter by letter, so the model class came from the keys instead (a BERT folder so written was
    refused: 'nothing to quantize'); it is the class of that name, as in a list."""
    src = shutil.copytree(tiny_llama, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = "LlamaModel"  # a base model: its keys are not the checkpoint's
    (src / "config.json").write_text(json.dumps(config))
    listed = shutil.copytree(src, tmp_path / "listed")
    config["architectures"] = ["LlamaModel"]
    (listed / "config.json").write_text(json.dumps(config))
    a = convert(src, tmp_path / "a", progress=False, dry_run=True).preflight
    b = convert(listed, tmp_path / "b", progress=False, dry_run=True).preflight
    assert [(t["name"], t["action"], t["reason"]) for t in a.tensors] == [
        (t["name"], t["action"], t["reason"]) for t in b.tensors
    ]


@pytest.mark.parametrize("architectures", [[None], 5, [None, "LlamaForCausalLM"], {"a": 1}])
def test_config_architectures_that_name_no_class_convert_as_transformers_loads_them(
    tiny_llama: Path, tmp_path: Path, architectures: object
) -> None:
    """config.json's "architectures" holding no class name ([null], a number: transformers' config keeps
    it and loads the model by its model_type) raised "unexpected TypeError: attribute name must be
    string" / "object of type 'int' has no len()", exit 1; such entries name nothing, and the string
    entries beside them are used: the same tensors quantized as with no "architectures" (or the name)."""
    src = shutil.copytree(tiny_llama, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = architectures
    (src / "config.json").write_text(json.dumps(config))
    named = shutil.copytree(src, tmp_path / "named")
    config["architectures"] = ["LlamaForCausalLM"]
    (named / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file

    a = convert(src, tmp_path / "a", progress=False)
    b = convert(named, tmp_path / "b", progress=False)
    assert a.tensors_quantized == b.tensors_quantized > 0
    got, want = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    qc = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in "ab"]
    assert qc[0] == qc[1]


def test_source_shard_replaced_during_the_conversion_leaves_it_unfinished(
    tiny_llama_sharded: Path, tmp_path: Path
) -> None:
    """A source shard replaced while the conversion runs (a re-download or sync into the same folder)
    was read new where the earlier shards had been read old: the folder ended complete, `verify` passed,
    and its weights mixed two checkpoints. The run now fails before the index and config.json, so the
    folder stays unfinished, and a rerun is refused as another source until --overwrite."""
    from safetensors.torch import load_file, save_file

    from converter.errors import ConversionFailedError

    src = tmp_path / "src"
    shutil.copytree(tiny_llama_sharded, src)
    last = sorted(src.glob("model-*.safetensors"))[-1]
    replaced = []

    def replace_last_shard(name: str, done: int) -> None:
        if not replaced:  # after the first tensor: the last file is not read yet
            tensors = {k: v + 1 for k, v in load_file(last).items()}
            save_file(tensors, tmp_path / "new.safetensors", metadata={"format": "pt"})
            (tmp_path / "new.safetensors").replace(last)
            replaced.append(name)

    out = tmp_path / "out"
    with pytest.raises(ConversionFailedError, match=rf"{last.name}: changed while it was being converted"):
        convert(src, out, max_shard_size="40KB", progress=replace_last_shard)
    assert replaced
    assert not (out / "config.json").exists()
    assert not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / MANIFEST_NAME).read_text())["state"] == "in_progress"
    with pytest.raises(OutputExistsError, match="a different source"):
        convert(src, out, max_shard_size="40KB", progress=False)
    convert(src, out, max_shard_size="40KB", progress=False, overwrite=True)
    fresh = tmp_path / "fresh"
    convert(src, fresh, max_shard_size="40KB", progress=False)
    assert output_hashes(out) == output_hashes(fresh)


@pytest.mark.parametrize(("dtype", "value"), [("bfloat16", 3.4e38), ("float16", 99840.0)])
def test_cast_overflow_refused_by_name_and_cause(tmp_path: Path, dtype: str, value: float) -> None:
    """A finite fp32 value past --dtype's range becomes Inf in the cast: 4-bit refuses it (bitsandbytes
    stores an inf absmax that decodes to NaN: the block, or with nested absmax the whole tensor), but
    the error said the checkpoint holds NaN or Inf, which it does not; it names the cast and the fixes."""
    from safetensors.torch import save_file

    from converter.errors import NonFiniteTensorError

    src = tmp_path / "src"
    src.mkdir()
    w = torch.randn(8, 64)
    w[2, 3] = value
    save_file({"layer.weight": w}, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteTensorError) as exc:
        convert(src, tmp_path / "out", include=["layer"], dtype=dtype, progress=False)
    largest = "3.4e+38" if dtype == "bfloat16" else "9.984e+04"
    assert str(exc.value) == (
        f"tensor 'layer.weight' in model.safetensors holds a value past {dtype}'s range (|w| up to "
        f"{largest}), which --dtype {dtype} turns into Inf: 4-bit quantization cannot store it (bitsandbytes "
        "writes an inf absmax that loads as NaN); convert without --dtype (or with --dtype float32), or "
        "pass --skip 'layer'"
    )


def test_cast_overflow_of_config_dtype_names_that_cast(tiny_llama: Path, tmp_path: Path) -> None:
    """Without --dtype, a bf16 weight of 99840 in a checkpoint whose config.json says float16 is cast to
    float16 (the dtype transformers loads it in) and refused; the error blamed '--dtype float16', which
    was not given, and said to 'convert without --dtype', which is what the user did."""
    from safetensors.torch import load_file, save_file

    from converter.errors import NonFiniteTensorError

    src = shutil.copytree(tiny_llama, tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name][2, 3] = 99840.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "float16"
    (src / "config.json").write_text(json.dumps(config))
    # a kept tensor so cast is written Inf, with a warning that names the same cast and fix
    norm = "model.layers.0.input_layernorm.weight"
    tensors[norm][5] = 70016.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    told: list[str] = []
    with pytest.raises(NonFiniteTensorError) as exc:
        convert(src, tmp_path / "out", progress=False, warn=told.append)
    assert [m for m in told if "range" in m] == [
        f"tensor {norm!r} in model.safetensors holds 1 value(s) past float16's range (|w| up to 7.014e+04), "
        "which the cast to config.json's dtype float16 (the one transformers loads the model in) turns into "
        "Inf, written as such (transformers' cast does the same): the model computes Inf/NaN from it; "
        "convert with --dtype float32"
    ]
    assert str(exc.value) == (
        f"tensor {name!r} in model.safetensors holds a value past float16's range (|w| up to "
        "9.984e+04), which the cast to config.json's dtype float16 (the one transformers loads the model "
        "in) turns into Inf: 4-bit quantization cannot store it (bitsandbytes writes an inf absmax that "
        "loads as NaN); convert with --dtype float32, or pass --skip 'model.layers.0.self_attn.q_proj'"
    )


@pytest.mark.parametrize(("dtype", "value"), [("bfloat16", 3.4e38), ("float16", 99840.0)])
def test_cast_overflow_in_a_kept_tensor_is_named(tmp_path: Path, dtype: str, value: float) -> None:
    """A kept tensor (an embedding, a norm) with a finite value past --dtype's range is written as the
    cast makes it, Inf, as transformers' cast does; the run warns naming it (it was silent: only the
    report's nonfinite_kept counted it, verify passed and the model computed NaN). In range: no word."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    norm = torch.ones(64)
    norm[5] = value
    tensors = {"layer.weight": torch.randn(8, 64), "norm.weight": norm, "ok.weight": torch.ones(64)}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    told: list[str] = []
    result = convert(src, tmp_path / "out", include=["layer"], dtype=dtype, progress=False, warn=told.append)
    largest = "3.4e+38" if dtype == "bfloat16" else "9.984e+04"
    note = (
        f"tensor 'norm.weight' in model.safetensors holds 1 value(s) past {dtype}'s range (|w| up to "
        f"{largest}), which the cast to {dtype} turns into Inf, written as such (transformers' cast does the "
        "same): the model computes Inf/NaN from it; convert with --dtype float32, or without --dtype where "
        "the checkpoint's own dtype holds it"
    )
    assert [m for m in told if "range" in m] == [note]
    assert note in result.notes
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert torch.isinf(f.get_tensor("norm.weight")[5])  # as transformers' cast makes it
    assert result.quality["kept_with_nonfinite"] == ["norm.weight"]


def test_a_source_without_config_is_named_and_a_peft_adapter_is_said_to_be_one(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """`convert ./my-adapter out` (a PEFT adapter folder: adapter_config.json, adapter_model.safetensors)
    said "the source has no config.json, so the layers transformers would quantize cannot be known; add
    the model's config.json ...": no path named, and the advice does not apply to an adapter."""
    plain = tmp_path / "no-config"
    plain.mkdir()
    shutil.copy(tiny_llama / "model.safetensors", plain / "model.safetensors")
    with pytest.raises(InputError) as info:
        convert(plain, tmp_path / "out", progress=False)
    assert str(info.value) == (
        f"{plain}: no config.json, so the layers transformers would quantize cannot be known; add the "
        "model's config.json, or name the weights to quantize with --include globs"
    )
    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    shutil.copy(tiny_llama / "model.safetensors", adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/base"})
    )
    with pytest.raises(InputError) as info:
        convert(adapter, tmp_path / "out", progress=False)
    assert str(info.value) == (
        f"{adapter}: a PEFT adapter (adapter_config.json), not a model: convert its base model (org/base) "
        "and load the adapter on the loaded model (PeftModel.from_pretrained)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_isfinite_is_torch_isfinite(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The cast's overflow check runs isfinite a chunk at a time (its |x| and masks were tensor-sized:
    the preflight's peak memory counts one chunk); chunks that split rows give torch's mask."""
    from converter.writer import pipeline

    monkeypatch.setattr(pipeline, "ISFINITE_CHUNK", 7)
    x = torch.randn(5, 11).to(dtype)
    x[0, 3], x[2, 6], x[4, 10], x[3, 0] = float("inf"), float("-inf"), float("nan"), float("inf")
    got = pipeline._isfinite(x)
    assert got.shape == x.shape
    assert torch.equal(got, torch.isfinite(x))
