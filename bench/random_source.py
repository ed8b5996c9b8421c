"""A benchmark-only checkpoint source whose tensors are random bf16, made when the converter asks for them.

A Qwen3-30B-A3B-shaped checkpoint is 61 GB of bf16: writing it to disk to convert it would cost more
disk and time than the benchmark. :class:`RandomSource` implements ``converter.sources.base.Source``
over virtual weight files instead: each tensor is ``randn * 0.02`` in bf16 from a generator seeded by
``crc32(name) ^ seed``, so a tensor is the same in every run and does not depend on the order in which
it is read. With ``device="cuda"`` the numbers are drawn on the GPU and copied to the host (the
converter's quantizers read numpy host arrays), ~10x faster than drawing 30 G values on the host CPU.

Speed benchmarks only: the values are random, not a model's.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converter.sources.base import Source, TensorInfo

#: Virtual weight file size: the converter keeps one source file "open" per shard it writes.
FILE_BYTES = 4 << 30


def tensor_seed(name: str, seed: int) -> int:
    """The generator seed of tensor ``name`` (stable across runs and processes, unlike hash())."""
    return zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)


def random_tensor(name: str, shape: tuple[int, ...], seed: int, device: str) -> torch.Tensor:
    """``randn(shape) * 0.02`` in bf16 on the host, drawn on ``device`` with the tensor's own seed;
    1-D tensors (norm weights) are ones, as a model initialises them."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    if len(shape) == 3:  # fused experts: one block per expert, so a block is drawn alone (random_rows)
        return random_rows(name, shape, 0, shape[0], seed, device)
    g = torch.Generator(device=device).manual_seed(tensor_seed(name, seed))
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(0.02)
    return x.to(torch.bfloat16).cpu()


def random_rows(
    name: str, shape: tuple[int, ...], start: int, stop: int, seed: int, device: str
) -> torch.Tensor:
    """Blocks ``start:stop`` of the 3-D tensor ``name``, each drawn with its own seed: a per-expert view
    reads one expert's block without drawing the other experts' (Llama 4 Scout's fused ``gate_up_proj``
    is 1.3 G values a layer, read once per expert)."""
    blocks = [random_tensor(f"{name}[{e}]", tuple(shape[1:]), seed, device) for e in range(start, stop)]
    return torch.stack(blocks)


class _RandomFile:
    """One virtual weight file: ``get_array`` / ``get`` / ``prefetch`` as ``MappedFile`` offers them."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int, device: str) -> None:
        self._shapes, self._seed, self._device = shapes, seed, device

    def prefetch(self, name: str) -> None:  # nothing to read ahead
        return None

    def get(self, name: str) -> torch.Tensor:
        return random_tensor(name, self._shapes[name], self._seed, self._device)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        shape = self._shapes[name]
        if len(shape) != 3:
            return self.get(name)[start:stop]
        return random_rows(name, shape, start, stop, self._seed, self._device)

    def get_array(self, name: str) -> tuple[np.ndarray, str]:
        return self.get(name).view(torch.uint16).numpy(), "BF16"

    def close(self) -> None:
        return None


class RandomSource(Source):
    """``shapes`` (name -> shape, in processing order) as random bf16 tensors; ``config`` as config.json."""

    def __init__(
        self, config: dict, shapes: dict[str, tuple[int, ...]], *, seed: int = 0, device: str = "cpu"
    ) -> None:
        self._config, self._seed, self._device = config, seed, device
        self._tensors: list[TensorInfo] = []
        self._files: dict[str, dict[str, tuple[int, ...]]] = {}
        size, index = 0, 1
        for name, shape in shapes.items():
            info = TensorInfo(name, f"random-{index:05d}.safetensors", "BF16", tuple(shape))
            self._tensors.append(info)
            self._files.setdefault(info.file, {})[name] = info.shape
            size += info.nbytes
            if size >= FILE_BYTES:
                size, index = 0, index + 1

    def describe(self) -> dict:
        # What makes the tensors: the shapes, the seed (the device only changes the drawing's speed).
        digest = zlib.crc32(repr([(t.name, t.shape) for t in self._tensors]).encode())
        return {"kind": "random", "name": "random", "seed": self._seed, "shapes_crc32": digest}

    def config(self) -> dict | None:
        return self._config

    def tensors(self) -> list[TensorInfo]:
        return list(self._tensors)

    def weight_files(self) -> list[str]:
        return list(self._files)

    def acquire(self, file: str) -> Path:
        msg = f"{file}: a random source has no file on disk; read it with open_file"
        raise NotImplementedError(msg)

    def open_file(self, file: str) -> Any:
        return _RandomFile(self._files[file], self._seed, self._device)

    def release(self, file: str) -> None:
        return None

    def extra_files(self) -> list[str]:
        return []

    def copy_extra_file(self, name: str, dest: Path) -> None:
        msg = f"a random source has no extra file {name!r}"
        raise FileNotFoundError(msg)

    def close(self) -> None:
        return None
