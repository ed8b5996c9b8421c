"""What the pipeline needs from a checkpoint source (a local folder or a Hub repo).

A source lists its tensors from the safetensors headers alone, then hands out one whole weight
file at a time (``acquire``) and is told when the pipeline is done with it (``release``), so a Hub
source can download file k+1 while file k is quantized and delete consumed files.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.sources.fp8_layout import block_fp8_problem, block_size

#: safetensors dtype codes the converter reads (as written in a safetensors header).
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})
#: Float dtypes that can be quantized to 4 bit (the kernels take f32, f16, bf16).
QUANTIZABLE_DTYPES = frozenset({"F32", "F16", "BF16"})
#: dtypes that only appear in already-quantized checkpoints.
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4"})

#: safetensors code -> torch dtype name (the model dtype written to config.json).
CODE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
#: Bytes per element of each safetensors dtype code.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a source checkpoint, as its safetensors header describes it."""

    name: str
    file: str  # weight file name, relative to the source root
    dtype: str  # safetensors dtype code: "BF16", "F32", "I64", ...
    shape: tuple[int, ...]
    #: Bytes on disk when they differ from ``dtype`` x ``shape``: a source that decodes on read (block
    #: FP8, seen as BF16) gives its codes plus their scales here.
    stored_nbytes: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """The tensor's bytes in the source's files (what reading it costs)."""
        if self.stored_nbytes is not None:
            return self.stored_nbytes
        return self.numel * DTYPE_SIZES.get(self.dtype, 1)


class Source(ABC):
    """A checkpoint to convert. Implementations: LocalSource (sources/local.py), HubSource (sources/hub.py).

    Construction validates what can be validated from headers and config (missing files, corrupt
    headers, already-quantized or pickle-only checkpoints) and raises converter.errors exceptions.
    """

    @abstractmethod
    def describe(self) -> dict:
        """Provenance: {"kind": "local"|"hub", "path" or "repo_id", "revision", "commit", ...}.

        Must identify the source's content well enough for resume: a Hub commit sha, or for a
        local folder the file sizes, mtimes and a hash of the headers. JSON-serialisable.
        """

    @abstractmethod
    def config(self) -> dict | None:
        """The parsed config.json, or None when the source has none."""

    @abstractmethod
    def tensors(self) -> list[TensorInfo]:
        """Every tensor of every weight file, from the safetensors headers only, in processing order."""

    @abstractmethod
    def weight_files(self) -> list[str]:
        """Relative weight file names, in processing order."""

    @abstractmethod
    def acquire(self, file: str) -> Path:
        """A local path to the whole file (Hub: waits for its download and prefetches the next)."""

    def open_file(self, file: str) -> Any:
        """The tensors of ``file`` as an object with ``.get_array(name)`` (numpy array, dtype code),
        ``.get(name)`` (torch tensor) and ``.prefetch(name)``.

        Default: acquire the whole file and memory-map it. A source that can read tensor by tensor
        (the Hub, for a file larger than the disk budget) overrides this. Pair with ``release``.
        """
        from converter.sources.mapped import MappedFile

        return MappedFile(self.acquire(file), file)

    @abstractmethod
    def release(self, file: str) -> None:
        """The pipeline is finished with ``file`` (Hub: delete the private download unless kept)."""

    @abstractmethod
    def extra_files(self) -> list[str]:
        """Non-weight files to copy: tokenizer, generation config, licence, README... (relative names)."""

    @abstractmethod
    def copy_extra_file(self, name: str, dest: Path) -> None:
        """Copy the extra file ``name`` to the path ``dest``."""

    def holds_extra_file(self, name: str, path: Path) -> bool:
        """Whether ``path`` holds the extra file ``name`` as ``copy_extra_file`` writes it (a rerun
        checks a finished output's copies so). By default: that it is there."""
        return path.is_file()

    @abstractmethod
    def close(self) -> None:
        """Release everything (threads, temp downloads). Safe to call twice."""

    def notes(self) -> list[str]:
        """What the user should know about how the weights were chosen (the pipeline warns each)."""
        return []

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Non-weight files worth copying next to the quantized shards (matched on the base name).
EXTRA_FILE_NAMES = frozenset(
    {
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        # other tokenizers' vocabulary files (VOCAB_FILES_NAMES of transformers' tokenizer classes)
        "spm.model",  # DeBERTa-v2/v3: often the only tokenizer file
        "sentencepiece.model",
        "spm_char.model",
        "source.spm",  # Marian
        "target.spm",
        "target_vocab.json",
        "vocab-src.json",
        "vocab-tgt.json",
        "normalizer.json",  # Whisper
        "bpe.codes",
        "dict.txt",
        "entity_vocab.json",
        "emoji.json",
        "byte_maps.json",
        "word_shape.json",
        "word_pronunciation.json",
        "prophetnet.tokenizer",
        "tekken.json",  # Mistral (mistral-common tokenizer)
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "audio_tokenizer_config.json",
        "processor_config.json",
        "chat_template.json",
        "chat_template.jinja",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "README.md",
        "LICENSE",
        "LICENSE.txt",
        "LICENSE.md",
        "NOTICE",
        "USE_POLICY.md",
    }
)


