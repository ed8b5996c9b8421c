"""The benchmark scripts as a checker reruns them: from outside the source tree, with the command lines
their docstrings and docs/benchmarks.md show, measuring what they say they measure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))


def _run_outside(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """``cd tmp_path && python bench/<script> args``, the checkout on PYTHONPATH (as the docs say)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(BENCH / script), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_decode_ab_cpu_clock_keeps_every_launch_on_the_timed_thread() -> None:
    """``--clock cpu`` times the main thread's CPU time: the shipped policy hands SmolLM2's 56 MB bf16
    head (and any launch of 1 MB of codes or more) to the pool's threads at one torch thread, whose
    work that clock never sees; every contender's launches must stay on the calling thread."""
    import bench_cpu_decode_ab as ab
    import torch

    from converter.kernels import cpu_threads

    head_bytes = 49152 * 576 * 2
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cpu_threads.gemv_threads(head_bytes) == 0  # the pool: why the cpu clock needs its own
        policy, caller = ab.thread_policies("cpu")
        assert policy(head_bytes) == 1
        assert policy(1 << 30) == 1
        assert caller(head_bytes) == 1
        policy, caller = ab.thread_policies("wall")
        assert policy is cpu_threads.gemv_threads
        assert caller(head_bytes) == 1
    finally:
        torch.set_num_threads(saved)


def test_bf16dot_times_ours_on_any_cpu() -> None:
    """Without AVX-512 the table had bitsandbytes and F.linear only: ours must stand beside them."""
    import bench_cpu_gemv_bf16dot as b

    from converter.kernels import bnb4bit

    assert b.ours_isas(["scalar", "avx2"]) == ["ours avx2"]
    assert b.ours_isas(["scalar", "avx2", "avx512"]) == ["avx512"]
    assert b.ours_isas(["scalar", "avx2", "avx512", "avx512bf16"]) == ["avx512", "avx512bf16"]
    fns = b.contenders(64, 128, 1)
    ours = [name for name in fns if name not in ("bnb Linear4bit", "bf16 F.linear")]
    assert ours == b.ours_isas(bnb4bit.cpu_isas())
    for name in ours:
        assert fns[name]().shape == (1, 64)  # the isa the name carries is one the kernel takes


def test_quality_help_and_count(tmp_path: Path) -> None:
    """``bench_quality.py [N]``: --help answers (it parsed '--help' as N and raised ValueError)."""
    r = _run_outside(tmp_path, "bench_quality.py", "--help")
    assert r.returncode == 0, r.stderr
    assert "[n]" in r.stdout
    r = _run_outside(tmp_path, "bench_quality.py", "two")
    assert r.returncode == 2
    assert "invalid int value: 'two'" in r.stderr


def test_convert_makes_its_workdir(tmp_path: Path) -> None:
    """``--workdir DIR`` that does not exist yet: made, not a FileNotFoundError from mkdtemp."""
    work = tmp_path / "not" / "yet"
    r = _run_outside(tmp_path, "bench_convert.py", "--layers", "1", "--hidden", "256", "--workdir", str(work))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wall time ratio ours / plain copy" in r.stdout
    assert work.is_dir()
    assert not list(work.iterdir())


def test_documented_command_lines_run_from_outside_the_checkout() -> None:
    """``cd /tmp && python bench/X.py`` cannot work (there is no bench/ in /tmp): the docs and the
    docstrings show the script's path instead."""
    bad = re.compile(r"cd /tmp && \S*python3? bench/")
    files = [*BENCH.glob("*.py"), *(ROOT / "docs").glob("*.md")]
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if bad.search(line)
    ]
    assert not found


def test_offload_takes_smollm2_from_the_shared_samples_dir(monkeypatch, tmp_path: Path) -> None:
    """SmolLM2 comes from QM_SAMPLES_DIR (else ./.cache/samples), as for every other benchmark; the
    offload benchmark read QM_SAMPLES and defaulted to a folder of its own (a second download)."""
    import bench_offload

    from converter.tools.samples import DEFAULT_SAMPLES_DIR

    monkeypatch.delenv("QM_SAMPLES_DIR", raising=False)
    assert bench_offload.build_parser().parse_args([]).samples == str(DEFAULT_SAMPLES_DIR)
    monkeypatch.setenv("QM_SAMPLES_DIR", str(tmp_path))
    assert bench_offload.build_parser().parse_args([]).samples == str(tmp_path)


