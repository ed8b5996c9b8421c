"""Our kernels vs bitsandbytes 0.50.2 CUDA, from golden bytes recorded on a GPU (runs in CPU CI).

tests/golden/bnb_cuda_golden.npz holds bnb's CUDA outputs on inputs regenerated here from seeds
(golden_cases.py; bench/gen_golden.py wrote it). The deviations listed in design.md are counted and
bounded; every other byte must be equal:

- 4-bit codes: bnb CUDA writes 0x00 for an all-zero block (we write the code of 0.0), and its
  approximate reciprocal can move s across a threshold when s is within an ulp or so of it.
- nested absmax: bnb's offset is a float32 torch.mean on the device (ours a fixed-order float64
  sum), so offsets may differ by an ulp and nested codes by one step where that moves v; an
  all-zero nested block (a tensor of one block) gets bnb code 0 and our 127 (both decode to offset).
- dequantization of bnb's own record with our kernels equals bnb's CUDA output, except FP4 code 8
  (bnb's CUDA table holds -0.0, the stored quant_map +0.0) and results bnb's flush-to-zero clears.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from error_bounds import U32
from golden_cases import DTYPES, Case, classify_code_diffs, make_input

from formats import codebooks, reference
from formats.quant_types import QuantType

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "bnb_cuda_golden.json"
ARRAYS = HERE / "bnb_cuda_golden.npz"

#: Reciprocal-case codes allowed, as a fraction of the elements of a case. Not a rounding tolerance:
#: bnb's bytes are recorded and the inputs regenerate bit for bit from seeds (numpy's generator and
#: IEEE casts), so the count is the same on every CPU; the bound says such codes stay rare (each needs
#: s within 4 ulp of one of <= 15 thresholds, and 16-bit inputs sit exactly on FP4's binary ones).
RECIPROCAL_BOUND = 1e-3


def _load() -> tuple[dict, dict[str, np.ndarray]]:
    manifest = json.loads(MANIFEST.read_text())
    with np.load(ARRAYS) as z:
        arrays = {k: z[k] for k in z.files}
    return manifest, arrays


MANIFEST_DATA, ARRAY_DATA = _load() if MANIFEST.exists() else ({"cases": []}, {})


def _kernels():
    try:
        from converter.kernels import bnb4bit as kernels

        return kernels
    except ImportError:  # the extension is not built: the numpy reference states the same rules
        return None


def _quantize(x: torch.Tensor, case: Case):
    qt = QuantType.parse(case.quant_type)
    k = _kernels()
    if k is not None:
        packed, absmax = k.quantize_4bit(x, blocksize=case.blocksize, quant_type=qt)
        return packed.numpy(), absmax.numpy()
    return reference.quantize_4bit(x.float().numpy(), case.blocksize, qt)


def _quantize_nested(absmax: np.ndarray):
    k = _kernels()
    if k is not None:
        codes, nabs, off = k.quantize_nested(torch.from_numpy(absmax))
        return codes.numpy(), nabs.numpy(), np.float32(off)
    return reference.quantize_nested(absmax)


def _dequantize(case: Case, packed, absmax_record, nested=None) -> np.ndarray:
    """Our dequantization of a record (bnb's), as raw bytes of the case's dtype."""
    qmap = np.asarray(QuantType.parse(case.quant_type).codebook, dtype=np.float32)
    k = _kernels()
    dtype = DTYPES[case.dtype]
    if nested is not None:
        codes, nabs, off, nmap = nested
        if k is not None:
            absmax = k.dequantize_nested(
                torch.from_numpy(codes), torch.from_numpy(nabs), float(off), torch.from_numpy(nmap)
            ).numpy()
        else:
            absmax = reference.dequantize_nested(codes, nabs, off, nmap)
    else:
        absmax = absmax_record
    if k is not None:
        out = k.dequantize_4bit(
            torch.from_numpy(packed),
            torch.from_numpy(np.ascontiguousarray(absmax)),
            n=case.n,
            blocksize=case.blocksize,
            quant_map=torch.from_numpy(qmap),
            out_dtype=dtype,
        )
        return out.view(torch.uint8).numpy()
    w = reference.dequantize_4bit(packed, absmax, case.n, case.blocksize, qmap)
    return torch.from_numpy(w).to(dtype).view(torch.uint8).numpy()


def test_golden_file_is_present_and_from_bnb_cuda():
    assert MANIFEST.exists(), "run bench/gen_golden.py on a GPU to create the golden files"
    assert MANIFEST_DATA["bitsandbytes"] == "0.50.2"
    assert "cpu" not in MANIFEST_DATA["device"].lower(), "the golden file must come from bnb's CUDA kernels"
    assert len(MANIFEST_DATA["cases"]) == 96


@pytest.mark.parametrize("record", MANIFEST_DATA["cases"], ids=lambda r: f"case{r['seed']}")
def test_our_bytes_match_bnb_cuda(record):
    nested_offset = record.pop("offset", None)
    record.pop("offset_hex", None)
    case = Case(**record)
    k = case.key
    x = make_input(case)
    packed, absmax = _quantize(x, case)
    bnb_packed = ARRAY_DATA[f"{k}.packed"]
    assert packed.shape == bnb_packed.shape

    # 4-bit codes: equal except the counted deviations.
    counts = classify_code_diffs(
        x.float().numpy(), absmax, packed, bnb_packed, case.blocksize, case.quant_type
    )
    assert counts["unexplained"] == 0, counts
    assert counts["reciprocal"] <= max(2, RECIPROCAL_BOUND * case.n), counts
    n_zero_elems = sum(
        min(case.n, (b + 1) * case.blocksize) - b * case.blocksize
        for b in range(0, -(-case.n // case.blocksize), case.zero_every or 1)
        if case.zero_every
    )
    if case.quant_type == "nf4":  # every element of a zero block differs (0x00 vs 0x77), pad included
        assert counts["zero_block"] >= n_zero_elems, counts
    else:
        assert counts["zero_block"] == 0, counts  # FP4: both write code 0 for 0.0

    if not case.nested:
        np.testing.assert_array_equal(absmax.view(np.uint32), ARRAY_DATA[f"{k}.absmax"].view(np.uint32))
        ours_deq = _dequantize(case, bnb_packed, ARRAY_DATA[f"{k}.absmax"])
    else:
        codes, nabs, off = _quantize_nested(absmax)
        bnb_codes = ARRAY_DATA[f"{k}.absmax"]
        bnb_nabs = ARRAY_DATA[f"{k}.nested_absmax"]
        bnb_map = ARRAY_DATA[f"{k}.nested_map"]
        assert np.array_equal(bnb_map, np.asarray(codebooks.DYNAMIC8, dtype=np.float32))
        bnb_off = np.float32(nested_offset)
        assert abs(int(np.float32(off).view(np.int32)) - int(bnb_off.view(np.int32))) <= 4, (off, bnb_off)
        # nested_absmax = max |absmax - offset| over a nested block, one float32 subtraction: it moves by
        # at most the offsets' difference plus that rounding (u * nabs) on each side.
        nabs_bound = abs(np.float64(off) - np.float64(bnb_off)) + U32 * (np.abs(nabs) + np.abs(bnb_nabs))
        assert (np.abs(nabs.astype(np.float64) - bnb_nabs) <= nabs_bound).all()
        # An all-zero nested block (e.g. a single absmax, which equals the offset): bnb CUDA scales by
        # 1/0 and writes code 0 (NaN compares false); we write 127, the code of 0.0. Both decode to offset.
        zero_nested = np.repeat(nabs == 0, 256)[: codes.size]
        assert (codes[zero_nested] == 127).all()
        assert (bnb_codes[zero_nested] == 0).all()
        code_diff = np.abs(codes.astype(np.int32) - bnb_codes.astype(np.int32))[~zero_nested]
        assert code_diff.max(initial=0) <= 1
        # Codes move one step only where the offsets' ulp moves v across a midpoint: rare, counted.
        assert (code_diff != 0).sum() <= 0.02 * code_diff.size
        ours_deq = _dequantize(case, bnb_packed, None, nested=(bnb_codes, bnb_nabs, bnb_off, bnb_map))

    # bnb's dequantization of its own record == ours of the same record, up to the listed cases.
    bnb_deq = ARRAY_DATA[f"{k}.dequant"]
    width = {"float32": 4, "float16": 2, "bfloat16": 2}[case.dtype]
    view = {4: np.uint32, 2: np.uint16}[width]
    a, b = ours_deq.view(view), bnb_deq.view(view)
    sign = np.array(1 << (8 * width - 1), dtype=view)
    differ = a != b
    negzero = differ & (b == sign) & (a == 0)  # FP4 code 8: bnb CUDA -0.0, stored quant_map +0.0
    ftz = differ & ((b & ~sign) == 0) & ~negzero  # bnb's flush-to-zero of a subnormal product
    assert not (differ & ~negzero & ~ftz).any(), int((differ & ~negzero & ~ftz).sum())
