"""converter.quantize.cuda_pipeline: overlapped GPU quantization returns the CPU path's bytes, in order.

CudaQuantizer is the torch-tensor face of converter.quantize.cuda_host (the converter's --device cuda path);
the schedule both share (depth, order, early stop, NaN) is tested without a GPU in
tests/converter/test_cuda_host_cpu.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from converter.kernels import bnb4bit as kernels
from converter.quantize import cuda_pipeline
from formats.quant_types import QuantType


def _tensors():
    g = torch.Generator().manual_seed(3)
    shapes = [(256, 512), (1, 1), (3, 7), (1000, 333), (4096, 1024), (17,)]
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    out = []
    for i, s in enumerate(shapes):
        x = torch.randn(s, generator=g).to(dtypes[i % 3])
        out.append((f"layer{i}.weight", x))
    out.append(("zeros.weight", torch.zeros(64, 64, dtype=torch.bfloat16)))
    return out


def _expected(x, quant_type, blocksize, nested):
    packed, absmax = kernels.quantize_4bit(x.contiguous(), blocksize=blocksize, quant_type=quant_type)
    return packed, absmax, kernels.quantize_nested(absmax) if nested else None


def _check(results, quant_type, blocksize, nested):
    items = _tensors()
    assert [name for name, _ in results] == [name for name, _ in items]
    for (_, r), (_, x) in zip(results, items, strict=True):
        packed, absmax, nest = _expected(x, quant_type, blocksize, nested)
        assert torch.equal(r.packed.view(-1), packed)
        assert torch.equal(r.absmax, absmax)
        if nested:
            assert torch.equal(r.nested[0], nest[0])
            assert torch.equal(r.nested[1], nest[1])
            assert r.nested[2] == nest[2]
        else:
            assert r.nested is None


def test_cpu_fallback_says_why_and_gives_the_cpu_bytes(monkeypatch):
    from converter.kernels import bnb4bit_cuda as kernels_cuda

    monkeypatch.setattr(kernels_cuda, "cuda_status", lambda: (False, "no CUDA device found"))
    q = cuda_pipeline.make_quantizer(QuantType.NF4, 64, nested=True)
    assert isinstance(q, cuda_pipeline.CpuQuantizer)
    assert "no CUDA device found" in q.fallback_reason
    assert "CPU" in q.fallback_reason
    _check(list(q.quantize_many(_tensors())), QuantType.NF4, 64, True)


def test_a_gpu_older_than_the_build_is_not_usable(monkeypatch):
    # A CUDA build on a machine whose GPU predates compute capability 8.0 (e.g. a T4): the kernels have
    # no image for it, so the backend says so and --device cuda converts on the CPU with that reason.
    from converter import _kernels
    from converter.kernels import bnb4bit_cuda as kernels_cuda
    from converter.writer.pipeline import resolve_device

    monkeypatch.setattr(_kernels, "has_cuda_build", lambda: True, raising=False)
    monkeypatch.setattr(_kernels, "CudaHostPipeline", object, raising=False)  # a CPU-only build has none
    monkeypatch.setattr(_kernels, "cuda_available", lambda: (1, ""), raising=False)
    monkeypatch.setattr(
        _kernels, "cuda_device_info", lambda i: {"name": "Tesla T4", "capability": (7, 5)}, raising=False
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kernels_cuda.cuda_status.cache_clear()  # the answer is cached per process
    try:
        usable, why = kernels_cuda.cuda_status()
        device, note = resolve_device("cuda")
    finally:
        kernels_cuda.cuda_status.cache_clear()
    assert not usable
    assert why == (
        "GPU 0 (Tesla T4) has compute capability 7.5; this build's CUDA kernels need 8.0 or newer "
        "(A100, RTX 30 series, H100 and later)"
    )
    assert device == "cpu"
    assert note == f"--device cuda: no usable CUDA backend, {why}; converting on the CPU (same bytes)"


@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", [QuantType.NF4, QuantType.FP4], ids=lambda q: q.label)
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cuda_quantizer_matches_cpu_in_order(quant_type, nested, depth):
    q = cuda_pipeline.make_quantizer(quant_type, 64, nested=nested)
    assert isinstance(q, cuda_pipeline.CudaQuantizer)
    assert q.fallback_reason == ""
    results = list(q.quantize_many(_tensors(), depth=depth))
    _check(results, quant_type, 64, nested)
    assert q.stats.tensors == len(results)
    assert q.stats.seconds_kernels > 0


@pytest.mark.cuda
def test_cuda_quantizer_names_a_tensor_with_nan():
    q = cuda_pipeline.CudaQuantizer(QuantType.NF4, 64, nested=True)
    bad = torch.randn(100, 100)
    bad[5, 5] = float("nan")
    items = [("ok.weight", torch.randn(10, 10)), ("bad.weight", bad)]
    with pytest.raises(kernels.NonFiniteInputError, match=r"bad\.weight"):
        list(q.quantize_many(items))


# --- converter.convert(device="cuda"): each shard streams through converter.quantize.cuda_host
# -----------------

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "converter"))
from qm_checkpoints import INTERLEAVED, INTERLEAVED_INCLUDE, make_interleaved  # noqa: E402

QUANTIZED = [name for entries in INTERLEAVED.values() for name, _, _, q in entries if q]


def _shard_hashes(folder: Path) -> dict[str, str]:
    """Every deterministic output file (the report holds timings and is left out)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "quantization_report.json"
    }


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_interleaved(tmp_path_factory.mktemp("src") / "interleaved")


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("quant_type", "nested", "blocksize", "dtype", "max_shard_size"),
    [
        ("nf4", True, 64, None, "5GB"),  # one shard: up to 2 tensors in flight across kept ones
        ("nf4", True, 64, None, "20KB"),  # two shards (l0..l4, l5..l9)
        ("fp4", False, 4096, None, "6KB"),  # one quantized tensor per shard or two
        ("nf4", False, 32, "float16", "5GB"),  # --dtype cast on the host before the upload
        ("fp4", True, 128, "float32", "6KB"),
    ],
)
def test_cuda_conversion_is_byte_identical_to_cpu(
    quant_type, nested, blocksize, dtype, max_shard_size, interleaved: Path, tmp_path: Path
):
    from converter.writer.pipeline import convert

    opts = {
        "include": INTERLEAVED_INCLUDE,
        "quant_type": quant_type,
        "double_quant": nested,
        "blocksize": blocksize,
        "dtype": dtype,
        "max_shard_size": max_shard_size,
        "progress": False,
    }
    cpu = convert(interleaved, tmp_path / "cpu", device="cpu", **opts)
    gpu = convert(interleaved, tmp_path / "gpu", device="cuda", **opts)
    # no fallback note: the GPU did it (both carry the same plan notes, e.g. the partial-block advice)
    assert gpu.notes == cpu.notes
    assert gpu.shards == cpu.shards
    assert _shard_hashes(tmp_path / "gpu") == _shard_hashes(tmp_path / "cpu")
    # The GPU quantizer's time split is in the report (bench/bench_cuda_convert.py prints it).
    timings = json.loads((tmp_path / "gpu" / "quantization_report.json").read_text())["timings"]
    split = timings["device"]
    assert split["device"].startswith("cuda")
    assert split["tensors"] == len(QUANTIZED)
    assert split["bytes_in"] > 0
    assert split["seconds_kernels"] > 0
    assert split["seconds_upload"] > 0
    assert split["seconds_download"] > 0
    assert "device" not in json.loads((tmp_path / "cpu" / "quantization_report.json").read_text())["timings"]


