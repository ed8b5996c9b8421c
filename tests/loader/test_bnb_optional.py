"""converter.loader.bnb_optional: callbacks run right after bitsandbytes' import, whoever imports it;
importing PEFT imports bitsandbytes.

Each case runs in a child process whose ``bitsandbytes`` is a stand-in package on PYTHONPATH (its
import must not have happened yet, and the real one's import is what the hook exists to avoid).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from loader_helpers import hiding


def _run(tmp_path: Path, script: str, bitsandbytes: str = "IMPORTED_BY_STAND_IN = True\n") -> str:
    # PEFT's stand-in imports nothing, as PEFT 0.22 does not import bitsandbytes
    for name, text in [("bitsandbytes", bitsandbytes), ("peft", "")]:
        package = tmp_path / "site" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(text)
    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_callbacks_run_after_the_import_completes_and_the_hook_leaves(tmp_path: Path) -> None:
    out = _run(
        tmp_path,
        """
import sys, warnings
from converter.loader import bnb_optional
seen = []
bnb_optional.when_imported(lambda m: seen.append(("first", m.IMPORTED_BY_STAND_IN)))
def broken(m):
    raise ValueError("boom")
bnb_optional.when_imported(broken)
bnb_optional.when_imported(lambda m: seen.append(("after the broken one", m.__name__)))
assert bnb_optional.imported() is None and not seen
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import bitsandbytes  # the import succeeds although a callback raised
assert seen == [("first", True), ("after the broken one", "bitsandbytes")], seen
assert any("ValueError: boom" in str(w.message) and "register_lora" in str(w.message) for w in caught)
assert not any(type(f).__name__ == "_AfterImport" for f in sys.meta_path), "the hook stays installed"
assert bnb_optional.imported() is bitsandbytes
bnb_optional.when_imported(lambda m: seen.append("now"))  # already imported: runs at once
assert seen[-1] == "now"
print("ok")
""",
    )
    assert out.strip().endswith("ok")


def test_importing_peft_imports_bitsandbytes(tmp_path: Path) -> None:
    """PEFT 0.22 imports bitsandbytes only when it dispatches a layer, after its transformers-5 target
    conversion judged our layers by type (bitsandbytes' nn.Linear subclasses or not): a process that
    imports PEFT imports bitsandbytes at once, whether PEFT comes after our layers or before them."""
    out = _run(
        tmp_path,
        """
import sys
from converter.loader import bnb_optional
seen = []
bnb_optional.when_imported(lambda m: seen.append(m.IMPORTED_BY_STAND_IN))
assert "bitsandbytes" not in sys.modules
import peft
assert seen == [True], seen
print("ok")
""",
    )
    assert out.strip() == "ok"
    out = _run(
        tmp_path / "peft first",
        """
import sys
import peft
assert "bitsandbytes" not in sys.modules
from converter.loader import bnb_optional
seen = []
bnb_optional.when_imported(lambda m: seen.append(m.IMPORTED_BY_STAND_IN))
assert seen == [True], seen
print("ok")
""",
    )
    assert out.strip() == "ok"


def test_a_failing_bitsandbytes_import_is_reported_once_and_peft_still_imports(tmp_path: Path) -> None:
    out = _run(
        tmp_path,
        """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import peft
    from converter.loader import module, module_int8  # two layer classes: not tried again
assert not module.HAS_BITSANDBYTES
messages = [str(w.message) for w in caught if "its import failed" in str(w.message)]
assert len(messages) == 1 and "OSError: no libcudart" in messages[0], messages
print("ok")
""",
        bitsandbytes='raise OSError("no libcudart")\n',
    )
    assert out.strip() == "ok"


def test_an_uninstalled_bitsandbytes_stays_missing() -> None:
    script = (
        hiding("bitsandbytes")  # an install without it
        + """
import importlib.util
from converter.loader import bnb_optional
bnb_optional.when_imported(lambda m: print("never"))
assert importlib.util.find_spec("bitsandbytes") is None
import peft  # noqa: F401  (with it installed, this imports bitsandbytes)
try:
    import bitsandbytes  # noqa: F401
except ModuleNotFoundError as exc:
    assert exc.name == "bitsandbytes", exc.name
    print("ok")
"""
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_layers_of_this_process_are_bitsandbytes_classes() -> None:
    # The test process imports bitsandbytes (conftest, PEFT): layers built now take bnb's classes.
    bnb = pytest.importorskip("bitsandbytes")
    from converter.loader import module, module_int8

    assert module.HAS_BITSANDBYTES
    assert issubclass(module.Linear4bit, bnb.nn.Linear4bit)
    assert issubclass(module_int8.Linear8bit, bnb.nn.Linear8bitLt)
    assert module.quant_state_class() is bnb.functional.QuantState
    # A layer built as our plain class after the import is bnb's class too, weight and state included.
    import torch

    from converter.kernels import bnb4bit as kernels
    from formats.quant_types import QuantType
    from formats.record import QuantizedTensor

    packed, absmax = kernels.quantize_4bit(torch.randn(32, 128), blocksize=64, quant_type=QuantType.NF4)
    record = QuantizedTensor.from_kernel_outputs(
        "w", (32, 128), "float32", QuantType.NF4, 64, packed, absmax, kernels.quantize_nested(absmax)
    )
    layer = module.QuantLinear4bit.from_record(record)
    assert type(layer) is module.Linear4bit
    assert isinstance(layer.weight, bnb.nn.Params4bit)
    assert isinstance(layer.weight.quant_state, bnb.functional.QuantState)
    codes = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    layer8 = module_int8.QuantLinear8bit(codes, torch.rand(8, dtype=torch.float16) + 1)
    assert type(layer8) is module_int8.Linear8bit
    assert isinstance(layer8.state, bnb.MatmulLtState)
