"""converter.quantize.cuda_host on a GPU: the torch-free --device cuda quantizer gives the CPU kernels' bytes.

Every input is quantized by ``_kernels.CudaHostPipeline`` (pinned chunks, one worker thread) and by
``converter.kernels.bnb4bit_np`` on the CPU; packed codes, absmax, nested codes, nested absmax and offset must
be equal bit for bit (design.md: identical on every device). Small ``chunk_bytes`` force many chunks
per tensor, so chunk boundaries, partial last blocks and odd element counts are all crossed.
"""

from __future__ import annotations

import numpy as np
import pytest

from converter.kernels import bnb4bit_np as kernels_np
from converter.quantize import cuda_host, host_backends
from converter.quantize.host_quantizer import HostQuantizer
from formats.quant_types import QuantType

pytestmark = pytest.mark.cuda

SHAPES = [(256, 512), (1, 1), (3, 7), (1000, 333), (4096, 1024), (17,), (0, 4), (127, 129), (3, 1_000_003)]


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (finite inputs of this size stay finite)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _items(seed: int = 3, nan_in: str | None = None) -> list[tuple[str, np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i, shape in enumerate(SHAPES):
        x = rng.standard_normal(shape).astype(np.float32) * (0.02 if i % 2 else 3.0)
        if x.size and f"w{i}" == nan_in:
            x.flat[x.size // 2] = np.inf
        dtype = ("BF16", "F16", "F32")[i % 3]
        x = _bf16_bits(x) if dtype == "BF16" else x.astype(np.float16 if dtype == "F16" else np.float32)
        out.append((f"w{i}", x, dtype))
    out.append(("zeros", np.zeros((64, 64), np.uint16), "BF16"))  # absmax 0: codes of 0, offset 0
    return out


def _check(got: list, quant_type: QuantType, blocksize: int, nested: bool) -> None:
    cpu = HostQuantizer(quant_type, blocksize, nested)
    items = _items()
    assert [name for name, _ in got] == [name for name, _, _ in items]
    for (name, g), (_, x, dtype) in zip(got, items, strict=True):
        w = cpu.quantize(name, x, dtype)
        assert g.packed.tobytes() == w.packed.tobytes(), name
        assert g.absmax.tobytes() == w.absmax.tobytes(), name
        if nested:
            assert g.nested[0].tobytes() == w.nested[0].tobytes(), name
            assert g.nested[1].tobytes() == w.nested[1].tobytes(), name
            assert np.float32(g.nested[2]).tobytes() == np.float32(w.nested[2]).tobytes(), name
        else:
            assert g.nested is None


@pytest.mark.parametrize("quant_type", [QuantType.NF4, QuantType.FP4], ids=lambda q: q.label)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("chunk_bytes", [1 << 16, cuda_host.CHUNK_BYTES], ids=["64KB", "default"])
def test_bytes_equal_the_cpu_kernels(quant_type, nested, blocksize, chunk_bytes) -> None:
    q = cuda_host.CudaHostQuantizer(quant_type, blocksize, nested, 0, chunk_bytes=chunk_bytes)
    got = list(q.quantize_many(iter(_items())))
    _check(got, quant_type, blocksize, nested)
    assert q.stats.tensors == sum(1 for _, x, _ in _items() if x.size)
    assert q.stats.seconds_kernels > 0
    assert q.stats.seconds_upload > 0


@pytest.mark.parametrize("depth", [1, 2, 3, 8])
def test_any_depth_gives_the_same_bytes_in_order(depth: int) -> None:
    q = cuda_host.CudaHostQuantizer(QuantType.NF4, 64, True, 0, chunk_bytes=1 << 16)
    _check(list(q.quantize_many(iter(_items()), depth=depth)), QuantType.NF4, 64, True)


def test_read_only_memory_map_input(tmp_path) -> None:
    """The converter hands memory maps of the source files (read only): the host copy reads them."""
    x = _bf16_bits(np.random.default_rng(1).standard_normal((1000, 333)))
    path = tmp_path / "x.bin"
    x.tofile(path)
    mapped = np.memmap(path, dtype=np.uint16, mode="r", shape=x.shape)
    q = cuda_host.CudaHostQuantizer(QuantType.NF4, 64, True, 0, chunk_bytes=1 << 16)
    ((_, g),) = list(q.quantize_many([("m", mapped, "BF16")]))
    p, a = kernels_np.quantize_4bit(x, "BF16", blocksize=64, quant_type=QuantType.NF4)
    assert g.packed.tobytes() == p.tobytes()
    assert g.absmax.tobytes() == a.tobytes()


def test_nan_names_the_tensor_and_the_quantizer_keeps_working() -> None:
    q = cuda_host.CudaHostQuantizer(QuantType.NF4, 64, True, 0, chunk_bytes=1 << 16)
    with pytest.raises(kernels_np.NonFiniteInputError, match=r"^tensor 'w3' holds NaN or Inf") as exc:
        list(q.quantize_many(iter(_items(nan_in="w3"))))
    assert exc.value.tensor == "w3"
    _check(list(q.quantize_many(iter(_items()))), QuantType.NF4, 64, True)


def test_closed_early_then_reused() -> None:
    q = cuda_host.CudaHostQuantizer(QuantType.FP4, 128, False, 0)
    stream = q.quantize_many(iter(_items()), depth=3)
    assert next(stream)[0] == "w0"
    stream.close()  # waits for the two tensors still in flight
    _check(list(q.quantize_many(iter(_items()))), QuantType.FP4, 128, False)


def test_status_and_device_list_without_torch() -> None:
    assert cuda_host.cuda_status() == (True, "")
    info = cuda_host.backend_info()
    assert info is not None
    assert info["devices"][0]["total_memory"] > 0
    assert host_backends.available_backends()["cuda"] == info
