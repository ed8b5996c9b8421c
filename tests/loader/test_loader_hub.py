"""Loading by Hub repo id (the local fake Hub of tests/hub), in a subprocess with its own HF_HOME."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub"))

from fake_hub import FakeHub
from hub_helpers import hub_env

POOLING = "1_Pooling/config.json"


def _run_script(hub: FakeHub, home: Path, script: str, *args: str) -> list[str]:
    """``script`` (with ``args``) in a fresh interpreter against ``hub``, HF_HOME ``home``: its stdout
    lines, once it has exited with 0."""
    argv = [sys.executable, "-c", script, *args]
    out = subprocess.run(argv, env=hub_env(hub, home), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


SCRIPT = """
import sys, torch
from converter import load_quantized, load_quantized_state
from converter.loader.model import linear4bit_modules
from formats.record import QuantizedTensor
state = load_quantized_state("org/tiny-nf4")
print(sum(isinstance(v, QuantizedTensor) for v in state.values()))
ids = torch.tensor([[1, 5, 9, 33]])
models = [load_quantized("org/tiny-nf4"), load_quantized(sys.argv[1])]
for m in models:
    for layer in linear4bit_modules(m).values():
        layer.use_gemv = False
with torch.no_grad():
    print(torch.equal(models[0](ids).logits, models[1](ids).logits))
print(models[0].name_or_path, models[0].config.name_or_path)
try:
    load_quantized_state("org/missing")
except Exception as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.hub
def test_load_by_repo_id(our_folder: Path, tmp_path: Path) -> None:
    with FakeHub(tmp_path / "store") as hub:
        hub.add_repo("org/tiny-nf4", our_folder)
        lines = _run_script(hub, tmp_path / "home", SCRIPT, str(our_folder))
    assert lines[0] == "14"
    assert lines[1] == "True"
    assert lines[2] == "org/tiny-nf4 org/tiny-nf4"  # the repo id, as from_pretrained records it
    assert lines[3].startswith("SourceNotFoundError org/missing: not a local folder, and the Hub repo")
    assert len(lines) == 4  # one line: the cause is named, not dumped


REMOTE_CODE_SCRIPT = """
import torch
from converter import load_quantized
model = load_quantized("org/remote-nf4", trust_remote_code=True)
print(type(model).__name__)
with torch.no_grad():
    print(tuple(model(torch.tensor([[1, 5, 9, 33]])).logits.shape))
"""


@pytest.mark.hub
def test_repository_code_of_a_hub_repo_is_fetched_with_trust_remote_code(
    our_folder: Path, tmp_path: Path
) -> None:
    """A Hub repo whose config names repository code (auto_map, configuration_*.py / modeling_*.py, as
    convert copies them): with trust_remote_code=True the .py files are fetched with the shards and
    that class is built, as for a local folder; the snapshot used to hold JSON and weights only."""
    import shutil

    from tiny_models import add_repository_code

    folder = tmp_path / "remote"
    shutil.copytree(our_folder, folder)
    add_repository_code(folder)
    with FakeHub(tmp_path / "store") as hub:
        hub.add_repo("org/remote-nf4", folder)
        lines = _run_script(hub, tmp_path / "home", REMOTE_CODE_SCRIPT)
    assert " ".join(lines).split() == ["MyForCausalLM", "(1,", "4,", "256)"]


TOKENIZER_SCRIPT = """
from transformers import AutoTokenizer
from converter import load_quantized
model = load_quantized("org/chat-nf4")
# the repo id, as from_pretrained records it; local_files_only: from the snapshot load_quantized fetched
tok = AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)
print(tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False))
"""


@pytest.mark.hub
def test_snapshot_of_a_hub_repo_holds_its_chat_template(our_folder: Path, tmp_path: Path) -> None:
    """The snapshot load_quantized fetches holds the tokenizer files, chat_template.jinja included
    (transformers 5 saves a tokenizer's chat template there): the tokenizer loaded from the model's
    name_or_path formats chats as the repo's own tokenizer does."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "chat"
    shutil.copytree(our_folder, folder)
    words = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "user": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(folder)
    assert (folder / "chat_template.jinja").is_file()
    with FakeHub(tmp_path / "store") as hub:
        hub.add_repo("org/chat-nf4", folder)
        lines = _run_script(hub, tmp_path / "home", TOKENIZER_SCRIPT)
    assert lines == ["<user>hello"]


REVISION_SCRIPT = """
from converter import load_quantized
for revision in (None, "int8"):
    model = load_quantized("org/tiny", revision=revision)
    print(revision, getattr(model, "is_loaded_in_8bit", False), getattr(model, "is_loaded_in_4bit", False))
