"""push_folder / `quantize-model push` against the fake Hub: files land, model card, resumable, errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_hub import FakeHub, Fault
from hub_helpers import TOKEN, file_hashes, hub_env

from converter.errors import InputError
from converter.sources.hub import HubAccessError, HubDownloadError
from converter.tools.push import push_folder

pytestmark = pytest.mark.hub

SRC = "org/tiny"
DEST = "me/tiny-nf4"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def converted(tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path) -> Path:
    from converter.writer.pipeline import convert

    fake_hub.add_repo(SRC, checkpoint_dir)
    out = tmp_path / "tiny-nf4"
    convert(SRC, out, progress=False)
    return out


def _remote(hub: FakeHub, repo: str) -> dict[str, bytes]:
    r = hub.repos[repo]
    tree = r.commits[r.refs["main"]]
    return {p: (hub.blobs / f.sha256).read_bytes() for p, f in tree.items()}


def _card_meta(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_push_lands_files_and_model_card(converted: Path, fake_hub: FakeHub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    before = file_hashes(converted)
    url = push_folder(converted, DEST, private=True)
    assert url == f"{fake_hub.endpoint}/{DEST}"
    assert fake_hub.repos[DEST].private
    remote = _remote(fake_hub, DEST)
    local = {k: v for k, v in file_hashes(converted).items() if not k.startswith(".") and k != "README.md"}
    assert {k: hashlib.sha256(remote[k]).hexdigest() for k in local} == local
    assert ".quantize-model-manifest.json" not in remote
    assert "LICENSE" in remote  # licence files propagated
    assert file_hashes(converted) == before, "push must not modify the local folder"

    card = remote["README.md"].decode()
    meta = _card_meta(card)
    assert meta["base_model"] == SRC
    assert meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"  # from the source's model card
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["bitsandbytes", "4-bit", "nf4", "quantize-model"]
    report = json.loads((converted / "quantization_report.json").read_text())
    bpp = report["summary"]["bits_per_param"]
    assert f"| Bits per parameter | {bpp:.2f} " in card
    assert "| Block size | 64 |" in card
    assert f'AutoModelForCausalLM.from_pretrained("{DEST}", device_map="auto")' in card
    assert f'load_quantized("{DEST}")' in card
    commit = report["source"]["commit"]
    assert f"(commit `{commit}`)" in card


def test_push_is_resumable(converted: Path, fake_hub: FakeHub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # The commit fails (after the LFS uploads went through): the push is interrupted.
    fake_hub.add_fault(Fault(path=r"/commit/", method="POST", status=500, times=100))
    with pytest.raises(HubDownloadError) as err:
        push_folder(converted, DEST, attempts=2)
    assert str(err.value) == (
        f"{DEST}: upload failed after 2 attempt(s) (HTTP 500); check the connection and rerun the same "
        "command "
        "(files already uploaded are not sent again)"
    )
    assert err.value.exit_code == 1
    uploads = fake_hub.count("PUT", "^/upload/", server="cdn")
    assert uploads >= 1
    fake_hub.faults.clear()
    push_folder(converted, DEST)
    assert fake_hub.count("PUT", "^/upload/", server="cdn") == uploads, (
        "shards already uploaded were sent again"
    )
    assert "README.md" in _remote(fake_hub, DEST)
    # Pushing again changes nothing and uploads nothing.
    push_folder(converted, DEST)
    assert fake_hub.count("PUT", "^/upload/", server="cdn") == uploads


def test_push_without_token_is_a_clear_error(converted: Path, fake_hub: FakeHub) -> None:
    with pytest.raises(HubAccessError) as err:
        push_folder(converted, DEST)
    assert str(err.value) == (  # not "rejected the token": there is none (a CI secret not passed)
        f"{DEST}: no Hugging Face token is set and the Hub asks for one (HTTP 401); run `hf auth login` "
        "or set HF_TOKEN (a token with write access)"
    )
    assert err.value.exit_code == 2
    with pytest.raises(HubAccessError, match="the Hub rejected the token"):
        push_folder(converted, DEST, token="hf_wrong")


def test_push_refuses_unfinished_folder(converted: Path, fake_hub: FakeHub) -> None:
    manifest = converted / ".quantize-model-manifest.json"
    data = json.loads(manifest.read_text())
    data["state"] = "in_progress"
    manifest.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        push_folder(converted, DEST)
    assert str(err.value) == (
        f"{converted}: the conversion is not finished; rerun the same `quantize-model convert` to complete it"
    )
    assert DEST not in fake_hub.repos


@pytest.mark.parametrize("text", ['{"tool": "quantize-model", "finge', "[]\n"])
def test_push_refuses_a_damaged_manifest_as_verify_does(
    converted: Path, fake_hub: FakeHub, monkeypatch, text: str
) -> None:
    """A cut-short (or non-object) manifest: verify calls the folder broken, but push uploaded it (the
    shards verify; the manifest itself is never uploaded). Refused with verify's words and remedy."""
    from converter.tools.inspection import verify_path

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    manifest = converted / ".quantize-model-manifest.json"
    manifest.write_text(text)
    said = verify_path(converted).problems
    with pytest.raises(InputError) as err:
        push_folder(converted, DEST)
    assert said == [str(err.value)]
    assert str(err.value).startswith(f"{manifest}: damaged")
    assert err.value.exit_code == 2
    assert DEST not in fake_hub.repos


