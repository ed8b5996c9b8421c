"""``graphed_greedy``: generate()'s tokens from the device decode loop, and a said fallback otherwise.

On the CPU the loop runs without CUDA graphs (the graphs themselves are tested in
test_loader_decode_cuda.py on the GPU); everything else (prefill through generate()'s own preparation,
the static cache it swaps in, EOS masking for min_new_tokens on device tensors, EOS padding of finished
rows, the early stop, the fallback) is the same code and is checked here against
transformers' own greedy loop on the same model: the same forward on the same static cache, so the
same tokens, exactly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import pytest
import torch
from loader_helpers import WEIGHT_CHANGES, change_weights, greedy_reference, sample_reference
from transformers import StaticCache

from converter.loader import decode
from converter.loader.decode import graphed_greedy
from converter.loader.model import load_quantized

IDS = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64]])


@pytest.fixture(scope="module")
def model(our_folder: Path):
    return load_quantized(our_folder).eval()


@pytest.mark.parametrize("steps_per_graph", [1, 3, 16])
def test_tokens_equal_transformers_greedy(model, steps_per_graph: int) -> None:
    kw = {"max_new_tokens": 21, "min_new_tokens": 21, "pad_token_id": 0}
    want = greedy_reference(model, IDS, **kw)
    got = model.generate(IDS, custom_generate=graphed_greedy, steps_per_graph=steps_per_graph, **kw)
    assert got.shape == (1, IDS.shape[1] + 21)
    assert torch.equal(got, want)


def test_a_second_call_reuses_its_static_cache_and_matches(model) -> None:
    kw = {"max_new_tokens": 9, "min_new_tokens": 9, "pad_token_id": 0}
    first = model.generate(IDS, custom_generate=graphed_greedy, **kw)
    cache = decode._own_caches[model]
    second = model.generate(IDS, custom_generate=graphed_greedy, **kw)
    assert decode._own_caches[model] is cache  # the same buffers: on CUDA the recorded graphs replay
    assert torch.equal(first, second)
    assert torch.equal(second, greedy_reference(model, IDS, **kw))


def _decode_after_weight_change(
    our_folder: Path, other_folder: Path, change: str, compile_step: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """graphed_greedy on a cache of its own, twice, then ``change`` and again on that cache: returns the
    tokens before, after and those of a fresh model changed the same way (the same path: its first call).
    Checks that the second call kept the cache's recorded state and the third made it again."""
    kw = {"max_new_tokens": 9, "min_new_tokens": 9, "pad_token_id": 0, "steps_per_graph": 4}
    kw["compile_step"] = compile_step
    model = load_quantized(our_folder).eval()
    cache = StaticCache(config=model.config, max_cache_len=IDS.shape[1] + 9)
    before = model.generate(IDS, custom_generate=graphed_greedy, cache=cache, **kw)
    (state,) = decode._graphs[cache].values()
    cache.reset()
    assert torch.equal(model.generate(IDS, custom_generate=graphed_greedy, cache=cache, **kw), before)
    assert [s is state for s in decode._graphs[cache].values()] == [True]  # nothing changed: kept
    change_weights(model, change, other_folder)
    cache.reset()
    after = model.generate(IDS, custom_generate=graphed_greedy, cache=cache, **kw)
    # recorded again: on CUDA the old graphs launch with the kernel tensors the change released
    assert all(s is not state for s in decode._graphs[cache].values())
    fresh = load_quantized(our_folder).eval()
    change_weights(fresh, change, other_folder)
    return before, after, fresh.generate(IDS, custom_generate=graphed_greedy, **kw)


@pytest.mark.parametrize("change", WEIGHT_CHANGES)
def test_weights_changed_after_recording_give_the_new_tokens(
    our_folder: Path, other_folder: Path, change: str
) -> None:
    """``load_state_dict``, ``weight.data = codes`` or a LoRA merge after a call recorded the decode steps
    on a cache: the next call on it gives a fresh model's tokens for the new weights."""
    before, after, want = _decode_after_weight_change(our_folder, other_folder, change, compile_step=False)
    assert not torch.equal(want, before)  # the change changes the tokens
    assert torch.equal(after, want)


@pytest.mark.parametrize("change", ["load_state_dict", "weight_data"])
def test_weights_changed_after_recording_a_compiled_step_give_the_new_tokens(
    dynamo, our_folder: Path, other_folder: Path, change: str
) -> None:
    """The same with ``compile_step=True``: the compiled step sees the layers' new keys (a recompile)."""
    before, after, want = _decode_after_weight_change(our_folder, other_folder, change, compile_step=True)
    assert dynamo["stats"]["unique_graphs"] >= 1, "dynamo compiled nothing: is it disabled?"
    assert not torch.equal(want, before)
    assert torch.equal(after, want)


@pytest.mark.parametrize("first_in_inference_mode", [True, False])
def test_kept_cache_serves_calls_in_and_out_of_inference_mode(
    our_folder: Path, first_in_inference_mode
) -> None:
    """The static cache (and step buffers) kept per model serve a later call whatever its autograd mode:
    made under torch.inference_mode they are inference tensors, which a call outside it cannot update
    in place ("Inplace update to inference tensor outside InferenceMode")."""
    model = load_quantized(our_folder).eval()  # its own kept cache
    kw = {"max_new_tokens": 7, "min_new_tokens": 7, "pad_token_id": 0}
    want = greedy_reference(model, IDS, **kw)
    modes = [torch.inference_mode, torch.no_grad]
    for mode in modes if first_in_inference_mode else modes[::-1]:
        with mode():
            got = model.generate(IDS, custom_generate=graphed_greedy, **kw)
        assert torch.equal(got, want)
    got = model.generate(IDS, custom_generate=graphed_greedy, **kw)  # plain: no context at all
    assert torch.equal(got, want)


@pytest.mark.parametrize("cast", ["half", "float"])
def test_kept_cache_follows_a_dtype_change_of_the_model(our_folder: Path, cast: str) -> None:
    """``model.half()`` / ``.float()`` between two calls: the kept static cache holds keys of the old dtype,
    which the next call cannot write into ("index_copy_(): self and source expected to have the same
    dtype"); a new one is made for the model's new dtype."""
    model = load_quantized(our_folder).eval()
    kw = {"max_new_tokens": 5, "min_new_tokens": 5, "pad_token_id": 0}
    model.generate(IDS, custom_generate=graphed_greedy, **kw)
    getattr(model, cast)()
    got = model.generate(IDS, custom_generate=graphed_greedy, **kw)
    assert torch.equal(got, greedy_reference(model, IDS, **kw))


