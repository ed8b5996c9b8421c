"""The fused MoE router's CUDA kernel (csrc/cuda/route_topk.cu) against torch's own CUDA ops, bit for bit.

Needs an NVIDIA GPU and the CUDA backend (skipped otherwise). ``-s`` prints the configuration (sum order,
tie mode) the self-check adopted for each key: the report the next GPU session needs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from converter.loader import moe_cuda, router
from converter.loader.model import load_quantized

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not moe_cuda.available() or router._kernel() is None,
        reason="no CUDA device / CUDA router kernel",
    ),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("experts", [8, 60, 128, 1, 33, 1024])
def test_self_check_adopts_a_config_and_kernel_matches_torch(experts, renorm, dtype):
    """For every k the self-check adopts a kernel configuration (none: the kernel is not torch's
    arithmetic, a failure), and that configuration equals torch's ops on 2000 fresh random rows of mixed
    scales and ties, T = 1 and T = 7 included, for each output dtype the routers use."""
    for k in sorted({1, 2, 6, 8, 32} & set(range(1, experts + 1))):
        for out_dtype in (dtype, None):
            config = router.decide(torch.device("cuda"), dtype, experts, k, renorm, out_dtype)
            print(f"E={experts} k={k} renorm={renorm} {dtype}->{out_dtype}: adopted {config}")
            assert config is not None, "the kernel matches torch in no configuration"
            for seed, rows in ((1, 2000), (2, 1), (3, 7)):
                logits = router.check_batch(experts, dtype, rows=max(rows, 8), seed=seed)[:rows].cuda()
                ref_w, ref_i = router.route_torch(logits, k, renorm, out_dtype)
                w, i = router.route(logits, k, renorm, out_dtype)
                assert torch.equal(i, ref_i)
                assert torch.equal(_bits(w), _bits(ref_w))


def test_every_config_is_distinct_where_torch_differs():
    """Sum orders differ from k = 4 (block width 4): on random rows the two orders give different bits
    for some row, so the self-check can tell them apart; the tie modes differ on rows with ties."""
    logits = router.check_batch(128, torch.float32, rows=4096, seed=5).cuda()
    w10, i10 = router.launch(logits, 8, True, None, 1, 0)
    w00, i00 = router.launch(logits, 8, True, None, 0, 0)
    assert torch.equal(i10, i00)
    assert not torch.equal(_bits(w10), _bits(w00))
    ties = torch.full((4, 16), 0.25, device="cuda")
    _, i_bitonic = router.launch(ties, 8, False, None, 1, 0)
    _, i_index = router.launch(ties, 8, False, None, 1, 1)
    assert torch.equal(i_index, torch.arange(8, device="cuda").expand(4, 8))
    print(
        "torch's order of 16 equal probabilities, top 8:", torch.topk(torch.softmax(ties, -1), 8).indices[0]
    )
    print("kernel tie mode 0:", i_bitonic[0].tolist(), "tie mode 1:", i_index[0].tolist())


def test_route_inside_cuda_graph_capture():
    """Captured in a CUDA graph (decided before): one launch per call, replays give torch's results for
    new logits written into the captured input."""
    dtype, experts, k = torch.bfloat16, 128, 8
    router.decide(torch.device("cuda"), dtype, experts, k, True, dtype)
    x = router.check_batch(experts, dtype, rows=8, seed=7).cuda()
    out = {}

    def step() -> None:
        out["w"], out["i"] = router.route(x, k, True, dtype)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(router.check_batch(experts, dtype, rows=8, seed=8).cuda())
    graph.replay()
    torch.cuda.synchronize()
    ref_w, ref_i = router.route_torch(x, k, True, dtype)
    assert torch.equal(out["i"], ref_i)
    assert torch.equal(_bits(out["w"]), _bits(ref_w))


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "olmoe"])
def test_model_logits_fused_router_on_and_off(folders, name):
    """A loaded model on the GPU: logits (prefill and one step) and router logits identical with the
    fused router on and off."""
    q, _ = folders(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = load_quantized(q, device="cuda")
        plain = load_quantized(q, device="cuda", fused_router=False)
    assert any(getattr(type(m), "_qm_fused_router", None) for m in fused.modules())
    ids = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 11, 90, 3, 45]], device="cuda")
    with torch.no_grad():
        for x in (ids, ids[:, :1]):
            a = fused(x, output_router_logits=True)
            b = plain(x, output_router_logits=True)
            assert torch.equal(a.logits, b.logits)
            for ra, rb in zip(a.router_logits, b.router_logits, strict=True):
                assert torch.equal(ra, rb)
    adopted = {k: v for k, v in router._decisions.items() if k[0].startswith("cuda")}
    print(f"{name}: self-check decisions {adopted}")
    assert all(v is not None for v in adopted.values())
