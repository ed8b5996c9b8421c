"""quantize-model dequantize / dequantize_checkpoint: a plain checkpoint, exact values, sharded, safe."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from converter.cli import cli
from converter.errors import InputError, OutputExistsError
from converter.loader import ops
from converter.loader.dequantize import dequantize_checkpoint
from converter.loader.module import state_from_record
from converter.loader.state import load_quantized_state
from formats.record import QuantizedTensor


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize(
    ("flag", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_cli_writes_a_plain_sharded_checkpoint(
    our_folder: Path, tmp_path: Path, flag: str, dtype: torch.dtype
) -> None:
    out = tmp_path / "plain"
    result = CliRunner().invoke(
        cli, ["dequantize", str(our_folder), str(out), "--dtype", flag, "--max-shard-size", "100KB", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["tensors_dequantized"] == 14
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(report["shards"]) > 1
    assert set(index["weight_map"].values()) == set(report["shards"])
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    written = _read_folder(out)
    state = load_quantized_state(our_folder)
    assert set(written) == set(state)
    for name, value in state.items():
        if isinstance(value, QuantizedTensor):
            # The same decode as bitsandbytes, straight into the requested dtype.
            expected = ops.dequantize(value.packed, state_from_record(value), dtype)
        else:
            expected = value.to(dtype) if value.is_floating_point() else value
        assert written[name].dtype == expected.dtype
        assert torch.equal(written[name], expected), name
    assert not list(out.glob(".*partial"))


def test_plain_checkpoint_loads_in_transformers(bnb_nf4: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from converter.loader.model import linear4bit_modules, load_quantized

    out = tmp_path / "plain"
    dequantize_checkpoint(bnb_nf4, out, dtype="bf16")
    assert (out / "model.safetensors").is_file()  # one shard: transformers' single-file name
    plain = AutoModelForCausalLM.from_pretrained(out)
    quantized = load_quantized(bnb_nf4)
    for layer in linear4bit_modules(quantized).values():
        layer.use_gemv = False
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, quantized(ids).logits)


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_under_a_file_is_an_input_error(our_folder: Path, tmp_path: Path, overwrite: bool) -> None:
    """`dequantize IN afile/sub` failed while creating the folder: exit 1 ("work failed") with the OS's
    bare "Not a directory", where `convert` refuses the same path with exit 2 naming the file in the way."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub"
    with pytest.raises(InputError, match=r"afile is a file, not a folder; choose an output folder"):
        dequantize_checkpoint(our_folder, out, overwrite=overwrite)
    args = ["dequantize", str(our_folder), str(out), "--json"] + (["--overwrite"] if overwrite else [])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {
        "ok": False,
        "error": f"{out}: {tmp_path / 'afile'} is a file, not a folder; choose an output folder",
        "exit_code": 2,
    }
    assert (tmp_path / "afile").read_text() == "x"


