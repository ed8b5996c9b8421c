from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from tiny_models import resharded_as_transformers, without_config_digests


@pytest.fixture
def converted(qm, tiny_llama: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    assert qm("convert", tiny_llama, out, "-q", "--max-shard-size", "60KB").exit_code == 0
    return out


def test_inspect_json(qm, converted: Path) -> None:
    r = qm("inspect", converted, "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["tensors_quantized"] == 14
    assert data["tensors_kept"] == 7
    assert data["quant_types"] == {"nf4 blocksize 64 nested": 14}
    assert data["kept_dtypes"] == {"bfloat16": 7}
    assert data["source"] == "tiny-llama"
    # NF4 + nested absmax, blocksize 64: 4 + 8/64 + 32/(64*256) bits, plus the per-tensor tables.
    assert 4.127 < data["quantized_bits_per_param"] < 7
    assert data["quantization_config"]["llm_int8_skip_modules"] == ["lm_head"]


def test_inspect_one_shard_table(qm, converted: Path) -> None:
    shard = sorted(converted.glob("model-*.safetensors"))[0]
    r = qm("inspect", shard)
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0].split() == ["Path", str(shard)]


def test_verify_ok(qm, converted: Path) -> None:
    r = qm("verify", converted)
    assert r.exit_code == 0
    assert r.stdout.startswith("OK: ")
    assert r.stderr == ""


def test_verify_json_of_a_verified_folder_has_no_remedy(qm, converted: Path) -> None:
    """`verify --json` of a folder that verifies said "remedy": "reconvert with --overwrite": a CI script
    printing the remedy told the user to reconvert a good folder. No problem, no remedy."""
    r = qm("verify", converted, "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert (data["ok"], data["problems"], data["remedy"]) == (True, [], "")
    sorted(converted.glob("model-*.safetensors"))[0].unlink()
    data = json.loads(qm("verify", converted, "--json").stdout)
    assert (data["ok"], data["remedy"]) == (False, "reconvert with --overwrite")


def test_verify_quiet_prints_only_problems(qm, converted: Path) -> None:
    """verify had no -q, unlike convert, batch, push and dequantize: a CI step got the OK line."""
    r = qm("verify", converted, "-q")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "", "")
    sorted(converted.glob("model-*.safetensors"))[0].unlink()
    r = qm("verify", converted, "-q")
    assert r.exit_code == 1
    assert r.stdout == ""
    assert r.stderr.splitlines()[-1] == f"Error: {converted}: 1 problem(s) found; reconvert with --overwrite"


def test_verify_detects_a_flipped_byte(qm, converted: Path) -> None:
    shard = sorted(converted.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the packed codes: the shard still parses, only the hash differs
    shard.write_bytes(bytes(data))
    r = qm("verify", converted)
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    assert lines[0].startswith(f"Error: {shard}: sha256 ")
    assert lines[-1] == f"Error: {converted}: 1 problem(s) found; reconvert with --overwrite"


def test_verify_names_the_tensors_of_a_chunk_that_differs(
    qm, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tampered shard was named with a byte range only ("sha256 of chunk 3 (bytes 12288-16383) is
    ..."): which weight was damaged took a hex dump. The line names the tensors those bytes hold (and
    the header, when the range covers it)."""
    import struct

    from formats import chunks

    monkeypatch.setattr(chunks, "CHUNK_BYTES", 4096)  # several chunks in a tiny shard
    out = tmp_path / "out"
    assert qm("convert", tiny_llama, out, "-q").exit_code == 0
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    name = "model.layers.1.self_attn.o_proj.weight"
    begin, end = header[name]["data_offsets"]
    at = 8 + header_len + (begin + end) // 2
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))
    r = qm("verify", out, "--json")
    assert r.exit_code == 1
    (problem,) = json.loads(r.stdout)["problems"]
    k = at // 4096
    held = [  # in file order
        key
        for _, key in sorted(
            (e["data_offsets"][0], key)
            for key, e in header.items()
            if key != "__metadata__"
            and 8 + header_len + e["data_offsets"][0] < (k + 1) * 4096
            and 8 + header_len + e["data_offsets"][1] > k * 4096
        )
    ]
    assert name in held
    assert problem.startswith(f"{shard}: sha256 of chunk {k} (bytes {k * 4096}-{k * 4096 + 4095}) is ")
    shown = ", ".join(repr(h) for h in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
    assert problem.endswith(f"; chunk {k} holds {shown}")
    data[at] ^= 0x01
    data[20] ^= 0x01  # in the header's JSON: named as the header
    shard.write_bytes(bytes(data))
    problems = json.loads(qm("verify", out, "--json").stdout)["problems"]
    assert any("sha256 of chunk 0 " in p and p.endswith("; chunk 0 holds the header") for p in problems)


def test_verify_missing_shard(qm, converted: Path) -> None:
    shard = sorted(converted.glob("model-*.safetensors"))[0]
    shard.unlink()
    r = qm("verify", converted, "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["ok"] is False
    assert f"{shard}: missing" in data["problems"]


def test_inspect_of_a_folder_missing_a_shard_is_an_input_error_naming_it(qm, converted: Path) -> None:
    """inspect of a converted folder whose index names a shard that is gone failed with the OS error,
    exit 1 ("work failed": "No such file or directory; check the path and rerun"), where cli.md says a
    damaged converted folder given to inspect is exit 2, and `inspect --memory` and `dequantize` name
    the index and the missing shard."""
    shard = sorted(converted.glob("model-*.safetensors"))[1]
    shard.unlink()
    r = qm("inspect", converted, "--json")
    assert r.exit_code == 2
    error = json.loads(r.stdout)["error"]
    index = converted / "model.safetensors.index.json"
    assert error == f"{index}: shard file(s) missing: {shard.name}; re-run the conversion"
    assert json.loads(qm("inspect", converted, "--memory", "--json").stdout)["error"] == error


def test_verify_unfinished_conversion(qm, converted: Path) -> None:
    manifest = converted / ".quantize-model-manifest.json"
    m = json.loads(manifest.read_text())
    m["state"] = "in_progress"
    manifest.write_text(json.dumps(m))
    r = qm("verify", converted)
    assert r.exit_code == 1
    assert r.stderr.splitlines()[0] == (
        f"Error: {converted}: the conversion did not finish; rerun the same convert command to resume"
    )


@pytest.mark.parametrize("text", ['{"tool": "quantize-model", "finge', "[]\n"])
def test_damaged_manifest_gets_one_remedy_everywhere(
    qm, tiny_llama: Path, converted: Path, text: str
) -> None:
    """A cut-short manifest: verify and inspect said "rerun the same convert command to resume", which
    convert then refused ("holds files quantize-model did not write ... pass --overwrite"); a JSON list
    crashed both with an AttributeError. Every command now names the manifest and the one remedy."""
    manifest = converted / ".quantize-model-manifest.json"
    manifest.write_text(text)
    said = (
        f"{manifest}: damaged (not a readable quantize-model manifest), so the conversion cannot be "
        f"resumed; rerun the convert command with --overwrite to convert again"
    )
    r = qm("verify", converted)
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [
        f"Error: {said}",
        f"Error: {converted}: 1 problem(s) found; rerun the convert command with --overwrite",
    ]
    r = qm("inspect", converted)
    assert r.exit_code == 0
    assert r.stderr == f"Warning: {said}\n"
    again = ("convert", tiny_llama, converted, "-q", "--max-shard-size", "60KB")
    r = qm(*again)
    assert r.exit_code == 2
    assert r.stderr == f"Error: {said}\n"
    assert qm(*again, "--overwrite").exit_code == 0
    assert qm("verify", converted).exit_code == 0


def test_verify_detects_a_changed_total_size(qm, converted: Path) -> None:
    """An index whose metadata.total_size no longer matches the shards passed verify."""
    path = converted / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    right = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = right + 1
    path.write_text(json.dumps(index, indent=2))
    r = qm("verify", converted)
    assert r.exit_code == 1
    assert r.stderr.splitlines()[0] == (
        f"Error: {path}: metadata.total_size is {right + 1}, but the shards hold {right} bytes of "
        f"tensor data; the index was changed: reconvert the folder"
    )


def test_cut_short_index_is_named_as_the_index(qm, converted: Path, tmp_path: Path) -> None:
    """A cut-short index: verify, inspect and push called it "not a valid quantize-model shard";
    dequantize and inspect --memory said nothing about what to do."""
    path = converted / "model.safetensors.index.json"
    path.write_text('{"weight_map": {"a": ')
    said = (
        f"Error: {path}: not a JSON file (Expecting value: line 1 column 22 (char 21)); the index is "
        f"damaged: reconvert the folder or download it again\n"
    )
    r = qm("verify", converted)
    assert (r.exit_code, r.stderr) == (1, said)  # "verify found a problem"
    # a corrupt input: exit 2 from every other command (inspect gave 1, inspect --memory 2)
    for args in (["inspect", converted], ["inspect", "--memory", converted], ["inspect", "--json", converted],
                 ["dequantize", converted, tmp_path / "plain"]):  # fmt: skip
        r = qm(*args)
        assert (r.exit_code, r.stderr) == (2, said), args


@pytest.mark.parametrize("stage", ["before the index", "before config.json"])
def test_loading_an_unfinished_conversion_says_to_resume(
    qm, converted: Path, tmp_path: Path, stage: str
) -> None:
    """verify and inspect said "the conversion did not finish; rerun the same convert command to
    resume", while load_quantized, inspect --memory and dequantize said "no model.safetensors.index.json
    and no single *.safetensors file; not a checkpoint folder", or "no config.json; use
    load_quantized_state and replace_linear_layers instead"."""
    from converter import load_quantized
    from converter.errors import InputError

    manifest = converted / ".quantize-model-manifest.json"
    m = json.loads(manifest.read_text())
    m["state"] = "in_progress"
    manifest.write_text(json.dumps(m))
    (converted / "config.json").unlink()
    if stage == "before the index":
        (converted / "model.safetensors.index.json").unlink()
    said = f"{converted}: the conversion did not finish; rerun the same convert command to resume"
    with pytest.raises(InputError) as info:
        load_quantized(converted)
    assert str(info.value) == said
    commands = [["inspect", converted, "--memory"]]
    if stage == "before the index":  # with an index and every shard, dequantize has what it needs
        commands.append(["dequantize", converted, tmp_path / "plain"])
    for args in commands:
        r = qm(*args)
        assert (r.exit_code, r.stderr) == (2, f"Error: {said}\n"), args


def test_verify_against_another_model_is_one_line(qm, converted: Path, tmp_path: Path) -> None:
    """--against a checkpoint the folder was not made from gave one line per quantized tensor (14
    here, thousands for a real model), then "N problem(s) found; reconvert with --overwrite", though
    the folder is fine and the source is the wrong one."""
    from qm_checkpoints import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", hidden=32)
    r = qm("verify", converted, "--against", other)
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [
        f"Error: tensor 'model.layers.0.mlp.down_proj.weight' in model-00002-of-00003.safetensors: shape "
        f"[64, 128] but the source has [32, 64] (and 13 more); the folder was not converted from {other}",
        f"Error: {converted}: 1 problem(s) found; give --against the source this folder was converted from",
    ]


def test_verify_against_a_same_shaped_other_source_is_one_line(qm, converted: Path, tmp_path: Path) -> None:
    """--against a checkpoint of the same shapes (another seed) gave one "relative RMSE ... reconvert the
    folder" line per quantized tensor, though the folder is intact: the source is the wrong one."""
    from qm_checkpoints import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", seed=1)
    r = qm("verify", converted, "--against", other, "--json")
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(
        r"Error: tensor '[^']+' in model-\d+-of-\d+\.safetensors: relative RMSE [\d.]+ against the source, "
        r"but quantization_report\.json says [\d.]+ \(and 13 more\); the folder does not look converted "
        + re.escape(f"from {other}"),
        lines[0],
    ), lines[0]
    assert lines[1] == (
        f"Error: {converted}: 1 problem(s) found; give --against the source this folder was converted from"
    )
    assert json.loads(r.stdout)["quality"]["not_from_source"] is True


@pytest.mark.parametrize("report", ["missing", "damaged", "not a report"])
def test_verify_against_another_source_without_the_report_is_still_caught(
    qm, converted: Path, tiny_llama: Path, tmp_path: Path, report: str
) -> None:
    """Without a readable quantization_report.json (deleted, damaged, or a folder transformers +
    bitsandbytes saved, which has none) `verify --against` a same-shaped other source (another seed)
    said "OK ... verified" with exit 0 and not_from_source false, though every tensor's relative RMSE
    against it was ~1.4: more than the tensor itself, which no quantization of it can err by (zero is
    one of the codes). The folder's own source still verifies."""
    import shutil

    from qm_checkpoints import make_tiny_llama

    folder = tmp_path / "folder"
    shutil.copytree(converted, folder)
    if report == "missing":
        (folder / "quantization_report.json").unlink()
    else:  # cut short; or JSON that is no report (an AttributeError in verify before)
        (folder / "quantization_report.json").write_text("{bad" if report == "damaged" else "[1, 2]")
    other = make_tiny_llama(tmp_path / "other", seed=1)
    r = qm("verify", folder, "--against", other, "--json")
    assert r.exit_code == 1, r.output
    lines = r.stderr.splitlines()
    assert re.fullmatch(
        r"Error: tensor '[^']+' in model-\d+-of-\d+\.safetensors: relative RMSE [\d.]+ against the source, "
        r"more than the tensor itself \(quantization_report\.json has none to compare\) \(and 13 more\); "
        + re.escape(f"the folder does not look converted from {other}"),
        lines[0],
    ), lines[0]
    assert json.loads(r.stdout)["quality"]["not_from_source"] is True
    assert qm("verify", folder, "--against", tiny_llama).exit_code == 0


def test_inspect_memory_options_without_memory_are_refused(qm, converted: Path) -> None:
    """`inspect PATH --max-memory cpu=1GB` (--memory forgotten) printed the plain summary, the
    memory options silently ignored."""
    r = qm("inspect", converted, "--max-memory", "cpu=1GB")
    assert r.exit_code == 2
    assert (
        r.stderr.splitlines()[-1] == "Error: --max-memory applies to the memory estimate only: add --memory"
    )
    r = qm("inspect", converted, "--device-map", "cpu", "--dtype", "float16")
    assert r.exit_code == 2
    assert r.stderr.splitlines()[-1].endswith(
        "--device-map, --dtype apply to the memory estimate only: add --memory"
    )
    assert qm("inspect", converted, "--memory", "--max-memory", "cpu=1GB").exit_code == 0


def test_a_model_type_transformers_lacks_is_an_input_error_for_the_loader(
    qm, converted: Path, tmp_path: Path
) -> None:
    """A folder whose config.json names a model_type this transformers lacks (and no repository code
    for its config), or a field transformers refuses: `inspect --memory` and load_quantized failed with
    transformers' many-line error ("unexpected ValueError", exit 1), where convert says it in one line,
    exit 2."""
    import shutil

    import transformers

    from converter.loader.config_file import config_edit_note
    from converter.loader.model import load_quantized
    from converter.loader.model_build import ModelBuildError

    folder = tmp_path / "unknown"
    shutil.copytree(converted, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="not_a_model", architectures=["NotAModelForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    said = (
        f"{folder / 'config.json'}: model_type 'not_a_model' is not built into transformers "
        f"{transformers.__version__}, and no repository code (auto_map's AutoConfig) builds its config; "
        "upgrade transformers, or fix config.json"
    )
    r = qm("inspect", folder, "--memory")
    assert (r.exit_code, r.stderr.splitlines()) == (2, [f"Error: {said}"])
    with pytest.raises(ModelBuildError) as err:
        load_quantized(folder)
    # the index records config.json's sha256: the error says that it was edited since the conversion
    assert str(err.value) == f"{said}; {config_edit_note(['config.json'])}"
    assert "config.json was changed after the conversion wrote it" in str(err.value)
    # a field transformers refuses, as convert says it (it was "unexpected StrictDataclass...", exit 1)
    config.update(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers="two")
    (folder / "config.json").write_text(json.dumps(config))
    r = qm("inspect", folder, "--memory")
    assert r.exit_code == 2
    assert len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"Error: {folder / 'config.json'}: transformers cannot read it (")
    assert r.stderr.rstrip().endswith("); fix the config")


def test_inspect_memory_of_a_folder_with_repository_code_takes_trust_remote_code(
    qm, converted: Path, tmp_path: Path
) -> None:
    """A folder whose config.json names repository code (auto_map): `inspect --memory` had no way to run
    it (estimate() and load_quantized take trust_remote_code) and failed with exit 1, "unexpected
    ValueError", naming a Python argument. `--trust-remote-code` estimates it as the folder without that
    code (the same modules and bytes); without it the refusal names the flag, exit 2; without --memory the
    flag is a usage error, as the other estimate options."""
    import shutil

    from tiny_models import add_repository_code

    remote = tmp_path / "remote"
    shutil.copytree(converted, remote)
    add_repository_code(remote)
    r = qm("inspect", remote, "--memory", "--json", "--trust-remote-code")
    assert r.exit_code == 0, r.stderr
    want = qm("inspect", converted, "--memory", "--json")
    assert json.loads(r.stdout) == json.loads(want.stdout)
    r = qm("inspect", remote, "--memory")
    assert r.exit_code == 2
    assert r.stderr.splitlines()[-1] == (
        f"Error: {remote}: its config.json names repository code (auto_map), which the estimate runs to "
        "build the model; pass --trust-remote-code if you trust that code"
    )
    r = qm("inspect", remote, "--trust-remote-code")
    assert r.exit_code == 2
    assert r.stderr.splitlines()[-1].endswith(
        "--trust-remote-code applies to the memory estimate only: add --memory"
    )


def test_inspect_memory_of_a_local_folder_refuses_a_revision(qm, converted: Path) -> None:
    """`--revision` names a Hub branch: with --memory, as without, a local folder refuses it rather than
    ignoring it (tests/hub/test_hub_inspect.py: a Hub repo's revision is estimated)."""
    r = qm("inspect", converted, "--memory", "--revision", "v1")
    assert r.exit_code == 2
    assert f"--revision applies to Hub repos only, but {converted} is a local path" in r.stderr


def test_inspect_missing_path_exit_2(qm, tmp_path: Path) -> None:
    r = qm("inspect", tmp_path / "nothing")
    assert r.exit_code == 2
    assert r.stderr == f"Error: {tmp_path / 'nothing'}: no such file or folder; check the path\n"


def test_inspect_missing_relative_path_is_not_a_repo_id(
    qm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`inspect ./nothing` lost its './' (click's Path type) and went to the Hub as the repo id
    'nothing': five tries, then exit 1 "model info failed", instead of the missing path, exit 2."""
    import converter.tools.inspection as inspection

    def no_hub(*args, **kwargs):
        msg = "a ./path went to the Hub"
        raise AssertionError(msg)

    monkeypatch.setattr(inspection, "inspect_hub", no_hub)
    monkeypatch.chdir(tmp_path)
    r = qm("inspect", "./nothing")
    assert r.exit_code == 2
    assert r.stderr == "Error: nothing: no such file or folder; check the path\n"


def test_verify_one_shard_against_the_source(qm, converted: Path, tiny_llama: Path) -> None:
    """`verify SHARD --against SRC` failed with "SHARD/model.safetensors.index.json: Not a directory"."""
    weight_map = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]
    shard = converted / weight_map["model.layers.0.self_attn.q_proj.weight"]
    r = qm("verify", shard, "--against", tiny_llama, "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["shards"] == [shard.name]
    with_records = set(data["quality"]["tensors"])
    assert "model.layers.0.self_attn.q_proj.weight" in with_records  # measured against the source
    whole = json.loads(qm("verify", converted, "--against", tiny_llama, "--json").stdout)
    assert with_records < set(whole["quality"]["tensors"])


def _set_skip_modules(folder: Path, skip: list[str]) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["llm_int8_skip_modules"] = skip
    path.write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_verify_names_a_16bit_linear_the_skip_list_no_longer_lists(
    qm, tiny_llama: Path, tmp_path: Path, quant_type: str
) -> None:
    """A config.json whose llm_int8_skip_modules lost a linear the folder keeps 16-bit verified OK, and
    transformers + bitsandbytes then built a Linear4bit for it with no quant state (load fails): verify
    names the module and the fix."""
    out = tmp_path / "out"
    skip = ("--skip", "model.layers.0.mlp.down_proj")
    assert qm("convert", tiny_llama, out, "-q", "--quant-type", quant_type, *skip).exit_code == 0
    assert qm("verify", out, "-q").exit_code == 0
    without_config_digests(out)  # the edits below would be named by config.json's digest too
    _set_skip_modules(out, ["lm_head"])
    r = qm("verify", out)
    assert r.exit_code == 1
    assert (
        f"{out / 'config.json'}: llm_int8_skip_modules does not list 'model.layers.0.mlp.down_proj': "
        "linear layer(s) this folder keeps in 16 bit" in r.stderr
    )
    assert "add 'model.layers.0.mlp.down_proj' to quantization_config.llm_int8_skip_modules" in r.stderr
    _set_skip_modules(out, ["layers.0.mlp.down_proj"])  # the head too (transformers' defaults are replaced)
    r = qm("verify", out, "--json")
    assert r.exit_code == 1
    assert "does not list 'lm_head'" in json.loads(r.stdout)["problems"][0]
    _set_skip_modules(out, ["lm_head", "layers.0.mlp.down_proj"])
    assert qm("verify", out, "-q").exit_code == 0


def test_verify_checks_the_skip_list_from_a_live_skeleton_or_says_it_did_not(
    qm, converted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside the shipped table and the cache, the model is built on the meta device; without
    transformers either, verify says the check was not made (exit 0: nothing found wrong)."""
    from converter.plan import selection, selection_table

    _set_skip_modules(without_config_digests(converted), [])
    monkeypatch.setattr(selection_table, "lookup", lambda config, keys: None)
    r = qm("verify", converted)
    assert r.exit_code == 1
    assert "llm_int8_skip_modules does not list 'lm_head'" in r.stderr
    monkeypatch.setattr(selection, "transformers_usable", lambda: False)
    r = qm("verify", converted)
    assert r.exit_code == 0, r.stderr
    assert "llm_int8_skip_modules not checked against the 16-bit linear layers" in r.stderr
    assert "needs transformers >= 5" in r.stderr
    assert json.loads(qm("verify", converted, "--json").stdout)["notes"]


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_shard_is_not_also_a_skip_list_problem(qm, converted: Path, damage: str) -> None:
    """The skip-list check runs over every shard only: the quantized weights of a missing or truncated
    shard are not 16-bit linears missing from llm_int8_skip_modules."""
    shard = sorted(converted.glob("model-*.safetensors"))[1]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    r = qm("verify", converted, "--json")
    assert r.exit_code == 1
    problems = json.loads(r.stdout)["problems"]
    assert all(str(shard) in p for p in problems), problems


@pytest.mark.parametrize("damage", ["not json", "no quantization_config", "no config"])
def test_inspect_warns_of_a_config_that_cannot_load_the_folder(qm, converted: Path, damage: str) -> None:
    """inspect of a folder whose config.json was cut short (or lost its quantization_config) showed the
    summary without a word, exit 0, as if the folder loaded: it still shows it, and warns naming the file."""
    config = converted / "config.json"
    if damage == "not json":
        config.write_text('{"model_type": "llama",')
    elif damage == "no quantization_config":
        data = json.loads(config.read_text())
        del data["quantization_config"]
        config.write_text(json.dumps(data))
    else:
        config.unlink()
    r = qm("inspect", converted)
    assert r.exit_code == 0
    expected = {
        "not json": f"Warning: {config}: not valid JSON",
        "no quantization_config": f"Warning: {config}: no quantization_config, but 14 weights are quantized",
        "no config": f"Warning: {config}: missing, but 14 weights are quantized",
    }[damage]
    assert r.stderr.startswith(expected), r.stderr
    assert json.loads(qm("inspect", converted, "--json").stdout)["warnings"]


def test_inspect_of_an_unfinished_conversion_warns_once(qm, converted: Path) -> None:
    manifest = converted / ".quantize-model-manifest.json"
    m = json.loads(manifest.read_text())
    m["state"] = "in_progress"
    manifest.write_text(json.dumps(m))
    (converted / "config.json").unlink()  # written last
    r = qm("inspect", converted)
    assert r.exit_code == 0
    assert r.stderr.count("Warning:") == 1
    assert "the conversion did not finish" in r.stderr


def test_verify_of_a_repository_code_model_notes_the_unchecked_skip_list(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """A model transformers cannot build without running repository code: the skip-list check is not
    made, and the note says why without convert's --include advice; the folder verifies."""
    import shutil

    from tiny_models import add_repository_code

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    add_repository_code(src)
    out = tmp_path / "out"
    assert qm("convert", src, out, "-q", "--include", "*proj*").exit_code == 0
    r = qm("verify", out)
    assert r.exit_code == 0, r.stderr
    note = r.stderr.strip()
    assert note.startswith(f"Note: {out / 'config.json'}: llm_int8_skip_modules not checked"), note
    assert "is not built into transformers" in note
    assert "--include" not in note


def test_a_weight_split_across_shards_is_one_quantized_weight(qm, converted: Path, tmp_path: Path) -> None:
    """transformers' save_pretrained (of a bnb model, or of one load_quantized built) cuts shards key by
    key, so a weight's codes and its absmax / quant state may sit in two shards. inspect counted that
    weight's codes as a kept uint8 tensor and the weight as not quantized, and verify reported it as
    a 16-bit linear missing from llm_int8_skip_modules: a false problem, exit 1, on a folder that
    load_quantized and transformers both load."""
    split = "model.layers.0.mlp.down_proj.weight"
    folder = resharded_as_transformers(converted, tmp_path / "split", split)
    r = qm("inspect", folder, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["tensors_quantized"], data["tensors_kept"]) == (14, 7)
    assert data["kept_dtypes"] == {"bfloat16": 7}
    assert data["quant_types"] == {"nf4 blocksize 64 nested": 14}
    whole = json.loads(qm("inspect", converted, "--json").stdout)
    for key in ("params_quantized", "params_kept", "bytes_quantized", "bytes_kept"):
        assert data[key] == whole[key], key
    r = qm("verify", folder, "--json")
    data = json.loads(r.stdout)
    assert data["problems"] == [], data["problems"]
    assert data["tensors"] == 21
    assert r.exit_code == 0


def test_a_split_weight_missing_a_component_is_named_by_verify(qm, converted: Path, tmp_path: Path) -> None:
    """A component missing from every shard is named as missing (as load_quantized names it), not
    reported as a 16-bit linear the skip list lacks."""
    from safetensors.torch import load_file, save_file

    split = "model.layers.0.mlp.down_proj.weight"
    folder = resharded_as_transformers(converted, tmp_path / "split", split)
    second = folder / "model-00002-of-00002.safetensors"
    tensors = load_file(second)
    del tensors[split + ".absmax"]
    save_file(tensors, second, metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][split + ".absmax"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    r = qm("verify", folder, "--json")
    problems = json.loads(r.stdout)["problems"]
    assert r.exit_code == 1
    assert any(f"{split}.absmax" in p and "missing" in p for p in problems), problems
    assert not any("llm_int8_skip_modules" in p for p in problems), problems


def test_verify_against_measures_a_weight_split_across_shards(
    qm, converted: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    """`verify --against` read one shard at a time and left out a weight whose quant state is in
    another shard: 13 of 14 tensors measured, silently, on a folder transformers' save_pretrained wrote."""
    split = "model.layers.0.mlp.down_proj.weight"
    folder = resharded_as_transformers(converted, tmp_path / "split", split)
    whole = json.loads(qm("verify", converted, "--against", tiny_llama, "--json").stdout)["quality"]
    r = qm("verify", folder, "--against", tiny_llama, "--json")
    assert r.exit_code == 0, r.output
    quality = json.loads(r.stdout)["quality"]
    assert quality["tensors_measured"] == 14
    assert quality["tensors"][split] == whole["tensors"][split]
    assert quality["tensors"] == whole["tensors"]


def test_verify_refuses_a_revision_without_against(qm, converted: Path) -> None:
    """`verify PATH --revision REV` names the revision of `--against`'s Hub repo: without --against it
    was ignored and the folder verified with exit 0, as if a revision had been checked."""
    r = qm("verify", converted, "--revision", "v1")
    assert r.exit_code == 2
    assert r.stderr.splitlines()[-1] == (
        "Error: --revision 'v1' is the revision of --against SRC: add --against, or leave it out"
    )


def test_verify_after_a_hand_edit_of_config_says_rerun_the_convert_command(
    qm, converted: Path, tiny_llama: Path
) -> None:
    """A hand edit of config.json (its quantization_config dropped) was "reconvert with --overwrite", which
    converts everything again, though the convert command run again rewrites config.json and keeps the
    shards: that is the advice now, and it works. A damaged shard still says --overwrite (a rerun keeps a
    shard whose size and mtime did not change)."""
    config = converted / "config.json"
    data = json.loads(config.read_text())
    del data["quantization_config"]
    config.write_text(json.dumps(data))
    r = qm("verify", converted)
    assert r.exit_code == 1
    assert r.stderr.splitlines()[-1] == (  # no quantization_config; not the bytes the index records
        f"Error: {converted}: 2 problem(s) found; rerun the convert command that wrote it: it rewrites "
        "config.json and keeps the shards"
    )
    assert qm("convert", tiny_llama, converted, "-q", "--max-shard-size", "60KB").exit_code == 0
    assert qm("verify", converted, "-q").exit_code == 0


def test_verify_of_a_folder_quantize_model_did_not_write_does_not_say_reconvert(
    qm, converted: Path, tmp_path: Path
) -> None:
    """A folder transformers' save_pretrained wrote (no manifest, no metadata of ours) was told "reconvert
    with --overwrite": there is no conversion to redo. A config.json problem says to fix it; another
    problem, that quantize-model did not write the folder and what to do instead."""
    folder = resharded_as_transformers(converted, tmp_path / "saved", "model.layers.0.mlp.down_proj.weight")
    config = folder / "config.json"
    data = json.loads(config.read_text())
    data["quantization_config"]["llm_int8_skip_modules"] = []  # lm_head, kept 16-bit, no longer listed
    config.write_text(json.dumps(data))
    r = qm("verify", folder)
    assert r.exit_code == 1
    last = r.stderr.splitlines()[-1]
    assert last.endswith("; fix config.json as said (quantize-model did not write this folder)"), last
    (folder / "model-00002-of-00002.safetensors").unlink()
    r = qm("verify", folder)
    assert r.exit_code == 1
    last = r.stderr.splitlines()[-1]
    assert "--overwrite" not in last
    assert last.endswith(
        "quantize-model did not write this folder: save it again with the tool that made it, "
        "or convert the original checkpoint with quantize-model convert"
    ), last


def test_verify_against_a_quantized_folder_says_to_give_the_original(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """`verify OUT --against OUT` (or another converted folder) said "already quantized ...; convert the
    original checkpoint instead", convert's advice: verify converts nothing."""
    out = tmp_path / "out"
    assert qm("convert", tiny_llama, out, "-q").exit_code == 0
    r = qm("verify", out, "--against", out)
    assert r.exit_code == 2
    assert r.stderr == (
        f"Error: {out}: already quantized (its config.json has a quantization_config (quant_method "
        "'bitsandbytes')); give --against the original checkpoint this folder was converted from\n"
    )
    assert qm("verify", out, "--against", tiny_llama, "-q").exit_code == 0


def _edit_config(folder: Path, edit: str) -> None:
    config = folder / "config.json"
    data = json.loads(config.read_text())
    if edit == "num_hidden_layers":  # transformers would build fewer layers and drop the others' weights
        data["num_hidden_layers"] -= 1
    elif edit == "dtype":  # both keys, consistently: the 16-bit tensors would load in another dtype
        data["dtype"] = data["torch_dtype"] = "float16"
    else:  # a quantization_config field no other check reads
        data["quantization_config"]["bnb_4bit_compute_dtype"] = "float32"
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("edit", ["num_hidden_layers", "dtype", "quantization_config"])
def test_verify_finds_a_hand_edit_of_config_json(qm, converted: Path, tiny_llama: Path, edit: str) -> None:
    """A hand edit of config.json that keeps it loadable (another layer count, dtype or compute dtype)
    passed verify: only what transformers needs to load the shards was checked. The index now records
    config.json's sha256 and size: verify names the file (exit 1, as for a damaged shard), and the
    convert command run again rewrites it, keeping the shards."""
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    recorded = index["metadata"]["quantize_model"]["files"]["config.json"]
    config = (converted / "config.json").read_bytes()
    assert recorded == {"sha256": hashlib.sha256(config).hexdigest(), "size": len(config)}
    _edit_config(converted, edit)
    r = qm("verify", converted)
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    got = hashlib.sha256((converted / "config.json").read_bytes()).hexdigest()
    assert lines[0] == (
        f"Error: {converted / 'config.json'}: sha256 {got}, index says {recorded['sha256']} (changed since "
        "the conversion wrote it)"
    )
    assert lines[-1].startswith(f"Error: {converted}: {len(lines) - 1} problem(s) found; rerun the convert")
    data = json.loads(qm("verify", converted, "--json").stdout)
    assert data["ok"] is False
    assert any(p.startswith(f"{converted / 'config.json'}: sha256 ") for p in data["problems"])
    r = qm("convert", tiny_llama, converted, "--max-shard-size", "60KB", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["shards_reused"] == 3  # the shards kept, config.json rewritten
    assert (converted / "config.json").read_bytes() == config
    assert qm("verify", converted, "-q").exit_code == 0


def test_a_folder_whose_index_records_no_config_digest_verifies_with_a_note(
    qm, converted: Path, tiny_llama: Path
) -> None:
    """A folder converted before the index recorded config.json's digest still verifies (exit 0), with a
    note that config.json was not checked for edits; a rerun of its convert command leaves it as it is
    ("nothing to do"), and still rewrites a config.json edited since, recording its digest then."""
    path = without_config_digests(converted) / "model.safetensors.index.json"
    old = path.read_bytes()
    r = qm("verify", converted)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("OK: ")
    assert r.stderr == (
        f"Note: {converted / 'config.json'}: not checked for edits: the index, written before quantize-model "
        "recorded config.json's sha256 (2026-12-07), has none\n"
    )
    r = qm("convert", tiny_llama, converted, "--max-shard-size", "60KB", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["noop"] is True
    assert path.read_bytes() == old
    _edit_config(converted, "num_hidden_layers")
    assert qm("verify", converted, "-q").exit_code == 0  # not checked: the old index has no digest
    r = qm("convert", tiny_llama, converted, "--max-shard-size", "60KB", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["shards_reused"] == 3
    assert "files" in json.loads(path.read_text())["metadata"]["quantize_model"]
    r = qm("verify", converted)
    assert (r.exit_code, r.stderr) == (0, "")


def test_verify_finds_a_hand_edit_of_generation_config_json(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """generation_config.json, copied from the source, is read by the loaders as config.json is (EOS ids,
    sampling defaults): its digest is recorded too, an edit is named, and a rerun restores it."""
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    (src / "generation_config.json").write_text('{"eos_token_id": 2, "temperature": 0.6}\n')
    out = tmp_path / "out"
    assert qm("convert", src, out, "-q").exit_code == 0
    assert qm("verify", out, "-q").exit_code == 0
    (out / "generation_config.json").write_text('{"eos_token_id": 2, "temperature": 1.5}\n')
    r = qm("verify", out)
    assert r.exit_code == 1
    assert r.stderr.splitlines()[0].startswith(f"Error: {out / 'generation_config.json'}: sha256 ")
    assert r.stderr.splitlines()[-1] == (
        f"Error: {out}: 1 problem(s) found; rerun the convert command that wrote it: it rewrites config.json "
        "and keeps the shards"
    )
    (out / "generation_config.json").unlink()
    r = qm("verify", out)
    assert r.stderr.splitlines()[0] == (
        f"Error: {out / 'generation_config.json'}: missing (the index records its sha256)"
    )
    assert qm("convert", src, out, "-q").exit_code == 0
    assert qm("verify", out, "-q").exit_code == 0
