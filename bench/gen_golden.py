"""Write tests/golden/bnb_cuda_golden.npz + .json: bitsandbytes' CUDA outputs on seeded inputs.

Run once on a GPU with bitsandbytes 0.50.2 (the result is committed; CPU CI checks our kernels
against it in tests/golden/test_bnb_cuda_golden.py):

    python bench/gen_golden.py --out tests/golden

Per case (tests/golden/golden_cases.py): bnb's packed bytes, absmax (float32, or uint8 codes plus
nested absmax and offset when nested) and bnb's own dequantization of its record, in the input dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "golden"))
import golden_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/golden"))
    parser.add_argument(
        "--device", default="cuda", help="cuda (the golden file) or cpu (a dry run of this script only)"
    )
    args = parser.parse_args()

    import bitsandbytes
    import bitsandbytes.functional as bnbf

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gen_golden.py needs a CUDA GPU (it records bitsandbytes' CUDA kernels)")
    arrays: dict[str, np.ndarray] = {}
    records = []
    for case in golden_cases.cases():
        x = golden_cases.make_input(case).to(args.device)
        packed, state = bnbf.quantize_4bit(
            x, blocksize=case.blocksize, compress_statistics=case.nested, quant_type=case.quant_type
        )
        deq = bnbf.dequantize_4bit(packed, state)
        k = case.key
        arrays[f"{k}.packed"] = packed.view(-1).cpu().numpy()
        arrays[f"{k}.absmax"] = state.absmax.cpu().numpy()
        arrays[f"{k}.dequant"] = (
            deq.view(-1).cpu().view(torch.uint8).numpy() if deq.numel() else np.zeros(0, np.uint8)
        )
        rec = case.as_dict()
        if case.nested:
            arrays[f"{k}.nested_absmax"] = state.state2.absmax.cpu().numpy()
            arrays[f"{k}.nested_map"] = state.state2.code.cpu().numpy()
            rec["offset"] = float(state.offset.item())
            rec["offset_hex"] = float(np.float32(state.offset.item())).hex()
        records.append(rec)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "bnb_cuda_golden.npz", **arrays)
    manifest = {
        "generator": "bench/gen_golden.py",
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)",
        "cases": records,
    }
    (args.out / "bnb_cuda_golden.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = (args.out / "bnb_cuda_golden.npz").stat().st_size
    print(f"wrote {len(records)} cases, {size / 1e6:.2f} MB, to {args.out} ({manifest['device']})")


if __name__ == "__main__":
    main()