@pytest.mark.parametrize("script", ["bench_load", "bench_load_process"])
def test_load_benchmarks_take_smollm2_from_the_shared_samples_dir(
    monkeypatch, tmp_path: Path, script: str
) -> None:
    """docs/benchmarks.md: SmolLM2 is built once in $QM_SAMPLES_DIR, else ./.cache/samples of the current
    folder. bench_load.py and bench_load_process.py built it in the checkout's .cache/samples whatever
    QM_SAMPLES_DIR said (a second 270 MB build), and took a --model at that path for the sample."""
    import importlib

    from converter.tools import samples

    asked: list[Path] = []

    class Built(Exception):
        pass

    def smollm2(samples_dir: Path = samples.DEFAULT_SAMPLES_DIR) -> Path:
        asked.append(Path(samples_dir))
        raise Built

    monkeypatch.setattr(samples, "smollm2", smollm2)
    main = importlib.import_module(script).main
    monkeypatch.chdir(tmp_path)
    for env, expected in (
        (str(tmp_path / "shared"), tmp_path / "shared"),
        (None, samples.DEFAULT_SAMPLES_DIR),
    ):
        if env is None:
            monkeypatch.delenv("QM_SAMPLES_DIR", raising=False)
        else:
            monkeypatch.setenv("QM_SAMPLES_DIR", env)
        monkeypatch.setattr(sys, "argv", [script, "--workdir", str(tmp_path / "work")])
        with pytest.raises(Built):
            main()
        assert asked.pop() == expected


def test_every_scripts_help_starts_with_its_docstring() -> None:
    """docs/benchmarks.md: `python bench/X.py --help` prints the docstring's first line and the flags;
    probe_warmup.py's parser had no description (flags only). cpu_timing.parse_args takes its
    callers' description, parse_args(__doc__...)."""
    plain = []
    for path in sorted(BENCH.glob("*.py")):
        calls = re.findall(r"(ArgumentParser|(?<![\w.])parse_args)\(([^)]*)\)", path.read_text())
        parsers = [
            args
            for name, args in calls
            if "add_help=False" not in args and (name == "ArgumentParser" or args)
        ]
        if path.name != "cpu_timing.py" and any("__doc__" not in args for args in parsers):
            plain.append(path.name)
    assert not plain, f"a parser without the docstring's first line as its description: {plain}"


#: Each GPU benchmark's command line (docstrings, docs/benchmarks.md), small settings.
CUDA_COMMANDS = [
    "bench_cuda.py --quick",
    "bench_cuda_convert.py --layers 1 --workdir {tmp}",
    "bench_cuda_host.py --layers 1 --hidden 256",
    "bench_gemv_cuda.py --replays 1",
    "bench_gemv_multi_cuda.py --replays 1",
    "bench_int8.py --device cuda",
    "bench_int8_cuda.py",
    "bench_moe_gemv_cuda.py --replays 1",
    "bench_route_topk.py",
    "probe_warmup.py",
    "profile_gemv.py 4096x4096",
    "profile_graphed.py --layers 1",
    "profile_moe_gemv.py",
    "bench_linear_overhead.py --device cuda",
    "bench_stream.py --device cuda --gb 0.01 --file {tmp}/stream.bin",
    "bench_generate.py --device cuda --model random-8b --layers 1 --workdir {tmp}",
    "bench_moe.py --device cuda --layers 1 --workdir {tmp}",
    "bench_llama4.py --device cuda --layers 1 --workdir {tmp}",
    "profile_decode.py --device cuda --layers 1 --workdir {tmp}",
    "bench_load_process.py --device cuda --folder {tmp} --repeat 1",
    "bench_offload.py --device cuda --model {tmp} --source {tmp}",
    "bench_e2e.py --rows gpu --gpu-layers 1 --gpu-hidden 256 --repeat 1 --workdir {tmp}",
]


