"""The converter streams each shard's tensors through a quantizer's ``quantize_many``
(converter.writer.pipeline).

On the CPU the quantizer (converter.quantize.host_quantizer.HostQuantizer, numpy) takes each tensor at its
turn; the GPU quantizer (converter.quantize.cuda_host.CudaHostQuantizer) takes up to ``depth`` tensors ahead
of the one being written. ``ReadAheadQuantizer`` below runs that GPU schedule on the CPU kernels, so
the ordering, bookkeeping and error paths the ``--device cuda`` conversion relies on are tested here
without a GPU (tests/cuda runs the real one).
"""

from __future__ import annotations

import collections
import json
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from qm_checkpoints import INTERLEAVED, INTERLEAVED_INCLUDE, make_interleaved
from test_pipeline import output_hashes

from converter.errors import NonFiniteTensorError
from converter.kernels import bnb4bit as kernels
from converter.quantize.host_quantizer import HostQuantizer, HostResult
from converter.sources import open_source
from converter.writer import pipeline
from converter.writer.manifest import MANIFEST_NAME
from converter.writer.pipeline import convert
from formats.quant_types import QuantType
from formats.reader import open_folder, open_shard
from formats.record import QuantizedTensor

ORDER = [name for entries in INTERLEAVED.values() for name, *_ in entries]
FILE_OF = {name: file for file, entries in INTERLEAVED.items() for name, *_ in entries}
QUANTIZED = [name for entries in INTERLEAVED.values() for name, _, _, q in entries if q]
OPTS = {"include": INTERLEAVED_INCLUDE, "progress": False}


