"""Training around 4-bit MoE experts (``--moe-experts quantize``): gradients flow through them to the
input and the routing weights (the op's registered backward), so LoRA adapters elsewhere in the model
train; and module casts (``.half()``, ``.to(dtype)``) leave their float32 scales alone."""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from packaging.version import Version

from converter.loader import moe
from converter.loader.model import load_quantized
from converter.loader.moe import moe_experts_4bit, moe_modules

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 11, 90, 3, 45]])


def _float64_dequant(packed, absmax, quant_map, n, blocksize, dtype):
    # The kernels decode to 16/32-bit floats only; gradcheck needs float64 (the same codes x absmax).
    return moe.ops._dequantize_torch(packed, absmax, n, blocksize, quant_map, dtype)


CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
)


#: top-2 routes of 3 tokens: experts shared between tokens; and tokens with one expert in both slots
ROUTES = {"distinct": [[0, 3], [3, 1], [2, 0]], "repeated": [[1, 1], [3, 1], [2, 2]]}


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "relu"])
@pytest.mark.parametrize("routes", list(ROUTES))
def test_backward_matches_finite_differences(folders, monkeypatch, act, device, routes):
    """The op's hand-written backward (gradients for the input and the routing weights; the 4-bit
    weights are frozen) against torch.autograd.gradcheck's float64 finite differences, on one layer's
    real experts with tokens routed to several experts (some to the same one twice), and with tokens
    routed to one expert in both slots (the forward counted one of the two: its Jacobian disagreed)."""
    monkeypatch.setattr(moe, "_dequant", _float64_dequant)
    q, _ = folders("qwen3_moe")
    m = next(iter(moe_modules(load_quantized(q, device=device)).values()))
    gen = torch.Generator().manual_seed(0)
    tokens, k = 3, 2
    x = torch.randn(tokens, m.hidden_dim, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    idx = torch.tensor(ROUTES[routes], device=device)
    w = torch.rand(tokens, k, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    if act == "relu":  # keep every pre-activation away from relu's kink at 0 (finite differences)
        gate_up = torch.stack([m.expert_weights(e, torch.float64)[0] for e in range(m.num_experts)])
        while (torch.einsum("eoh,th->teo", gate_up, x.detach()).abs() < 1e-3).any():
            x = (x.detach() + 0.01).requires_grad_()

    def f(x, w):
        return moe_experts_4bit(
            x, idx, w, m.packed, m.absmax, m.quant_map, m.intermediate_dim, m.blocksize, act, False
        )

    # float64 central differences: truncation ~eps^2 |f'''| plus rounding ~2^-53 |f| / eps, about 1e-10
    # for O(1) values, far inside atol / rtol (the analytic side is exact up to float64 rounding)
    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-6, rtol=1e-4)


def _train(
    model: torch.nn.Module, steps: int, check: Callable[[torch.nn.Module], None] | None = None
) -> list:
    """AdamW steps of causal-LM loss on IDS over the trainable parameters (``check`` after each backward)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        if check is not None:
            check(model)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_lora_trains_through_4bit_experts(folders):
    """PEFT LoRA on the attention of a model whose experts are 4-bit: the loss goes down, the adapters of
    the first layer (before a MoE block) get gradients, and the experts' codes and scales never change."""
    q, _ = folders("qwen3_moe")
    model = load_quantized(q)
    frozen = {n: (m.packed.clone(), m.absmax.clone()) for n, m in moe_modules(model).items()}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model, config)

    def check(model: torch.nn.Module) -> None:
        # lora_B starts at zero, so lora_A's first gradient is zero: lora_B's is what came back
        first = [p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n]
        assert first
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in first)

    losses = _train(model, 6, check)
    assert losses[-1] < losses[0]
    for n, m in moe_modules(model).items():
        packed, absmax = frozen[n.removeprefix("base_model.model.")]
        assert torch.equal(m.packed, packed)
        assert torch.equal(m.absmax, absmax)


@pytest.mark.parametrize("target", ["mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"])
def test_lora_target_parameters_on_4bit_experts_is_refused_clearly(folders, target):
    """PEFT's target_parameters on 4-bit experts failed with PEFT's "no target_parameters found" (beside
    target_modules: a warning, and no expert trained): register_lora(config, model) refuses the config,
    saying why and what to do instead. A config naming no expert passes as before."""
    from converter.loader.lora import register_lora

    q, _ = folders("qwen3_moe")
    model = load_quantized(q)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], target_parameters=[target])
    with pytest.raises(ValueError, match=r"name 4-bit MoE experts .*not supported.*--moe-experts keep"):
        register_lora(config, model)
    plain = peft.LoraConfig(r=4, target_modules=["q_proj"])
    assert register_lora(plain, model) is plain


