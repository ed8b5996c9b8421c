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