def test_an_output_on_a_read_only_filesystem_is_an_input_error(
    our_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dequantize IN /mnt/ro/out` failed creating the folder: exit 1 with the OS's "Read-only file
    system; check the path and rerun"; it is refused before any work, exit 2, as convert's preflight
    refuses it."""
    from read_only import mark_read_only

    mark_read_only(monkeypatch, tmp_path)
    out = tmp_path / "plain"
    said = f"{out}: {tmp_path} is on a read-only filesystem; choose another output folder"
    with pytest.raises(InputError) as info:
        dequantize_checkpoint(our_folder, out)
    assert str(info.value) == said
    result = CliRunner().invoke(cli, ["dequantize", str(our_folder), str(out), "--json"])
    assert (result.exit_code, json.loads(result.stdout)["error"]) == (2, said)
    assert not out.exists()


def test_an_output_the_disk_cannot_hold_is_refused_before_any_work(
    our_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dequantize IN OUT` on a filesystem with too little free space ran into the full disk part-way (exit
    1, an unfinished folder left); it is refused before the output is touched, exit 2, naming the bytes
    needed and free, as convert's preflight refuses a conversion that cannot fit. With enough space the
    same call runs."""
    import converter.loader.dequantize as dq

    plain = sum(
        torch.Size(v.shape).numel() * 2 for v in load_quantized_state(our_folder, verify=False).values()
    )  # bf16 output, every tensor of this Llama a float one
    monkeypatch.setattr(dq, "disk_free", lambda path: (plain - 1, tmp_path))
    out = tmp_path / "plain"
    with pytest.raises(InputError, match=r"needs at least .* GB, .* free; free some space") as info:
        dequantize_checkpoint(our_folder, out)
    assert str(info.value).startswith(f"{out}: the plain checkpoint needs")
    result = CliRunner().invoke(cli, ["dequantize", str(our_folder), str(out), "--json"])
    assert result.exit_code == 2
    assert not out.exists()
    monkeypatch.setattr(dq, "disk_free", lambda path: (plain, tmp_path))
    assert dequantize_checkpoint(our_folder, out).bytes_written >= plain


def test_refuses_a_non_empty_output(our_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=r"busy: exists and is not empty"):
        dequantize_checkpoint(our_folder, out)
    result = CliRunner().invoke(cli, ["dequantize", str(our_folder), str(out)])
    assert result.exit_code == 2
    assert (out / "mine.txt").read_text() == "keep me"
    dequantize_checkpoint(our_folder, out, overwrite=True)
    assert not (out / "mine.txt").exists()


def test_a_rerun_onto_a_finished_output_does_nothing(our_folder: Path, bnb_nf4: Path, tmp_path: Path) -> None:
    """`dequantize IN OUT` run again with the same arguments exited 2 ("exists and is not empty"),
    where `convert` says there is nothing to do: it now exits 0 and leaves the folder untouched. An
    output from another input, or written with other options, is still refused."""
    out = tmp_path / "plain"
    args = ["dequantize", str(our_folder), str(out), "--max-shard-size", "60KB"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    again = dequantize_checkpoint(our_folder, out, max_shard_size="60KB")
    assert again.up_to_date
    assert again.shards == dequantize_checkpoint(our_folder, tmp_path / "fresh", max_shard_size="60KB").shards
    for other in (["--max-shard-size", "5GB"], ["--max-shard-size", "60KB", "--dtype", "fp32"]):
        refused = CliRunner().invoke(cli, ["dequantize", str(our_folder), str(out), *other])
        assert refused.exit_code == 2, refused.output
    refused = CliRunner().invoke(cli, ["dequantize", str(bnb_nf4), str(out), "--max-shard-size", "60KB"])
    assert refused.exit_code == 2, refused.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_finished_output_of_other_options_is_refused_naming_the_difference(
    our_folder: Path, bnb_nf4: Path, tmp_path: Path
) -> None:
    """A rerun with another --dtype, --max-shard-size or source onto a finished dequantize said only
    "exists and is not empty", where convert names the option that changed: it now names it too."""
    out = tmp_path / "plain"
    done = CliRunner().invoke(cli, ["dequantize", str(our_folder), str(out), "--max-shard-size", "60KB"])
    assert done.exit_code == 0, done.output
    moved = f"source: {our_folder.resolve()} -> {bnb_nf4.resolve()}"
    cases = [
        ([str(our_folder), "--max-shard-size", "60KB", "--dtype", "fp32"], "dtype: 'bfloat16' -> 'float32'"),
        ([str(our_folder)], "max_shard_size: 60000 -> 5000000000"),
        ([str(bnb_nf4), "--max-shard-size", "60KB"], moved),
    ]
    for args, change in cases:
        refused = CliRunner().invoke(cli, ["dequantize", args[0], str(out), *args[1:]])
        assert refused.exit_code == 2, refused.output
        assert refused.output.splitlines()[-1] == (
            f"Error: {out}: holds a checkpoint dequantized with other options or from another source "
            f"({change}); choose another folder or pass --overwrite"
        )


def test_a_rerun_onto_a_damaged_finished_output_redoes_it(our_folder: Path, tmp_path: Path) -> None:
    """A finished output in which a file was deleted or resized used to be refused on rerun ("exists
    and is not empty", exit 2) where `convert` redoes its own damaged output: the same command now
    writes it again, byte-identical to a fresh run, and keeps the files the user added; so it does for
    a file edited in place with its size kept (taken as done before: sizes were all it checked). An
    output whose record names other options stays refused even when damaged."""
    reference = tmp_path / "reference"
    dequantize_checkpoint(our_folder, reference, max_shard_size="60KB")
    out = tmp_path / "plain"
    args = ["dequantize", str(our_folder), str(out), "--max-shard-size", "60KB"]
    for damage in ("delete", "resize", "edit"):
        first = CliRunner().invoke(cli, args)
        assert first.exit_code == 0, first.output
        (out / "notes.txt").write_text("mine")
        shard = sorted(out.glob("model-*.safetensors"))[1]
        if damage == "delete":
            shard.unlink()
        elif damage == "resize":
            shard.write_bytes(shard.read_bytes()[:-1])
        else:
            data = bytearray(shard.read_bytes())
            data[-1] ^= 0xFF
            time.sleep(0.01)  # a later mtime than the record's on filesystems with coarse timestamps
            shard.write_bytes(bytes(data))
        again = CliRunner().invoke(cli, args)
        assert again.exit_code == 0, again.output
        assert "nothing to do" not in again.output
        assert (out / "notes.txt").read_text() == "mine"
        (out / "notes.txt").unlink()
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
        for p in reference.iterdir():
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
        intact = CliRunner().invoke(cli, args)
        assert intact.exit_code == 0, intact.output
        assert "nothing to do" in intact.output
    next(out.glob("model-*.safetensors")).unlink()
    refused = CliRunner().invoke(cli, [*args, "--dtype", "fp32"])
    assert refused.exit_code == 2, refused.output


def test_progress_takes_false_as_convert_does(our_folder: Path, tmp_path: Path) -> None:
    """``progress=False`` (convert's "no progress") writes the checkpoint without a callback; a value
    that is neither a callable nor False/None is a TypeError before the output exists, not a crash
    at the first tensor that leaves an unfinished folder."""
    dequantize_checkpoint(our_folder, tmp_path / "quiet", progress=False)
    assert (tmp_path / "quiet" / "config.json").is_file()
    assert not (tmp_path / "quiet" / ".quantize-model-dequantize.unfinished").exists()
    names: list[str] = []
    dequantize_checkpoint(our_folder, tmp_path / "called", progress=names.append)
    assert set(names) == set(_read_folder(tmp_path / "called"))
    with pytest.raises(TypeError, match="progress"):
        dequantize_checkpoint(our_folder, tmp_path / "bad", progress=True)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("made_by", ["ours", "ours-int8", "bitsandbytes"])
def test_gpt2_conv1d_weights_written_back_as_transformers_stores_them(tmp_path: Path, made_by: str) -> None:
    """GPT-2's Conv1D weights are stored [in, out] but quantized [out, in] (bitsandbytes' layout): the
    dequantized folder has them [in, out] again, so plain transformers loads it, and every Conv1D of the
    loaded model holds exactly the transpose of our loader's decode of the quantized weight (an exact
    check: a square weight would pass a shape check in either orientation). For a folder transformers +
    bitsandbytes saved (no per-tensor metadata) the Conv1D modules come from the model of config.json."""
    import warnings

    import transformers
    from loader_helpers import bnb_quantize_folder

    from converter.loader.model import load_quantized
    from converter.writer.pipeline import convert

    config = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    src = tmp_path / "src"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(src)
    q = tmp_path / "q"
    if made_by == "bitsandbytes":
        bnb_quantize_folder(src, q)
    else:
        convert(src, q, progress=False, quant_type="int8" if made_by == "ours-int8" else "nf4")
    plain = tmp_path / "plain"
    dequantize_checkpoint(q, plain, dtype="float32")
    written = _read_folder(plain)
    original = _read_folder(src)
    key = "transformer.h.0.attn.c_attn.weight"
    assert written[key].shape == original[key].shape  # [in, out]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(plain, dtype=torch.float32).eval()
        ours = dict(load_quantized(q, dtype=torch.float32).named_modules())
    conv1d = {n: m for n, m in reloaded.named_modules() if isinstance(m, transformers.pytorch_utils.Conv1D)}
    assert len(conv1d) == 4 * config.n_layer
    for name, module in conv1d.items():
        assert torch.equal(module.weight, ours[name].dequantize(torch.float32).t()), name


def test_overwrite_never_removes_the_source_or_a_good_output_for_a_bad_source(
    our_folder: Path, plain_llama: Path, tmp_path: Path
) -> None:
    """--overwrite into a folder that contains the source is refused with nothing removed; a source that
    fails (not quantized, or corrupt) leaves an existing output as it was; a link is replaced, not what
    it points to."""
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(our_folder, parent / "model-nf4")
    with pytest.raises(OutputExistsError, match="contains the source"):
        dequantize_checkpoint(parent / "model-nf4", parent, overwrite=True)
    assert (parent / "model-nf4" / "model.safetensors.index.json").is_file()

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "important.txt").write_text("precious")
    with pytest.raises(Exception, match="no quantized weight"):
        dequantize_checkpoint(plain_llama, kept, overwrite=True)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(our_folder, corrupt)
    shard = sorted(corrupt.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match=shard.name):
        dequantize_checkpoint(corrupt, kept, overwrite=True)
    assert (kept / "important.txt").read_text() == "precious"

    target = tmp_path / "target"
    target.mkdir()
    (target / "other.txt").write_text("kept")
    link = tmp_path / "link"
    link.symlink_to(target)
    dequantize_checkpoint(our_folder, link, overwrite=True)
    assert (target / "other.txt").read_text() == "kept"
    assert (link / "config.json").is_file()
    assert not link.is_symlink()


def test_an_output_inside_the_source_is_refused(our_folder: Path, tmp_path: Path) -> None:
    """dequantize_checkpoint(IN, IN/sub) wrote the plain checkpoint inside the quantized folder."""
    import shutil

    src = shutil.copytree(our_folder, tmp_path / "nf4")
    with pytest.raises(OutputExistsError) as exc:
        dequantize_checkpoint(src, src / "plain")
    assert exc.value.exit_code == 2
    assert str(exc.value) == (
        f"{src / 'plain'}: the output folder is inside the source folder {src}; "
        "write the plain checkpoint somewhere else"
    )
    assert not (src / "plain").exists()


def test_an_interrupted_dequantize_restarts_and_a_concurrent_one_is_refused(
    our_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failure mid-way (here a full disk on the second shard) the rerun the message advises
    used to be refused ("exists and is not empty"); it now starts again and writes the same files. A
    second run while one holds the folder is refused at once (two runs interleaved their shards)."""
    import errno

    from converter.loader import dequantize as deq
    from converter.writer.manifest import FolderLock

    reference = tmp_path / "reference"
    dequantize_checkpoint(our_folder, reference, max_shard_size="60KB")
    real_write = deq.ShardWriter.write

    def full_on_second_shard(self, name, data):
        if "-00002-of-" in self.path.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_write(self, name, data)

    monkeypatch.setattr(deq.ShardWriter, "write", full_on_second_shard)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        dequantize_checkpoint(our_folder, out, max_shard_size="60KB")
    assert (out / deq.UNFINISHED_NAME).is_file()
    assert not (out / "config.json").exists()  # nothing that makes it look complete
    monkeypatch.setattr(deq.ShardWriter, "write", real_write)
    dequantize_checkpoint(our_folder, out, max_shard_size="60KB")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for p in reference.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name

    busy = tmp_path / "busy"
    busy.mkdir()
    with FolderLock(busy), pytest.raises(OutputExistsError, match="another quantize-model process"):
        dequantize_checkpoint(our_folder, busy)
    assert not any(busy.iterdir())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{ not json", "config.json: not valid JSON"),
        ("[]", "config.json: a JSON object is expected, found list"),
        ('{"quantization_config": "bitsandbytes"}', "'quantization_config' must be an object, found str"),
    ],
)
def test_a_damaged_config_is_named_before_anything_is_written(
    our_folder: Path, tmp_path: Path, text: str, expected: str
) -> None:
    """A damaged config.json gave JSONDecodeError / AttributeError from the loader, and `dequantize`
    wrote the shards before failing on it (leaving a complete-looking folder)."""
    import shutil

    from converter import load_quantized
    from converter.errors import CorruptFileError

    folder = tmp_path / "q"
    shutil.copytree(our_folder, folder)
    (folder / "config.json").write_text(text)
    out = tmp_path / "out"
    with pytest.raises(CorruptFileError, match=expected):
        dequantize_checkpoint(folder, out)
    assert not out.exists()
    with pytest.raises(CorruptFileError, match=expected):
        load_quantized(folder, device="cpu")


