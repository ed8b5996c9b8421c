"""What a finished conversion holds besides its shards: config.json, the index, the provenance stamped
into both, and which of those files (and the copied extra files) a fresh run would write differently.

Shared by the pipeline (which writes them) and the preflight (which asks whether a finished output is
up to date), so neither imports the other.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection
from pathlib import Path

from converter.plan.tensor_plan import Plan, ShardPlan
from converter.sources import Source
from converter.writer.manifest import Manifest
from converter.writer.report import REPORT_NAME, read_report_tensors
from formats import bnb_compat, index, metadata
from formats.chunks import ChunkDigests
from formats.writer import ShardInfo


def provenance_of(src: Source, plan: Plan, shard: ShardPlan | None) -> dict:
    """The provenance of ``shard``'s metadata, or (None) of the index."""
    identity = plan.source_identity
    files = identity.get("files") or {}
    names = sorted({p.info.file for p in shard.tensors}) if shard else src.weight_files()
    return metadata.provenance(
        source=source_label(identity),
        files=[(f, (files.get(f) or {}).get("sha256")) for f in names],
        options=plan.options.to_json(),
        revision=identity.get("commit"),
    )


def weight_map_of(plan: Plan) -> dict[str, str]:
    """The index's weight_map: each stored tensor's shard."""
    weight_map: dict[str, str] = {}
    opts = plan.options
    for s in plan.shards:
        for p in s.tensors:
            if p.quantize:
                weight_map.update(dict.fromkeys(opts.method.layout(p, opts), s.name))
            else:
                weight_map[p.name] = s.name
    return weight_map


def _index_differs(
    src: Source, plan: Plan, output: Path, manifest: Manifest, rewritten: Collection[str] = ()
) -> bool:
    """Whether the index of the finished conversion in ``output`` is not the one a run writes (cut
    short, edited). Compared only where every shard has its recorded size (else the run resumes
    anyway, rewriting that shard and the index) and the manifest has its chunk digests (else making
    the index hashes the shards: a resume does that). The digests of the ``rewritten`` files (changed
    in the source, or edited in the output) are taken as the index records them: the run that rewrites
    them rewrites the index with their new digests, which is no fault of the index."""
    shards = []
    for s in plan.shards:
        entry = manifest.shards.get(s.name) or {}
        try:
            if (output / s.name).stat().st_size != entry["size"]:
                return False
            chunks = ChunkDigests.from_json(entry.get("chunks"), entry["size"], s.name)
            shards.append(ShardInfo(output / s.name, entry["sha256"], entry["size"], chunks))
        except (OSError, KeyError, TypeError, ValueError):
            return False
    try:
        prov = provenance_of(src, plan, None)
        old = (output / index.INDEX_NAME).read_bytes()
        # an index written before the files' digests were recorded is not rewritten for them alone
        recorded = json.loads(old)["metadata"]["quantize_model"].get("files")
        files = None
        if recorded is not None:
            files = recorded_files(src, plan, src.config(), output, skip=rewritten)
            for name in rewritten:
                if name in recorded:
                    files[name] = index.FileDigest(recorded[name]["sha256"], recorded[name]["size"])
        wm = weight_map_of(plan)
        text = index.index_text(output, shards, wm, prov, format_version=plan.format_version, files=files)
        return old != text.encode("utf-8")
    except (OSError, ValueError, struct.error, KeyError, TypeError):
        return True


#: The small JSON files beside the shards that loaders read and the index records the digests of, for
#: ``verify`` (docs/format.md section 6): config.json (ours), generation_config.json (copied).
RECORDED_FILES = ("config.json", "generation_config.json")