try:
    load_quantized("org/tiny", revision="v9")
except Exception as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.hub
def test_revision_picks_the_branch(our_folder: Path, int8_folder: Path, tmp_path: Path) -> None:
    """``load_quantized(repo_id, revision=...)`` loads that branch, as ``from_pretrained`` does; it used
    to land in the config keyword arguments, where a local snapshot ignores it: main was loaded."""
    with FakeHub(tmp_path / "store") as hub:
        hub.add_repo("org/tiny", our_folder)
        hub.add_repo("org/tiny", int8_folder, branch="int8")
        lines = _run_script(hub, tmp_path / "home", REVISION_SCRIPT)
    assert lines[:2] == ["None False True", "int8 True False"]
    assert lines[2].startswith("SourceNotFoundError org/tiny: not a local folder, and the Hub repo")
    assert "could not be fetched at revision 'v9' (RevisionNotFoundError" in lines[2]
    assert len(lines) == 3


DOWNLOAD_OPTIONS_SCRIPT = """
import sys
from converter import load_quantized
token, cache = sys.argv[1], sys.argv[2]
try:
    load_quantized("org/private-nf4")
except Exception as exc:
    print(type(exc).__name__)
for force_download in (False, False, True):
    model = load_quantized("org/private-nf4", token=token, cache_dir=cache, force_download=force_download)
    print(model.name_or_path, model.is_loaded_in_4bit, flush=True)
    input()  # the test counts the downloads so far
model = load_quantized("org/private-nf4", cache_dir=cache, local_files_only=True, low_cpu_mem_usage=True)
print(model.is_loaded_in_4bit)
"""


