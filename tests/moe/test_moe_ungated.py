"""Routed experts without a gate projection (NemotronH's ``down(relu2(up(x)))``) quantized to 4 bit:
convert writes bitsandbytes' bytes, load_quantized runs them (converter/loader/moe_ungated.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import bitsandbytes as bnb
import pytest
import torch
from error_bounds import U32, dot_bound, gamma, gemv_arithmetic, underflow
from moe_helpers import load_bf16_eager, random_routes
from safetensors import safe_open
from test_moe_loader import _COMPILE_SCRIPT, IDS, _dequant_paths, _logits
from tiny_models import load_logged

from converter.kernels import bnb4bit as kernels
from converter.loader import moe_ungated
from converter.loader.model import load_quantized
from converter.loader.moe import moe_modules
from converter.loader.moe_ungated import QuantUngatedExperts4bit
from converter.plan.moe import EXPERT_KEY, LOADERS_UNGATED, HeaderTensor, keep_advice
from converter.tools.inspection import inspect_path
from formats.reader import open_folder

NAME = "nemotron_h"


def _experts(model: torch.nn.Module) -> list[QuantUngatedExperts4bit]:
    mods = list(moe_modules(model).values())
    assert mods
    assert all(isinstance(m, QuantUngatedExperts4bit) for m in mods)
    return mods


def test_every_expert_is_bitsandbytes_bytes_and_inspect_names_the_loader(folders):
    """--moe-experts quantize was refused for experts without a gate ("no loader of 4-bit experts runs
    them"); each expert's up_proj and down_proj is now a bnb record whose codes and absmax are bitsandbytes'
    quantize_4bit of the same 2-D weight (nested by the project's rule), and inspect names load_quantized
    as the folder's one known loader."""
    q, _ = folders(NAME)
    with safe_open(q.parent / "src" / "model.safetensors", "pt") as f:
        source = {k: f.get_tensor(k) for k in f.keys() if EXPERT_KEY.match(k)}
    assert {k.rsplit(".", 2)[-2] for k in source} == {"up_proj", "down_proj"}
    with open_folder(q) as ckpt:
        assert set(source) <= set(ckpt.quantized)
        for key, w in source.items():
            rec = ckpt.record(key)
            packed, state = bnb.functional.quantize_4bit(
                w, blocksize=64, compress_statistics=False, quant_type="nf4"
            )
            assert torch.equal(rec.packed.view(torch.uint8).reshape(-1), packed.view(torch.uint8).reshape(-1))
            codes, nested_absmax, offset = kernels.quantize_nested(state.absmax)
            assert torch.equal(rec.absmax, codes), key
            assert torch.equal(rec.nested.nested_absmax, nested_absmax), key
            assert rec.nested.offset == offset, key
    summary = inspect_path(q).moe
    assert summary.layout == "experts quantized (per-expert bnb nf4 records)"
    assert summary.loaders == LOADERS_UNGATED
    assert any("without a gate" in x for x in summary.not_loaders)


def test_keep_warning_names_the_one_loader_of_ungated_4bit_experts(folders):
    """The keep warning said the quantized folder loads with vLLM, transformers 4.x and unsloth, which are
    not known to run 4-bit experts without a gate: it names load_quantized alone."""
    _, plain = folders(NAME)
    with open_folder(plain) as ckpt:
        tensors = [HeaderTensor(k, ckpt.entry(k).dtype, tuple(ckpt.entry(k).shape)) for k in ckpt.passthrough]
    advice = keep_advice(tensors, "keep", threshold=0.0, model_type=NAME)
    assert "loads with quantize-model's load_quantized (no other loader" in advice
    assert "vLLM" not in advice


@pytest.mark.parametrize("name", [NAME, "nemotron_h_latent"])
def test_dequantize_path_is_the_dequantized_model_bit_for_bit(folders, name):
    """On the dequantize path (use_gemv False) the 4-bit experts compute NemotronHExperts' loop with the
    decoded weights, summing the routes as the installed transformers' class does (5.24: in the routing
    weights' float32; 5.25: in bf16): logits equal the dequantized bf16
    folder's in transformers, bit for bit (prefill 12 tokens, decode 1), and greedy generate agrees; also
    with the experts in a latent width (moe_latent_size 64 inside hidden 128)."""
    q, plain = folders(name)
    ours = _dequant_paths(load_quantized(q))
    (m,) = _experts(ours)
    assert m.hidden_dim == ours.config.moe_latent_size or ours.config.moe_latent_size is None
    ref = load_bf16_eager(plain)
    assert torch.equal(_logits(ours), _logits(ref))
    assert torch.equal(_logits(ours, IDS[:, :1]), _logits(ref, IDS[:, :1]))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ours.generate(IDS[:, :4], **kw), ref.generate(IDS[:, :4], **kw))


def _reference_and_bound(m: QuantUngatedExperts4bit, x, idx, w) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``sum_s w_s * down_e(relu(up_e(x))^2)`` of the decoded weights and its elementwise bound for
    float32 compute: each projection a float32 GEMV (``dot_bound`` with the GEMV's arithmetic); relu exact;
    the square of an up value off by d (|d| <= its bound b) off by b(2|up| + b), plus its own rounding; the
    down projection of those perturbed inputs (their error times |D|, as many roundings as its terms);
    the routing weight's product (one rounding) and the sum of k slots in float32 (gamma_k)."""
    arith = gemv_arithmetic(x.device.type, torch.float32)
    k = idx.shape[1]
    refs, bounds = [], []
    for t in range(x.shape[0]):
        ref_t = torch.zeros(m.hidden_dim, dtype=torch.float64)
        err_t = torch.zeros(m.hidden_dim, dtype=torch.float64)
        for s in range(k):
            up_w, down_w = m.expert_weights(int(idx[t, s]), torch.float32)
            up, b_up = dot_bound(x[t : t + 1], up_w, out_dtype=torch.float32, **arith)
            a = up.clamp(min=0) ** 2
            b_a = b_up * (2 * up.abs() + b_up) + U32 * (up.abs() + b_up) ** 2 + underflow(torch.float32)
            y, b_y = dot_bound(a.float(), down_w, out_dtype=torch.float32, **arith)
            gk = gamma(m.intermediate_dim, arith["acc_u"])
            b_y = b_y + (1 + arith["weight_rel"]) * (1 + gk) * (b_a @ down_w.double().abs().T.to(b_a.device))
            wt = float(w[t, s])
            y, b_y = y.cpu(), b_y.cpu()
            ref_t += (wt * y)[0]
            err_t += (abs(wt) * b_y + U32 * abs(wt) * (y.abs() + b_y))[0]
        refs.append(ref_t)
        bounds.append(err_t + gamma(k) * (ref_t.abs() + err_t) + underflow(torch.float32))
    return torch.stack(refs), torch.stack(bounds)


@pytest.mark.parametrize("name", [NAME, "nemotron_h_latent"])
@pytest.mark.parametrize("tokens", [1, 3, 12], ids=["decode1", "decode3", "prefill"])
def test_gemv_paths_within_the_derived_float32_bound(folders, name, tokens, monkeypatch):
    """float32 compute on the default path (decode: two grouped GEMVs over the routed experts; 12 tokens:
    the per-expert loop, the GEMV for experts with at most 8 tokens) stays within the derived bound of
    the exact result; so does the per-expert loop on decode's tokens (the fused GEMV per expert: its
    multi-row kernels may sum in another order than the grouped one's, e.g. on AVX2, so not the same
    bits)."""
    q, _ = folders(name)
    (m,) = _experts(load_quantized(q))
    m.compute_dtype = torch.float32
    x, idx, w = random_routes(m, tokens)
    with torch.no_grad():
        got = m(x, idx, w).double()
    ref, bound = _reference_and_bound(m, x, idx, w)
    assert ((got - ref).abs() <= bound).all()
    if tokens <= 8:  # the per-expert loop with the fused GEMV on the same tokens
        monkeypatch.setattr(moe_ungated, "_grouped_decode", lambda *a: False)
        with torch.no_grad():
            loop = m(x, idx, w).double()
        assert ((loop - ref).abs() <= bound).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("tokens", [3, 12], ids=["decode", "prefill"])
def test_cuda_within_the_derived_float32_bound(folders, tokens):
    """On the GPU (decode: the grouped CUDA GEMVs; 12 tokens: the per-expert loop) float32 compute stays
    within the same derived bound (CUDA-core GEMV arithmetic for float32 x)."""
    q, _ = folders(NAME)
    (m,) = _experts(load_quantized(q, device="cuda", dtype=torch.float32))
    m.compute_dtype = torch.float32
    x, idx, w = random_routes(m, tokens)
    with torch.no_grad():
        got = m(x.cuda(), idx.cuda(), w.cuda()).double().cpu()
    ref, bound = _reference_and_bound(m, x.cuda(), idx, w)
    assert ((got - ref).abs() <= bound).all()


def test_model_dequantize_and_save_pretrained(folders, tmp_path):
    """model.dequantize() puts transformers' NemotronHExperts back with the decoded up_proj / down_proj
    (logits of the dequantized folder, bit for bit); a loaded 4-bit model saves the source's per-expert
    records again (same keys, same bytes)."""
    q, plain = folders(NAME)
    model = load_quantized(q)
    model.save_pretrained(tmp_path / "saved")
    with (
        safe_open(q / "model.safetensors", "pt") as a,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as b,
    ):
        expert_keys = [k for k in a.keys() if ".experts." in k]
        assert expert_keys
        for key in expert_keys:
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    model.dequantize()
    assert not moe_modules(model)
    experts = model.model.layers[1].mixer.experts
    assert type(experts).__name__ == "NemotronHExperts"
    assert experts.up_proj.dtype == torch.bfloat16
    ref = load_logged(plain, dtype=torch.bfloat16)[0]  # the default experts implementation, as the model's
    assert torch.equal(_logits(model), _logits(ref))


def test_torch_compile_fullgraph(folders):
    """The layer is one custom op under torch.compile (quantize_model::moe_experts_4bit_ungated, relu2
    known by name): fullgraph=True compiles and gives the eager bits."""
    q, _ = folders(NAME)
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(q)], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")