def test_concurrent_calls_on_one_model_each_get_their_tokens(our_folder: Path) -> None:
    """Two threads decoding on one model at once (a server's worker threads): each gets the tokens of
    its own prompt. A barrier at the first decode step makes both prefills happen before either
    decodes, so a static cache shared between the calls would feed one call the other's keys."""
    model = load_quantized(our_folder).eval()
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "pad_token_id": 0}
    prompts = [IDS, IDS[:, 2:].flip(1)]
    want = [greedy_reference(model, ids, **kw) for ids in prompts]
    barrier = threading.Barrier(len(prompts), timeout=60)
    waited: set[int] = set()

    def first_decode_step(module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1 and threading.get_ident() not in waited:
            waited.add(threading.get_ident())
            barrier.wait()

    got: list[torch.Tensor | None] = [None] * len(prompts)

    def run(i: int) -> None:
        got[i] = model.generate(prompts[i], custom_generate=graphed_greedy, **kw)

    hook = model.register_forward_pre_hook(first_decode_step, with_kwargs=True)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        hook.remove()
    assert len(waited) == len(prompts)  # both calls really decoded at the same time
    for g, w in zip(got, want, strict=True):
        assert g is not None
        assert torch.equal(g, w)


def test_returned_cache_stays_valid_after_a_later_call(our_folder: Path) -> None:
    """``return_dict_in_generate=True`` hands the cache back to continue from: a later call must not
    reset it and fill it with another prompt's keys (the kept cache is given away, a new one made)."""
    model = load_quantized(our_folder).eval()
    kw = {"max_new_tokens": 3, "min_new_tokens": 3, "pad_token_id": 0}
    out = model.generate(IDS, custom_generate=graphed_greedy, return_dict_in_generate=True, **kw)
    cache = out.cache
    length = int(cache.get_seq_length())
    kv = decode._cache_tensors
    before = [t.clone() for t in kv(cache)]
    again = model.generate(IDS[:, 2:].flip(1), custom_generate=graphed_greedy, **kw)  # another prompt
    assert torch.equal(again, greedy_reference(model, IDS[:, 2:].flip(1), **kw))
    assert int(cache.get_seq_length()) == length
    assert all(torch.equal(a, b) for a, b in zip(before, kv(cache), strict=True))
    continued = model.generate(out.sequences, cache=cache, **kw)
    assert torch.equal(continued, greedy_reference(model, out.sequences, **kw))
    plain = model.generate(IDS, custom_generate=graphed_greedy, **kw)  # without the dict: kept again
    assert decode._own_caches[model] is not cache
    assert torch.equal(plain, out.sequences)


def test_users_static_cache_is_used(model) -> None:
    kw = {"max_new_tokens": 7, "min_new_tokens": 7, "pad_token_id": 0}
    cache = StaticCache(config=model.config, max_cache_len=64)
    got = model.generate(IDS, custom_generate=graphed_greedy, cache=cache, **kw)
    assert int(cache.get_seq_length()) == IDS.shape[1] + 6  # the last token is produced, not fed
    assert torch.equal(got, greedy_reference(model, IDS, **kw))


def test_small_static_cache_is_refused_naming_both_lengths(model) -> None:
    cache = StaticCache(config=model.config, max_cache_len=10)
    with pytest.raises(ValueError, match=r"holds 10 positions; generate\(\) needs 19"):
        model.generate(IDS, custom_generate=graphed_greedy, cache=cache, max_new_tokens=12, pad_token_id=0)


def _eos_of(model, ids: torch.Tensor, at: int) -> int:
    """The token greedy decoding produces as its ``at``-th new token: made the EOS, it stops there."""
    return int(greedy_reference(model, ids, max_new_tokens=at + 1, pad_token_id=0)[0, ids.shape[1] + at])


def test_stops_at_eos_like_transformers(model) -> None:
    eos = _eos_of(model, IDS, 5)
    kw = {"max_new_tokens": 20, "eos_token_id": eos, "pad_token_id": 0}
    want = greedy_reference(model, IDS, **kw)
    got = model.generate(IDS, custom_generate=graphed_greedy, steps_per_graph=4, **kw)
    assert want.shape[1] < IDS.shape[1] + 20  # the reference really stopped early
    assert torch.equal(got, want)


def test_min_new_tokens_bars_eos_on_device(model) -> None:
    eos = _eos_of(model, IDS, 2)
    kw = {"max_new_tokens": 14, "min_new_tokens": 9, "eos_token_id": eos, "pad_token_id": 0}
    want = greedy_reference(model, IDS, **kw)
    got = model.generate(IDS, custom_generate=graphed_greedy, steps_per_graph=4, **kw)
    assert torch.equal(got, want)


def test_min_length_processors_with_other_eos_ids_fall_back(caplog) -> None:
    """A ``MinLengthLogitsProcessor`` of one's own for another EOS id beside ``min_new_tokens``: the step
    bars all their EOS ids until the longest minimum, so the generation config's EOS was barred too
    (it ran on past where transformers stopped). Such processors fall back, saying so."""
    from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessorList
    from transformers.generation.logits_process import MinLengthLogitsProcessor

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **_TINY)).eval()
    ids = torch.tensor([[5, 9, 33, 2, 200, 7, 64, 8, 12, 99, 3, 17]])
    text = greedy_reference(model, ids, max_new_tokens=8, pad_token_id=0)[0, ids.shape[1] :]
    eos, other = int(text[2]), int(text[5])
    assert other not in text[:5]
    assert eos not in text[:2]
    mine = LogitsProcessorList([MinLengthLogitsProcessor(ids.shape[1] + 12, eos_token_id=other)])
    kw = {"max_new_tokens": 14, "pad_token_id": 0, "eos_token_id": eos, "min_new_tokens": 1}
    want = model.generate(ids, logits_processor=mine, **kw)
    assert want.shape[1] == ids.shape[1] + 3  # stopped at its EOS
    got, text = _graphed_warned(model, ids, caplog, logits_processor=mine, **kw)
    assert torch.equal(got, want)
    assert "different EOS ids" in text


def test_batch_rows_finished_early_are_padded_like_transformers(model) -> None:
    ids = torch.cat([IDS, IDS.flip(1)])
    eos = _eos_of(model, ids[:1], 3)
    kw = {"max_new_tokens": 16, "eos_token_id": eos, "pad_token_id": 3}
    want = greedy_reference(model, ids, **kw)
    got = model.generate(ids, custom_generate=graphed_greedy, steps_per_graph=5, **kw)
    assert (want == 3).any()  # one row finished and was padded while the other went on
    assert torch.equal(got, want)


