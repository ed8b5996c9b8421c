"""CUDA's one-time work of a first forward, done on a side thread while the shards stream.

The first forward after a load pays for things that do not depend on the weights: the CUDA context,
cuBLAS's handle and its first kernels, the lazy loading of every kernel a forward launches (each
module is loaded by the driver on its first launch), ``cudaFuncSetAttribute`` of our GEMV kernels,
and transformers' first call into its mask and rotary code. ``load_quantized(device="cuda")`` starts
this thread once the shard headers are parsed and joins it before it returns, so that work overlaps
the disk reads, the copies and the model build instead of following them.

The thread launches, with throwaway inputs, what the model's first forward launches:

- each distinct quantized layer kind (shape, blocksize, nesting, method) of the checkpoint, built with
  its first record's shapes on the device (zero-filled), at 1..8 tokens (the fused GEMV, one kernel
  per token count) and at 16 (dequantize + ``F.linear``: cuBLAS); the q/k/v and gate/up sibling
  groups (``loader/siblings.py``) at 1..8 tokens (the grouped GEMV);
- one decoder layer of the same architecture (the config with one layer, a short vocabulary and a
  narrow MLP; the attention shapes kept), in the compute dtype, at 4 tokens and at 1: embedding,
  norms, rotary, attention (SDPA), activation, ``lm_head`` (cuBLAS again).

Nothing it computes is kept: its tensors are freed into the caching allocator before the load
returns. Its cuBLAS handle goes back to torch's handle pool when the thread ends, with the workspace
torch keeps per handle (a caching-allocator block; 32 MiB on Hopper by torch's default): the caller's
first matmul takes that handle when its thread has none yet (the usual first load), so nothing is
added; a process whose loading thread already did a matmul keeps one more workspace, as after any
other thread's first matmul. (Freeing it, ``torch._C._cuda_clearCublasWorkspaces``, is not safe while
another thread may be in a matmul.)

It never fails a load: any error only ends the warm-up (the real forward meets it if it is real).

**Opt-in (``QM_LOAD_WARMUP=1``).** Measured on an H200 (8B NF4 folder, docs/benchmarks.md, 2026-12-04):
it cut the first forward from ~0.34 s to 0.13 s, but building the one-layer model on the side thread
(0.59 s) holds the GIL against the load's own Python, which grew from 0.55 s to 0.82 s: call -> first
token 0.95 s with it against 0.89 s without (the previous run). So it is off unless asked for.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from converter.loader import timing

ENV = "QM_LOAD_WARMUP"
#: Token counts of the layer calls: the GEMV's 1..8 (one kernel each) and one past it (dequantize + cuBLAS).
TOKENS = (*range(1, 9), 16)
#: Distinct quantized layer kinds warmed at most (a dense decoder has 4-5: q/o, k/v, gate/up, down).
MAX_KINDS = 8
#: MLP width of the one-layer model (its MLP is plain ``nn.Linear``; in the real model those layers are
#: quantized and warmed above, so only the activation kernels matter here, whatever the width).
TINY_INTERMEDIATE = 256
#: Held while a transformers model is built, here and by ``loader.model.build_skeleton``.
BUILD_LOCK = threading.Lock()


def _kind(record: Any) -> tuple:
    """What selects the kernels a record's layer launches (not its values)."""
    nested = getattr(record, "nested", None)
    return (
        type(record).__name__,
        tuple(getattr(record, "shape", ())),
        getattr(record, "blocksize", None),
        nested is not None,
        getattr(record, "quant_storage", None),
        str(getattr(record, "dtype", "")),
    )


