from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from qm_checkpoints import write_safetensors_header
from safetensors.torch import save_file

from converter.errors import (
    AlreadyQuantizedError,
    CorruptFileError,
    PickleOnlyError,
    SourceNotFoundError,
)
from converter.sources import looks_like_repo_id, open_source
from converter.sources.local import LocalSource, MappedFile


def test_single_file_folder(tiny_llama: Path) -> None:
    src = open_source(tiny_llama)
    assert isinstance(src, LocalSource)
    assert src.weight_files() == ["model.safetensors"]
    names = [t.name for t in src.tensors()]
    assert "model.layers.0.self_attn.q_proj.weight" in names
    q = next(t for t in src.tensors() if t.name == "model.layers.0.self_attn.q_proj.weight")
    assert (q.dtype, q.shape, q.file) == ("BF16", (64, 64), "model.safetensors")
    assert src.config()["model_type"] == "llama"
    assert src.extra_files() == ["LICENSE", "generation_config.json", "tokenizer_config.json"]
    d = src.describe()
    assert d["kind"] == "local"
    assert set(d["files"]) == {"model.safetensors"}


def test_sharded_folder_lists_every_tensor_once(tiny_llama: Path, tiny_llama_sharded: Path) -> None:
    single = {t.name: t for t in open_source(tiny_llama).tensors()}
    src = open_source(tiny_llama_sharded)
    assert len(src.weight_files()) > 2
    sharded = src.tensors()
    assert {t.name for t in sharded} == set(single)
    assert len(sharded) == len(single)
    # Processing order follows the files, then the data offsets inside each file.
    files = [t.file for t in sharded]
    assert files == sorted(files)


def test_single_safetensors_file(tiny_llama: Path) -> None:
    src = open_source(tiny_llama / "model.safetensors")
    assert src.weight_files() == ["model.safetensors"]
    assert src.config() is not None


def test_mapped_file_reads_without_copy(tiny_llama: Path) -> None:
    from safetensors import safe_open

    f = MappedFile(tiny_llama / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as ref:
        want = ref.get_tensor(name)
    got = f.get(name)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_missing_path() -> None:
    with pytest.raises(
        SourceNotFoundError, match=r"^\./nope/model: no such file or folder, and not a Hub repo id"
    ):
        open_source("./nope/model")


def test_repo_id_shapes() -> None:
    assert looks_like_repo_id("meta-llama/Llama-3.2-1B")
    assert looks_like_repo_id("gpt2")
    assert not looks_like_repo_id("./model")
    assert not looks_like_repo_id("a/b/c")
    assert not looks_like_repo_id("a--b/c")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_shard(tiny_llama_sharded: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_sharded, tmp_path / "m")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(SourceNotFoundError) as exc:
        open_source(folder)
    assert str(exc.value) == (
        f"{victim}: missing (named by model.safetensors.index.json); download the missing shard"
    )


def test_index_entry_not_in_its_shard(tiny_llama_sharded: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_sharded, tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00004.safetensors"
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.ghost.weight"] = first
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CorruptFileError, match=r"tensor 'model.ghost.weight' is mapped to .* but in no shard"
    ):
        open_source(folder)


def test_shard_tensor_missing_from_the_index(tiny_llama_sharded: Path, tmp_path: Path) -> None:
    """The reverse: a tensor in a shard that the weight_map leaves out (transformers would not load it;
    the output looked complete and could not be loaded) is refused, naming it."""
    folder = _copy(tiny_llama_sharded, tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.mlp.gate_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CorruptFileError,
        match=r"tensor 'model.layers.0.mlp.gate_proj.weight' is in .* but not in the weight_map",
    ):
        open_source(folder)


def test_truncated_file(tiny_llama: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama, tmp_path / "m")
    path = folder / "model.safetensors"
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(CorruptFileError) as exc:
        open_source(folder)
    assert str(exc.value) == (
        f"{path}: not a valid safetensors file (incomplete metadata, file not fully covered); "
        "re-download or re-save it"
    )


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"this is not a safetensors file at all" * 4)
    with pytest.raises(
        CorruptFileError, match=r"model.safetensors: not a valid safetensors file \(header too large\)"
    ):
        open_source(path)


def test_corrupt_config(tiny_llama: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match=r"config.json: not valid JSON"):
        open_source(folder)


def test_already_quantized_by_config(tiny_llama: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AlreadyQuantizedError) as exc:
        open_source(folder)
    assert str(exc.value) == (
        f"{folder}: already quantized (its config.json has a quantization_config "
        "(quant_method 'bitsandbytes')); convert the original checkpoint instead"
    )