SAMPLINGS = {
    "top-k": {"top_k": 5},
    "temperature-top-p": {"temperature": 0.7, "top_k": 0, "top_p": 0.9},
    "min-p": {"top_k": 0, "min_p": 0.05, "temperature": 1.3},
    "defaults": {},  # generate()'s own: top_k=50
    "no-warper": {"top_k": 0},
    "two-per-prompt": {"top_k": 8, "num_return_sequences": 2},  # generate() repeats each row first
}


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
@pytest.mark.parametrize("steps_per_graph", [1, 4])
def test_sampled_tokens_equal_transformers_sampling_with_the_same_seed(
    model, sampling: dict, steps_per_graph: int
) -> None:
    """do_sample=True runs on the device loop (the warpers inside the step, the draw without
    multinomial's syncs) and gives transformers' sampled tokens for the same seed, batch rows included."""
    ids = torch.cat([IDS, IDS.flip(1)])
    kw = {"max_new_tokens": 13, "pad_token_id": 0, **sampling}
    want = sample_reference(model, ids, seed=11, **kw)
    torch.manual_seed(11)
    with _no_fallback():
        got = model.generate(
            ids, do_sample=True, custom_generate=graphed_greedy, steps_per_graph=steps_per_graph, **kw
        )
    assert torch.equal(got, want)
    torch.manual_seed(12)
    other = model.generate(ids, do_sample=True, custom_generate=graphed_greedy, **kw)
    assert not torch.equal(other, want)  # the draws follow the seed: a sampled text, not argmax's


def test_sampling_with_eos_and_min_new_tokens_equals_transformers(model) -> None:
    ids = torch.cat([IDS, IDS.flip(1)])
    kw = {"max_new_tokens": 24, "pad_token_id": 3, "top_k": 3, "min_new_tokens": 4}
    eos = int(sample_reference(model, ids, seed=5, **kw)[0, ids.shape[1] + 6])
    want = sample_reference(model, ids, seed=5, eos_token_id=eos, **kw)
    torch.manual_seed(5)
    with _no_fallback():
        got = model.generate(
            ids, do_sample=True, custom_generate=graphed_greedy, steps_per_graph=4, eos_token_id=eos, **kw
        )
    assert want.shape[1] < ids.shape[1] + 24 or (want == 3).any()  # EOS stopped or padded a row
    assert torch.equal(got, want)


def test_sampling_nan_probabilities_raise_as_multinomial_does(model) -> None:
    """transformers' loop draws with ``torch.multinomial``, which refuses probabilities holding a NaN (a
    NaN logit, e.g. an overflow in half precision); the device loop's draw checks nothing, so it gave
    tokens where transformers raises. It raises the same error now."""
    steps = []

    def nan_late(module, args, out):  # the 4th decode step's logits are NaN
        steps.append(args[0].shape[1])
        return out.fill_(float("nan")) if len(steps) == 5 else out

    kw = {"max_new_tokens": 9, "pad_token_id": 0, "do_sample": True, "top_k": 5}
    hook = model.lm_head.register_forward_hook(nan_late)
    try:
        with pytest.raises(RuntimeError, match="probability tensor contains"):
            model.generate(IDS, **kw)
        steps.clear()
        with _no_fallback(), pytest.raises(RuntimeError, match="probability tensor contains"):
            model.generate(IDS, custom_generate=graphed_greedy, **kw)
    finally:
        hook.remove()
    torch.manual_seed(0)
    want = model.generate(IDS, **kw)
    torch.manual_seed(0)
    assert torch.equal(model.generate(IDS, custom_generate=graphed_greedy, **kw), want)  # the flag is reset


def test_sampling_graph_state_follows_the_warper_settings(model) -> None:
    """Graphs bake the warpers' numbers in: another top_k gets a state of its own, not the first one's."""
    kw = {"max_new_tokens": 6, "pad_token_id": 0, "do_sample": True}
    model.generate(IDS, custom_generate=graphed_greedy, top_k=4, **kw)
    model.generate(IDS, custom_generate=graphed_greedy, top_k=9, **kw)
    keys = [key for key in decode._graphs[decode._own_caches[model]] if key[3] is not None]
    assert len({key[3] for key in keys}) >= 2


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_repetition_penalty_equals_transformers(model, sample: bool) -> None:
    """A repetition penalty (Qwen's generation configs set one) runs on the device loop: it reads the
    step's history buffer (the tokens so far; the unused positions hold the vocabulary size, which the
    penalty clamps onto the column it drops), so the tokens equal transformers' for the same seed."""
    ids = torch.cat([IDS, IDS.flip(1)])
    kw = {"max_new_tokens": 19, "pad_token_id": 0, "repetition_penalty": 1.8}
    if sample:
        kw.update(top_k=6, temperature=0.8)
        want = sample_reference(model, ids, seed=2, **kw)
        plain = sample_reference(model, ids, seed=2, **{**kw, "repetition_penalty": 1.0})
    else:
        want = greedy_reference(model, ids, **kw)
        plain = greedy_reference(model, ids, **{**kw, "repetition_penalty": 1.0})
    assert not torch.equal(want, plain)  # the penalty changes the text
    torch.manual_seed(2)
    with _no_fallback():
        got = model.generate(ids, do_sample=sample, custom_generate=graphed_greedy, steps_per_graph=4, **kw)
    assert torch.equal(got, want)


def test_a_processor_reading_more_falls_back_with_a_warning(model, caplog) -> None:
    """A processor the step does not reproduce (no_repeat_ngram_size) runs transformers' loop, said."""
    kw = {"max_new_tokens": 6, "do_sample": True, "top_k": 5, "no_repeat_ngram_size": 2, "pad_token_id": 0}
    torch.manual_seed(3)
    want = model.generate(IDS, **kw)
    got, text = _graphed_warned(model, IDS, caplog, seed=3, **kw)
    assert "NoRepeatNGramLogitsProcessor is not supported" in text
    assert torch.equal(got, want)


def test_draw_is_multinomials_draw() -> None:
    """_draw takes multinomial's one-sample path: the same token for the same generator state."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 1000, generator=g) * 3, dim=-1)
    for seed in range(20):
        torch.manual_seed(seed)
        want = torch.multinomial(probs, 1)
        torch.manual_seed(seed)
        assert torch.equal(decode._draw(probs), want)


def _graphed_warned(model, ids, caplog, seed: int | None = None, **kw):
    """graphed_greedy's tokens for ``generate(ids, **kw)`` (its once-per-reason warnings cleared first,
    the default generator seeded with ``seed``) and the log text of the call."""
    decode._warned.clear()
    if seed is not None:
        torch.manual_seed(seed)
    with caplog.at_level(logging.WARNING, logger="converter.loader.decode"):
        got = model.generate(ids, custom_generate=graphed_greedy, **kw)
    return got, caplog.text


@contextlib.contextmanager
def _no_fallback():
    """Fails the test if graphed_greedy fell back to transformers' loop."""
    before = set(decode._warned)
    decode._warned.clear()
    yield
    assert not decode._warned, decode._warned
    decode._warned.update(before)


