"""Which transformers model class a config.json and its checkpoint describe: one lookup for the
converter (``converter.plan.selection``, which picks the layers to quantize from that model) and the
loader (``converter.loader.model``, which builds it), so both see the same modules.

1. a name in ``architectures`` that transformers has: that class;
2. a name it lacks (repository code, never run here) ending in a known head (``ForCausalLM``,
   ``ForSequenceClassification``, ...): the class of that head for the config's model_type;
3. otherwise (no ``architectures``, or an unknown name without a known head): among the heads
   transformers has for the model_type (:data:`HEAD_ORDER`), the one whose parameters the checkpoint
   keys fill best: fewest checkpoint keys left unused, then fewest parameters left missing, then
   the first in :data:`HEAD_ORDER`. A key matches a parameter as transformers' loader matches it:
   as it is, or with the base-model prefix (``model.``, ``roberta.``) stripped or added
   (:func:`prefixed_key`).

Without checkpoint keys, step 3 takes the first head of :data:`HEAD_ORDER` the model_type has.
transformers is imported by the callers (this module imports nothing heavy).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Collection, Sequence
from typing import Any

__all__ = ["HEAD_ORDER", "meta_model", "model_class", "parameter_names", "prefixed_key"]

#: Architecture name suffix -> the Auto class that builds that head from a built-in model_type.
AUTO_BY_SUFFIX: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ("ForConditionalGeneration", "AutoModelForSpeechSeq2Seq"),
    ("ForConditionalGeneration", "AutoModelForImageTextToText"),
)

#: The heads tried for a checkpoint whose config names none. MaskedLM before CausalLM: the model_types
#: with both are encoders (BERT: BertForMaskedLM, not the decoder-only BertLMHeadModel) and BART-like
#: encoder-decoders (BartForConditionalGeneration, not the decoder-only BartForCausalLM).
HEAD_ORDER: tuple[str, ...] = (
    "AutoModelForMaskedLM",
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForImageTextToText",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForPreTraining",  # BertForPreTraining: MLM + next-sentence heads
    "AutoModel",
)


def _mapped(transformers: Any, auto: str, config: Any) -> type | None:
    """The class ``transformers.<auto>`` builds for this config, or None."""
    auto_cls = getattr(transformers, auto, None)
    if auto_cls is None:
        return None
    try:
        return auto_cls._model_mapping[type(config)]
    except (KeyError, ValueError, AttributeError):
        return None


def _by_name(transformers: Any, architectures: Sequence[str], config: Any) -> type | None:
    for name in architectures:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    for name in architectures:
        for suffix, auto in AUTO_BY_SUFFIX:
            if name.endswith(suffix) and (cls := _mapped(transformers, auto, config)) is not None:
                return cls
    return None


def prefixed_key(key: str, prefix: str, names: Collection[str]) -> str:
    """``key`` as transformers' loader maps it onto a model whose state-dict names are ``names`` and
    whose ``base_model_prefix`` is ``prefix`` (``rename_source_key``): the prefix stripped when the
    model lacks it (a ``roberta.*`` checkpoint into ``RobertaModel``), added when the model has it
    (a base-model checkpoint into ``RobertaForMaskedLM``); else unchanged."""
    if not prefix or key in names:
        return key
    stripped = key.removeprefix(prefix + ".")
    if stripped != key and stripped in names:
        return stripped
    added = f"{prefix}.{key}"
    return added if added in names else key


def parameter_names(model: Any) -> set[str]:
    """Every state-dict name of ``model``: parameters (tied ones under each name) and buffers."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return names | {n for n, _ in model.named_buffers(remove_duplicate=False)}


def meta_model(cls: type, config: Any) -> Any:
    """``cls`` built for (a copy of) ``config`` on the meta device: names and shapes, nothing allocated."""
    import torch

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return cls(copy.deepcopy(config))  # some models set attributes of their config


def _fit(cls: type, config: Any, keys: Collection[str]) -> tuple[int, int]:
    """(checkpoint keys ``cls`` has no parameter for, ``cls`` parameters the keys leave missing)."""
    model = meta_model(cls, config)
    names = parameter_names(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    matched = {prefixed_key(k, prefix, names) for k in keys}
    unused = len(matched - names)
    params = {n for n, _ in model.named_parameters()}  # tied weights once: they need one key
    return unused, len(params - matched)


def architecture_names(architectures: Any) -> tuple[str, ...]:
    """The class names of config.json's ``architectures`` as transformers' config keeps it, whatever it
    holds: a string is that one name (it was read letter by letter: another class, nothing to quantize),
    entries that are not strings (``[null]``, a number) name nothing. transformers reads such a config
    and loads the model by its model_type; they raised a TypeError here ("attribute name must be
    string", "object of type 'int' has no len()")."""
    if isinstance(architectures, str):  # "architectures": "BertModel" in a hand-written config.json
        return (architectures,)
    if isinstance(architectures, list | tuple):
        return tuple(a for a in architectures if isinstance(a, str))
    return ()


def model_class(
    config: Any, architectures: Sequence[str] = (), keys: Collection[str] | None = None
) -> type | None:
    """The transformers class for ``config`` (a transformers config object), or None when transformers
    has none for its model_type. See the module docstring for the rule."""
    import transformers

    cls = _by_name(transformers, architecture_names(architectures), config)
    if cls is not None:
        return cls
    candidates = list(dict.fromkeys(c for a in HEAD_ORDER if (c := _mapped(transformers, a, config))))
    if not candidates or keys is None or len(candidates) == 1:
        return candidates[0] if candidates else None
    best: tuple[tuple[int, int], type] | None = None
    for cand in candidates:
        try:
            with _quiet():
                score = _fit(cand, config, keys)
        except Exception:  # a head this config cannot build (e.g. no num_labels): not a candidate
            continue
        if best is None or score < best[0]:
            best = (score, cand)
        if score == (0, 0):
            break
    return best[1] if best is not None else candidates[0]


@contextlib.contextmanager
def _quiet() -> Any:
    """Building candidate heads logs transformers' advice (e.g. "add is_decoder=True"): not ours."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