class Warmup:
    """The warm-up of one load onto ``device``: :meth:`start` it with the (CPU) state, :meth:`join` it."""

    def __init__(self, device: torch.device, folder: Path, dtype: torch.dtype) -> None:
        self.device = device
        self.folder = folder
        self.dtype = dtype
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self, state: Mapping[str, Any]) -> None:
        """Begin on a side thread (once); ``state``: the records and tensors as parsed, on the CPU."""
        if self._thread is not None:
            return
        records = {}
        for value in state.values():
            # 2-D weights only: stacked MoE experts (3-D) are built by loader/moe.py, not by from_record
            if (
                not isinstance(value, torch.Tensor)
                and len(getattr(value, "shape", ())) == 2
                and len(records) < MAX_KINDS
            ):
                records.setdefault(_kind(value), value)
        self._thread = threading.Thread(
            target=self._run,
            args=(list(records.values()), _sibling_records(state), state),
            name="qm-cuda-warmup",
            daemon=True,
        )
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            with timing.phase("warm_join_wait"):
                self._thread.join()

    # -- the thread ----------------------------------------------------------------------------------
    def _run(self, records: list[Any], groups: list[dict[str, Any]], state: Mapping[str, Any]) -> None:
        try:
            on_device = (
                torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
            )
            with torch.no_grad(), on_device:
                with timing.phase("warm_context"):
                    torch.empty(0, device=self.device)
                compute = self._compute_dtype(state)
                with timing.phase("warm_model"):  # first: the caller is streaming, not building
                    self._tiny_model(compute)
                with timing.phase("warm_layers"):
                    for record in records:
                        self._layer(record, compute)
                    for group in groups:
                        self._group(group, compute)
        except Exception as exc:  # best effort: the real forward reports any real problem
            self.error = f"{type(exc).__name__}: {exc}"
            timing.add("warm_failed", 1)
        finally:
            timing.mark("warm_done_at")

    def _compute_dtype(self, state: Mapping[str, Any]) -> torch.dtype:
        from converter.loader.replace import compute_dtype_from_config

        return compute_dtype_from_config(self.folder, state) or self.dtype

    def _build(self, record: Any, compute: torch.dtype) -> torch.nn.Module:
        """A layer of the record's kind on the device: its tensors' shapes and dtypes, zero-filled (the
        kernels a launch picks depend on those, not on the values; no copy competes with the stream's)."""
        from converter.loader.stream import _replace, _tensors_of
        from converter.methods import for_record

        moved = {id(t): torch.zeros_like(t, device=self.device) for t in _tensors_of(record)}
        on_device = _replace(record, moved)
        return for_record(record).runtime_layer().from_record(on_device, compute_dtype=compute).eval()

    def _layer(self, record: Any, compute: torch.dtype) -> None:
        """The record's layer called at every token count."""
        layer = self._build(record, compute)
        in_features = int(record.shape[-1])
        for tokens in TOKENS:
            layer(torch.zeros(1, tokens, in_features, dtype=compute, device=self.device))

    def _group(self, records: dict[str, Any], compute: torch.dtype) -> bool:
        """Sibling layers (q/k/v, gate/up) grouped as ``load_quantized`` groups them
        (``loader/siblings.py``), each called on one input at 1..8 tokens: the grouped GEMV's kernels.
        Whether they formed a group."""
        from converter.loader.siblings import group_siblings

        parent = torch.nn.Module()
        for name, record in records.items():
            setattr(parent, name, self._build(record, compute))
        if not group_siblings(parent, [tuple(records)]):
            return False
        in_features = int(next(iter(records.values())).shape[-1])
        for tokens in TOKENS[:-1]:  # the grouped launch takes the GEMV's token counts only
            x = torch.zeros(1, tokens, in_features, dtype=compute, device=self.device)
            for name in records:
                getattr(parent, name)(x)
        return True

    def _tiny_model(self, compute: torch.dtype) -> bool:
        """One decoder layer of the folder's architecture, short vocabulary, at 4 tokens and at 1;
        whether it ran (not for MoE and multimodal configs)."""
        if not (self.folder / "config.json").is_file():
            return False
        import transformers

        from converter.loader.model import _model_class

        config = transformers.AutoConfig.from_pretrained(self.folder)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if text is not config or any(
            getattr(text, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")
        ):
            return False  # multimodal wrappers and MoE: their layer kinds above are what is warmed
        text.num_hidden_layers = 1
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[:1]
        vocab = min(int(getattr(text, "vocab_size", 256) or 256), 256)
        text.vocab_size = vocab
        if isinstance(getattr(text, "intermediate_size", None), int):
            text.intermediate_size = min(text.intermediate_size, TINY_INTERMEDIATE)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(text, key, None)
            if isinstance(value, int) and value >= vocab:
                setattr(text, key, 0)
        # Under the lock the caller's build_skeleton takes too: building a model patches process-wide
        # state (transformers' no_init_weights, our meta-parameter hook). cls(config) itself sets no
        # global default dtype (``_from_config(dtype=)`` would); the dtype is applied after.
        with BUILD_LOCK, torch.device(self.device):
            model = _model_class(config)(config)
        model.to(compute).eval()
        for tokens in (4, 1):
            model(torch.zeros(1, tokens, dtype=torch.long, device=self.device))
        return True


def _sibling_records(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """For each sibling name tuple (``loader.siblings.SIBLING_NAMES``), the records of the first module
    that has them all as 2-D quantized weights: ``{name: record}`` in call order."""
    from converter.loader.siblings import SIBLING_NAMES

    groups = []
    for names in SIBLING_NAMES:
        for key, value in state.items():
            prefix, _, leaf = key.removesuffix(".weight").rpartition(".")
            if leaf != names[0] or isinstance(value, torch.Tensor):
                continue
            found = {n: state.get(f"{prefix}.{n}.weight") for n in names}
            if all(
                r is not None and not isinstance(r, torch.Tensor) and len(r.shape) == 2
                for r in found.values()
            ):
                groups.append(found)
                break
    return groups


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(ENV, "0") == "1" and torch.cuda.is_available()


@contextlib.contextmanager
def warmed(device: str | torch.device, folder: Path, dtype: torch.dtype) -> Iterator[Warmup | None]:
    """A :class:`Warmup` for a load onto a CUDA ``device`` (None elsewhere, or when turned off); joined
    on leaving the block, so nothing of it outlives the load."""
    device = torch.device(device)
    if not enabled(device):
        yield None
        return
    warm = Warmup(device, folder, dtype)
    start = time.perf_counter()
    try:
        yield warm
    finally:
        warm.join()
        timing.add("warm_scope", time.perf_counter() - start)
