"""converter.quantize.cuda_host without a GPU: device parsing, the fallback, and CudaHostQuantizer's
bookkeeping.

``FakePipe`` stands in for ``_kernels.CudaHostPipeline`` (same submit / wait contract: raw addresses of
numpy buffers, results written into them when the ticket is waited for), computing with the CPU
kernels. So the order of results, what stays referenced while in flight, the NaN report and the
early stop are tested here byte for byte; tests/cuda/test_cuda_host.py runs the real pipeline.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from converter import _kernels
from converter.errors import InputError
from converter.kernels import bnb4bit_np as kernels_np
from converter.quantize import cuda_host
from converter.quantize.host_backends import make_host_quantizer
from converter.quantize.host_quantizer import HostQuantizer
from converter.writer import pipeline
from formats.quant_types import QuantType

CODES = {v: k for k, v in cuda_host.DTYPE_CODES.items()}


def _view(address: int, dtype: np.dtype, count: int) -> np.ndarray:
    raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(raw, dtype, count)


class FakePipe:
    """CudaHostPipeline's contract on the CPU kernels; logs every submit and wait."""

    log: list

    def __init__(self, device, quant_type, blocksize, nested, chunk_bytes, threads, mids) -> None:
        assert len(mids) == 255
        assert chunk_bytes == cuda_host.CHUNK_BYTES
        self.qt, self.bs, self.nested = QuantType(quant_type), blocksize, nested
        self.jobs: dict[int, tuple] = {}
        self.tickets = 0

    def submit(self, x, dtype, n, packed, absmax, codes, nested_absmax) -> int:
        self.tickets += 1
        ticket = self.tickets
        self.jobs[ticket] = (x, CODES[dtype], n, packed, absmax, codes, nested_absmax)
        FakePipe.log.append(("submit", ticket))
        return ticket

    def wait(self, ticket: int) -> tuple:
        FakePipe.log.append(("wait", ticket))
        x, dtype, n, packed, absmax, codes, nabs = self.jobs.pop(ticket)
        src = _view(x, kernels_np.KERNEL_DTYPES[dtype][1], n)
        try:
            p, a = kernels_np.quantize_4bit(src, dtype, blocksize=self.bs, quant_type=self.qt)
        except kernels_np.NonFiniteInputError:
            return True, 0.0, 0.0, 0.0, 0.0, 0.0
        _view(packed, np.uint8, p.size)[:] = p
        _view(absmax, np.float32, a.size)[:] = a
        offset = 0.0
        if self.nested:
            c, na, offset = kernels_np.quantize_nested(a)
            _view(codes, np.uint8, c.size)[:] = c
            _view(nabs, np.float32, na.size)[:] = na
        return False, offset, 0.001, 0.002, 0.003, 0.004


@pytest.fixture
def fake_pipe(monkeypatch: pytest.MonkeyPatch) -> list:
    FakePipe.log = []
    monkeypatch.setattr(_kernels, "CudaHostPipeline", FakePipe, raising=False)
    monkeypatch.setattr(cuda_host, "warm_up", lambda device: None)
    return FakePipe.log


def _items(bad: str | None = None) -> list[tuple[str, np.ndarray, str]]:
    rng = np.random.default_rng(7)
    out = []
    for i, (shape, dtype) in enumerate(
        [((64, 32), "F32"), ((3, 7), "F16"), ((131, 77), "BF16"), ((0, 8), "BF16"), ((1, 1), "F32")]
    ):
        x = rng.standard_normal(shape).astype(np.float32)
        if f"w{i}" == bad:
            x.flat[5] = np.nan
        if dtype == "F16":
            x = x.astype(np.float16)
        elif dtype == "BF16":
            x = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bf16 bits: finite stays finite
        out.append((f"w{i}", x, dtype))
    return out


def _same(got, quant_type: QuantType, blocksize: int, nested: bool) -> None:
    cpu = HostQuantizer(quant_type, blocksize, nested)
    want = [(name, cpu.quantize(name, x, dtype)) for name, x, dtype in _items()]
    assert [n for n, _ in got] == [n for n, _ in want]
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert g.packed.tobytes() == w.packed.tobytes()
        assert g.absmax.tobytes() == w.absmax.tobytes()
        if nested:
            assert g.nested[0].tobytes() == w.nested[0].tobytes()
            assert g.nested[1].tobytes() == w.nested[1].tobytes()
            assert g.nested[2] == w.nested[2]
        else:
            assert g.nested is None


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("nested", [True, False])
def test_results_in_order_with_depth_tensors_submitted(fake_pipe: list, depth: int, nested: bool) -> None:
    q = cuda_host.CudaHostQuantizer(QuantType.NF4, 64, nested, 0)
    got = list(q.quantize_many(iter(_items()), depth=depth))
    _same(got, QuantType.NF4, 64, nested)
    # The empty tensor (w3) never reaches the pipe; result k is waited for once min(k + depth, all)
    # items were taken, so the worker always has the next tensor while the caller writes one.
    tickets = {"w0": 1, "w1": 2, "w2": 3, "w4": 4}
    expected, taken = [], []
    for name, _, _ in _items():
        expected += [("submit", tickets[name])] if name in tickets else []
        taken.append(name)
        if len(taken) >= depth:
            first = taken.pop(0)
            expected += [("wait", tickets[first])] if first in tickets else []
    expected += [("wait", tickets[n]) for n in taken if n in tickets]
    assert fake_pipe == expected
    assert q.stats.tensors == 4
    assert q.stats.seconds_kernels == pytest.approx(0.012)
    assert q.device == "cuda:0"