REFUSAL = (
    r"name 4-bit MoE experts \(\d layers?, e\.g\. 'model\.layers\.\d\.mlp\.experts'\).*not supported.*q_proj"
)


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("qwen3_moe", ["gate_proj", "up_proj", "down_proj"]),
        ("qwen3_moe", ["q_proj", "down_proj"]),
        ("qwen3_moe", ["experts"]),
        ("qwen3_moe", r".*\.experts\.\d+\.gate_proj"),
        ("mixtral", ["w1", "w3", "w2"]),
        ("mixtral", ["w1", "w2"]),
    ],
)
def test_lora_target_modules_on_4bit_experts_are_refused_clearly(folders, name, targets):
    """target_modules naming the 4-bit experts (their per-expert projections, which PEFT maps onto the
    fused experts' parameters, or the experts module) got PEFT's generic errors ("No `target_modules`
    passed but also no `target_parameters` found", "Target module QuantExperts4bit(...) is not
    supported", "Cannot convert PEFT target(s) w1 without also targeting w3"): check_targets (and
    register_lora(config, model), which calls it) refuses the config, naming the experts and what works."""
    from converter.loader.lora import check_targets, register_lora

    q, _ = folders(name)
    model = load_quantized(q)
    config = peft.LoraConfig(r=4, target_modules=targets)
    with pytest.raises(ValueError, match=REFUSAL) as err:
        check_targets(config, model)
    assert "--moe-experts keep" in str(err.value)
    assert "model.dequantize()" in str(err.value)
    with pytest.raises(ValueError, match=REFUSAL):
        register_lora(peft.LoraConfig(r=4, target_modules=targets), model)
    assert config.target_modules == peft.LoraConfig(r=4, target_modules=targets).target_modules  # unchanged


#: PEFT 0.22 keeps a target naming nn.Linear layers only (our 4-bit layers, bitsandbytes installed) as a
#: module target; up to 0.21 its transformers-5 conversion took every gate_proj / up_proj / down_proj of
#: DeepSeek-V3 for the routed experts' fused parameters (get_peft_model then wrapped none of them).
PEFT_KEEPS_LINEAR_TARGETS = (
    Version(peft.__version__) >= Version("0.22") and importlib.util.find_spec("bitsandbytes") is not None
)


def _wrapped(model: torch.nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _named(model: torch.nn.Module, targets: list[str] | str) -> set[str]:
    """The linear layers ``targets`` name as PEFT matches them (a list: by suffix; a string: a regex)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    if isinstance(targets, str):
        return {n for n in names if re.fullmatch(targets, n)}
    return {n for n in names if any(n == t or n.endswith(f".{t}") for t in targets)}


def _trains(model: torch.nn.Module, layers: set[str]) -> None:
    """One step: every adapter of ``layers`` gets a gradient (lora_B's: lora_B starts at zero)."""
    _train(model, 1)
    grads = {
        n.removeprefix("base_model.model.").partition(".lora_B")[0]: p.grad
        for n, p in model.named_parameters()
        if ".lora_B." in n
    }
    assert set(grads) == layers
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


SHARED = ["shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"]


@pytest.mark.parametrize(
    ("targets", "widened"),
    [
        (["q_a_proj", *SHARED], None),
        (SHARED, None),
        # PEFT 0.22 turns a regex into the leaf names it matched: the dense MLP is wrapped too (a warning)
        (r".*\.shared_experts\.(gate|up|down)_proj", ["gate_proj", "up_proj", "down_proj"]),
        (["q_a_proj", "mlp.down_proj"], None),  # the dense first layer's
    ],
)
def test_lora_on_the_shared_experts_and_dense_mlp_beside_4bit_experts(folders, targets, widened):
    """DeepSeek-V3's shared experts and dense MLP are 4-bit linears. Up to PEFT 0.21 its transformers-5
    conversion took every target ending in gate_proj / up_proj / down_proj for the routed experts'
    fused parameters: get_peft_model wrapped none of the layers named (PEFT's "No `target_modules`
    passed but also no `target_parameters` found", or beside q_a_proj only a RuntimeWarning and no
    adapter on them), and check_targets refuses that, naming the targets and why. PEFT 0.22 keeps them
    (our layers are bitsandbytes' nn.Linear subclasses: a process importing PEFT imports bitsandbytes):
    check_targets lets them through, warning where PEFT wraps more than a regex names, and the
    adapters on exactly the layers PEFT wraps train."""
    from converter.loader.lora import check_targets

    q, _ = folders("deepseek_v3")
    model = load_quantized(q)
    check_targets(peft.LoraConfig(r=4, target_modules=["q_a_proj", "kv_b_proj"]), model)  # no error
    check_targets(peft.LoraConfig(r=4, target_modules="all-linear"), model)  # expanded by register_lora
    config = peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0)
    if not PEFT_KEEPS_LINEAR_TARGETS:
        with pytest.raises(ValueError, match=r"PEFT.*maps.*fused.*experts") as err:
            check_targets(config, model)
        assert "gate_proj" in str(err.value) or "down_proj" in str(err.value)
        return
    named = _named(model, targets)
    assert named
    assert all("shared_experts" in n or "layers.0.mlp" in n or "q_a_proj" in n for n in named)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_targets(config, model)
    ours = [str(w.message) for w in caught if w.filename == __file__]
    wraps = named
    if widened is not None:
        wraps = _named(model, widened)
        assert wraps > named
        assert len(ours) == 1, ours
        assert "would also wrap layers it does not name (3 layers" in ours[0]
    else:
        assert not ours
    model = peft.get_peft_model(model, config)
    assert _wrapped(model) == wraps
    _trains(model, wraps)


def test_lora_target_naming_4bit_experts_and_other_layers(folders):
    """``gate_proj`` on DeepSeek-V3 names the routed 4-bit experts' per-expert projections and the shared
    experts' and dense MLP's linears. PEFT up to 0.21 mapped it onto the experts' fused parameters
    (refused: PEFT would wrap none); 0.22 wraps the linears, and check_targets warns that the experts
    take no LoRA (they would have trained in a 16-bit model)."""
    from converter.loader.lora import check_targets

    q, _ = folders("deepseek_v3")
    model = load_quantized(q)
    targets = ["q_a_proj", "gate_proj", "up_proj"]
    config = peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0)
    if not PEFT_KEEPS_LINEAR_TARGETS:
        with pytest.raises(ValueError, match=REFUSAL):
            check_targets(config, model)
        return
    match = (
        r"\['gate_proj', 'up_proj'\] also name the per-expert projections of 4-bit MoE experts.*take no LoRA"
    )
    with pytest.warns(UserWarning, match=match) as caught:
        check_targets(config, model)
    assert caught[0].filename == __file__  # the user's line
    model = peft.get_peft_model(model, config)
    named = _named(model.base_model.model, targets) | _wrapped(model)
    assert _wrapped(model) == named
    assert {n.rpartition(".")[0] for n in named} >= {
        "model.layers.0.mlp",
        "model.layers.1.mlp.shared_experts",
    }
    _trains(model, named)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", None, ["q_proj", "gate"]])
