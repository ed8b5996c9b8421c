"""Quick GPU check of the torch-free ``--device cuda`` conversion: same bytes as ``--device cpu``, timed.

Writes a bf16 Llama-shaped checkpoint (``bench_e2e.write_llama``), converts it once untimed with
``--device cuda`` (``bench_e2e.check_cuda_path``: on the GPU? torch imported?), then times whole
processes of ``--device cuda``, ``--device cpu`` and a plain copy (page cache warm, rounds interleaved)
and compares every output file but the report byte for byte. Exit status 1 when the bytes differ or
the cuda conversion did not run on the GPU. Run from outside the source tree::

    cd /tmp && python /path/to/bench/bench_cuda_host.py --layers 4 --hidden 2048
"""

from __future__ import annotations

import argparse
import filecmp
import functools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e
from need_cuda import require_cuda


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    require_cuda(__file__, torch_free=True)  # before writing the checkpoint
    python = sys.executable
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-cuda-host-") as tmp:
        work = Path(tmp)
        src = work / "src"
        # written by a child: a contender's peak RSS (wait4) starts from the RSS of the process forking it
        shape = f"{args.layers}, {args.hidden}"
        bench_e2e.in_child(f"import bench_e2e; bench_e2e.write_llama(bench_e2e.Path({str(src)!r}), {shape})")
        total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        print(f"checkpoint: {total / 1e9:.2f} GB bf16, {args.layers} layers, hidden {args.hidden}")
        path = bench_e2e.check_cuda_path(python, src, work / "gpu")
        bench_e2e.run_rss(bench_e2e.ours_argv(python, "convert", str(src), str(work / "cpu"), "-q"))
        names = sorted(p.name for p in (work / "cpu").iterdir() if p.name != "quantization_report.json")
        match, differ, missing = filecmp.cmpfiles(work / "cpu", work / "gpu", names, shallow=False)
        print(f"  outputs: {len(match)} files identical, differ: {differ}, missing: {missing}")
        fresh = functools.partial(bench_e2e.fresh_run, work / "out")
        contenders = {
            "quantize-model convert --device cuda": fresh(
                bench_e2e.ours_argv(python, "convert", str(src), str(work / "out"), "--device", "cuda", "-q")
            ),
            "quantize-model convert --device cpu": fresh(
                bench_e2e.ours_argv(python, "convert", str(src), str(work / "out"), "-q")
            ),
            "plain copy (cp -r + sync)": fresh(
                ["sh", "-c", f"cp -r '{src}' '{work / 'out'}' && sync '{work / 'out'}'/*"]
            ),
        }
        bench_e2e.warm(src)
        res = bench_e2e.rounds(contenders, args.repeat)
        bench_e2e.report("warm page cache", res, "plain copy (cp -r + sync)", {})
    ok = not differ and not missing and path["device"] is not None and not path["torch_imported"]
    print("OK" if ok else "FAILED: bytes differ, the GPU was not used, or torch was imported")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
