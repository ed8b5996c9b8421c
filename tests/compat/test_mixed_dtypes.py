"""Checkpoints whose tensors do not all have one dtype (norms in float32, linears in bf16 or fp16).

transformers' ``from_pretrained`` builds the model in one dtype (``dtype="auto"``: config.json's
``dtype``, else the first float tensor's) and casts every float tensor to it (float32 only where its
dtype plan keeps ``_keep_in_fp32_modules``), then bitsandbytes quantizes the cast weights; its
``save_pretrained`` so writes one dtype. A pre-quantized folder is loaded with each kept tensor in the
dtype it is stored in, so a float32 norm in a bf16 model makes transformers' forward fail ("expected m1
and m2 to have the same dtype").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from bnb_cpu_path import bnb_generic_cpu_path
from safetensors.torch import save_file
from tiny_models import load_logged, read_tensors

from converter.writer.pipeline import convert

IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 1]])


def _qs(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()).decode())


def _logits(model: torch.nn.Module) -> torch.Tensor:
    bnb_generic_cpu_path(model)  # bnb's AVX512-BF16 repack fails on 96-input rows
    with torch.no_grad():
        return model(IDS).logits


def _mixed(
    src: Path, folder: Path, linear: torch.dtype, config_dtype: str | None, wide: torch.dtype = torch.float32
) -> Path:
    """The tiny bf16 Llama with ``wide`` (float32 or float64) norms, ``wide`` q_proj values that bf16
    does not hold exactly, the other tensors in ``linear``; config.json's dtype ``config_dtype`` (None: no
    dtype field)."""
    shutil.copytree(src, folder)
    torch.manual_seed(3)
    out = {}
    for k, v in read_tensors(src).items():
        if "norm" in k:
            out[k] = (v.float() + 0.01 * torch.rand(v.shape)).to(wide)
        elif "q_proj" in k:
            out[k] = (v.float() + 1e-4 * torch.randn(v.shape)).to(wide)
        else:
            out[k] = v.to(linear)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    if config_dtype:
        config["dtype"] = config_dtype
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("linear", "config_dtype", "wide"),
    [
        (torch.bfloat16, "bfloat16", torch.float32),
        (torch.float16, "bfloat16", torch.float32),
        (torch.bfloat16, None, torch.float32),
        # float64 norms and q_proj: transformers casts them to the model dtype too (and bitsandbytes
        # quantizes the cast q_proj); they were written float64, q_proj kept: the folder's forward failed
        # in transformers ("mixed dtype (CPU)" in the first norm)
        (torch.bfloat16, "bfloat16", torch.float64),
        (torch.bfloat16, None, torch.float64),
    ],
)
def test_mixed_dtypes_convert_like_bitsandbytes(
    tiny_checkpoint, tmp_path, linear, config_dtype, wide
) -> None:
    src = _mixed(tiny_checkpoint("llama"), tmp_path / "src", linear, config_dtype, wide)
    convert(src, tmp_path / "ours", double_quant=False, progress=False, warn=lambda _: None)
    qc = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    ref, _, _ = load_logged(src, quantization_config=qc)
    ref.save_pretrained(tmp_path / "bnb")
    ours_t, ref_t = read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "bnb")
    assert set(ours_t) == set(ref_t)
    assert {k: ours_t[k].dtype for k in ref_t} == {k: ref_t[k].dtype for k in ref_t}
    for k in ref_t:
        if ".quant_state." in k:
            assert _qs(ours_t[k]) == _qs(ref_t[k]), k
        else:
            assert torch.equal(ours_t[k], ref_t[k]), k
    ours_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    ref_cfg = json.loads((tmp_path / "bnb" / "config.json").read_text())
    assert ours_cfg["dtype"] == ref_cfg["dtype"]
    qkey = "bnb_4bit_compute_dtype"
    assert ours_cfg["quantization_config"][qkey] == ref_cfg["quantization_config"][qkey]
    ours, info, _ = load_logged(tmp_path / "ours")
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert torch.equal(_logits(ours), _logits(ref))