def is_extra_file(relname: str) -> bool:
    """Whether a source file (relative name, '/'-separated) is copied to the output as is."""
    base = relname.rsplit("/", 1)[-1]
    if "/" in relname:
        # sentence-transformers module folders: their configs (1_Pooling/config.json) and weights
        # (2_Dense/model.safetensors, which sentence-transformers loads the Dense layer from: without
        # it the output's modules.json named a module it could not load)
        top = relname.split("/", 1)[0]
        return top[:1].isdigit() and "_" in top and relname.endswith((".json", ".safetensors"))
    # *.py: a repository's own model code (config.json "auto_map"), which transformers needs with
    # trust_remote_code=True to load the output; copied, never run
    return base in EXTRA_FILE_NAMES or base.startswith("LICENSE") or base.endswith(".py")


def quantized_reason(config: dict | None, tensors: list[TensorInfo]) -> str | None:
    """Why a source looks already quantized, or None. Shared by every Source implementation.

    Block-scaled FP8 (DeepSeek-V3 style) is not refused: converter/sources/fp8.py dequantizes it on read.
    """
    qc = (config or {}).get("quantization_config")
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "fp8":
        if block_size(config) is not None:
            return block_fp8_problem(config, tensors)
    if config and config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown")
        return f"its config.json has a quantization_config (quant_method {method!r})"
    names = {t.name for t in tensors}
    for t in tensors:
        if t.dtype in FP8_DTYPES:
            return f"tensor {t.name!r} is {t.dtype}"
        if t.dtype == "U8" and f"{t.name}.absmax" in names:
            return f"tensor {t.name!r} is packed U8 with an absmax sibling (bitsandbytes 4-bit)"
        if t.name.endswith((".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4", ".SCB")):
            return f"tensor {t.name!r} is a bitsandbytes quant state"
        if t.name.endswith(".qweight") and t.dtype in _INTEGER_DTYPES:
            return f"tensor {t.name!r} is {t.dtype} packed weights (GPTQ / AWQ)"
        if t.name.endswith(".weight") and t.dtype in _INTEGER_DTYPES:
            # integer weights with their scales beside them (W8A8, compressed-tensors without its config):
            # kept as they are, a loader would read the codes as numbers
            scale = next((f"{t.name}{s}" for s in _SCALE_SUFFIXES if f"{t.name}{s}" in names), None)
            if scale is not None:
                return f"tensor {t.name!r} is {t.dtype} with a scale beside it ({scale!r})"
    return None


#: safetensors dtype codes of integer tensors.
_INTEGER_DTYPES = frozenset({"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"})
#: Suffixes of the per-weight scale of integer-quantized formats (``<name>.weight`` + suffix).
_SCALE_SUFFIXES = ("_scale", "_scale_inv", "_scales", ".scale", ".scales")


def check_config_fields(config: dict, display: str, advice: str) -> dict:
    """``config`` (config.json's object, ``display`` naming it) when the fields quantize-model reads before
    transformers does have their JSON types: ``model_type`` a string, ``quantization_config`` an object (or
    null). Otherwise a CorruptFileError naming the field, ending with ``advice``; they raised
    AttributeError / TypeError from the code that read them (exit 1), and transformers cannot load such
    a config either."""
    from converter.errors import CorruptFileError

    for field, kind, what in (("model_type", str, "a string"), ("quantization_config", dict, "an object")):
        value = config.get(field)
        if value is not None and not isinstance(value, kind):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            msg = f"{display}: {field} is {shown}, not {what}; {advice}"
            raise CorruptFileError(msg)
    return config


def check_weight_map(index: str, weight_map: dict[str, str], seen: dict[str, str], advice: str) -> None:
    """The index (``index``: how to name it in a message) against the shards' contents (``seen``: tensor ->
    file): every entry in its file, and every tensor of the shards in the index, which is what
    transformers loads by (a tensor left out would be missing from the model). Raises CorruptFileError
    naming the tensor, ending with ``advice``."""
    from converter.errors import CorruptFileError

    for name, file in weight_map.items():
        if seen.get(name) != file:
            where = f"found in {seen[name]}" if name in seen else "in no shard"
            msg = f"{index}: tensor {name!r} is mapped to {file} but {where}; {advice}"
            raise CorruptFileError(msg)
    unlisted = [name for name in seen if name not in weight_map]
    if unlisted:
        more = f" and {len(unlisted) - 1} more" if len(unlisted) > 1 else ""
        msg = (
            f"{index}: tensor {unlisted[0]!r}{more} is in {seen[unlisted[0]]} but not in the weight_map "
            f"(transformers would not load it); {advice}"
        )
        raise CorruptFileError(msg)


def ignored_index_note(where: str, weight_map: dict[str, str]) -> str | None:
    """The note for a checkpoint holding both ``model.safetensors`` and an index naming other shards:
    transformers' ``from_pretrained`` loads ``model.safetensors`` and never opens the index (local
    folders and Hub repos alike), so the conversion reads the same file. None when the index names
    ``model.safetensors`` alone (the two agree)."""
    others = sorted(set(weight_map.values()) - {"model.safetensors"})
    if not others:
        return None
    return (
        f"{where}: has both model.safetensors and model.safetensors.index.json (which names "
        f"{len(others)} other shard file(s), e.g. {others[0]}): converting model.safetensors and "
        "ignoring the index and its shards, as transformers' from_pretrained does; remove the one that "
        "is not the model"
    )
