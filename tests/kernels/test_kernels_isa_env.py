"""QM_CPU_ISA (set by pytest --isa, make test-isa) forces the path of every isa="auto" kernel call."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import codebook_tensor

from converter.kernels import bnb4bit as kernels
from formats.quant_types import QuantType


def _gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, isa: str) -> torch.Tensor:
    qm = codebook_tensor(QuantType.NF4)
    return kernels.gemv_4bit(
        x, packed, absmax, out_features=16, in_features=4096, blocksize=64, quant_map=qm, isa=isa
    )


def test_auto_takes_the_forced_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The GEMV's paths differ in float32 summation order, so its bits show which path ran.
    w = torch.randn(16, 4096, generator=torch.Generator().manual_seed(0))
    packed, absmax = kernels.quantize_4bit(w, blocksize=64, quant_type=QuantType.NF4)
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(1))
    explicit = {isa: _gemv(x, packed, absmax, isa) for isa in kernels.cpu_isas()}
    for isa in kernels.cpu_isas():
        monkeypatch.setenv("QM_CPU_ISA", isa)
        assert torch.equal(_gemv(x, packed, absmax, "auto"), explicit[isa]), isa
        monkeypatch.setenv("QM_CPU_ISA", "scalar")  # an explicit isa is never overridden
        assert torch.equal(_gemv(x, packed, absmax, isa), explicit[isa]), isa
    if len(explicit) > 1:  # the check above can tell the paths apart
        assert not torch.equal(explicit["scalar"], explicit[kernels.cpu_isas()[-1]])
    monkeypatch.delenv("QM_CPU_ISA")
    assert torch.equal(_gemv(x, packed, absmax, "auto"), explicit[kernels.cpu_isas()[-1]])


def test_a_bad_or_unsupported_forced_isa_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(64)
    monkeypatch.setenv("QM_CPU_ISA", "avx1024")
    with pytest.raises(ValueError, match="QM_CPU_ISA: unknown isa 'avx1024'"):
        kernels.quantize_4bit(w, blocksize=64, quant_type=QuantType.NF4)
    missing = [isa for isa in ("avx2", "avx512", "avx512bf16") if isa not in kernels.cpu_isas()]
    for isa in missing:  # never silently another path
        monkeypatch.setenv("QM_CPU_ISA", isa)
        with pytest.raises(ValueError, match=f"QM_CPU_ISA={isa}: this CPU does not support that path"):
            kernels.quantize_4bit(w, blocksize=64, quant_type=QuantType.NF4)


def test_a_bad_forced_isa_is_an_input_error_before_any_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """QM_CPU_ISA=neon was an "unexpected ValueError" (exit 1) after convert had created its output
    folder, `info` said nothing, and load_quantized failed only at the first forward. (`info` exits 0 since
    round 38 and warns: it is what one runs to find out what is wrong.)"""
    from click.testing import CliRunner

    from converter.cli import cli
    from converter.errors import InputError
    from converter.loader.model import load_quantized

    monkeypatch.setenv("QM_CPU_ISA", "neon")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "any-source"), str(out)])
    assert r.exit_code == 2
    assert "QM_CPU_ISA='neon': unknown kernel path" in r.output
    assert not out.exists()
    r = CliRunner().invoke(cli, ["info"])  # the diagnosis command reports, naming the bad value
    assert r.exit_code == 0
    assert "QM_CPU_ISA='neon': unknown kernel path" in r.output
    with pytest.raises(InputError, match="QM_CPU_ISA='neon'"):
        load_quantized(tmp_path / "any-folder")
    monkeypatch.setenv("QM_CPU_ISA", "scalar")
    r = CliRunner().invoke(cli, ["info"])
    assert r.exit_code == 0
    assert "QM_CPU_ISA forces scalar" in r.output
