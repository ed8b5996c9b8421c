"""The default CPU conversion, --version, inspect and verify never import torch or transformers.

Each command runs in a fresh interpreter that reports which heavy modules it imported: the import of
torch + transformers is what a user waited on (seconds) before the conversion started.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import transformers

from converter.plan import selection_table

PROBE = """
import json, sys
from converter.cli import main
sys.argv = ["quantize-model", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "transformers", "bitsandbytes") if m in sys.modules)
others = sorted(m for m in ("numpy", "huggingface_hub", "tqdm") if m in sys.modules)
print("PROBE " + json.dumps({"code": code, "heavy": heavy, "others": others}))
"""


def probe(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("PROBE "))
    got = json.loads(line.removeprefix("PROBE "))
    assert got["code"] in (0, None), r.stderr[-2000:]
    return got


def test_cpu_conversion_and_readers_import_no_torch(tiny_checkpoint, tmp_path: Path) -> None:
    src = tiny_checkpoint("llama_tied")
    first = probe("convert", str(src), str(tmp_path / "a"), "-q")
    if transformers.__version__ in selection_table.table_info()["transformers"]:
        assert first["heavy"] == []  # the shipped table decides
    # any other transformers version: the first run filled the per-user cache, the next one uses it
    assert probe("convert", str(src), str(tmp_path / "b"), "-q")["heavy"] == []
    assert (tmp_path / "b" / "model.safetensors").is_file()
    report = json.loads((tmp_path / "b" / "quantization_report.json").read_text())
    assert report["selection_via"] in ("table", "cache")
    assert probe("inspect", str(tmp_path / "b"))["heavy"] == []
    assert probe("verify", str(tmp_path / "b"))["heavy"] == []
    assert probe("--version")["heavy"] == []  # no GPU here: the CUDA check needs no torch


def test_int8_conversion_imports_no_torch(tiny_checkpoint, tmp_path: Path) -> None:
    """An int8 conversion imported torch (its quantizer, quality statistics and records were torch code):
    seconds of imports on a small model's conversion, most of its time. Now numpy through the extension,
    as 4-bit: the same bytes (tests/compat and tests/converter check them against bitsandbytes)."""
    src = tiny_checkpoint("llama_tied")
    probe("convert", str(src), str(tmp_path / "warm"), "-q")  # any transformers version: fills the cache
    got = probe("convert", str(src), str(tmp_path / "a"), "--quant-type", "int8", "-q")
    assert got["heavy"] == []
    report = json.loads((tmp_path / "a" / "quantization_report.json").read_text())
    assert report["summary"]["tensors_quantized"] > 0
    assert probe("verify", str(tmp_path / "a"))["heavy"] == []


def test_dtype_cast_is_where_torch_comes_in(tiny_checkpoint, tmp_path: Path) -> None:
    """--dtype casts with torch (transformers' rounding, tests/converter/test_pipeline checks the bytes)."""
    src = tiny_checkpoint("llama")  # bf16
    assert "torch" in probe("convert", str(src), str(tmp_path / "c"), "--dtype", "float32", "-q")["heavy"]


def test_help_and_local_commands_skip_numpy_and_the_hub(tiny_checkpoint, tmp_path: Path) -> None:
    """--help imported numpy (formats.codebooks computed its float32 thresholds with it, formats.validate
    its float32 range: ~0.15 s of a 0.3 s --help), and every command run with --json / -q / into a pipe
    imported huggingface_hub.utils (tqdm, asyncio, ssl: ~0.15 s) only to turn its progress bars off, even
    on a local folder that never reaches the Hub; inspect and verify imported numpy for the reader's map
    (np.memmap), which only a tensor read uses."""
    assert probe("--help")["others"] == []
    src = tiny_checkpoint("llama_tied")
    out = tmp_path / "out"
    assert "huggingface_hub" not in probe("convert", str(src), str(out), "-q")["others"]
    assert "huggingface_hub" not in probe("convert", str(src), str(out), "--json", "--overwrite")["others"]
    assert probe("inspect", str(out))["others"] == []
    assert probe("inspect", str(out), "--json")["others"] == []
    assert probe("verify", str(out), "-q")["others"] == []
