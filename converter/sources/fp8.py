"""FP8 sources with 128x128 block scales (DeepSeek-V3, Qwen3-FP8 style), dequantized on read.

Such a checkpoint stores each linear weight as ``float8_e4m3fn`` ``W [O, I]`` plus
``W_scale_inv`` (float32 ``[ceil(O/bo), ceil(I/bi)]``, the name ``<module>.weight_scale_inv``) and
says so in ``config.json``: ``quantization_config = {"quant_method": "fp8", "weight_block_size":
[bo, bi], ...}``. The weight is

    W[i, j] = bf16( float32(Wq[i, j]) * scale_inv[i // bo, j // bi] )

exactly as DeepSeek's reference ``weight_dequant`` (inference/kernel.py: ``x.to(float32) * s``,
stored in the default dtype bf16) and transformers' ``Fp8Dequantize._dequantize_one`` (float32
product, one cast to bf16) compute it; the two agree wherever the shape divides into whole blocks,
and partial edge blocks (DeepSeek's ``ceil``) take their block's scale as DeepSeek's kernel does.

:class:`Fp8BlockSource` wraps any Source: its tensor list shows each FP8 weight as BF16 (its size
stays its bytes on disk, codes plus scale) and hides the ``weight_scale_inv`` tensors, its config
drops the FP8 ``quantization_config`` (the output gets the bnb one), and reading a weight
dequantizes it from its file to its float32 product, which the reader casts once to the dtype it
writes (bf16 unless ``--dtype`` or config.json's dtype says float16 / float32). Any other quantized
source (bnb, GPTQ, FP8 without block scales, MXFP4) keeps the "already quantized" refusal.
"""

from __future__ import annotations

from typing import Any

import torch

from converter.errors import AlreadyQuantizedError, CorruptFileError
from converter.sources.base import Source, TensorInfo
from converter.sources.fp8_layout import (
    FP8_WEIGHT_DTYPE_NAMES,
    SCALE_SUFFIX,
    block_fp8_problem,
    block_size,
    is_block_fp8,
)
from converter.sources.view import SourceView

__all__ = [
    "SCALE_SUFFIX",
    "Fp8BlockSource",
    "block_fp8_problem",
    "block_size",
    "is_block_fp8",
    "wrap_if_block_fp8",
]

_FP8_WEIGHT_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}
assert set(_FP8_WEIGHT_DTYPES) == set(FP8_WEIGHT_DTYPE_NAMES)


def dequantize_block_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """bf16 weight from FP8 codes and per-block scales: float32 product, one round-to-nearest-even cast."""
    rows, cols = weight.shape
    bo, bi = block
    scale = scale_inv.to(torch.float32)
    scale = scale.repeat_interleave(bo, dim=0)[:rows].repeat_interleave(bi, dim=1)[:, :cols]
    return (weight.to(torch.float32) * scale).to(out_dtype)


def _check_scale(scale: torch.Tensor, name: str, file: str) -> None:
    """A NaN/Inf block scale makes its whole block NaN/Inf: no option can use that weight (``--skip``
    would keep the NaNs), so it is reported as the damaged file it is, naming the block."""
    bad = ~torch.isfinite(scale.float())
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        msg = (
            f"tensor {name!r} in {file}: {int(bad.sum())} of {scale.numel()} FP8 block scales are NaN or "
            f"Inf (the first at block {first}), which makes those weight blocks NaN; the checkpoint is "
            f"damaged: download it again"
        )
        raise CorruptFileError(msg)


