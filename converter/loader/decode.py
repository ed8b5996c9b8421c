"""Greedy (or sampled) decoding with several decode steps per CUDA-graph replay, a ``generate()`` plug-in.

    out = model.generate(ids, custom_generate=graphed_greedy, max_new_tokens=128)

transformers' ``generate()`` does host work on every decode step (input preparation, the logits
processors, the stopping criteria, the cache bookkeeping): about 4-5 ms per token for an 8B Llama on
an H200, in series with the forward. Once the forward itself is a replayed CUDA graph (1-2 ms for
4-bit weights), that bookkeeping is most of the time per token. ``graphed_greedy`` keeps generate()'s
own preparation (validation, cache creation, logits processors, stopping criteria, prefill) and
replaces only its loop: the decode step (forward, EOS masking for ``min_new_tokens``, argmax, feeding
the token back, position + 1; a padded batch passes its padding mask too) runs on device tensors
only, ``steps_per_graph`` of them are recorded into one CUDA graph, and the host looks at the tokens
once per replay (EOS, streamer). The tokens are those of ``generate(do_sample=False)``: the same
forward on the same static cache, the same argmax.

Sampling (``do_sample=True``) and a repetition penalty run on the same loop: their logits processors
(repetition penalty, temperature, top-k, top-p, min-p: transformers' own objects, called in its order
inside the step; the penalty reads a device buffer of the tokens so far) record into the graphs, and
the token is drawn as ``torch.multinomial(probs, 1)`` draws it (an exponential variate per logit from
the default generator, ``argmax(probs / q)``: the same draws, without the host-side checks that make
``multinomial`` sync), so with the same seed the tokens are those of ``generate(do_sample=True)`` on
the same static cache.

On the CPU the same loop runs without graphs (it still skips the per-step bookkeeping). Anything the
device loop does not reproduce exactly (beams, assisted generation, use_cache=False, other logits
processors or stopping criteria, scores or attentions in the output, model inputs transformers' loop
passes at every step) falls back to transformers' own loop with a warning that names the reason, so
the result is never silently different; the modes transformers runs from Hub repositories (contrastive
search, DoLa, group / constrained beam search) raise.

The static cache: the one passed to ``generate`` (``cache=StaticCache(...)``: the recorded graphs are
kept with it and replayed by later calls that pass it again), or, when generate made a dynamic one,
a static cache this module keeps per model (grown in steps of 256 positions) so repeated calls replay
the same graphs. With ``return_dict_in_generate=True`` the kept cache is handed back in the output
(``out.cache``, to continue from) and no longer kept: the next call makes a new one. A cache's graphs
are recorded again when layers dropped the tensors they launch with (new weights: a layer prepared
again; ``converter.kernels.prepared.epoch``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from converter.kernels import prepared

log = logging.getLogger(__name__)

#: Decode steps recorded into one CUDA graph: the host looks at the tokens once per replay.
DEFAULT_STEPS_PER_GRAPH = 16
#: The module's own static caches grow in steps of this many positions (so nearby lengths share one).
CACHE_LENGTH_STEP = 256
#: Steps run eagerly before the first capture (lazy initialisation of cuBLAS, cuDNN plans, our kernels).
WARMUP_STEPS = 2

_warned: set[str] = set()
#: generate()'s model inputs the decode loop reproduces (the prefill takes them all, the steps these).
_STEP_KWARGS = frozenset(
    {"attention_mask", "position_ids", "cache", "use_cache", "logits_to_keep", "inputs_embeds"}
)
_own_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> StaticCache
_own_made_for: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its (dtype, device) then
_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> {state key: _GraphState}
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> compiled __call__
_in_use: set[int] = set()  # id() of the kept caches a running call decodes on (threads share a model)
_in_use_lock = threading.Lock()


@dataclass
class _EosMask:
    """``min_length`` / ``min_new_tokens`` as device ops: EOS logits are -inf while the text is short."""

    eos_ids: torch.Tensor  # the EOS token ids, on the model's device
    min_total_length: int  # EOS allowed once the sequence (prompt + new) has this many tokens


@dataclass(frozen=True)
class _Processors:
    """The logits processors the step applies after the EOS mask (transformers' own objects, in its
    order: a repetition penalty, then the sampling warpers), and whether it then samples."""

    processors: tuple[Any, ...]
    sample: bool

    @property
    def key(self) -> tuple:
        """What a recorded graph baked in: each processor's class and settings."""
        return (self.sample, *((type(p).__name__, _settings(p)) for p in self.processors))

    @property
    def reads_history(self) -> bool:
        return any(type(p) is _history_types()[0] for p in self.processors)


