"""Generate ``converter/plan/selection_table.json`` from the installed transformers (needs torch +
transformers).

    python -m converter.plan.selection_table_gen            # add this transformers version to the table
    python -m converter.plan.selection_table_gen --replace  # a table for this transformers version alone

The table lists the transformers versions it is valid for. A run compares what it generated ("archs")
with the existing table file: the same content adds the installed version to the list (sorted, once)
and keeps the content; any difference (or a file in another table format, or not a table) is refused
with exit status 1, naming the architectures that differ, and the file is left as it was;
``--replace`` then writes the generated table for the installed version alone. A run that names
architectures compares those alone with the whole file, so it differs unless ``--replace`` (or
``--out`` a file that does not exist yet). No file yet: the generated table is written.

For every architecture in ``ARCHITECTURES`` it builds tiny meta-device skeletons with the live rule's
own code (``converter.plan.selection.build_skeleton`` + ``selection_facts.facts_from_model``) over every key
a checkpoint of the model may spell (the model's state dict, its save_pretrained spelling, buffers, and
both spellings of the base-model prefix), then:

1. finds the boolean config fields that change a decision (flip each one): they key the variants;
2. for each variant, raises every small integer field by one and records, for each ``#`` index of a
   generalized key (``selection_table.generalize``), which field moves its lowest and highest value
   (its bounds: ``num_hidden_layers - 1``, ``first_k_dense_replace``, ...);
3. keeps a key only if its facts are identical in every build and its indices form the product of
   contiguous ranges; a variant is dropped when a linear weight's key cannot be kept, when its
   default skip list or untouched Linear modules depend on the layer count (a model whose last
   parameter is the last layer's linear: "the last module"), so no entry ever needs a guess.

tests/selection/test_selection_table.py checks the shipped table against live transformers,
tests/selection/test_selection_table_gen.py that the installed (listed) version generates it exactly.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from converter.plan.selection_facts import ModelFacts, facts_from_model
from converter.plan.selection_table import TABLE_FORMAT, TABLE_NAME, generalize

#: The shape of a tiny decoder: hidden 64 (rows a multiple of the 64-element block), intermediate 96
#: (4-bit blocks of the down projection cross rows). The tests' tiny checkpoints use it too.
TINY_DECODER: dict[str, int] = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
)

_DECODER = dict(TINY_DECODER, max_position_embeddings=64, pad_token_id=0)

#: architecture class -> (model_type, tiny config kwargs). Counts (layers, experts) stay <= 8 and
#: distinct from each other where they bound an index, so a moved index names one field.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("llama", _DECODER),
    "MistralForCausalLM": ("mistral", _DECODER),
    "Qwen2ForCausalLM": ("qwen2", _DECODER),
    "Qwen3ForCausalLM": ("qwen3", _DECODER),
    "Qwen2MoeForCausalLM": (
        "qwen2_moe",
        dict(_DECODER, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=5,
             num_experts_per_tok=2, decoder_sparse_step=1),
    ),
    "Qwen3MoeForCausalLM": (
        "qwen3_moe",
        dict(_DECODER, moe_intermediate_size=32, num_experts=5, num_experts_per_tok=2, decoder_sparse_step=1),
    ),
    "MixtralForCausalLM": ("mixtral", dict(_DECODER, num_local_experts=5, num_experts_per_tok=2)),
    "GemmaForCausalLM": ("gemma", _DECODER),
    "Gemma2ForCausalLM": ("gemma2", _DECODER),
    "Gemma3ForCausalLM": ("gemma3_text", _DECODER),
    "Phi3ForCausalLM": ("phi3", _DECODER),
    "GraniteForCausalLM": ("granite", _DECODER),
    "SmolLM3ForCausalLM": ("smollm3", _DECODER),
    "OlmoForCausalLM": ("olmo", _DECODER),
    "Olmo2ForCausalLM": ("olmo2", _DECODER),
    "OlmoeForCausalLM": ("olmoe", dict(_DECODER, num_experts=5, num_experts_per_tok=2)),
    "GlmForCausalLM": ("glm", _DECODER),
    "Glm4ForCausalLM": ("glm4", _DECODER),
    "DeepseekV2ForCausalLM": (
        "deepseek_v2",
        dict(_DECODER, num_hidden_layers=3, moe_intermediate_size=32, n_routed_experts=5, n_shared_experts=1,
             num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=24,
             kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    ),
    "DeepseekV3ForCausalLM": (
        "deepseek_v3",
        dict(_DECODER, num_hidden_layers=3, moe_intermediate_size=32, n_routed_experts=5, n_shared_experts=1,
             num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=24,
             kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    ),
    "GPT2LMHeadModel": (
        "gpt2",
        dict(n_embd=64, n_inner=96, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
    ),
    "BertModel": (
        "bert",
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=128),
    ),
    "BertForMaskedLM": (
        "bert",
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=128),
    ),
    "T5ForConditionalGeneration": (
        "t5",
        dict(d_model=64, d_ff=96, d_kv=16, num_layers=2, num_decoder_layers=3, num_heads=4, vocab_size=128,
             decoder_start_token_id=0),
    ),
}  # fmt: skip

#: Fields never flipped or raised: they change outputs or bookkeeping, not modules.
_NOT_STRUCTURAL = frozenset(
    {
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "use_cache",
        "is_decoder",
        "chunk_size_feed_forward",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
        "sep_token_id",
    }
)
#: Integer fields up to this value are raised by one to find the bounds of the indices.
_SMALL_INT = 16


class Skip(Exception):
    """This architecture / variant cannot be tabled faithfully (it stays with the live rule)."""


def _build(config: dict) -> Any:
    from converter.plan.selection import build_skeleton, patch_for_bnb

    model = build_skeleton(config)
    patch_for_bnb(model)  # as the live rule builds it (Llama 4's per-expert experts)
    return model


def _universe(model: Any) -> list[str]:
    """Every key a checkpoint of this model may spell."""
    from transformers.core_model_loading import revert_weight_conversion

    sd = model.state_dict()
    keys = set(sd) | set(revert_weight_conversion(model, dict(sd))) | {n for n, _ in model.named_buffers()}
    prefix = model.base_model_prefix
    base = getattr(model, prefix, None) if prefix else None
    if base is not None and base is not model:
        keys |= {k[len(prefix) + 1 :] for k in keys if k.startswith(prefix + ".")}
    elif prefix:
        keys |= {f"{prefix}.{k}" for k in keys}
    return sorted(keys)


_CONFLICT = "conflict"


def _observe(config: dict) -> tuple[ModelFacts, dict[str, Any], dict[str, set[tuple[int, ...]]]]:
    """Facts of one build, generalized: template -> record (or _CONFLICT), template -> indices."""
    model = _build(config)
    facts = facts_from_model(model, _universe(model))
    records: dict[str, Any] = {}
    indices: dict[str, set[tuple[int, ...]]] = {}
    for key, kf in facts.keys.items():
        g, idx = generalize(key)
        rec = kf.to_json()
        rec.pop("shape", None)
        if kf.module:
            mg, midx = generalize(kf.module)
            rec["module"] = mg if midx == idx else None  # the module must carry the key's indices
        prev = records.get(g)
        if rec.get("module", "") is None or (prev is not None and prev != rec):
            rec = {_CONFLICT: True, "linear": kf.linear or bool(prev and prev.get("linear"))}
        records[g] = rec
        indices.setdefault(g, set()).add(idx)
    return facts, records, indices


def _summary(facts: ModelFacts) -> tuple:
    return (facts.cls_name, facts.prefix, facts.has_base, tuple(facts.defaults), tuple(facts.keep_in_fp32))


def _fields(config: dict, kind: type) -> list[str]:
    out = []
    for k, v in config.items():
        if k in _NOT_STRUCTURAL or k.startswith("_"):
            continue
        if kind is bool and isinstance(v, bool):
            out.append(k)
        elif kind is int and isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _SMALL_INT:
            out.append(k)
    return out


def _try_observe(config: dict) -> tuple | None:
    try:
        return _observe(config)
    except Exception:  # a config transformers refuses: that perturbation tells nothing
        return None


def _ranges(idx_set: set[tuple[int, ...]]) -> list[tuple[int, int]] | None:
    """Per position (min, max), if the set is exactly the product of those contiguous ranges."""
    n = len(next(iter(idx_set)))
    ranges = [(min(t[p] for t in idx_set), max(t[p] for t in idx_set)) for p in range(n)]
    size = 1
    for lo, hi in ranges:
        size *= hi - lo + 1
    return ranges if size == len(idx_set) else None


def _variant(config: dict) -> dict:
    """The table variant for one config (its boolean variant fields already set)."""
    try:
        base_facts, base_rec, base_idx = _observe(config)
    except Exception as exc:
        msg = f"transformers cannot build it ({type(exc).__name__}: {exc})"
        raise Skip(msg) from None
    if any(generalize(m)[1] for m in base_facts.extra_linear):
        msg = f"Linear modules no key reaches sit in numbered containers: {base_facts.extra_linear[:3]}"
        raise Skip(msg)
    perturbed: dict[str, tuple] = {}
    for name in _fields(config, int):
        cfg = copy.deepcopy(config)
        cfg[name] = config[name] + 1
        for k, v in config.items():  # per-layer lists (Gemma's layer_types): rebuilt by the config class
            if isinstance(v, list) and len(v) == config[name] and k != "architectures":
                cfg[k] = None
        got = _try_observe(cfg)
        if got is not None:
            perturbed[name] = got
    records: dict[str, dict] = {}
    bounds: dict[str, list] = {}
    for g, rec in base_rec.items():
        ok = _CONFLICT not in rec
        idx = base_idx[g]
        ranges = _ranges(idx) if ok and idx != {()} else []
        if ranges is None:
            ok = False
        spec: list = []
        if ok and ranges:
            lo_fields: list[list[str]] = [[] for _ in ranges]
            hi_fields: list[list[str]] = [[] for _ in ranges]
            for name, (_, p_rec, p_idx) in perturbed.items():
                if g not in p_rec:
                    continue
                if p_rec[g] != rec:
                    ok = False
                    break
                p_ranges = _ranges(p_idx[g])
                if p_ranges is None:
                    ok = False
                    break
                for p, ((lo, hi), (plo, phi)) in enumerate(zip(ranges, p_ranges, strict=True)):
                    for moved, fields in ((plo - lo, lo_fields[p]), (phi - hi, hi_fields[p])):
                        if moved == 1:
                            fields.append(name)
                        elif moved != 0:
                            ok = False
            if ok:
                for p, (lo, hi) in enumerate(ranges):
                    if len(lo_fields[p]) > 1 or len(hi_fields[p]) > 1:
                        ok = False
                        break
                    lo_spec = [lo_fields[p][0], lo - config[lo_fields[p][0]]] if lo_fields[p] else [None, lo]
                    hi_spec = [hi_fields[p][0], hi - config[hi_fields[p][0]]] if hi_fields[p] else [None, hi]
                    spec.append([lo_spec, hi_spec])
        elif ok:
            for _, p_rec, _ in perturbed.values():
                if g in p_rec and p_rec[g] != rec:
                    ok = False
        if not ok:
            if rec.get("linear"):
                msg = f"linear weight {g} cannot be tabled (its facts depend on the config)"
                raise Skip(msg)
            continue
        records[g] = rec
        if spec:
            bounds[g] = spec
    for name, (p_facts, _, _) in perturbed.items():
        if _summary(p_facts) != _summary(base_facts) or p_facts.extra_linear != base_facts.extra_linear:
            msg = f"the default skip list changes with {name}"
            raise Skip(msg)
    linear_modules: dict[str, list] = {}
    for g, rec in records.items():
        if rec.get("linear") and g in bounds:
            prev = linear_modules.setdefault(rec["module"], bounds[g])
            if prev != bounds[g]:
                msg = f"{rec['module']}: two spellings with different bounds"
                raise Skip(msg)
    return {
        "keys": records,
        "bounds": bounds,
        "linear_modules": linear_modules,
        "linear_fixed": sorted(
            {rec["module"] for rec in records.values() if rec.get("linear") and "#" not in rec["module"]}
            | set(base_facts.extra_linear)
        ),
        "defaults": list(base_facts.defaults),
        "_facts": base_facts,
        "_fields": sorted({f[0] for s in bounds.values() for lo_hi in s for f in lo_hi if f[0]}),
    }


def _diff(a: dict, b: dict) -> bool:
    """Whether two generalized builds decide some common key differently (or skip differently)."""
    _, ra, _ = a
    _, rb, _ = b
    return any(ra[g] != rb[g] for g in set(ra) & set(rb)) or _summary(a[0]) != _summary(b[0])


def table_entry(cls_name: str, model_type: str, kwargs: dict[str, Any]) -> dict:
    import transformers

    cfg_obj = transformers.AutoConfig.for_model(model_type, **kwargs)
    config = cfg_obj.to_dict()
    config["architectures"] = [cls_name]
    try:
        base = _observe(config)
    except Exception as exc:
        msg = f"transformers cannot build it ({type(exc).__name__}: {exc})"
        raise Skip(msg) from None
    variant_fields = []
    for name in _fields(config, bool):
        flipped = copy.deepcopy(config)
        flipped[name] = not config[name]
        got = _try_observe(flipped)
        if got is not None and _diff(base, got):
            variant_fields.append(name)
    if len(variant_fields) > 3:
        msg = f"too many deciding boolean fields: {variant_fields}"
        raise Skip(msg)
    variants: dict[str, dict] = {}
    read_fields: set[str] = set(variant_fields)
    first = None
    for combo in range(2 ** len(variant_fields)):
        values = [bool(combo >> i & 1) for i in range(len(variant_fields))]
        cfg = copy.deepcopy(config)
        cfg.update(zip(variant_fields, values, strict=True))
        try:
            v = _variant(cfg)
        except Skip as exc:
            print(
                f"  {cls_name} {dict(zip(variant_fields, values, strict=True))}: not tabled ({exc})",
                file=sys.stderr,
            )
            continue
        first = first or v["_facts"]
        read_fields |= set(v.pop("_fields"))
        v.pop("_facts")
        variants[json.dumps(values)] = v
    if not variants or first is None:
        msg = "no variant could be tabled"
        raise Skip(msg)
    cfg_cls = type(cfg_obj)
    try:
        defaults_obj = cfg_cls().to_dict()
    except Exception:
        defaults_obj = {}
    return {
        "model_type": model_type,
        "cls_name": first.cls_name,
        "prefix": first.prefix,
        "has_base": first.has_base,
        "keep_in_fp32": list(first.keep_in_fp32),
        "matcher": first.matcher,
        "variant_fields": variant_fields,
        "field_defaults": {f: defaults_obj.get(f) for f in sorted(read_fields)},
        "aliases": {
            a: t for a, t in sorted((getattr(cfg_cls, "attribute_map", {}) or {}).items()) if t in read_fields
        },
        "variants": variants,
    }


def generate(archs: Iterable[str] | None = None) -> dict:
    import transformers

    from converter.plan.selection import _quiet_transformers

    out: dict[str, Any] = {"format": TABLE_FORMAT, "transformers": [transformers.__version__], "archs": {}}
    with _quiet_transformers():
        for cls_name in archs or ARCHITECTURES:
            model_type, kwargs = ARCHITECTURES[cls_name]
            if not hasattr(transformers, cls_name):
                print(f"  {cls_name}: not in transformers {transformers.__version__}", file=sys.stderr)
                continue
            try:
                out["archs"][cls_name] = entry = table_entry(cls_name, model_type, kwargs)
                print(
                    f"  {cls_name}: variants {entry['variant_fields']} {list(entry['variants'])}",
                    file=sys.stderr,
                )
            except Skip as exc:
                print(f"  {cls_name}: not tabled ({exc})", file=sys.stderr)
    return out


class TableDiffers(Exception):
    """The generated table's content is not the existing file's: nothing is written."""


def _version_key(version: str) -> Any:
    from packaging.version import InvalidVersion, Version

    try:
        return (0, Version(version), version)
    except InvalidVersion:
        return (1, version, version)


def _names(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def merge(existing: dict | None, generated: dict, where: str = TABLE_NAME) -> dict:
    """The table to write: ``generated`` when there is no existing table, else the existing one with
    the generated version added to its list, if both hold the same "archs". TableDiffers otherwise."""
    (version,) = generated["transformers"]
    if existing is None:
        return generated
    if existing.get("format") != TABLE_FORMAT or not isinstance(existing.get("transformers"), list):
        msg = (
            f"{where} is in table format {existing.get('format')!r}, this generator writes {TABLE_FORMAT}: "
            f"nothing written; --replace writes a table for transformers {version} alone"
        )
        raise TableDiffers(msg)
    old, new = existing.get("archs", {}), generated["archs"]
    changed = sorted(a for a in set(old) & set(new) if old[a] != new[a])
    only_old, only_new = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    if changed or only_old or only_new:
        listed = ", ".join(existing["transformers"]) or "no version"
        parts = [f"{len(changed)} decided differently ({_names(changed)})"] if changed else []
        if only_old:
            parts.append(f"{len(only_old)} only in the file ({_names(only_old)})")
        if only_new:
            parts.append(f"{len(only_new)} only in the generated table ({_names(only_new)})")
        n = len(changed) + len(only_old) + len(only_new)
        msg = (
            f"the table generated under transformers {version} differs from {where} (transformers "
            f"{listed}) in {n} of {len(set(old) | set(new))} architectures: {'; '.join(parts)}. "
            f"Nothing written. To replace the file with a table for transformers {version} alone "
            "(the listed versions then use the live rule): python -m converter.plan.selection_table_gen "
            "--replace"
        )
        raise TableDiffers(msg)
    versions = sorted(set(existing["transformers"]) | {version}, key=_version_key)
    return {**existing, "transformers": versions}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name(TABLE_NAME))
    parser.add_argument(
        "--replace",
        action="store_true",
        help="write the generated table for the installed transformers version alone, even where it "
        "differs from the existing file (default: add the version if the content is the same, else refuse)",
    )
    parser.add_argument("archs", nargs="*", help="architecture classes (default: all of ARCHITECTURES)")
    args = parser.parse_args(argv)
    table = generate(args.archs or None)
    existing = None
    if not args.replace and args.out.exists():
        try:
            existing = json.loads(args.out.read_text(encoding="utf-8"))
        except ValueError as exc:
            sys.exit(f"{args.out}: not a table ({exc}); --replace overwrites it")
        if not isinstance(existing, dict):
            sys.exit(f"{args.out}: not a table; --replace overwrites it")
    try:
        table = merge(existing, table, str(args.out))
    except TableDiffers as exc:
        sys.exit(f"error: {exc}")
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(
        f"{args.out}: {len(table['archs'])} architectures for transformers {', '.join(table['transformers'])}"
    )


if __name__ == "__main__":
    main()
