"""fp32 GEMM of the GPU device (shaders/small_gemm.wgsl) for the transposed-A products
(the LM head's dW, the rank-r LoRA products):
C[M, N] (+)= alpha * op(A)[M, K] @ op(B)[K, N]."""
from __future__ import annotations

from ..runtime import MAX_GROUPS, GpuContext, GpuTensor, grid_2d

# (TM, TN, TK) of small_gemm.wgsl: a workgroup of (TN/4, TM/4) threads owns a TM x TN
# block of C and stages TK-deep slices.  64 x 64 for the general case (LM head dW).
_GENERAL = (64, 64, 16)
# The rank-r LoRA products have one side of C = r <= 64 (u, du: [tokens, r]; dB: [out, r];
# dA: [r, in]).  A 64 x 64 tile there computes 64 / r times the needed columns (4x at r = 16),
# so the tile's short side follows r (next power of two >= 4) and its long side takes the
# threads (_SKINNY_THREADS per workgroup), K staged _SKINNY_TK at a time; their grids are
# small, so K is split finer (_SKINNY_SPLIT: target workgroups, min K per split).  Chosen by
# the sweep in bench/bench_small_gemm.py on an H100 (2026-11-26, r = 16, all 7 projections
# of both Qwen3 shapes): 16 x 256, TK 8, (1024, 64) -> 45 ms (0.6B) and 103 ms (4B) per step,
# against 70 and 238 ms with 64 x 64 tiles and (256, 256) (still only 0.5-0.8 TB/s: the
# kernel's scalar loads; a dedicated skinny kernel tried on 2026-11-26 measured slower).
_SKINNY_MAX = 64
_SKINNY_THREADS = 256
_SKINNY_TK = 8
_SKINNY_SPLIT = (1024, 64)