@dataclass
class _GraphState:
    """Static buffers of the decode step and the graphs recorded over them (per cache and batch)."""

    token: torch.Tensor  # (B, 1) the token fed to the next step
    position: torch.Tensor  # (B, 1) its position id (a padded row's skip its pads)
    length: torch.Tensor  # (B, 1) its index in the sequence (pads included): the same in every row
    min_total: torch.Tensor  # () the EOS mask's length, a device scalar so graphs outlive one call
    chunk: torch.Tensor  # (B, steps_per_graph) the tokens a replay produced
    graphs: dict[int, Any] = field(default_factory=dict)  # steps -> torch.cuda.CUDAGraph
    pool: Any = None  # one memory pool for all graphs of this state
    eos_ids: torch.Tensor | None = None
    warm: bool = False
    epoch: int = 0  # converter.kernels.prepared.epoch() when made: its graphs hold the kernel tensors of then
    processors: _Processors | None = None  # None: greedy, no processor but the EOS mask
    history: torch.Tensor | None = None  # (B, L) the tokens so far, L >= max_length, vocab size after them
    mask: torch.Tensor | None = None  # (B, L) padded prompts: the prompt's attention mask, then ones
    invalid: torch.Tensor | None = None  # () sampling: whether a step's probabilities held a NaN


def graphed_greedy(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    streamer: Any = None,
    steps_per_graph: int = DEFAULT_STEPS_PER_GRAPH,
    compile_step: bool = False,
    **model_kwargs: Any,
) -> Any:
    """A ``custom_generate`` decoding loop for ``model.generate``: greedy or sampling (temperature,
    top-k, top-p, min-p, repetition penalty), several steps per graph.

    ``steps_per_graph``: decode steps per CUDA-graph replay (the host checks EOS once per replay).
    ``compile_step``: run the decode step's forward through ``torch.compile`` (inductor, no CUDA graphs
    of its own) before recording it, which fuses the small element-wise kernels between the weights.
    """
    from transformers.generation.utils import GenerationMixin

    caller = _generate_locals(model, sys._getframe(1))
    if streamer is None:
        streamer = caller.get("streamer")
    if not isinstance(steps_per_graph, int) or steps_per_graph < 1:
        msg = f"steps_per_graph must be a positive int, got {steps_per_graph!r}"
        raise ValueError(msg)
    # generate() hands a custom_generate callable neither the assistant model nor a mode of its own: the
    # generation config's mode (and the assistant of the generate() call) says what was asked for
    from transformers.generation.configuration_utils import GenerationMode

    mode = generation_config.get_generation_mode(caller.get("assistant_model"))
    hub = _hub_mode(mode)
    if hub is not None:
        name, repo = hub
        msg = (
            f"graphed_greedy does not run {name}, which transformers runs from the Hub repository {repo}: "
            f"call generate(..., custom_generate={repo!r}, trust_remote_code=True) instead (graphed_greedy "
            "would silently decode greedily or with plain beam search)"
        )
        raise ValueError(msg)
    assisted = mode == GenerationMode.ASSISTED_GENERATION
    if assisted:
        reason = (
            "assisted generation (assistant_model, prompt_lookup_num_tokens, assistant_early_exit or "
            "use_mtp) runs transformers' candidate-and-verify loop"
        )
    else:
        reason = _unsupported(
            model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs
        )
    if reason is None and synced_gpus:
        reason = "synced_gpus (several processes) is not supported"
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            log.warning("graphed_greedy: %s; using transformers' decoding loop", reason)
        # generate() already expanded the prompt to num_beams rows for beam search: run it, as its own
        # dispatch would (beam search takes no streamer; generate() refuses one with beams)
        beams = (generation_config.num_beams or 1) > 1
        loop = GenerationMixin._beam_search if beams else GenerationMixin._sample
        extra = {} if beams else {"streamer": streamer}
        if assisted:  # generate()'s dispatch for it: the assistant and the encoder inputs from its call
            loop = GenerationMixin._assisted_decoding
            extra = {
                "streamer": streamer,
                "assistant_model": caller.get("assistant_model"),
                "inputs_tensor": caller.get("inputs_tensor"),
            }
        return loop(
            model,
            input_ids,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            generation_config=generation_config,
            synced_gpus=synced_gpus,
            **extra,
            **model_kwargs,
        )
    try:
        with torch.no_grad():
            return _greedy(
                model,
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                streamer,
                steps_per_graph,
                compile_step,
                model_kwargs,
            )
    finally:
        with _in_use_lock:
            _in_use.discard(id(model_kwargs.get("cache")))