@pytest.mark.parametrize(
    "kw",
    [{"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}, {"num_beams": 2, "do_sample": True}],
    ids=["beams", "beams-return-2", "beam-sample"],
)
def test_beam_search_falls_back_to_transformers_beam_search(model, kw: dict) -> None:
    """Beams are one of the documented fallbacks: the same sequences as plain generate (which runs
    transformers' beam search), not a sampling loop over the num_beams-expanded prompt."""
    kw = {**kw, "max_new_tokens": 6, "pad_token_id": 0}
    ids = torch.cat([IDS, IDS.flip(1)])
    torch.manual_seed(3)
    want = model.generate(ids, **kw)
    torch.manual_seed(3)
    got = model.generate(ids, custom_generate=graphed_greedy, **kw)
    assert got.shape == want.shape
    assert torch.equal(got, want)


def _padded(ids: torch.Tensor, pads: tuple[int, ...], left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``ids`` with ``pads[i]`` pad tokens (mask 0) on the left (or right) of row i: id 77,
    not the pad_token_id the tests pass, from which generate() would infer the same mask itself."""
    mask = torch.ones_like(ids)
    ids = ids.clone()
    for row, n in enumerate(pads):
        if n:
            cols = slice(0, n) if left else slice(ids.shape[1] - n, None)
            mask[row, cols] = 0
            ids[row, cols] = 77
    return ids, mask


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_padded_prompts_equal_transformers(model, sample: bool, left: bool) -> None:
    """Prompts of several lengths in one batch (padded, with their attention mask) run on the device
    loop: each row continues at its last position + 1 and the steps pass the padding mask, as
    transformers' loop does; the tokens are its tokens (left padding as batched generation uses, and
    right padding, which transformers warns about but runs)."""
    ids, mask = _padded(torch.cat([IDS, IDS.flip(1), IDS.roll(3, 1)]), (3, 0, 5), left)
    kw = {"max_new_tokens": 15, "pad_token_id": 0, "attention_mask": mask}
    if sample:
        kw.update(top_k=6, repetition_penalty=1.4)  # the penalty skips the pads (prompt_ignore_length)
        want = sample_reference(model, ids, seed=4, **kw)
    else:
        want = greedy_reference(model, ids, **kw)
    if sample:
        unmasked = sample_reference(model, ids, seed=4, **{**kw, "attention_mask": None})
    else:
        unmasked = greedy_reference(model, ids, **{**kw, "attention_mask": None})
    assert not torch.equal(want, unmasked)  # the mask changes the padded rows' tokens
    torch.manual_seed(4)
    with _no_fallback():
        got = model.generate(ids, do_sample=sample, custom_generate=graphed_greedy, steps_per_graph=4, **kw)
    assert torch.equal(got, want)


def test_padded_prompts_with_eos_and_min_new_tokens_equal_transformers(model) -> None:
    ids, mask = _padded(torch.cat([IDS, IDS.flip(1)]), (4, 0))
    eos = _eos_of(model, ids[1:], 3)
    kw = {
        "max_new_tokens": 16,
        "pad_token_id": 3,
        "eos_token_id": eos,
        "min_new_tokens": 2,
        "attention_mask": mask,
    }
    want = greedy_reference(model, ids, **kw)
    with _no_fallback():
        got = model.generate(ids, custom_generate=graphed_greedy, steps_per_graph=5, **kw)
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory):
    """A tiny GPT-2 (token type embeddings, learned positions) converted to NF4 and loaded; its position
    embeddings scaled up, so that positions change the greedy tokens of a random model."""
    from tiny_models import make_tiny

    from converter.writer.pipeline import convert

    root = tmp_path_factory.mktemp("decode-gpt2")
    convert(make_tiny("gpt2", root / "src"), root / "q", progress=False)
    model = load_quantized(root / "q").eval()
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(30)
    return model


def test_token_type_ids_fall_back(gpt2, caplog) -> None:
    """transformers' loop passes token_type_ids (extended) at every decode step; the device loop feeds
    only the token, its position and the mask, so with token_type_ids it falls back instead of silently
    giving other tokens."""
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "pad_token_id": 0}
    ids = IDS % gpt2.config.vocab_size
    inputs = {"token_type_ids": torch.full_like(ids, 3)}
    want = gpt2.generate(ids, **inputs, **kw)
    assert not torch.equal(want, gpt2.generate(ids, **kw))  # the input changes the tokens
    got, text = _graphed_warned(gpt2, ids, caplog, **inputs, **kw)
    assert torch.equal(got, want)
    assert "token_type_ids" in text


def test_position_ids_continue_at_their_last_plus_one(gpt2) -> None:
    """position_ids that do not end at the prompt's length - 1: the steps continue each row at its last
    position + 1, as transformers' loop does (it fell back before padded prompts ran on the device)."""
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "pad_token_id": 0}
    ids = IDS % gpt2.config.vocab_size
    positions = torch.arange(ids.shape[1]).unsqueeze(0) + 20
    want = greedy_reference(gpt2, ids, position_ids=positions, **kw)
    assert not torch.equal(want, greedy_reference(gpt2, ids, **kw))  # the positions change the tokens
    with _no_fallback():
        got = gpt2.generate(ids, custom_generate=graphed_greedy, position_ids=positions, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("implementation", ["offloaded", "offloaded_static"])
def test_offloaded_caches_fall_back_to_transformers_loop(
    model, implementation: str, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An offloaded cache keeps keys and values off the device to save its memory: the device loop
    swapped an offloaded DynamicCache for a static cache of its own on the device (the memory the user
    asked to save) and recorded graphs over an offloaded StaticCache's stream copies. It hands the
    offloading cache to transformers' loop instead (on a CPU-only torch that loop cannot offload, as
    plain generate cannot: a stand-in records what it was given)."""
    from transformers.generation.utils import GenerationMixin

    given = []

    def loop(self, input_ids, **kwargs):
        given.append(kwargs.get("cache"))
        return input_ids

    monkeypatch.setattr(GenerationMixin, "_sample", loop)
    decode._warned.clear()
    with caplog.at_level(logging.WARNING, logger="converter.loader.decode"):
        model.generate(
            IDS, custom_generate=graphed_greedy, cache_implementation=implementation, max_new_tokens=4
        )
    assert "offloaded caches" in caplog.text
    assert len(given) == 1
    assert given[0].offloading


def test_bad_steps_per_graph_is_refused(model) -> None:
    with pytest.raises(ValueError, match="steps_per_graph must be a positive int, got 0"):
        model.generate(IDS, custom_generate=graphed_greedy, steps_per_graph=0, max_new_tokens=3)


_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
)
_ARCHS = {  # the cache kinds the loop meets: full attention, sliding windows shorter than the text, MoE
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": 8},
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": 6,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
    },
    "qwen3_moe": {"head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
}


@pytest.mark.parametrize("model_type", list(_ARCHS))
def test_any_transformers_model_gets_its_greedy_tokens(model_type: str) -> None:
    """The loop is generic: plain (bf16-style) transformers models, sliding-window caches included."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **_TINY, **_ARCHS[model_type])
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[5, 9, 33, 2, 200, 7, 64, 8, 12, 99, 3, 17]])  # longer than the windows
    kw = {"max_new_tokens": 20, "min_new_tokens": 20, "pad_token_id": 0}
    want = greedy_reference(model, ids, **kw)
    assert torch.equal(model.generate(ids, custom_generate=graphed_greedy, steps_per_graph=4, **kw), want)