def test_lora_targets_beside_4bit_experts_pass_the_check(folders, targets):
    from converter.loader.lora import check_targets

    q, _ = folders("qwen3_moe")
    check_targets(peft.LoraConfig(r=4, target_modules=targets), load_quantized(q))  # no error


def test_registered_lora_refuses_to_wrap_the_experts_module(folders):
    """register_lora without the model registers a refusal for the experts module: PEFT asked to wrap it
    (target_modules=["experts"]) raises ours, naming the module, instead of "is not supported"."""
    from converter.loader.lora import register_lora

    q, _ = folders("qwen3_moe")
    config = register_lora(peft.LoraConfig(r=4, target_modules=["q_proj", "experts"]))
    match = r"'experts', 'q_proj'\] name 4-bit MoE experts \(QuantExperts4bit\(num_experts=4.*not supported"
    with pytest.raises(ValueError, match=match):
        peft.get_peft_model(load_quantized(q), config)


def test_lora_all_linear_trains_with_the_fused_router(folders):
    """target_modules="all-linear" also wraps each router (mlp.gate), which parametrizes its weight:
    training runs (the fused router's fallback recursed forever) and the loss goes down."""
    q, _ = folders("qwen3_moe")
    model = load_quantized(q)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model, config)
    assert any("mlp.gate.lora" in n or "mlp.gate.parametrizations" in n for n, _ in model.named_parameters())
    model.train()
    model.train()
    losses = _train(model, 4)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("cast", ["half", "to_bfloat16", "to_float16"])
def test_module_casts_keep_the_expert_scales_float32(folders, cast):
    """``.half()`` / ``.to(dtype)`` cast the model's 16-bit tensors, never the experts' float32 absmax
    and code table (the kernels need float32): the experts give the same bits before and after, and the
    model's logits stay finite (before this, NaN for 1..8 tokens, an error for more)."""
    q, _ = folders("qwen3_moe")
    model = load_quantized(q)
    experts = next(iter(moe_modules(model).values()))
    x = torch.randn(5, experts.hidden_dim, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [0, 2]])
    w = torch.rand(5, 2, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        before = experts(x, idx, w)
        model = model.half() if cast == "half" else model.to(getattr(torch, cast.removeprefix("to_")))
        after = experts(x, idx, w)
        logits = [model(IDS[:, :t]).logits for t in (1, 12)]  # the GEMV path and the dequantize path
    assert experts.absmax.dtype == torch.float32
    assert experts.quant_map.dtype == torch.float32
    assert torch.equal(before, after)
    assert all(torch.isfinite(t).all() for t in logits)