@pytest.mark.slow
@pytest.mark.parametrize("command", CUDA_COMMANDS)
def test_gpu_benchmark_without_a_gpu_says_so(command: str, tmp_path: Path) -> None:
    """Without a GPU a GPU benchmark stops at once with one line naming itself and the reason: it
    raised from inside torch ("Torch not compiled with CUDA enabled"), or timed the CPU conversion
    under its "--device cuda" label (bench_e2e --rows gpu, bench_cuda_convert), exit status 0."""
    from need_cuda import cuda_problem

    why = cuda_problem()
    if why is None:
        pytest.skip("a usable GPU: these benchmarks run")
    script, *args = command.format(tmp=tmp_path).split()
    r = _run_outside(tmp_path, script, *args)
    assert r.returncode == 1, r.stdout[-1000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    ours = f"needs a CUDA GPU and the converter's CUDA backend: {why}"
    older = f"{script} needs the CUDA backend: {why}"  # bench_cuda.py, the GEMV benchmarks
    assert last.startswith(script.removesuffix(".py")), last  # bench_int8.py: bench_int8_cuda.py
    assert last.endswith(ours) or last == older, last
    assert "quantize-model convert --device cuda" not in r.stdout  # no CPU time under the GPU's label


def test_session_script_profile_gemv_arguments_parse() -> None:
    """``cuda_session_run.sh benchsmoke`` ran ``profile_gemv.py 0 11``: shapes '0' and '11' (meant:
    variant 11), a ValueError on the GPU machine. Every profile_gemv command line there must parse."""
    import shlex

    import profile_gemv

    text = (BENCH / "cuda_session_run.sh").read_text()
    calls = re.findall(r"profile_gemv\.py([^&;\"|]*)", text)
    assert calls
    for call in calls:
        args = profile_gemv.build_parser().parse_args(shlex.split(call))
        assert all(out_f > 0 and in_f > 0 for out_f, in_f in args.shapes)
    with pytest.raises(SystemExit):
        profile_gemv.build_parser().parse_args(["0", "11"])


@pytest.mark.parametrize(
    "command",
    [
        "bench_generate.py --device cpu --model {tmp} --modes eager,compiled",
        "bench_generate.py --device cpu --model {tmp} --modes graphed-compiled",
        "bench_cpu_decode_ab.py --only ours,bf16_compiled --workdir {tmp}",
        "probe_compile_host.py --layers 1 --workdir {tmp}",
        "profile_graphed.py --compile-step --workdir {tmp}",
    ],
)
def test_compiled_rows_refuse_torchdynamo_disable(command: str, tmp_path: Path, monkeypatch) -> None:
    """TORCHDYNAMO_DISABLE=1 (set by our test targets) makes torch.compile return the eager function:
    the rows labelled compiled silently timed the eager model. They stop first, naming the variable."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    script, *args = command.format(tmp=tmp_path).split()
    r = _run_outside(tmp_path, script, *args)
    assert r.returncode == 1, r.stdout[-1000:] + r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(script.removesuffix(".py")), last
    assert "needs torch.compile, but TORCHDYNAMO_DISABLE=1 turns it off" in last


def test_llama4_keep_layer_names_the_missing_folder(tmp_path: Path) -> None:
    """Without the keep folder (bench_llama4.py makes it) it raised SourceNotFoundError from inside
    load_quantized; now a usage error naming the folder and the command that makes it."""
    folder = tmp_path / "llama4-small-6l-nf4-keep"
    r = _run_outside(tmp_path, "bench_llama4_keep_layer.py", str(folder))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert f"{folder}: no converted folder there" in r.stderr
    assert "bench_llama4.py --moe-experts keep --only ours" in r.stderr


def test_gemv_cold_times_both_kernels_from_dram_and_cached(tmp_path: Path) -> None:
    """bench_cpu_gemv_cold.py as the docs run it: a row per kernel for the forced path, both columns."""
    out = _run_outside(tmp_path, "bench_cpu_gemv_cold.py", "--rounds", "1", "--isas", "avx2")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["4bit"], ["int8"])]
    assert [r[:2] for r in rows] == [["4bit", "avx2"], ["int8", "avx2"]]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
