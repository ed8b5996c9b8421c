"""``convert --quant-type int8`` output equals transformers + bitsandbytes' own 8-bit ``save_pretrained``.

For each tiny architecture (and MiniLM / SmolLM2 real weights) we convert with converter.writer.pipeline,
build bnb's own pre-quantized folder (``BitsAndBytesConfig(load_in_8bit=True)`` on CPU, then
``save_pretrained``) and check: the same tensor names with the same dtypes, shapes and bytes
(``weight`` I8, ``SCB`` F32, ``weight_format`` U8 and every kept tensor); transformers loads our folder
cleanly with a ``Linear8bitLt`` exactly where we quantized; and its logits equal those of bnb's folder.
The only config difference is ``llm_int8_skip_modules``: we write the explicit list (bnb writes null
and recomputes the same default on load).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_models import load_logged as _load
from tiny_models import make_tiny, quantized_modules, read_config, read_infos, read_tensors

from converter.plan.selection import select_tensors
from converter.writer import pipeline

bnb = pytest.importorskip("bitsandbytes")

ARCHS = ["llama", "llama_tied", "llama_odd", "gpt2", "bert", "t5"]
IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 1, 120, 33]])


def _int8_modules(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}


def _outputs(model, name: str) -> torch.Tensor:
    kwargs = {"input_ids": IDS}
    if name == "t5":
        kwargs["decoder_input_ids"] = IDS[:, :6]
    with torch.no_grad():
        out = model(**kwargs)
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out.last_hidden_state).float()


def _bnb_folder(src, out, threshold: float = 6.0):
    qc = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    model, _, _ = _load(src, quantization_config=qc)
    model.save_pretrained(out)
    return model


def _same_bytes(ours: dict, ref: dict, dropped: set[str]) -> None:
    """Every tensor bnb wrote is ours, byte for byte; we also copy buffers transformers drops."""
    assert set(ref) <= set(ours)
    assert set(ours) - set(ref) <= dropped
    for k, b in ref.items():
        a = ours[k]
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), k
        assert a.reshape(-1).view(torch.uint8).tolist() == b.reshape(-1).view(torch.uint8).tolist(), k


def _check(src, tmp_path, name: str):
    pipeline.convert(str(src), str(tmp_path / "ours"), quant_type="int8", progress=False)
    ref_model = _bnb_folder(src, tmp_path / "bnb")
    sel = select_tensors(read_config(src), read_infos(src))
    dropped = {k for k, why in sel.keep.items() if why == "buffer" or why.startswith("not a parameter")}
    _same_bytes(read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "bnb"), dropped)

    ours, info, messages = _load(tmp_path / "ours")
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], (kind, info[kind])
    assert not [m for m in messages if "LOAD REPORT" in m or "initialized" in m], messages
    assert _int8_modules(ours) == quantized_modules(sel)
    assert _int8_modules(ref_model) == quantized_modules(sel)

    config = read_config(tmp_path / "ours")
    qc, ref_qc = config["quantization_config"], read_config(tmp_path / "bnb")["quantization_config"]
    assert qc["llm_int8_skip_modules"] == sel.skip_modules
    assert {k: v for k, v in qc.items() if k != "llm_int8_skip_modules"} == {
        k: v for k, v in ref_qc.items() if k != "llm_int8_skip_modules"
    }
    assert config["dtype"] == read_config(tmp_path / "bnb")["dtype"]
    ref, _, _ = _load(tmp_path / "bnb")
    return ours, ref


@pytest.mark.parametrize("name", ARCHS)
def test_int8_bytes_and_logits_equal_bitsandbytes(tiny_checkpoint, tmp_path, name):
    ours, ref = _check(tiny_checkpoint(name), tmp_path, name)
    assert torch.equal(_outputs(ours, name), _outputs(ref, name))


def test_int8_minilm_real_weights(minilm_model, tmp_path):
    ours, ref = _check(minilm_model, tmp_path, "bert")
    assert torch.equal(_outputs(ours, "bert"), _outputs(ref, "bert"))


@pytest.mark.slow
def test_int8_smollm2_real_weights(smollm2_model, tmp_path):
    ours, ref = _check(smollm2_model, tmp_path, "llama")
    assert torch.equal(_outputs(ours, "llama"), _outputs(ref, "llama"))


def test_int8_extreme_values_store_what_bitsandbytes_stores(tmp_path):
    """Planted zero row, tiny weights (fp16 subnormals after the cast), an outlier 40.0 and a bf16 value
    of 99840 (past fp16's 65504): the bytes equal bnb's. bnb stores the overflowing row as SCB = inf
    with zero codes, which makes the logits NaN in both folders; our result names the tensor."""
    src = make_tiny("llama", tmp_path / "src", seed=3)
    f = src / "model.safetensors"
    with safe_open(f, "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    w = tensors["model.layers.0.mlp.up_proj.weight"]
    w[0] = 0.0
    w[1] = w[1] * 1e-6
    w[2, 3] = 40.0
    w[3, 5] = 99840.0
    from safetensors.torch import save_file

    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="model.layers.0.mlp.up_proj.weight"):  # said, not only recorded
        result = pipeline.convert(str(src), str(tmp_path / "ours"), quant_type="int8", progress=False)
    assert any("model.layers.0.mlp.up_proj.weight (1 rows)" in n and "NaN" in n for n in result.notes)
    _bnb_folder(src, tmp_path / "bnb")
    ours_t, ref_t = read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "bnb")
    _same_bytes(ours_t, ref_t, set())
    scb = ours_t["model.layers.0.mlp.up_proj.SCB"]
    assert scb[0] == 0
    assert scb[3] == float("inf")
    assert not ours_t["model.layers.0.mlp.up_proj.weight"][3].any()


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        # 99840: finite, past float16's 65504
        (torch.float16, {(3, 5): 99840.0}),
        # 3.4e38: finite, past bfloat16's largest 3.39e38 (bnb rounds the bf16 inf to fp16 inf)
        (torch.bfloat16, {(3, 5): 3.4e38, (7, 1): -3.4e38}),
    ],
)
def test_int8_dtype_cast_overflow_stores_what_bitsandbytes_stores(tmp_path, dtype, values):
    """--dtype float16 / bfloat16 on an fp32 checkpoint holding values past the target dtype's range:
    transformers loads them as inf and bnb saves SCB = inf with zero codes for those rows; we write the
    same bytes and say so, instead of refusing the cast's inf as a NaN/Inf in the checkpoint."""
    name = "model.layers.0.mlp.up_proj"
    src = make_tiny("llama_tied", tmp_path / "src", seed=3)  # float32
    f = src / "model.safetensors"
    with safe_open(f, "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    for (row, col), v in values.items():
        tensors[f"{name}.weight"][row, col] = v
    from safetensors.torch import save_file

    save_file(tensors, f, metadata={"format": "pt"})
    dtype_name = str(dtype).removeprefix("torch.")
    with pytest.warns(UserWarning, match=f"{name}.weight"):
        result = pipeline.convert(
            str(src), str(tmp_path / "ours"), quant_type="int8", dtype=dtype_name, progress=False
        )
    assert any(f"{name}.weight ({len(values)} rows)" in n and "NaN" in n for n in result.notes)
    qc = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model, _, _ = _load(src, quantization_config=qc, dtype=dtype)
    model.save_pretrained(tmp_path / "bnb")
    ours_t, ref_t = read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "bnb")
    _same_bytes(ours_t, ref_t, set())
    rows = [row for row, _ in values]
    assert ours_t[f"{name}.SCB"][rows].tolist() == [float("inf")] * len(rows)
    assert not ours_t[f"{name}.weight"][rows].any()
    assert read_config(tmp_path / "ours")["dtype"] == dtype_name


def test_int8_threshold_is_config_only(tiny_checkpoint, tmp_path):
    """llm_int8_threshold changes config.json only (bnb's bytes do not depend on it)."""
    src = tiny_checkpoint("llama")
    pipeline.convert(str(src), str(tmp_path / "t0"), quant_type="int8", int8_threshold=0.0, progress=False)
    pipeline.convert(str(src), str(tmp_path / "t6"), quant_type="int8", progress=False)
    assert read_config(tmp_path / "t0")["quantization_config"]["llm_int8_threshold"] == 0.0
    a, b = read_tensors(tmp_path / "t0"), read_tensors(tmp_path / "t6")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_int8_cuda_scale_records_itself(tiny_checkpoint, tmp_path):
    """--int8-scale cuda: same SCB, codes within one step of the CPU bytes, and the metadata says so."""
    src = tiny_checkpoint("llama")
    pipeline.convert(str(src), str(tmp_path / "cpu"), quant_type="int8", progress=False)
    pipeline.convert(str(src), str(tmp_path / "cuda"), quant_type="int8", int8_scale="cuda", progress=False)
    a, b = read_tensors(tmp_path / "cpu"), read_tensors(tmp_path / "cuda")
    for k in a:
        if k.endswith(".SCB"):
            assert torch.equal(a[k], b[k]), k
        elif a[k].dtype == torch.int8:
            assert int((a[k].short() - b[k].short()).abs().max()) <= 1, k
    with safe_open(tmp_path / "cuda" / "model.safetensors", "pt") as fh:
        records = json.loads(fh.metadata()["quantize_model.tensors"])
    assert records["model.layers.0.mlp.up_proj.weight"]["scale"] == "cuda"


def test_int8_quality_statistics_in_the_report(tiny_checkpoint, tmp_path) -> None:
    """quantization_report.json measures int8 weights too: per element |x - W| <= SCB/254 (half a code
    step, the scale's two roundings adding 2u relative) + |x| 2^-11 (the fp16 cast) + 3u |W| (decoding),
    so max_abs_err <= max SCB * (1/254 + 2^-11 + 2^-20)."""
    src = tiny_checkpoint("llama")
    pipeline.convert(str(src), str(tmp_path / "ours"), quant_type="int8", progress=False)
    report = json.loads((tmp_path / "ours" / "quantization_report.json").read_text())
    tensors = read_tensors(tmp_path / "ours")
    measured = [t for t in report["tensors"] if t["action"] == "quantize"]
    assert len(measured) == report["quality"]["tensors_measured"] == 14
    for t in measured:
        scb_max = float(tensors[t["name"].removesuffix("weight") + "SCB"].max())
        assert 0 < t["max_abs_err"] <= scb_max * (1 / 254 + 2**-11 + 2**-20), t
        assert t["nonfinite"] == 0


def test_int8_rows_that_decode_to_nan_count_as_nonfinite(tmp_path):
    """A row stored as SCB = inf (a bf16 value past fp16's range) decodes to NaN in every loader:
    quantization_report.json counted no NaN/Inf for it ("nonfinite": NaN/Inf in x or dequantized(x))
    and ``verify --against`` found no problem, although the loaded model's logits are NaN."""
    from converter.tools.verify_quality import verify_against

    src = make_tiny("llama", tmp_path / "src", seed=3)
    f = src / "model.safetensors"
    with safe_open(f, "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name][3, 5] = 99840.0
    from safetensors.torch import save_file

    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=name):
        pipeline.convert(str(src), str(tmp_path / "ours"), quant_type="int8", progress=False)
    report = json.loads((tmp_path / "ours" / "quantization_report.json").read_text())
    row = tensors[name].shape[1]
    assert {t["name"]: t["nonfinite"] for t in report["tensors"] if t["action"] == "quantize"}[name] == row
    assert report["quality"]["nonfinite_quantized"] == row
    quality, problems = verify_against(tmp_path / "ours", str(src))
    assert quality["nonfinite_quantized"] == row
    # reconverting alone writes the same bytes (the advice was only "reconvert with --overwrite")
    assert problems == [
        f"tensor {name!r} in model.safetensors: {row} NaN/Inf values (rows past float16's range, stored "
        f"as bitsandbytes stores them: SCB = inf); reconvert with --skip 'model.layers.0.mlp.up_proj' to "
        f"keep it unquantized"
    ]


def test_int8_mla_kv_b_proj_fails_in_stock_transformers_bitsandbytes_on_the_cpu(tiny_checkpoint, tmp_path):
    """MLA attention (DeepSeek-V3 here) feeds kv_b_proj a 4-D input [batch, 1, seq, kv_lora_rank]:
    bitsandbytes 0.50's int8 matmul flattens 3-D inputs only, so transformers + bitsandbytes fails in the
    forward of our int8 folder, as with its own load_in_8bit of the model; load_quantized runs it, and
    ``--skip '*.kv_b_proj'`` (what convert's warning advises) makes a folder stock transformers runs.
    If a bitsandbytes release takes such inputs, this test fails: Int8Method.loader_advice's warning
    must then name the versions that do not."""
    from converter.loader.model import load_quantized

    src = tiny_checkpoint("deepseek_v3")
    out = tmp_path / "int8"
    with pytest.warns(UserWarning, match=r"kv_b_proj .*4-D tensor.*load_quantized runs it"):
        pipeline.convert(src, out, quant_type="int8", progress=False)
    stock, _, _ = _load(out)
    assert isinstance(stock.model.layers[0].self_attn.kv_b_proj, bnb.nn.Linear8bitLt)
    with pytest.raises(RuntimeError, match="must match the size of tensor b"):
        _outputs(stock, "deepseek_v3")
    own = _load(src, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))[0]
    with pytest.raises(RuntimeError, match="must match the size of tensor b"):
        _outputs(own, "deepseek_v3")
    ours = load_quantized(out)
    assert torch.isfinite(_outputs(ours, "deepseek_v3")).all()

    skipped = tmp_path / "skip"
    pipeline.convert(src, skipped, quant_type="int8", progress=False, skip=("*.kv_b_proj",))
    stock, _, _ = _load(skipped)
    assert not isinstance(stock.model.layers[0].self_attn.kv_b_proj, bnb.nn.Linear8bitLt)
    assert isinstance(stock.model.layers[0].self_attn.q_b_proj, bnb.nn.Linear8bitLt)
    assert torch.isfinite(_outputs(stock, "deepseek_v3")).all()
