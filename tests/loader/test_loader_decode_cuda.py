"""``graphed_greedy`` on the GPU: decode steps recorded into CUDA graphs give generate()'s tokens.

The reference is transformers' own greedy loop on a static cache of the same model: the replayed graphs
run the same kernels on the same cache, so the tokens are equal. Needs an NVIDIA GPU (skipped otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from loader_helpers import WEIGHT_CHANGES, change_weights, greedy_reference, sample_reference
from transformers import StaticCache

from converter.loader import decode
from converter.loader.decode import graphed_greedy
from converter.loader.model import load_quantized

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64]])


def _load(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_quantized(folder, device="cuda").eval()


@pytest.fixture(scope="module")
def model(our_folder: Path):
    return _load(our_folder)


@pytest.mark.parametrize("steps_per_graph", [1, 4, 16])
def test_graphed_tokens_equal_transformers_greedy(model, steps_per_graph: int) -> None:
    ids = IDS.cuda()
    kw = {"max_new_tokens": 37, "min_new_tokens": 37, "pad_token_id": 0}
    want = greedy_reference(model, ids, **kw)
    got = model.generate(ids, custom_generate=graphed_greedy, steps_per_graph=steps_per_graph, **kw)
    assert torch.equal(got, want)
    states = decode._graphs[decode._own_caches[model]]
    assert any(s.graphs for s in states.values()), "no CUDA graph was recorded"


def test_second_call_replays_without_recording(model) -> None:
    ids = IDS.cuda()
    kw = {"max_new_tokens": 40, "min_new_tokens": 40, "pad_token_id": 0}
    model.generate(ids, custom_generate=graphed_greedy, steps_per_graph=8, **kw)
    state = next(iter(decode._graphs[decode._own_caches[model]].values()))
    recorded = dict(state.graphs)
    got = model.generate(ids, custom_generate=graphed_greedy, steps_per_graph=8, **kw)
    assert {n: id(g) for n, g in state.graphs.items()} == {n: id(g) for n, g in recorded.items()}
    assert torch.equal(got, greedy_reference(model, ids, **kw))


def test_graphed_eos_stop_and_batch_padding(model) -> None:
    ids = torch.cat([IDS, IDS.flip(1)]).cuda()
    eos = int(greedy_reference(model, ids[:1], max_new_tokens=4, pad_token_id=0)[0, ids.shape[1] + 3])
    kw = {"max_new_tokens": 30, "eos_token_id": eos, "pad_token_id": 3, "min_new_tokens": 2}
    want = greedy_reference(model, ids, **kw)
    got = model.generate(ids, custom_generate=graphed_greedy, steps_per_graph=4, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "sampling",
    [
        {"top_k": 5},
        {"temperature": 0.7, "top_k": 0, "top_p": 0.9},
        {"top_k": 0, "min_p": 0.05},
        {"top_k": 20, "top_p": 0.8, "repetition_penalty": 1.5},  # the history buffer in the graphs
    ],
)
def test_graphed_sampling_equals_transformers_sampling_with_the_same_seed(model, sampling: dict) -> None:
    """do_sample=True recorded into CUDA graphs: the warpers and the exponential draws replay with the
    generator's offsets advancing as eager calls advance them, so the tokens are transformers' for the
    same seed; a second call replays the recorded graphs with new draws."""
    ids = torch.cat([IDS, IDS.flip(1)]).cuda()
    kw = {"max_new_tokens": 37, "pad_token_id": 0, **sampling}
    want = sample_reference(model, ids, seed=7, **kw)
    torch.manual_seed(7)
    got = model.generate(ids, do_sample=True, custom_generate=graphed_greedy, steps_per_graph=8, **kw)
    assert torch.equal(got, want)
    states = decode._graphs[decode._own_caches[model]]
    sampled = [s for s in states.values() if s.processors is not None and s.processors.sample]
    assert sampled
    assert all(s.graphs for s in sampled), "no CUDA graph was recorded"
    recorded = {(id(s), n): id(g) for s in sampled for n, g in s.graphs.items()}
    want2 = sample_reference(model, ids, seed=8, **kw)
    torch.manual_seed(8)
    got2 = model.generate(ids, do_sample=True, custom_generate=graphed_greedy, steps_per_graph=8, **kw)
    now = {(id(s), n): id(g) for s in sampled for n, g in s.graphs.items()}
    assert all(now[key] == g for key, g in recorded.items())  # the first call's graphs replayed
    assert torch.equal(got2, want2)
    assert not torch.equal(got2, got)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_graphed_padded_prompts_equal_transformers(model, sample: bool) -> None:
    """Left-padded prompts in CUDA graphs: per-row positions and the padding mask buffer replay."""
    ids = torch.cat([IDS, IDS.flip(1), IDS.roll(3, 1)])
    mask = torch.ones_like(ids)
    mask[0, :3] = mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, 77).cuda()
    kw = {"max_new_tokens": 37, "pad_token_id": 0, "attention_mask": mask.cuda()}
    if sample:
        kw.update(top_k=8, repetition_penalty=1.3)
        want = sample_reference(model, ids, seed=3, **kw)
    else:
        want = greedy_reference(model, ids, **kw)
    torch.manual_seed(3)
    got = model.generate(ids, do_sample=sample, custom_generate=graphed_greedy, steps_per_graph=8, **kw)
    assert torch.equal(got, want)
    states = decode._graphs[decode._own_caches[model]]
    assert any(s.mask is not None and s.graphs for s in states.values()), "no padded graph was recorded"


def test_graphed_greedy_with_a_repetition_penalty_equals_transformers(model) -> None:
    ids = torch.cat([IDS, IDS.flip(1)]).cuda()
    kw = {"max_new_tokens": 37, "pad_token_id": 0, "repetition_penalty": 1.8}
    want = greedy_reference(model, ids, **kw)
    got = model.generate(ids, custom_generate=graphed_greedy, steps_per_graph=8, **kw)
    assert torch.equal(got, want)
    assert not torch.equal(want, greedy_reference(model, ids, **{**kw, "repetition_penalty": 1.0}))


def test_compiled_step_in_graphs_gives_the_eager_tokens(our_folder: Path) -> None:
    """compile_step=True (inductor, then recorded): same tokens, in a child process (dynamo on)."""
    code = f"""
