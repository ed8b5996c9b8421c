"""verify: 16-bit linears that ``llm_int8_skip_modules`` no longer lists (a hand-edited config.json).

transformers + bitsandbytes builds a ``Linear4bit`` / ``Linear8bitLt`` for every linear layer the
list does not name (``replace_with_bnb_linear``), and then finds no quant state for a weight the
folder stores unquantized: the load fails (or computes garbage). Which kept ``*.weight`` tensors are
linear layers is transformers' own answer, from the selection's model facts (shipped table, per-user
cache, else the model built on the meta device), so nothing here guesses from names; without
transformers and outside the table the check is skipped with a note.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path


def unskipped_linears(
    config_path: Path,
    config: dict,
    quantized: Collection[str],
    kept: Collection[str],
    skip: Sequence[str] | None,
) -> tuple[list[str], str | None]:
    """(problems, note): a problem per linear module whose weight is kept unquantized (in ``kept``) or
    that has none of its own (a tied head) and that transformers would still convert under ``skip``
    (``llm_int8_skip_modules``; None = transformers' defaults); the note says why nothing was checked."""
    from converter.errors import InputError
    from converter.plan.selection import model_facts
    from converter.plan.selection_facts import module_of

    keys = sorted({*quantized, *kept})
    not_checked = f"{config_path}: llm_int8_skip_modules not checked against the 16-bit linear layers"
    try:
        found = model_facts(config, keys)
    except InputError as exc:  # unknown model type, repository code, a config it cannot build
        return [], f"{not_checked} ({str(exc).rsplit('; ', 1)[0]})"  # the advice is convert's
    except Exception as exc:  # a check that cannot run must not fail verify
        return [], f"{not_checked} (transformers could not build the model: {type(exc).__name__}: {exc})"
    if found is None:
        return [], f"{not_checked}: that needs transformers >= 5 (pip install 'quantize-model[transformers]')"
    facts, converts = found
    # transformers' list on load: the config's (or its defaults without one), plus _keep_in_fp32_modules
    patterns = [*(skip if skip is not None else facts.defaults), *facts.keep_in_fp32]
    missing: dict[str, str] = {}  # model module -> what to add to the list
    for key in sorted(kept):
        kf = facts.keys.get(key)
        if kf is not None and kf.linear and converts(kf.module, patterns):
            missing.setdefault(kf.module, module_of(key))
    reached = {kf.module for kf in facts.keys.values()}
    for module in facts.extra_linear:  # a tied head: no weight of its own, still a linear layer
        if module not in reached and converts(module, patterns):
            missing.setdefault(module, module)
    if not missing:
        return [], None
    names = list(missing.values())
    shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return [
        f"{config_path}: llm_int8_skip_modules does not list {shown}: linear layer(s) this folder keeps "
        f"in 16 bit (no quant state), which transformers + bitsandbytes would replace with quantized "
        f"layers that find none (the load or the first forward fails); add "
        f"{', '.join(repr(n) for n in names)} to quantization_config.llm_int8_skip_modules (or reconvert "
        f"the folder)"
    ], None