def _generate_locals(model: Any, caller: Any) -> dict:
    """The local variables of the ``model.generate()`` call running this loop (``caller`` is the calling
    frame), or an empty dict. transformers (5.x) hands a ``custom_generate`` callable only the arguments
    that ``_sample`` does not take: the ``streamer=`` (which generate() already gave the prompt: it got no
    tokens and no ``end()``, and a ``TextIteratorStreamer``'s reader waited forever) and the
    ``assistant_model=`` never reached the loop."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    generate = inspect.unwrap(GenerationMixin.generate)  # under its decorators (no_grad, deprecate_kwarg)
    if caller.f_code is not generate.__code__ or caller.f_locals.get("self") is not model:
        return {}
    return dict(caller.f_locals)


def _hub_mode(mode) -> tuple[str, str] | None:
    """The generation ``mode`` (``GenerationConfig.get_generation_mode``) when transformers runs it from a
    Hub repository (contrastive search, DoLa, group and constrained beam search): its name and repository,
    else None. With a ``custom_generate`` callable generate() skips that dispatch and hands the call to
    the loop."""
    from transformers.generation.utils import GENERATION_MODES_MAPPING

    repo = GENERATION_MODES_MAPPING.get(mode)
    if not isinstance(repo, str) or "/" not in repo:
        return None
    return mode.value.replace("_", " "), repo


# -- what the device loop reproduces exactly -----------------------------------------------------------


def _unsupported(
    model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs
) -> str | None:
    from transformers.generation.logits_process import (
        MinLengthLogitsProcessor,
        MinNewTokensLengthLogitsProcessor,
    )
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
    from transformers.generation.utils import GenerationMixin

    cfg = generation_config
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    if (cfg.num_beams or 1) != 1:
        return "beam search (num_beams > 1) does not run on the device loop"
    if _bidirectional(model):
        # BERT-family LM heads (BertLMHeadModel, RoBERTa, Electra, BigBird...) without is_decoder=True attend
        # both ways: a step would see the static cache's unwritten positions, which transformers' mask
        # (as long as the text so far) hides
        return (
            f"{type(model).__name__} with is_decoder=False attends bidirectionally (set is_decoder=True in "
            "its config to use it as a causal LM)"
        )
    if cfg.use_cache is False or model_kwargs.get("use_cache") is False:
        # generate() then makes no cache and runs the whole text through the model at every step: other
        # float rounding than a cached step's, so (bf16) other tokens than a loop on a cache
        return (
            "use_cache=False (in the call, the generation config or the model config): transformers' loop "
            "runs the whole text at every step without a cache (pass use_cache=True to decode on the device)"
        )
    if cfg.return_dict_in_generate and (
        cfg.output_scores or cfg.output_logits or cfg.output_attentions or cfg.output_hidden_states
    ):
        return "scores, logits, attentions or hidden states in the output need the per-step loop"
    if not _takes_cache(model) and "past_key_values" not in _forward_parameters(model):
        # e.g. OpenAI GPT: transformers' loop runs the whole text at every step; a step of the device loop
        # would see its one token only
        return "a model whose forward takes no cache is not supported"
    if getattr(model.config, "model_type", None) == "falcon" and getattr(model.config, "alibi", False):
        # its alibi bias is as long as the attention mask, not the cache: transformers' loop fails on a
        # static cache too ("The size of tensor a (256) must match the size of tensor b (12)")
        return "Falcon with alibi does not run on a static cache"
    if model_kwargs.get("inputs_embeds") is not None:
        return "inputs_embeds prompts are not supported"
    if input_ids.device.type not in ("cuda", "cpu") or input_ids.shape[1] == 0:
        return f"input_ids on {input_ids.device.type} (empty or not CPU/CUDA) are not supported"
    allowed = _history_types() + (_warper_types() if cfg.do_sample else ())
    filtered = False  # a warper that looks at the whole distribution (top-k, top-p, min-p) came
    barred = set()  # the EOS id sets of the min-length processors: the step bars one set to one length
    for p in logits_processor:
        if isinstance(p, (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)):
            if filtered:  # the step masks EOS first: exact only before the filters (transformers' order)
                return f"{type(p).__name__} after a top-k / top-p / min-p warper is not supported"
            barred.add(frozenset(torch.as_tensor(p.eos_token_id).flatten().tolist()))
            if len(barred) > 1:
                return "min-length processors barring different EOS ids are not supported"
            continue
        if type(p) not in allowed:  # exact classes: a subclass may read more, or sync
            return f"the logits processor {type(p).__name__} is not supported"
        if type(p) not in _history_types():
            filtered = filtered or type(p) is not _warper_types()[0]  # all but the temperature filter
        elif p.logits_indices is not None or p.cu_seq_lens_q is not None:
            return "a repetition penalty set up for continuous batching is not supported"
    for c in stopping_criteria:
        if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria)):
            return f"the stopping criterion {type(c).__name__} is not supported"
    mask = model_kwargs.get("attention_mask")
    if mask is not None and mask.shape != input_ids.shape:
        return f"an attention_mask of shape {tuple(mask.shape)} for prompts of {tuple(input_ids.shape)}"
    # the decode steps feed only the token, its position and the cache: any other model input that
    # transformers' loop passes at every step (e.g. GPT-2's token_type_ids, extended) would be dropped.
    # What it passes is what the model's prepare_inputs_for_generation makes of the inputs at a decode
    # step: the prefill's multimodal inputs (pixel values, their encoder outputs) and Gemma 3's
    # token_type_ids are dropped there, and CPMAnt's takes the whole text again
    step = _decode_step_inputs(model, input_ids, model_kwargs)
    ids = step.get("input_ids") if step is not None else None
    if isinstance(ids, torch.Tensor) and ids.shape[-1] != 1:
        return (
            f"{type(model).__name__}'s prepare_inputs_for_generation feeds the whole text at every step "
            "(its forward slices off the cached part itself), not the one new token the device loop feeds"
        )
    given = model_kwargs if step is None else step
    extra = sorted(k for k, v in given.items() if v is not None and k not in _STEP_KWARGS | {"input_ids"})
    if extra:
        return f"model inputs the decode steps do not pass on ({', '.join(extra)}) are not supported"
    positions = model_kwargs.get("position_ids")
    if positions is not None and (positions.dim() != 2 or positions.shape[0] != input_ids.shape[0]):
        return f"position_ids of shape {tuple(positions.shape)} (one row per prompt only) are not supported"
    if positions is None and mask is not None and not bool(mask.all()):
        return "padded prompts on a model that takes no position_ids are not supported"
    switch = getattr(model.config, "original_max_position_embeddings", None)
    if (
        isinstance(switch, int)
        and type(model).prepare_inputs_for_generation is not GenerationMixin.prepare_inputs_for_generation
        and _max_length(stopping_criteria, cfg) >= switch + 2
    ):
        # Phi-3 (PhiMoE, Phi-4-multimodal): once the text passes original_max_position_embeddings its
        # prepare_inputs_for_generation drops the cache and runs the whole text again (longrope switches
        # to its long factors), a step the device loop does not take
        return (
            f"a text longer than original_max_position_embeddings ({switch}) on a model that then "
            "recomputes its cache (Phi-3 longrope) is not supported"
        )
    try:
        layers = _static_layers(model)
    except Exception as e:  # e.g. DeepSeek-V4's compressed-attention layers: no static layer type of theirs
        return f"transformers makes no StaticCache for {type(model).__name__} ({type(e).__name__}: {e})"
    if _has_linear_attention(layers):
        return "linear-attention cache layers (state-space or recurrent: Mamba, Jamba) are not supported"
    cache = model_kwargs.get("cache")
    if getattr(cache, "offloading", False):
        # cache_implementation="offloaded" / "offloaded_static": keys and values kept off the device. The
        # loop would decode on a static cache of its own on the device instead (the memory the user
        # asked to save), or record graphs over the cache's own stream copies.
        return "offloaded caches (keys and values moved off the device between layers) are not supported"
    if cache is not None and not _is_empty_reusable_cache(cache):
        return f"the cache ({type(cache).__name__}) is neither a fresh DynamicCache nor an empty StaticCache"
    return None


def _decode_step_inputs(model, input_ids, model_kwargs) -> dict | None:
    """The model inputs transformers' loop passes at a decode step (``_sample``: the model's
    ``prepare_inputs_for_generation`` with ``next_sequence_length=1`` after the prefill), asked before
    the prefill, on no cache; None where the model's own version cannot tell without one (it raised)."""
    kwargs = {k: v for k, v in model_kwargs.items() if k not in ("cache", "use_cache")}
    try:
        inputs = model.prepare_inputs_for_generation(
            input_ids, next_sequence_length=1, cache=None, use_cache=True, is_first_iteration=False, **kwargs
        )
    except Exception:  # an override that needs the prefill's state: judge the inputs given
        return None
    return dict(inputs) if isinstance(inputs, dict) else None