@pytest.mark.hub
def test_token_cache_dir_and_force_download_reach_the_hub(our_folder: Path, tmp_path: Path) -> None:
    """``load_quantized(repo_id, token=, cache_dir=, force_download=, local_files_only=)`` download as
    ``from_pretrained`` does (they used to be taken for config attributes and dropped): a private repo
    loads with the token only, the files land in ``cache_dir`` (HF_HOME's cache stays empty), a second
    load downloads nothing and ``force_download=True`` downloads every shard again; the cache then serves
    ``local_files_only=True``. ``low_cpu_mem_usage`` is accepted (transformers 5 ignores it)."""
    from hub_helpers import TOKEN

    shards = sorted(p.name for p in our_folder.glob("*.safetensors"))
    assert len(shards) > 1
    cache, home = tmp_path / "my-cache", tmp_path / "home"
    with FakeHub(tmp_path / "store") as hub:
        hub.add_repo("org/private-nf4", our_folder, private=True)
        script = [sys.executable, "-c", DOWNLOAD_OPTIONS_SCRIPT, TOKEN, str(cache)]
        proc = subprocess.Popen(
            script, env=hub_env(hub, home), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "SourceNotFoundError"  # private: no token, no repo
        downloads = []
        for _ in range(3):
            assert proc.stdout.readline().split() == ["org/private-nf4", "True"]
            downloads.append(hub.count("GET", "^/blobs/", server="cdn"))  # LFS files: the shards
            proc.stdin.write("\n")
            proc.stdin.flush()
        assert proc.stdout.readline().strip() == "True"
        assert proc.wait(timeout=300) == 0
    # each shard once, none on the cached load, all again when forced
    assert downloads == [len(shards), len(shards), 2 * len(shards)]
    snapshots = list((cache / "models--org--private-nf4" / "snapshots").iterdir())
    assert len(snapshots) == 1
    assert sorted(p.name for p in snapshots[0].glob("*.safetensors")) == shards
    assert not any((home / "hub").glob("models--*"))


SUBFOLDER_SCRIPT = """
import sys
from pathlib import Path
from converter import load_quantized
def fetched(cache):
    snapshot = next(Path(cache).glob("models--org--multi/snapshots/*"))
    paths = [p.relative_to(snapshot) for p in snapshot.rglob("*") if p.is_file()]
    return sorted({p.parts[0] if len(p.parts) > 1 else "." for p in paths})
for source in ("org/multi", sys.argv[1]):
    for sub in ("nf4", "int8"):
        model = load_quantized(source, subfolder=sub)
        print(sub, getattr(model, "is_loaded_in_4bit", False), getattr(model, "is_loaded_in_8bit", False))
        if source == "org/multi" and sub == "nf4":
            print(fetched(sys.argv[2]))  # only the subfolder's files
cache = Path(sys.argv[2]).parent / "fresh"
print(load_quantized("org/multi", cache_dir=cache).is_loaded_in_4bit, fetched(cache))
try:
    load_quantized(sys.argv[1], subfolder="fp4")
except Exception as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.hub
def test_subfolder_loads_that_folder_of_a_repo_or_local_folder(
    our_folder: Path, int8_folder: Path, tmp_path: Path
) -> None:
    """``load_quantized(repo_or_folder, subfolder="nf4")`` loads the checkpoint in that folder, as
    ``from_pretrained`` does; it used to reach AutoConfig only (config.json from the subfolder, shards
    looked for at the top: "no model.safetensors.index.json ... not a checkpoint folder"). Without
    ``subfolder`` the top-level checkpoint is fetched without the subfolders' shards (it used to fetch
    every variant's)."""
    import shutil

    local = tmp_path / "local"
    shutil.copytree(our_folder, local / "nf4")
    shutil.copytree(int8_folder, local / "int8")
    files = {f"{sub}/{p.relative_to(local / sub).as_posix()}": p for sub in ("nf4", "int8") for p in
             sorted((local / sub).rglob("*")) if p.is_file()}  # fmt: skip
    files.update({p.name: p for p in our_folder.iterdir() if p.is_file()})  # the top-level checkpoint
    files["additional_chat_templates/tool_use.jinja"] = b"{{ messages }}"  # as transformers 5 saves them
    with FakeHub(tmp_path / "store") as hub:
        hub.add_repo("org/multi", files)
        home = tmp_path / "home"
        lines = _run_script(hub, home, SUBFOLDER_SCRIPT, str(local), str(home / "hub"))
    assert lines[:5] == ["nf4 True False", "['nf4']", "int8 False True", "nf4 True False", "int8 False True"]
    # without subfolder: the top-level checkpoint (and its chat templates), none of the subfolders' files
    assert lines[5] == "True ['.', 'additional_chat_templates']"
    assert lines[6] == f"SourceNotFoundError {local}: has no subfolder 'fp4'"
    assert len(lines) == 7


HUB_OPTIONS_SCRIPT = """
import sys
from pathlib import Path
from converter.loader import dequantize_checkpoint, load_quantized_state
from converter.loader.estimate import estimate
from formats.int8 import Int8Tensor
token, cache, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
try:
    load_quantized_state("org/private", revision="int8", cache_dir=cache)
except Exception as exc:
    print(type(exc).__name__)
hub = {"revision": "int8", "token": token, "cache_dir": cache}
state = load_quantized_state("org/private", **hub)
print(sum(isinstance(v, Int8Tensor) for v in state.values()))
plan, per_device = estimate("org/private", "cpu", **hub)
print(plan, sorted(per_device))
print(dequantize_checkpoint("org/private", out, dtype="float32", **hub).tensors_dequantized)
"""


@pytest.mark.hub
def test_state_estimate_and_dequantize_take_revision_token_and_cache_dir(
    our_folder: Path, int8_folder: Path, tmp_path: Path
) -> None:
    """``load_quantized_state``, ``estimate`` and ``dequantize_checkpoint`` fetch a Hub repo id with
    ``revision``, ``token`` and ``cache_dir`` as ``load_quantized`` does (they were TypeErrors): the
    private repo's int8 branch, downloaded into ``cache_dir`` (HF_HOME's cache stays empty)."""
    from hub_helpers import TOKEN

    cache, home = tmp_path / "my-cache", tmp_path / "home"
    with FakeHub(tmp_path / "store") as hub:
        hub.add_repo("org/private", our_folder, private=True)
        hub.add_repo("org/private", int8_folder, branch="int8")
        lines = _run_script(hub, home, HUB_OPTIONS_SCRIPT, TOKEN, str(cache), str(tmp_path / "plain"))
    assert lines[0] == "SourceNotFoundError"  # a private repo: no token, no repo
    assert lines[1] == "14"
    assert lines[2] == "{'': 'cpu'} ['cpu']"
    assert lines[3] == "14"
    assert (tmp_path / "plain" / "config.json").is_file()
    assert list((cache / "models--org--private" / "snapshots").iterdir())
    assert not any((home / "hub").glob("models--*"))


ST_MODULES = (
    '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},\n'
    ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},\n'
    ' {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]\n'
)
ST_SCRIPT = """
import subprocess, sys
from pathlib import Path
from converter.loader import dequantize_checkpoint, load_quantized_state
out, cache = Path(sys.argv[1]), Path(sys.argv[2])
load_quantized_state("org/st-nf4", cache_dir=cache)
snapshot = next(cache.glob("models--org--st-nf4/snapshots/*"))
print(sorted(p.name for p in snapshot.iterdir() if p.is_dir()))  # loading fetches no module folder
print(dequantize_checkpoint("org/st-nf4", out / "api").tensors_dequantized)
cli = [sys.executable, "-m", "converter", "dequantize", "org/st-nf4", str(out / "cli"), "-q"]
print(subprocess.run(cli, capture_output=True, text=True).returncode)
"""


