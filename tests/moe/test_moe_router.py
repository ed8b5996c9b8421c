"""The fused MoE router (``quantize_model::route_topk``, converter/loader/router.py) on the CPU: the op
against transformers' router forwards bit for bit, which routers are swapped and which are not, and
the loaded models with ``fused_router`` on and off (logits, recorded router logits, torch.compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from converter.loader import router
from converter.loader.model import load_quantized

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 11, 90, 3, 45]])
HIDDEN = 48


def _router(family: str, experts: int, k: int, renorm: bool) -> torch.nn.Module:
    """transformers' own router module of ``family`` with random weights (eval mode)."""
    import transformers

    common = dict(hidden_size=HIDDEN, num_experts_per_tok=k)
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter as cls

        cfg = transformers.MixtralConfig(num_local_experts=experts, **common)
    else:
        mod = {"qwen3_moe": "qwen3_moe", "qwen2_moe": "qwen2_moe", "olmoe": "olmoe"}[family]
        name = {"qwen3_moe": "Qwen3Moe", "qwen2_moe": "Qwen2Moe", "olmoe": "Olmoe"}[family]
        module = __import__(f"transformers.models.{mod}.modeling_{mod}", fromlist=["x"])
        cls = getattr(module, f"{name}TopKRouter")
        cfg = getattr(transformers, f"{name}Config")(num_experts=experts, norm_topk_prob=renorm, **common)
    m = cls(cfg).eval()
    with torch.no_grad():
        m.weight.normal_(std=0.5)
    return m


def _outputs_equal(a: tuple, b: tuple) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype
        assert x.shape == y.shape
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    ("family", "renorm"),
    [("qwen3_moe", True), ("qwen3_moe", False), ("qwen2_moe", True), ("olmoe", False), ("mixtral", True)],
)
def test_fused_router_bit_identical_to_transformers(family, renorm, dtype):
    """For T in {1, 7} tokens, E in {8, 60, 128} experts and k in {1, 2, 6, 8}: the swapped router (eager
    route and the custom op) returns transformers' (logits, scores, indices), values, dtypes and shapes."""
    g = torch.Generator().manual_seed(0)
    for experts in (8, 60, 128):
        for k in (1, 2, 6, 8):
            m = _router(family, experts, k, renorm).to(dtype)
            hidden = torch.randn(7, HIDDEN, generator=g).to(dtype)
            for tokens in (1, 7):
                x = hidden[:tokens]
                with torch.no_grad():
                    ref = m(x)
                    assert router.install(m) == [""]
                    fused = m(x)
                    renorm_used = True if family == "mixtral" else renorm
                    out_dtype = None if family == "mixtral" else dtype
                    via_op = torch.ops.quantize_model.route_topk(ref[0], k, renorm_used, out_dtype)
                    router.uninstall(m)
                _outputs_equal(fused, ref)
                _outputs_equal(via_op, ref[1:])
                assert ref[1].dtype == (torch.float32 if family == "mixtral" else dtype)


def test_swapped_router_keeps_its_class_and_falls_back_when_training():
    m = _router("qwen3_moe", 8, 2, True)
    cls = type(m)
    router.install(m)
    assert isinstance(m, cls)
    assert type(m) is not cls
    assert type(m)._qm_fused_router == "cast"
    # gradients to the router: transformers' forward (the op has no backward)
    m.train()
    x = torch.randn(3, HIDDEN)
    _, scores, _ = m(x)
    (scores * torch.randn(scores.shape)).sum().backward()  # a plain sum of renormalised scores is constant
    assert m.weight.grad is not None
    assert m.weight.grad.abs().sum() > 0
    router.uninstall(m)
    assert type(m) is cls


