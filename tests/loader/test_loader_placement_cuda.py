"""device_map on real GPUs: GPU + CPU and GPU + disk splits, and (with 2+ GPUs) a split across GPUs.

Needs an NVIDIA GPU (skipped otherwise); the several-GPU test needs two (issue 17). The CPU-only
suite (test_loader_placement.py) runs the same code with a CPU stand-in for GPU indices.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from error_bounds import worst_ratio
from loader_helpers import gemv_bound, linear4bit_outputs

from converter.loader.model import linear4bit_modules, load_quantized

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

IDS = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64]])
#: tests/loader/loader_helpers.TINY_LLAMA: 2 decoder layers, untied head.
GPU_CPU = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": 0,
           "model.rotary_emb": 0, "lm_head": "cpu"}  # fmt: skip


def _logits(model: torch.nn.Module, device: str) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS.to(device)).logits.float().cpu()


@pytest.mark.parametrize("offloaded", ["cpu", "disk"])
def test_gpu_plus_cpu_or_disk(our_folder: Path, offloaded: str) -> None:
    device_map = {k: (offloaded if v == "cpu" else v) for k, v in GPU_CPU.items()}
    model = load_quantized(our_folder, device_map=device_map)
    layers = linear4bit_modules(model)
    # GPU layers hold their 4-bit codes on the GPU; CPU/disk layers keep theirs in host memory.
    assert layers["model.layers.0.mlp.down_proj"].weight.is_cuda
    assert layers["model.layers.1.mlp.down_proj"].weight.device.type == "cpu"
    # Each quantized layer ran the fused GEMV (8 tokens) of the device holding it: its output is within
    # the bound derived from that kernel's arithmetic (as test_loader_cuda.test_load_quantized_on_cuda).
    calls = linear4bit_outputs(model, IDS.to("cuda:0"))
    assert len(calls) == len(layers)
    for name, layer, x, y in calls:
        device = layer.weight.device
        assert y.device == device, name  # it ran where its codes are
        ref, bound = gemv_bound(
            x.to(device), layer.dequantize(torch.float32), layer.bias, device_type=device.type
        )
        assert worst_ratio(y.reshape(ref.shape), ref, bound) <= 1.0, name
    out = model.generate(IDS[:, :3].to("cuda:0"), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    assert out.device == torch.device("cuda", 0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (issue 17)")
def test_split_across_two_gpus_equals_one_gpu(our_folder: Path) -> None:
    one_gpu = load_quantized(our_folder, device="cuda:0")
    one = _logits(one_gpu, "cuda:0")
    ref_tokens = one_gpu.generate(IDS[:, :3].to("cuda:0"), max_new_tokens=4, do_sample=False).cpu()
    # GPU 0 takes the embeddings (plus accelerate's reserve for the largest layer), GPU 1 the rest.
    model = load_quantized(our_folder, device_map="sequential", max_memory={0: 75_000, 1: "1GB"})
    assert set(model.hf_device_map.values()) == {0, 1}, model.hf_device_map
    assert linear4bit_modules(model)["model.layers.0.mlp.down_proj"].weight.device == torch.device("cuda", 1)
    # Every layer runs the same kernels on the same inputs as on GPU 0 (two GPUs of one model, as the
    # lent machines are); only the activations move, so the logits are bit-equal.
    assert torch.equal(_logits(model, "cuda:0"), one)
    out = model.generate(IDS[:, :3].to("cuda:0"), max_new_tokens=4, do_sample=False)
    assert torch.equal(out.cpu(), ref_tokens)
