"""``load_quantized(verify=True)`` and the sha256 the index records of config.json and a copied
generation_config.json (``metadata.quantize_model.files``, docs/format.md section 6).

An edit after the conversion may be legitimate (rope scaling, generation defaults): one warning naming
the file and pointing at ``quantize-model verify``, and the folder loads as it is. An edit that leaves a
config the shards do not fit still fails, naming the tensor and that config.json was edited. Silent:
an untouched folder, ``verify=False``, and an index written before the digests were recorded.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from converter import load_quantized
from converter.loader.model_build import ModelBuildError
from converter.loader.replace import CheckpointMismatchError
from converter.loader.state import ChecksumMismatchError
from formats.index import INDEX_NAME, edited_files, read_index

EDITED = "after the conversion wrote"


def _copy(our_folder: Path, dst: Path, edit: Callable[[dict], object] | None = None) -> Path:
    shutil.copytree(our_folder, dst)
    if edit is not None:
        config = json.loads((dst / "config.json").read_text())
        edit(config)
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def _rope(config: dict) -> None:
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}


def _load(folder: Path, **kwargs) -> tuple[object, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_quantized(folder, **kwargs)
    return model, [w for w in caught if EDITED in str(w.message)]


@pytest.mark.parametrize("verify", [True, "sha256"])
def test_an_edited_config_warns_once_naming_it_and_loads(
    our_folder: Path, tmp_path: Path, verify: bool | str
) -> None:
    folder = _copy(our_folder, tmp_path / "rope", _rope)
    model, edits = _load(folder, verify=verify)
    assert len(edits) == 1
    message = str(edits[0].message)
    assert f"{folder}: config.json was changed {EDITED} it" in message
    assert f"`quantize-model verify {folder}` reports the details" in message
    assert "generation_config.json" not in message
    assert edits[0].filename == __file__  # the caller's line, past load_quantized's timing wrapper
    assert model.config.rope_scaling["factor"] == 2.0  # loaded as it is now


def test_both_edited_files_are_named_in_one_warning(our_folder: Path, tmp_path: Path) -> None:
    folder = _copy(our_folder, tmp_path / "both", _rope)
    assert (folder / "generation_config.json").is_file()
    assert "generation_config.json" in (read_index(folder).file_digests or {})
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["temperature"] = 0.3
    (folder / "generation_config.json").write_text(json.dumps(generation))
    assert edited_files(read_index(folder)) == ["config.json", "generation_config.json"]
    model, edits = _load(folder)
    assert len(edits) == 1
    assert "config.json and generation_config.json were changed" in str(edits[0].message)
    assert model.generation_config.temperature == 0.3


def test_silent_when_untouched_unverified_or_written_before_the_digests(
    our_folder: Path, tmp_path: Path
) -> None:
    assert edited_files(read_index(our_folder)) == []
    assert _load(our_folder)[1] == []
    edited = _copy(our_folder, tmp_path / "rope", _rope)
    assert _load(edited, verify=False)[1] == []
    # an index written before the files' digests were recorded: nothing to compare with
    index = json.loads((edited / INDEX_NAME).read_text())
    del index["metadata"]["quantize_model"]["files"]
    (edited / INDEX_NAME).write_text(json.dumps(index, indent=2))
    assert read_index(edited).file_digests is None
    assert edited_files(read_index(edited)) == []
    assert _load(edited)[1] == []


@pytest.mark.parametrize(
    ("edit", "error", "tensor"),
    [
        (lambda c: c.update(num_hidden_layers=3), ModelBuildError, "model.layers.2.self_attn.q_proj.weight"),
        (lambda c: c.update(num_hidden_layers=1), CheckpointMismatchError, "model.layers.1.mlp.down_proj"),
        (lambda c: c.update(intermediate_size=128), CheckpointMismatchError, "model.layers.0.mlp.down_proj"),
    ],
    ids=["more-layers", "fewer-layers", "intermediate-size"],
)
def test_an_edit_the_shards_do_not_fit_fails_naming_config_json_and_the_tensor(
    our_folder: Path, tmp_path: Path, edit: Callable[[dict], object], error: type, tensor: str
) -> None:
    folder = _copy(our_folder, tmp_path / "bad", edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(error) as info:
            load_quantized(folder)
    assert sum(EDITED in str(w.message) for w in caught) == 1
    message = str(info.value)
    assert tensor in message
    assert f"config.json was changed {EDITED} it" in message
    # without verify the error is the shards' own, with no word of an edit it did not check
    with pytest.raises(error) as info:
        load_quantized(folder, verify=False)
    assert tensor in str(info.value)
    assert EDITED not in str(info.value)


def test_a_damaged_shard_is_named_before_an_edited_config(our_folder: Path, tmp_path: Path) -> None:
    folder = _copy(our_folder, tmp_path / "both", lambda c: c.update(num_hidden_layers=1))
    shard = sorted(folder.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ChecksumMismatchError) as info:
            load_quantized(folder)
    assert shard.name in str(info.value)
    assert EDITED not in str(info.value)


def test_a_removed_generation_config_is_named_a_missing_config_is_the_loads_own_error(
    our_folder: Path, tmp_path: Path
) -> None:
    folder = _copy(our_folder, tmp_path / "no-generation")
    (folder / "generation_config.json").unlink()
    _, edits = _load(folder)
    assert len(edits) == 1
    assert f"{folder}: generation_config.json was changed or removed after the conversion" in str(
        edits[0].message
    )
    (folder / "config.json").unlink()
    assert edited_files(read_index(folder), skip_missing=("config.json",)) == ["generation_config.json"]
    with pytest.raises(ModelBuildError, match=r"no config\.json") as info:
        load_quantized(folder)
    assert EDITED not in str(info.value)
