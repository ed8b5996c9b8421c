"""Tiny random MoE checkpoints (Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3 incl. an FP8 source) built from
transformers configs, and the helpers the MoE tests share.

Hidden size 64 and expert intermediate size 64: every expert projection has whole 64-element blocks
per row, so the loader's fused GEMV runs for gate/up and down ("qwen3_moe_i32" has intermediate 32,
where down_proj falls back to dequantize + matmul).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from error_bounds import U32, gamma, x_chunk_error
from tiny_models import _decoder, skip_unless_built_in
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# name -> (model_type, architecture, config kwargs)
MOE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_moe": (
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        _decoder(intermediate_size=96, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                 decoder_sparse_step=1, norm_topk_prob=True),
    ),
    "qwen3_moe_i32": (
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        _decoder(intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                 decoder_sparse_step=1),
    ),
    "mixtral": ("mixtral", "MixtralForCausalLM", _decoder(intermediate_size=64, num_local_experts=4,
                                                          num_experts_per_tok=2)),
    "olmoe": ("olmoe", "OlmoeForCausalLM", _decoder(intermediate_size=64, num_experts=4,
                                                    num_experts_per_tok=2, eos_token_id=1, pad_token_id=0)),
    # shared experts, grouped top-k routing (16 experts in 2 groups, 1 group picked), a dense first layer
    "deepseek_v3": (
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        _decoder(intermediate_size=96, moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=2,
                 n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=64,
                 kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                 routed_scaling_factor=2.5, num_key_value_heads=4),
    ),
    # per-expert w1/w3/w2 on disk; its experts gate with a clamped SwiGLU (their own _apply_gate), here
    # clamped at 0.1 so that the clamp binds for random weights
    "deepseek_v4": (
        "deepseek_v4",
        "DeepseekV4ForCausalLM",
        _decoder(moe_intermediate_size=64, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
                 num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1, hc_mult=2,
                 hc_sinkhorn_iters=2, o_groups=2, o_lora_rank=32, index_n_heads=2, index_head_dim=16,
                 index_topk=8, sliding_window=8, swiglu_limit=0.1, mlp_layer_types=["moe", "moe"]),
    ),
    # its router is an nn.Linear inside the gate module: mlp.gate.wg (float32 in the model)
    "hunyuan_v1_moe": (
        "hunyuan_v1_moe",
        "HunYuanMoEV1ForCausalLM",
        _decoder(intermediate_size=64, num_experts=4, moe_topk=2, head_dim=16),
    ),
    # experts fused 3-D on disk (gate_up_proj [E, H, 2I], down_proj, their biases): no per-expert name
    "gpt_oss": (
        "gpt_oss",
        "GptOssForCausalLM",
        _decoder(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                 layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    ),
    # experts fused 3-D on disk under their own names (block_sparse_moe.input_linear.weight [E, 2I, H],
    # output_linear.weight): a layout quantize-model does not quantize
    "granitemoe": ("granitemoe", "GraniteMoeForCausalLM", _decoder(intermediate_size=64, num_local_experts=4,
                                                                   num_experts_per_tok=2)),
    # Granite 4.0-H: Mamba-2 and attention layers, the same fused experts; save_pretrained writes its
    # time_step_limit [0, inf] as [0.0, {"__float__": "Infinity"}]
    "granitemoehybrid": (
        "granitemoehybrid",
        "GraniteMoeHybridForCausalLM",
        _decoder(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                 shared_intermediate_size=64, layer_types=["mamba", "attention"], mamba_n_heads=4,
                 mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16),
    ),
    # JetMoE: Granite's fused 3-D experts in its MLP (mlp.input_linear / output_linear) and its attention
    # (self_attention.experts.input_linear / output_linear, routed by self_attention.experts.router.layer)
    "jetmoe": ("jetmoe", "JetMoeForCausalLM", _decoder(intermediate_size=64, num_local_experts=4,
                                                      num_experts_per_tok=2, kv_channels=16)),
    # MiniMax: its attention's output_gate is an nn.Linear whose name ends with its routers' leaf "gate"
    "minimax": ("minimax", "MiniMaxForCausalLM",
                _decoder(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                         layer_types=["linear_attention", "full_attention"])),
    # ERNIE-4.5-VL: one experts module per layer holding 4 text experts (width 64) then 4 vision experts
    # (width 32), config.json's text_config.moe_intermediate_size [64, 32]
    "ernie4_5_vl_moe": ("ernie4_5_vl_moe", "Ernie4_5_VLMoeForConditionalGeneration", dict(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=[64, 32],
                         moe_k=2, moe_num_experts=4, moe_num_shared_experts=1,
                         mlp_layer_types=["dense", "sparse"], max_position_embeddings=64,
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [3, 3, 2]}),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=250, video_token_id=251)),
    # MiniMax-M3-VL's text model: fused experts with a clamped SwiGLU of their class's own (_apply_gate) and
    # no act_fn; clamped at 0.1 so that the clamp binds for random weights
    "minimax_m3_vl_text": ("minimax_m3_vl_text", "MiniMaxM3VLForCausalLM",
                           _decoder(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                    head_dim=16, swiglu_limit=0.1)),
}  # fmt: skip
# DeepSeek-V4 with experts of whole 64-element blocks per row (its experts' width is intermediate_size,
# 96 above): the grouped CPU decode takes them
MOE["deepseek_v4_i64"] = (*MOE["deepseek_v4"][:2], dict(MOE["deepseek_v4"][2], intermediate_size=64))
# HY-V4: fused 3-D experts in the model with a clamped SwiGLU of their own (_apply_gate) and no act_fn,
# per-expert tensors on disk; an MLA attention with a sparse-attention indexer
MOE["hy_v4"] = ("hy_v4", "HYV4ForCausalLM", _decoder(
    intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
    num_key_value_heads=4, head_dim=16, kv_lora_rank=64, q_lora_rank=64, qk_rope_head_dim=16,
    qk_nope_head_dim=16, v_head_dim=16, index_n_heads=4, index_head_dim=32, swiglu_limit=0.1,
    pad_token_id=0, bos_token_id=0, eos_token_id=0))  # fmt: skip

# Model types transformers 5.25 added (make_moe skips them on older releases): MiniCPM-5-MoE (q_proj renamed
# q_gate_proj on load; its experts listed in MODULES_TO_PATCH_FOR_QUANTIZATION for AWQ only), Kolibri-1.1
# (sliding and indexed attention, its router's bias stored as moe.router.expert_bias), Param2-MoE (a
# Glm4MoeForCausalLM with Sarvam-MoE's names: attention.query_key_value split into q/k/v on load)
MOE["minicpm5_moe"] = ("minicpm5_moe", "MiniCPM5MoeForCausalLM", _decoder(
    intermediate_size=128, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, mlp_layer_types=["dense", "sparse"]))  # fmt: skip
MOE["kolibri1_1"] = ("kolibri1_1", "Kolibri1_1ForCausalLM", _decoder(
    intermediate_size=128, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
    shared_expert_intermediate_size=64, mlp_only_layers=[0], mlp_only_intermediate_size=128,
    layer_types=["sliding_attention", "indexed_attention"], sliding_window=8, index_topk=8,
    index_pool_size=16, index_compression=4, index_num_heads=2, index_num_local_tokens=2,
    index_num_sink_tokens=1))  # fmt: skip
MOE["param2moe"] = ("param2moe", "Glm4MoeForCausalLM", _decoder(
    intermediate_size=128, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1))  # fmt: skip
FAMILIES_5_25 = ["minicpm5_moe", "kolibri1_1", "param2moe"]
# NemotronH: routed experts without a gate (per-expert up_proj / down_proj on disk, relu2 between them,
# converter/loader/moe_ungated.py), a shared expert, Mamba-2 and attention layers around the MoE one
MOE["nemotron_h"] = ("nemotron_h", "NemotronHForCausalLM", dict(
    vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64,
    n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, mamba_num_heads=4,
    mamba_head_dim=16, ssm_state_size=8, n_groups=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    layers_block_type=["linear_attention", "moe", "full_attention"]))  # fmt: skip
# the same with its experts in a latent width (Nemotron-3 Super / Ultra: fc1_latent_proj 128 -> 64 before
# the experts, fc2_latent_proj after): the experts' input and output width is moe_latent_size
MOE["nemotron_h_latent"] = ("nemotron_h", "NemotronHForCausalLM", {
    **MOE["nemotron_h"][2], "hidden_size": 128, "moe_latent_size": 64, "head_dim": 32})  # fmt: skip
# Ergo (transformers 5.25): its routed experts fused 3-D in its own names (layers.<l>.feed_forward.up_proj
# [E, H, I] / down_proj, no gate, an RMSNorm per expert), a layout quantize-model does not quantize; 8
# experts of width 128 in its one sparse layer hold most of the parameters
MOE["ergo"] = ("ergo", "ErgoForCausalLM", dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    first_dense_intermediate_size=128, num_dense_blocks=1, moe_intermediate_size=128,
    shared_intermediate_size=64, num_experts=8, num_experts_per_tok=2, sliding_window=8,
    global_attention_every_n_layers=2, max_position_embeddings=64))  # fmt: skip

FAMILIES = ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3"]


def make_moe(name: str, folder: Path, seed: int = 0) -> Path:
    """Random tiny bf16 checkpoint ``name`` saved with save_pretrained (per-expert keys on disk)."""
    import transformers

    model_type, arch, kwargs = MOE[name]
    skip_unless_built_in(model_type, arch)
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, arch)(cfg).to(torch.bfloat16).eval()
        # random init gives tiny router logits and near-uniform routing: widen them so top-k differs per token
        for n, p in model.named_parameters():
            if n.endswith(("mlp.gate.weight", "mixer.gate.weight")):
                torch.nn.init.normal_(p, std=0.5)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
    return folder


def _longcat_flash_config():
    import transformers

    cfg = transformers.LongcatFlashConfig(
        vocab_size=256, hidden_size=64, ffn_hidden_size=96, expert_ffn_hidden_size=64, num_layers=1,
        num_attention_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16, head_dim=16, n_routed_experts=4, zero_expert_num=2, moe_topk=2,
        max_position_embeddings=64,
    )  # fmt: skip
    cfg.architectures = ["LongcatFlashForCausalLM"]
    return cfg


def longcat_zero_rows() -> bool:
    """Whether the installed transformers' ``LongcatFlashExperts.gate_up_proj`` holds a (never used) row
    for each zero (identity) expert after the routed ones, so that its save_pretrained writes their gate/up
    weights without a down weight: 5.24 and older do; 5.25 holds the routed experts only."""
    from transformers.models.longcat_flash import modeling_longcat_flash

    cfg = _longcat_flash_config()
    with torch.device("meta"):
        experts = modeling_longcat_flash.LongcatFlashExperts(cfg)
    return int(experts.gate_up_proj.shape[0]) > cfg.n_routed_experts


def make_longcat_flash(folder: Path, *, zero_rows: bool | None = None) -> Path:
    """A tiny LongCat-Flash (4 routed experts, 2 zero experts) saved by transformers' save_pretrained:
    gate/up/down weights for experts 0..3, and with transformers 5.24 and older (``longcat_zero_rows``)
    gate/up weights for the zero experts 4..5 too. ``zero_rows`` True gives that 5.24 layout under any
    version (the zero experts' rows added, random, where transformers did not write them), False the 5.25
    layout (removed); the other weights are the same either way."""
    import safetensors.torch
    import transformers

    cfg = _longcat_flash_config()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LongcatFlashForCausalLM(cfg).to(torch.bfloat16).eval().save_pretrained(folder)
    if zero_rows is None or zero_rows == longcat_zero_rows():
        return folder
    path = folder / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    n, zero = cfg.n_routed_experts, cfg.zero_expert_num
    layers = sorted({k.partition(".mlp.experts.")[0] for k in tensors if ".mlp.experts." in k})
    for layer in layers:
        for e in range(n, n + zero):
            for proj in ("gate_proj", "up_proj"):
                key = f"{layer}.mlp.experts.{e}.{proj}.weight"
                if zero_rows:
                    g = torch.Generator().manual_seed(e)
                    shape = (cfg.expert_ffn_hidden_size, cfg.hidden_size)
                    tensors[key] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
                else:
                    del tensors[key]
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    return folder


def make_qwen3_vl_moe(folder: Path, *, inter: int = 128, hub: bool = True, seed: int = 0) -> Path:
    """Random tiny bf16 Qwen3-VL-MoE (text + vision tower): hidden 64, expert intermediate ``inter`` (128:
    an expert projection's 128 blocks straddle the 256-wide nested blocks; 256: they fill them). Its
    experts are fused 3-D on disk; ``hub``: in the Hub's orientation ``gate_up_proj [E, H, 2I]`` /
    ``down_proj [E, I, H]`` as Qwen ships them, else in transformers' model orientation, which its
    save_pretrained writes."""
    import transformers
    from safetensors.torch import load_file, save_file

    text = _decoder(intermediate_size=96, moe_intermediate_size=inter, num_experts=4, num_experts_per_tok=2,
                    decoder_sparse_step=1, head_dim=16, num_key_value_heads=2,
                    rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})  # fmt: skip
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                  patch_size=8, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])  # fmt: skip
    vocab = text["vocab_size"]  # the image/video tokens inside the tiny vocabulary
    tokens = dict(image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
                  vision_end_token_id=vocab - 1)  # fmt: skip
    cfg = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **tokens)
    cfg.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.Qwen3VLMoeForConditionalGeneration(cfg).to(torch.bfloat16).eval()
        for n, p in model.named_parameters():
            if n.endswith(("mlp.gate.weight", "mixer.gate.weight")):
                torch.nn.init.normal_(p, std=0.5)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
    if hub:
        tensors = load_file(folder / "model.safetensors")
        for k in [k for k in tensors if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
            tensors[k] = tensors[k].transpose(1, 2).contiguous()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def fused_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    from converter.plan.moe_fused import FUSED_EXPERT_KEY

    with safe_open(folder / "model.safetensors", "pt") as f:
        return [k for k in f.keys() if FUSED_EXPERT_KEY.match(k)]


def fp8_block_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style FP8: per-block scale = amax / 448, codes float8_e4m3fn, scale_inv float32."""
    rows, cols = w.shape
    br, bc = block
    sr, sc = math.ceil(rows / br), math.ceil(cols / bc)
    wf = w.float()
    scale = torch.empty(sr, sc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            blk = wf[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def make_fp8_source(bf16_folder: Path, dst: Path, block: tuple[int, int] = (32, 32)) -> Path:
    """The checkpoint as DeepSeek ships it: every 2-D linear weight but embeddings, head, norms and
    routers in float8_e4m3fn with ``weight_scale_inv``, and an fp8 quantization_config."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(bf16_folder / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if v.dim() == 2 and k.endswith(
            ("_proj.weight", "_proj_with_mqa.weight", ".w1.weight", ".w2.weight", ".w3.weight")
        ):
            q, s = fp8_block_quantize(v, block)
            out[k], out[k.removesuffix(".weight") + ".weight_scale_inv"] = q, s
        else:
            out[k] = v
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((bf16_folder / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": list(block),
    }
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def expert_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    from converter.plan.moe import EXPERT_KEY

    with safe_open(folder / "model.safetensors", "pt") as f:
        return [k for k in f.keys() if EXPERT_KEY.match(k)]


def load_bf16_eager(folder: Path):
    """A plain folder loaded by transformers with its eager experts loop (the reference forward)."""
    import transformers

    arch = read_config(folder)["architectures"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, arch).from_pretrained(
            folder, dtype=torch.bfloat16, experts_implementation="eager"
        )
    return model.eval()


#: The fused CUDA decode's silu (csrc/cuda/gemv_grouped.cu) and torch's CUDA sigmoid: expf within 2 ulp
#: (4u, CUDA's documented bound without fast math), 1 + e rounded (u), the division rounded (u): 6u to
#: first order, 7u with margin for the products of these terms.
CUDA_SILU_U = 7 * U32


class Gate(NamedTuple):
    """The gating of an expert's gate/up output that :func:`experts_reference_and_bound` models (the
    default: ``silu(gate) * up``, gate and up the two halves)."""

    limit: float | None = None  # clamped: gate <= limit, -limit <= up <= limit (DeepSeek-V4, gpt-oss)
    alpha: float | None = None  # gpt-oss: glu = gate * sigmoid(alpha * gate), h = (up + 1) * glu
    interleaved: bool = False  # gpt-oss: gate/up rows interleaved (gate even, up odd)


def experts_gate(m) -> Gate:
    """The gate of the 4-bit experts layer ``m``: its class's own ``_apply_gate`` where it has one
    (gpt-oss; DeepSeek-V4's clamped SiLU), else silu(gate) * up. A gate the bound does not model is
    refused, so that no test compares a layer against the bound of another activation."""
    own = getattr(m, "apply_gate", None)
    if own is None:
        if getattr(m, "act_name", "silu") not in ("silu", "swish"):
            msg = f"the bound models silu(gate) * up, not {m.act_name}"
            raise NotImplementedError(msg)
        return Gate()
    owner = own.__self__
    kind = type(owner).__name__
    if kind == "GptOssExperts":
        return Gate(limit=float(owner.limit), alpha=float(owner.alpha), interleaved=True)
    if kind == "DeepseekV4Experts" and type(owner.act_fn).__name__ in ("SiLU", "SiLUActivation"):
        return Gate(limit=float(owner.limit))
    msg = f"the bound does not model {kind}._apply_gate"
    raise NotImplementedError(msg)


def _rel(*us: float) -> float:
    """The relative error of a chain of relative errors ``us``: prod(1 + u) - 1."""
    return math.prod(1 + u for u in us) - 1


def _product(a, ea, b, eb, u: float):
    """``a * b`` (float64 reference values) and the error bound of the computed product of a and b known
    within ``ea`` and ``eb``, rounded once with unit roundoff ``u``."""
    p = a * b
    e = a.abs() * eb + b.abs() * ea + ea * eb
    return p, e + u * (p.abs() + e)


def _gated(pre, e_pre, gate: Gate, silu_u: float, h_u: float):
    """h = gate(gate/up output ``pre``) and its error bound, from e_pre, pre's (elementwise) bound.

    - clamps are 1-Lipschitz: an error carries over unchanged, plus the limit's rounding to float32
      (u |limit|: 0.1 is not a float32; 0.5 and 7.0 are);
    - silu(g) is Lipschitz with max|silu'| < 1.1 (1.0998 at g = 2.40), so its error is 1.1 e_g plus
      ``silu_u`` relative for its evaluation; gpt-oss' g * sigmoid(alpha g) = silu(alpha g) / alpha
      has the same Lipschitz constant in g; alpha and alpha * g rounded (relative 2u) move sigmoid by at
      most sigmoid' <= 1/4 times that (|d sigmoid(alpha g) / dg| <= alpha / 4), times |g|; then the
      sigmoid's evaluation (``silu_u``) and the product (u);
    - gpt-oss' up + 1: one rounding u;
    - the product: |a| e_b + |b| e_a + e_a e_b, then rounded with ``h_u``.

    The gate's own operations are float32 (u = 2^-24)."""
    u, i_dim = U32, pre.shape[0] // 2
    split = (slice(0, None, 2), slice(1, None, 2)) if gate.interleaved else (slice(i_dim), slice(i_dim, None))
    (g, up), (eg, eu) = [pre[s] for s in split], [e_pre[s] for s in split]
    if gate.limit is not None:
        limit = gate.limit
        g, up = g.clamp(max=limit), up.clamp(min=-limit, max=limit)
        eg, eu = eg + u * abs(limit), eu + u * abs(limit)
    if gate.alpha is None:
        s = torch.nn.functional.silu(g)
        es = 1.1 * eg + silu_u * (s.abs() + 1.1 * eg)
        return _product(s, es, up, eu, h_u)
    alpha, ga = gate.alpha, g.abs() + eg  # ga: |g| as computed, at most
    glu = g * torch.sigmoid(alpha * g)
    e_glu = 1.1 * eg + ga * (alpha / 4) * ga * _rel(u, u)
    e_glu = e_glu + _rel(silu_u, u) * (glu.abs() + e_glu)
    up1 = up + 1
    e_up1 = eu + u * (up1.abs() + eu)
    return _product(glu, e_glu, up1, e_up1, h_u)


def experts_reference_and_bound(
    m,
    x,
    idx,
    w,
    *,
    weight_rel: float = 0.0,
    acc_u: float = U32,
    pre_u: float = 0.0,
    silu_u: float = 4 * U32,
    h_u: float = U32,
    y_u: float = 0.0,
    bias_u: float = U32,
    wy_u: float = U32,
    out_u: float = 0.0,
    flush_abs: float = 0.0,
    x_chunk_rel: float = 0.0,
):
    """float64 reference (on the CPU) of a QuantExperts4bit with its decoded weights, and an elementwise bound
    on a compute path's error, derived step by step (gamma_K(u) = K u / (1 - K u)):

    - gate/up: weights used with relative error ``weight_rel`` (0: float32 decode; u16 when the
      weight is dequantized to a 16-bit dtype), dot products of H terms accumulated in any order with
      unit roundoff ``acc_u`` (2^-24; 2^-23 for tensor cores, which may truncate): (wr + gamma_H (1 +
      wr)) |W_gu| @ |x|; then the results rounded with ``pre_u`` (0 when they stay float32); a bias
      (gpt-oss; 16-bit, exact in float32) added with one rounding ``bias_u``;
    - the gate (:func:`experts_gate`, propagated by :func:`_gated`): silu(gate) * up, DeepSeek-V4's
      clamped one, or gpt-oss' clamped (up + 1) * gate * sigmoid(alpha * gate); ``silu_u``: the relative
      error of the silu's (or sigmoid's) evaluation (torch float32: exp, add, divide, multiply, 4u);
      ``h_u``: the rounding of h;
    - down: (1 + wr) |W_dn| @ |e_h| + (wr + gamma_I (1 + wr)) |W_dn| @ |h|, then rounded with ``y_u``,
      a bias added with ``bias_u``;
    - routing: w * y rounded with ``wy_u`` (an FMA: no more than u), the k terms summed in float32
      (gamma_k); ``out_u``: one final rounding of the sum to the output dtype;
    - ``flush_abs`` (error_bounds.gemv_arithmetic: a GEMV path that treats subnormal inputs and partial
      sums as zero): each dot product of K terms loses at most ``flush_abs * K * max_k |w[o, k]|`` more,
      as dot_bound counts it (gate/up: K = H; down: K = I, before its rounding);
    - ``x_chunk_rel`` (error_bounds.gemv_arithmetic: a GEMV path that holds its input as integers per
      chunk of 64): each input element off by at most ``x_chunk_rel`` times its chunk's largest
      magnitude, as dot_bound counts it (down: of h as computed, at most |h| + e_h).

    The defaults are torch's float32 ops (CPU and CUDA float32 compute).
    """
    h_dim, i_dim, k = m.hidden_dim, m.intermediate_dim, idx.shape[1]
    gate = experts_gate(m)
    biases = getattr(m, "gate_up_bias", None), getattr(m, "down_bias", None)
    gu_b, dn_b = (None if b is None else b.double().cpu() for b in biases)
    dot_h = weight_rel + gamma(h_dim, acc_u) * (1 + weight_rel)
    dot_i = weight_rel + gamma(i_dim, acc_u) * (1 + weight_rel)
    route = wy_u + gamma(k) * (1 + wy_u)
    xd = x.double().cpu()
    idx, w = idx.cpu(), w.cpu()
    out = torch.zeros_like(xd)
    bound = torch.zeros_like(xd)
    for t in range(x.shape[0]):
        for j in range(k):
            e = int(idx[t, j])
            gu, dn = (a.double().cpu() for a in m.expert_weights(e, torch.float32))
            pre = gu @ xd[t]
            e_pre = dot_h * (gu.abs() @ xd[t].abs()) + flush_abs * h_dim * gu.abs().amax(dim=1)
            e_pre = e_pre + x_chunk_error(xd[t].abs(), gu, x_chunk_rel, weight_rel, gamma(h_dim, acc_u))
            e_pre = e_pre + pre_u * (pre.abs() + e_pre)
            if gu_b is not None:
                pre = pre + gu_b[e]
                e_pre = e_pre + bias_u * (pre.abs() + e_pre)
            h, eh = _gated(pre, e_pre, gate, silu_u, h_u)
            y = dn @ h
            ey = (1 + weight_rel) * (dn.abs() @ eh) + dot_i * (dn.abs() @ (h.abs() + eh))
            ey = ey + flush_abs * i_dim * dn.abs().amax(dim=1)
            ey = ey + x_chunk_error(h.abs() + eh, dn, x_chunk_rel, weight_rel, gamma(i_dim, acc_u))
            ey = ey + y_u * (y.abs() + ey)
            if dn_b is not None:
                y = y + dn_b[e]
                ey = ey + bias_u * (y.abs() + ey)
            wt = float(w[t, j])
            out[t] += wt * y
            bound[t] += abs(wt) * ey + route * abs(wt) * (y.abs() + ey)
    return out, bound + out_u * (out.abs() + bound)


def down_code_step_ratios(m, x, idx, w) -> tuple[float, float]:
    """max |got - ref| / bound of ``m``'s output (float32 compute; :func:`experts_reference_and_bound`
    with its float32 defaults), and the same once one down weight has moved one 4-bit code step in
    ``m.packed`` (restored after): expert ``idx[0, 0]``'s weight from its largest |h| of token 0 into
    output 0, the code to its neighbour in the code table (checked: that weight alone changes). A
    second ratio > 1 shows the bound sees the smallest change the format can make to one weight."""
    m.compute_dtype = torch.float32
    ref, bound = experts_reference_and_bound(m, x, idx, w)
    with torch.no_grad():
        within = float(((m(x, idx, w).double() - ref).abs() / bound).max())
    e, i_dim, h_dim = int(idx[0, 0]), m.intermediate_dim, m.hidden_dim
    gu, dn = (a.double() for a in m.expert_weights(e, torch.float32))
    pre = gu @ x[0].double()
    if getattr(m, "gate_up_bias", None) is not None:
        pre = pre + m.gate_up_bias[e].double()
    h = _gated(pre, torch.zeros_like(pre), experts_gate(m), 0.0, 0.0)[0]
    n = 2 * i_dim * h_dim + int(h.abs().argmax())  # down [H, I] after gate_up [2I, H]: output 0's row
    codes, shift = m.packed[e].view(torch.uint8), 4 * (1 - n % 2)  # the first element: high nibble
    old = int(codes[n // 2])
    c = (old >> shift) & 0xF
    codes[n // 2] = old ^ ((c ^ (c + 1 if c < 15 else c - 1)) << shift)
    try:
        delta = m.expert_weights(e, torch.float32)[1].double() - dn
        assert torch.count_nonzero(delta) == 1
        with torch.no_grad():
            outside = float(((m(x, idx, w).double() - ref).abs() / bound).max())
    finally:
        codes[n // 2] = old
    return within, outside


def random_routes(m: Any, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, top-k index, routing weights) for an experts layer ``m``: ``tokens`` random float32 inputs of its
    width, each routed to 2 distinct experts, with random weights in [0, 1) (seeded by ``tokens``)."""
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, m.hidden_dim, generator=g)
    idx = torch.stack([torch.randperm(m.num_experts, generator=g)[:2] for _ in range(tokens)])
    return x, idx, torch.rand(tokens, 2, generator=g)


def assert_float32_experts_within_bound(folder: Path, tokens: int) -> None:
    """The first 4-bit experts layer of ``load_quantized(folder)``, computing in float32 on its default
    path (fused GEMV for <= 8 tokens per expert, else dequantized once), stays within the derived
    float32 error bound of the exact result for ``tokens`` random tokens routed to 2 experts each."""
    from converter.loader.model import load_quantized
    from converter.loader.moe import moe_modules

    m = next(iter(moe_modules(load_quantized(folder)).values()))
    m.compute_dtype = torch.float32
    x, idx, w = random_routes(m, tokens)
    with torch.no_grad():
        got = m(x, idx, w).double()
    ref, bound = experts_reference_and_bound(m, x, idx, w)
    assert ((got - ref).abs() <= bound).all()


#: Tiny Llama 4 text model: expert and dense intermediate size 128, so that every 4-bit weight's rows are
#: whole 64-element blocks (bitsandbytes 0.50 decodes other widths wrongly on the CPU, which the converter
#: warns about; stock transformers + bitsandbytes then would not compute what the folder holds).
LLAMA4 = dict(
    hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128, num_local_experts=4,
    num_experts_per_tok=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def make_llama4(folder: Path, seed: int = 0) -> Path:
    """Random tiny bf16 Llama4ForCausalLM saved with save_pretrained: its routed experts are fused 3-D on
    disk (``feed_forward.experts.gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]``), as Meta ships them."""
    import transformers
    from safetensors import safe_open

    cfg = transformers.Llama4TextConfig(**LLAMA4)
    cfg.architectures = ["Llama4ForCausalLM"]
    _save_llama4(transformers.Llama4ForCausalLM, cfg, folder, seed)
    with safe_open(folder / "model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if ".experts." in k}
    assert shapes == {
        f"model.layers.{i}.feed_forward.experts.{p}": s
        for i in range(2)
        for p, s in (("gate_up_proj", [4, 64, 256]), ("down_proj", [4, 128, 64]))
    }, shapes
    return folder


def make_llama4_multimodal(folder: Path, seed: int = 0) -> Path:
    """Random tiny bf16 Llama4ForConditionalGeneration (the text model of :data:`LLAMA4`, a one-layer
    vision tower): its experts sit under ``language_model.model.layers.<i>.feed_forward.experts``."""
    import transformers

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=32, patch_size=16, vision_output_dim=64, projector_input_dim=64,
                  projector_output_dim=64, pixel_shuffle_ratio=0.5)  # fmt: skip
    cfg = transformers.Llama4Config(
        text_config=LLAMA4,
        vision_config=vision,
        image_token_index=127,
        boi_token_index=125,
        eoi_token_index=126,
    )
    cfg.architectures = ["Llama4ForConditionalGeneration"]
    _save_llama4(transformers.Llama4ForConditionalGeneration, cfg, folder, seed)
    return folder


def _save_llama4(cls: type, cfg: Any, folder: Path, seed: int) -> None:
    """A random bf16 ``cls(cfg)`` saved with save_pretrained, its experts and routers drawn so that they
    matter (gate_up_proj starts all zero; the router's top-1 then differs per token)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(cfg).to(torch.bfloat16).eval()
        for n, p in model.named_parameters():
            if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
                torch.nn.init.normal_(p, std=0.05)
            elif n.endswith("feed_forward.router.weight"):
                torch.nn.init.normal_(p, std=0.5)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)


#: Tiny gpt-oss: hidden 64, expert intermediate 128 (every row whole 64-element blocks; I != H, so a
#: weight in the wrong orientation cannot pass), 4 experts, top-2, the SwiGLU clamped at 0.5 so that the
#: clamp binds for the random weights below.
GPT_OSS = dict(MOE["gpt_oss"][2], intermediate_size=128, swiglu_limit=0.5)


def make_gpt_oss(folder: Path, seed: int = 0) -> Path:
    """Random tiny bf16 GptOssForCausalLM saved with save_pretrained: its routed experts fused 3-D on disk
    with biases (``mlp.experts.gate_up_proj [E, H, 2I]`` gate/up interleaved, ``gate_up_proj_bias
    [E, 2I]``, ``down_proj [E, I, H]``, ``down_proj_bias [E, H]``), as the bf16 gpt-oss checkpoints
    ship them; experts, biases and routers drawn so that they matter."""
    import transformers

    cfg = transformers.GptOssConfig(**GPT_OSS)
    cfg.architectures = ["GptOssForCausalLM"]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GptOssForCausalLM(cfg).to(torch.bfloat16).eval()
        for n, p in model.named_parameters():
            if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
                torch.nn.init.normal_(p, std=0.08)
            elif n.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias")):
                torch.nn.init.normal_(p, std=0.2)
            elif n.endswith("mlp.router.weight"):
                torch.nn.init.normal_(p, std=0.5)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
    return folder


def grouped_cuda_decode(m, x, idx, w, monkeypatch) -> tuple[torch.Tensor, list[int]]:
    """``m(x, idx, w)`` on CUDA after a warm-up call, with torch's sync debug mode raising on any host
    synchronisation and the per-expert loop refused: the output, and the ``out_features`` of each
    ``moe_cuda.grouped_gemv`` launch it made (the monkeypatches are undone before returning)."""
    from converter.loader import moe as moe_loader
    from converter.loader import moe_cuda

    launches: list[int] = []
    real = moe_cuda.grouped_gemv

    def counted(*args, **kwargs):
        launches.append(kwargs["out_features"])
        return real(*args, **kwargs)

    def no_loop(*args, **kwargs):
        msg = "the per-expert loop ran on a CUDA decode step"
        raise AssertionError(msg)

    with monkeypatch.context() as patch:
        patch.setattr(moe_cuda, "grouped_gemv", counted)
        patch.setattr(moe_loader, "_expert_rows", no_loop)
        with torch.no_grad():
            m(x, idx, w)  # warm-up: first-call allocations and lazy initialisation outside the check
            torch.cuda.synchronize()
            launches.clear()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = m(x, idx, w)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return out, launches


def assert_cuda_graph_replays_like_eager(m, routing, seeds: tuple[int, ...] = (1, 2, 3, 4)) -> None:
    """Captures ``m(x, idx, w)`` once in a CUDA graph (inputs ``routing(seeds[0])``), then for each later
    seed copies that routing (other tokens, other experts) into the captured inputs and replays: the
    kernels read the expert ids on the device, so each replay equals an eager call, bit for bit."""
    with torch.no_grad():
        x, idx, w = routing(seeds[0])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            m(x, idx, w)  # warm-up on a side stream, as torch.cuda.graph requires
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(x, idx, w)
        for seed in seeds[1:]:
            x2, idx2, w2 = routing(seed)
            x.copy_(x2)
            idx.copy_(idx2)
            w.copy_(w2)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, m(x2, idx2, w2)), seed


#: A child that converts with --moe-experts quantize in 40 KB shards and SIGKILLs itself once the manifest
#: lists a finished shard (tests/killed_child.py runs it).
_KILLED_QUANTIZE = """
import json, os, signal, sys
from pathlib import Path
from converter.writer import pipeline
from converter.writer.manifest import MANIFEST_NAME

src, out = sys.argv[1:3]

def hook(name, done):
    if json.loads((Path(out) / MANIFEST_NAME).read_text())["shards"]:
        os.kill(os.getpid(), signal.SIGKILL)

pipeline.convert(src, out, max_shard_size="40KB", moe_experts="quantize", progress=hook)
"""


def _output_hashes(folder: Path) -> dict[str, str]:
    """Every deterministic output file (the report holds timings and is left out)."""
    import hashlib

    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "quantization_report.json"
    }


def assert_quantize_resumes_after_sigkill(src: Path, tmp_path: Path) -> None:
    """A --moe-experts quantize run of ``src`` killed after its first shard resumes through the same source
    view: the finished shards are kept and the folder equals an uninterrupted run's, byte for byte."""
    from killed_child import run_until_killed

    from converter.writer.manifest import MANIFEST_NAME
    from converter.writer.pipeline import convert

    reference = tmp_path / "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, reference, max_shard_size="40KB", moe_experts="quantize", progress=False)
    out = tmp_path / "out"
    run_until_killed(_KILLED_QUANTIZE, src, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["state"] == "in_progress"
    assert manifest["shards"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = convert(src, out, max_shard_size="40KB", moe_experts="quantize", progress=False)
    assert r.resumed
    assert r.shards_reused == len(manifest["shards"])
    assert _output_hashes(out) == _output_hashes(reference)


class FreshTensors(TorchDispatchMode):
    """Records the largest CPU tensor any torch operation allocates while it is active: an output whose
    storage is none of the operation's inputs' (views and in-place results are not allocations). Our
    C++ decode kernels are called directly, not through the dispatcher; what they return is not seen,
    but everything torch makes of it (casts, transposes, concatenations, stacks, ``torch.empty``) is."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0  # bytes
        self.shape: tuple[int, ...] = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in leaves if t.device.type == "cpu"}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs and storage.nbytes() > self.largest:
                    self.largest, self.shape = storage.nbytes(), tuple(t.shape)
        return out


def largest_fresh_tensors_of_dequantize(folder: Path, out: Path, monkeypatch, **kwargs) -> dict[str, tuple]:
    """Each tensor of the plain checkpoint ``dequantize_checkpoint`` writes from ``folder`` into ``out`` ->
    (bytes, shape) of the largest tensor torch allocated while it made and wrote that tensor (from the
    end of the tensor written before it: its ``progress`` call)."""
    from converter.loader import dequantize as deq

    seen, largest = FreshTensors(), {}
    write_plain = deq._write_plain

    def watched(*a, **k):
        with seen:
            return write_plain(*a, **k)

    def written(name: str) -> None:
        largest[name] = (seen.largest, seen.shape)
        seen.largest, seen.shape = 0, ()

    monkeypatch.setattr(deq, "_write_plain", watched)
    deq.dequantize_checkpoint(folder, out, progress=written, **kwargs)
    monkeypatch.setattr(deq, "_write_plain", write_plain)
    return largest


def _whole_parts(value, dtype, transposed, name=""):
    """Each tensor of the plain checkpoint built whole, as ``dequantize`` built it before it streamed the
    fused experts: ``_Fused.build`` (an empty fused tensor filled expert by expert) and the decode of a
    whole record, transposed."""
    from converter.loader import dequantize as deq
    from converter.methods import for_record
    from converter.sources.llama4 import fused_block

    def whole(v, dtype_, flip):
        if isinstance(v, torch.Tensor):
            return v.to(dtype_)
        w = for_record(v).dequantize(v, dtype_)
        return w.transpose(-2, -1) if flip else w

    if isinstance(value, deq._Fused):
        out = torch.empty(value.shape, dtype=dtype)
        for e, parts in enumerate(value.parts):
            pieces = [whole(p, dtype, False) for p in parts]
            out[e] = pieces[0] if value.stack_only else fused_block(pieces)
        yield out, lambda: None
    else:
        yield whole(value, dtype, transposed).contiguous(), lambda: whole(value, torch.float32, transposed)


def assert_streamed_bytes_equal_whole_build(folder: Path, tmp_path: Path, monkeypatch, **kwargs) -> None:
    """``dequantize`` of ``folder`` (its fused experts written expert by expert) writes the very bytes of
    the same dequantize with every tensor built whole and written at once (``_whole_parts``)."""
    from converter.loader import dequantize as deq

    deq.dequantize_checkpoint(folder, tmp_path / "streamed", **kwargs)
    with monkeypatch.context() as m:
        m.setattr(deq, "_parts", _whole_parts)
        m.setattr(deq, "_streamed", lambda value: False)
        deq.dequantize_checkpoint(folder, tmp_path / "whole", **kwargs)
    files = sorted(p.name for p in (tmp_path / "whole").iterdir() if p.suffix in (".safetensors", ".json"))
    files = [f for f in files if not f.startswith(".")]
    assert any(f.endswith(".safetensors") for f in files)
    assert files == sorted(
        p.name
        for p in (tmp_path / "streamed").iterdir()
        if p.suffix in (".safetensors", ".json") and not p.name.startswith(".")
    )
    for f in files:
        assert (tmp_path / "streamed" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f
