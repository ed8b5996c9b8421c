"""A folder holding both ``model.safetensors`` and ``model.safetensors.index.json`` naming other shards.

transformers' ``from_pretrained`` resolves ``model.safetensors`` before the index
(``modeling_utils._get_resolved_checkpoint_files``) and never opens the index. A source converts
``model.safetensors`` too, with a warning; a quantized folder in that state (our loader, ``verify`` and
``inspect`` read the index: its sha256 digests are the folder's identity) is refused, naming both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from tiny_models import make_tiny, read_tensors

from converter.cli import cli
from converter.errors import InputError
from converter.loader.model import load_quantized
from converter.writer.pipeline import convert

NORM = "model.norm.weight"


def _sharded(name: str, folder: Path, seed: int) -> Path:
    """Tiny ``name`` with random norms (a kept tensor that tells the two checkpoints apart), saved in
    shards of 20 kB (an index and several shard files)."""
    torch.manual_seed(seed)
    model = make_tiny(name, folder / "tmp", seed=seed)
    m = transformers.AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        m.model.norm.weight.uniform_(0.5, 1.5)
    m.save_pretrained(folder, max_shard_size="20kB")
    shutil.rmtree(folder / "tmp")
    return folder


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A folder with model.safetensors (model A) and an index with its shards (model B)."""
    root = tmp_path_factory.mktemp("both")
    single = make_tiny("llama", root / "a", seed=0)
    sharded = _sharded("llama", root / "b", seed=1)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    folder = root / "both"
    shutil.copytree(sharded, folder)
    shutil.copy(single / "model.safetensors", folder / "model.safetensors")
    return folder, read_tensors(single), read_tensors(sharded)


def test_transformers_loads_model_safetensors(both) -> None:
    """The premise: from_pretrained reads model.safetensors, not the index."""
    folder, a, b = both
    assert not torch.equal(a[NORM], b[NORM])
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert torch.equal(model.model.norm.weight, a[NORM])


def test_convert_reads_what_transformers_reads(both, tmp_path: Path) -> None:
    """convert read the index's shards (model B) where transformers loads model A."""
    folder, a, _ = both
    messages: list[str] = []
    convert(folder, tmp_path / "out", progress=False, warn=messages.append)
    assert torch.equal(read_tensors(tmp_path / "out")[NORM], a[NORM])
    (note,) = [m for m in messages if "model.safetensors.index.json" in m]
    assert "as transformers' from_pretrained does" in note


def test_quantized_folder_with_both_is_refused(both, tmp_path: Path) -> None:
    """Our loader, verify and inspect read the index; transformers loads model.safetensors: refused."""
    folder, _, _ = both
    out = tmp_path / "out"
    convert(_sharded("llama", tmp_path / "b", seed=1), out, progress=False, max_shard_size="40kB")
    assert not (out / "model.safetensors").exists()
    convert(folder, tmp_path / "single", progress=False)
    shutil.copy(tmp_path / "single" / "model.safetensors", out / "model.safetensors")
    with pytest.raises(InputError, match=r"transformers' from_pretrained loads model\.safetensors"):
        load_quantized(out)
    for command, code in (("verify", 1), ("inspect", 2)):  # a problem verify found; a refused input
        r = CliRunner().invoke(cli, [command, str(out)])
        assert r.exit_code == code, (command, r.output)
        assert "transformers' from_pretrained loads model.safetensors" in r.output, (command, r.output)
        assert "not a valid quantize-model shard" not in r.output, (command, r.output)
