"""quantize-model verify / inspect on folders that are not what they should be: written by another tool,
a config.json transformers would load wrongly, an unfinished conversion, a shard the index does not
list."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from converter.cli import cli


def test_verify_names_a_folder_it_did_not_write(bnb_nf4: Path, our_folder: Path, tmp_path: Path) -> None:
    """`verify` on a folder transformers + bitsandbytes saved (no index, no digests) says it is not ours
    and cannot be verified, instead of advising to reconvert it; one of ours that lost its index is told
    to reconvert."""
    import shutil

    result = CliRunner().invoke(cli, ["verify", str(bnb_nf4)])
    assert result.exit_code == 1
    assert "not a folder quantize-model wrote" in result.output
    assert "reconvert" not in result.output
    ours = tmp_path / "ours"
    shutil.copytree(our_folder, ours)
    (ours / "model.safetensors.index.json").unlink()
    result = CliRunner().invoke(cli, ["verify", str(ours)])
    assert result.exit_code == 1
    assert "missing; reconvert the folder" in result.output


def _qc(**changes):
    return lambda config: config["quantization_config"].update(changes)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda config: config.pop("quantization_config"), "no quantization_config"),
        (
            _qc(llm_int8_skip_modules=["lm_head", "layers.0.mlp.up_proj"]),
            "llm_int8_skip_modules keeps 'model.layers.0.mlp.up_proj.weight'",
        ),
        (_qc(bnb_4bit_quant_type="fp4"), "bnb_4bit_quant_type is 'fp4'"),
        (None, "config.json: missing"),
    ],
)
def test_verify_checks_that_transformers_would_load_the_folder(
    our_folder: Path, tmp_path: Path, edit, expected: str
) -> None:
    """A config.json that transformers + bitsandbytes would load wrongly (or not at all) fails `verify`:
    the shards alone passing is not enough for a CI gate."""
    import shutil

    folder = tmp_path / "f"
    shutil.copytree(our_folder, folder)
    assert CliRunner().invoke(cli, ["verify", str(folder)]).exit_code == 0
    if edit is None:
        (folder / "config.json").unlink()
    else:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["verify", str(folder)])
    assert result.exit_code == 1
    assert expected in result.output


def test_verify_and_inspect_say_a_conversion_killed_in_its_first_shard_did_not_finish(
    our_folder: Path, tmp_path: Path
) -> None:
    """A folder holding only the manifest of an unfinished conversion: `verify` exits 1 saying so (it was
    a usage error about missing shards) and advises resuming, not reconverting; `inspect` warns."""
    folder = tmp_path / "killed"
    folder.mkdir()
    manifest = json.loads((our_folder / ".quantize-model-manifest.json").read_text())
    manifest["state"] = "in_progress"
    (folder / ".quantize-model-manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["verify", str(folder)])
    assert result.exit_code == 1
    assert "the conversion did not finish; rerun the same convert command to resume" in result.output
    assert "reconvert" not in result.output
    result = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert result.exit_code == 0
    assert "the conversion did not finish" in result.output


def test_verify_reports_a_shard_the_index_does_not_list(our_folder: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "f"
    shutil.copytree(our_folder, folder)
    shutil.copy(sorted(folder.glob("*.safetensors"))[0], folder / "extra.safetensors")
    result = CliRunner().invoke(cli, ["verify", str(folder)])
    assert result.exit_code == 1
    assert "extra.safetensors: a shard the index does not list" in result.output


def _copy_with_index(our_folder: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(our_folder, dst)
    path = dst / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    return dst


def _flip_a_byte(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))


def test_an_index_stripped_of_its_digests_fails_verify_and_a_verified_load(
    our_folder: Path, tmp_path: Path
) -> None:
    """Deleting ``metadata.quantize_model`` (the digests) from our index made the folder look like one
    transformers wrote: a flipped byte then passed `verify` and `load_quantized_state(verify=True)`."""
    from converter import load_quantized_state
    from converter.loader.state import ChecksumMismatchError

    for edit in (lambda i: i["metadata"].pop("quantize_model"), lambda i: i.update(metadata=None)):
        folder = _copy_with_index(our_folder, tmp_path / f"f{len(list(tmp_path.iterdir()))}", edit)
        _flip_a_byte(sorted(folder.glob("*.safetensors"))[0])
        result = CliRunner().invoke(cli, ["verify", str(folder)])
        assert result.exit_code == 1
        assert "records no digests, but the shards were written by quantize-model" in result.output
        with pytest.raises(ChecksumMismatchError, match="records no digests, but model-00001-of-"):
            load_quantized_state(folder)
        load_quantized_state(folder, verify=False)  # the user's explicit opt-out still loads
    single = tmp_path / "no-index"
    import shutil

    shutil.copytree(our_folder, single)
    for shard in sorted(single.glob("*.safetensors"))[1:]:
        shard.unlink()
    (single / "model.safetensors.index.json").unlink()
    with pytest.raises(ChecksumMismatchError, match=re.escape("model.safetensors.index.json: is missing")):
        load_quantized_state(single)


def test_verify_checks_the_whole_file_sha256_beside_the_chunk_digests(
    our_folder: Path, tmp_path: Path
) -> None:
    """An index whose whole-file sha256 disagrees with the file passed `verify` while its chunk digests
    matched (sha256sum-style checkers read the whole-file one); badly typed entries are refused."""
    first = "model-00001-of-"

    def wrong_sha(index: dict) -> None:
        shards = index["metadata"]["quantize_model"]["shards"]
        name = next(n for n in shards if n.startswith(first))
        shards[name]["sha256"] = "0" * 64

    folder = _copy_with_index(our_folder, tmp_path / "sha", wrong_sha)
    result = CliRunner().invoke(cli, ["verify", str(folder)])
    assert result.exit_code == 1
    assert f"{first}" in result.output
    assert f"sha256 {'0' * 64}" not in result.output  # the computed digest is shown, then the index's
    assert f"index says {'0' * 64}" in result.output

    def typed(field: str, value):
        def edit(index: dict) -> None:
            shards = index["metadata"]["quantize_model"]["shards"]
            entry = shards[next(n for n in shards if n.startswith(first))]
            entry[field] = value(entry[field])

        return edit

    for field, value in (("size", str), ("sha256", str.upper)):
        folder = _copy_with_index(our_folder, tmp_path / f"{field}", typed(field, value))
        result = CliRunner().invoke(cli, ["verify", str(folder)])
        assert result.exit_code != 0
        assert "'sha256' must be 64 lowercase hex digits and 'size' a byte count" in result.output


@pytest.mark.parametrize("verify", [True, False])
def test_a_conversion_killed_after_its_first_shard_is_not_loaded(
    our_folder: Path, tmp_path: Path, verify: bool
) -> None:
    """A conversion killed once its first shard was renamed into place leaves that one shard and the
    manifest, no index: it was taken as a single-file checkpoint, so `load_quantized_state(verify=False)`
    returned that shard's tensors as the whole model and `dequantize --no-verify` wrote them out as a
    model.safetensors; with verify it was refused as a folder "changed" after the fact. Every load now
    says the conversion did not finish."""
    from converter.errors import InputError
    from converter.loader.state import load_quantized_state

    folder = tmp_path / "killed"
    folder.mkdir()
    manifest = json.loads((our_folder / ".quantize-model-manifest.json").read_text())
    manifest["state"] = "in_progress"
    first = sorted(manifest["shards"])[0]
    manifest["shards"] = {first: manifest["shards"][first]}
    (folder / ".quantize-model-manifest.json").write_text(json.dumps(manifest))
    (folder / first).write_bytes((our_folder / first).read_bytes())
    said = f"{folder}: the conversion did not finish; rerun the same convert command to resume"
    with pytest.raises(InputError, match=re.escape(said)):
        load_quantized_state(folder, verify=verify)
    out = tmp_path / "dequantized"
    args = ["dequantize", str(folder), str(out), *([] if verify else ["--no-verify"])]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert said in result.output
    assert not out.exists() or not any(out.iterdir())


def test_verify_notes_that_a_sharded_save_pretrained_was_not_hashed(our_folder: Path, tmp_path: Path) -> None:
    """A sharded `save_pretrained` (transformers' index: a weight_map, no digests, no metadata of ours)
    has nothing to hash against: verify said "OK: N shard(s), ... verified" without a word. It still
    passes (its structure is checked; tests/cli/test_inspect_verify.py reshards one), with a note saying
    the contents were not verified (`notes` in --json)."""
    import torch

    from converter import load_quantized

    saved = tmp_path / "saved"
    load_quantized(our_folder, dtype=torch.bfloat16).save_pretrained(saved, max_shard_size="60KB")
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded: the index is transformers' own
    result = CliRunner().invoke(cli, ["verify", str(saved), "--json"])
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["notes"]
    assert notes == [
        f"{saved / 'model.safetensors.index.json'} records no digests (a save_pretrained's index, not a "
        "folder quantize-model wrote): the shards' structure was checked, their contents could not be "
        "verified"
    ]
    # our own folder: digests checked, no such note
    assert json.loads(CliRunner().invoke(cli, ["verify", str(our_folder), "--json"]).stdout)["notes"] == []
