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