@pytest.mark.parametrize("damage", ["flip", "delete", "config"])
def test_push_refuses_a_damaged_folder(converted: Path, fake_hub: FakeHub, monkeypatch, damage: str) -> None:
    """A folder with a missing or changed shard, or an unreadable config.json, was pushed, model card
    last: a repo that looks complete but does not load or loads other weights."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    shard = converted / "model.safetensors"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[-100] ^= 0x01
        shard.write_bytes(bytes(data))
    elif damage == "delete":
        shard.unlink()
    else:
        (converted / "config.json").write_text("{not json")
    with pytest.raises(
        InputError, match=r"not pushed: run `quantize-model verify .*`, then reconvert"
    ) as err:
        push_folder(converted, DEST)
    assert str(err.value).startswith(str(converted / ("config.json" if damage == "config" else shard.name)))
    assert err.value.exit_code == 2
    assert DEST not in fake_hub.repos


def test_convert_push_to(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, monkeypatch
) -> None:
    from converter.writer.pipeline import convert

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake_hub.add_repo(SRC, checkpoint_dir)
    result = convert(SRC, tmp_path / "out", progress=False, push_to=DEST, private=False)
    assert result.pushed_to == f"{fake_hub.endpoint}/{DEST}"
    assert "model.safetensors.index.json" in _remote(fake_hub, DEST)


def test_cli_push(converted: Path, fake_hub: FakeHub, hf_home: Path) -> None:
    env = hub_env(fake_hub, hf_home) | {"HF_TOKEN": TOKEN}
    cmd = [sys.executable, "-c", "from converter.cli import main; main()", "push"]
    ok = subprocess.run(
        [*cmd, str(converted), DEST, "--json"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["ok"] is True
    assert out["url"] == f"{fake_hub.endpoint}/{DEST}"
    assert "README.md" in _remote(fake_hub, DEST)
    bad = subprocess.run(
        [*cmd, str(converted / "nope"), DEST], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        f"Error: {converted / 'nope'}: no such folder; "
        "give the OUTPUT folder of a finished `quantize-model convert`"
    )


def test_quiet_push_and_dequantize_print_no_progress_bars(
    converted: Path, fake_hub: FakeHub, hf_home: Path, tmp_path: Path
) -> None:
    """push -q and dequantize -q of a Hub repo printed huggingface_hub's tqdm bars on stderr (into a
    pipe too: 'model.safetensors: 100%|...', 'Fetching 6 files: 100%|...')."""
    env = hub_env(fake_hub, hf_home) | {"HF_TOKEN": TOKEN}
    del env["HF_HUB_DISABLE_PROGRESS_BARS"]  # what a user has: huggingface_hub's bars on
    cmd = [sys.executable, "-c", "from converter.cli import main; main()"]
    for args in (["push", converted, DEST, "-q"], ["dequantize", DEST, tmp_path / "plain", "-q"]):
        r = subprocess.run([*cmd, *map(str, args)], env=env, cwd=ROOT, capture_output=True, text=True)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), args


def test_a_quiet_repush_of_the_same_folder_prints_nothing(
    converted: Path, fake_hub: FakeHub, hf_home: Path
) -> None:
    """Rerunning a finished push (the documented way to resume one) with -q printed huggingface_hub's
    "No files have been modified since last commit. Skipping to prevent empty commit." twice on stderr
    (the upload and the card commit, both no-ops): nothing changed, so nothing is said."""
    env = hub_env(fake_hub, hf_home) | {"HF_TOKEN": TOKEN}
    cmd = [sys.executable, "-c", "from converter.cli import main; main()", "push", str(converted), DEST, "-q"]
    for attempt in range(2):
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), attempt
    assert "README.md" in _remote(fake_hub, DEST)


def test_push_to_a_branch(converted: Path, fake_hub: FakeHub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_folder(converted, DEST, revision="nf4")
    repo = fake_hub.repos[DEST]
    branch = repo.commits[repo.refs["nf4"]]
    assert "README.md" in branch
    assert "model.safetensors.index.json" in branch
    assert repo.commits[repo.refs["main"]] == {}, "main must be left alone"


def test_the_card_of_a_push_to_a_branch_loads_from_that_branch(
    converted: Path, fake_hub: FakeHub, monkeypatch
) -> None:
    """The card pushed to a branch told readers to load the repo without a revision, i.e. main, which
    a push to a branch leaves as it is (here empty: "no model.safetensors"); its snippets name the
    branch now, and what they load is the branch's model."""
    from converter import load_quantized_state

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_folder(converted, DEST, revision="nf4")
    repo = fake_hub.repos[DEST]
    card = (fake_hub.blobs / repo.commits[repo.refs["nf4"]]["README.md"].sha256).read_bytes().decode()
    assert f'AutoModelForCausalLM.from_pretrained("{DEST}", revision="nf4", device_map="auto")' in card
    assert f'load_quantized("{DEST}", revision="nf4")' in card
    assert len(load_quantized_state(DEST, revision="nf4")) == len(load_quantized_state(converted))
    with pytest.raises(Exception, match=r"no model\.safetensors"):  # what the card loaded: main
        load_quantized_state(DEST)
    push_folder(converted, "me/on-main", revision="main")  # main itself is named as before: not at all
    card = _remote(fake_hub, "me/on-main")["README.md"].decode()
    assert 'load_quantized("me/on-main")' in card


