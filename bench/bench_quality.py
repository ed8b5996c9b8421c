"""Cost of the quality statistics (converter/record/quality.py) in a real conversion: A/B, interleaved.

Converts SmolLM2-135M (bf16, from converter.tools.samples) with the statistics on (as shipped) and off (the
meter's hooks replaced by no-ops), alternating, best of N each; prints the ratio and the time the
report attributes to the statistics. Run from outside the checkout:
    cd /tmp && /path/to/.venv/bin/python /path/to/bench/bench_quality.py [N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

from converter.record import quality
from converter.tools.samples import smollm2
from converter.writer.pipeline import convert


def run(src: Path, out: Path, on: bool) -> tuple[float, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    saved = (quality.QualityMeter.measured, quality.QualityMeter.kept)
    if not on:
        quality.QualityMeter.measured = lambda self, name, *a: self._pending.pop(name)  # type: ignore[method-assign]
        quality.QualityMeter.kept = lambda self, *a: None  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        convert(src, out, progress=False)
        total = time.perf_counter() - t0
    finally:
        quality.QualityMeter.measured, quality.QualityMeter.kept = saved
    report = json.loads((out / "quantization_report.json").read_text())
    t = report["timings"]
    return total, t["seconds_quality"], t["seconds_quality_waited"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", nargs="?", type=int, default=5, help="conversions each way (best of N)")
    n = ap.parse_args().n
    src = smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        run(src, out, True)  # warm the page cache
        on, off, inside, waited = [], [], [], []
        for _ in range(n):
            t, q, w = run(src, out, True)
            on.append(t)
            inside.append(q)
            waited.append(w)
            off.append(run(src, out, False)[0])
    print(f"source: {src} ({sum(f.stat().st_size for f in src.glob('*.safetensors')) / 1e6:.0f} MB)")
    print(f"convert with quality:    best {min(on):.3f} s  (all: {', '.join(f'{x:.3f}' for x in on)})")
    print(f"convert without quality: best {min(off):.3f} s  (all: {', '.join(f'{x:.3f}' for x in off)})")
    print(f"ratio best/best: {min(on) / min(off):.3f}; ratio of medians: {median(on) / median(off):.3f}")
    print(
        f"statistics thread busy: best {min(inside):.3f} s (overlapped); pipeline waited for it: "
        f"best {min(waited):.3f} s = {100 * min(waited) / min(on):.1f}% of the conversion"
    )


if __name__ == "__main__":
    main()