def test_nan_is_named_and_what_is_in_flight_is_waited_for(fake_pipe: list) -> None:
    q = cuda_host.CudaHostQuantizer(QuantType.NF4, 64, True, 0)
    with pytest.raises(kernels_np.NonFiniteInputError, match=r"^tensor 'w1' holds NaN or Inf") as exc:
        list(q.quantize_many(iter(_items(bad="w1")), depth=2))
    assert exc.value.tensor == "w1"
    assert fake_pipe[-2:] == [("wait", 2), ("wait", 3)]  # w2 was in flight: waited for before dropping


def test_closed_early_waits_for_the_rest(fake_pipe: list) -> None:
    q = cuda_host.CudaHostQuantizer(QuantType.FP4, 128, False, 0)
    stream = q.quantize_many(iter(_items()), depth=2)
    assert next(stream)[0] == "w0"
    stream.close()
    assert fake_pipe == [("submit", 1), ("submit", 2), ("wait", 1), ("wait", 2)]


def test_bad_input_is_refused_before_it_is_queued(fake_pipe: list) -> None:
    q = cuda_host.CudaHostQuantizer(QuantType.NF4, 64, True, 0)
    with pytest.raises(ValueError, match="a BF16 tensor needs uint16 elements"):
        list(q.quantize_many([("w", np.zeros(8, np.float32), "BF16")]))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        list(q.quantize_many([], depth=0))
    assert fake_pipe == []


def test_device_index() -> None:
    assert cuda_host.device_index("cuda") == 0
    msg = r"^--device 'cuda:x': expected cuda or cuda:N \(N a device index\)$"
    with pytest.raises(ValueError, match=msg):
        cuda_host.device_index("cuda:x")


def test_device_beyond_the_machine_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    monkeypatch.setattr(cuda_host, "cuda_status", lambda: (True, ""))
    monkeypatch.setattr(_kernels, "cuda_available", lambda: (2, ""), raising=False)
    monkeypatch.setattr(cuda_host, "warm_up", started.append)
    assert pipeline.resolve_device("cuda:1") == ("cuda:1", None)
    assert started == [1]  # the context is created while the conversion plans
    with pytest.raises(InputError) as exc:
        pipeline.resolve_device("cuda:2")
    assert str(exc.value) == "--device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1"
    assert started == [1]


def test_unusable_cuda_falls_back_to_the_cpu_quantizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_host, "cuda_status", lambda: (False, "no CUDA device found"))
    q = make_host_quantizer(QuantType.NF4, 64, True, "cuda", None)
    assert isinstance(q, HostQuantizer)
    assert q.fallback_reason == (
        "--device cuda: no CUDA device found; quantizing on the CPU instead (same bytes, slower)"
    )
    assert pipeline.resolve_device("cuda") == (
        "cpu",
        "--device cuda: no usable CUDA backend, no CUDA device found; converting on the CPU (same bytes)",
    )


def test_a_build_without_the_host_pipeline_is_not_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    """An extension built before csrc/cuda/host_pipeline.* (a stale build): fall back, say rebuild."""
    monkeypatch.setattr(_kernels, "has_cuda_build", lambda: True, raising=False)
    monkeypatch.delattr(_kernels, "CudaHostPipeline", raising=False)
    assert cuda_host.cuda_status() == (
        False,
        "converter._kernels was built before its CUDA host pipeline existed: rebuild it "
        "(pip install --no-build-isolation -e .)",
    )


needs_gpuless_cuda_build = pytest.mark.skipif(
    not getattr(_kernels, "has_cuda_build", lambda: False)() or _kernels.cuda_available()[0] > 0,
    reason="needs a CUDA build of the extension on a machine without a GPU",
)


@needs_gpuless_cuda_build
def test_real_pipeline_without_a_gpu_reports_the_cuda_error() -> None:
    """The worker's set-up fails (no device): waiting raises that error, naming the call; no hang."""
    mids = [0.0] * 255
    with pytest.raises(ValueError, match="unsupported blocksize"):
        _kernels.CudaHostPipeline(0, 1, 48, True, 1 << 20, 0, mids)
    with pytest.raises(ValueError, match="unsupported quant type"):
        _kernels.CudaHostPipeline(0, 3, 64, True, 1 << 20, 0, mids)
    pipe = _kernels.CudaHostPipeline(0, 1, 64, False, 1 << 20, 0, mids)
    x = np.ones(100, np.float32)
    packed, absmax = np.empty(50, np.uint8), np.empty(2, np.float32)
    addr = kernels_np.address
    with pytest.raises(ValueError, match=r"submit\(n 100, dtype code 7\): unsupported dtype"):
        pipe.submit(addr(x), 7, 100, addr(packed), addr(absmax), 0, 0)
    ticket = pipe.submit(addr(x), 0, 100, addr(packed), addr(absmax), 0, 0)
    with pytest.raises(RuntimeError, match=rf"^CudaHostPipeline\.wait\(ticket {ticket}\): cudaError"):
        pipe.wait(ticket)
    with pytest.raises(ValueError, match="size out of range"):
        pipe.wait(ticket)  # each ticket is waited for once
    del pipe  # joins the worker
