"""CUDA's one-time work of a first forward, done on a side thread while the shards stream.

The first forward after a load pays for things that do not depend on the weights: the CUDA context,
cuBLAS's handle and its first kernels, the lazy loading of every kernel a forward launches (each
module is loaded by the driver on its first launch), ``cudaFuncSetAttribute`` of our GEMV kernels,
and transformers' first call into its mask and rotary code. ``load_quantized(device="cuda")`` starts
this thread as the call begins (the layer kinds below wait until the shard headers are parsed) and
joins it before it returns, so that work overlaps the disk reads, the copies and the model build
instead of following them.

The thread launches, with throwaway inputs, what the model's first forward launches:

- each distinct quantized layer kind (shape, blocksize, nesting, method) of the checkpoint, built with
  its first record's shapes on the device (zero-filled), at 1..8 tokens (the fused GEMV, one kernel
  per token count) and at 16 (dequantize + ``F.linear``: cuBLAS); the q/k/v and gate/up sibling
  groups (``loader/siblings.py``) at 1..8 tokens (the grouped GEMV);
- the rest of a decoder forward as kernel families (:func:`_forward_ops`, the default): embedding,
  rotary tables, RMSNorm, SDPA with the model's head counts, gating, the bf16 head (cuBLAS), argmax,
  on tensors of the model's widths, at 4 tokens and at 1. No model is built: each op releases the
  GIL while it dispatches, so the load's own Python (parsing, the readers' copies, the skeleton)
  barely waits for this thread. cuBLAS's batched matmul, its bf16 GEMM and SDPA (cuDNN) start on
  three more threads meanwhile (:func:`_library_starts`): the driver loads their kernels while this
  one loads the element-wise ones;
- or, with ``QM_LOAD_WARMUP=model``, one decoder layer of the same architecture instead (the config
  with one layer, a short vocabulary and a narrow MLP; the attention shapes kept), in the compute
  dtype, at 4 tokens and at 1: transformers' own modules, but built under the GIL.

Nothing it computes is kept: its tensors are freed into the caching allocator before the load
returns. Its cuBLAS handle goes back to torch's handle pool when the thread ends, with the workspace
torch keeps per handle (a caching-allocator block; 32 MiB on Hopper by torch's default): the caller's
first matmul takes that handle when its thread has none yet (the usual first load), so nothing is
added; a process whose loading thread already did a matmul keeps one more workspace, as after any
other thread's first matmul. (Freeing it, ``torch._C._cuda_clearCublasWorkspaces``, is not safe while
another thread may be in a matmul.)

It never fails a load: an error only ends its step of the warm-up (the real forward meets it if it is real).

``QM_LOAD_WARMUP``: unset or ``1``: the kernel families above (on for every CUDA load); ``model``: the
one-layer model instead; ``0``: off. Measured on an H200 (8B NF4 folder, docs/benchmarks.md,
2026-12-04): the one-layer model cut the first forward from ~0.34 s to 0.13 s, but building it on the
side thread (0.59 s) held the GIL against the load's own Python, which grew from 0.55 s to 0.82 s.
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
import torch.nn.functional as F

from converter.loader import cuda_context, gil, timing
from converter.loader.config_file import read_config

ENV = "QM_LOAD_WARMUP"
#: Rows of the throwaway bf16 head (``_forward_ops``): 128 MiB at a 4096 width, at most.
HEAD_ROWS = 16384
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

    def __init__(self, device: torch.device, folder: Path, dtype: torch.dtype, mode: str = "kernels") -> None:
        self.device = device
        self.folder = folder
        self.dtype = dtype
        self.mode = mode  # "kernels" (_forward_ops) or "model" (_tiny_model)
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._parsed = threading.Event()  # set by start() (or join(): nothing more comes)
        self._work: tuple[list[Any], list[dict[str, Any]], Mapping[str, Any]] | None = None
        self.context: cuda_context.PrimedContext | None = None  # waited for before the first CUDA call

    def begin(self) -> None:
        """Start the thread before the shards are parsed: the context and, in the default mode, the
        forward's kernel families need only ``config.json``; the layer kinds wait for :meth:`start`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qm-cuda-warmup", daemon=True)
            self._thread.start()

    def start(self, state: Mapping[str, Any]) -> None:
        """Hand the thread the parsed state (the records and tensors, on the CPU), starting it if
        :meth:`begin` did not (once)."""
        if self._work is not None:
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
        self._work = (list(records.values()), _sibling_records(state), state)
        self._parsed.set()
        self.begin()

    def join(self) -> None:
        self._parsed.set()  # no state handed over (the load failed before): the thread ends after its ops
        if self._thread is not None:
            with timing.phase("warm_join_wait"):
                self._thread.join()

    # -- the thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        side: list[threading.Thread] = []
        try:
            if self.context is not None:
                with timing.phase("warm_context_wait"):
                    self.context.wait()
            on_device = (
                torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
            )
            with torch.no_grad(), on_device:
                with timing.phase("warm_context"):
                    torch.empty(0, device=self.device)
                config_dtype = _config_compute_dtype(self.folder)
                # Each step on its own: one that fails (a config key missing, say) leaves the others' work.
                if self.mode != "model" and (self.folder / "config.json").is_file():
                    compute = config_dtype or self.dtype
                    config = self._text_config()
                    if config is not None:
                        side = self._start_libraries(config, compute)
                        # first: cuBLAS's start costs the most, and it needs no shard parsed
                        self._step("warm_ops", _forward_ops, config, compute, self.device)
                self._parsed.wait()
                if self._work is None:
                    return
                records, groups, state = self._work
                compute = self._compute_dtype(state)
                if self.mode == "model":  # first: the caller is streaming, not building
                    self._step("warm_model", self._tiny_model, compute)
                for record in records:
                    self._step("warm_layers", self._layer, record, compute)
                for group in groups:
                    self._step("warm_layers", self._group, group, compute)
        except Exception as exc:  # best effort: the real forward reports any real problem
            self._failed(exc)
        finally:
            for thread in side:
                thread.join()
            timing.mark("warm_done_at")

    def _text_config(self) -> dict[str, Any] | None:
        """The folder's text config, read once for the forward's ops and the library threads (None,
        the error kept, when it cannot be read: the load reports it)."""
        try:
            return _text_config(self.folder)
        except Exception as exc:
            self._failed(exc)
            return None

    def _start_libraries(self, config: Mapping[str, Any], compute: torch.dtype) -> list[threading.Thread]:
        """cuBLAS's and SDPA's (cuDNN's) first calls, each on its own thread, while this one runs the
        element-wise first calls: the driver loads their kernels side by side (bench/probe_warmup.py on
        an H100: the families on 4 threads took 0.34-0.39 s, on one 0.50-0.55 s)."""
        try:
            starts = _library_starts(config, compute, self.device)
        except Exception as exc:  # a config key missing: _forward_ops meets it and says so
            self._failed(exc)
            return []
        threads = []
        for name, fn in starts.items():
            thread = threading.Thread(target=self._side, args=(name, fn), name=f"qm-cuda-{name}", daemon=True)
            thread.start()
            threads.append(thread)
        return threads

    def _side(self, name: str, fn: Any) -> None:
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.no_grad(), on_device:
            if self.device.type == "cuda":
                # a kernel launch makes the primary context current on this thread: cuBLAS, on a
                # thread without one, warns "no current CUDA context" to the user
                torch.zeros(1, device=self.device)
            self._step(name, fn)

    def _step(self, name: str, fn: Any, *args: Any) -> None:
        """``fn(*args)``, its time added to ``name``; an error is kept (the first) and ends this step only."""
        try:
            with timing.phase(name):
                fn(*args)
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
        timing.add("warm_failed", 1)

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
        from converter.loader.siblings import group_siblings, ungroup_siblings

        parent = torch.nn.Module()
        for name, record in records.items():
            setattr(parent, name, self._build(record, compute))
        if not group_siblings(parent, [tuple(records)]):
            return False
        in_features = int(next(iter(records.values())).shape[-1])
        try:
            for tokens in TOKENS[:-1]:  # the grouped launch takes the GEMV's token counts only
                x = torch.zeros(1, tokens, in_features, dtype=compute, device=self.device)
                for name in records:
                    getattr(parent, name)(x)
        finally:
            # The group and its members refer to each other: a cycle that only the garbage collector
            # would free, with the members' device tensors. Broken here, they go with the last reference.
            ungroup_siblings(parent)
        return True

    def _tiny_model(self, compute: torch.dtype) -> bool:
        """One decoder layer of the folder's architecture, short vocabulary, at 4 tokens and at 1;
        whether it ran (not for MoE and multimodal configs)."""
        if not (self.folder / "config.json").is_file():
            return False
        import transformers

        from converter.loader.model_build import class_to_build

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
        # global default dtype (``_from_config(dtype=)`` would); the dtype is applied after. Its random
        # init leaves the caller's seeded generators as they were: the load draws a new head's values
        # after this (model_class=), and they must be the ones transformers draws after the same seed.
        cuda = [self.device] if self.device.type == "cuda" else []
        with BUILD_LOCK, torch.device(self.device), torch.random.fork_rng(devices=cuda):
            model = class_to_build(config)(config)
        model.to(compute).eval()
        for tokens in (4, 1):
            model(torch.zeros(1, tokens, dtype=torch.long, device=self.device))
        return True


