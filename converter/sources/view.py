"""A Source seen through another: the base of the views that change what a source shows.

The block-FP8 view (converter/sources/fp8.py: bf16 weights dequantized on read) and the Llama 4 view
(converter/sources/llama4.py: fused experts shown per expert) change a source's tensor list, config or
reads; everything else (files, downloads, extra files, notes, the Hub source's own extras such as
``set_needed`` and the ``on_download`` hook) is the inner source's, passed through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from converter.sources.base import Source, TensorInfo


class SourceView(Source):
    """``inner`` with nothing changed; subclasses override what their view changes."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner

    def notes(self) -> list[str]:
        return self.inner.notes()

    def describe(self) -> dict:
        return self.inner.describe()

    def config(self) -> dict | None:
        return self.inner.config()

    def tensors(self) -> list[TensorInfo]:
        return self.inner.tensors()

    def weight_files(self) -> list[str]:
        return self.inner.weight_files()

    def acquire(self, file: str) -> Path:
        return self.inner.acquire(file)

    def open_file(self, file: str) -> Any:
        return self.inner.open_file(file)

    def release(self, file: str) -> None:
        self.inner.release(file)

    def extra_files(self) -> list[str]:
        return self.inner.extra_files()

    def copy_extra_file(self, name: str, dest: Path) -> None:
        self.inner.copy_extra_file(name, dest)

    def holds_extra_file(self, name: str, path: Path) -> bool:
        return self.inner.holds_extra_file(name, path)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # Hub extras: set_needed, download_plan, download_progress
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "on_download":  # the progress bar's hook belongs to the Hub source
            setattr(self.inner, name, value)
        else:
            object.__setattr__(self, name, value)