def test_already_quantized_by_tensors(tmp_path: Path) -> None:
    save_file(
        {"w": torch.zeros(8, 1, dtype=torch.uint8), "w.absmax": torch.ones(1)},
        tmp_path / "model.safetensors",
    )
    with pytest.raises(AlreadyQuantizedError, match=r"tensor 'w' is packed U8 with an absmax sibling"):
        open_source(tmp_path)


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({"l.weight": torch.zeros(4, 4, dtype=torch.int8), "l.weight_scale": torch.ones(4, 1)},
         r"tensor 'l.weight' is I8 with a scale beside it \('l.weight_scale'\)"),
        ({"l.qweight": torch.zeros(4, 4, dtype=torch.int32), "l.scales": torch.ones(1, 4)},
         r"tensor 'l.qweight' is I32 packed weights \(GPTQ / AWQ\)"),
    ],
    ids=["int8-with-scale", "gptq"],
)  # fmt: skip
def test_integer_weights_with_scales_refused(tmp_path: Path, tensors: dict, reason: str) -> None:
    """Quantized checkpoints that lost their quantization_config: kept as they are, the integer codes
    would be read as numbers by any loader (the folder looked converted)."""
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(AlreadyQuantizedError, match=reason):
        open_source(tmp_path)


def test_integer_weight_without_scale_is_a_plain_tensor(tmp_path: Path) -> None:
    save_file(
        {"ids.weight": torch.zeros(4, 4, dtype=torch.int64), "l.weight": torch.ones(4, 4)},
        tmp_path / "model.safetensors",
    )
    assert {t.name for t in open_source(tmp_path).tensors()} == {"ids.weight", "l.weight"}


def test_fp8_source_refused(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, tmp_path / "model.safetensors")
    with pytest.raises(AlreadyQuantizedError, match=r"tensor 'w' is F8_E4M3"):
        open_source(tmp_path)


def test_pickle_only(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleOnlyError) as exc:
        open_source(tmp_path)
    assert str(exc.value) == (
        f"{tmp_path}: only pickle weights (pytorch_model.bin); quantize-model reads safetensors: "
        "re-save the model with transformers' save_pretrained(folder) "
        "(safetensors: its only format in 5.x, the default since 4.35), "
        "or pass --allow-pickle if you trust the files"
    )


