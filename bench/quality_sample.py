"""A real-weights NF4 sample small enough to travel to the GPU machine: SmolLM2-135M cut down.

The device tool carries at most 64 MiB with the working tree, and the whole SmolLM2 NF4 folder is 112 MB
(57 MB of it the bf16 embedding). This keeps SmolLM2's real weights but fewer of them:

- the decoder layers ``--keep`` (of 30; default the first 3 and the last 9, numbered 0..11 in the sample)
  and the final norm, unchanged. Cutting layers hurts a 135M model: bf16 perplexity of the text 53 with
  all 30 layers, ~1200 with these 12 (the first 12 alone: ~8e9, no longer a language model), but the
  predictions stay those of a model, which is what comparing the kernel paths needs;
- the embedding (tied to the head) cut to the first ``--vocab`` token rows, plus the rows of every token
  of ``bench_generate.TEXT`` above them, appended; the text's token ids remapped to that vocabulary are
  written to ``quality_ids.json`` (the tokenizer is not needed, and not carried);

then converts it with our pipeline (NF4, blocksize 64, nested absmax: bitsandbytes' defaults). What the
sample is for: the **kernel paths** on real weight distributions, CPU and CUDA on identical bytes
(``bench_generate.py --quality --nf4 SAMPLE``, with ``quantize-model dequantize SAMPLE`` as the bf16
contender, so the reference has exactly the sample's weights). Its perplexity is not SmolLM2's (12 of 30
layers, a vocabulary of ~8k): the real model's quantization error is measured on the CPU, whole.

    python bench/quality_sample.py [--keep 0-2,21-29] [--vocab 8192] [--out .cache/quality]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from bench_generate import TEXT
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


def parse_keep(spec: str) -> list[int]:
    """ "0-2,21-29" -> [0, 1, 2, 21, ..., 29]."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def cut(source: Path, dst: Path, keep: list[int], vocab: int) -> list[int]:
    """The cut-down bf16 checkpoint in ``dst``; returns TEXT's token ids in its vocabulary."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(source)(TEXT).input_ids
    extra = sorted({i for i in ids if i >= vocab})
    new_id = {old: vocab + n for n, old in enumerate(extra)}
    rows = list(range(vocab)) + extra
    renumber = {old: new for new, old in enumerate(keep)}
    tensors = {}
    with safe_open(source / "model.safetensors", "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.startswith("model.layers."):
                parts = key.split(".")
                if int(parts[2]) not in renumber:
                    continue
                key = ".".join([*parts[:2], str(renumber[int(parts[2])]), *parts[3:]])
            elif key == "model.embed_tokens.weight":
                t = t[rows].contiguous()
            tensors[key] = t
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)  # the sample's source names its GGUF origin
    config.update(num_hidden_layers=len(keep), vocab_size=len(rows), _model_name_or_path=f"{source.name}-cut")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return [new_id.get(i, i) for i in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", default="0-2,21-29", help="decoder layers kept, in order")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=REPO / ".cache/quality")
    args = ap.parse_args()
    from converter import convert
    from converter.tools import samples

    source = samples.smollm2(REPO / ".cache/samples")
    keep = parse_keep(args.keep)
    name = f"smollm2-{len(keep)}l"
    src, nf4 = args.out / f"{name}-src", args.out / f"{name}-nf4"
    ids = cut(source, src, keep, args.vocab)
    convert(src, nf4, progress=False, overwrite=True)
    shutil.rmtree(src)  # the bf16 cut is made again on the device by `quantize-model dequantize`
    (nf4 / "quality_ids.json").write_text(json.dumps({"text": TEXT, "ids": ids}))
    size = sum(p.stat().st_size for p in nf4.iterdir() if p.is_file())
    vocab = json.loads((nf4 / "config.json").read_text())["vocab_size"]
    print(f"{nf4}: {size / 1e6:.1f} MB (layers {args.keep}, vocabulary {vocab}, {len(ids)} text tokens)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