@pytest.mark.cuda
@pytest.mark.parametrize("max_shard_size", ["5GB", "20KB"])
def test_cuda_conversion_names_a_nan_tensor_mid_stream(max_shard_size: str, tmp_path: Path):
    from converter.errors import NonFiniteTensorError
    from converter.writer.manifest import MANIFEST_NAME
    from converter.writer.pipeline import convert

    src = make_interleaved(tmp_path / "src", nan_in="l6.weight")
    out = tmp_path / "out"
    with pytest.raises(NonFiniteTensorError) as exc:
        convert(
            src,
            out,
            device="cuda",
            include=INTERLEAVED_INCLUDE,
            max_shard_size=max_shard_size,
            progress=False,
        )
    assert str(exc.value) == (
        "tensor 'l6.weight' in b.safetensors holds NaN or Inf: it cannot be quantized; "
        "fix the checkpoint or pass --skip 'l6'"
    )
    # Nothing looks complete: only the manifest (in progress) and the shards it lists as finished.
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["state"] == "in_progress"
    assert len(manifest["shards"]) == (0 if max_shard_size == "5GB" else 1)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME, *manifest["shards"]])
    # The same folder then converts a clean source (the failed run left nothing that blocks it).
    clean = make_interleaved(tmp_path / "clean")
    convert(clean, out, device="cuda", include=INTERLEAVED_INCLUDE, overwrite=True, progress=False)
    convert(clean, tmp_path / "cpu", device="cpu", include=INTERLEAVED_INCLUDE, progress=False)
    assert _shard_hashes(out) == _shard_hashes(tmp_path / "cpu")


@pytest.mark.cuda
def test_cuda_quantizer_stops_cleanly_when_the_caller_stops_early():
    """The pipeline closes quantize_many on an error: what is in flight is waited for, then dropped,
    and the quantizer keeps working (its pinned slots are reused)."""
    q = cuda_pipeline.CudaQuantizer(QuantType.NF4, 64, nested=True)
    items = _tensors()
    stream = q.quantize_many(iter(items), depth=2)
    first = next(stream)
    assert first[0] == items[0][0]
    stream.close()
    _check(list(q.quantize_many(_tensors())), QuantType.NF4, 64, True)
