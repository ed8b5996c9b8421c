"""The decode GEMV thread policy (converter.kernels.cpu_threads): who gets the pool; threads never change
bits."""

from __future__ import annotations

import pytest
import torch
from loader_helpers import make_layer

from converter.kernels import cpu_threads, custom_ops
from converter.loader import cpu_gemv


@pytest.fixture
def torch_threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def test_small_work_runs_on_the_calling_thread(torch_threads, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    torch_threads(1)
    assert cpu_threads.gemv_threads(cpu_threads.POOL_MIN_BYTES - 1) == 1
    assert cpu_threads.gemv_threads(cpu_threads.POOL_MIN_BYTES) == 0


@pytest.mark.parametrize("policy", ["", "active", "PASSIVE"])
def test_large_work_uses_the_pool_unless_torch_workers_spin(
    torch_threads, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    big = 8 * cpu_threads.POOL_MIN_BYTES
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    torch_threads(1)  # one torch thread: no OpenMP worker to spin, whatever the policy
    assert not cpu_threads.omp_workers_spin()
    assert cpu_threads.gemv_threads(big) == 0
    torch_threads(2)
    spins = policy.lower() != "passive"
    assert cpu_threads.omp_workers_spin() is spins
    assert cpu_threads.gemv_threads(big) == (1 if spins else 0)


def test_dense_gemv_asks_the_policy_and_threads_never_change_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2048 x 1024: 1 MiB of codes, the pool's threshold; batch 1..8 all take the fused GEMV.
    layer, _, _ = make_layer(2048, 1024, blocksize=64, quant_type="nf4", nested=True)
    asked: list[int] = []
    outputs: dict[int, list[torch.Tensor]] = {}
    for threads in (1, 2, 0):
        for caller in (custom_ops, cpu_gemv):  # the custom op and the layer's eager launch ask the policy
            monkeypatch.setattr(caller, "gemv_threads", lambda n, t=threads: asked.append(n) or t)
        g = torch.Generator().manual_seed(1)
        outputs[threads] = [layer(torch.randn(b, 1024, generator=g).to(torch.bfloat16)) for b in (1, 3, 8)]
    assert len(asked) == 9, "every launch asks the policy"
    assert set(asked) == {2048 * 1024 // 2}, "the policy gets the packed byte count of the weight"
    for threads in (2, 0):
        for a, b in zip(outputs[1], outputs[threads], strict=True):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"threads={threads}"
