"""The wheels a GPU device call carries in ``.whl/`` (the device machine has no network), made small.

The device machine has torch 2.11 (CUDA 13.0) but not bitsandbytes, nor the transformers we pin, nor
xxhash; they travel with the working tree, which may hold 64 MiB in all. bitsandbytes' wheel is 43 MB,
almost all of it builds for other CUDA, ROCm and XPU versions; kept: the CPU and CUDA 13.x libraries
(4 MB), so real weights (bench/quality_sample.py, 32 MB) fit beside the wheels.

    python bench/device_wheels.py [--dest .whl]    # then: run(..., carry=[".whl", ...])

Downloads with pip for the device's Python (cp312, manylinux x86-64) unless the wheel is already in
--dest, then rewrites bitsandbytes' wheel without the other libraries (its RECORD lists what is left).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = ("bitsandbytes==0.50.2", "transformers==5.24.0", "xxhash==4.1.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")  # fmt: skip
#: bitsandbytes' native libraries the device needs: the CPU backend and CUDA 13.x builds.
KEEP_LIB = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")


def download(requirement: str, dest: Path) -> None:
    name = requirement.split("==")[0]
    if any(dest.glob(f"{name}-{requirement.split('==')[1]}-*.whl")):
        return
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *platforms, "-d", str(dest), requirement]  # fmt: skip
    subprocess.run(cmd, check=True)


def trim_bitsandbytes(wheel: Path) -> tuple[int, int]:
    """Drop the libraries the device does not load; returns (bytes before, after)."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as src:
        names = [i.filename for i in src.infolist()]
        dropped = {n for n in names if n.endswith(".so") and not KEEP_LIB.search(n)}
        if not dropped:
            return before, before
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                if info.filename in dropped:
                    continue
                data = src.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(ln for ln in lines if ln.split(",")[0] not in dropped) + "\n").encode()
                out.writestr(info, data)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=REPO / ".whl")
    args = ap.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    for requirement in WHEELS:
        download(requirement, args.dest)
    for wheel in args.dest.glob("bitsandbytes-*.whl"):
        before, after = trim_bitsandbytes(wheel)
        print(f"{wheel.name}: {before / 1e6:.1f} -> {after / 1e6:.1f} MB")
    total = sum(p.stat().st_size for p in args.dest.glob("*.whl"))
    print(f"{args.dest}: {total / 1e6:.1f} MB of wheels")


if __name__ == "__main__":
    main()