def test_a_big_padded_batchs_penalty_keys_its_state_by_every_rows_padding() -> None:
    """transformers' repetition penalty skips each row's left pads (``prompt_ignore_length``, one entry
    per row). The step's state (on CUDA its graphs; on the CPU the processors it calls) is keyed by the
    processors' settings, which were their repr: past 1000 rows torch elides a tensor's middle, so a
    second call whose padding differed only in a middle row decoded with the first call's lengths (row
    500 penalised its pads' token: other tokens, silently). Every value counts now."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **_TINY)).eval()
    ids = torch.tensor([[5, 9, 33, 2, 200, 7, 64, 8, 12, 99, 3, 17]]).repeat(1001, 1)

    def padded(middle: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = ids.clone(), torch.ones_like(ids)
        for row, n in ((0, 2), (500, middle)):
            x[row, :n], mask[row, :n] = fill, 0
        return x, mask

    kw = {"max_new_tokens": 4, "pad_token_id": 0, "repetition_penalty": 5.0}
    x, mask = padded(3, 77)
    # pads of the token row 500 then picks: the penalty must skip them, as transformers' does
    fill = int(greedy_reference(model, x, attention_mask=mask, **kw)[500, ids.shape[1] + 1])
    for middle in (0, 3):  # the first call makes the state, the second must not reuse it
        x, mask = padded(middle, fill)
        want = greedy_reference(model, x, attention_mask=mask, **kw)
        with _no_fallback():
            got = model.generate(x, custom_generate=graphed_greedy, attention_mask=mask, **kw)
        assert torch.equal(got, want)


@pytest.mark.parametrize("prompt", [12, 20], ids=["crosses-while-decoding", "prompt-past-it"])
def test_phi3_text_past_its_original_positions_falls_back(prompt: int, caplog) -> None:
    """Phi-3's prepare_inputs_for_generation drops the cache once the text passes
    original_max_position_embeddings and runs the whole text again (with longrope: its long factors for
    every position), then decodes on a new dynamic cache. The device loop kept decoding on the keys made
    with the short factors (other tokens), and a prompt already past it was prefilled into no cache of
    the loop's at all. It falls back."""
    from transformers import AutoConfig, AutoModelForCausalLM

    rope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}
    rope["original_max_position_embeddings"] = 16
    torch.manual_seed(0)
    config = AutoConfig.for_model("phi3", **_TINY, rope_scaling=rope, original_max_position_embeddings=16)
    model = AutoModelForCausalLM.from_config(config).eval()
    rows = torch.tensor([[5, 9, 33, 2, 200, 7, 64, 8, 12, 99, 3, 17, 40, 41, 42, 43, 44, 45, 46, 47]])
    ids, mask = _padded(torch.cat([rows, rows.flip(1), rows.roll(3, 1)])[:, :prompt], (prompt - 1, 0, 2))
    kw = {"max_new_tokens": 14, "pad_token_id": 0, "attention_mask": mask}
    want = greedy_reference(model, ids, **kw)
    got, text = _graphed_warned(model, ids, caplog, **kw)
    assert torch.equal(got, want)
    assert "original_max_position_embeddings (16)" in text
    short = {**kw, "max_new_tokens": 2}  # ends before 16 positions: the device loop
    with _no_fallback():
        got = model.generate(
            ids[:, :12], custom_generate=graphed_greedy, **{**short, "attention_mask": mask[:, :12]}
        )
    assert torch.equal(got, greedy_reference(model, ids[:, :12], **{**short, "attention_mask": mask[:, :12]}))


def test_a_model_that_takes_no_cache_falls_back(caplog) -> None:
    """OpenAI GPT's forward takes no cache: transformers' loop runs the whole text at every step. The
    device loop made a static cache the model never read, so each step saw its one token only (other
    tokens, silently). It falls back."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    config = AutoConfig.for_model(
        "openai-gpt",
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=256,
        n_positions=256,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.transformer.tokens_embed.weight.mul_(10)  # the context changes this random model's tokens
    ids = torch.tensor([[5, 9, 33, 2, 200, 7, 64, 8, 12, 99, 3, 17]])
    kw = {"max_new_tokens": 10, "min_new_tokens": 10, "pad_token_id": 0}
    want = model.generate(ids, **kw)
    got, text = _graphed_warned(model, ids, caplog, **kw)
    assert torch.equal(got, want)
    assert "takes no cache" in text


def test_falcon_with_alibi_falls_back(caplog) -> None:
    """Falcon's alibi bias is as long as the attention mask, not the cache: it does not run on a static
    cache (transformers' own static-cache loop fails as well), and the device loop failed ("The size of
    tensor a (256) must match the size of tensor b (12)") where plain generate works. It falls back."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, alibi=True
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[5, 9, 33, 2, 200, 7, 64, 8, 12, 99, 3, 17]])
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "pad_token_id": 0}
    got, text = _graphed_warned(model, ids, caplog, **kw)
    assert torch.equal(got, model.generate(ids, **kw))
    assert "alibi" in text


