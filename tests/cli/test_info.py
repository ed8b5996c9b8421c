"""quantize-model info / --version: what this installation can run."""

from __future__ import annotations

import json

from converter import __version__
from converter.kernels import bnb4bit as kernels


def test_info_json_lists_cpu_paths_and_cuda_state(qm) -> None:
    r = qm("info", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["version"] == __version__
    assert report["format_version"] == 1
    assert report["cpu"]["isa"] == kernels.cpu_isas()
    assert report["cpu"]["isa"][0] == "scalar"
    if report["cuda"] is None:
        assert report["cuda_unavailable_reason"]  # always says why
    else:
        assert report["cuda"]["devices"]
        assert report["cuda_unavailable_reason"] is None


def test_info_table_names_the_backends(qm) -> None:
    r = qm("info")
    assert r.exit_code == 0, r.output
    assert f"quantize-model  {__version__}" in r.stdout
    assert "CPU kernels" in r.stdout
    assert "CUDA kernels" in r.stdout


def test_version_names_the_kernels(qm) -> None:
    r = qm("--version")
    assert r.exit_code == 0
    assert r.stdout.startswith(f"quantize-model {__version__}\nkernels: cpu (")


def test_info_reports_a_bad_qm_cpu_isa_as_a_warning(qm, monkeypatch) -> None:
    """info, the command run to find out what is wrong, exited 2 on a bad QM_CPU_ISA and printed no
    report; it now prints it with one warning naming the value and the valid ones (convert still
    refuses it)."""
    monkeypatch.setenv("QM_CPU_ISA", "bogus")
    said = (
        "QM_CPU_ISA='bogus': unknown kernel path; use one of scalar, avx2, avx512, avx512bf16 or auto, "
        "or unset it"
    )
    r = qm("info")
    assert r.exit_code == 0, r.output
    assert r.stderr == f"Warning: {said}\n"
    assert f"quantize-model  {__version__}" in r.stdout
    assert "CPU kernels" in r.stdout
    r = qm("info", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert (report["cpu"]["forced"], report["cpu"]["forced_error"]) == (None, said)
    assert report["cpu"]["isa"] == kernels.cpu_isas()
    for command in ("convert", "dequantize"):  # dequantize said "unexpected ValueError", exit 1
        r = qm(command, "./no/such/model", "out")
        assert (r.exit_code, r.stderr) == (2, f"Error: {said}\n"), command


def test_info_json_has_no_forced_error_without_one(qm, monkeypatch) -> None:
    monkeypatch.setenv("QM_CPU_ISA", "scalar")
    r = qm("info", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["cpu"]["forced"] == "scalar"
    assert json.loads(r.stdout)["cpu"]["forced_error"] is None
    assert r.stderr == ""


def test_info_names_the_selection_tables_transformers_versions(qm, monkeypatch) -> None:
    """info says which transformers versions the shipped selection table is valid for, and whether the
    installed one is among them (else the first conversion of each model config imports transformers)."""
    from converter.plan import selection_table

    table = selection_table.load_table()
    two = {**table, "transformers": ["5.24.0", "5.25.0"]}
    monkeypatch.setattr(selection_table, "load_table", lambda: two)
    monkeypatch.setattr(selection_table, "transformers_version", lambda: "5.25.0")
    r = qm("info", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)["selection_table"]
    assert got["transformers"] == ["5.24.0", "5.25.0"]
    assert got["architectures"] == sorted(table["archs"])
    assert (got["installed"], got["used"]) == ("5.25.0", True)
    n = len(table["archs"])
    r = qm("info")
    want = f"shipped table of {n} architectures for transformers 5.24.0, 5.25.0 (used: 5.25.0 is installed)"
    assert f"Selection       {want}" in r.stdout
    monkeypatch.setattr(selection_table, "transformers_version", lambda: "5.26.0")
    assert json.loads(qm("info", "--json").stdout)["selection_table"]["used"] is False
    assert "(not used: transformers 5.26.0 is installed)" in qm("info").stdout