def test_pushing_another_folder_removes_the_old_weights(
    converted: Path, fake_hub: FakeHub, monkeypatch, tmp_path: Path
) -> None:
    """A second push into a repo kept the first push's model.safetensors beside the new shards and
    index: `verify` of a download failed, and transformers loaded the old weights."""
    from converter.writer.pipeline import convert

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_folder(converted, DEST)
    assert "model.safetensors" in _remote(fake_hub, DEST)
    sharded = tmp_path / "sharded"
    convert(SRC, sharded, progress=False, max_shard_size="40KB", quant_type="fp4")
    push_folder(sharded, DEST)
    remote = _remote(fake_hub, DEST)
    local = {k for k in file_hashes(sharded) if not k.startswith(".")}
    assert "model.safetensors" not in remote
    assert {k for k in remote if k.endswith((".safetensors", ".json"))} == {
        k for k in local if k.endswith((".safetensors", ".json"))
    }
    assert "LICENSE" in remote  # other files stay
    assert "README.md" in remote


def test_a_bad_push_to_is_an_input_error_before_converting(
    fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """`convert --push-to "me/bad name"` converted first, then failed as "create repo failed ... check
    the connection" (exit 1)."""
    from converter.writer.pipeline import convert

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake_hub.add_repo(SRC, checkpoint_dir)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="'me/bad name': not a Hub repo id to push to") as err:
        convert(SRC, out, progress=False, push_to="me/bad name")
    assert err.value.exit_code == 2
    assert not out.exists()
    assert fake_hub.count("GET", "") == 0  # nothing asked of the Hub either