@pytest.mark.hub
def test_dequantize_of_a_hub_repo_copies_its_sentence_transformers_module_folders(
    our_folder: Path, tmp_path: Path
) -> None:
    """``dequantize`` of a local sentence-transformers folder copies its module folders
    (``1_Pooling/config.json``, as convert does); of a Hub repo id it lost them: the snapshot holds no
    file of a deeper folder. The folders modules.json names are now fetched for dequantize (load_quantized
    still fetches none of them); a folder modules.json does not name (``runs/``) is neither fetched nor
    copied."""
    files: dict[str, bytes | Path] = {p.name: p for p in our_folder.iterdir() if p.is_file()}
    files["modules.json"] = ST_MODULES.encode()
    files[POOLING] = b'{"pooling_mode_mean_tokens": true}\n'
    files["runs/log.json"] = b"{}"
    with FakeHub(tmp_path / "store") as hub:
        hub.add_repo("org/st-nf4", files)
        lines = _run_script(hub, tmp_path / "home", ST_SCRIPT, str(tmp_path / "out"), str(tmp_path / "c"))
    assert lines == ["[]", "14", "0"]
    for way in ("api", "cli"):
        out = tmp_path / "out" / way
        assert (out / POOLING).read_bytes() == files[POOLING]
        assert (out / "modules.json").read_bytes() == files["modules.json"]
        assert not (out / "runs").exists()


MORE_HUB_OPTIONS_SCRIPT = """
import sys
from pathlib import Path
from converter.loader import dequantize_checkpoint, load_quantized_state
from converter.loader.estimate import estimate
from formats.int8 import Int8Tensor
cache, out = sys.argv[1], Path(sys.argv[2])
state = load_quantized_state("org/multi", subfolder="int8", cache_dir=cache)
print(sum(isinstance(v, Int8Tensor) for v in state.values()))
plan, per_device = estimate("org/multi", "cpu", subfolder="int8", cache_dir=cache, local_files_only=True)
print(plan, sorted(per_device))
hub = {"subfolder": "int8", "cache_dir": cache, "force_download": True}
print(dequantize_checkpoint("org/multi", out, dtype="float32", **hub).tensors_dequantized)
for call in (load_quantized_state, lambda *a, **k: estimate(*a, "cpu", **k)):
    try:
        call("org/multi", subfolder="nf4", cache_dir=cache, local_files_only=True)  # never fetched
    except Exception as exc:
        print(type(exc).__name__)
"""


@pytest.mark.hub
def test_state_estimate_and_dequantize_take_force_download_local_files_only_and_subfolder(
    our_folder: Path, int8_folder: Path, tmp_path: Path
) -> None:
    """``load_quantized_state``, ``estimate`` and ``dequantize_checkpoint`` take ``force_download``,
    ``local_files_only`` and ``subfolder`` for a Hub repo id as ``load_quantized`` does (they were
    TypeErrors): the int8 subfolder is fetched once, served from the cache with ``local_files_only``,
    fetched again with ``force_download``; a subfolder never fetched is not found offline."""
    files = {f"{sub}/{p.name}": p for sub, folder in (("nf4", our_folder), ("int8", int8_folder))
             for p in folder.iterdir() if p.is_file()}  # fmt: skip
    shards = len(list(int8_folder.glob("*.safetensors")))
    with FakeHub(tmp_path / "store") as hub:
        hub.add_repo("org/multi", files)
        args = (str(tmp_path / "cache"), str(tmp_path / "plain"))
        lines = _run_script(hub, tmp_path / "home", MORE_HUB_OPTIONS_SCRIPT, *args)
        downloads = hub.count("GET", "^/blobs/", server="cdn")
    assert lines == ["14", "{'': 'cpu'} ['cpu']", "14", "SourceNotFoundError", "SourceNotFoundError"]
    assert downloads == 2 * shards  # fetched, then forced; none for local_files_only
    assert (tmp_path / "plain" / "config.json").is_file()
