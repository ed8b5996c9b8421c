"""The examples of docs/python-api.md run as written (on the tiny Llama of conftest.py)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from converter.loader.model import load_quantized

DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"


def _example(heading: str) -> str:
    """The first ```python block after the line starting with ``heading``."""
    text = DOC.read_text()
    start = text.index(heading)
    match = re.compile(r"```python\n(.*?)```", re.DOTALL).search(text, start)
    assert match is not None, f"no python example after {heading!r}"
    return match.group(1)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_replace_linear_layers_example_runs_for_4bit_and_int8(
    kind: str, our_folder: Path, int8_folder: Path
) -> None:
    """The example filtered with ``not isinstance(v, QuantizedTensor)`` without importing it (a
    NameError), and for an int8 folder that filter let the Int8Tensor records through."""
    folder = our_folder if kind == "nf4" else int8_folder
    code = _example("### `replace_linear_layers(")
    assert '"./my-model-nf4"' in code
    config = transformers.AutoConfig.from_pretrained(folder)
    del config.quantization_config
    torch.manual_seed(1)  # random init: every tensor must come from the checkpoint
    my_model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    namespace = {"my_model": my_model}
    exec(code.replace('"./my-model-nf4"', repr(str(folder))), namespace)
    assert namespace["names"]
    assert getattr(my_model, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_quantized(folder)
    ours, ref = my_model.state_dict(), loaded.state_dict()
    assert sorted(ours) == sorted(ref)
    for key, value in ref.items():
        assert torch.equal(ours[key], value), key
    ids = torch.tensor([[1, 5, 9, 30, 7, 100, 3, 8, 2, 4]])
    with torch.no_grad():
        torch.testing.assert_close(my_model(ids).logits, loaded(ids).logits, rtol=0.02, atol=0.02)


def test_int8_lora_without_bitsandbytes_is_refused_as_documented(int8_folder: Path) -> None:
    """docs/python-api.md, "LoRA with PEFT": register_lora is 4-bit only; without bitsandbytes PEFT
    refuses the int8 layers, with or without it."""
    import subprocess
    import sys

    from loader_helpers import hiding

    pytest.importorskip("peft")
    script = hiding("bitsandbytes") + (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import peft\n"
        "from converter.loader.lora import register_lora\n"
        "from converter.loader.model import load_quantized\n"
        f"model = load_quantized({str(int8_folder)!r})\n"
        "for config in (peft.LoraConfig(r=2, target_modules=['q_proj']),\n"
        "               register_lora(peft.LoraConfig(r=2, target_modules=['q_proj']))):\n"
        "    try:\n"
        "        peft.get_peft_model(model, config)\n"
        "    except ValueError as exc:\n"
        "        print('refused' if 'QuantLinear8bit' in str(exc) and 'not supported' in str(exc) else exc)\n"
        "    else:\n"
        "        print('wrapped')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert out.stdout.split() == ["refused", "refused"], out.stderr[-2000:]


def test_adapter_reload_without_bitsandbytes_runs_as_documented(our_folder: Path, tmp_path: Path) -> None:
    """docs/python-api.md, "LoRA with PEFT": plain PeftModel.from_pretrained fails without bitsandbytes
    ("Target module QuantLinear4bit ... is not supported"); the documented call reloads the adapter."""
    import subprocess
    import sys

    from loader_helpers import hiding

    pytest.importorskip("peft")
    code = _example("Reloading a saved adapter without bitsandbytes")
    assert '"./llama-8b-nf4"' in code
    assert '"./my-adapter"' in code
    code = code.replace('"./llama-8b-nf4"', repr(str(our_folder))).replace(
        '"./my-adapter"', repr(str(tmp_path / "adapter"))
    )
    script = hiding("bitsandbytes") + (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch, peft\n"
        "from converter.loader.lora import register_lora\n"
        "from converter.loader.model import load_quantized\n"
        "ids = torch.tensor([[1, 2, 3, 4]])\n"
        f"trained = load_quantized({str(our_folder)!r})\n"
        "config = peft.LoraConfig(r=2, target_modules=['q_proj', 'v_proj'], init_lora_weights=False)\n"
        "trained = peft.get_peft_model(trained, register_lora(config))\n"
        f"trained.save_pretrained({str(tmp_path / 'adapter')!r})\n"
        f"try:\n    peft.PeftModel.from_pretrained(load_quantized({str(our_folder)!r}), "
        f"{str(tmp_path / 'adapter')!r})\n"
        "except ValueError as exc:\n    print('plain:', 'not supported' in str(exc))\n"
        + code
        + "with torch.no_grad():\n"
        "    print('same:', torch.equal(model(ids).logits, trained(ids).logits))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert out.stdout.split() == ["plain:", "True", "same:", "True"], out.stderr[-2000:]


def test_convert_example_runs_and_names_every_keyword(
    plain_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/python-api.md, "Conversion": the example runs, and it (or, for dry_run and preflight, the
    paragraph after it) names every keyword of convert(): it lacked int8_threshold and int8_scale."""
    import inspect
    import shutil

    from converter import convert

    code = _example("## Conversion")
    text = DOC.read_text()
    section = text[text.index("## Conversion") : text.index("## Loading a quantized checkpoint")]
    named = set(re.findall(r"\b(\w+)=", section))
    missing = [k for k in list(inspect.signature(convert).parameters)[2:] if k not in named]
    assert not missing, f"docs/python-api.md's convert example does not name {missing}"
    shutil.copytree(plain_llama, tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("progress=True", "progress=False"), "python-api.md", "exec"), {})
    assert (tmp_path / "my-model-nf4" / "config.json").exists()
