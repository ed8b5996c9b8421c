from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def test_convert_prints_summary(qm, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = qm("convert", tiny_llama, out)
    assert r.exit_code == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["Output", str(out)]
    assert lines[2].split() == ["Tensors", "quantized", "14", "(73.73K", "params)"]
    assert "31.0% of parameters left in 16/32 bit" in lines[3]
    assert lines[5].split()[:3] == ["Bits", "per", "parameter"]
    assert (out / "config.json").exists()


def test_rerun_says_nothing_to_do(qm, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert qm("convert", tiny_llama, out, "-q").exit_code == 0
    r = qm("convert", tiny_llama, out)
    assert r.exit_code == 0
    assert r.stderr == f"{out}: already converted with the same source and options; nothing to do\n"


def test_a_rerun_names_a_shard_the_index_does_not_list(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """A finished folder holding a *.safetensors file its index does not list (an older conversion's
    shard left by a copy over it) got "nothing to do", exit 0, silently, while verify fails on it and
    push refuses it (loaders that glob *.safetensors read it): the rerun warns, naming it."""
    import shutil

    out = tmp_path / "out"
    assert qm("convert", tiny_llama, out, "-q").exit_code == 0
    shutil.copyfile(out / "model.safetensors", out / "model-00001-of-00002.safetensors")
    warning = (
        f"Warning: {out}: model-00001-of-00002.safetensors: not a shard of this conversion (its index does "
        "not list it; loaders that glob *.safetensors would read it, verify reports it and push refuses the "
        "folder); remove it\n"
    )
    r = qm("convert", tiny_llama, out)
    assert r.exit_code == 0
    assert r.stderr == warning + f"{out}: already converted with the same source and options; nothing to do\n"
    r = qm("convert", tiny_llama, out, "--json")
    assert json.loads(r.stdout)["notes"] == [warning.removeprefix("Warning: ").rstrip("\n")]
    r = qm("verify", out, "--json")
    assert r.exit_code == 1
    assert json.loads(r.stdout)["remedy"] == "remove the files the index does not list"  # not a reconversion
    (out / "model-00001-of-00002.safetensors").unlink()
    assert qm("convert", tiny_llama, out, "-q").stderr == ""


def _assert_stopped_by_sigterm(r, handler_before) -> None:
    """A command SIGTERM stopped: its handler restored, exit 143, the one line and the JSON error object."""
    import signal

    assert signal.getsignal(signal.SIGTERM) is handler_before  # restored
    assert r.exit_code == 143
    assert r.stderr == "Error: interrupted by SIGTERM; rerun the same command to resume\n"
    assert json.loads(r.stdout) == {
        "ok": False,
        "error": "interrupted by SIGTERM; rerun the same command to resume",
        "exit_code": 143,
    }


def test_sigterm_stops_convert_as_ctrl_c_does_with_its_line_json_and_exit_143(
    qm, tiny_llama: Path, tmp_path: Path, monkeypatch
) -> None:
    """SIGTERM (a CI job cancelled or timed out) killed convert at once: exit 143, nothing on stderr and
    an empty stdout under --json. It now unwinds as Ctrl-C does (the folder unfinished, resumable): one
    line, the JSON error object, exit 143; the rerun finishes it, as a run never stopped writes it."""
    import os
    import signal

    from converter.writer import pipeline

    ref = tmp_path / "ref"
    assert qm("convert", tiny_llama, ref, "-q").exit_code == 0
    write_index = pipeline._Conversion._write_index

    def terminated(self, manifest):  # after the shards, before the index and config.json
        os.kill(os.getpid(), signal.SIGTERM)
        return write_index(self, manifest)

    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(pipeline._Conversion, "_write_index", terminated)
        r = qm("convert", tiny_llama, out, "--json")
    _assert_stopped_by_sigterm(r, before)
    assert not (out / "config.json").exists()
    assert qm("verify", out, "-q").exit_code == 1  # unfinished: never passes
    assert qm("convert", tiny_llama, out, "-q").exit_code == 0
    for f in ref.iterdir():
        if f.name != "quantization_report.json":  # its timings
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_sigterm_stops_push_with_its_line_json_and_exit_143(qm, tmp_path: Path, monkeypatch) -> None:
    """SIGTERM during an upload killed push at once (exit 143, nothing said, an empty stdout under
    --json); it now ends as convert does: one line, the JSON error object, exit 143 (a rerun resumes:
    files already on the Hub are not uploaded again)."""
    import os
    import signal

    from converter.tools import push

    def terminated(*_args, **_kwargs):  # mid-upload
        os.kill(os.getpid(), signal.SIGTERM)
        msg = "SIGTERM did not stop the push"
        raise AssertionError(msg)

    before = signal.getsignal(signal.SIGTERM)
    folder = tmp_path / "folder"
    folder.mkdir()
    with monkeypatch.context() as m:
        m.setattr(push, "push_folder", terminated)
        r = qm("push", folder, "me/model", "--json")
    _assert_stopped_by_sigterm(r, before)


def test_json_output(qm, tiny_llama: Path, tmp_path: Path) -> None:
    r = qm("convert", tiny_llama, tmp_path / "out", "--json", "--quant-type", "fp4", "--no-double-quant")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["ok"] is True
    assert data["tensors_quantized"] == 14
    assert data["shards"] == ["model.safetensors"]
    assert data["skipped_modules"] == ["lm_head"]
    # fp4, plain absmax: 4 + 32/64 bits, plus per-tensor tables that weigh a lot on 64x64 weights.
    assert 4.5 < data["quantized_bits_per_param"] < 7
    assert r.stderr == ""


def test_quiet_prints_nothing(qm, tiny_llama: Path, tmp_path: Path) -> None:
    r = qm("convert", tiny_llama, tmp_path / "out", "--quiet")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "", "")


def test_missing_source_exit_2(qm, tmp_path: Path) -> None:
    r = qm("convert", "./no/such/model", tmp_path / "out")
    assert r.exit_code == 2
    assert r.stderr == (
        "Error: ./no/such/model: no such file or folder, and not a Hub repo id (namespace/name); "
        "check the path or give a repo id\n"
    )
    assert not (tmp_path / "out").exists()


def test_output_a_link_to_a_missing_folder_says_so(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """An OUTPUT that is a symbolic link to a folder not yet created (``out -> /mnt/big/out``) failed with
    "out: File exists; check the path and rerun" (convert and dequantize), which names neither the link
    nor what is missing. Both now say it, exit 2, and touch nothing."""
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "big" / "out")
    said = f"Error: {link}: a symbolic link to {tmp_path / 'big' / 'out'}, which does not exist; "
    r = qm("convert", tiny_llama, link)
    assert r.exit_code == 2
    assert r.stderr.startswith(said), r.stderr
    converted = tmp_path / "converted"
    assert qm("convert", tiny_llama, converted).exit_code == 0
    r = qm("dequantize", converted, tmp_path / "out" / "plain")
    assert r.exit_code == 2
    assert r.stderr.startswith(said), r.stderr
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize("command", ["convert", "dequantize"])
def test_output_inside_the_source_or_around_it_is_refused_before_any_work(
    qm, tiny_llama: Path, tmp_path: Path, command: str
) -> None:
    """``convert SRC SRC/sub`` and ``dequantize IN IN/sub`` were accepted: the output was written inside
    the input, becoming part of what it is made from. Refused before anything is created, naming
    both folders, as an output folder that contains the source is."""
    src = shutil.copytree(tiny_llama, tmp_path / "src")
    if command == "dequantize":
        assert qm("convert", tiny_llama, tmp_path / "nf4", "-q").exit_code == 0
        src = tmp_path / "nf4"
    before = sorted(p.name for p in src.iterdir())
    inside = src / "sub"
    r = qm(command, src, inside)
    assert r.exit_code == 2
    what = "write the plain checkpoint somewhere else" if command == "dequantize" else "choose another"
    assert r.stderr.startswith(f"Error: {inside}: the output folder is inside the source folder {src}; ")
    assert what in r.stderr
    assert r.stdout == ""
    assert not inside.exists()
    assert sorted(p.name for p in src.iterdir()) == before
    for around in (src, tmp_path):  # the same folder, and a folder that contains the source
        r = qm(command, src, around)
        assert r.exit_code == 2
        assert r.stderr.startswith(f"Error: {around}: ")
        assert f"contains the source folder {src}; " in r.stderr
    assert sorted(p.name for p in src.iterdir()) == before


def test_an_output_beside_a_single_file_source_is_accepted(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """A single .safetensors file converted into a folder beside it (``models/m.safetensors ->
    models/m-nf4``) is no output inside its source: only a folder source's inside is refused."""
    src = shutil.copytree(tiny_llama, tmp_path / "models")
    r = qm("convert", src / "model.safetensors", src / "model-nf4", "-q")
    assert r.exit_code == 0, r.stderr
    assert (src / "model-nf4" / "config.json").is_file()


@pytest.mark.parametrize("command", ["convert", "dequantize"])
def test_a_folder_another_process_is_writing_exits_75_to_retry(
    qm, tiny_llama: Path, tmp_path: Path, command: str
) -> None:
    """An output folder locked by a running conversion exited 2, a usage error, although the same command
    works once the other process ends: now 75 (EX_TEMPFAIL), which CI scripts can retry on."""
    from converter.writer.manifest import FolderLock

    src = tiny_llama
    if command == "dequantize":
        src = tmp_path / "nf4"
        assert qm("convert", tiny_llama, src, "-q").exit_code == 0
    out = tmp_path / "out"
    out.mkdir()
    with FolderLock(out):
        r = qm(command, src, out, "--json")
    assert r.exit_code == 75
    said = f"{out}: another quantize-model process is writing this folder; wait for it to finish"
    assert r.stderr == f"Error: {said}\n"
    assert json.loads(r.stdout) == {"ok": False, "error": said, "exit_code": 75}
    assert qm(command, src, out, "-q").exit_code == 0  # the lock is gone with its holder


def test_truncated_shard_exit_2(qm, tiny_llama: Path, tmp_path: Path) -> None:
    src = shutil.copytree(tiny_llama, tmp_path / "src")
    path = src / "model.safetensors"
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    r = qm("convert", src, tmp_path / "out")
    assert r.exit_code == 2
    assert r.stderr == (
        f"Error: {path}: not a valid safetensors file (incomplete metadata, file not fully covered); "
        "re-download or re-save it\n"
    )
    assert not (tmp_path / "out").exists()


def test_already_quantized_exit_2(qm, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert qm("convert", tiny_llama, out, "-q").exit_code == 0
    r = qm("convert", out, tmp_path / "again")
    assert r.exit_code == 2
    assert r.stderr == (
        f"Error: {out}: already quantized (its config.json has a quantization_config "
        "(quant_method 'bitsandbytes')); convert the original checkpoint instead\n"
    )


def test_unsupported_dtype_exit_2(qm, tmp_path: Path) -> None:
    src = tmp_path / "ints"
    src.mkdir()
    save_file({"layer.weight": torch.zeros(8, 8, dtype=torch.int32)}, src / "model.safetensors")
    r = qm("convert", src, tmp_path / "out", "--include", "layer")
    assert r.exit_code == 2
    assert r.stderr == (
        "Error: nothing to quantize: no tensor is a float32/float16/bfloat16 linear weight selected for "
        "quantization (e.g. 'layer.weight': dtype I32 is not float32/float16/bfloat16); "
        "check --include/--skip, or the checkpoint's dtype\n"
    )


def test_foreign_output_exit_2_then_overwrite(qm, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = qm("convert", tiny_llama, out)
    assert r.exit_code == 2
    assert r.stderr == (
        f"Error: {out}: holds files quantize-model did not write (keep.txt); "
        "choose an empty folder or pass --overwrite\n"
    )
    r = qm("convert", tiny_llama, out, "--overwrite", "-q")
    assert r.exit_code == 0
    assert not (out / "keep.txt").exists()


def test_json_error_object(qm, tmp_path: Path) -> None:
    r = qm("convert", "./missing/model", tmp_path / "out", "--json")
    assert r.exit_code == 2
    data = json.loads(r.stdout)
    assert data["ok"] is False
    assert data["exit_code"] == 2
    assert data["error"].startswith("./missing/model: no such file or folder")


def test_bad_option_is_usage_error(qm, tiny_llama: Path, tmp_path: Path) -> None:
    r = qm("convert", tiny_llama, tmp_path / "out", "--quant-type", "int4")
    assert r.exit_code == 2
    assert "Invalid value for '--quant-type': 'int4' is not one of 'nf4', 'fp4', 'int8'." in r.stderr


@pytest.mark.parametrize(
    ("value", "why"), [("lots", "use a number with a unit, e.g. 5GB, 500MB, 2GiB"), ("0", "must be positive")]
)
@pytest.mark.parametrize("command", ["convert", "dequantize"])
def test_bad_shard_size_exit_2(
    qm, tiny_llama: Path, tmp_path: Path, value: str, why: str, command: str
) -> None:
    """A bad size is click's usage error naming the option ("invalid size '0': must be positive" named
    none; dequantize's still did), found before anything is read."""
    r = qm(command, tiny_llama, tmp_path / "out", "--max-shard-size", value)
    assert r.exit_code == 2
    said = f"Error: Invalid value for '--max-shard-size': invalid size {value!r}: {why}"
    assert r.stderr.splitlines()[-1] == said
    assert not (tmp_path / "out").exists()


def test_version_lists_backends(qm) -> None:
    r = qm("--version")
    assert r.exit_code == 0
    first, second = r.stdout.splitlines()
    assert first == "quantize-model 0.1.0"
    assert second.startswith("kernels: cpu (")


def test_dtype_takes_the_short_names_dequantize_takes(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """``dequantize --dtype bf16`` was accepted and ``convert --dtype bf16`` refused ("'bf16' is not one
    of 'float32', 'float16', 'bfloat16'"): convert takes both spellings, as one (same folder, a no-op)."""
    out = tmp_path / "out"
    assert qm("convert", tiny_llama, out, "--dtype", "fp16", "--compute-dtype", "BF16", "-q").exit_code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    assert config["dtype"] == "float16"
    r = qm("convert", tiny_llama, out, "--dtype", "float16", "--compute-dtype", "bfloat16")
    assert r.exit_code == 0
    assert r.stderr.endswith("already converted with the same source and options; nothing to do\n")


def test_an_output_that_is_a_file_is_refused_before_the_plan_warns(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """An OUTPUT that exists as a file was refused only after the plan was made, its warnings printed
    first (here: a --skip glob that matches nothing); now the refusal is the one line, the file kept."""
    out = tmp_path / "out"
    out.write_text("mine")
    r = qm("convert", tiny_llama, out, "--skip", "no_such_module")
    assert r.exit_code == 2
    assert r.stderr == f"Error: {out.resolve()}: exists and is not a folder; remove it or pass --overwrite\n"
    assert out.read_text() == "mine"


def test_a_rerun_after_the_source_config_changed_does_not_say_resumed(
    qm, tiny_llama: Path, tmp_path: Path
) -> None:
    """Only the source's config.json changed since a finished conversion: the rerun said "resumed an
    interrupted conversion" (nothing was interrupted); it says what it did, and no "Throughput 0 B/s"
    (it read no source shard)."""
    src = shutil.copytree(tiny_llama, tmp_path / "src")
    out = tmp_path / "out"
    first = qm("convert", src, out)
    assert first.exit_code == 0
    assert "Throughput" in first.stdout
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "my_note": 1}))
    r = qm("convert", src, out)
    assert r.exit_code == 0
    assert "resumed an interrupted" not in r.stderr
    assert (
        f"{out}: already converted; the files that changed in the source since were rewritten "
        "(1 shard(s) kept)"
    ) in r.stderr
    assert json.loads((out / "config.json").read_text())["my_note"] == 1
    assert "Throughput" not in r.stdout


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--private"], "--private makes the --push-to repo private"),
        (["--keep-downloads"], "--keep-downloads applies to Hub repos only"),
        (["--private", "--dry-run"], "--private makes the --push-to repo private"),
        (["--keep-downloads", "--dry-run"], "--keep-downloads applies to Hub repos only"),
    ],
)
def test_options_that_cannot_apply_are_refused(
    qm, tiny_llama: Path, tmp_path: Path, options: list[str], needle: str
) -> None:
    """`--private` without `--push-to` and `--keep-downloads` with a local source did nothing without a
    word, while `--revision` with a local path is refused (exit 2): refused the same way now, before OUTPUT
    is created, naming the option and what to do."""
    out = tmp_path / "out"
    r = qm("convert", tiny_llama, out, *options)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr
    assert r.stderr.rstrip().endswith("leave it out")
    assert not out.exists()


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_an_empty_push_to_is_refused_before_any_work(
    qm, tiny_llama: Path, tmp_path: Path, dry_run: list
) -> None:
    """`convert SRC OUT --push-to "$REPO"` with REPO unset converted and pushed nothing, exit 0 (a plan's
    `push_to = ""` and `push FOLDER ""` are refused): refused now, exit 2, before OUTPUT is created."""
    out = tmp_path / "out"
    r = qm("convert", tiny_llama, out, "--push-to", "", *dry_run)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("Error: '': not a Hub repo id to push to (")
    assert not out.exists()


def test_python_options_that_cannot_apply_are_refused(tiny_llama: Path, tmp_path: Path) -> None:
    from converter import convert
    from converter.errors import InputError

    with pytest.raises(InputError, match="--private makes the --push-to repo private"):
        convert(tiny_llama, tmp_path / "a", private=True, progress=False)
    with pytest.raises(InputError, match="--keep-downloads applies to Hub repos only"):
        convert(tiny_llama, tmp_path / "b", keep_downloads=True, progress=False)
    with pytest.raises(InputError, match="'': not a Hub repo id to push to"):
        convert(tiny_llama, tmp_path / "d", push_to="", progress=False)
    for source, output in (("", tmp_path / "c"), (tiny_llama, "")):
        with pytest.raises(InputError, match="empty"):
            convert(source, output, progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["convert", "dequantize"])
@pytest.mark.parametrize("empty", ["source", "output"])
def test_an_empty_path_is_refused(
    qm, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, empty: str
) -> None:
    """`convert "" out` (an unset shell variable) took the empty string as the current folder: refused now,
    exit 2, naming the argument, and nothing is read or written."""
    work = tmp_path / "cwd"
    shutil.copytree(tiny_llama, work)
    before = sorted(p.name for p in work.iterdir())
    monkeypatch.chdir(work)
    args = ["", tmp_path / "out"] if empty == "source" else [tiny_llama, ""]
    r = qm(command, *args)
    assert r.exit_code == 2, r.output
    assert f"'{empty.upper()}'" in r.stderr, r.stderr
    assert "empty" in r.stderr
    assert sorted(p.name for p in work.iterdir()) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "name"),
    [(["inspect", ""], "PATH"), (["verify", ""], "PATH"), (["push", "", "me/m"], "FOLDER")],
)
def test_an_empty_folder_argument_is_refused(
    qm, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], name: str
) -> None:
    """`verify ""` (or inspect, push) read the current folder, as `convert ""` did: exit 2, naming it."""
    monkeypatch.chdir(tmp_path)
    r = qm(*args)
    assert r.exit_code == 2, r.output
    assert f"'{name}'" in r.stderr, r.stderr
    assert "empty" in r.stderr


def test_an_empty_against_is_refused(
    qm, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`verify OUT --against "$SRC"` with SRC unset compared OUT with whatever the current folder held (here
    the source itself: "OK"), as `convert ""` read it: exit 2 now, naming the option."""
    out = tmp_path / "out"
    assert qm("convert", tiny_llama, out, "-q").exit_code == 0
    monkeypatch.chdir(tiny_llama)
    r = qm("verify", out, "--against", "")
    assert r.exit_code == 2, r.output
    assert "'--against': empty; give a path" in r.stderr, r.stderr
    assert qm("verify", out, "--against", ".").exit_code == 0  # the current folder, said so
