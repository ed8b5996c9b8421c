"""Upload a finished quantized folder to the Hugging Face Hub, with a model card.

``push_folder`` creates the repo if needed (``create_repo(exist_ok=True)``), uploads the folder with
``upload_folder`` (huggingface_hub 1.x/2.x dropped ``upload_large_folder``; ``upload_folder`` is the
resumable path: with hf_xet it commits in batches and skips files already committed, over plain LFS
the batch endpoint skips objects already uploaded), then commits the model card ``README.md`` last,
so a repo with our card is a complete upload (a different card already there is deleted in the
weights' commit). Rerunning after an interruption uploads only what is
missing. The local folder is not modified.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from converter.errors import CorruptFileError, InputError
from converter.methods import get_method
from converter.units import first_of, human_bytes, human_count

MANIFEST_NAME = ".quantize-model-manifest.json"
REPORT_NAME = "quantization_report.json"
#: Never uploaded: our resume manifest, hidden/temporary files, the source's own card (replaced).
IGNORE_PATTERNS = [MANIFEST_NAME, ".*", "**/.*", "*.tmp", "README.md"]
#: Remote files a push replaces wholesale: any of them the folder lacks is deleted in the same commit.
STALE_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth",
    "quantization_report.json",
]  # fmt: skip
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "USE_POLICY")
#: huggingface_hub's loggers that warn of a commit with nothing in it (a rerun of a finished push)
_COMMIT_LOGGERS = ("huggingface_hub.hf_api", "huggingface_hub._upload_pipeline")
_EMPTY_COMMIT = "No files have been modified since last commit"


def _not_an_empty_commit_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_EMPTY_COMMIT)


@contextmanager
def _quiet_empty_commits() -> Iterator[None]:
    """Drop huggingface_hub's "No files have been modified since last commit. Skipping to prevent empty
    commit." while pushing: a rerun of a finished push (how a push resumes) finds every file and the
    card already there, which is no problem; it was printed twice, with -q too."""
    loggers = [logging.getLogger(name) for name in _COMMIT_LOGGERS]
    for logger in loggers:
        logger.addFilter(_not_an_empty_commit_notice)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_not_an_empty_commit_notice)


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_repo_id(repo_id: str) -> None:
    """A repo id the Hub accepts ('owner/name', or 'name' in the token's namespace), or an InputError:
    checked before any work, so a typo in --push-to is not found after a long conversion, as a network
    error."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        msg = f"{repo_id!r}: not a Hub repo id to push to ({str(exc).splitlines()[0]})"
        raise InputError(msg) from None


def check_online(repo_id: str) -> None:
    """An InputError when HF_HUB_OFFLINE=1 forbids the upload: found before a conversion whose result
    would be pushed, not after it."""
    from huggingface_hub import constants

    from converter.sources.hub_client import OFFLINE_PUSH

    if constants.is_offline_mode():
        msg = f"{repo_id}: {OFFLINE_PUSH}"
        raise InputError(msg)


def check_token(repo_id: str) -> None:
    """A HubAccessError when no token is set (HF_TOKEN, ``hf auth login``): the Hub refuses every upload
    without one, so a conversion whose result would be pushed is refused before it starts, not after it."""
    from huggingface_hub import get_token

    from converter.sources.hub_client import HubAccessError

    if not get_token():
        msg = (
            f"{repo_id}: no Hugging Face token is set and a push needs one; run `hf auth login` or set "
            "HF_TOKEN (a token with write access)"
        )
        raise HubAccessError(msg)


def check_folder(folder: Path) -> None:
    """Refuse anything but a finished, intact conversion (index + config present and readable, the
    manifest, where there is one, readable and complete, every shard present and matching the index's
    digests): a pushed repo gets its model card last, as the mark of a complete upload, so it must not
    be a damaged folder."""
    if not folder.is_dir():
        msg = f"{folder}: no such folder; give the OUTPUT folder of a finished `quantize-model convert`"
        raise InputError(msg)
    from converter.writer.manifest import damaged_manifest

    damaged = damaged_manifest(folder)  # verify's problem and remedy: never pushed, but it says "broken"
    if damaged is not None:
        raise CorruptFileError(damaged)
    manifest = _load_json(folder / MANIFEST_NAME)
    if manifest and manifest.get("state") != "complete":
        msg = (
            f"{folder}: the conversion is not finished; "
            "rerun the same `quantize-model convert` to complete it"
        )
        raise InputError(msg)
    if not (folder / "model.safetensors.index.json").is_file() or not (folder / "config.json").is_file():
        msg = (
            f"{folder}: not a quantize-model output (no model.safetensors.index.json or config.json); "
            "push the folder `quantize-model convert` wrote"
        )
        raise InputError(msg)
    from converter.loader.config_file import read_config
    from formats.index import verify_shards

    problems = verify_shards(folder)  # the recorded chunk digests: xxh3_128, on all cores
    try:
        read_config(folder)
    except CorruptFileError as exc:
        problems.append(str(exc).split("; ", 1)[0])
    if problems:
        msg = (
            f"{first_of(problems)}; the folder is not pushed: run `quantize-model verify {folder}`, "
            "then reconvert it"
        )
        raise CorruptFileError(msg)
    unlisted = _unlisted_shards(folder)
    if unlisted:
        msg = f"{first_of(unlisted)}; the folder is not pushed: remove it, then push again"
        raise InputError(msg)


def _unlisted_shards(folder: Path) -> list[str]:
    """The ``*.safetensors`` files of the folder its index does not list (an older conversion's shards
    left by a copy over it, a stray file), as ``verify`` reports them: uploaded, they sat in the repo
    beside the index's shards, and loaders that glob ``*.safetensors`` (vLLM) read both."""
    from formats import index as index_mod

    try:
        listed = set(index_mod.read_index(folder, require_files=False).files)
    except Exception:  # a damaged index is verify_shards' problem
        return []
    return [
        f"{p}: a shard the index does not list (loaders that glob *.safetensors would read it)"
        for p in sorted(folder.glob("*.safetensors"))
        if p.name not in listed
    ]


def _source_card_metadata(folder: Path) -> dict[str, Any]:
    """YAML front matter of the source's README.md, which convert copies into the output."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub.repocard import metadata_load

        return metadata_load(readme) or {}
    except Exception:  # a malformed source card must not block the push
        return {}


def hub_origin(folder: Path, source: dict[str, Any]) -> tuple[str | None, str | None]:
    """(repo id, commit) of the Hub repo ``folder`` was converted from, as its report's ``source`` records
    it: a Hub source, or a snapshot of the Hugging Face cache (``…/models--org--name/snapshots/<commit>``,
    a local path). A folder converted from such a snapshot before it was recorded so has only the
    snapshot's path, in its manifest: read from that. (None, None) for any other local source."""
    repo_id = source.get("repo_id")
    if isinstance(repo_id, str) and repo_id:
        commit = source.get("commit")
        return repo_id, commit if isinstance(commit, str) else None
    if source.get("kind") != "local":
        return None, None
    from converter.sources.local import hub_cache_snapshot

    recorded = (_load_json(folder / MANIFEST_NAME).get("plan") or {}).get("source")
    path = recorded.get("path") if isinstance(recorded, dict) else None
    snapshot = hub_cache_snapshot(path) if isinstance(path, str) else None
    if snapshot is None or snapshot[1] != source.get("name"):  # the manifest of another conversion
        return None, None
    return snapshot


def license_fields(folder: Path, source_meta: dict[str, Any]) -> dict[str, Any]:
    """license / license_name / license_link taken from the source card, else from a LICENSE file."""
    out = {k: source_meta[k] for k in ("license", "license_name", "license_link") if source_meta.get(k)}
    if out.get("license"):
        return out
    files = sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.name.upper().startswith(LICENSE_PREFIXES)
    )
    if files:
        return {"license": "other", "license_name": "see-license-file", "license_link": files[0]}
    return {}


