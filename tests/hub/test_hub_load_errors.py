"""`load_quantized_state` / `load_quantized` of a Hub repo id the Hub refuses, or without the subfolder
asked for: the error says what to do, as `convert` says it (docs/hub.md, "Retries and errors")."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_hub import FakeHub
from hub_helpers import qm

from converter.errors import SourceNotFoundError
from converter.loader.state import load_quantized_state

pytestmark = pytest.mark.hub

TOKEN = "hf_test_token"


@pytest.fixture
def nf4_folder(tmp_path: Path, checkpoint_dir: Path) -> Path:
    out = tmp_path / "nf4"
    assert qm("convert", checkpoint_dir, out, "-q").exit_code == 0
    return out


def test_refused_access_to_a_hub_repo_says_what_to_do(
    fake_hub: FakeHub, hf_home: Path, nf4_folder: Path
) -> None:
    """A gated repo, a private one without a token and a rejected token: the loaders named
    huggingface_hub's exception only ("GatedRepoError: 403 Client Error."), never how to get access."""
    fake_hub.add_repo("org/gated", nf4_folder, gated=True)
    fake_hub.add_repo("org/private", nf4_folder, private=True)
    with pytest.raises(SourceNotFoundError) as err:
        load_quantized_state("org/gated")
    assert str(err.value).startswith("org/gated: not a local folder, and the Hub repo could not be fetched")
    assert (
        f"gated repo; request access at {fake_hub.endpoint}/org/gated, then run `hf auth login` "
        "or set HF_TOKEN (or pass token=) with an account that has it"
    ) in str(err.value)
    with pytest.raises(SourceNotFoundError) as err:
        load_quantized_state("org/private")
    assert (
        "check the repo id, or if it is private run `hf auth login` or set HF_TOKEN (or pass token=)"
        in str(err.value)
    )
    with pytest.raises(SourceNotFoundError) as err:
        load_quantized_state("org/private", token="hf_wrong")
    assert (
        "the Hub rejected the token (HTTP 401); "
        "run `hf auth login` or set HF_TOKEN (or pass token=) with a valid token" in str(err.value)
    )
    assert len(load_quantized_state("org/gated", token=TOKEN)) > 0  # with a token it works
    # an error that is not about access keeps its one cause, with no advice about tokens
    with pytest.raises(SourceNotFoundError) as err:
        load_quantized_state("org/gated", token=TOKEN, revision="v9")
    assert "RevisionNotFoundError" in str(err.value)
    assert "HF_TOKEN" not in str(err.value)


def test_a_subfolder_the_hub_repo_lacks_is_named(fake_hub: FakeHub, hf_home: Path, nf4_folder: Path) -> None:
    """``subfolder=`` naming no folder of the repo: the error named a path in the cache that does not
    exist ("…/snapshots/<sha>/v2: no model.safetensors.index.json …"), not the missing subfolder, as a
    local folder's does ("has no subfolder 'v2'")."""
    fake_hub.add_repo("org/variants", {f"v1/{p.name}": p for p in nf4_folder.iterdir() if p.is_file()})
    assert len(load_quantized_state("org/variants", subfolder="v1")) > 0
    with pytest.raises(SourceNotFoundError) as err:
        load_quantized_state("org/variants", subfolder="v2")
    assert str(err.value).startswith("org/variants: the Hub repo has no subfolder 'v2'")
    assert "snapshots" not in str(err.value)