def test_an_unknown_compute_dtype_names_the_config(our_folder: Path, tmp_path: Path) -> None:
    import shutil

    from converter import load_quantized
    from converter.errors import CorruptFileError

    folder = tmp_path / "q"
    shutil.copytree(our_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_compute_dtype"] = "float8"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CorruptFileError, match=r"config.json: quantization_config.bnb_4bit_compute_dtype is 'float8'"
    ):
        load_quantized(folder, device="cpu")


def test_a_quoted_home_path_is_expanded_as_convert_does(
    our_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dequantize '~/m-nf4' '~/m-bf16'` (quoted, as scripts and CI YAML pass paths) read the source as a
    repo id ("no such folder") and wrote into a folder literally named '~' in the current directory;
    `convert` and `push` expand '~'."""
    import shutil

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(our_folder, home / "m-nf4")
    r = CliRunner().invoke(cli, ["dequantize", "~/m-nf4", "~/m-bf16", "-q"])
    assert r.exit_code == 0, r.output
    assert (home / "m-bf16" / "config.json").is_file()
    assert not (tmp_path / "~").exists()


POOLING = "1_Pooling/config.json"


def test_sentence_transformers_module_folders_are_copied_as_convert_copies_them(
    our_folder: Path, tmp_path: Path
) -> None:
    """`convert` copies a sentence-transformers model's module folders (``1_Pooling/config.json``);
    `dequantize` copied top-level files only, so the plain checkpoint lost its pooling settings. They are
    now copied (the same files `convert` copies), recorded with the output: deleted, a rerun writes
    them again."""
    import shutil

    folder = tmp_path / "st-nf4"
    shutil.copytree(our_folder, folder)
    (folder / "1_Pooling").mkdir()
    (folder / POOLING).write_text('{"pooling_mode_mean_tokens": true}\n')
    (folder / "runs").mkdir()
    (folder / "runs" / "log.json").write_text("{}")  # not a module folder: convert does not copy it
    out = tmp_path / "plain"
    args = ["dequantize", str(folder), str(out), "-q"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert (out / POOLING).read_bytes() == (folder / POOLING).read_bytes()
    assert not (out / "runs").exists()
    again = dequantize_checkpoint(folder, out)
    assert again.up_to_date
    (out / POOLING).unlink()
    redone = dequantize_checkpoint(folder, out)
    assert not redone.up_to_date
    assert (out / POOLING).read_bytes() == (folder / POOLING).read_bytes()
    # the input's module file changed since: another input, as for its top-level files
    (folder / POOLING).write_text('{"pooling_mode_cls_token": true}\n')
    changed = (
        r"weight files did not change, but files dequantize copies from it did: 1_Pooling/config\.json \("
    )
    with pytest.raises(OutputExistsError, match=changed):
        dequantize_checkpoint(folder, out)


def test_a_quantized_input_remade_with_its_sizes_and_mtimes_restored_is_not_up_to_date(
    our_folder: Path, tmp_path: Path
) -> None:
    """The rerun check identified the input by its files' sizes and mtimes only: a shard re-made with
    other values of the same size whose mtime was restored (``cp -p``, ``rsync -t``) passed as the same
    input, and the rerun said "nothing to do" over a plain checkpoint of the old weights. The input's
    shards are now identified as convert identifies its source (header and sampled data too)."""
    import os
    import shutil

    from converter.loader import dequantize as deq

    folder = tmp_path / "nf4"
    shutil.copytree(our_folder, folder)
    out = tmp_path / "plain"
    args = ["dequantize", str(folder), str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    # an output recorded before (sizes and mtimes only) still counts as the same input's
    older = tmp_path / "older"
    dequantize_checkpoint(folder, older)
    record = json.loads((older / deq.DONE_NAME).read_text())
    record["source"]["files"] = {k: v[:2] for k, v in record["source"]["files"].items()}
    (older / deq.DONE_NAME).write_text(json.dumps(record))
    assert dequantize_checkpoint(folder, older).up_to_date
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # other values, same size and header
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_mtime_ns == st.st_mtime_ns
    again = CliRunner().invoke(cli, args)
    assert "nothing to do" not in again.output
    assert again.exit_code == 2, again.output


@pytest.mark.parametrize("temp", [".0a1b2c3d.tmp", ".tmp"])
def test_a_kill_before_the_first_marker_rename_does_not_block_the_rerun(
    our_folder: Path, tmp_path: Path, temp: str
) -> None:
    """Killed between writing the "unfinished" marker's temp file and renaming it, dequantize left a
    folder holding only that file, which the rerun refused ("exists and is not empty"), as convert did
    with its first manifest's temp file. It is ours and never complete: the rerun drops it."""
    from converter.loader import dequantize as deq

    reference = tmp_path / "reference"
    dequantize_checkpoint(our_folder, reference)
    out = tmp_path / "out"
    out.mkdir()
    (out / f".{deq.UNFINISHED_NAME}{temp}").write_bytes(b'{"sour')
    dequantize_checkpoint(our_folder, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_keep_in_fp32_modules_stay_float32_as_transformers_saves_them(tmp_path: Path, kind: str) -> None:
    """A float16 T5 keeps its ``wo`` layers float32 (``_keep_in_fp32_modules``): convert stores them so,
    and transformers' own ``save_pretrained`` of the model loaded in float16 writes them so. ``dequantize
    --dtype fp16`` rounded them to float16 (each value off by up to half an fp16 ulp), so the plain
    checkpoint no longer gave the loaded model's logits; now its tensors have the dtypes (and the values)
    of that model: ``wo`` float32, the rest float16, and transformers' logits on it equal
    ``model.dequantize()``'s."""
    from tiny_models import make_tiny

    from converter.loader.model import load_quantized
    from converter.writer.pipeline import convert

    src = make_tiny("t5", tmp_path / "src")  # float32
    convert(src, tmp_path / "q", quant_type=kind, dtype="float16", progress=False)
    dequantize_checkpoint(tmp_path / "q", tmp_path / "plain", dtype="fp16")
    plain, stored = _read_folder(tmp_path / "plain"), _read_folder(tmp_path / "q")
    wo = [k for k in plain if k.endswith("DenseReluDense.wo.weight")]
    assert wo
    for k in wo:
        assert plain[k].dtype == torch.float32
        assert torch.equal(plain[k], stored[k])
    assert plain["shared.weight"].dtype == torch.float16
    import transformers

    ids = torch.tensor([[5, 17, 3, 99, 42, 7]])
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "plain")
    ours = load_quantized(tmp_path / "q", dtype=torch.float16).dequantize()
    with torch.no_grad():
        want = theirs(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        assert torch.equal(ours(input_ids=ids, decoder_input_ids=ids[:, :3]).logits, want)


def test_values_the_cast_makes_inf_are_named(tmp_path: Path) -> None:
    """--dtype fp16 of a folder holding values past float16's range (a bf16 norm of 70000, a 4-bit weight
    whose absmax decodes past it) writes them as the cast makes them, Inf, as transformers' cast does,
    and says so, naming each tensor (it was silent: exit 0, the model computed NaN); fp32: no word."""
    from safetensors.torch import save_file

    from converter.writer.pipeline import convert

    src = tmp_path / "src"
    src.mkdir()
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    w[1, 2] = 1e5
    norm = torch.ones(64, dtype=torch.bfloat16)
    norm[3] = 7e4
    save_file({"layer.weight": w, "norm.weight": norm}, src / "model.safetensors", metadata={"format": "pt"})
    folder = tmp_path / "nf4"
    convert(src, folder, include=["layer"], progress=False)
    told: list[str] = []
    result = dequantize_checkpoint(folder, tmp_path / "fp16", dtype="fp16", warn=told.append)
    assert told == result.notes
    assert [m.split(" holds ")[0] for m in told] == ["tensor 'layer.weight'", "tensor 'norm.weight'"]
    assert told[1] == (
        "tensor 'norm.weight' holds 1 value(s) past float16's range (|w| up to 7.014e+04), which the cast to "
        "float16 turns into Inf, written as such (transformers' cast does the same): the model computes "
        "Inf/NaN from it; use --dtype fp32 or bf16"
    )
    assert result.to_json()["notes"] == told
    with safe_open(str(tmp_path / "fp16" / "model.safetensors"), "pt") as f:
        assert torch.isinf(f.get_tensor("norm.weight")[3])
    told.clear()
    assert dequantize_checkpoint(folder, tmp_path / "fp32", dtype="fp32", warn=told.append).notes == []
    assert told == []


def test_int8_rows_that_decode_to_nan_are_named(tmp_path: Path) -> None:
    """An int8 folder holding a row past float16's range (stored as bitsandbytes stores it: SCB = inf,
    zero codes; convert warns that it loads as NaN) was dequantized to a plain checkpoint with that row
    NaN without a word (exit 0, no note), the model computing NaN; the note names the tensor, the rows
    and the remedy, in every dtype."""
    from safetensors.torch import save_file

    from converter.writer.pipeline import convert

    src = tmp_path / "src"
    src.mkdir()
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    w[1, 2] = 1e5
    save_file(
        {"layer.weight": w, "other.weight": torch.randn(8, 64, dtype=torch.bfloat16)},
        src / "model.safetensors",
    )
    folder = tmp_path / "int8"
    with pytest.warns(UserWarning, match="layer.weight"):
        convert(src, folder, quant_type="int8", include=["layer", "other"], progress=False)
    for dtype in ("bf16", "fp32"):
        told: list[str] = []
        result = dequantize_checkpoint(folder, tmp_path / dtype, dtype=dtype, warn=told.append)
        assert told == result.notes
        assert told == [
            "tensor 'layer.weight': 1 row(s) decode to NaN (SCB = inf: values past float16's range when "
            "it was quantized, stored as bitsandbytes stores them), written as such: the model computes NaN "
            "from it; convert the source again with --skip 'layer' to keep it unquantized"
        ]
        with safe_open(str(tmp_path / dtype / "model.safetensors"), "pt") as f:
            assert int(torch.isnan(f.get_tensor("layer.weight")).sum()) == 64


@pytest.mark.parametrize("shape", [(4, 64, 32), (5, 7, 9), (6, 128, 96), (3, 257, 65)])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_one_expert_of_a_fused_record_decodes_to_its_block_of_the_whole_decode(shape, nested, dtype):
    """dequantize decodes a fused 3-D record expert by expert: each expert's block equals, bit for bit,
    that block of the whole record's decode, where experts fill whole 64-element blocks or not (5 x 7 x 9:
    63 elements each, an odd count of elements in all) and where an expert's blocks start or end inside a
    256-block nested group (6 x 128 x 96: 192 blocks each; 3 x 257 x 65: neither)."""
    from converter.loader.dequantize import _record_rows
    from converter.methods import for_record
    from formats import reference
    from formats.quant_types import QuantType

    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed, absmax = reference.quantize_4bit(x.float().reshape(-1).numpy(), 64, QuantType.NF4)
    nest = None
    if nested:
        codes, nested_absmax, offset = reference.quantize_nested(absmax)
        nest = (torch.from_numpy(codes), torch.from_numpy(nested_absmax), float(offset))
    rec = QuantizedTensor.from_kernel_outputs(
        "w", shape, "bfloat16", QuantType.NF4, 64, torch.from_numpy(packed), torch.from_numpy(absmax), nest
    )
    whole = for_record(rec).dequantize(rec, dtype)
    for e in range(shape[0]):
        block = _record_rows(rec, e, dtype)
        assert block.shape == shape[1:]
        assert torch.equal(block.view(torch.uint8), whole[e].contiguous().view(torch.uint8)), e


def test_dtype_plan_and_conv1d_from_the_selection_facts_equal_the_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dequantize built the folder's model on the meta device (importing transformers: seconds of a small
    model's whole process) for its dtype plan and its Conv1D weights; the converter's selection facts
    (shipped table, or the per-user cache the conversion filled) say the same without building it. Both
    paths write the same files: T5 under float16 (``wo`` float32) and GPT-2 (Conv1D weights [in, out])."""
    import transformers
    from tiny_models import make_tiny

    from converter.loader import dequantize as dq
    from converter.writer.pipeline import convert

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    t5 = make_tiny("t5", tmp_path / "t5")  # float32
    gpt2 = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(gpt2)
    cases = ((t5, "float16", "fp16"), (gpt2, None, "bf16"))
    for src, convert_dtype, _ in cases:
        convert(src, tmp_path / f"{src.name}-q", dtype=convert_dtype, progress=False)

    def no_model(folder: Path) -> None:
        msg = "the meta model was built"
        raise AssertionError(msg)

    table_facts = dq._table_facts
    for path in ("facts", "model"):
        if path == "facts":
            monkeypatch.setattr(dq, "_meta_model", no_model)
        else:
            monkeypatch.undo()
            monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
            monkeypatch.setattr(dq, "_table_facts", lambda config, state: None)
        for src, _, dtype in cases:
            dequantize_checkpoint(tmp_path / f"{src.name}-q", tmp_path / f"{src.name}-{path}", dtype=dtype)
    assert table_facts is not dq._table_facts
    for src, _, _ in cases:
        facts, model = tmp_path / f"{src.name}-facts", tmp_path / f"{src.name}-model"
        assert sorted(p.name for p in facts.iterdir()) == sorted(p.name for p in model.iterdir())
        for f in facts.iterdir():
            assert f.read_bytes() == (model / f.name).read_bytes(), f.name
    t5_plain = _read_folder(tmp_path / "t5-facts")
    wo = [k for k in t5_plain if k.endswith("DenseReluDense.wo.weight")]
    assert wo
    assert all(t5_plain[k].dtype == torch.float32 for k in wo)
    assert t5_plain["shared.weight"].dtype == torch.float16
    key = "transformer.h.0.attn.c_attn.weight"
    assert _read_folder(tmp_path / "gpt2-facts")[key].shape == _read_folder(gpt2)[key].shape  # [in, out]


def test_sigterm_stops_the_dequantize_command_with_its_line_json_and_exit_143(
    our_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (a CI job cancelled or timed out) killed `dequantize` at once, printing nothing (an empty
    stdout under --json): it unwinds as Ctrl-C does, one line, the JSON error, exit 143, the folder left
    unfinished; the rerun writes the files an uninterrupted run writes."""
    import os
    import signal

    from converter.loader import dequantize as deq

    reference = tmp_path / "reference"
    dequantize_checkpoint(our_folder, reference, max_shard_size="60KB")
    real_write = deq.ShardWriter.write

    def terminated_on_second_shard(self, name, data):
        if "-00002-of-" in self.path.name:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_write(self, name, data)

    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(deq.ShardWriter, "write", terminated_on_second_shard)
        r = CliRunner().invoke(
            cli, ["dequantize", str(our_folder), str(out), "--max-shard-size", "60KB", "--json"]
        )
    assert signal.getsignal(signal.SIGTERM) is before
    assert r.exit_code == 143
    assert r.stderr == "Error: interrupted by SIGTERM; rerun the same command to resume\n"
    assert json.loads(r.stdout)["exit_code"] == 143
    assert not (out / "config.json").exists()
    r = CliRunner().invoke(cli, ["dequantize", str(our_folder), str(out), "--max-shard-size", "60KB", "-q"])
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for p in reference.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_a_changed_source_is_said_by_the_kind_of_file_and_whether_the_weights_changed(
    our_folder: Path, tmp_path: Path
) -> None:
    """A rerun refused because the input changed named the first file that differs in name order: after
    a plain `cp LICENSE` into the input (a new mtime, the same bytes) it said 'source file LICENSE
    changed', which read as a changed model. It says which kind of file changed, how, and whether the
    weights did."""
    import os
    import shutil

    folder = tmp_path / "nf4"
    shutil.copytree(our_folder, folder)
    (folder / "LICENSE").write_text("Apache-2.0\n")
    out = tmp_path / "plain"
    dequantize_checkpoint(folder, out)
    licence = folder / "LICENSE"
    st = licence.stat()
    os.utime(licence, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as `cp` leaves it: same bytes
    start = f"{out}: holds a checkpoint dequantized with other options or from another source ("
    end = "); choose another folder or pass --overwrite"
    with pytest.raises(OutputExistsError) as err:
        dequantize_checkpoint(folder, out)
    assert str(err.value) == (
        f"{start}the source's weight files did not change, but files dequantize copies from it did: LICENSE "
        f"(modification time only: same size and sampled data){end}"
    )
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # other values, same size and header
    shard.write_bytes(bytes(data))
    with pytest.raises(OutputExistsError) as err:
        dequantize_checkpoint(folder, out)
    assert str(err.value) == (
        f"{start}the source's weight files changed: {shard.name} (modification time, sampled data); files "
        "dequantize copies from it changed too: LICENSE (modification time only: same size and sampled "
        f"data){end}"
    )
