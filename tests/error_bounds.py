"""Elementwise error bounds of dot products, derived from the arithmetic (never fitted to one CPU).

Model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., sections 2.2 and 3.1): every
floating-point operation returns the exact result times (1 + d), |d| <= u, plus an absolute error of at
most half the smallest subnormal (eta) where it underflows. A sum of n terms accumulated in ANY order
(recursive, blocked, SIMD lanes plus a tree reduction, FMA chains, split-K partial sums) in which each
term passes through at most n roundings satisfies

    |computed - exact| <= gamma_n * sum |term_i|,   gamma_n = n*u / (1 - n*u),

so with u = 2^-24 (float32) the bound holds for every kernel path and every BLAS blocking, on AMD and
Intel alike. A product formed inside an FMA is exact; a product rounded on its own, or a block sum
scaled by its absmax, is one more rounding per term, which gamma_K with K >= 2 terms still covers
(each term of a K-term dot product meets far fewer than K roundings on every path we have).

References are float64 matmuls of the exact (float32-decoded) weight; their own error,
gamma_K(2^-53) * (|x| @ |W|), is added to the bound too.
"""

from __future__ import annotations

import torch

#: Unit roundoff of float32 and float64 (round to nearest).
U32 = 2.0**-24
U64 = 2.0**-53

#: The CPU AVX2 GEMV with 16-bit x (csrc/gemv_cpu.cpp, rows_i16): code values and x as integers of at
#: most I16_SCALE in magnitude, x scaled per X_CHUNK elements along K.
I16_SCALE = 16383
X_CHUNK = 64


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of ``dtype``: half its machine epsilon (float32 2^-24, float16 2^-11, bfloat16 2^-8)."""
    return torch.finfo(dtype).eps / 2


def underflow(dtype: torch.dtype) -> float:
    """Absolute error of one rounding into ``dtype``'s subnormal range: half its smallest subnormal."""
    finfo = torch.finfo(dtype)
    return finfo.tiny * finfo.eps / 2


def gamma(n: int, u: float = U32) -> float:
    """gamma_n = n*u / (1 - n*u): the relative error bound of n roundings of unit roundoff u."""
    if n * u >= 1:
        msg = f"gamma_{n} with u = {u} is not defined (n*u >= 1)"
        raise ValueError(msg)
    return n * u / (1 - n * u)


