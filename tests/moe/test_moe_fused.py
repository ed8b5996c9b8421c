"""--moe-experts quantize on fused 3-D experts (Qwen3-VL-MoE): the fused bnb record, its loader, dequantize.

Two tiny checkpoints: expert intermediate 128 (an expert projection's 128 absmax blocks straddle the
256-wide nested blocks, so the loader de-nests the pieces) and 256 (they fill them, so the nested codes
are sliced per expert), both with the experts in the Hub's orientation; and one in transformers' model
orientation (what its own save_pretrained writes).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import make_dataclass
from pathlib import Path
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
from click.testing import CliRunner
from moe_helpers import (
    assert_float32_experts_within_bound,
    assert_streamed_bytes_equal_whole_build,
    fused_keys,
    largest_fresh_tensors_of_dequantize,
    load_bf16_eager,
    make_qwen3_vl_moe,
    read_config,
)
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import load_logged

from converter.cli import cli
from converter.errors import CorruptFileError
from converter.kernels import bnb4bit as kernels
from converter.loader import ops
from converter.loader.dequantize import dequantize_checkpoint
from converter.loader.model import load_quantized
from converter.loader.module import state_from_record
from converter.loader.moe import QuantExperts4bit, moe_modules
from converter.loader.moe_fused import split_fused
from converter.plan import moe
from converter.plan.moe import EXPERT_KEY
from converter.tools.inspection import inspect_path
from converter.writer.pipeline import convert
from formats import validate
from formats.index import INDEX_NAME
from formats.reader import open_folder

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 11, 90, 3, 45]])
GU = "model.language_model.layers.{}.mlp.experts.gate_up_proj"
DN = "model.language_model.layers.{}.mlp.experts.down_proj"


@pytest.fixture(scope="module")
def vl(tmp_path_factory: pytest.TempPathFactory):
    """vl(inter, hub) -> (source, quantized folder, its dequantized bf16 folder), made once."""
    made: dict[tuple[int, bool], tuple[Path, Path, Path]] = {}

    def get(inter: int = 128, hub: bool = True) -> tuple[Path, Path, Path]:
        if (inter, hub) not in made:
            root = tmp_path_factory.mktemp(f"vl-{inter}-{hub}")
            src = make_qwen3_vl_moe(root / "src", inter=inter, hub=hub)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                convert(src, root / "q", moe_experts="quantize", progress=False)
            dequantize_checkpoint(root / "q", root / "plain")
            made[inter, hub] = (src, root / "q", root / "plain")
        return made[inter, hub]

    return get


def _source(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _infos(folder: Path) -> list[SimpleNamespace]:
    """The source's tensors as the plan sees them (name, dtype code, shape), from the header."""
    with safe_open(folder / "model.safetensors", "pt") as f:
        return [
            SimpleNamespace(name=k, dtype=f.get_slice(k).get_dtype(), shape=tuple(f.get_slice(k).get_shape()))
            for k in f.keys()
        ]


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _dequant_paths(model):
    from converter.loader.model import linear4bit_modules

    for layer in [*linear4bit_modules(model).values(), *moe_modules(model).values()]:
        layer.use_gemv = False
    return model