def test_sliding_window_only_cache_serves_any_length() -> None:
    """A model whose every layer slides (Mistral's sliding_window): its StaticCache layers hold the window
    and roll over it, so a cache made longer than the window serves any length. It used to count as
    holding only the window: a user's cache was refused ("the StaticCache holds 8 positions") and the
    kept cache was made again (its graphs recorded again) at every call."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", **_TINY, **_ARCHS["mistral"])
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[5, 9, 33, 2, 200, 7, 64, 8, 12, 99, 3, 17]])  # longer than the window
    kw = {"max_new_tokens": 20, "min_new_tokens": 20, "pad_token_id": 0}
    want = greedy_reference(model, ids, **kw)
    cache = StaticCache(config=model.config, max_cache_len=16)  # holds the window of 8: any length
    assert torch.equal(model.generate(ids, custom_generate=graphed_greedy, cache=cache, **kw), want)
    assert torch.equal(model.generate(ids, custom_generate=graphed_greedy, **kw), want)
    kept = decode._own_caches[model]
    assert torch.equal(model.generate(ids, custom_generate=graphed_greedy, **kw), want)
    assert decode._own_caches[model] is kept


def test_sliding_cache_shorter_than_its_window_is_refused() -> None:
    """A sliding layer made shorter than its window holds max_cache_len positions, no more: a longer
    generation on it would attend to fewer tokens than the model's window, so it is refused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", **{**_TINY, "sliding_window": 64})
    model = AutoModelForCausalLM.from_config(config).eval()
    cache = StaticCache(config=model.config, max_cache_len=10)
    with pytest.raises(ValueError, match=r"holds 10 positions; generate\(\) needs 19"):
        model.generate(IDS, custom_generate=graphed_greedy, cache=cache, max_new_tokens=12, pad_token_id=0)


_LINEAR_ATTENTION = {  # caches with linear-attention (state) layers: all of them, or beside attention
    "falcon_mamba": {"state_size": 8, "expand": 2},
    "jamba": {
        "num_experts": 1,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "mamba_d_state": 8,
        "use_mamba_kernels": False,
    },
    "recurrent_gemma": {
        "head_dim": 16,
        "lru_width": 64,
        "attention_window_size": 16,
        "block_types": ["recurrent", "attention"],
    },
}


@pytest.mark.parametrize("model_type", list(_LINEAR_ATTENTION))
def test_linear_attention_caches_fall_back_with_their_tokens(model_type: str, caplog) -> None:
    """State-space / recurrent layers (FalconMamba, Jamba, RecurrentGemma) keep conv and recurrent
    states, not keys and values: the loop does not decode on them. It fell over instead of falling back
    (FalconMamba: "get_seq_length can only be called on Attention layers"; Jamba, RecurrentGemma, from
    the second call on, reusing the kept cache: "'LinearAttentionLayer' object has no attribute
    'is_initialized'"); now every call says why and gives plain generate's tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    tiny = {k: v for k, v in _TINY.items() if k != "num_hidden_layers"}
    config = AutoConfig.for_model(model_type, **tiny, num_hidden_layers=2, **_LINEAR_ATTENTION[model_type])
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[5, 9, 33, 2, 200, 7]])
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "pad_token_id": 0}
    want = model.generate(ids, **kw)
    decode._warned.clear()
    with caplog.at_level(logging.WARNING, logger="converter.loader.decode"):
        got = [model.generate(ids, custom_generate=graphed_greedy, **kw) for _ in range(2)]
    assert "linear-attention" in caplog.text
    assert torch.equal(got[0], want)
    assert torch.equal(got[1], want)


def test_the_kept_cache_stops_at_the_models_position_limit() -> None:
    """The kept cache is rounded up to 256 positions; GPT-Neo (and MPT) hold a causal mask buffer of
    max_position_embeddings positions, and a longer cache failed ("The size of tensor a (64) must match
    the size of tensor b (256)") where transformers' own static-cache generate works."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, StaticCache

    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=128, max_position_embeddings=64, hidden_size=64, num_layers=2, num_heads=4,
        attention_types=[[["global", "local"], 1]], window_size=16, eos_token_id=None,
    )  # fmt: skip
    model = GPTNeoForCausalLM(config).eval()
    ids = torch.tensor([[5, 9, 33, 2, 100, 7]])
    kw = {"max_new_tokens": 8, "pad_token_id": 0}
    # transformers' own loop on a static cache of the length the kept one gets (the mask's 64): a cache
    # of another length may flip this random model's near-tied logits
    cache = StaticCache(config=config, max_cache_len=64)
    want = model.generate(ids, do_sample=False, cache=cache, disable_compile=True, **kw)
    assert torch.equal(model.generate(ids, custom_generate=graphed_greedy, **kw), want)


@pytest.mark.parametrize("eos", [50256, [50256, 7]], ids=["outside", "outside-and-inside"])
def test_eos_ids_outside_the_vocabulary_are_ignored_as_transformers_ignores_them(eos) -> None:
    """GPT2Config's default eos_token_id is 50256; a small model (or a config naming an added token the
    head lacks) has no such logit. transformers' min_new_tokens processor marks EOS ids by
    ``isin(arange(vocab), eos)``, so an id outside the vocabulary bars nothing; the device loop indexed
    the logits with it ("index 50256 is out of bounds for dimension 0 with size 128")."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, eos_token_id=eos)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.tensor([[5, 9, 33, 2, 100, 7]])
    kw = {"max_new_tokens": 8, "min_new_tokens": 8, "pad_token_id": 0}
    # transformers' own loop on a static cache of the length the kept one gets (the mask's 64): a cache
    # of another length may flip this random model's near-tied logits
    cache = StaticCache(config=config, max_cache_len=64)
    want = model.generate(ids, do_sample=False, cache=cache, disable_compile=True, **kw)
    assert torch.equal(model.generate(ids, custom_generate=graphed_greedy, **kw), want)


class _RecordingStreamer:
    """What generate() hands a streamer: the prompt, then the new tokens in order, then one end()."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ends = 0

    def put(self, value: torch.Tensor) -> None:
        assert self.ends == 0, "put after end"
        self.puts.append(value.reshape(-1).clone())

    def end(self) -> None:
        self.ends += 1


@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.3}], ids=["device-loop", "fallback"])
def test_streamer_gets_every_token_and_the_end(model, extra: dict) -> None:
    """``generate(..., custom_generate=graphed_greedy, streamer=s)``: transformers hands the callable only the
    arguments ``_sample`` does not take, so the streamer got the prompt (from generate()) and then nothing,
    not even ``end()``. It now gets what plain ``generate(streamer=s)`` gives it, on the device loop and
    on the documented fallback (a logits processor it does not run) alike."""
    kw = {"max_new_tokens": 9, "min_new_tokens": 9, "pad_token_id": 0, **extra}
    want = _RecordingStreamer()
    ref = model.generate(IDS, streamer=want, **kw)
    got = _RecordingStreamer()
    out = model.generate(IDS, custom_generate=graphed_greedy, streamer=got, **kw)
    assert torch.equal(out, ref)
    assert got.ends == want.ends == 1
    assert torch.equal(got.puts[0], IDS[0])  # the prompt, from generate() itself
    assert torch.equal(torch.cat(got.puts[1:]), out[0, IDS.shape[1] :])


