"""Host cost, per ``generate()`` call, of the checks ``graphed_greedy`` runs before its prefill.

``converter.loader.decode._unsupported`` decides whether the device loop reproduces the call exactly
(else transformers' loop runs): it scans the generation config, the logits processors and stopping
criteria, asks the model's ``prepare_inputs_for_generation`` what a decode step would feed, and lays
out (without tensors) the StaticCache transformers would make. That is per call, not per token; this
prints its wall time beside what one call's decode costs at a given speed.

The model is built on the meta device (the checks read its classes and config, never its weights);
the prompt and its attention mask live on ``--device``, so on CUDA the mask check's device sync is
included. Shapes: Llama-3.1-8B (32 layers), a 512-token prompt, 128 new tokens, sampled (top-k,
top-p, temperature: the most processors the loop takes) and greedy.

    cd /tmp && python /path/to/bench/bench_decode_checks.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationConfig

from converter.loader import decode

LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}


def _call_parts(model, ids: torch.Tensor, gc: GenerationConfig):
    """The processors, criteria and model kwargs ``generate()`` hands a ``custom_generate`` loop."""
    gc._eos_token_tensor = None  # generate() sets it from the special tokens; none here
    processors = model._get_logits_processor(
        generation_config=gc,
        input_ids_seq_length=ids.shape[1],
        encoder_input_ids=ids,
        prefix_allowed_tokens_fn=None,
        logits_processor=[],
        device=ids.device,
        model_kwargs={},
    )
    criteria = model._get_stopping_criteria(generation_config=gc, stopping_criteria=[])
    cache = DynamicCache(config=model.config)
    kwargs = {"attention_mask": torch.ones_like(ids), "cache": cache, "use_cache": True}
    return processors, criteria, kwargs


def check_ms(model, ids: torch.Tensor, gc: GenerationConfig, rounds: int) -> float:
    """Best wall time of one ``_unsupported`` call over ``rounds``, in ms; exits if the loop would not
    run (the check then measured a fallback's reason, not the loop's way in)."""
    processors, criteria, kwargs = _call_parts(model, ids, gc)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        reason = decode._unsupported(model, ids, processors, criteria, gc, kwargs)
        best = min(best, time.perf_counter() - t0)
        if reason is not None:
            msg = f"the device loop would fall back: {reason}"
            raise SystemExit(msg)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    config = AutoConfig.for_model("llama", **LLAMA_8B)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ids = torch.zeros(1, args.prompt, dtype=torch.long, device=args.device)
    cases = {
        "greedy": GenerationConfig(max_new_tokens=args.new, do_sample=False),
        "sampled": GenerationConfig(
            max_new_tokens=args.new, do_sample=True, temperature=0.7, top_k=50, top_p=0.9
        ),
    }
    results = {"device": args.device, "prompt": args.prompt, "new_tokens": args.new}
    print(f"graphed_greedy's checks per generate() call (Llama-3.1-8B shape, device {args.device})")
    for name, gc in cases.items():
        ms = check_ms(model, ids, gc, args.rounds)
        results[f"{name}_ms"] = ms
        # at 300 tok/s (the 8B graphed-compiled decode on an H200) one call decodes for new / 300 s
        share = ms / (args.new / 300 * 1e3)
        print(f"  {name:8s} {ms:7.2f} ms per call  ({share:.1%} of a {args.new}-token decode at 300 tok/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
