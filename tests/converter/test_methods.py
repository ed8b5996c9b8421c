"""Quant methods as plug-ins: one registry, the same contract for every method, no scattered type tests."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from converter import methods
from converter.methods.base import QuantMethod
from converter.plan.tensor_plan import Options

ROOT = Path(__file__).resolve().parents[2]


def test_registry_names_and_lookup() -> None:
    assert methods.method_names() == ("nf4", "fp4", "int8")
    assert methods.get_method("INT8").name == "int8"
    with pytest.raises(ValueError, match="unknown quant type 'int4': expected one of 'nf4', 'fp4', 'int8'"):
        methods.get_method("int4")
    with pytest.raises(ValueError, match="registered twice"):
        methods.register(methods.get_method("nf4"))
    assert all(isinstance(methods.get_method(n), QuantMethod) for n in methods.method_names())


def test_options_json_keeps_each_methods_own_fields() -> None:
    nf4 = Options(quant_type="nf4").to_json()
    assert "int8_threshold" not in nf4  # 4-bit plans and shard metadata are as before int8 existed
    assert "int8_scale" not in nf4
    int8 = Options(quant_type="int8", int8_threshold=0.0, int8_scale="cuda").to_json()
    assert (int8["int8_threshold"], int8["int8_scale"]) == (0.0, "cuda")
    with pytest.raises(ValueError, match="--int8-scale 'gpu'"):
        Options(quant_type="int8", int8_scale="gpu")
    with pytest.raises(ValueError, match="--int8-threshold"):
        Options(quant_type="int8", int8_threshold=-1.0)


def test_registry_import_stays_light() -> None:
    code = "import sys, converter.methods; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


FLOW = ["writer/pipeline.py", "plan/tensor_plan.py", "tools/inspection.py", "tools/push.py", "cli/convert.py"]
FLOW += [f"loader/{p.name}" for p in sorted((ROOT / "converter" / "loader").glob("*.py"))]


@pytest.mark.parametrize("path", [f"converter/{p}" for p in FLOW])
def test_flow_modules_ask_the_method_instead_of_testing_the_type(path: str) -> None:
    text = (ROOT / path).read_text()
    # a comparison with a named type ("int8", QuantType.NF4, a tuple of names) is dispatch by hand;
    # comparing two records' types with each other (loader/moe.py: experts agree) is not
    assert not re.search(r"""quant_type\s*(==|!=)\s*(["']|QuantType\.)|quant_type\s+in\s*\(""", text), path
    assert not re.search(r"""["']int8["']\s*(==|!=)|(==|!=)\s*["']int8["']""", text), path


def test_report_does_not_import_pipeline() -> None:
    tree = ast.parse((ROOT / "converter/writer/report.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "converter.writer.pipeline" not in imported
    assert "converter.version" in imported


def test_int8_refuses_quantized_moe_experts() -> None:
    with pytest.raises(ValueError, match="--moe-experts quantize writes 4-bit expert records"):
        Options(quant_type="int8", moe_experts="quantize")
