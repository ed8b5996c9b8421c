"""Quantization error of every tensor: relative RMSE, max absolute error, SNR, non-finite counts.

Measured during conversion from the input and the codes just made (one C++ pass,
``_kernels.quant_error_stats``: v = quant_map[q] * absmax, the absmax a loader decodes, sums in f32
per block and float64 across blocks), and recomputed by ``verify --against SRC`` from the stored
shards. Definitions, over the n elements of a tensor with e = x - dequantized(x)::

    rel_rmse = sqrt(sum e^2 / sum x^2)         snr_db = 10 log10(sum x^2 / sum e^2)
    max_abs_err = max |e|                       nonfinite = NaN/Inf elements in x or dequantized(x)

Inputs may be torch tensors or numpy arrays (bfloat16 as a uint16 view); ``dtype`` names them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from converter import _kernels
from formats import codebooks
from formats.quant_types import QuantType

#: Tensors listed in the summary's "worst" table.
WORST = 5
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class TensorQuality:
    name: str
    n: int
    sum_x2: float
    sum_e2: float
    max_abs_err: float
    nonfinite: int

    @property
    def rel_rmse(self) -> float:
        if self.sum_x2 > 0:
            return math.sqrt(self.sum_e2 / self.sum_x2)
        return 0.0 if self.sum_e2 == 0 else math.inf

    @property
    def snr_db(self) -> float | None:
        """None when the error is exactly zero (infinite SNR; JSON has no inf)."""
        if self.sum_e2 == 0:
            return None
        return 10 * math.log10(self.sum_x2 / self.sum_e2) if self.sum_x2 > 0 else -math.inf

    def to_json(self) -> dict[str, Any]:
        return {
            "rel_rmse": _finite(self.rel_rmse),
            "max_abs_err": _finite(self.max_abs_err),
            "snr_db": _finite(self.snr_db),
            "nonfinite": self.nonfinite,
            # The raw sums let totals be recombined (resumed runs, summaries) without the tensors.
            "sum_x2": self.sum_x2,
            "sum_e2": self.sum_e2,
            "n": self.n,
        }

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> TensorQuality:
        return cls(name, int(d["n"]), float(d["sum_x2"]), float(d["sum_e2"]), float(d["max_abs_err"] or 0.0),
                   int(d["nonfinite"]))  # fmt: skip


def _finite(v: float | None) -> float | None:
    return v if v is None or math.isfinite(v) else None


def _ptr(a: Any) -> int:
    return int(a.data_ptr()) if hasattr(a, "data_ptr") else int(a.ctypes.data)


def _contiguous(a: Any) -> Any:
    return a.contiguous() if hasattr(a, "contiguous") else np.ascontiguousarray(a)


def _numel(a: Any) -> int:
    return int(a.numel()) if hasattr(a, "numel") else int(a.size)


@dataclass(frozen=True)
class Codes:
    """A quantized tensor's stored pieces (whatever array type the quantizer returns)."""

    packed: Any  # uint8 [(n+1)//2]
    absmax: Any  # float32 [nb], or the nested codes when nested is given
    nested: tuple[Any, Any, float] | None = None  # (codes u8 [nb], nested_absmax f32, offset)
    nested_map: Any = None  # float32 [256]; None: bnb's dynamic map


def decoded_absmax(codes: Codes) -> Any:
    """The float32 absmax a loader uses: the stored one, or the nested one decoded."""
    if codes.nested is None:
        return codes.absmax
    if isinstance(codes.nested[0], np.ndarray):  # the converter's CPU path: no torch
        from converter.kernels import bnb4bit_np as kernels_np

        q, nabs, offset = codes.nested
        nmap = codes.nested_map if codes.nested_map is not None else codebooks.as_f32(codebooks.DYNAMIC8)
        return kernels_np.dequantize_nested(q, nabs, float(offset), np.asarray(nmap))
    import torch

    from converter.kernels import bnb4bit as kernels

    q, nabs, offset = codes.nested
    nmap = codes.nested_map if codes.nested_map is not None else codebooks.as_f32(codebooks.DYNAMIC8)
    as_t = lambda a: a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return kernels.dequantize_nested(as_t(q), as_t(nabs), float(offset), as_t(nmap))


def measure(
    name: str,
    x: Any,
    dtype: str,
    codes: Codes,
    quant_type: QuantType,
    blocksize: int,
    *,
    quant_map: Any = None,
    threads: int | None = None,
) -> TensorQuality:
    """Error statistics of ``codes`` against ``x`` (flattened in C order; ``dtype`` F32/F16/BF16)."""
    x = _contiguous(x)
    n = _numel(x)
    absmax = _contiguous(decoded_absmax(codes))
    qmap = quant_map if quant_map is not None else codebooks.as_f32(quant_type.codebook)
    qmap = _contiguous(qmap)
    packed = _contiguous(codes.packed)
    sx, se, m, bad = _kernels.quant_error_stats(
        _ptr(x),
        _DTYPE_NAMES[dtype],
        n,
        blocksize,
        _ptr(packed),
        _ptr(absmax),
        _ptr(qmap),
        "auto",
        threads or 0,
    )
    return TensorQuality(name, n, sx, se, m, int(bad))


def count_nonfinite(x: Any, dtype: str, threads: int | None = None) -> int:
    """NaN/Inf elements of a kept tensor (``dtype`` its safetensors code; others have none)."""
    if dtype not in _DTYPE_NAMES:
        return 0
    x = _contiguous(x)
    return int(_kernels.count_nonfinite(_ptr(x), _DTYPE_NAMES[dtype], _numel(x), threads or 0))