def dot_bound(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    weight_rel: float = 0.0,
    acc_u: float = U32,
    flush_abs: float = 0.0,
    x_chunk_rel: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reference, bound)`` for ``y = x @ w.T (+ bias)`` as a kernel computes it in floating point.

    The kernel is assumed to
      1. use each weight w[o, k] with a relative error of at most ``weight_rel`` (0: exactly w; e.g.
         2^-24 when it scales a block's sum by its absmax instead of decoding quant_map[q] * absmax,
         or u(bfloat16) when it rounds code values to the activation type);
      2. accumulate the K products in float32 (unit roundoff ``acc_u``; 2^-23 for accumulators that
         truncate instead of rounding to nearest) in any order: gamma_K;
      3. round the sum to ``out_dtype``, and with a ``bias`` add it in ``out_dtype`` afterwards (one
         more rounding), as the loader's GEMV path does (``y = gemv(x) + bias``);
      4. (``flush_abs``) lose at most ``flush_abs * max_k |w[o, k]|`` per term to inputs or partial
         sums flushed to zero (vdpbf16ps treats subnormals as zero);
      5. (``x_chunk_rel``) use each x[b, k] with an absolute error of at most ``x_chunk_rel`` times the
         largest |x| of its chunk of X_CHUNK elements along K (x held as integers scaled per chunk).
         Where K is not a multiple of X_CHUNK no path quantizes x so, and the term is 0.

    ``reference`` is the float64 ``x @ w.T (+ bias)``; ``bound`` is elementwise (float64) and covers
    1-3 plus the reference's own rounding. x, w: [B, K] and [O, K]; bias [O]; both results on x's
    device.
    """
    xd = x.detach().double()  # computed on x's device (a GPU's float64 is exact enough, and fast)
    wd = w.detach().double().to(xd.device)
    k = xd.shape[-1]
    mag = xd.abs() @ wd.abs().T  # sum_k |x w|: what every rounding error of the dot is relative to
    dot = xd @ wd.T
    # 2K: at most one rounding per product and one per addition may underflow.
    err = (weight_rel + gamma(k, acc_u) * (1 + weight_rel)) * mag + 2 * k * underflow(torch.float32)
    err = err + x_chunk_error(xd.abs(), wd, x_chunk_rel, weight_rel, gamma(k, acc_u))
    if flush_abs:
        err = err + flush_abs * k * wd.abs().amax(dim=1)
    u, eta = unit_roundoff(out_dtype), underflow(out_dtype)
    err = err + u * (dot.abs() + err) + eta  # the result's rounding to out_dtype
    ref = dot
    if bias is not None:
        ref = dot + bias.detach().double().to(xd.device)
        err = err + u * (ref.abs() + err) + eta  # y + bias, rounded to out_dtype
    return ref, err + gamma(k + 1, U64) * (mag + ref.abs())


def chunk_amax(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each element of ``x`` ([..., K], K a multiple of ``chunk``) replaced by its chunk's largest |x|."""
    shape = x.shape
    amax = x.abs().reshape(*shape[:-1], shape[-1] // chunk, chunk).amax(dim=-1, keepdim=True)
    return amax.expand(*shape[:-1], shape[-1] // chunk, chunk).reshape(shape)


def x_chunk_error(
    x_abs: torch.Tensor, w: torch.Tensor, x_chunk_rel: float, weight_rel: float, gamma_k: float
) -> torch.Tensor | float:
    """``dot_bound``'s ``x_chunk_rel`` term for inputs of magnitude at most ``x_abs`` ([..., K]) and
    weights ``w`` ([O, K]): sum_k |dx_k| |w_k| with |dx_k| <= x_chunk_rel * its chunk's largest |x|, each
    weight off by ``weight_rel`` and each term rounded as the rest (``gamma_k``); 0 where the term does
    not apply (no x_chunk_rel, or K not a multiple of X_CHUNK)."""
    if not x_chunk_rel or x_abs.shape[-1] % X_CHUNK:
        return 0.0
    dx = x_chunk_rel * chunk_amax(x_abs, X_CHUNK)
    return (1 + weight_rel) * (1 + gamma_k) * (dx @ w.abs().T)


def worst_ratio(y: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor) -> float:
    """max |y - reference| / bound: <= 1 when y is within the bound everywhere."""
    return float(((y.detach().double().to(reference.device) - reference).abs() / bound).max())


def cpu_isa_running(isa: str = "auto") -> str:
    """The CPU path an ``isa`` argument runs: "auto" is what QM_CPU_ISA forces, else the best path."""
    from converter.kernels.isa_env import running_isa

    return isa if isa != "auto" else running_isa()


def gemv_arithmetic(device_type: str, x_dtype: torch.dtype, isa: str = "auto") -> dict[str, float]:
    """``dot_bound``'s ``weight_rel`` / ``acc_u`` / ``flush_abs`` / ``x_chunk_rel`` for our fused GEMV on a
    device, from what it computes (``isa``: the CPU path; "auto" is the one isa="auto" runs now).

    - CPU (csrc/gemv_cpu.cpp), every ISA but the one below: x widened exactly; weights
      float32(quant_map[q] * absmax), or a block's sum of quant_map[q] * x scaled by its absmax
      (AVX-512, few accumulators), i.e. the unrounded product: relative error <= 2^-24 against the
      decoded weight. float32 FMA accumulation (the scalar path: float64, then one float32 rounding,
      which gamma_K also covers).
    - CPU "avx512bf16" with bfloat16 x and blocksize >= 64 (every blocksize here is bounded alike):
      code values rounded to bfloat16 (u = 2^-8) and block sums scaled by absmax (2^-24), so weight_rel
      = (1 + 2^-8)(1 + 2^-24) - 1; vdpbf16ps's products of two bfloat16 are exact in float32 and its
      sums round to nearest even (Intel SDM); acc_u = 2^-23 all the same, since AMD does not document
      whether its two additions per lane round once or twice (2^-23 covers both). The instruction
      treats subnormal inputs and results as zero: at most K inputs (|x| < 2^-126, times |code| <= 1)
      and K/2 lane results (< 2^-126) flushed per output, in code units, which the block's absmax
      (<= max_k |w[o, k]|: the code +-1 decodes to +-absmax) scales: flush_abs = 1.5 * 2^-126.
    - CPU "avx2" with float16 / bfloat16 x and blocksize >= 64 (rows_i16; blocksize 32 takes the f32
      path, inside this bound too): code values as integers round(q * s) (:func:`i16_code_rel`
      relative to q, then absmax's 2^-24), x as integers per chunk of 64 (I16_X_REL times the chunk's
      largest |x|, absolute); their products and each chunk's sum are exact integers (below 2^31),
      converted and scaled in float32 (round to nearest, a few roundings per term).
    - CUDA, float32 x (csrc/cuda/gemv.cu, CUDA cores): the same, block sums scaled by their absmax.
    - CUDA, float16 / bfloat16 x (csrc/cuda/gemv_mma.cu, tensor cores): code values rounded to x's
      dtype (u of that dtype) and block sums scaled by absmax (2^-24); mma accumulators in float32 but
      not rounded to nearest (truncation, Fasi et al. 2021, "Numerical behavior of NVIDIA tensor
      cores"), so unit roundoff 2^-23. A 16-bit x may also take the CUDA-core kernel; this bound is
      the larger of the two.
    """
    rounded_codes = (1 + unit_roundoff(x_dtype)) * (1 + U32) - 1
    if device_type == "cuda" and x_dtype != torch.float32:
        return {"weight_rel": rounded_codes, "acc_u": 2 * U32}
    path = cpu_isa_running(isa) if device_type == "cpu" else None
    if path == "avx512bf16" and x_dtype == torch.bfloat16:
        return {"weight_rel": rounded_codes, "acc_u": 2 * U32, "flush_abs": 1.5 * 2.0**-126}
    if path == "avx2" and x_dtype != torch.float32:
        return {"weight_rel": (1 + i16_code_rel()) * (1 + U32) - 1, "acc_u": U32, "x_chunk_rel": I16_X_REL}
    return {"weight_rel": U32, "acc_u": U32}


#: x's integer in the AVX2 16-bit path: round(x * r), r = float32(I16_SCALE / amax) and the product
#: rounded to float32 (each a relative 2^-24 of a value <= I16_SCALE: together within 2^-9 of
#: x * I16_SCALE / amax), so the integer is within 0.5 + 2^-9 of x's exact multiple; scaled back by the
#: float32 step amax / I16_SCALE (rounded: relative 2^-24, so the bound grows by less than 2^-24; the
#: rest is one more rounding of the term, in gamma_K). 2^-8 covers both. Error per element: at most
#: this times its chunk's largest |x|.
I16_X_REL = (0.5 + 2.0**-8) / I16_SCALE


def i16_code_rel() -> float:
    """Largest relative error of a nonzero code value held as an integer in the AVX2 16-bit path, over
    the NF4 and FP4 tables: round(q * s) / s against q, s = float32(I16_SCALE / max|q|) as the kernel
    computes it (0 stays 0)."""
    import numpy as np

    from formats.quant_types import QuantType

    worst = 0.0
    for quant_type in (QuantType.NF4, QuantType.FP4):
        q = np.asarray(quant_type.codebook, dtype=np.float32).astype(np.float64)
        s = float(np.float32(I16_SCALE / np.abs(q).max()))
        c = np.rint(q * s)  # lrint: to nearest even, as np.rint
        nonzero = q != 0
        worst = max(worst, float((np.abs(c / s - q)[nonzero] / np.abs(q[nonzero])).max()))
    return worst