def _settings(processor) -> tuple:
    """A processor's attributes as a graph key: tensors by every value (their repr elides the middle of
    one with over 1000 entries, e.g. a penalty's per-row prompt_ignore_length in a big batch, so two
    calls' settings could share a key and the second decode with the first's)."""

    def value(v):
        if isinstance(v, torch.Tensor):
            return str(v.dtype), tuple(v.shape), tuple(v.flatten().tolist())
        return repr(v)

    return tuple((name, value(v)) for name, v in sorted(vars(processor).items()))


def _warper_types() -> tuple[type, ...]:
    """The sampling warpers the step applies as they are: they read the logits only and run no host
    sync, so they record into a CUDA graph."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    return (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)


def _history_types() -> tuple[type, ...]:
    """Processors that read the tokens so far: the step hands them its history buffer, whose unused
    positions hold the vocabulary size, an id the penalty clamps onto the column it drops."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    return (RepetitionPenaltyLogitsProcessor,)


def _processors(logits_processor, generation_config) -> _Processors | None:
    kept = _history_types() + _warper_types()
    found = tuple(p for p in logits_processor if type(p) in kept)
    if not found and not generation_config.do_sample:
        return None
    return _Processors(found, bool(generation_config.do_sample))


def _draw(probs: torch.Tensor) -> torch.Tensor:
    """``torch.multinomial(probs, 1)``'s draw (its one-sample path: an exponential variate per entry
    from the default generator, then ``argmax(probs / q)``) without its host-side checks of ``probs``,
    which sync and so cannot be recorded into a CUDA graph. The same generator calls in the same order:
    the same tokens for the same seed."""
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True)


