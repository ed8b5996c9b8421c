"""The decode GEMV thread policy (converter.kernels.cpu_threads): who gets the pool or torch's OpenMP team;
threads never change bits."""

from __future__ import annotations

import importlib

import pytest
import torch
from loader_helpers import make_layer

from converter import _kernels
from converter.kernels import cpu_threads, custom_ops
from converter.loader import cpu_gemv


@pytest.fixture
def torch_threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def test_small_work_runs_on_the_calling_thread(torch_threads, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_threads, "OMP_PASSIVE", True)
    torch_threads(1)
    assert cpu_threads.gemv_threads(cpu_threads.POOL_MIN_BYTES - 1) == 1
    assert cpu_threads.gemv_threads(cpu_threads.POOL_MIN_BYTES) == 0


@pytest.mark.parametrize("policy", ["", "active", "PASSIVE"])
def test_large_work_uses_the_pool_unless_torch_workers_spin(
    torch_threads, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    big = 8 * cpu_threads.POOL_MIN_BYTES
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    # read at import, as the OpenMP runtime does: a fresh import sees the variable (the setattr first
    # makes the test's end restore the value the suite started with)
    monkeypatch.setattr(cpu_threads, "OMP_PASSIVE", cpu_threads.OMP_PASSIVE)
    importlib.reload(cpu_threads)
    torch_threads(1)  # one torch thread: no OpenMP worker to spin, whatever the policy
    assert not cpu_threads.omp_workers_spin()
    assert cpu_threads.gemv_threads(big) == 0
    torch_threads(2)
    spins = policy.lower() != "passive"
    assert cpu_threads.omp_workers_spin() is spins
    team = -2 if _kernels.omp_team_available() else 1
    assert cpu_threads.gemv_threads(big) == (team if spins else 0)


@pytest.mark.parametrize("count", [2, 3])
def test_spinning_torch_workers_take_launches_from_the_team_size_on(
    torch_threads, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    if not _kernels.omp_team_available():
        pytest.skip("torch runs on no OpenMP runtime here")
    monkeypatch.setattr(cpu_threads, "OMP_PASSIVE", False)
    torch_threads(count)
    assert cpu_threads.gemv_threads(cpu_threads.TEAM_MIN_BYTES - 1) == 1
    assert cpu_threads.gemv_threads(cpu_threads.TEAM_MIN_BYTES) == -count  # torch's team, all of it


def test_dense_gemv_asks_the_policy_and_threads_never_change_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2048 x 1024: 1 MiB of codes, the pool's threshold; batch 1..8 all take the fused GEMV.
    layer, _, _ = make_layer(2048, 1024, blocksize=64, quant_type="nf4", nested=True)
    asked: list[int] = []
    outputs: dict[int, list[torch.Tensor]] = {}
    for threads in (1, 2, 0, -2):
        for caller in (custom_ops, cpu_gemv):  # the custom op and the layer's eager launch ask the policy
            monkeypatch.setattr(caller, "gemv_threads", lambda n, t=threads: asked.append(n) or t)
        g = torch.Generator().manual_seed(1)
        outputs[threads] = [layer(torch.randn(b, 1024, generator=g).to(torch.bfloat16)) for b in (1, 3, 8)]
    assert len(asked) == 12, "every launch asks the policy"
    assert set(asked) == {2048 * 1024 // 2}, "the policy gets the packed byte count of the weight"
    for threads in (2, 0, -2):
        for a, b in zip(outputs[1], outputs[threads], strict=True):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"threads={threads}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("count", [1, 2])
def test_generate_with_team_launches_gives_the_calling_thread_tokens_and_logits(
    our_folder, torch_threads, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """A loaded model's decode with every GEMV (4-bit layers and the bf16 head) on torch's team when it
    spins (TEAM_MIN_BYTES 0: the tiny model's layers are far below it) gives the same tokens and logits,
    bit for bit, as the calling thread alone, with one torch thread and with two; no launch hangs."""
    from converter import load_quantized
    from converter.kernels import gemv_bf16

    model = load_quantized(our_folder)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    torch_threads(count)
    monkeypatch.setattr(cpu_threads, "OMP_PASSIVE", False)
    monkeypatch.setattr(cpu_threads, "TEAM_MIN_BYTES", 0)

    def decode() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        return out.sequences, torch.stack(out.logits)

    asked: list[int] = []

    def spy(n: int) -> int:
        asked.append(cpu_threads.gemv_threads(n))
        return asked[-1]

    callers = (cpu_gemv, gemv_bf16, custom_ops)  # eager launch, head, fused q/k/v and gate/up (siblings)
    for caller in callers:
        monkeypatch.setattr(caller, "gemv_threads", spy)
    tokens, logits = decode()
    for caller in callers:
        monkeypatch.setattr(caller, "gemv_threads", lambda n: 1)
    tokens_one, logits_one = decode()
    assert torch.equal(tokens, tokens_one)
    assert torch.equal(logits.view(torch.int16), logits_one.view(torch.int16))
    assert asked, "the decode steps went through the policy"
    if count == 2 and _kernels.omp_team_available():
        assert set(asked) == {-2}, "every launch on torch's team"
    else:
        assert min(asked) >= 0, "one torch thread: no team"
