"""A Source seen through another: the base of the views that change what a source shows.

The block-FP8 view (converter/sources/fp8.py: bf16 weights dequantized on read) and the per-expert
views (:class:`PerExpertView`: converter/sources/llama4.py and converter/sources/gpt_oss.py, fused
experts shown per expert) change a source's tensor list, config or reads; everything else (files,
downloads, extra files, notes, the Hub source's own extras such as ``set_needed`` and the
``on_download`` hook) is the inner source's, passed through here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


def expert_block(file: Any, name: str, e: int) -> Any:
    """Expert ``e``'s block ``name[e]`` of a fused experts tensor from an open weight file: those rows only
    where the file reads rows (a memory map, an HTTP range of their bytes), else cut from the whole."""
    rows = getattr(file, "get_rows", None)
    return (rows(name, e, e + 1) if rows is not None else file.get(name)[e : e + 1])[0]


def prefetch_expert(file: Any, name: str, e: int) -> None:
    """Ask ``file`` for expert ``e``'s block of ``name`` ahead of the read (where it prefetches rows)."""
    rows = getattr(file, "prefetch_rows", None)
    if rows is not None:
        rows(name, e, e + 1)


def per_expert_listing(
    tensors: list[TensorInfo],
    fused_of: Mapping[str, str],
    entry: Callable[[TensorInfo, str], tuple[tuple[int, ...], int]],
) -> list[TensorInfo]:
    """``tensors`` with each fused tensor replaced, where it stood, by the per-expert tensors cut out of
    it (``fused_of``: per-expert name -> fused name, in the order to list them); ``entry(fused, name)``
    gives a per-expert tensor's shape and bytes (its share of the fused tensor's)."""
    by_source: dict[str, list[str]] = {}
    for name, src in fused_of.items():
        by_source.setdefault(src, []).append(name)
    out: list[TensorInfo] = []
    for t in tensors:
        for name in by_source.get(t.name, ()):
            shape, size = entry(t, name)
            out.append(TensorInfo(name, t.file, t.dtype, shape, size))
        if t.name not in by_source:
            out.append(t)
    return out


class PerExpertView(SourceView):
    """A source whose fused experts tensors are shown as per-expert tensors (``virtual``: per-expert name ->
    where it is cut from, first item the fused tensor's name), each read from its expert's block only.
    Subclasses give ``tensors`` (the listing), ``describe``'s entry and the open-file class."""

    #: describe()'s entry: (key, what the view does)
    DESCRIBE: tuple[str, str]
    #: the open weight file that cuts the per-expert tensors out on read: ``file_class(view, inner_file)``
    file_class: Callable[[Any, Any], Any]

    def __init__(self, inner: Source, virtual: Mapping[str, tuple], tensors: list[TensorInfo]) -> None:
        super().__init__(inner)
        self.virtual = dict(virtual)
        self._tensors = tensors

    def describe(self) -> dict:
        key, what = self.DESCRIBE
        return {**self.inner.describe(), key: what}

    def tensors(self) -> list[TensorInfo]:
        return self._tensors

    def open_file(self, file: str) -> Any:
        return self.file_class(self, self.inner.open_file(file))


class PerExpertFile:
    """An open weight file of a :class:`PerExpertView`: other tensors pass through; subclasses cut a
    per-expert tensor out of its expert's block (:meth:`cut`)."""

    def __init__(self, owner: PerExpertView, inner: Any) -> None:
        self.owner, self.inner = owner, inner

    def prefetch(self, name: str) -> None:
        where = self.owner.virtual.get(name)
        if where is None:
            self.inner.prefetch(name)
        else:
            prefetch_expert(self.inner, where[0], where[1])

    def get(self, name: str) -> Any:
        where = self.owner.virtual.get(name)
        return self.inner.get(name) if where is None else self.cut(where)

    def cut(self, where: tuple) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        getattr(self.inner, "close", lambda: None)()