def _static_layers(model) -> list:
    """The layers of a StaticCache for this model (lazily initialised: no tensors); raises where transformers
    has no static layer for one of the model's layer types."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=1).layers


def _has_linear_attention(layers) -> bool:
    """Whether a StaticCache's ``layers`` keep a state instead of keys and values (transformers'
    ``LinearAttentionCacheLayerMixin``): the loop reads and resets keys and values only."""
    try:
        from transformers.cache_utils import LinearAttentionCacheLayerMixin
    except ImportError:  # a transformers without such layers
        return False
    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers)


def _is_empty_reusable_cache(cache) -> bool:
    from transformers import DynamicCache, StaticCache

    if isinstance(cache, StaticCache):
        return int(cache.get_seq_length()) == 0
    return type(cache) is DynamicCache and cache.get_seq_length() == 0


# -- the loop -------------------------------------------------------------------------------------------


def _greedy(
    model,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    streamer,
    k,
    compile_step,
    model_kwargs,
):
    batch, prompt = input_ids.shape
    max_length = _max_length(stopping_criteria, generation_config)
    device = model.device
    cache = _static_cache(model, model_kwargs, batch, max_length)
    eos = _eos_ids(stopping_criteria)

    # the steps continue each row at its last position + 1 (a padded row's positions skip its pads), as
    # transformers' loop does, and pass the prompt's padding mask (ones after it: the causal mask hides
    # what is not written yet)
    positions = model_kwargs.get("position_ids")
    pad_mask = model_kwargs.get("attention_mask")
    pad_mask = pad_mask if pad_mask is not None and not bool(pad_mask.all()) else None
    # Prefill: generate()'s own (attention mask, position ids, logits_to_keep), then the first token
    # through the same logits processors _sample applies.
    outputs = model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
    scores = logits_processor(input_ids, logits)
    processors = _processors(logits_processor, generation_config)
    if processors is not None and processors.sample:  # as _sample draws the first token
        first = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
    else:
        first = torch.argmax(scores, dim=-1).view(batch, 1)
    vocab = logits.shape[-1]
    eos_mask = _eos_mask(logits_processor, device, vocab=vocab)
    del outputs, logits, scores
    tokens = [first.to("cpu", copy=True)]
    _stream(streamer, tokens[0])
    streamed = 1  # new tokens the streamer has
    finished = _finished(tokens[0], eos)
    remaining = max_length - prompt - 1
    history = processors is not None and processors.reads_history
    lengths = _history_length(max_length) if history or pad_mask is not None else 0
    state = _state(
        cache, batch, k, eos_mask, processors, (history, pad_mask is not None, lengths), compile_step, device
    )
    if state.history is not None:  # the prompt, the first token, then the id the penalty drops
        state.history.fill_(vocab)
        state.history[:, :prompt].copy_(input_ids)
        state.history[:, prompt : prompt + 1].copy_(first)
    if state.mask is not None:
        state.mask.fill_(1)
        state.mask[:, :prompt].copy_(pad_mask)
    state.token.copy_(first)
    state.length.fill_(prompt)
    if positions is not None:
        state.position.copy_(positions[:, -1:] + 1)
    else:
        state.position.fill_(prompt)
    state.min_total.fill_(eos_mask.min_total_length if eos_mask else 0)
    if state.invalid is not None:
        state.invalid.fill_(False)
    step = _step_fn(model, cache, state, compile_step)
    with _decode_mode(model):
        while remaining > 0 and not bool(finished.all()):
            n = _run(state, step, remaining, k, device)
            got = state.chunk[:, :n].to("cpu", copy=True)  # a copy also on the CPU: the buffer is reused
            if state.invalid is not None and bool(state.invalid):  # as _sample's multinomial raises
                msg = "probability tensor contains either `inf`, `nan` or element < 0"
                raise RuntimeError(msg)
            tokens.append(got)
            remaining -= n
            finished |= _finished(got, eos)
            if streamer is not None:  # as the output will read: pads after a row's EOS, none after the last
                shown = _pad_after_eos(torch.cat(tokens, dim=1), eos, generation_config._pad_token_tensor)
                _stream(streamer, shown[:, streamed:])
                streamed = shown.shape[1]
    if streamer is not None:
        streamer.end()
    new = _pad_after_eos(torch.cat(tokens, dim=1), eos, generation_config._pad_token_tensor)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    if generation_config.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        _give_away(model, cache)  # the caller may continue from it: a later call must not reset it
        return GenerateDecoderOnlyOutput(sequences=sequences, cache=cache)
    return sequences


def _run(state: _GraphState, step, remaining: int, k: int, device: torch.device) -> int:
    """Runs the next ``n <= remaining`` decode steps; their tokens land in ``state.chunk[:, :n]``."""
    if device.type != "cuda":
        n = min(k, remaining)
        for i in range(n):
            step(i)
        return n
    if not state.warm:  # eager steps first: lazy initialisations must not happen inside a capture
        n = min(WARMUP_STEPS, remaining, k)  # the tokens land in chunk[:, :n]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for i in range(n):
                step(i)
        torch.cuda.current_stream(device).wait_stream(side)
        state.warm = True
        return n
    n = k if remaining >= k else 1 << (remaining.bit_length() - 1)  # k, then powers of two
    graph = state.graphs.get(n)
    if graph is None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=state.pool):
            for i in range(n):
                step(i)
        state.pool = state.pool or graph.pool()
        state.graphs[n] = graph
    graph.replay()
    return n


def _step_fn(model, cache, state: _GraphState, compile_step: bool):
    """One decode step on device tensors only: forward, EOS mask, the logits processors, argmax (or a
    draw), feed back, position + 1."""
    kw = {"cache": cache} if _takes_cache(model) else {"past_key_values": cache}
    if state.mask is not None:
        kw["attention_mask"] = state.mask
    forward = _compiled_call(model) if compile_step else model

    def step(i: int) -> None:
        out = forward(
            input_ids=state.token, position_ids=state.position, use_cache=True, return_dict=True, **kw
        )
        logits = out.logits[:, -1].float()
        if state.eos_ids is not None:
            # the token chosen now makes the sequence length + 2 long; EOS stays barred while the
            # sequence before it (length + 1 tokens) is shorter than the minimum, as MinLength's `<`
            blocked = state.length + 1 < state.min_total  # (B, 1)
            ids = state.eos_ids
            logits[:, ids] = torch.where(blocked, float("-inf"), logits[:, ids])
        processors = state.processors
        if processors is not None:
            for p in processors.processors:  # the warpers read the logits only; the penalty the history
                logits = p(state.history if state.history is not None else state.token, logits)
        if processors is not None and processors.sample:
            probs = torch.softmax(logits, dim=-1)
            state.invalid |= probs.isnan().any()  # what multinomial refuses (softmax makes no inf, no < 0)
            nxt = _draw(probs)
        else:
            nxt = torch.argmax(logits, dim=-1, keepdim=True)
        if state.history is not None:
            state.history.scatter_(1, state.length + 1, nxt)
        state.chunk[:, i : i + 1].copy_(nxt)
        state.token.copy_(nxt)
        state.position.add_(1)
        state.length.add_(1)

    return step


def _compiled_call(model):
    """The model's forward through inductor without CUDA graphs of its own (ours record the steps)."""
    fn = _compiled.get(model)
    if fn is None:
        from converter.loader.compile_guards import compile_options  # fewer guards per step

        fn = torch.compile(model.__call__, dynamic=False, options=compile_options())
        _compiled[model] = fn
    return fn


