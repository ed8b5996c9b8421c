"""load_quantized(model_class=..., **config_kwargs): another head on the same shards (QLoRA for
classification), checked against transformers + bitsandbytes on the same folder and seed.

transformers + bitsandbytes 0.50 cannot load these folders into a classification class as they are: the
saved ``llm_int8_skip_modules`` (``["lm_head"]``, or ``[]`` for an encoder) do not name the new head, so
it becomes a 4-bit/8-bit layer with nothing to load and its random init fails ("normal_kernel_cpu" not
implemented for 'Byte'). Our loader keeps such a head in the load dtype. The reference is therefore
transformers + bitsandbytes on the same shards with the head added to ``llm_int8_skip_modules`` (through
``config=``), which is what a user of transformers has to do.

Head values are compared for equality, not within a tolerance: both loaders draw them with
transformers' own ``initialize_weights`` over the same modules in the same order from the same seeded
generator, and nothing else draws from it in between. The LoRA losses are compared for equality too:
the 4-bit weights decode bit-identically to bitsandbytes and both run ``F.linear`` in the same dtype on
the same values (sequences of 12 tokens: more than the 8 rows our fused decode GEMV takes), and the
adapters, head copy and optimizer are PEFT's and torch's on both sides.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from converter.loader.model import ModelBuildError, load_quantized
from converter.writer.pipeline import convert

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

AutoSeqCls = transformers.AutoModelForSequenceClassification
IDS = torch.tensor([[1, 5, 9, 33, 2, 20, 7, 64, 11, 12, 13, 14], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
LABELS = torch.tensor([2, 0])
QUANTIZED = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)

#: kind -> (head module, LoRA targets, load dtype)
KINDS = {
    "llama": ("score", ["q_proj", "v_proj"], torch.bfloat16),
    "bert": ("classifier", ["query", "value"], torch.float32),
}


@pytest.fixture(scope="module")
def plain_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BertModel checkpoint (with its pooler); widths are whole 64-element blocks, so that
    bitsandbytes' CPU training path decodes every row right (converter/writer/pipeline.py)."""
    config = transformers.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model_class") / "bert"
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(
    plain_llama: Path, plain_bert: Path, our_folder: Path, int8_folder: Path, tmp_path_factory
) -> dict[tuple[str, str], Path]:
    """(kind, quant_type) -> folder: the tiny Llama (causal LM) and BertModel converted by us."""
    root = tmp_path_factory.mktemp("model_class")
    out = {("llama", "nf4"): our_folder, ("llama", "int8"): int8_folder}
    for quant_type in ("nf4", "int8"):
        out["bert", quant_type] = root / f"bert-{quant_type}"
        convert(plain_bert, out["bert", quant_type], quant_type=quant_type, progress=False)
    return out