def _config_compute_dtype(folder: Path) -> torch.dtype | None:
    """The compute dtype ``config.json`` names, before any shard is parsed."""
    from converter.loader.replace import compute_dtype_from_config

    try:
        return compute_dtype_from_config(folder)
    except Exception:  # an unreadable config: the load reports it; the warm-up uses the load's dtype
        return None


def _text_config(folder: Path) -> dict[str, Any]:
    """The text model's part of ``config.json`` (``text_config`` of a multimodal wrapper), raw: parsing
    it with transformers' AutoConfig costs the GIL more than the kernels below."""
    raw = read_config(folder) or {}
    text = raw.get("text_config")
    return text if isinstance(text, dict) else raw


def _widths(config: Mapping[str, Any]) -> tuple[int, int, int, int, int]:
    """Hidden size, attention heads, key/value heads, head size and the throwaway head's rows."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    return hidden, heads, kv_heads, head_dim, min(int(config.get("vocab_size") or HEAD_ROWS), HEAD_ROWS)


def _forward_ops(config: Mapping[str, Any], compute: torch.dtype, device: torch.device) -> int:
    """The kernel families of a decoder forward outside the quantized layers, as transformers' Llama-style
    modeling code calls them, at a prompt of 4 tokens and a decode step of 1, on throwaway tensors of the
    model's widths (uninitialized: the values do not matter): embedding, rotary tables (a float32
    batched matmul) and their use, RMSNorm, SDPA with the model's head counts, SiLU gating, residual
    adds, the bf16 head through cuBLAS (at most ``HEAD_ROWS`` rows: cuBLAS's handle, workspace and
    library load are what cost, whatever the width), logits in float32 and argmax. Each torch op
    releases the GIL while it dispatches (and the driver loads its kernel), so the load's own Python
    barely waits for this. Returns how many ops ran."""
    hidden, heads, kv_heads, head_dim, rows = _widths(config)
    eps = float(config.get("rms_norm_eps") or 1e-6)
    on = {"device": device}
    ops = 0
    embed = torch.empty(rows, hidden, dtype=compute, **on)
    norm_w = torch.ones(hidden, dtype=compute, **on)
    inv_freq = torch.ones(head_dim // 2, dtype=torch.float32, **on)
    for tokens in (4, 1):
        ids = torch.zeros(1, tokens, dtype=torch.long, **on)
        x = F.embedding(ids, embed)
        # rotary tables (LlamaRotaryEmbedding.forward) and the causal mask's comparisons
        pos = torch.arange(tokens, **on)[None]
        with timing.phase("warm_blas" if tokens == 4 else "warm_rest"):  # the first matmul: cuBLAS's start
            freqs = (inv_freq[None, :, None].expand(1, -1, 1) @ pos[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * 1.0).to(compute), (emb.sin() * 1.0).to(compute)
        _ = pos[..., :, None] >= torch.arange(tokens, **on)[None, None, :]
        # RMSNorm (LlamaRMSNorm.forward)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        h = norm_w * h.to(compute)
        # attention: rotary applied (rotate_half), SDPA with grouped heads as transformers calls it,
        # and with the key/value heads repeated (repeat_kv) for the paths that do that
        q = torch.empty(1, heads, tokens, head_dim, dtype=compute, **on)
        k = torch.empty(1, kv_heads, tokens, head_dim, dtype=compute, **on)
        half = head_dim // 2
        q = q * cos[:, None] + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin[:, None]
        k = k * cos[:, None] + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin[:, None]
        gqa = {"enable_gqa": True} if kv_heads != heads else {}
        with timing.phase("warm_sdpa" if tokens == 4 else "warm_rest"):
            a = F.scaled_dot_product_attention(q, k, k, is_causal=tokens > 1, scale=head_dim**-0.5, **gqa)
        if kv_heads != heads:
            rep = k[:, :, None].expand(1, kv_heads, heads // kv_heads, tokens, head_dim)
            rep = rep.reshape(1, heads, tokens, head_dim)
            F.scaled_dot_product_attention(q, rep, rep, is_causal=tokens > 1, scale=head_dim**-0.5)
        a = a.transpose(1, 2).contiguous().reshape(1, tokens, heads * head_dim)
        x = x + h
        # MLP gating (act(gate) * up) and the head
        x = x + _activation(str(config.get("hidden_act") or "silu"))(h) * h
        with timing.phase("warm_head" if tokens == 4 else "warm_rest"):  # bf16 GEMM: cuBLASLt's kernels
            logits = F.linear(x, embed).float()
        logits[:, -1, :].argmax(dim=-1)
        ops += 1
    return ops


def _library_starts(config: Mapping[str, Any], compute: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The library first calls of :func:`_forward_ops` as separate callables, by timing name: cuBLAS's
    float32 batched matmul (rotary tables), its bf16 GEMM (the head: cuBLASLt) and SDPA at the model's
    head counts (cuDNN's attention on Hopper). Run on their own threads beside :func:`_forward_ops`,
    whose own calls of them then find the libraries started."""
    hidden, heads, kv_heads, head_dim, rows = _widths(config)
    on = {"device": device}

    def blas() -> None:
        inv_freq = torch.ones(head_dim // 2, dtype=torch.float32, **on)
        for tokens in (4, 1):
            pos = torch.arange(tokens, **on)[None].float()
            inv_freq[None, :, None].expand(1, -1, 1) @ pos[:, None, :]

    def head() -> None:
        weight = torch.empty(rows, hidden, dtype=compute, **on)
        for tokens in (4, 1):
            F.linear(torch.empty(1, tokens, hidden, dtype=compute, **on), weight)

    def sdpa() -> None:
        gqa = {"enable_gqa": True} if kv_heads != heads else {}
        for tokens in (4, 1):
            q = torch.empty(1, heads, tokens, head_dim, dtype=compute, **on)
            k = torch.empty(1, kv_heads, tokens, head_dim, dtype=compute, **on)
            F.scaled_dot_product_attention(q, k, k, is_causal=tokens > 1, scale=head_dim**-0.5, **gqa)

    return {"warm_side_blas": blas, "warm_side_head": head, "warm_side_sdpa": sdpa}


def _activation(name: str) -> Any:
    """The elementwise activation of a config's ``hidden_act`` (SiLU unless a GELU is named)."""
    if "gelu" in name:
        return lambda t: F.gelu(t, approximate="tanh" if "tanh" in name or "fast" in name else "none")
    return F.silu


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


def mode() -> str:
    """``QM_LOAD_WARMUP``: "kernels" (unset or 1), "model", or "off" (0)."""
    value = os.environ.get(ENV, "1").strip().lower()
    modes = {"0": "off", "": "kernels", "1": "kernels", "kernels": "kernels", "model": "model"}
    return modes.get(value, "off")


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and mode() != "off" and torch.cuda.is_available()


@contextlib.contextmanager
def warmed(device: str | torch.device, folder: Path, dtype: torch.dtype) -> Iterator[Warmup | None]:
    """A :class:`Warmup` for a load onto a CUDA ``device`` (None elsewhere, or when turned off); joined
    on leaving the block, so nothing of it outlives the load. The device's CUDA context is made on a
    side thread from the start of the block (``cuda_context.py``), and the GIL's switch interval is
    shorter inside it (``gil.py``)."""
    device = torch.device(device)
    if not enabled(device):
        yield None
        return
    start = time.perf_counter()
    with gil.short_switch_interval():  # the side threads' Python waits less for the caller's (gil.py)
        context = cuda_context.prime(device)  # the driver's context, made while the shards are opened
        warm = Warmup(device, folder, dtype, mode())
        warm.context = context
        warm.begin()
        try:
            yield warm
        finally:
            warm.join()
            if context is not None:
                context.release()  # torch holds its own reference by now (or the load failed before)
            timing.add("warm_scope", time.perf_counter() - start)