def tiles_for(ctx: GpuContext, M: int, N: int) -> tuple:
    """(TM, TN, TK) for C[M, N]; tuning.fp32_gemm_tiles (QLORA_EXT_SMALL_GEMM_TILES)
    forces one (benchmarks)."""
    if ctx.tuning.fp32_gemm_tiles is not None:
        try:
            return check_tiles(ctx, *ctx.tuning.fp32_gemm_tiles)
        except ValueError as e:
            raise ValueError(f"QLORA_EXT_SMALL_GEMM_TILES: {e}") from None
    short = min(M, N)
    if short > _SKINNY_MAX or max(M, N) <= _SKINNY_MAX:
        return _GENERAL
    s = 4
    while s < short:
        s *= 2
    long_ = min(256, 16 * _SKINNY_THREADS // s)   # (s/4) * (long/4) threads
    tk = _SKINNY_TK
    lim = int(ctx.limits.get("max-compute-workgroup-storage-size", 16384))
    while tk > 4 and 4 * tk * (s + long_) > lim:
        tk //= 2
    return (long_, s, tk) if N == short else (s, long_, tk)


# Row-stable rank-r products (row_stable_options) take their tiles as for this many rows.
_STABLE_ROWS = 1 << 16


def row_stable_options(ctx: GpuContext, r: int) -> dict:
    """gemm_gpu options (tiles, split) for a product with token rows on one side and r on the
    other ([rows, K] @ [K, r]) under which each row's result does not depend on the row count:
    the tiles as for many rows, K split as finely as _SKINNY_SPLIT allows whatever the grid (a
    row's sum is the fixed-order sum of its K chunks; which chunks depends on the split and
    TK only).  Many rows take these values anyway."""
    return {"tiles": tiles_for(ctx, _STABLE_ROWS, r), "split": (1 << 30, _SKINNY_SPLIT[1])}


def check_tiles(ctx: GpuContext, tm: int, tn: int, tk: int) -> tuple:
    """TM, TN multiples of 4; the workgroup's threads and workgroup memory within the limits."""
    threads = (tm // 4) * (tn // 4)
    smem = 4 * tk * (tm + tn)
    if (tm % 4 or tn % 4 or tk < 1 or threads > int(ctx.limits["max-compute-invocations-per-workgroup"])
            or smem > int(ctx.limits["max-compute-workgroup-storage-size"])):
        raise ValueError(f"small_gemm tiles TM={tm} TN={tn} TK={tk}: need TM, TN multiples of 4, "
                         f"{threads} threads and {smem} B of workgroup memory within the device's limits")
    return tm, tn, tk


def gemm_gpu(ctx: GpuContext, a: GpuTensor, b: GpuTensor, c: GpuTensor, M: int, N: int, K: int,
             trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0,
             accumulate: bool = False, a_off: int = 0, b_off: int = 0, c_off: int = 0,
             tiles: tuple | None = None, split: tuple | None = None) -> GpuTensor:
    """Record C[M, N] (+)= alpha * op(A) @ op(B); A is [M, K] ([K, M] with trans_a), B is
    [K, N] ([N, K] with trans_b), each starting at an element offset of its buffer.
    tiles (TM, TN, TK) and split (target groups, min K per split) replace the per-shape
    choice (benchmarks)."""
    for name, t, off, need in (("a", a, a_off, M * K), ("b", b, b_off, K * N), ("c", c, c_off, M * N)):
        if off + need > t.size:
            raise ValueError(f"gemm_gpu: {name} holds {t.size} elements, needs {off + need}")
    tm, tn, tk = tiles_for(ctx, M, N) if tiles is None else check_tiles(ctx, *tiles)
    gx, gy = (N + tn - 1) // tn, (M + tm - 1) // tm
    if gy > MAX_GROUPS:
        raise ValueError(f"gemm_gpu: M={M} exceeds {MAX_GROUPS * tm} rows per call")
    if split is None and min(tm, tn) < _GENERAL[0] and min(M, N) <= _SKINNY_MAX:
        split = _SKINNY_SPLIT
    splits = split_count(gx * gy, K, *(split or ()))
    ov = {"TM": tm, "TN": tn, "TK": tk}
    if splits == 1:
        pipe = ctx.pipeline("small_gemm", "gemm", "urrww", overrides=ov)
        par = ctx.uniform("IIIIIIfIIIIII", M, N, K, int(trans_a), int(trans_b), int(accumulate),
                          float(alpha), a_off, b_off, c_off, K, 1, 0)
        ctx.dispatch(pipe, [par, a, b, c, c], (gx, gy))
        return c
    # Split K: partial products into a scratch [splits, M, N], then one summing pass into C
    # (a fixed order: results are bit-reproducible).
    per = -(-K // splits)
    chunk = -(-per // tk) * tk
    splits = -(-K // chunk)
    part = _scratch(ctx, splits * M * N)
    pipe = ctx.pipeline("small_gemm", "gemm", "urrww", overrides=ov)
    par = ctx.uniform("IIIIIIfIIIIII", M, N, K, int(trans_a), int(trans_b), 0, float(alpha),
                      a_off, b_off, 0, chunk, splits, 0)
    ctx.dispatch(pipe, [par, a, b, part, c], (gx, gy, splits))
    red = ctx.pipeline("small_gemm", "reduce_splits", "urrww", overrides=ov)
    par = ctx.uniform("IIIIIIfIIIIII", M, N, K, 0, 0, int(accumulate), 1.0, 0, 0, 0, chunk, splits, c_off)
    ctx.dispatch(red, [par, a, b, part, c], grid_2d((M * N + 255) // 256))
    return c


# Fewer workgroups than this leave a large GPU mostly idle: split K to reach it.
_TARGET_GROUPS = 256
_MIN_SPLIT_K = 256


def split_count(groups: int, K: int, target: int = _TARGET_GROUPS, min_k: int = _MIN_SPLIT_K) -> int:
    """K splits for a grid of `groups` workgroups (1: no split), each at least min_k deep."""
    if groups >= target or K < 2 * min_k:
        return 1
    return max(1, min(-(-target // groups), K // min_k))


def _scratch(ctx: GpuContext, n: int) -> GpuTensor:
    """A grow-only f32 scratch of at least n elements, one per context (split-K partials;
    the dispatches that use it are ordered by the queue)."""
    t = getattr(ctx, "_gemm_split_scratch", None)
    if t is None or t.size < n:
        t = ctx._gemm_split_scratch = ctx.empty((n,))
    return t