import torch, warnings
warnings.simplefilter("ignore")
from converter.loader.decode import graphed_greedy
from converter.loader.model import load_quantized
from transformers import StaticCache
m = load_quantized({str(our_folder)!r}, device="cuda").eval()
ids = torch.tensor({IDS.tolist()}).cuda()
kw = dict(max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
c = StaticCache(config=m.config, max_cache_len=ids.shape[1] + 24)
want = m.generate(ids, do_sample=False, cache=c, disable_compile=True, **kw)
got = m.generate(ids, custom_generate=graphed_greedy, compile_step=True, steps_per_graph=8, **kw)
assert torch.equal(got, want), (got, want)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok"), out.stdout[-3000:]


def _graphs_after_weight_change(
    our_folder: Path, other_folder: Path, change: str, compile_step: bool
) -> None:
    """Graphs recorded on a cache, then ``change`` gives the model other 4-bit weights: the next call on
    that cache records again (the old graphs launch with the kernel tensors the change released: freed,
    maybe reused memory) and gives a fresh model's tokens for the new weights, on the same path."""
    n = 13  # the prefill's token, 2 eager warm-up steps, then graphs of 4, 4 and 2 steps
    kw = {"max_new_tokens": n, "min_new_tokens": n, "pad_token_id": 0}
    ids = IDS.cuda()
    model = _load(our_folder)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + n)
    run = {"custom_generate": graphed_greedy, "steps_per_graph": 4, "compile_step": compile_step, **kw}
    before = model.generate(ids, cache=cache, **run)
    (state,) = decode._graphs[cache].values()
    assert state.graphs, "no CUDA graph was recorded"
    change_weights(model, change, other_folder)
    cache.reset()
    after = model.generate(ids, cache=cache, **run)
    assert all(s is not state for s in decode._graphs[cache].values())
    fresh = _load(our_folder)
    change_weights(fresh, change, other_folder)
    want = fresh.generate(ids, **run)
    assert not torch.equal(want, before)  # the change changes the tokens
    assert torch.equal(after, want)
    if not compile_step:  # the graphs' tokens are transformers' own (compiled: see the test above)
        assert torch.equal(want, greedy_reference(fresh, ids, **kw))


# not "peft_bnb_merge": its general path reads the nested offset of bnb's state (a device tensor) on the
# host at every call, which a CUDA graph capture refuses, whatever came before
@pytest.mark.parametrize("change", [c for c in WEIGHT_CHANGES if c != "peft_bnb_merge"])
def test_weights_changed_after_recording_record_again(
    our_folder: Path, other_folder: Path, change: str
) -> None:
    _graphs_after_weight_change(our_folder, other_folder, change, compile_step=False)


@pytest.mark.parametrize("change", ["load_state_dict", "weight_data"])
def test_weights_changed_after_recording_a_compiled_step_record_again(
    dynamo, our_folder: Path, other_folder: Path, change: str
) -> None:
    _graphs_after_weight_change(our_folder, other_folder, change, compile_step=True)
