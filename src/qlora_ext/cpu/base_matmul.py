"""Products with the frozen base weights on the CPU, the one place where compute_dtype applies.

Shapes: W [out, in] (HF Linear layout), an NF4Tensor or a float32 array; N activation rows.
    transpose=True:   x [N, in]   -> y  = x Wᵀ  [N, out]   (forward)
    transpose=False:  dy [N, out] -> dx = dy W  [N, in]    (input gradient)

compute_dtype, named as bitsandbytes names it:
    "fp32"  exact float32 products (the default);
    "bf16"  W and the activations rounded to bf16 (round to nearest even), products summed in
            float32: the multiply rate of AVX512-BF16 (vdpbf16ps) is twice the fp32 FMA rate.
LoRA products, norms, attention and every gradient of a trained parameter stay float32; only
these frozen products take compute_dtype.

On CPUs with AVX-512 the products go through the fused kernel (qlora_ext._kernels.nf4_matmul_*,
NF4 decoded inside the GEMM, no dequantized copy of W; dense_matmul_* for float32 weights such
as the LM head), in both modes: it beats dequantize + numpy sgemm at the step's shapes
(BENCHMARKS.md) and rounds to bf16 while packing its panels instead of in a rounded copy of W.
Elsewhere the same function runs as a numpy product of (bf16-rounded) float32 operands."""
from __future__ import annotations

import numpy as np

from .._native import default_threads, kernels
from ..model.lora import COMPUTE_DTYPES, check_compute_dtype  # noqa: F401  (callers import them here)
from ..nf4 import NF4Tensor, dequantize_nf4

def fused_nf4_available() -> bool:
    """Whether NF4 products take the fused kernel's vector path (AVX-512 active)."""
    return kernels().cpu_level_name() in ("avx512", "avx512_bf16")


def describe(compute_dtype: str) -> str:
    """How the frozen base's NF4 products run here, for the command line's setup lines."""
    compute_dtype = check_compute_dtype(compute_dtype)
    level = kernels().cpu_level_name()
    if compute_dtype == "fp32":
        how = "fused NF4 GEMM" if level in ("avx512", "avx512_bf16") else "dequantize + BLAS"
        return f"fp32 (exact; {how}, {level})"
    if level == "avx512_bf16":
        return "bf16 (vdpbf16ps, fp32 sums; avx512_bf16)"
    if level == "avx512":
        return "bf16 (bf16-rounded operands, fp32 FMA; avx512 without BF16)"
    return f"bf16 (bf16-rounded operands, BLAS fp32 sums; {level})"


def round_to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 copy of `a` with every value rounded to the nearest bf16 (ties to even); NaN
    stays NaN."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32)
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    out = r.view(np.float32)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = np.nan
    return out


def _rows_contiguous(a: np.ndarray) -> bool:
    return a.ndim == 2 and (a.shape[1] <= 1 or a.strides[1] == 4) and a.strides[0] % 4 == 0 \
        and a.strides[0] >= 4 * a.shape[1]


def base_matmul(x: np.ndarray, weight, compute_dtype: str = "fp32", transpose: bool = True,
                threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """x Wᵀ (transpose=True) or x W (transpose=False), float32 [N, out] / [N, in].

    out: a float32 array of that shape with contiguous rows (a column slice of a wider array
    is fine) to write into.  threads: the fused kernel's threads (None: QLORA_EXT_THREADS, else
    all cores)."""
    if not isinstance(weight, (NF4Tensor, np.ndarray)) or len(weight.shape) != 2:
        raise ValueError(f"base weight must be a 2-D NF4Tensor or float32 array, got {weight!r:.80}")
    compute_dtype = check_compute_dtype(compute_dtype)
    out_f, in_f = (int(d) for d in weight.shape)
    k, m = (in_f, out_f) if transpose else (out_f, in_f)
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"base matmul input must be float32 [N, {k}] for a weight {weight.shape}, "
                         f"got {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if out is None:
        out = np.empty((x.shape[0], m), dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != (x.shape[0], m) or not _rows_contiguous(out):
        raise ValueError(f"base matmul out must be float32 [{x.shape[0]}, {m}] with contiguous rows, "
                         f"got {out.dtype} {out.shape}")
    if isinstance(weight, NF4Tensor) and fused_nf4_available():
        if not _rows_contiguous(x):
            x = np.ascontiguousarray(x)
        absmax = np.ascontiguousarray(weight.absmax, dtype=np.float32)
        fn = kernels().nf4_matmul_xwt if transpose else kernels().nf4_matmul_xw
        fn(x, weight.packed, absmax, weight.blocksize, m, out, compute_dtype, threads or default_threads())
        return out
    if isinstance(weight, np.ndarray) and fused_nf4_available() and weight.dtype == np.float32 \
            and weight.flags.c_contiguous:
        if not _rows_contiguous(x):
            x = np.ascontiguousarray(x)
        fn = kernels().dense_matmul_xwt if transpose else kernels().dense_matmul_xw
        fn(x, weight, out, compute_dtype, threads or default_threads())
        return out
    w = dequantize_nf4(weight, threads=threads) if isinstance(weight, NF4Tensor) else weight
    if compute_dtype == "bf16":
        x, w = round_to_bf16(x), round_to_bf16(w)
    np.matmul(x, w.T if transpose else w, out=out)
    return out