def build_model_card(folder: Path, repo_id: str, revision: str | None = None) -> str:
    """The README.md for the pushed repo: metadata, quantization settings, how to load it (from
    ``revision``, the branch pushed to, where it is not main: the snippets name it)."""
    rev = f", revision={json.dumps(revision)}" if revision and revision != "main" else ""
    from huggingface_hub import ModelCardData

    report = _load_json(folder / REPORT_NAME)
    config = _load_json(folder / "config.json")
    qconfig = config.get("quantization_config") or {}
    source = report.get("source") or {}
    options = report.get("options") or {}
    summary = report.get("summary") or {}
    method = get_method(str(options.get("quant_type") or qconfig.get("bnb_4bit_quant_type") or "nf4"))
    tags, headline, rows = method.card(qconfig, options)
    base_model, commit = hub_origin(folder, source)
    source_meta = _source_card_metadata(folder)

    card = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        tags=[*tags, "quantize-model"],
        **license_fields(folder, source_meta),
    )
    meta = card.to_dict()
    if base_model:
        meta["base_model_relation"] = "quantized"
    for key in ("pipeline_tag", "language"):
        if source_meta.get(key):
            meta[key] = source_meta[key]
    import yaml  # huggingface_hub's ModelCardData needs PyYAML, so it is installed with it

    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()

    if base_model:
        origin = f"[{base_model}](https://huggingface.co/{base_model})" + (
            f" (commit `{commit}`)" if commit else ""
        )
    else:
        origin = f"the local checkpoint `{source.get('name') or source.get('path') or 'unknown'}`"
    skipped = qconfig.get("llm_int8_skip_modules") or []
    if skipped:
        rows.append(("Modules kept in 16 bit", ", ".join(f"`{m}`" for m in skipped)))
    if summary:
        total = summary.get("params_total") or 0
        rows.append(
            (
                "Parameters",
                f"{human_count(total)} ({100 * (1 - summary.get('kept_share', 0)):.1f}% quantized)",
            )
        )
        rows.append(
            (
                "Bits per parameter",
                f"{summary.get('bits_per_param', 0):.2f} (whole checkpoint, kept tensors included)",
            )
        )
        rows.append(
            (
                "Size",
                f"{human_bytes(summary.get('bytes_out', 0))} (from {human_bytes(summary.get('bytes_in', 0))})",  # noqa: E501
            )
        )
    moe_summary = _moe_summary(folder, qconfig, config.get("model_type"))
    if moe_summary is not None:
        rows.append(("MoE experts", moe_summary.layout))
    table = "\n".join(["| Setting | Value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    name = repo_id.rsplit("/", 1)[-1]
    loader, remote_code = transformers_loader(config)
    # load_quantized reads it, unless the MoE summary says it cannot (LLM.int8 experts, mixed layers)
    ours = (
        f"""
## Load with quantize-model

```python
from converter import load_quantized

model = load_quantized("{repo_id}"{rev})
```
"""
        if moe_summary is None
        or any(x.startswith("quantize-model load_quantized") for x in moe_summary.loaders)
        else ""
    )
    if moe_summary is not None and moe_summary.tensors_quantized:
        snippet = f'{loader}.from_pretrained("{repo_id}"{rev}, device_map="auto"{remote_code})'
        return _moe_card(
            front, name, method.name, origin, table, repo_id, moe_summary, revision, (loader, snippet)
        )
    return f"""---
{front}
---

# {name}

{headline} quantization of {origin}, made with quantize-model (offline
pre-quantization; the shards are bitsandbytes' serialized layout, so transformers + bitsandbytes
load them unchanged).

## Quantization

{table}

## Load with transformers (needs `bitsandbytes`)

```python
from transformers import {loader}

model = {loader}.from_pretrained("{repo_id}"{rev}, device_map="auto"{remote_code})
```

The `quantization_config` in `config.json` tells transformers the weights are already quantized.
{ours}"""


def transformers_loader(config: dict[str, Any]) -> tuple[str, str]:
    """The transformers class the card's snippet loads the folder with, and the extra argument it needs:
    ``AutoModelForCausalLM`` for a causal LM (and a config that names no architecture), else the class
    ``architectures`` names (``BertModel``, ``T5ForConditionalGeneration``, ``WhisperFor...``), which
    ``AutoModelForCausalLM`` refuses ("Unrecognized configuration class"); repository code: the Auto
    class its ``auto_map`` maps to that class, with ``trust_remote_code=True``."""
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch is None or not arch.isidentifier():
        return "AutoModelForCausalLM", ""
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict):
        for auto, ref in auto_map.items():
            ref = ref[0] if isinstance(ref, list) and ref else ref
            if isinstance(ref, str) and ref.rsplit(".", 1)[-1] == arch and str(auto).startswith("AutoModel"):
                return str(auto), ", trust_remote_code=True"
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "AutoModelForCausalLM", ""
    return arch, ""


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | bool | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    attempts: int = 5,
) -> str:
    """Upload ``folder`` (a finished conversion) to ``repo_id``; returns the repo URL.

    Raises converter.errors exceptions: InputError for a folder that is not a finished conversion,
    HubAccessError (exit 2) for missing or read-only credentials, HubDownloadError (exit 1) when
    the Hub keeps failing; rerun to resume.
    """
    from huggingface_hub import CommitOperationAdd

    from converter.sources.hub_client import HubClient

    check_repo_id(repo_id)
    folder = Path(folder).expanduser().resolve()
    check_folder(folder)
    card = build_model_card(folder, repo_id, revision)
    client = HubClient(repo_id, token=token, endpoint=endpoint, write=True, attempts=attempts)
    client.revision = revision or "main"
    api = client.api
    url = client.call("create repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    if revision and revision != "main":
        client.call("create branch", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
    message = commit_message or f"Upload {folder.name} (quantize-model)"
    # The card is the mark of a complete upload: a card of other weights (an earlier push) goes in the
    # weights' commit, so a push cut off before its own card leaves no card rather than a wrong one.
    stale = [] if _remote_card_is(client, revision, card) else ["README.md"]
    with _quiet_empty_commits():
        client.call(
            "upload",
            lambda: api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                ignore_patterns=list(IGNORE_PATTERNS),
                # weights of an earlier push that this folder does not have (a single model.safetensors
                # replaced by shards, or fewer shards) would stay beside the new index: loaders that glob
                # *.safetensors, and a folder without an index, would read the old model
                delete_patterns=[*STALE_PATTERNS, *stale],
                commit_message=message,
            ),
        )
        client.call(
            "model card upload",
            lambda: api.create_commit(
                repo_id,
                operations=[CommitOperationAdd("README.md", card.encode())],
                revision=revision,
                commit_message="Add model card (quantize-model)",
            ),
        )
    return str(url)


def _remote_card_is(client: Any, revision: str | None, card: str) -> bool:
    """Whether the repo's README.md (at ``revision``) already holds ``card``, by its git blob id."""
    import hashlib

    data = card.encode()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
    infos = client.call(
        "model card check",
        lambda: client.api.get_paths_info(client.repo_id, ["README.md"], revision=revision),
    )
    return any(getattr(i, "path", None) == "README.md" and getattr(i, "blob_id", None) == blob for i in infos)


def _moe_summary(folder: Path, qconfig: dict[str, Any], model_type: str | None = None) -> Any:
    """MoE experts quantized or kept, from the index's key names (None for a dense model); their
    quant type and storage, which decide whether vLLM reads them, from ``qconfig``; ``model_type``:
    config.json's (whether transformers 4.x has the model class)."""
    from converter.plan import moe
    from formats.validate import SCB_SUFFIX

    formats = (
        {(str(qconfig.get("bnb_4bit_quant_type")), str(qconfig.get("bnb_4bit_quant_storage") or "uint8"))}
        if qconfig.get("load_in_4bit")
        else {("int8", "int8")}
        if qconfig.get("load_in_8bit")
        else set()
    )
    keys = list(_load_json(folder / "model.safetensors.index.json").get("weight_map") or {})
    if not keys:
        from formats.reader import open_folder

        try:  # from the headers: every tensor read whole called the 4-bit records (they have a dtype
            # too) kept, and the folder a source checkpoint
            with open_folder(folder) as ckpt:
                quantized, kept = ckpt.quantized, ckpt.passthrough
                fused = [k for k in [*quantized, *kept] if moe.FUSED_EXPERT_KEY.match(k)]
                shapes = {
                    k: tuple((ckpt.record(k) if k in quantized else ckpt.entry(k)).shape) for k in fused
                }
        except Exception:  # an unreadable folder: check_folder reports it
            return None
        others = _other_experts(folder, kept)
        return moe.summarize(quantized, kept, (), formats, shapes, others, model_type)
    # a quantized weight's companion: 4-bit ``<m>.weight.absmax``, LLM.int8 ``<m>.SCB``
    weights = {k.removesuffix(".absmax") for k in keys if k.endswith(".absmax")} | {
        k.removesuffix(SCB_SUFFIX) + "weight" for k in keys if k.split(".")[-1] == SCB_SUFFIX
    }
    fused = [k for k in keys if moe.FUSED_EXPERT_KEY.match(k)]
    shapes: dict[str, tuple[int, ...]] = {}
    if fused:  # their number of experts: the first dimension (a 4-bit record's from its quant state)
        from formats.reader import open_folder

        try:
            with open_folder(folder) as ckpt:
                shapes = {k: (ckpt.record(k) if k in weights else ckpt.entry(k)).shape for k in fused}
        except Exception:  # an unreadable folder: check_folder reports it
            return None
    kept = [k for k in keys if k not in weights]
    others = _other_experts(folder, kept)
    return moe.summarize(sorted(weights), kept, (), formats, shapes, others, model_type)


def _other_experts(folder: Path, kept: list[str]) -> list[Any]:
    """The kept tensors that are experts of a layout quantize-model does not quantize (Granite-MoE's,
    Granite 4.0-H's, JetMoE's fused ``input_linear`` / ``output_linear``, DBRX's ``ffn.experts.mlp.*``),
    as ``inspect`` and ``convert`` name them: their dtypes and shapes from the shard headers, read only
    where a kept name may be one; [] for an unreadable folder (check_folder reports it)."""
    from converter.plan import moe

    names = [k for k in kept if moe.may_be_other_expert(k)]
    if not names:
        return []
    from formats.reader import open_folder

    try:
        with open_folder(folder) as ckpt:
            entries = {k: ckpt.entry(k) for k in names}
    except Exception:
        return []
    return moe.other_experts([moe.HeaderTensor(k, e.dtype, tuple(e.shape)) for k, e in entries.items()])


def _moe_card(
    front: str,
    name: str,
    quant_type: str,
    origin: str,
    table: str,
    repo_id: str,
    summary: Any,
    revision: str | None = None,
    transformers_call: tuple[str, str] = ("AutoModelForCausalLM", ""),
) -> str:
    """The card of a folder whose MoE experts are quantized (4-bit, or LLM.int8 as transformers 4.x +
    bitsandbytes saved them): stock transformers 5.x cannot load it, but for Llama 4, whose experts
    transformers builds per expert (``transformers_call``: the class and the call of its snippet)."""
    loaders = "\n".join(f"- {x}" for x in summary.loaders) or "- none known"
    not_loaders = (
        "\n\nNot:\n\n" + "\n".join(f"- {x}" for x in summary.not_loaders) if summary.not_loaders else ""
    )
    int8 = "int8" in summary.expert_types
    bits, layer = ("8", "Linear8bitLt") if int8 else ("4", "Linear4bit")
    experts = (
        f"**with every routed MoE expert in {bits} bit**"
        if not summary.tensors_kept
        else f"**with {summary.experts_quantized} routed MoE experts in {bits} bit"
        + (f", {summary.experts_partly} partly" if summary.experts_partly else "")
        + f" and {summary.experts_kept} kept 16-bit**"
    )
    records = (
        "one fused bitsandbytes 4-bit record per layer and projection (`experts.gate_up_proj [E, 2I, H]`, "
        "`experts.down_proj [E, H, I]`), under the checkpoint's own names"
        if summary.fused
        else "one bitsandbytes `Linear4bit` record per expert per projection under unsloth's gpt-oss names "
        "(`experts.gate_up_projs.<e>.weight [2I, H]`, gate/up rows interleaved, and "
        "`experts.down_projs.<e>.weight [H, I]`), their biases 16-bit"
        if any("gate_up_projs" in x for x in summary.loaders)
        else f"one bitsandbytes `{layer}` record per quantized expert per projection, under the "
        "checkpoint's own names"
    )
    branch = revision if revision and revision != "main" else None
    rev = f", revision={json.dumps(branch)}" if branch else ""
    cli_rev = f" --revision {branch}" if branch else ""
    stock = ""
    if any(x.startswith("stock transformers") for x in summary.loaders):  # Llama 4's per-expert records
        cls, call = transformers_call
        stock = f"""
## Load with transformers (needs `bitsandbytes`)

```python
from transformers import {cls}

model = {call}
```
"""
    if int8:  # load_quantized refuses LLM.int8 experts (converter.loader.moe_records)
        ours = f"""## Use with quantize-model

`load_quantized` does not run LLM.int8 experts: `quantize-model dequantize {repo_id} OUT{cli_rev}` writes
the 16-bit checkpoint, which transformers loads."""
    else:
        ours = f"""## Load with quantize-model

```python
from converter import load_quantized

model = load_quantized("{repo_id}"{rev})
```"""
    return f"""---
{front}
---

# {name}

{quant_type.upper()} {bits}-bit quantization of {origin}, made with quantize-model, {experts}: {records};
routers stay 16-bit (`llm_int8_skip_modules`).

## Quantization

{table}

## Which loaders read this folder

{loaders}{not_loaders}
{stock}
{ours}
"""