def _ours(folder: Path, dtype: torch.dtype, model_class: type | None = AutoSeqCls, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_quantized(folder, dtype=dtype, model_class=model_class, **kwargs)


def _theirs(folder: Path, head: str, dtype: torch.dtype, **kwargs) -> nn.Module:
    """transformers + bitsandbytes on the same shards, ``head`` added to the skip list (module doc)."""
    config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
    qc = config.quantization_config
    qc["llm_int8_skip_modules"] = [*qc["llm_int8_skip_modules"], head]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoSeqCls.from_pretrained(folder, config=config, device_map="cpu", dtype=dtype)


def _quantized(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZED)}


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_sequence_classification_head(folders: dict, kind: str, quant_type: str) -> None:
    folder = folders[kind, quant_type]
    head, _, dtype = KINDS[kind]
    torch.manual_seed(0)
    new = [f"{head}.weight"] + ([f"{head}.bias"] if kind == "bert" else [])
    with pytest.warns(UserWarning, match="newly initialized") as record:
        model = load_quantized(folder, dtype=dtype, model_class=AutoSeqCls, num_labels=3, pad_token_id=0)
    message = next(str(w.message) for w in record if "newly initialized" in str(w.message))
    assert f"{new}" in message  # the names, as transformers' load report lists its MISSING keys
    assert f"would make ['{head}'] quantized layers" in message  # and why it is not quantized here
    if kind == "llama":  # transformers' UNEXPECTED key
        assert any(
            "unused by LlamaForSequenceClassification: ['lm_head.weight']" in str(w.message) for w in record
        )
    assert all(w.filename == __file__ for w in record)  # pointing at the caller
    assert type(model).__name__ == f"{kind.capitalize()}ForSequenceClassification"
    assert model.config.num_labels == 3
    assert len(model.config.id2label) == 3
    layer = model.get_submodule(head)
    assert type(layer) is nn.Linear
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in layer.parameters())
    with torch.no_grad():
        assert model(IDS).logits.shape == (2, 3)

    # The base model's quantized layers are the folder's own class's, prefix added where it has one.
    own = _ours(folder, dtype, model_class=None)
    prefix = "bert." if kind == "bert" else ""
    mine = {n: m for n, m in _quantized(model).items()}
    assert mine.keys() == {prefix + n for n in _quantized(own)}
    for name, module in _quantized(own).items():
        assert torch.equal(mine[prefix + name].weight.data, module.weight.data), name

    # transformers + bitsandbytes (head skipped): same quantized set, same head values and dtype.
    theirs = _theirs(folder, head, dtype, num_labels=3, pad_token_id=0)
    assert _quantized(theirs).keys() == mine.keys()
    for name, param in theirs.get_submodule(head).named_parameters():
        assert param.dtype == dtype
        assert torch.equal(getattr(layer, name), param), name