@pytest.mark.parametrize(("inter", "hub"), [(128, True), (256, True), (128, False)])
def test_fused_record_is_bitsandbytes_quantize_4bit_of_the_model_orientation(vl, inter, hub):
    """Each fused tensor is one bnb record of shape [E, 2I, H] / [E, H, I] (transformers' model
    orientation, whichever the source had): its codes and absmax are bitsandbytes' quantize_4bit of that
    3-D tensor (viewed 2-D, as bnb flattens it), nested by the project's one nesting rule; the
    per-tensor metadata says whether it was transposed, and the quant-state JSON carries the 3-D shape."""
    src, q, _ = vl(inter, hub)
    records, source = open_folder(q).records(), _source(src)
    keys = fused_keys(src)
    assert len(keys) == 4
    with safe_open(q / "model.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["quantize_model.tensors"])
    for key in keys:
        w = source[key].transpose(1, 2).contiguous() if hub else source[key]
        rec = records[key]
        assert rec.shape == tuple(w.shape), key
        assert rec.shape[1:] == ((2 * inter, 64) if key.endswith("gate_up_proj") else (64, inter))
        packed, state = bnb.functional.quantize_4bit(
            w.reshape(-1, w.shape[-1]), blocksize=64, compress_statistics=False, quant_type="nf4"
        )
        assert torch.equal(rec.packed.view(torch.uint8).reshape(-1), packed.view(torch.uint8).reshape(-1))
        codes, nested_absmax, offset = kernels.quantize_nested(state.absmax)
        assert torch.equal(rec.absmax, codes), key
        assert torch.equal(rec.nested.nested_absmax, nested_absmax), key
        assert rec.nested.offset == offset, key
        assert meta[key].get("transposed", False) is hub
        assert meta[key]["shape"] == list(w.shape)
    qc = read_config(q)["quantization_config"]
    assert "gate" in qc["llm_int8_skip_modules"]
    assert isinstance(records[GU.format(0).replace("experts.gate_up_proj", "gate.weight")], torch.Tensor)


@pytest.mark.parametrize("inter", [128, 256])
def test_per_expert_slices_equal_per_expert_quantization(vl, inter):
    """The loader's per-expert pieces of a fused record are byte for byte bitsandbytes' quantize_4bit of
    each expert's gate, up and down (the records a per-expert checkpoint's conversion holds), with the
    float32 absmax of that quantization as the fused one's slice; their absmax decodes to the slice of
    the whole record's decoded absmax: nested codes sliced when an expert's blocks fill whole 256-wide
    nested blocks (256), else the float32 absmax decoded from the whole record (128)."""
    src, q, _ = vl(inter)
    source = _source(src)
    fused = {k: v for k, v in open_folder(q).records().items() if k in (GU.format(0), DN.format(0))}
    state = dict(fused)
    split_fused(state, "test")
    assert sorted(state) == sorted(
        f"model.language_model.layers.0.mlp.experts.{e}.{p}.weight"
        for e in range(4)
        for p in ("gate_proj", "up_proj", "down_proj")
    )
    whole = {k: ops.decoded_absmax(state_from_record(v)) for k, v in fused.items()}
    bnb_fused = {
        k: bnb.functional.quantize_4bit(
            source[k].transpose(1, 2).reshape(-1, 64 if k == GU.format(0) else inter).contiguous(),
            blocksize=64, compress_statistics=False, quant_type="nf4",
        )[1].absmax
        for k in fused
    }  # fmt: skip
    gu, dn = (source[k.format(0)].transpose(1, 2) for k in (GU, DN))
    nb = inter * 64 // 64
    for key, rec in state.items():
        m = EXPERT_KEY.match(key)
        e, proj = int(m["index"]), m["proj"]
        w = {"gate_proj": gu[e, :inter], "up_proj": gu[e, inter:], "down_proj": dn[e]}[proj].contiguous()
        packed, st = bnb.functional.quantize_4bit(
            w, blocksize=64, compress_statistics=False, quant_type="nf4"
        )
        assert torch.equal(rec.packed.view(torch.uint8).reshape(-1), packed.view(torch.uint8).reshape(-1))
        piece = 2 * e + (proj == "up_proj") if proj != "down_proj" else e
        parent = GU.format(0) if proj != "down_proj" else DN.format(0)
        assert torch.equal(st.absmax, bnb_fused[parent][piece * nb : (piece + 1) * nb]), key
        assert (rec.nested is not None) is (inter == 256), key
        got = ops.decoded_absmax(state_from_record(rec))
        assert torch.equal(got, whole[parent][piece * nb : (piece + 1) * nb]), key


@pytest.mark.parametrize(("inter", "hub"), [(128, True), (256, True), (128, False)])
def test_logits_bit_identical_to_dequantized_model(vl, inter, hub):
    """On the dequantize path our loader runs transformers' eager experts loop with the decoded weights:
    the logits equal those of the dequantized bf16 folder loaded by transformers, bit for bit (prefill
    and decode), as for the per-expert families."""
    _, q, plain = vl(inter, hub)
    ours = _dequant_paths(load_quantized(q))
    mods = moe_modules(ours)
    assert len(mods) == 2
    assert all(isinstance(m, QuantExperts4bit) and m.fused for m in mods.values())
    ref = load_bf16_eager(plain)
    assert torch.equal(_logits(ours), _logits(ref))
    assert torch.equal(_logits(ours, IDS[:, :1]), _logits(ref, IDS[:, :1]))


@pytest.mark.parametrize("tokens", [1, 3, 12])
def test_gemv_path_within_derived_bound(vl, tokens):
    """float32 compute on the default (GEMV) path stays within the derived bound of the exact result."""
    _, q, _ = vl()
    assert_float32_experts_within_bound(q, tokens)


def test_generate_matches_dequantized_model(vl):
    _, q, plain = vl()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = load_bf16_eager(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = _dequant_paths(load_quantized(q)).generate(IDS[:, :4], **kw)
        b = ref.generate(IDS[:, :4], **kw)
        c = load_quantized(q).generate(IDS[:, :4], **kw)  # fused GEMV at decode
    assert torch.equal(a, b)
    assert c.shape == a.shape
    assert int(c.max()) < ref.config.text_config.vocab_size


@pytest.mark.parametrize("hub", [True, False])
def test_dequantize_writes_the_source_names_and_orientation(vl, hub):
    """quantize-model dequantize writes the fused names in the source's orientation (Hub [E, H, 2I] /
    [E, I, H], or the model's), and transformers loads the folder to the same experts as the decoded
    records."""
    src, q, plain = vl(128, hub)
    source, out = _source(src), _source(plain)
    assert set(out) == set(source)
    for key in fused_keys(src):
        assert out[key].shape == source[key].shape, key
        assert out[key].dtype == torch.bfloat16
        rel = (out[key].float() - source[key].float()).norm() / source[key].float().norm()
        assert rel < 0.15, key  # 4-bit NF4 of random weights
    model = load_bf16_eager(plain)
    experts = model.model.language_model.layers[0].mlp.experts
    ours = moe_modules(load_quantized(q))["model.language_model.layers.0.mlp.experts"]
    for e in range(4):
        gu, dn = ours.expert_weights(e, torch.bfloat16)
        assert torch.equal(experts.gate_up_proj[e], gu)
        assert torch.equal(experts.down_proj[e], dn)


@pytest.mark.parametrize(("inter", "hub"), [(128, True), (256, False)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dequantize_never_builds_a_fused_experts_tensor_whole(vl, inter, hub, dtype, tmp_path, monkeypatch):
    """dequantize decodes a fused 3-D record expert by expert (each expert's run of blocks, widened to
    whole 256-block nested groups) and writes it, transposed back where the source was in the Hub's
    orientation, expert by expert: no tensor torch allocates while it makes and writes one is as large
    as it (it decoded the whole record, then made a transposed copy of it)."""
    _, q, _ = vl(inter, hub)
    size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    largest = largest_fresh_tensors_of_dequantize(q, tmp_path / "plain", monkeypatch, dtype=dtype)
    for i in range(2):
        for key in (GU.format(i), DN.format(i)):
            numel = 4 * 2 * inter * 64 if key == GU.format(i) else 4 * inter * 64
            # one expert's block, or the nested groups that hold it (inter 128: down_proj's 128 blocks)
            block = max(numel // 4, 256 * 64)
            assert largest[key][0] < numel * size, (key, largest[key])
            assert largest[key][0] <= block * size, (key, largest[key])


@pytest.mark.parametrize(("inter", "hub"), [(128, True), (128, False), (256, True)])
def test_dequantize_streamed_bytes_equal_the_whole_tensor_build(vl, inter, hub, tmp_path, monkeypatch):
    """The fused records decoded and written expert by expert (expert boundaries inside a nested group
    with inter 128): the same file, byte for byte, as each record decoded whole (and transposed) and
    written at once, in bf16, float16 (with its overflow check) and float32."""
    _, q, _ = vl(inter, hub)
    for dtype in ("bfloat16", "float16", "float32"):
        assert_streamed_bytes_equal_whole_build(q, tmp_path / dtype, monkeypatch, dtype=dtype)


@pytest.mark.parametrize("inter", [128, 256])
def test_save_pretrained_writes_fused_records(vl, inter, tmp_path):
    """save_pretrained of a loaded model writes the fused records under the fused names: the same tensors
    as the folder when the nested codes were sliced (256); with de-nested pieces (128) the same codes
    and a float32 absmax; either way the saved folder loads to the same logits."""
    _, q, _ = vl(inter)
    model = load_quantized(q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "saved")
    src = open_folder(q).records()
    saved = open_folder(tmp_path / "saved").records()
    for key in (GU.format(1), DN.format(1)):
        assert saved[key].shape == src[key].shape
        assert torch.equal(saved[key].packed.view(torch.uint8), src[key].packed.view(torch.uint8))
        if inter == 256:
            assert torch.equal(saved[key].absmax, src[key].absmax)
            assert torch.equal(saved[key].nested.nested_absmax, src[key].nested.nested_absmax)
            assert saved[key].nested.offset == src[key].nested.offset
        else:
            assert saved[key].nested is None
    assert not any(EXPERT_KEY.match(k) for k in saved)
    assert torch.equal(_logits(load_quantized(tmp_path / "saved")), _logits(model))


def test_model_dequantize_restores_transformers_experts(vl, tmp_path):
    """model.dequantize(): transformers' experts module again, with the dequantized folder's weights; it
    saves (in model orientation, as transformers' own save_pretrained writes) a folder transformers loads
    to the same logits."""
    _, q, plain = vl()
    model = load_quantized(q)
    model.dequantize()
    assert not moe_modules(model)
    ref = load_bf16_eager(plain)
    assert torch.equal(
        model.model.language_model.layers[0].mlp.experts.gate_up_proj,
        ref.model.language_model.layers[0].mlp.experts.gate_up_proj,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "saved")
    assert _source(tmp_path / "saved")[GU.format(0)].shape == (4, 256, 64)
    saved, info, _ = load_logged(tmp_path / "saved", dtype=torch.bfloat16)  # its default experts code
    assert not info["missing_keys"]
    assert torch.equal(_logits(saved), _logits(model))


def test_keep_is_unchanged_and_loads_hub_orientation(vl, tmp_path):
    """The default (keep) leaves the fused experts 16-bit, byte for byte, with the advice naming
    --moe-experts quantize; load_quantized transposes the Hub's orientation as transformers does (it
    refused the folder before: "the model wants [4, 64, 128]")."""
    src, _, _ = vl()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "keep", progress=False)
    advice = moe.keep_advice(_infos(src), "keep", threshold=0.1)
    assert "fused 3-D 4-bit record" in advice
    assert "unsloth" in advice
    kept, source = _source(tmp_path / "keep"), _source(src)
    for key in fused_keys(src):
        assert torch.equal(kept[key], source[key])
    model = load_quantized(tmp_path / "keep")
    assert not moe_modules(model)
    ref = load_bf16_eager(src)
    assert torch.equal(
        model.model.language_model.layers[0].mlp.experts.down_proj,
        ref.model.language_model.layers[0].mlp.experts.down_proj,
    )
    assert torch.equal(
        model.model.visual.blocks[0].mlp.linear_fc1.bias, ref.model.visual.blocks[0].mlp.linear_fc1.bias
    )


def test_inspect_and_dry_run_name_the_loaders(vl, tmp_path):
    src, q, _ = vl()
    moe = inspect_path(q).moe
    assert moe.fused
    # experts, not records: 2 layers x 4 experts, held in 2 fused records (gate_up, down) per layer
    assert (moe.experts_quantized, moe.tensors_quantized) == (2 * 4, 2 * 2)
    assert not moe.experts_kept
    assert "fused 3-D" in moe.layout
    assert any("unsloth" in x for x in moe.loaders)
    assert any("load_quantized" in x for x in moe.loaders)
    assert any(x.startswith("vLLM") for x in moe.not_loaders)
    assert any(x.startswith("stock transformers") for x in moe.not_loaders)
    res = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "dry"), "--moe-experts", "quantize",
                                   "--dry-run"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "unsloth" in res.output
    res = CliRunner().invoke(cli, ["verify", str(q), "--against", str(src)])  # transposed 3-D records too
    assert res.exit_code == 0, res.output
    assert "24 quantized tensors" in res.output


def test_model_card_names_the_fused_record_and_its_loaders(vl):
    from converter.tools.push import build_model_card

    _, q, _ = vl()
    card = build_model_card(q, "me/tiny-vl-moe-nf4")
    assert "one fused bitsandbytes 4-bit record per layer and projection" in card
    assert "unsloth-zoo" in card
    assert "vLLM pre-quantized bitsandbytes (no fused 3-D expert records" in card


def test_gpt_oss_fused_experts_stay_16bit_with_a_reason():
    """gpt-oss's fused experts carry biases (and interleave gate/up): no loader here runs them 4-bit, so
    --moe-experts quantize keeps them with a reason, and its note says the option had no effect."""
    infos = [
        SimpleNamespace(name="model.layers.0.mlp.experts.gate_up_proj", dtype="BF16", shape=(4, 64, 128)),
        SimpleNamespace(name="model.layers.0.mlp.experts.gate_up_proj_bias", dtype="BF16", shape=(4, 128)),
        SimpleNamespace(name="model.layers.0.mlp.experts.down_proj", dtype="BF16", shape=(4, 64, 64)),
        SimpleNamespace(name="model.layers.0.mlp.experts.down_proj_bias", dtype="BF16", shape=(4, 64)),
        SimpleNamespace(name="model.layers.0.mlp.router.weight", dtype="BF16", shape=(4, 64)),
    ]
    sel = make_dataclass("Sel", ["quantize", "keep", "skip_modules"], frozen=True)({}, {}, [])
    out = moe.apply_moe_mode(sel, infos, "quantize")
    assert not out.quantize
    assert "biases" in out.keep["model.layers.0.mlp.experts.gate_up_proj"]
    assert "no effect" in moe.no_effect_note(infos, "quantize", list(out.quantize))
    assert "gpt-oss" in moe.keep_advice(infos, "keep")


def test_estimate_reads_no_expert_bytes(vl, monkeypatch):
    """estimate sizes the fused experts from the headers: neither splitting (the de-nested pieces' absmax
    decode included) nor stacking reads an expert byte, and it counts the bytes load_quantized holds."""
    from converter.loader import moe_fused, moe_records
    from converter.loader.estimate import estimate
    from converter.loader.footprint import memory_by_device

    _, q, _ = vl()
    loaded = memory_by_device(load_quantized(q, device_map="cpu"))

    def read(*_):
        msg = "estimate read an expert's bytes"
        raise AssertionError(msg)

    fake = SimpleNamespace(packed_bytes=lambda p: p.reshape(-1), decoded_absmax=read)
    monkeypatch.setattr(moe_fused, "ops", fake)
    monkeypatch.setattr(moe_records, "ops", SimpleNamespace(packed_bytes=read, decoded_absmax=read))
    assert estimate(q, "cpu")[1] == loaded


@pytest.mark.parametrize("inter", [128, 256])
def test_load_state_dict_of_fused_records(vl, inter):
    """A fused layer's state_dict holds the fused records (no per-expert key), and load_state_dict of
    another layer's stacks them again: the layer then computes what the other one does; a missing
    record is named."""
    _, q, _ = vl(inter)
    layers = list(moe_modules(load_quantized(q)).values())
    first, second = layers[0], layers[1]
    state = second.state_dict()
    assert sorted({k.split(".")[0] for k in state}) == ["down_proj", "gate_up_proj"]
    first.load_state_dict(state)
    assert torch.equal(first.packed, second.packed)
    assert torch.equal(first.absmax, second.absmax)
    x = torch.randn(3, first.hidden_dim, dtype=torch.bfloat16)
    idx, w = torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(first(x, idx, w), second(x, idx, w))
    partial = {k: v for k, v in state.items() if not k.startswith("down_proj")}
    result = first.load_state_dict(partial, strict=False)
    assert any("down_proj" in k for k in result.missing_keys)


def test_image_prompt_through_the_4bit_vision_tower(vl):
    """The vision tower's linears are quantized as in any vision-language model (qkv, proj, fc1/fc2, the
    mergers; the Conv3d patch embedding kept): an image prompt gives the dequantized folder's logits,
    bit for bit, on the dequantize path."""
    from converter.loader.model import linear4bit_modules

    _, q, plain = vl()
    ours = _dequant_paths(load_quantized(q))
    vision = [n for n in linear4bit_modules(ours) if ".visual." in f".{n}"]
    assert len(vision) == 12
    assert not any("patch_embed" in n for n in vision)
    ref = load_bf16_eager(plain)
    c = ours.config
    h = w = 4  # patches: 2x2 merged into 4 image tokens
    ids = torch.tensor([[1, 2, c.vision_start_token_id, *[c.image_token_id] * 4, c.vision_end_token_id, 5]])
    pixels = torch.randn(h * w, 3 * 2 * 8 * 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    kw = dict(
        input_ids=ids,
        pixel_values=pixels,
        image_grid_thw=torch.tensor([[1, h, w]]),
        mm_token_type_ids=(ids == c.image_token_id).long(),
    )
    with torch.no_grad():
        assert torch.equal(ours(**kw).logits, ref(**kw).logits)


def _format_versions(folder: Path) -> set[int]:
    """The format versions a folder's shards and index carry."""
    index = json.loads((folder / INDEX_NAME).read_text())
    got = {index["metadata"]["quantize_model"]["format"]["version"]}
    for shard in set(index["weight_map"].values()):
        with safe_open(folder / shard, "pt") as f:
            got.add(json.loads(f.metadata()["quantize_model.format"])["version"])
    return got


def test_fused_folders_alone_are_format_version_2(vl, tmp_path, monkeypatch):
    """A reader of format version 1 does not refuse a fused record: it loads the model with its experts
    "newly initialized". Such folders alone are version 2 (docs/format.md 8), which that reader refuses
    with "upgrade quantize-model"; every other folder stays version 1, readable by it."""
    src, q, _ = vl()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "keep", progress=False)
        again = convert(src, q, moe_experts="quantize", progress=False)
    assert _format_versions(q) == {2}
    assert _format_versions(tmp_path / "keep") == {1}
    assert again.noop  # the plan's fingerprint (format version included) is stable: a rerun is up to date
    monkeypatch.setattr(validate, "SUPPORTED_FORMAT_VERSIONS", (1,))  # a version-1 reader
    with pytest.raises(CorruptFileError, match=r"format version 2 is not supported .*upgrade quantize-model"):
        load_quantized(q)
    assert not moe_modules(load_quantized(tmp_path / "keep"))