def summarize(tensors: dict[str, TensorQuality], kept_nonfinite: dict[str, int]) -> dict[str, Any]:
    """Totals over every quantized tensor (sums recombined, so a resumed run gives the same numbers)
    and the tensors with the largest relative RMSE."""
    total = TensorQuality(
        "total",
        sum(t.n for t in tensors.values()),
        math.fsum(t.sum_x2 for t in tensors.values()),
        math.fsum(t.sum_e2 for t in tensors.values()),
        max((t.max_abs_err for t in tensors.values()), default=0.0),
        sum(t.nonfinite for t in tensors.values()),
    )
    worst = sorted(tensors.values(), key=lambda t: (-t.rel_rmse, t.name))[:WORST]
    return {
        "tensors_measured": len(tensors),
        "rel_rmse": _finite(total.rel_rmse),
        "snr_db": _finite(total.snr_db),
        "max_abs_err": _finite(total.max_abs_err),
        "nonfinite_quantized": total.nonfinite,
        "nonfinite_kept": sum(kept_nonfinite.values()),
        "kept_with_nonfinite": sorted(k for k, v in kept_nonfinite.items() if v),
        "worst": [
            {
                "name": t.name,
                "rel_rmse": _finite(t.rel_rmse),
                "snr_db": _finite(t.snr_db),
                "max_abs_err": _finite(t.max_abs_err),
            }
            for t in worst
        ],
    }


class QualityMeter:
    """The pipeline's hook: remembers each input until its codes come back, then measures it.

    ``remember`` reads each input for the reader (the quantizer may hold it a while, e.g. on a GPU);
    ``measured`` hands the input and its codes to one background thread (the kernel on one core,
    outside the kernels' thread pool, so it overlaps the pipeline's writes and hashing) and drops
    them once measured. Memory stays what the pipeline uses without it: an input that is a copy
    (cast or transposed: anonymous memory) is waited for before the next input is read, and every
    input before a kept tensor is written; only memory-mapped inputs (file pages) may stay in
    flight, at most ``MAX_PENDING``. ``shard_entry`` waits for a shard's tensors. ``seconds`` is
    the measuring time (on that thread), ``seconds_waited`` what the pipeline spent waiting for it.
    """

    MAX_PENDING = 2

    def __init__(self, quant_type: QuantType, blocksize: int, threads: int | None) -> None:
        self.quant_type, self.blocksize, self.threads = quant_type, blocksize, threads
        self._pending: dict[str, tuple[Any, str, bool]] = {}
        self._running: list[Future[None]] = []
        self._copies: list[Future[None]] = []
        self._pool: ThreadPoolExecutor | None = None
        self.tensors: dict[str, TensorQuality] = {}
        self.kept_nonfinite: dict[str, int] = {}
        self.seconds = 0.0
        self.seconds_waited = 0.0

    def remember(self, name: str, read: Callable[[], Any], dtype: str, copy: bool) -> Any:
        """``read()`` (the input of tensor ``name``, in ``dtype``; ``copy``: anonymous memory)."""
        if self._copies:
            self._wait()
        x = read()
        self._pending[name] = (x, dtype, copy)
        return x

    def measured(self, name: str, packed: Any, absmax: Any, nested: Any) -> None:
        x, dtype, copy = self._pending.pop(name)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qm-quality")
        codes = Codes(packed, absmax, nested)
        fut = self._pool.submit(self._measure, name, x, dtype, codes)
        self._running.append(fut)
        if copy:
            self._copies.append(fut)
        del x, codes
        if len(self._running) > self.MAX_PENDING:
            self._wait(len(self._running) - self.MAX_PENDING)

    def measured_result(self, name: str, result: Any) -> None:
        """``measured`` from what the method's quantizer yielded (packed, absmax, nested)."""
        self.measured(name, result.packed, result.absmax, result.nested)

    def _measure(self, name: str, x: Any, dtype: str, codes: Codes) -> None:
        t0 = time.perf_counter()
        self.tensors[name] = measure(name, x, dtype, codes, self.quant_type, self.blocksize, threads=1)
        self.seconds += time.perf_counter() - t0

    def _wait(self, count: int | None = None) -> None:
        t0 = time.perf_counter()
        done, self._running = (
            (self._running, []) if count is None else (self._running[:count], self._running[count:])
        )
        for fut in done:
            fut.result()  # re-raises what measuring raised
        self._copies = [f for f in self._copies if f in self._running]
        self.seconds_waited += time.perf_counter() - t0

    def kept(self, name: str, x: Any, dtype: str) -> None:
        self._wait()  # no input stays alive while a kept tensor is written
        t0 = time.perf_counter()
        self.kept_nonfinite[name] = count_nonfinite(x, dtype, self.threads)
        self.seconds += time.perf_counter() - t0

    def shard_entry(self, names: list[str]) -> dict[str, Any]:
        """What the manifest keeps per finished shard, so a resumed run still reports every tensor."""
        self._wait()
        return {
            "quality": {n: self.tensors[n].to_json() for n in names if n in self.tensors},
            "nonfinite_kept": {n: self.kept_nonfinite[n] for n in names if n in self.kept_nonfinite},
        }

    def close(self) -> None:
        """Wait for what is in flight and stop the thread (also after an error)."""
        if self._pool is not None:
            for fut in self._running:
                fut.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
        self._running, self._copies = [], []


def from_manifest(shards: dict[str, dict]) -> tuple[dict[str, TensorQuality], dict[str, int]]:
    tensors: dict[str, TensorQuality] = {}
    kept: dict[str, int] = {}
    for info in shards.values():
        for name, d in (info.get("quality") or {}).items():
            tensors[name] = TensorQuality.from_json(name, d)
        kept.update(info.get("nonfinite_kept") or {})
    return tensors, kept