# -- helpers ---------------------------------------------------------------------------------------------


def _decode_mode(model):
    ctx = getattr(model, "_optimize_model_for_decode", None)  # e.g. MoE experts: batched_mm for decode
    return ctx() if ctx is not None else contextlib.nullcontext()


def _forward_parameters(model):
    import inspect

    return inspect.signature(type(model).forward).parameters


def _takes_cache(model) -> bool:
    return "cache" in _forward_parameters(model)


def _max_length(stopping_criteria, generation_config) -> int:
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    lengths = [c.max_length for c in stopping_criteria if isinstance(c, MaxLengthCriteria)]
    return min(lengths) if lengths else generation_config.max_length


def _eos_ids(stopping_criteria) -> torch.Tensor | None:
    from transformers.generation.stopping_criteria import EosTokenCriteria

    for c in stopping_criteria:
        if isinstance(c, EosTokenCriteria):
            return torch.as_tensor(c.eos_token_id, device="cpu").flatten()
    return None


def _eos_mask(logits_processor, device, vocab: int) -> _EosMask | None:
    """The EOS ids the min-length processors bar, those of the ``vocab`` logits only: transformers marks
    them by ``isin(arange(vocab), eos)``, so an id the head lacks (GPT2Config's default 50256 in a small
    model) bars nothing."""
    from transformers.generation.logits_process import (
        MinLengthLogitsProcessor,
        MinNewTokensLengthLogitsProcessor,
    )

    lengths, ids = [], []
    for p in logits_processor:
        if isinstance(p, MinLengthLogitsProcessor):
            lengths.append(p.min_length)
        elif isinstance(p, MinNewTokensLengthLogitsProcessor):
            lengths.append(p.prompt_length_to_skip + p.min_new_tokens)
        else:  # a repetition penalty or a sampling warper: applied after the mask
            continue
        ids.append(torch.as_tensor(p.eos_token_id).flatten())
    if not lengths:
        return None
    eos = torch.unique(torch.cat(ids))
    eos = eos[(eos >= 0) & (eos < vocab)]
    return _EosMask(eos.to(device), max(lengths)) if eos.numel() else None