def test_allow_pickle_reads_weights_only_and_cleans_up(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(tiny_llama / "model.safetensors")
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder / "config.json")
    torch.save(state, folder / "pytorch_model.bin")
    src = open_source(folder, allow_pickle=True)
    assert src.weight_files() == ["pytorch_model.safetensors"]
    assert {t.name for t in src.tensors()} == set(state)
    path = src.acquire("pytorch_model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(MappedFile(path).get(name), state[name])
    assert src.describe()["pickle_files"] == ["pytorch_model.bin"]
    src.close()
    assert not path.exists()


def test_pickle_temp_folder_of_a_killed_run_is_removed_by_the_next(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temp safetensors made from pickle weights are a full-size copy of the checkpoint. A run
    SIGKILLed (or OOM-killed) before close() cannot delete them; the next --allow-pickle run does,
    and leaves the folder of a run still alive alone."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    from safetensors.torch import load_file

    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder / "config.json")
    torch.save(load_file(tiny_llama / "model.safetensors"), folder / "pytorch_model.bin")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    child = (
        "import os, signal, sys\n"
        "from converter.sources import open_source\n"
        "src = open_source(sys.argv[1], allow_pickle=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.run([sys.executable, "-c", child, str(folder)], env=env, check=False)
    assert proc.returncode == -signal.SIGKILL
    (stale,) = tmp.glob("quantize-model-pickle-*")
    assert (stale / "pytorch_model.safetensors").is_file()

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    live = open_source(folder, allow_pickle=True)
    assert not stale.exists()
    (live_dir,) = tmp.glob("quantize-model-pickle-*")
    other = open_source(folder, allow_pickle=True)  # the live run's folder stays
    assert live_dir.exists()
    assert len(list(tmp.glob("quantize-model-pickle-*"))) == 2
    other.close()
    live.close()
    assert list(tmp.glob("quantize-model-pickle-*")) == []


def test_pickle_that_is_not_weights_only(tmp_path: Path) -> None:
    import pickle

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(object()))
    with pytest.raises(
        CorruptFileError, match=r"pytorch_model.bin: cannot be loaded with torch.load\(weights_only=True\)"
    ):
        open_source(tmp_path, allow_pickle=True)


def test_sparse_header_only_file_is_readable(tmp_path: Path) -> None:
    # A header announcing 2**31 elements over a sparse hole: listing it reads no data.
    n = 2**31
    write_safetensors_header(
        tmp_path / "model.safetensors",
        {"big.weight": {"dtype": "U8", "shape": [2**16, 2**15], "data_offsets": [0, n]}},
        n,
    )
    (t,) = open_source(tmp_path).tensors()
    assert t.numel == n


@pytest.mark.parametrize(
    "name",
    [
        "spm.model",  # DeBERTa-v2/v3 (no tokenizer.json on the Hub)
        "normalizer.json",  # Whisper
        "source.spm",  # Marian
        "target.spm",
        "tekken.json",  # Mistral
        "video_preprocessor_config.json",  # Qwen2-VL and other video processors
        "sentencepiece.bpe.model",
        "modeling_custom.py",  # repository code named by auto_map
    ],
)
def test_tokenizer_and_processor_files_are_copied(name: str) -> None:
    """Every file transformers' tokenizers and processors read is copied beside the shards."""
    from converter.sources.base import is_extra_file

    assert is_extra_file(name)


def test_every_transformers_tokenizer_vocabulary_file_is_copied() -> None:
    """The file names of every tokenizer class transformers has (VOCAB_FILES_NAMES)."""
    import importlib
    import pkgutil

    import transformers.models

    from converter.sources.base import is_extra_file

    names: set[str] = set()
    for info in pkgutil.iter_modules(transformers.models.__path__):
        pkg = f"transformers.models.{info.name}"
        spec = importlib.util.find_spec(pkg)
        for mod in pkgutil.iter_modules(spec.submodule_search_locations or []):
            if mod.name.startswith("tokenization_") and not mod.name.endswith("_fast"):
                try:
                    module = importlib.import_module(f"{pkg}.{mod.name}")
                except Exception:  # an optional dependency it needs is not installed
                    continue
                vocab = getattr(module, "VOCAB_FILES_NAMES", None)
                if isinstance(vocab, dict):
                    names |= {v for v in vocab.values() if isinstance(v, str)}
    assert len(names) > 10
    assert sorted(n for n in names if not is_extra_file(n)) == []


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("quantization_config", "none", '"none", not an object'),
        ("quantization_config", [1], "[1], not an object"),
        ("model_type", ["llama"], '["llama"], not a string'),
    ],
)
def test_config_fields_of_the_wrong_json_type(tiny_llama: Path, tmp_path: Path, field, value, shown) -> None:
    """A quantization_config that is not an object, a model_type that is not a string: transformers cannot
    load such a config.json either; convert failed with "unexpected AttributeError: 'str' object has no
    attribute 'get'" / "TypeError: unhashable type: 'list'" (exit 1). The file and the field are named,
    exit 2."""
    from click.testing import CliRunner

    from converter.cli import cli

    folder = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptFileError) as exc:
        open_source(folder)
    assert str(exc.value) == f"{folder / 'config.json'}: {field} is {shown}; fix it"
    r = CliRunner().invoke(cli, ["convert", str(folder), str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert f"{field} is {shown}" in r.output
    assert "unexpected" not in r.output


def test_one_shard_of_a_sharded_checkpoint_as_source_is_warned(
    tiny_llama_sharded: Path, tmp_path: Path
) -> None:
    """SOURCE naming one shard of a sharded checkpoint (a tab completion too far) converted that shard
    alone under the whole model's config.json, silently: transformers loads the folder with the other
    weights randomly initialized (its log only warns) and verify passes. The run says so, naming the
    shard, the counts and the folder to pass; a single-file checkpoint gets no such warning."""
    from converter.writer.pipeline import convert

    index = json.loads((tiny_llama_sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    shard = tiny_llama_sharded / shards[1]
    mine = sum(1 for v in index.values() if v == shards[1])
    told: list[str] = []
    convert(shard, tmp_path / "out", progress=False, warn=told.append)
    want = (
        f"{shard}: one of the {len(shards)} shards model.safetensors.index.json names, converted alone: "
        f"the output holds {mine} of the model's {len(index)} tensors, and transformers loads the others "
        f"randomly initialized; to convert the whole model, pass the folder {tiny_llama_sharded}"
    )
    assert want in told
    single = _copy(tiny_llama_sharded, tmp_path / "single")
    (single / "model.safetensors.index.json").unlink()
    told.clear()
    convert(single / shards[1], tmp_path / "out2", progress=False, warn=told.append)
    assert not [m for m in told if "converted alone" in m]