def test_push_under_hf_hub_offline_says_so_before_converting(
    converted: Path, checkpoint_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """push with HF_HUB_OFFLINE=1 said "me/tiny-nf4: the repo is not in the local Hugging Face cache
    and HF_HUB_OFFLINE=1; unset HF_HUB_OFFLINE to download it" (an upload downloads nothing), and
    `convert --push-to` said it only after the whole conversion."""
    from huggingface_hub import constants

    from converter.writer.pipeline import convert

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    said = f"{DEST}: HF_HUB_OFFLINE=1 forbids uploads; unset HF_HUB_OFFLINE to push"
    with pytest.raises(InputError) as info:
        push_folder(converted, DEST)
    assert str(info.value) == said
    out = tmp_path / "again"
    with pytest.raises(InputError) as info:
        convert(checkpoint_dir, out, progress=False, push_to=DEST)
    assert str(info.value) == said
    assert not out.exists()


def test_convert_push_to_without_a_token_says_so_before_converting(
    fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, tmp_path: Path
) -> None:
    """`convert --push-to` with no token set converted the whole checkpoint, then failed at the upload
    ("no Hugging Face token is set and the Hub asks for one (HTTP 401)"): for a large model, hours
    before an error known from the start. It is refused now before the output is created (exit 2)."""
    from converter.writer.pipeline import convert

    out = tmp_path / "out"
    with pytest.raises(HubAccessError) as info:
        convert(checkpoint_dir, out, progress=False, push_to=DEST)
    assert str(info.value) == (
        f"{DEST}: no Hugging Face token is set and a push needs one; run `hf auth login` or set HF_TOKEN "
        "(a token with write access)"
    )
    assert info.value.exit_code == 2
    assert not out.exists()
    assert fake_hub.requests == []


def test_a_repush_cut_before_its_card_leaves_no_card_of_the_old_weights(
    converted: Path, fake_hub: FakeHub, monkeypatch, tmp_path: Path
) -> None:
    """The card is committed last as the mark of a complete upload. Pushing another conversion (fp4
    over nf4) into a repo and being cut off between the weights' commit and the card's left the repo
    with the fp4 weights under the first push's nf4 card: it looked complete and described other
    weights. The weights' commit now drops an old card that differs from the new one; a push of the
    same folder again leaves the card alone."""
    from converter.sources.hub_client import HubClient
    from converter.writer.pipeline import convert

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_folder(converted, DEST)
    fp4 = tmp_path / "fp4"
    convert(SRC, fp4, progress=False, quant_type="fp4")
    call = HubClient.call

    def cut_before_the_card(self, what, fn, **kw):
        if what == "model card upload":
            msg = f"{DEST}: cut off"
            raise HubDownloadError(msg)
        return call(self, what, fn, **kw)

    monkeypatch.setattr(HubClient, "call", cut_before_the_card)
    with pytest.raises(HubDownloadError):
        push_folder(fp4, DEST)
    remote = _remote(fake_hub, DEST)
    assert remote["config.json"] == (fp4 / "config.json").read_bytes()  # the weights' commit landed
    assert "README.md" not in remote
    monkeypatch.setattr(HubClient, "call", call)
    push_folder(fp4, DEST)
    assert "fp4" in _card_meta(_remote(fake_hub, DEST)["README.md"].decode())["tags"]
    commits = len(fake_hub.repos[DEST].commits)
    push_folder(fp4, DEST)  # the same folder again: nothing to change, the card stays
    assert len(fake_hub.repos[DEST].commits) == commits
    assert "README.md" in _remote(fake_hub, DEST)


@pytest.mark.parametrize("name", ["bert", "t5"])
def test_the_cards_transformers_snippet_loads_a_model_that_is_not_a_causal_lm(
    name: str, tmp_path: Path, fake_hub: FakeHub, hf_home: Path, monkeypatch
) -> None:
    """The card told every model to load with ``AutoModelForCausalLM``, which fails on a T5
    ("Unrecognized configuration class") or a BertModel (a new LM head, initialised as a quantized
    layer); it names the class of the folder's ``architectures`` now (a causal LM keeps
    ``AutoModelForCausalLM``), and the snippet loads the model."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import TINY, make_tiny

    from converter.writer.pipeline import convert

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / f"{name}-nf4"
    convert(make_tiny(name, tmp_path / name), out, progress=False)
    repo = f"me/{name}-nf4"
    push_folder(out, repo)
    card = _remote(fake_hub, repo)["README.md"].decode()
    arch = TINY[name][1]
    snippet = (
        f'from transformers import {arch}\n\nmodel = {arch}.from_pretrained("{repo}", device_map="auto")'
    )
    assert snippet in card
    assert "AutoModelForCausalLM" not in card
    import transformers

    model = getattr(transformers, arch).from_pretrained(repo, device_map="cpu")  # the card's snippet
    assert getattr(model, "is_loaded_in_4bit", False)
    # what the card said: T5 "Unrecognized configuration class"; BERT builds BertLMHeadModel, whose head
    # the folder lacks, and fails initialising it as a quantized layer ("normal_kernel_cpu" ... 'Byte')
    with pytest.raises((ValueError, NotImplementedError)):
        transformers.AutoModelForCausalLM.from_pretrained(repo, device_map="cpu")


def test_the_cards_snippet_for_repository_code_names_its_auto_class_and_trust_remote_code() -> None:
    from converter.tools.push import transformers_loader

    config = {
        "architectures": ["MyModel"],
        "auto_map": {"AutoConfig": "c.MyConfig", "AutoModel": "m.MyModel"},
    }
    assert transformers_loader(config) == ("AutoModel", ", trust_remote_code=True")
    assert transformers_loader({"architectures": ["LlamaForCausalLM"]}) == ("AutoModelForCausalLM", "")
    assert transformers_loader({"architectures": ["GPT2LMHeadModel"]}) == ("AutoModelForCausalLM", "")
    assert transformers_loader({}) == ("AutoModelForCausalLM", "")


def test_a_push_the_hub_forbids_says_the_token_cannot_write(
    converted: Path, fake_hub: FakeHub, monkeypatch
) -> None:
    """HTTP 403 on an upload (a read-only or fine-grained token without write permission there) said
    'run `hf auth login` or set HF_TOKEN (a token with write access) with a token that can read it':
    reading was never the problem."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake_hub.add_fault(Fault(path=r"/commit/", method="POST", status=403, times=1))
    with pytest.raises(HubAccessError) as err:
        push_folder(converted, DEST)
    assert str(err.value) == (
        f"{DEST}: access denied (HTTP 403): the token may not write to this repo; run `hf auth login` or "
        "set HF_TOKEN with a token that has write access to it (a fine-grained token needs write "
        "permission on the repo or its organization)"
    )
    assert err.value.exit_code == 2


def test_push_refuses_a_shard_the_index_does_not_list(
    converted: Path, fake_hub: FakeHub, monkeypatch
) -> None:
    """A folder holding a .safetensors file its index does not list (an older conversion's shards left
    by a copy over it) was pushed whole: the repo held the stray shard beside the index's, which
    loaders that glob *.safetensors (vLLM) read too. verify reports it; push refuses it, exit 2."""
    import shutil

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    stray = converted / "model-00001-of-00002.safetensors"
    shutil.copyfile(converted / "model.safetensors", stray)
    with pytest.raises(InputError) as err:
        push_folder(converted, DEST)
    assert str(err.value) == (
        f"{stray}: a shard the index does not list (loaders that glob *.safetensors would read it); the "
        "folder is not pushed: remove it, then push again"
    )
    assert err.value.exit_code == 2
    assert DEST not in fake_hub.repos
    stray.unlink()
    push_folder(converted, DEST)
    assert "model-00001-of-00002.safetensors" not in _remote(fake_hub, DEST)


@pytest.mark.parametrize("recorded", ["repo_id", "before"])
def test_the_card_of_a_conversion_from_a_cache_snapshot_names_its_base_model(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, monkeypatch, recorded: str
) -> None:
    """A folder converted from a Hugging Face cache snapshot path (``…/models--org--tiny/snapshots/<sha>``)
    was pushed with no base_model in its card ("the local checkpoint `<sha>`"): the snapshot is that
    Hub repo at that commit. Named now, for a folder an earlier version converted too (its report has
    only the commit as the source's name; the path is in its manifest)."""
    from huggingface_hub import snapshot_download

    from converter.sources import local
    from converter.writer.pipeline import convert

    fake_hub.add_repo(SRC, checkpoint_dir)
    snapshot = Path(snapshot_download(SRC))
    out = tmp_path / "tiny-nf4"
    with monkeypatch.context() as m:
        if recorded == "before":  # as the versions before recorded a snapshot: by its path alone
            m.setattr(local, "hub_cache_snapshot", lambda root: None)
        convert(snapshot, out, progress=False)
    source = json.loads((out / "quantization_report.json").read_text())["source"]
    assert ("repo_id" in source) == (recorded == "repo_id")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_folder(out, DEST)
    card = _remote(fake_hub, DEST)["README.md"].decode()
    meta = _card_meta(card)
    assert meta["base_model"] == SRC
    assert meta["base_model_relation"] == "quantized"
    assert f"[{SRC}](https://huggingface.co/{SRC}) (commit `{snapshot.name}`)" in card
    assert "local checkpoint" not in card


def test_the_card_of_a_local_folder_names_no_base_model(
    tmp_path: Path, fake_hub: FakeHub, hf_home: Path, checkpoint_dir: Path, monkeypatch
) -> None:
    """Any other local folder (here one whose manifest names a path that is no cache snapshot) has no
    base model: the card says which local checkpoint it was."""
    from converter.writer.pipeline import convert

    out = tmp_path / "tiny-nf4"
    convert(checkpoint_dir, out, progress=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_folder(out, DEST)
    card = _remote(fake_hub, DEST)["README.md"].decode()
    assert "base_model" not in _card_meta(card)
    assert f"the local checkpoint `{checkpoint_dir.name}`" in card