@pytest.mark.parametrize("rows", [1, 2])
def test_streamer_gets_no_token_after_eos(model, rows: int) -> None:
    """A replay (on the CPU: ``steps_per_graph`` steps) runs on past a row's EOS; the streamer got those
    steps' tokens as they came (text after the EOS that the output does not hold), where plain
    ``generate(streamer=s)`` gives it the EOS, then pad tokens for a finished row while others run, and
    nothing once all have finished. It now gets what the output holds."""
    kw = {"max_new_tokens": 14, "pad_token_id": 3}
    ids = torch.cat([IDS, IDS.flip(1)])[:rows]
    eos = _eos_of(model, ids[:1], 5)  # a token of row 0: it stops mid-chunk (a chunk is 4 steps)
    want, got = _RecordingStreamer(), _RecordingStreamer()
    ref = model.generate(ids, streamer=want, eos_token_id=eos, **kw)
    with _no_fallback():
        out = model.generate(
            ids, custom_generate=graphed_greedy, streamer=got, eos_token_id=eos, steps_per_graph=4, **kw
        )
    assert torch.equal(out, ref)
    assert got.ends == 1

    def streamed(puts: list[torch.Tensor]) -> torch.Tensor:  # (rows, new tokens)
        return torch.cat([p.reshape(rows, -1) for p in puts[1:]], dim=1)

    assert torch.equal(streamed(got.puts), streamed(want.puts))
    assert torch.equal(streamed(got.puts), out[:, ids.shape[1] :])


def test_iterator_streamer_reader_ends(model) -> None:
    """A ``TextIteratorStreamer`` read on another thread (the documented way to stream): the reader waited
    forever for the end of the stream, which never came; it now ends with the generated text."""
    from transformers import TextIteratorStreamer

    class Digits:  # a tokenizer's decode(): one number per token
        def decode(self, ids, **_) -> str:
            return " ".join(str(int(i)) for i in ids)

    streamer = TextIteratorStreamer(Digits(), skip_prompt=True, timeout=60)  # queue.Empty, never a hang
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "pad_token_id": 0}
    result: list[torch.Tensor] = []
    worker = threading.Thread(
        target=lambda: result.append(
            model.generate(IDS, custom_generate=graphed_greedy, streamer=streamer, **kw)
        )
    )
    worker.start()
    text = "".join(streamer)
    worker.join(timeout=60)
    assert result, "generate did not return"
    assert text.split() == [str(int(t)) for t in result[0][0, IDS.shape[1] :]]


@pytest.mark.parametrize("where", ["model-config", "call"])
def test_use_cache_false_runs_transformers_loop_without_a_cache(where: str, caplog) -> None:
    """``use_cache=False`` (a fine-tune's config.json often says so, saved from gradient-checkpointed
    training; or passed to generate): transformers' loop makes no cache and runs the whole text through the
    model at every step, whose float rounding differs from a cached step's (bf16: other tokens). The device
    loop decoded one token a step on a static cache of its own; it falls back, saying so, and the model
    sees the whole text at every step, as plain generate() gives it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(3)
    config = AutoConfig.for_model("llama", **_TINY, use_cache=where == "call")
    model = AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)
    ids = torch.randint(2, 256, (2, 12))
    kw = {"max_new_tokens": 8, "min_new_tokens": 8, "pad_token_id": 0}
    if where == "call":
        kw["use_cache"] = False
    want = model.generate(ids, **kw)
    lengths: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    decode._warned.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="converter.loader.decode"):
            got = model.generate(ids, custom_generate=graphed_greedy, **kw)
    finally:
        hook.remove()
    assert "use_cache=False" in caplog.text
    assert lengths == list(range(12, 20))  # the whole text at every step, no one-token step
    assert torch.equal(got, want)


def test_cpmant_feeding_the_whole_text_falls_back_before_any_work(caplog) -> None:
    """CPMAnt's prepare_inputs_for_generation hands its forward the whole text at every step (the
    forward slices off the cached part itself; transformers' own static-cache loop fails on it). The device
    loop fed one token a step and crashed inside it ("The size of tensor a (256) must match the size of
    tensor b (12)"); it falls back before its prefill, saying why, with plain generate's tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "cpmant", hidden_size=64, dim_ff=128, num_hidden_layers=2, num_attention_heads=4, dim_head=16,
        vocab_size=256, prompt_length=4, prompt_types=4,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[5, 9, 33, 2, 200, 7, 64, 8]])
    kw = {"max_new_tokens": 8, "min_new_tokens": 8, "pad_token_id": 0}
    lengths: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        want = model.generate(ids, **kw)
        plain, lengths[:] = list(lengths), []
        decode._warned.clear()
        with caplog.at_level(logging.WARNING, logger="converter.loader.decode"):
            got = model.generate(ids, custom_generate=graphed_greedy, **kw)
    finally:
        hook.remove()
    assert "CpmAntForCausalLM's prepare_inputs_for_generation feeds the whole text" in caplog.text
    assert lengths == plain == list(range(8, 16))  # transformers' forwards only: no prefill of the loop's
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def gemma3_multimodal(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Gemma 3 image-text model (Gemma3ForConditionalGeneration: the Hub's gemma-3-4b/12b/27b-it),
    plain and converted to NF4 and loaded."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from converter.writer.pipeline import convert

    text = {**_TINY, **_ARCHS["gemma3_text"], "vocab_size": 300, "bos_token_id": 2}
    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14,
    )  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
        boi_token_index=297, eoi_token_index=298,
    )  # fmt: skip
    torch.manual_seed(0)
    plain = Gemma3ForConditionalGeneration(config).eval()
    root = tmp_path_factory.mktemp("decode-gemma3")
    plain.save_pretrained(root / "src")
    convert(root / "src", root / "q", progress=False)
    return {"plain": plain, "nf4": load_quantized(root / "q").eval()}