def recorded_files(
    src: Source, plan: Plan, config: dict | None, output: Path, *, skip: Collection[str] = ()
) -> dict[str, index.FileDigest]:
    """The digests the index records of ``RECORDED_FILES`` (but ``skip``): config.json's from the bytes
    the conversion writes (after the index), a file copied from the source from its copy in ``output``
    (written before the index)."""
    files = {}
    if "config.json" not in skip:
        files["config.json"] = index.FileDigest.of(config_bytes(plan, config))
    copied = set(src.extra_files())
    for name in RECORDED_FILES[1:]:
        if name in copied and copied_file(name) and name not in skip:
            files[name] = index.FileDigest.of((output / name).read_bytes())
    return files


def copied_file(name: str) -> bool:
    """Whether the source's extra file ``name`` is copied into the output as it is (the weights of a
    sentence-transformers module folder, ``2_Dense/model.safetensors``, too: not the model's)."""
    top_weights = name.endswith(".safetensors") and "/" not in name
    return name not in ("config.json", REPORT_NAME) and not top_weights


def config_bytes(plan: Plan, config: dict | None) -> bytes:
    """The output's config.json: the source's, with the quantization_config and dtype of ``plan``."""
    qconfig = plan.options.method.quantization_config(plan)
    out = bnb_compat.update_config(config or {}, qconfig, plan.model_dtype)
    return (json.dumps(out, indent=2, sort_keys=True) + "\n").encode()


def changed_files(src: Source, plan: Plan, output: Path) -> list[str]:
    """The files of a finished conversion in ``output`` that a fresh run would write differently:
    config.json when the source's changed, the index when damaged, a missing report, and the copied
    files (tokenizer, README, ...) that are not the source's (``Source.holds_extra_file``: a local
    source's bytes; a Hub source's listing, pinned by its commit), and those copied by the conversion
    but gone from the source since (``gone_files``). The plan's fingerprint covers the weights only, so
    without this a rerun after such an edit did nothing and left the old files.
    Empty unless ``output`` is finished."""
    manifest = Manifest.load(output)
    if manifest is None or manifest.state != "complete" or not (output / "config.json").is_file():
        return []  # not finished: a run writes every file anyway
    changed = []
    try:
        if (output / "config.json").read_bytes() != config_bytes(plan, src.config()):
            changed.append("config.json")
    except (OSError, ValueError):
        changed.append("config.json")
    # a report cut short or not JSON is rewritten (`verify --against` reads its statistics); its timings
    # differ from run to run, so it is not compared byte for byte as the other files are
    if read_report_tensors(output / REPORT_NAME) is None:
        changed.append(REPORT_NAME)
    copied = [n for n in src.extra_files() if copied_file(n) and not src.holds_extra_file(n, output / n)]
    if _index_differs(src, plan, output, manifest, rewritten=[*changed, *copied]):
        changed.insert(1 if changed[:1] == ["config.json"] else 0, index.INDEX_NAME)
    return changed + copied + gone_files(src, output, manifest)


def gone_files(src: Source, output: Path, manifest: Manifest) -> list[str]:
    """The files the conversion in ``output`` copied from the source (its manifest records them) that
    are no longer the source's extra files but still in ``output``: a fresh run would not write them."""
    now = {n for n in src.extra_files() if copied_file(n)}
    gone = []
    for name in manifest.copied:
        path = output / name
        inside = ".." not in Path(name).parts and not Path(name).is_absolute()
        if name not in now and inside and (path.is_file() or path.is_symlink()):
            gone.append(name)
    return sorted(gone)


def source_label(identity: dict) -> str:
    """How outputs name the source: ``repo_id@commit`` for the Hub and for a snapshot of the Hugging
    Face cache (a local path that is that repo at that commit), the folder name for another local path.

    Absolute local paths stay out of shards and index (they would leak into pushed repos and make
    the same checkpoint converted from two places differ).
    """
    if identity.get("kind") == "hub" or identity.get("repo_id"):
        commit = identity.get("commit")
        return f"{identity.get('repo_id')}@{commit}" if commit else str(identity.get("repo_id"))
    return str(identity.get("name") or Path(str(identity.get("path", "source"))).name)
