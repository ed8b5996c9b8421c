"""The MoE model under torch.compile in generate(), and the experts' eager route vs the custom op.

generate() as ``bench/moe_whole.py`` times it (and as users are told to run it): one StaticCache made
up front, reset and passed as ``cache=`` to every call; the decode step (one token) through
``torch.compile(fullgraph=True)``, the prefill eager. Run in a child process: ``make test`` disables
dynamo (TORCHDYNAMO_DISABLE=1), and a crash in generated code must fail this test, not the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converter.loader import moe_cuda
from converter.loader.model import load_quantized
from converter.loader.moe import moe_modules

ROOT = Path(__file__).resolve().parents[2]
_ON_CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not moe_cuda.available(), reason="no CUDA"),
]
_CUDA = pytest.param("cuda", marks=_ON_CUDA)

_SCRIPT = r"""
import json, sys, warnings
import torch
from torch._dynamo.utils import counters
from transformers import StaticCache
from converter.loader.model import load_quantized

folder, backend, device = sys.argv[1], sys.argv[2], sys.argv[3]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = load_quantized(folder, device=device)
ids = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64]], device=device)
new = 6
cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new)

def generate():
    cache.reset()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, disable_compile=True, cache=cache, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits).float()

with torch.no_grad():
    eager_tokens, eager_logits = generate()
    how = {"mode": backend} if backend == "reduce-overhead" else {"backend": backend}
    step = torch.compile(model.forward, fullgraph=True, **how)
    prefill = model.forward
    model.forward = lambda *a, **k: (step if k["input_ids"].shape[-1] == 1 else prefill)(*a, **k)
    runs = [generate() for _ in range(3)]  # compile (+ CUDA-graph record), then again on the reset cache
first = ids.shape[1] + 1
print(json.dumps({
    "graphs": counters["stats"]["unique_graphs"],
    "graph_breaks": sum(counters["graph_break"].values()),
    "tokens_equal": [bool(torch.equal(t, eager_tokens)) for t, _ in runs],
    "first_token_equal": bool(torch.equal(runs[-1][0][:, :first], eager_tokens[:, :first])),
    "max_diff": (runs[-1][1][1] - eager_logits[1]).abs().max().item(),
    "max_logit": eager_logits[1].abs().max().item(),
    "steps": runs[-1][1].shape[0],
}))
"""


def _run(folder: Path, backend: str, device: str = "cpu") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", _SCRIPT, str(folder), backend, device]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, f"child exited with {done.returncode}:\n{done.stderr[-3000:]}"
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["graphs"] >= 1, "dynamo compiled nothing"
    assert got["graph_breaks"] == 0
    assert got["steps"] == 6
    return got


def test_generate_static_cache_fullgraph_gives_the_eager_tokens(folders):
    """aot_eager runs the ATen ops and our custom op that eager runs: the same logits, the same tokens,
    on the first compiled call and again on the reset cache."""
    q, _ = folders("qwen3_moe")
    got = _run(q, "aot_eager")
    assert got["tokens_equal"] == [True, True, True]
    assert got["max_diff"] == 0.0


@pytest.mark.parametrize(
    ("backend", "device"),
    [
        ("inductor", "cpu"),
        pytest.param(
            "reduce-overhead",
            "cuda",
            marks=_ON_CUDA,
        ),
    ],
)
def test_generate_static_cache_inductor_fullgraph(folders, backend, device):
    """Inductor (the benchmark's compiled mode: default on the CPU, reduce-overhead with CUDA graphs on
    the GPU): one graph, no break, the eager first token (the prefill is eager in both), and the first
    decode step's logits close to eager's."""
    q, _ = folders("qwen3_moe")
    got = _run(q, backend, device)
    assert got["first_token_equal"]
    # Inductor fuses the bf16 elementwise ops around the 4-bit layers (RMSNorm, rotary, SiLU, the
    # router's softmax input) and rounds their intermediates to bf16 at other points than eager: each
    # such rounding is at most 2^-8 relative; a few per layer over 2 layers stay within 2^-4 of the
    # largest logit.
    assert got["max_diff"] <= 2**-4 * got["max_logit"]


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("strided", [False, True], ids=["router", "strided-ids"])
def test_eager_route_equals_the_custom_op(folders, strided, device):
    """Eager calls skip the custom op's Python dispatch (host time per layer and token) but run the same
    implementation: bit-identical to ``torch.ops.quantize_model.moe_experts_4bit``, also for expert ids
    and weights that are strided views (the kernels read ids by pointer). CUDA: the fused SiLU decode."""
    q, _ = folders("qwen3_moe")
    m = next(iter(moe_modules(load_quantized(q, device=device)).values()))
    torch.manual_seed(0)
    x = torch.randn(3, m.hidden_dim, dtype=torch.bfloat16).to(device)
    idx = torch.tensor([[0, 9, 1, 9], [2, 9, 3, 9], [1, 9, 2, 9]], device=device)
    w = torch.rand(3, 4, dtype=torch.bfloat16).to(device)
    idx, w = (idx[:, ::2], w[:, ::2]) if strided else (idx[:, ::2].contiguous(), w[:, ::2].contiguous())
    with torch.no_grad():
        eager = m(x, idx, w)
        via_op = torch.ops.quantize_model.moe_experts_4bit(
            x, idx, w, m.packed, m.absmax, m.quant_map, m.intermediate_dim, m.blocksize, m.act_name, True
        )
    assert torch.equal(eager, via_op)
    assert torch.equal(eager, m(x, idx.contiguous(), w.contiguous()))