@pytest.mark.parametrize("inputs", ["text", "image", "image-token-types"])
@pytest.mark.parametrize("kind", ["plain", "nf4"])
def test_gemma3_multimodal_runs_on_the_device_loop(gemma3_multimodal, kind: str, inputs: str) -> None:
    """Gemma 3's image-text checkpoints: generate() hands the loop ``mm_encoder_outputs`` (empty for a text
    prompt; the image's encoder outputs with ``pixel_values``) and the processor's ``token_type_ids``,
    which transformers' loop passes to the prefill only (its prepare_inputs_for_generation drops them at
    the decode steps). The loop fell back on every such call, text-only too; it runs them now, with the
    tokens of transformers' own static-cache loop."""
    model = gemma3_multimodal[kind]
    image = [297, 299, 299, 299, 299, 298]  # begin-of-image, its 4 tokens, end-of-image
    ids = torch.tensor([[5, 9, *image, 33, 2, 200, 7], [8, 12, *image, 99, 3, 17, 40]])
    kw: dict = {"max_new_tokens": 16, "min_new_tokens": 16, "pad_token_id": 0}
    if inputs != "text":
        kw["pixel_values"] = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    if inputs == "image-token-types":
        kw["token_type_ids"] = (ids == 299).long()
    want = greedy_reference(model, ids, **kw)
    if inputs != "text":  # the image changes the tokens
        text_only = {k: v for k, v in kw.items() if k not in ("pixel_values", "token_type_ids")}
        assert not torch.equal(want, greedy_reference(model, ids, **text_only))
    with _no_fallback():
        got = model.generate(ids, custom_generate=graphed_greedy, steps_per_graph=4, **kw)
    assert torch.equal(got, want)


def _tiny_llama(seed: int = 0, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**_TINY, **extra})).eval()


@pytest.mark.parametrize("assist", ["assistant_model", "prompt_lookup_num_tokens"])
def test_assisted_generation_falls_back_to_transformers_assisted_loop(assist: str, caplog) -> None:
    """``generate(assistant_model=...)`` or ``prompt_lookup_num_tokens``: transformers hands a
    custom_generate callable no assistant, so the loop sampled (or decoded greedily) without one: with
    do_sample, other tokens than transformers' speculative sampling for the same seed, silently. It runs
    transformers' assisted loop now, with the generate() call's assistant, saying so."""
    model = _tiny_llama()
    ids = torch.tensor([[5, 9, 33, 2, 200, 7, 64, 8, 12, 99, 3, 17]])
    kw = {"max_new_tokens": 12, "pad_token_id": 0, "do_sample": True, "top_k": 0}
    if assist == "assistant_model":
        kw["assistant_model"] = _tiny_llama(seed=1, num_hidden_layers=1)
    else:
        kw["prompt_lookup_num_tokens"] = 3
    torch.manual_seed(5)
    want = model.generate(ids, **kw)
    torch.manual_seed(5)
    unassisted = model.generate(ids, **{k: v for k, v in kw.items() if k != assist})
    if assist == "assistant_model":  # speculative sampling draws otherwise
        assert not torch.equal(want, unassisted)
    got, text = _graphed_warned(model, ids, caplog, seed=5, **kw)
    assert "assisted generation" in text
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("flags", "name", "repo"),
    [
        ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive search", "contrastive-search"),
        (
            {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0},
            "group beam search",
            "group-beam-search",
        ),
        ({"force_words_ids": [[17]], "num_beams": 2}, "constrained beam search", "constrained-beam-search"),
        ({"dola_layers": "high"}, "dola generation", "dola"),
    ],
    ids=["contrastive", "group-beams", "constrained-beams", "dola"],
)
def test_decoding_modes_transformers_runs_from_the_hub_are_refused(flags: dict, name: str, repo: str) -> None:
    """Contrastive search, group and constrained beam search and DoLa live in Hub repositories in
    transformers 5 (plain generate() asks for trust_remote_code to load them); with a custom_generate
    callable generate() skips that dispatch, and the loop decoded greedily (contrastive, DoLa, constrained
    without beams) or ran plain beam search, silently other tokens. It refuses them, naming the repo."""
    model = _tiny_llama()
    ids = torch.tensor([[5, 9, 33, 2, 200, 7, 64, 8, 12, 99, 3, 17]])
    with pytest.raises(ValueError, match=rf"does not run {name}, .*transformers-community/{repo}'"):
        model.generate(ids, custom_generate=graphed_greedy, max_new_tokens=4, pad_token_id=0, **flags)


@pytest.mark.parametrize("model_type", ["bert", "data2vec-text"])
@pytest.mark.parametrize("is_decoder", [False, True], ids=["bidirectional", "decoder"])
def test_bert_family_lm_heads_without_is_decoder_fall_back(model_type: str, is_decoder: bool, caplog) -> None:
    """BERT-family LM heads (BertLMHeadModel, BigBird, Data2VecText, RoBERTa...) built without
    ``is_decoder=True`` attend both ways: a decode step on the static cache saw its unwritten positions,
    which transformers' mask (as long as the text so far) hides, and gave other tokens, silently. They fall
    back, saying so; with ``is_decoder=True`` (causal) they run on the device loop with transformers'
    static-cache tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=256, max_position_embeddings=256, pad_token_id=0, is_decoder=is_decoder,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4)
    ids = torch.tensor(
        [[5, 9, 33, 2, 200, 7, 64, 8, 12, 99, 3, 17], [8, 12, 99, 3, 17, 40, 5, 9, 33, 2, 200, 7]]
    )
    kw = {"max_new_tokens": 10, "min_new_tokens": 10, "pad_token_id": 0}
    if is_decoder:
        with _no_fallback():
            got = model.generate(ids, custom_generate=graphed_greedy, **kw)
        assert torch.equal(got, greedy_reference(model, ids, **kw))
        return
    want = model.generate(ids, **kw)
    got, text = _graphed_warned(model, ids, caplog, **kw)
    assert "is_decoder=False attends bidirectionally" in text
    assert torch.equal(got, want)


def test_a_model_transformers_makes_no_static_cache_for_falls_back(caplog) -> None:
    """DeepSeek-V4's compressed-attention layers have no static cache layer in transformers (its own
    static-cache loop fails, plain generate runs on a dynamic cache): the loop died making its cache
    ("KeyError: 'heavily_compressed_attention'"); it falls back, saying why, with plain generate's tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("deepseek_v4", **{**_TINY, "num_hidden_layers": 2, "head_dim": 16})
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[8, 12, 36, 5, 20, 203, 10, 67, 15, 102, 6, 20]])
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "pad_token_id": 0}
    want = model.generate(ids, **kw)
    got, text = _graphed_warned(model, ids, caplog, **kw)
    assert "transformers makes no StaticCache for DeepseekV4ForCausalLM" in text
    assert torch.equal(got, want)
