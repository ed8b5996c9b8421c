"""A whole loading process, as a user's script runs it: interpreter start, imports, load, first forward,
side by side. Each contender imports only what its script needs (bench_generate.py --load, by contrast,
imports every contender's modules before its clock starts, to time the load call alone).

    python bench/bench_load_process.py [--model FOLDER] [--workdir .cache/bench]
        [--folder NF4_FOLDER] [--device cpu|cuda] [--cases ...] [--repeat 5] [--json out.json]

Each run is a fresh ``python -c`` (wall time from before the interpreter starts to the end of the first
forward of 4 tokens, synchronized on CUDA; the folder is read once before, so every contender starts
from a warm page cache):
- ours: ``import torch; from converter import load_quantized`` then ``load_quantized(folder, device)``,
  with PEFT and bitsandbytes installed (neither is imported: converter/loader/bnb_optional.py);
- ours verify: the same with ``verify=True``;
- ours no PEFT: ``ours`` where PEFT cannot be found (an install without it);
- ours after import peft: ``import peft`` first, as a fine-tuning script does (PEFT imports
  bitsandbytes, so our layers are bnb's classes from the start: what every loading process with PEFT
  installed paid before bitsandbytes was left to the process);
- transformers + bnb: ``AutoModelForCausalLM.from_pretrained(folder, device_map=device)`` on the same
  folder.
With ``--before-pythonpath DIR``, ``ours`` also runs from that checkout (the code before a change) as
``ours before``, in the same interleaved rounds. Runs are interleaved; the median and the fastest of
--repeat are printed. The folder is --folder, or our NF4 conversion of --model (bench_load.prepare).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_load import prepare, smollm2_sample
from need_cuda import require_cuda

REPO = Path(__file__).resolve().parents[1]

HIDE_PEFT = """
import importlib.abc, importlib.util, sys
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "peft":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Hide())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda n, p=None: None if n.split(".")[0] == "peft" else _find_spec(n, p)
"""

# argv: folder, device. The last line says whether the process imported bitsandbytes.
FORWARD = """
with torch.no_grad():
    model(torch.tensor([[1, 2, 3, 4]], device=sys.argv[2]))
if sys.argv[2] == "cuda":
    torch.cuda.synchronize()
print("bnb imported" if "bitsandbytes" in sys.modules else "bnb not imported")
"""

OURS = (
    """
import sys, torch
from converter import load_quantized
model = load_quantized(sys.argv[1], device=sys.argv[2])
"""
    + FORWARD
)

OURS_VERIFY = OURS.replace(
    "load_quantized(sys.argv[1], device=sys.argv[2])",
    "load_quantized(sys.argv[1], device=sys.argv[2], verify=True)",
)

BNB = (
    """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map=sys.argv[2])
"""
    + FORWARD
)

CASES = {
    "ours": OURS,
    "ours verify": OURS_VERIFY,
    "ours no PEFT": HIDE_PEFT + OURS,
    "ours after import peft": "import peft" + OURS,
    "transformers + bnb": BNB,
}
DEFAULT_CASES = ("ours", "ours no PEFT", "transformers + bnb")


def run(code: str, folder: Path, device: str, pythonpath: str | None = None) -> tuple[float, str]:
    # A user's default environment: no TORCHDYNAMO_DISABLE (set by our test targets), which also makes
    # the imports that touch torch._dynamo (bitsandbytes' among them) cheaper than users see them.
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", code, str(folder), device]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return wall, out.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(  # as every benchmark: SmolLM2 from $QM_SAMPLES_DIR, else ./.cache/samples
        "--model", type=Path, help="a bf16 folder to convert (default: SmolLM2-135M, built once)"
    )
    ap.add_argument("--workdir", type=Path, default=REPO / ".cache/bench")
    ap.add_argument("--folder", type=Path, help="an NF4 folder to load (default: --model converted)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, of {list(CASES)}")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--before-pythonpath", help="also run 'ours' from this checkout, as 'ours before'")
    args = ap.parse_args()
    if args.device == "cuda":
        require_cuda(__file__)
    cases = {c: CASES[c] for c in args.cases.split(",")}
    paths: dict[str, str | None] = dict.fromkeys(cases)
    if args.before_pythonpath:
        cases["ours before"] = OURS
        paths["ours before"] = args.before_pythonpath
    folder = args.folder
    if folder is None:
        folder = prepare(args.model or smollm2_sample(), args.workdir)
    for p in folder.iterdir():  # warm page cache for every contender
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass
    times: dict[str, list[float]] = {case: [] for case in cases}
    notes: dict[str, str] = {}
    for _ in range(args.repeat):
        for case, code in cases.items():
            wall, notes[case] = run(code, folder, args.device, paths[case])
            times[case].append(wall)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, device {args.device}; folder {folder}; "
          f"{args.repeat} runs each; load average {os.getloadavg()}")  # fmt: skip
    rows = []
    for case, ts in times.items():
        row = dict(case=case, median_s=statistics.median(ts), best_s=min(ts), runs=ts, note=notes[case])
        rows.append(row)
        print(f"  {case:<20} median {row['median_s']:.2f} s  best {row['best_s']:.2f} s  ({notes[case]})")
    if args.json:
        info = dict(machine=platform.machine(), cpus=os.cpu_count(), device=args.device, folder=str(folder),
                    rows=rows)  # fmt: skip
        args.json.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
