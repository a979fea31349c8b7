"""fp32 GEMM of the resident mode (shaders/resident_gemm.wgsl), used where the weight is not
NF4 (the LM head and its backward):  C[M, N] (+)= alpha * op(A)[M, K] @ op(B)[K, N]."""
from __future__ import annotations

import numpy as np

from .context import MAX_GROUPS, GpuContext, GpuTensor, default_context, grid_2d

_TM = _TN = 64
_TK = 16


def gemm_gpu(ctx: GpuContext, a: GpuTensor, b: GpuTensor, c: GpuTensor, M: int, N: int, K: int,
             trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0,
             accumulate: bool = False, a_off: int = 0, b_off: int = 0, c_off: int = 0) -> GpuTensor:
    """Record C[M, N] (+)= alpha * op(A) @ op(B); A is [M, K] ([K, M] with trans_a), B is
    [K, N] ([N, K] with trans_b), each starting at an element offset of its buffer."""
    for name, t, off, need in (("a", a, a_off, M * K), ("b", b, b_off, K * N), ("c", c, c_off, M * N)):
        if off + need > t.size:
            raise ValueError(f"gemm_gpu: {name} holds {t.size} elements, needs {off + need}")
    gx, gy = (N + _TN - 1) // _TN, (M + _TM - 1) // _TM
    if gy > MAX_GROUPS:
        raise ValueError(f"gemm_gpu: M={M} exceeds {MAX_GROUPS * _TM} rows per call")
    splits = split_count(gx * gy, K)
    ov = {"TM": _TM, "TN": _TN, "TK": _TK}
    if splits == 1:
        pipe = ctx.pipeline("resident_gemm", "gemm", "urrww", overrides=ov)
        par = ctx.uniform("IIIIIIfIIIIII", M, N, K, int(trans_a), int(trans_b), int(accumulate),
                          float(alpha), a_off, b_off, c_off, K, 1, 0)
        ctx.dispatch(pipe, [par, a, b, c, c], (gx, gy))
        return c
    # Split K: partial products into a scratch [splits, M, N], then one summing pass into C.
    chunk = -(-K // splits) // _TK * _TK or _TK
    splits = -(-K // chunk)
    part = _scratch(ctx, splits * M * N)
    pipe = ctx.pipeline("resident_gemm", "gemm", "urrww", overrides=ov)
    par = ctx.uniform("IIIIIIfIIIIII", M, N, K, int(trans_a), int(trans_b), 0, float(alpha),
                      a_off, b_off, 0, chunk, splits, 0)
    ctx.dispatch(pipe, [par, a, b, part, c], (gx, gy, splits))
    red = ctx.pipeline("resident_gemm", "reduce_splits", "urrww", overrides=ov)
    par = ctx.uniform("IIIIIIfIIIIII", M, N, K, 0, 0, int(accumulate), 1.0, 0, 0, 0, chunk, splits, c_off)
    ctx.dispatch(red, [par, a, b, part, c], grid_2d((M * N + 255) // 256))
    return c


# Fewer workgroups than this leave a large GPU mostly idle: split K to reach it.
_TARGET_GROUPS = 256
_MIN_SPLIT_K = 256


def split_count(groups: int, K: int) -> int:
    """K splits for a grid of `groups` workgroups (1: no split)."""
    if groups >= _TARGET_GROUPS or K < 2 * _MIN_SPLIT_K:
        return 1
    return max(1, min(-(-_TARGET_GROUPS // groups), K // _MIN_SPLIT_K))


def _scratch(ctx: GpuContext, n: int) -> GpuTensor:
    """A grow-only f32 scratch of at least n elements, one per context (split-K partials;
    the dispatches that use it are ordered by the queue)."""
    t = getattr(ctx, "_gemm_split_scratch", None)
    if t is None or t.size < n:
        t = ctx._gemm_split_scratch = ctx.empty((n,))
    return t


def gemm(a: np.ndarray, b: np.ndarray, trans_a: bool = False, trans_b: bool = False,
         ctx=None) -> np.ndarray:
    """numpy float32: op(a) @ op(b)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, np.ndarray) or t.dtype != np.float32 or t.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D float32 array, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {getattr(t, 'shape', '')}")
    M, K = a.shape[::-1] if trans_a else a.shape
    K2, N = b.shape[::-1] if trans_b else b.shape
    if K != K2:
        raise ValueError(f"b: inner dimension {K2} does not match a's {K}")
    ctx = default_context() if ctx is None else ctx
    c = ctx.empty((M, N))
    gemm_gpu(ctx, ctx.upload(a), ctx.upload(b), c, M, N, K, trans_a, trans_b)
    return ctx.to_numpy(c)