class _Fp8File:
    """An open weight file whose FP8 weights come out dequantized."""

    def __init__(self, owner: Fp8BlockSource, file: str, inner: Any) -> None:
        self.owner, self.file, self.inner = owner, file, inner

    def prefetch(self, name: str) -> None:
        self.inner.prefetch(name)
        if name in self.owner.fp8_weights:
            self.inner.prefetch(name + SCALE_SUFFIX)

    def prefetch_rows(self, name: str, start: int, stop: int) -> None:
        rows = getattr(self.inner, "prefetch_rows", None)
        if name not in self.owner.fp8_weights and rows is not None:
            rows(name, start, stop)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of a tensor this view passes through unchanged."""
        rows = getattr(self.inner, "get_rows", None)
        if name in self.owner.fp8_weights or rows is None:
            return self.get(name)[start:stop]
        return rows(name, start, stop)

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``; an FP8 weight comes out as its float32 dequantized product (the tensor list
        calls it BF16, the dtype it is written in unless a cast says otherwise)."""
        if name not in self.owner.fp8_weights:
            return self.inner.get(name)
        scale_name = name + SCALE_SUFFIX
        scale_file = self.owner.scale_file[scale_name]
        if scale_file == self.file:
            scale = self.inner.get(scale_name)
        else:  # the scale sits in another shard: that one tensor (a Hub source: no download of the shard)
            elsewhere = getattr(self.owner.inner, "tensor_elsewhere", None)
            if elsewhere is not None:
                scale = elsewhere(scale_file, scale_name)
            else:
                scale = self.owner.inner.open_file(scale_file).get(scale_name)
        _check_scale(scale, scale_name, scale_file)
        raw = self.inner.get(name)
        # The float32 product, rounded once by the reader's cast to the dtype it writes: bf16 by default
        # (the same bytes), float16/float32 under --dtype or config.json's dtype, as transformers'
        # Fp8Dequantize casts the product to the parameter's dtype. A bf16 result cast again rounded
        # twice (a --dtype float32 conversion held bf16-precision weights).
        return dequantize_block_fp8(raw, scale, self.owner.block, torch.float32)


class Fp8BlockSource(SourceView):
    """A block-scaled FP8 source seen as a bf16 one (see the module docstring)."""

    def __init__(self, inner: Source) -> None:
        config = inner.config()
        tensors = inner.tensors()
        problem = block_fp8_problem(config, tensors)
        if problem is not None:
            where = inner.describe().get("path") or inner.describe().get("repo_id")
            msg = f"{where}: already quantized ({problem})"
            raise AlreadyQuantizedError(msg)
        super().__init__(inner)
        self.block = block_size(config) or (128, 128)
        self.fp8_weights = {t.name for t in tensors if t.dtype in _FP8_WEIGHT_DTYPES}
        self.scale_file = {t.name: t.file for t in tensors if t.name.endswith(SCALE_SUFFIX)}
        scale_bytes = {t.name: t.nbytes for t in tensors if t.name.endswith(SCALE_SUFFIX)}
        # Sizes stay the bytes on disk (codes plus their scales): "Bytes in" is the source's size.
        self._tensors = [
            TensorInfo(t.name, t.file, "BF16", t.shape, t.nbytes + scale_bytes.get(t.name + SCALE_SUFFIX, 0))
            if t.name in self.fp8_weights
            else t
            for t in tensors
            if not (t.name.endswith(SCALE_SUFFIX) and t.name.removesuffix(SCALE_SUFFIX) in self.fp8_weights)
        ]
        self._config = {k: v for k, v in (config or {}).items() if k != "quantization_config"}

    def describe(self) -> dict:
        return {**self.inner.describe(), "dequantized": f"fp8 {self.block[0]}x{self.block[1]} blocks -> bf16"}

    def config(self) -> dict | None:
        return self._config

    def tensors(self) -> list[TensorInfo]:
        return self._tensors

    def open_file(self, file: str) -> Any:
        return _Fp8File(self, file, self.inner.open_file(file))


def wrap_if_block_fp8(src: Source) -> Source:
    """``src`` itself, or an :class:`Fp8BlockSource` over it when it is block-scaled FP8."""
    if block_size(src.config()) is None:
        return src
    return Fp8BlockSource(src)