def test_transformers_bnb_fails_on_the_folder_as_it_is(folders: dict) -> None:
    """Why the head stays unquantized (module doc): transformers 5 + bitsandbytes 0.50 make it a 4-bit
    layer and cannot initialise it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match="normal_kernel_cpu"):
            AutoSeqCls.from_pretrained(folders["llama", "nf4"], num_labels=3, device_map="cpu")


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_save_pretrained_of_a_new_head_writes_a_folder_transformers_loads(
    folders: dict, kind: str, quant_type: str, tmp_path: Path
) -> None:
    """A QLoRA classifier's `save_pretrained` wrote config.json's llm_int8_skip_modules as the folder had
    it (`["lm_head"]`), without the new 16-bit head: transformers + bitsandbytes then built a quantized
    layer for it and failed ("FP4 quantization state not initialized", `verify`: "llm_int8_skip_modules
    does not list 'score'"). The loaded model's config names the head as skipped, as its layers are."""
    folder = folders[kind, quant_type]
    head, _, dtype = KINDS[kind]
    model = _ours(folder, dtype, num_labels=3, pad_token_id=0)
    skip = model.config.quantization_config.llm_int8_skip_modules
    own = json.loads((folder / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert skip == [*own, head]
    model.save_pretrained(tmp_path / "saved")
    assert (
        head
        in json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"][
            "llm_int8_skip_modules"
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AutoSeqCls.from_pretrained(tmp_path / "saved", device_map="cpu", dtype=dtype)
    assert _quantized(theirs).keys() == _quantized(model).keys()
    for name, param in theirs.get_submodule(head).named_parameters():
        assert torch.equal(getattr(model.get_submodule(head), name), param), name
    again = _ours(tmp_path / "saved", dtype, model_class=None)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def _lora_losses(model: nn.Module, head: str, targets: list[str]) -> tuple[list[float], list[str]]:
    """Three AdamW steps of PEFT LoRA (SEQ_CLS, the head in modules_to_save): losses, trained names."""
    torch.manual_seed(1)  # LoRA A matrices
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=targets,
        lora_dropout=0.0,
        modules_to_save=[head],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        torch.manual_seed(2)  # BERT's dropout
        loss = model(input_ids=IDS, labels=LABELS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_lora_classification_training_equals_transformers_bnb(folders: dict, kind: str) -> None:
    head, targets, dtype = KINDS[kind]
    folder = folders[kind, "nf4"]
    ours = _lora_losses(_ours(folder, dtype, num_labels=3, pad_token_id=0), head, targets)
    theirs = _lora_losses(_theirs(folder, head, dtype, num_labels=3, pad_token_id=0), head, targets)
    assert ours == theirs
    assert any(f"{head}.modules_to_save.default.weight" in n for n in ours[1])
    assert ours[0][-1] < ours[0][0]


def test_int8_lora_classification_trains(folders: dict) -> None:
    """int8: the same PEFT setup runs and learns; the losses are not compared with bitsandbytes' (our
    Linear8bit's default forward decodes the weight exactly instead of bnb's int8 matmul,
    docs/python-api.md)."""
    losses, trained = _lora_losses(
        _ours(folders["llama", "int8"], torch.bfloat16, num_labels=3, pad_token_id=0), "score", ["q_proj"]
    )
    assert losses[-1] < losses[0]
    assert any("lora_A" in n for n in trained)


def test_concrete_class_and_token_classification(folders: dict) -> None:
    folder = folders["bert", "nf4"]
    auto = _ours(folder, torch.float32, num_labels=3)
    concrete = _ours(
        folder, torch.float32, model_class=transformers.BertForSequenceClassification, num_labels=3
    )
    assert type(concrete) is type(auto)
    assert torch.equal(concrete.classifier.weight, auto.classifier.weight)
    # BertForTokenClassification has no pooler: the shards' quantized pooler is an unused tensor
    # (transformers' unexpected key), not an error.
    with pytest.warns(UserWarning, match=r"unused by BertForTokenClassification: \['pooler\.dense\.weight"):
        tokens = load_quantized(
            folder, dtype=torch.float32, model_class=transformers.AutoModelForTokenClassification
        )
    with torch.no_grad():
        assert tokens(IDS).logits.shape == (2, 12, 2)


def test_config_kwargs_reach_the_config_and_the_model(folders: dict) -> None:
    labels = {0: "neg", 1: "neutral", 2: "pos"}
    model = _ours(
        folders["llama", "nf4"], torch.bfloat16, id2label=labels, problem_type="single_label_classification"
    )
    assert model.config.id2label == labels
    assert model.config.num_labels == 3
    assert model.config.problem_type == "single_label_classification"
    assert model.score.out_features == 3


def test_roberta_without_pooler(tmp_path: Path) -> None:
    """A RobertaModel saved without its pooler: the folder's own class has one. The converter skips
    ``pooler.dense`` as transformers does (last module), so transformers + bitsandbytes loads the folder
    and initialises the pooler; so do we, with the same values. ``add_pooling_layer=False`` (not a config
    attribute) goes to the model's __init__, as in from_pretrained."""
    config = transformers.RobertaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    torch.manual_seed(0)
    transformers.RobertaModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "plain")
    folder = tmp_path / "nf4"
    convert(tmp_path / "plain", folder, progress=False)
    torch.manual_seed(0)
    with pytest.warns(
        UserWarning, match=r"newly initialized .*\['pooler\.dense\.weight', 'pooler\.dense\.bias'\]"
    ):
        ours = load_quantized(folder, dtype=torch.float32)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.RobertaModel.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    assert torch.equal(ours.pooler.dense.weight, theirs.pooler.dense.weight)
    assert torch.equal(ours.pooler.dense.bias, theirs.pooler.dense.bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing, nothing unused
        bare = load_quantized(folder, dtype=torch.float32, add_pooling_layer=False)
    assert bare.pooler is None


def test_missing_non_quantized_parameter_of_the_own_class(plain_llama: Path, tmp_path: Path) -> None:
    """A parameter of the folder's own class that transformers keeps unquantized (the final norm),
    missing from the shards: initialised and named, as from_pretrained does (RMSNorm: ones)."""
    folder = tmp_path / "no-norm"
    convert(plain_llama, folder, progress=False)
    shard = folder / "model.safetensors"
    with safe_open(str(shard), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.norm.weight"}
    listed = json.loads(metadata["quantize_model.tensors"])  # the shard's own list of its tensors
    del listed["model.norm.weight"]
    metadata["quantize_model.tensors"] = json.dumps(listed)
    save_file(tensors, shard, metadata=metadata)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.warns(
        UserWarning, match=r"1 parameter\(s\) of LlamaForCausalLM .* \['model\.norm\.weight'\]"
    ):
        model = load_quantized(folder, verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    assert torch.equal(model.model.norm.weight, theirs.model.norm.weight)
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))


def test_missing_quantized_weight_is_still_refused(folders: dict) -> None:
    # a config that asks for a third layer: its quantized layers are in the folder's own class but not
    # in the shards (a truncated conversion), with or without another head
    for model_class in (None, AutoSeqCls):
        with (
            pytest.warns(UserWarning, match="would load this folder differently"),
            pytest.raises(
                ModelBuildError,
                match=r"no tensor for \d+ quantized model parameter\(s\): \['model\.layers\.2\.",
            ),
        ):
            load_quantized(folders["llama", "nf4"], model_class=model_class, num_hidden_layers=3)


def test_bad_model_class(folders: dict) -> None:
    with pytest.raises(ModelBuildError, match="must be a transformers model class or Auto class"):
        load_quantized(folders["llama", "nf4"], model_class=nn.Linear)
    with pytest.raises(
        ModelBuildError, match="AutoModelForImageClassification has no model class for model_type 'llama'"
    ):
        load_quantized(folders["llama", "nf4"], model_class=transformers.AutoModelForImageClassification)
    with pytest.raises(ModelBuildError, match="unexpected keyword argument 'no_such_option'"):
        load_quantized(folders["llama", "nf4"], no_such_option=1)


def test_model_warmup_leaves_the_seeded_generator_alone(our_folder: Path) -> None:
    """QM_LOAD_WARMUP=model builds a randomly initialised one-layer model on a side thread while a CUDA
    load runs (loader/warmup.py): its draws must not move the generator a new head is drawn from
    after it. Run here on the CPU generator, which torch.random.fork_rng restores the same way."""
    from converter.loader.warmup import Warmup

    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert Warmup(torch.device("cpu"), our_folder, torch.bfloat16, "model")._tiny_model(torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), before)


def test_docs_example_runs(our_folder: Path) -> None:
    """docs/python-api.md, "Another head": the example as written, on the tiny Llama."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "python-api.md").read_text()
    start = doc.index("#### Another head: `model_class=`")
    match = re.compile(r"```python\n(.*?)```", re.DOTALL).search(doc, start)
    assert match is not None
    code = match.group(1)
    assert '"./llama-8b-nf4"' in code
    namespace = {"load_quantized": load_quantized}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(code.replace('"./llama-8b-nf4"', repr(str(our_folder))), namespace)
    model = namespace["model"]
    assert model.config.id2label[2] == "positive"
    loss = model(input_ids=IDS, labels=LABELS).loss
    loss.backward()
    assert model.base_model.model.score.modules_to_save.default.weight.grad is not None


def test_fewer_layers_by_config_kwargs_load_as_with_transformers(bnb_nf4: Path) -> None:
    """``load_quantized(folder, num_hidden_layers=1)`` (config.json overridden, as
    ``from_pretrained(folder, num_hidden_layers=1)`` takes it) builds the one-layer model and reports
    the second layer's tensors as unused, as transformers + bitsandbytes report them (UNEXPECTED); its
    quantized weights were a CheckpointMismatchError ("has no module 'model.layers.1...'"). The logits
    are transformers + bitsandbytes' on the dequantize path."""
    from converter.loader.model import linear4bit_modules

    with pytest.warns(UserWarning, match=r"unused by LlamaForCausalLM: \['model\.layers\.1\."):
        model = load_quantized(bnb_nf4, num_hidden_layers=1)
    assert model.config.num_hidden_layers == 1
    assert sorted(linear4bit_modules(model)) == sorted(
        f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    )  # fmt: skip
    for layer in linear4bit_modules(model).values():
        layer.use_gemv = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            bnb_nf4, device_map="cpu", num_hidden_layers=1
        )
    reference.train()  # bitsandbytes' dequantize + F.linear path (no dropout in Llama)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)
