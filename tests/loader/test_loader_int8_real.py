"""SmolLM2-135M (real weights) as LLM.int8: our loader's perplexity vs transformers + bitsandbytes."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from converter.loader.model import load_quantized

TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "panels of cables, and every new problem meant a new physical arrangement. Stored programs changed "
    "that: instructions became data, and the same machine could run a payroll in the morning and a "
    "weather simulation at night. Assembly languages gave names to instructions, compilers turned "
    "formulas into machine code, and operating systems shared one processor among many users. Each "
    "layer hid details of the one below it, so that people could think about their problem instead of "
    "the hardware. Today a programmer can train a language model with a few lines of code, while "
    "libraries handle memory, parallelism and numerical precision. Quantization is one of those hidden "
    "details: weights are stored in eight or four bits instead of sixteen, which halves or quarters the "
    "memory a model needs, and careful scaling keeps the answers almost the same. The trick is to choose "
    "scales so that the largest values in each row still fit, while small values keep enough resolution."
)


def _perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(float(loss))


@pytest.mark.slow
def test_smollm2_int8_perplexity_within_one_percent_of_bitsandbytes(
    smollm2_model: Path, tmp_path: Path
) -> None:
    """Ours within 1% of stock transformers + bitsandbytes loading the same folder, and both near
    the bf16 model: int8 moves this 170-token text's perplexity by up to 2% (ours: 1.1% lower on an
    AVX-512 AMD EPYC (Zen 5), 0.57% off on an AVX2-only one; the bf16 model's own matmul rounding
    differs by CPU path). bitsandbytes' int8 x int8 matmul also quantizes the activations, which lands
    further off on some CPUs (1.8% lower on that Zen 5, 0.05% off on the AVX2 one): its bound says only
    that stock reads the folder right (a wrong SCB or layout gives perplexities in the hundreds)."""
    from converter.writer.pipeline import convert

    out = tmp_path / "int8"
    convert(smollm2_model, out, quant_type="int8", progress=False)
    ids = transformers.AutoTokenizer.from_pretrained(smollm2_model)(TEXT, return_tensors="pt").input_ids
    assert ids.shape[1] > 150
    ours = load_quantized(out, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
        full = transformers.AutoModelForCausalLM.from_pretrained(smollm2_model, device_map="cpu").eval()
    ppl_ours, ppl_bnb, ppl_full = _perplexity(ours, ids), _perplexity(ref, ids), _perplexity(full, ids)
    assert abs(ppl_ours / ppl_bnb - 1) < 0.01, (ppl_ours, ppl_bnb, ppl_full)
    assert abs(ppl_ours / ppl_full - 1) < 0.02, (ppl_ours, ppl_bnb, ppl_full)
    assert abs(ppl_bnb / ppl_full - 1) < 0.05, (ppl_ours, ppl_bnb, ppl_full)