def _finished(tokens: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    if eos is None:
        return torch.zeros(tokens.shape[0], dtype=torch.bool)
    return torch.isin(tokens, eos).any(dim=1)


def _pad_after_eos(new: torch.Tensor, eos: torch.Tensor | None, pad: torch.Tensor | None) -> torch.Tensor:
    """As _sample: a row that produced EOS gets the pad token afterwards; the output ends when all did."""
    if eos is None:
        return new
    hit = torch.isin(new, eos)
    after = (hit.long().cumsum(dim=1) - hit.long()) > 0  # strictly after a row's first EOS
    if bool(after.any()):
        new = new.masked_fill(after, int(pad) if pad is not None else int(eos[0]))
    if bool(hit.any(dim=1).all()):  # the loop stopped in the replay where the last row finished
        first = hit.long().argmax(dim=1)  # each row's first EOS
        new = new[:, : int(first.max()) + 1]
    return new


def _stream(streamer, tokens: torch.Tensor) -> None:
    if streamer is not None:
        streamer.put(tokens.flatten() if tokens.shape[0] == 1 else tokens)


def _static_cache(model, model_kwargs: dict, batch: int, max_length: int):
    """The StaticCache the decode runs on; replaces generate()'s fresh DynamicCache with our own."""
    from transformers import StaticCache

    cache = model_kwargs.get("cache")
    if isinstance(cache, StaticCache):
        if _capacity(cache) < max_length - 1:
            msg = f"the StaticCache holds {_capacity(cache)} positions; generate() needs {max_length - 1}"
            raise ValueError(msg)
        return cache
    length = -(-(max_length - 1) // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP
    limit = _position_limit(model.config)
    if limit is not None and max_length - 1 <= limit < length:  # e.g. GPT-Neo's fixed causal mask
        length = limit
    with _in_use_lock:
        own = _own_caches.get(model)
        if own is not None and id(own) in _in_use:
            # another thread decodes on the kept cache right now: this call gets one of its own
            model_kwargs["cache"] = StaticCache(config=model.config, max_cache_len=length)
            return model_kwargs["cache"]
        made_for = (model.dtype, model.device)  # .half() / .to() since: its keys have the old dtype
        if (
            own is None
            or _capacity(own) < length
            or _cache_batch(own) not in (None, batch)
            or _stuck_in_inference_mode(_cache_tensors(own))
            or _own_made_for.get(model) != made_for
        ):
            own = StaticCache(config=model.config, max_cache_len=length)
            _own_caches[model] = own
            _own_made_for[model] = made_for
        else:
            own.reset()
        _in_use.add(id(own))  # until graphed_greedy returns
    model_kwargs["cache"] = own
    return own


def _bidirectional(model) -> bool:
    """Whether the decoder's layers are BERT-family layers built with ``is_decoder=False`` (their module
    attribute: GPT-NeoX's config also says False, and its layers never read it)."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if get_decoder is not None else model
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        decoder = model
    decoder = decoder if isinstance(decoder, torch.nn.Module) else model
    return any(getattr(m, "is_decoder", None) is False for m in decoder.modules())


def _position_limit(config) -> int | None:
    """The most positions the model's config allows (``max_position_embeddings`` and its older names):
    models with a causal mask buffer of that size (GPT-Neo, MPT) refuse a longer cache, so the kept
    cache's rounding up stops there."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _give_away(model, cache) -> None:
    """The kept cache is handed to the caller (``return_dict_in_generate``): the next call makes a new
    one rather than resetting the keys the caller continues from."""
    with _in_use_lock:
        if _own_caches.get(model) is cache:
            del _own_caches[model]


def _cache_tensors(cache) -> list[torch.Tensor]:
    """The key and value tensors of a static cache's initialised layers."""
    return [t for layer in cache.layers if layer.is_initialized for t in (layer.keys, layer.values)]


def _stuck_in_inference_mode(tensors: list[torch.Tensor]) -> bool:
    """Whether kept tensors were made under ``torch.inference_mode`` and this call runs outside it,
    where torch refuses to update them in place: the call then makes its own."""
    return not torch.is_inference_mode_enabled() and any(t.is_inference() for t in tensors)


def _capacity(cache) -> float:
    """Positions a static cache can serve: the least of its layers' lengths, leaving out the sliding layers
    that hold their whole window (made with max_cache_len above it: they roll over the window and serve
    any length; a cache of such layers only, e.g. Mistral's, serves any length: inf). A sliding layer
    made shorter than its window holds max_cache_len positions, as a full-attention layer does."""
    lengths = []
    for layer in cache.layers:
        length = getattr(layer, "max_cache_len", None)
        whole_window = getattr(layer, "is_sliding", False) and getattr(layer, "_is_croppable", True) is False
        if length is not None and not whole_window:
            lengths.append(length)
    return min(lengths) if lengths else math.inf


def _cache_batch(cache) -> int | None:
    layer = cache.layers[0] if getattr(cache, "layers", None) else None
    return getattr(layer, "batch_size", None) if layer is not None and layer.is_initialized else None


def _history_length(max_length: int) -> int:
    """The history buffer's length: ``max_length`` rounded up as the kept caches are (nearby lengths
    share one buffer, and so their graphs)."""
    return -(-max_length // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP


def _state(
    cache,
    batch: int,
    k: int,
    eos_mask: _EosMask | None,
    processors: _Processors | None,
    buffers: tuple[bool, bool, int],
    compile_step: bool,
    device,
) -> _GraphState:
    """The buffers and graphs for this cache, batch, EOS-mask ids, logits processors, sequence buffers
    (``buffers``: a token history, a padding mask, their length) and step kind (recorded once each, and
    again after layers were prepared again: their graphs launch with the freed kernel tensors)."""
    eos_key = tuple(eos_mask.eos_ids.tolist()) if eos_mask else None
    key = (batch, k, eos_key, processors.key if processors else None, buffers, compile_step)
    history, padded, length = buffers
    epoch = prepared.epoch()  # read after the prefill, which prepares the layers whose codes were replaced
    states = _graphs.setdefault(cache, {})
    if any(s.epoch != epoch for s in states.values()):
        states.clear()  # every graph of this cache may read released tensors
    state = states.get(key)
    tensors = (
        [] if state is None else [state.token, state.position, state.length, state.min_total, state.chunk]
    )
    tensors += [t for t in (state.history, state.mask, state.invalid) if t is not None] if state else []
    if state is None or _stuck_in_inference_mode(tensors):
        state = _GraphState(
            token=torch.zeros(batch, 1, dtype=torch.long, device=device),
            position=torch.zeros(batch, 1, dtype=torch.long, device=device),
            length=torch.zeros(batch, 1, dtype=torch.long, device=device),
            min_total=torch.zeros((), dtype=torch.long, device=device),
            chunk=torch.zeros(batch, k, dtype=torch.long, device=device),
            eos_ids=eos_mask.eos_ids if eos_mask else None,
            epoch=epoch,
            processors=processors,
            history=torch.zeros(batch, length, dtype=torch.long, device=device) if history else None,
            mask=torch.ones(batch, length, dtype=torch.long, device=device) if padded else None,
            invalid=torch.zeros((), dtype=torch.bool, device=device)
            if processors and processors.sample
            else None,
        )
        states[key] = state
    return state