def test_parametrized_router_trains_and_uninstalls():
    """A weight parametrization added after install (what PEFT's LoRA on the router does) makes a
    subclass of the fused class: training falls back to transformers' forward once (it recursed
    forever), eval still fuses and equals the parametrized transformers forward, and uninstall keeps
    the parametrization on the original class."""
    from torch.nn.utils import parametrize

    class Scale(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 2

    m = _router("qwen3_moe", 8, 2, True)
    cls = type(m)
    x = torch.randn(3, HIDDEN)
    router.install(m)
    parametrize.register_parametrization(m, "weight", Scale())
    m.train()
    _, scores, _ = m(x)
    (scores * torch.randn(scores.shape)).sum().backward()
    assert m.parametrizations.weight.original.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        fused = m(x)
        router.uninstall(m)
        assert isinstance(m, cls)
        assert getattr(type(m), "_qm_fused_router", None) is None
        _outputs_equal(fused, m(x))
        plain = _router("qwen3_moe", 8, 2, True)
        plain.weight.copy_(m.weight)  # the parametrized weight (2x the original)
        _outputs_equal(fused, plain(x))


def test_only_known_router_forwards_are_swapped():
    """A router class whose name matches but whose forward differs (here: a subclass outside
    transformers, and one with an extra scaling) keeps its own forward; so do other modules."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    class Qwen3MoeTopKRouter(Qwen3MoeTopKRouter):  # same name, this test's module
        pass

    m = _router("qwen3_moe", 8, 2, True)
    m.__class__ = Qwen3MoeTopKRouter
    assert router.router_kind(m) is None
    assert router.install(m) == []

    # the source check: a transformers class whose forward is not the pattern
    assert router._normalized("def forward(self, x):\n  return x  # c\n") == "def forward(self, x):\nreturn x"
    line = "router_scores = router_top_value"
    changed = router._CAST_FORWARD.replace(line, line.replace("= ", "= 2 * "))
    assert router._normalized(changed) != router._normalized(router._CAST_FORWARD)
    for cls_name, (_, expected) in router.ROUTERS.items():
        assert expected.count("softmax") == 1, cls_name

    # attributes the forward reads must be there
    m2 = _router("qwen3_moe", 8, 2, True)
    del m2.norm_topk_prob
    assert router.router_kind(m2) is None
    assert router.router_kind(torch.nn.Linear(4, 4)) is None


def test_deepseek_router_is_not_swapped(folders):
    q, _ = folders("deepseek_v3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_quantized(q)
    assert not any(getattr(type(m), "_qm_fused_router", None) for m in model.modules())


def _logits_and_routers(model, ids=IDS):
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    return out.logits, out.router_logits


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "olmoe"])
def test_loaded_model_same_logits_with_fused_router_on_and_off(folders, name):
    """load_quantized's default swaps every router; logits (prefill of 12 tokens and a 1-token step) and the
    recorded router logits equal those with fused_router=False bit for bit."""
    q, _ = folders(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = load_quantized(q)
        plain = load_quantized(q, fused_router=False)
    routers = [m for m in fused.modules() if getattr(type(m), "_qm_fused_router", None)]
    assert len(routers) == fused.config.num_hidden_layers
    assert not any(getattr(type(m), "_qm_fused_router", None) for m in plain.modules())
    for ids in (IDS, IDS[:, :1]):
        got_logits, got_routers = _logits_and_routers(fused, ids)
        ref_logits, ref_routers = _logits_and_routers(plain, ids)
        assert torch.equal(got_logits, ref_logits)
        assert len(got_routers) == len(ref_routers) == len(routers)
        for a, b in zip(got_routers, ref_routers, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_loaded_model_with_fused_routers_pickles(folders, how):
    """A served model is pickled (torch.save of the whole model, multiprocessing): the swapped routers
    pickle as their fused class (not looked up by name, where transformers' class is found instead) and
    the copy routes as the original."""
    import io
    import pickle

    q, _ = folders("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_quantized(q)
    if how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    kinds = [getattr(type(m), "_qm_fused_router", None) for m in twin.modules()]
    assert kinds.count("mixtral") == model.config.num_hidden_layers
    for ids in (IDS, IDS[:, :1]):
        got_logits, got_routers = _logits_and_routers(twin, ids)
        ref_logits, ref_routers = _logits_and_routers(model, ids)
        assert torch.equal(got_logits, ref_logits)
        for a, b in zip(got_routers, ref_routers, strict=True):
            assert torch.equal(a, b)


_COMPILE_SCRIPT = r"""
import json, sys, warnings
import torch
from torch._dynamo.utils import counters
from converter.loader.model import load_quantized

folder = sys.argv[1]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = load_quantized(folder)
    plain = load_quantized(folder, fused_router=False)
ids = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64]])
targets = []

def backend(gm, example_inputs):
    targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return gm.forward

with torch.no_grad():
    eager = plain(ids).logits
    compiled = torch.compile(model.forward, fullgraph=True, backend=backend)
    got = compiled(input_ids=ids).logits
print(json.dumps({
    "graph_breaks": sum(counters["graph_break"].values()),
    "route_nodes": sum("route_topk" in t for t in targets),
    "equal": bool(torch.equal(got, eager)),
    "layers": model.config.num_hidden_layers,
}))
"""


def test_compile_fullgraph_has_the_router_op(folders):
    """torch.compile(fullgraph=True) traces the fused routers as one route_topk node per layer (their
    fake) without a break, and the compiled forward gives the logits of transformers' own routers.
    A child process: ``make test`` disables dynamo."""
    q, _ = folders("qwen3_moe")
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", _COMPILE_SCRIPT, str(q)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["graph_breaks"] == 0
    assert got["route_nodes"] == got["layers"]
    assert got["equal"]


def test_self_check_batch_has_ties_and_is_fixed():
    """The self-check's logits hold repeated maxima and equal values (what the tie order decides), and
    the same seed gives the same batch (a decision is reproducible)."""
    x = router.check_batch(60, torch.bfloat16)
    assert torch.equal(x, router.check_batch(60, torch.bfloat16))
    top2 = x.float().topk(2, dim=-1).values
    assert (top2[:, 0] == top2[:, 1]).sum() >= router.CHECK_ROWS // 8
    assert x.shape == (router.CHECK_ROWS, 60)