class ReadAheadQuantizer(HostQuantizer):
    """CudaHostQuantizer's schedule on the CPU kernels: up to ``depth`` inputs are taken (and copied, as
    into pinned staging) before the oldest result is handed back. A NaN is reported when that
    tensor's result is due (``fail_at="finish"``, as on a GPU) or as soon as it is taken
    (``"submit"``: while the converter is still writing an earlier tensor)."""

    def __init__(self, *args, depth: int = 2, fail_at: str = "finish", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.depth, self.fail_at = depth, fail_at
        self.most_ahead = 0
        self.taken: list[str] = []

    def quantize_many(self, items: Iterable[tuple[str, np.ndarray, str]]) -> Iterator[tuple[str, HostResult]]:
        pending: collections.deque = collections.deque()
        for name, x, dtype in items:
            self.taken.append(name)
            pending.append(
                (name, self.quantize(name, x, dtype) if self.fail_at == "submit" else (x.copy(), dtype))
            )
            self.most_ahead = max(self.most_ahead, len(pending))
            if len(pending) >= self.depth:
                yield self._finish(*pending.popleft())
        while pending:
            yield self._finish(*pending.popleft())

    def _finish(self, name: str, v: HostResult | tuple[np.ndarray, str]) -> tuple[str, HostResult]:
        return name, v if isinstance(v, HostResult) else self.quantize(name, *v)


def use_quantizer(monkeypatch: pytest.MonkeyPatch, **kwargs) -> list[ReadAheadQuantizer]:
    made: list[ReadAheadQuantizer] = []

    def factory(options, device, threads):
        q = ReadAheadQuantizer(
            options.qtype, options.blocksize, options.double_quant, threads=threads, **kwargs
        )
        made.append(q)
        return q

    monkeypatch.setattr(pipeline, "new_quantizer", factory)
    return made


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_interleaved(tmp_path_factory.mktemp("src") / "interleaved")


def owners(keys: list[str]) -> list[str]:
    """The planned tensor each stored key belongs to (``l0.weight.absmax`` -> ``l0.weight``), in order."""
    out: list[str] = []
    for key in keys:
        owner = max((n for n in ORDER if key == n or key.startswith(n + ".")), key=len)
        if not out or out[-1] != owner:
            out.append(owner)
    return out


@pytest.mark.parametrize(("quant_type", "nested"), [("nf4", True), ("fp4", False)])
def test_every_tensor_in_plan_order_with_the_kernels_bytes(
    quant_type: str, nested: bool, interleaved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    real_write = pipeline.ShardWriter.write

    def write(self, name, data):
        written.append(name)
        return real_write(self, name, data)

    monkeypatch.setattr(pipeline.ShardWriter, "write", write)
    out = tmp_path / "out"
    r = convert(interleaved, out, quant_type=quant_type, double_quant=nested, max_shard_size="6KB", **OPTS)
    assert len(r.shards) >= 3
    assert (r.tensors_quantized, r.tensors_kept) == (len(QUANTIZED), len(ORDER) - len(QUANTIZED))
    # Written in the source's order, kept tensors between quantized ones, each record's keys together.
    assert owners(written) == ORDER
    # Shards cut the plan into consecutive runs.
    stored = []
    for shard in r.shards:
        with open_shard(out / shard) as s:
            stored += sorted(set(owners(s.keys())), key=ORDER.index)
    assert stored == ORDER
    src = open_folder(interleaved)
    with open_folder(out) as ckpt:
        assert sorted(ckpt.quantized) == sorted(QUANTIZED)
        for name in ORDER:
            x = src.get_tensor(name)
            if name not in QUANTIZED:
                assert torch.equal(ckpt.get_tensor(name), x), name
                continue
            # What the per-tensor path wrote: the kernels on this one tensor, wrapped as a record.
            qt = QuantType.parse(quant_type)
            packed, absmax = kernels.quantize_4bit(x.contiguous(), blocksize=64, quant_type=qt)
            expected = QuantizedTensor.from_kernel_outputs(
                name=name,
                shape=tuple(x.shape),
                dtype=str(x.dtype).removeprefix("torch."),
                quant_type=qt,
                blocksize=64,
                packed=packed,
                absmax=absmax,
                nested=kernels.quantize_nested(absmax) if nested else None,
            ).state_dict()
            got = ckpt.record(name).state_dict()
            assert got.keys() == expected.keys(), name
            for key, value in expected.items():
                assert torch.equal(got[key], value), key
    src.close()


@pytest.mark.parametrize("max_shard_size", ["5GB", "6KB"])
@pytest.mark.parametrize("depth", [1, 2, 3, 8])
def test_reading_ahead_gives_the_same_bytes(
    depth: int, max_shard_size: str, interleaved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = tmp_path / "reference"
    convert(interleaved, reference, max_shard_size=max_shard_size, **OPTS)
    made = use_quantizer(monkeypatch, depth=depth)
    out = tmp_path / "out"
    r = convert(interleaved, out, max_shard_size=max_shard_size, **OPTS)
    assert output_hashes(out) == output_hashes(reference)
    assert [n for n in r.notes if "element blocks" not in n] == []  # its odd widths get the bnb CPU advice
    (q,) = made
    assert q.taken == QUANTIZED  # each tensor to quantize read once, in order
    if max_shard_size == "5GB":  # one shard: read ahead as far as asked (never past a shard's end)
        assert q.most_ahead == min(depth, len(QUANTIZED))
    report = json.loads((out / "quantization_report.json").read_text())
    assert "device" not in report["timings"]  # the GPU split only comes from a CudaHostQuantizer


@pytest.mark.parametrize("depth", [1, 3])
def test_each_source_file_released_right_after_its_last_tensor(
    depth: int, interleaved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_quantizer(monkeypatch, depth=depth)
    src = open_source(interleaved)
    events: list[tuple[str, str]] = []
    real_open, real_release = src.open_file, src.release

    def open_file(file: str):
        events.append(("open", file))
        return real_open(file)

    def release(file: str) -> None:
        events.append(("release", file))
        real_release(file)

    src.open_file, src.release = open_file, release  # type: ignore[method-assign]
    convert(
        src,
        tmp_path / "out",
        include=INTERLEAVED_INCLUDE,
        progress=lambda name, _: events.append(("wrote", name)),
    )
    for file, entries in INTERLEAVED.items():
        assert events.count(("open", file)) == 1
        assert events.count(("release", file)) == 1
        # Released once its last tensor is written (just before that tensor's progress report).
        i = events.index(("release", file))
        assert events[i + 1] == ("wrote", entries[-1][0])
        assert all(events.index(("wrote", name)) < i for name, *_ in entries[:-1])
    assert [name for kind, name in events if kind == "wrote"] == ORDER


@pytest.mark.parametrize(("depth", "fail_at"), [(0, ""), (2, "finish"), (2, "submit"), (4, "submit")])
def test_nan_mid_stream_named_and_nothing_complete(
    depth: int, fail_at: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if depth:
        use_quantizer(monkeypatch, depth=depth, fail_at=fail_at)
    src = make_interleaved(tmp_path / "src", nan_in="l6.weight")
    out = tmp_path / "out"
    # 5GB: one shard, l6 is taken while l5 is still being written. 20KB: two shards (l0..l4, l5..l9),
    # the first one finishes, l6 fails in the second.
    for max_shard_size in ("5GB", "20KB"):
        with pytest.raises(NonFiniteTensorError) as exc:
            convert(src, out, max_shard_size=max_shard_size, overwrite=True, **OPTS)
        assert str(exc.value) == (
            "tensor 'l6.weight' in b.safetensors holds NaN or Inf: it cannot be quantized; "
            "fix the checkpoint or pass --skip 'l6'"
        )
        # Nothing looks complete: the manifest is in progress, every shard left is one it lists as
        # finished (none of them holds l6), no partial file, no index, no config.
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        assert manifest["state"] == "in_progress"
        left = sorted(p.name for p in out.iterdir())
        assert left == sorted([MANIFEST_NAME, *manifest["shards"]])
        for shard in manifest["shards"]:
            with open_shard(out / shard) as s:
                assert "l6.weight" not in owners(s.keys())
        assert len(manifest["shards"]) == (0 if max_shard_size == "5GB" else 1)


def test_cpu_conversion_uses_the_cpu_quantizer(interleaved: Path, tmp_path: Path, monkeypatch) -> None:
    made: list = []
    real = pipeline.new_quantizer

    def spy(options, device, threads):
        q = real(options, device, threads)
        made.append((device, q))
        return q

    monkeypatch.setattr(pipeline, "new_quantizer", spy)
    convert(interleaved, tmp_path / "out", threads=1, **OPTS)
    ((device, q),) = made
    assert device == "cpu"
    assert type(q) is HostQuantizer
    assert (q.quant_type, q.blocksize, q.nested, q.threads) == (QuantType.NF4, 64, True, 1)
    assert q.stats.tensors == len(QUANTIZED)


def test_no_input_is_held_while_later_tensors_are_written(
    interleaved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streaming adds no memory to the CPU path: once a tensor is quantized nothing keeps its
    input alive (the reader generator and the quantizer hold no reference across their yields)."""
    inputs: list[weakref.ref] = []
    real_read_input = pipeline._Conversion._read_input

    def read_input(self, *args):
        x = real_read_input(self, *args)
        inputs.append(weakref.ref(x))
        return x

    alive_at_kept_writes: list[int] = []
    real_write = pipeline.ShardWriter.write

    def write(self, name, data):
        if name in ORDER and name not in QUANTIZED:
            alive_at_kept_writes.append(sum(ref() is not None for ref in inputs))
        return real_write(self, name, data)

    monkeypatch.setattr(pipeline._Conversion, "_read_input", read_input)
    monkeypatch.setattr(pipeline.ShardWriter, "write", write)
    convert(interleaved, tmp_path / "out", dtype="float32", **OPTS)  # casts: every input is a copy
    assert len(inputs) == len(QUANTIZED)
    assert alive_at_kept_writes == [0] * (len(ORDER) - len(QUANTIZED))
