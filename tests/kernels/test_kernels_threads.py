"""The thread pool: results independent of caller state (denormal flags) and of concurrent callers."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from converter.kernels import bnb4bit as kernels
from formats import reference
from formats.quant_types import QuantType


@pytest.fixture
def flush_denormals():
    # Sets FTZ and DAZ in the calling thread's MXCSR, as some libraries leave it.
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    yield
    torch.set_flush_denormal(False)


def test_caller_denormal_flags_do_not_change_the_bytes(flush_denormals):
    # Blocks of f32 subnormals: absmax, 1e-38 and the scaled values are all subnormal-sensitive.
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(64 * 40) * 1e-40).astype(np.float32)
    x[: 64 * 4] *= np.float32(1e-3)
    torch.set_flush_denormal(False)
    ref_packed, ref_absmax = reference.quantize_4bit(x, 64, QuantType.NF4)
    torch.set_flush_denormal(True)
    for isa in kernels.cpu_isas():
        for threads in (1, 2):
            packed, absmax = kernels.quantize_4bit(
                torch.from_numpy(x), blocksize=64, quant_type=QuantType.NF4, isa=isa, threads=threads
            )
            assert np.array_equal(packed.numpy(), ref_packed), f"isa={isa} threads={threads}"
            assert np.array_equal(absmax.numpy().view(np.uint32), ref_absmax.view(np.uint32))


def test_concurrent_callers_get_their_own_results():
    tensors = [torch.randn(257, 1000, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    expected = [kernels.quantize_4bit(t, blocksize=64, quant_type=QuantType.NF4, threads=1) for t in tensors]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(
            pool.map(
                lambda t: kernels.quantize_4bit(t, blocksize=64, quant_type=QuantType.NF4, threads=2), tensors
            )
        )
    for (packed, absmax), (ref_packed, ref_absmax) in zip(results, expected, strict=True):
        assert torch.equal(packed, ref_packed)
        assert torch.equal(absmax, ref_absmax)


def test_forked_child_runs_kernels():
    # The pool's worker threads do not exist in a forked child; it must build its own, not hang.
    x = torch.randn(64, 4096)
    expected, _ = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4, threads=2)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only our kernel and raw bytes, then leave without running pytest's teardown
        try:
            packed, _ = kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4, threads=2)
            os.write(write_fd, packed.numpy().tobytes())
        finally:
            os._exit(0)
    os.close(write_fd)
    received = b""
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read(1 << 16):
            received += chunk
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert received == expected.numpy().tobytes()


# torch's OpenMP team (threads < 0: csrc/omp_team.cpp), which the decode GEMVs use while torch's
# workers spin (converter/kernels/cpu_threads.py).


@pytest.fixture
def torch_threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def test_omp_team_is_found_when_torch_runs_on_openmp():
    from converter import _kernels

    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert _kernels.omp_team_available() is openmp


@pytest.mark.timeout(120)
@pytest.mark.parametrize("torch_count", [1, 2])
def test_team_launches_give_the_calling_thread_bits(torch_threads, torch_count, monkeypatch):
    from converter.kernels.gemv_bf16 import gemv_bf16

    torch_threads(torch_count)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1000, 96, generator=g).to(torch.bfloat16)  # 1000 rows: chunks end mid-tile
    for isa in kernels.cpu_isas():
        monkeypatch.setenv("QM_CPU_ISA", isa)
        for batch in (1, 3, 8):
            x = torch.randn(batch, 96, generator=g).to(torch.bfloat16)
            one = gemv_bf16(x, w, threads=1)
            for threads in (-1, -2, -7, 0, 2):  # team of 1, torch's size, larger than torch's; our pool
                assert torch.equal(one, gemv_bf16(x, w, threads=threads)), f"isa={isa} threads={threads}"


@pytest.mark.timeout(120)
def test_team_launches_from_several_python_threads():
    # Each Python thread that launches becomes the master of a team of its own; none waits for another.
    from converter.kernels.gemv_bf16 import gemv_bf16

    g = torch.Generator().manual_seed(4)
    w = torch.randn(4096, 256, generator=g).to(torch.bfloat16)
    xs = [torch.randn(2, 256, generator=g).to(torch.bfloat16) for _ in range(12)]
    expected = [gemv_bf16(x, w, threads=1) for x in xs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda x: [gemv_bf16(x, w, threads=-2) for _ in range(20)], xs))
    for got, ref in zip(results, expected, strict=True):
        assert all(torch.equal(y, ref) for y in got)


@pytest.mark.timeout(120)
def test_forked_child_after_team_launches():
    # The parent's OpenMP team has no threads in a forked child: the child's team launches must not
    # wait for them (they take our pool), and give the same bytes.
    from converter.kernels.gemv_bf16 import gemv_bf16

    g = torch.Generator().manual_seed(5)
    w = torch.randn(4096, 256, generator=g).to(torch.bfloat16)
    x = torch.randn(1, 256, generator=g).to(torch.bfloat16)
    expected = gemv_bf16(x, w, threads=-2)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_fd, gemv_bf16(x, w, threads=-2).view(torch.int16).numpy().tobytes())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        received = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert received == expected.view(torch.int16).numpy().tobytes()
