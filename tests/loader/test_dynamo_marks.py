"""converter.loader.dynamo_marks sets what torch's own functions set, without importing torch._dynamo."""

from __future__ import annotations

import ast
import subprocess
import sys

from loader_helpers import hiding

from converter.loader import dynamo_marks


def _child(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_marks_equal_torchs_own_without_importing_dynamo() -> None:
    marks = _child("""
import sys, torch
from converter.loader import dynamo_marks
def f():
    return True
t = torch.zeros(2)
dynamo_marks.assume_constant_result(f)
dynamo_marks.mark_static_address(t)
assert "torch._dynamo" not in sys.modules, "dynamo_marks imported torch._dynamo"
print(repr((dict(vars(f)), {k: getattr(t, k) for k in dir(t) if k.startswith("_dynamo")})))
""")
    fn_marks, tensor_marks = ast.literal_eval(marks)
    import torch._dynamo

    def g() -> bool:
        return True

    u = torch.zeros(2)
    torch.compiler.assume_constant_result(g)
    torch._dynamo.mark_static_address(u)
    assert fn_marks
    assert fn_marks == dict(vars(g))
    assert tensor_marks
    assert tensor_marks == {k: getattr(u, k) for k in dir(u) if k.startswith("_dynamo")}


def test_our_layers_do_not_import_dynamo() -> None:
    # Without PEFT, bitsandbytes (which imports dynamo itself) is not imported either: nothing is.
    code = "import converter.loader.model, converter.loader.int8_ops; print('torch._dynamo' in sys.modules)"
    assert _child(hiding("peft") + code) == "False"


def test_dynamo_marks_defer_to_torch_once_dynamo_is_imported() -> None:
    import torch._dynamo  # noqa: F401

    def h() -> int:
        return 1

    assert dynamo_marks.assume_constant_result(h) is h
    assert getattr(h, "_dynamo_marked_constant", False)
