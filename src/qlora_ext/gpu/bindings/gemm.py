"""fp32 GEMM of the GPU device (shaders/small_gemm.wgsl, shaders/rank_gemm.wgsl) for the
transposed-A products (the LM head's dW, the rank-r LoRA products):
C[M, N] (+)= alpha * op(A)[M, K] @ op(B)[K, N]."""
from __future__ import annotations

from ..runtime import MAX_GROUPS, GpuContext, GpuTensor, grid_2d

# (TM, TN, TK) of small_gemm.wgsl's `gemm`: a workgroup of (TN/4, TM/4) threads owns a TM x TN
# block of C and stages TK-deep slices.  The products with both sides of C over _SKINNY_MAX
# (the LM head's dW) take it, with K split over workgroups where the grid is small.
_GENERAL = (64, 64, 16)
# Products with a side of C <= _SKINNY_MAX (the rank-r LoRA products: u, du [tokens, r],
# dB [out, r], dA [r, in]) take `skinny`: one dispatch, K split among a workgroup's lanes.  A
# 64 x 64 tile would compute 64 / r times the needed columns there, and split K over workgroups
# needs a second, summing dispatch.  These products read each element of their big operand
# once for r FMAs: memory-bound, so the loads in flight set their speed.  On an H200
# (bench_small_gemm.py --lora --shapes smollm2-135m --rows 256,1024, bench/results/
# h200_s1204d_lora_skinny.json) the 30 layers' products took 7.5 / 10.0 ms a step at 256 /
# 1024 token rows, against 13.4 / 14.4 for the best split-K `gemm` setting.
_SKINNY_MAX = 64
# Large rank-r products (more than _SKINNY_MAX_ELEMS elements in their big operand, e.g. every
# product of a 4 x 1024-token step) take rank_gemm.wgsl (`rows` where op(A) runs along k:
# u, du; `cols` where it runs along the token rows: dA, dB), many rows a workgroup with the
# small operand reused from workgroup memory or L1.  On an H200 at a Qwen3-0.6B step's shapes
# (bench/results/h200_s1204e_rank_variants.log) the four products of a projection took
# 90 / 119 / 118 us (q / gate / down) against 124 / 177 / 174 for the best split-K `gemm`
# setting below.  Below the threshold (the few-token steps of real batches, where the step
# pays per dispatch) `skinny` takes them in one dispatch.
_SKINNY_MAX_ELEMS = 1 << 21
# Rank-r products in the layout rank_gemm.wgsl lacks (op(A) and op(B) both transposed) take
# `gemm` tiles of the short side by 256 with split K (_RANK_TK deep slices; _RANK_SPLIT:
# target workgroups, min K per split): the best setting of that path in the H200 sweep
# (bench_small_gemm.py --lora, bench/results/h200_s1204c_lora_*.json).
_RANK_TK = 16
_RANK_SPLIT = (512, 128)


def tiles_for(ctx: GpuContext, M: int, N: int) -> tuple:
    """(TM, TN, TK) of `gemm` for C[M, N]; tuning.fp32_gemm_tiles (QLORA_EXT_SMALL_GEMM_TILES)
    forces one (benchmarks)."""
    if ctx.tuning.fp32_gemm_tiles is not None:
        try:
            return check_tiles(ctx, *ctx.tuning.fp32_gemm_tiles)
        except ValueError as e:
            raise ValueError(f"QLORA_EXT_SMALL_GEMM_TILES: {e}") from None
    short = min(M, N)
    if short > _SKINNY_MAX or max(M, N) <= _SKINNY_MAX:
        return _GENERAL
    # a rank-r product: the tile's short side follows r (the next power of two >= 4), its long
    # side takes the threads (256 a workgroup)
    s = 4
    while s < short:
        s *= 2
    long_ = min(256, 16 * 256 // s)
    tk = min(_RANK_TK, 2 * s)   # each thread stages at most 8 vec4s of a slice (check_tiles)
    lim = int(ctx.limits.get("max-compute-workgroup-storage-size", 16384))
    while tk > 4 and 4 * tk * (s + long_) > lim:
        tk //= 2
    return (long_, s, tk) if N == short else (s, long_, tk)


def skinny_overrides(N: int, trans_a: bool, trans_b: bool, b_off: int) -> dict:
    """`skinny`'s overrides for C[M, N] with N the short side: its columns in vec4 groups (at
    most 4 a workgroup); where A's rows run along k, warps along k and 4 rows a workgroup (K
    spread over 64 lanes: the few-token products have few rows), else 8 rows (a sector of
    each k); vec4 loads of op(B)'s columns where B is stored [K, N] with N and b_off multiples
    of 4."""
    return {"RC4": min(4, -(-N // 4)), "KFAST": not trans_a, "SKINNY_ROWS": 8 if trans_a else 4,
            "S_VEC": not trans_b and N % 4 == 0 and b_off % 4 == 0}


def check_tiles(ctx: GpuContext, tm: int, tn: int, tk: int) -> tuple:
    """TM, TN multiples of 4; TK a multiple of 4 of at most 2·min(TM, TN) (each thread stages at
    most 8 vec4s of a slice); the workgroup's threads and workgroup memory within the limits."""
    threads = (tm // 4) * (tn // 4)
    smem = 4 * tk * (tm + tn)
    if (tm % 4 or tn % 4 or tk < 4 or tk % 4 or tk > 2 * min(tm, tn)
            or threads > int(ctx.limits["max-compute-invocations-per-workgroup"])
            or smem > int(ctx.limits["max-compute-workgroup-storage-size"])):
        raise ValueError(f"small_gemm tiles TM={tm} TN={tn} TK={tk}: need TM, TN multiples of 4, TK a multiple "
                         f"of 4 up to 2·min(TM, TN), {threads} threads and {smem} B of workgroup memory within "
                         "the device's limits")
    return tm, tn, tk


def gemm_gpu(ctx: GpuContext, a: GpuTensor, b: GpuTensor, c: GpuTensor, M: int, N: int, K: int,
             trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0,
             accumulate: bool = False, a_off: int = 0, b_off: int = 0, c_off: int = 0,
             tiles: tuple | None = None, split: tuple | None = None, row_stable: bool = False,
             skinny: bool = False) -> GpuTensor:
    """Record C[M, N] (+)= alpha * op(A) @ op(B); A is [M, K] ([K, M] with trans_a), B is
    [K, N] ([N, K] with trans_b), each starting at an element offset of its buffer.
    A side of C <= 64 takes `skinny` (one dispatch) up to _SKINNY_MAX_ELEMS elements of the big
    operand and rank_gemm.wgsl above it, other shapes `gemm` with split K.
    tiles (TM, TN, TK) and split (target groups, min K per split) force `gemm` with them
    (benchmarks); row_stable forces `skinny` at any shape: each element's bits then depend on
    K and its operands only, not on M or N (the split placement's lanes).  skinny forces
    `skinny` (benchmarks)."""
    for name, t, off, need in (("a", a, a_off, M * K), ("b", b, b_off, K * N), ("c", c, c_off, M * N)):
        if off + need > t.size:
            raise ValueError(f"gemm_gpu: {name} holds {t.size} elements, needs {off + need}")
    forced = tiles is not None or split is not None
    if (row_stable or skinny) and forced:
        raise ValueError("gemm_gpu: row_stable / skinny take the skinny kernel, tiles / split the general one")
    rank_r = min(M, N) <= _SKINNY_MAX
    if row_stable or skinny or (not forced and rank_r and max(M, N) * K <= _SKINNY_MAX_ELEMS):
        return _skinny(ctx, a, b, c, M, N, K, trans_a, trans_b, alpha, accumulate, a_off, b_off, c_off)
    if not forced and rank_r and _rank(ctx, a, b, c, M, N, K, trans_a, trans_b, alpha, accumulate, a_off, b_off,
                                       c_off):
        return c
    if rank_r and split is None and tiles is None:
        split = _RANK_SPLIT
    tm, tn, tk = tiles_for(ctx, M, N) if tiles is None else check_tiles(ctx, *tiles)
    gx, gy = (N + tn - 1) // tn, (M + tm - 1) // tm
    if gy > MAX_GROUPS:
        raise ValueError(f"gemm_gpu: M={M} exceeds {MAX_GROUPS * tm} rows per call")
    splits = split_count(gx * gy, K, *(split or ()))
    # vec4 loads along each operand's stored rows where they start and run in whole vec4s
    a_vec = a_off % 4 == 0 and (M if trans_a else K) % 4 == 0
    b_vec = b_off % 4 == 0 and (K if trans_b else N) % 4 == 0
    threads = (tm // 4) * (tn // 4)
    ov = {"TM": tm, "TN": tn, "TK": tk, "A_VEC": a_vec, "B_VEC": b_vec,
          "SA": -(-tk * tm // 4 // threads), "SB": -(-tk * tn // 4 // threads)}
    pipe = ctx.pipeline("small_gemm", "gemm", "urrww", overrides=ov)
    if splits == 1:
        par = ctx.uniform("IIIIIIfIIIIIII", M, N, K, int(trans_a), int(trans_b), int(accumulate),
                          float(alpha), a_off, b_off, c_off, K, 1, 0, 0)
        ctx.dispatch(pipe, [par, a, b, c, c], (gx, gy))
        return c
    # Split K: partial products into a scratch [splits, M, N], then one summing pass into C
    # (a fixed order: results are bit-reproducible).
    per = -(-K // splits)
    chunk = -(-per // tk) * tk
    splits = -(-K // chunk)
    part = ctx.scratch(splits * M * N)
    par = ctx.uniform("IIIIIIfIIIIIII", M, N, K, int(trans_a), int(trans_b), 0, float(alpha),
                      a_off, b_off, 0, chunk, splits, 0, 0)
    ctx.dispatch(pipe, [par, a, b, part, c], (gx, gy, splits))
    _sum_splits(ctx, a, b, part, c, M, N, K, chunk, splits, accumulate, c_off)
    return c


def _sum_splits(ctx, a, b, part, c, M, N, K, chunk, splits, accumulate, c_off) -> None:
    """C (+)= the sum of the `splits` partials [splits, M·N] in `part`, in split order
    (small_gemm.wgsl's reduce_splits; a and b are bound, not read)."""
    red = ctx.pipeline("small_gemm", "reduce_splits", "urrww")   # reads none of the tiles' overrides
    par = ctx.uniform("IIIIIIfIIIIIII", M, N, K, 0, 0, int(accumulate), 1.0, 0, 0, 0, chunk, splits, c_off, 0)
    ctx.dispatch(red, [par, a, b, part, c], grid_2d((M * N + 255) // 256))


def _short_side_as_columns(a, b, M, N, a_off, b_off, trans_a, trans_b) -> tuple:
    """(a, b, M, N, a_off, b_off, trans_a, trans_b, c_trans) of the product whose columns are
    C's short side: a short M (with N long) is computed as C^T = op(B)^T op(A)^T and stored
    transposed (c_trans)."""
    c_trans = M <= _SKINNY_MAX < N
    if c_trans:
        a, b, M, N, a_off, b_off = b, a, N, M, b_off, a_off
        trans_a, trans_b = not trans_b, not trans_a
    return a, b, M, N, a_off, b_off, trans_a, trans_b, c_trans


def _skinny(ctx, a, b, c, M, N, K, trans_a, trans_b, alpha, accumulate, a_off, b_off, c_off) -> GpuTensor:
    """C[M, N] through `skinny`, its short side as the kernel's columns (_short_side_as_columns)."""
    a, b, M, N, a_off, b_off, trans_a, trans_b, c_trans = _short_side_as_columns(a, b, M, N, a_off, b_off,
                                                                                 trans_a, trans_b)
    ov = skinny_overrides(N, trans_a, trans_b, b_off)
    grid = (-(-M // ov["SKINNY_ROWS"]), -(-N // (4 * ov["RC4"])))
    if max(grid) > MAX_GROUPS:
        raise ValueError(f"gemm_gpu: C[{M}, {N}] needs a grid {grid} over the {MAX_GROUPS} limit")
    pipe = ctx.pipeline("small_gemm", "skinny", "urrw", overrides=ov)
    par = ctx.uniform("IIIIIIfIIIIIII", M, N, K, int(trans_a), int(trans_b), int(accumulate), float(alpha),
                      a_off, b_off, c_off, K, 1, 0, int(c_trans))
    ctx.dispatch(pipe, [par, a, b, c], grid)
    return c


def _rank(ctx, a, b, c, M, N, K, trans_a, trans_b, alpha, accumulate, a_off, b_off, c_off) -> bool:
    """Record C[M, N] through rank_gemm.wgsl (its header says how), its short side as the
    kernel's columns (_short_side_as_columns): `rows` where op(A) is then stored [M, K], `cols`
    where it is stored [K, M] and op(B) [K, N]; False (nothing recorded) for the layout with
    both transposed.  `cols` splits K over workgroups where its grid is small and sums the
    partials with small_gemm.wgsl's reduce_splits."""
    a, b, M, N, a_off, b_off, trans_a, trans_b, c_trans = _short_side_as_columns(a, b, M, N, a_off, b_off,
                                                                                 trans_a, trans_b)
    if trans_a and trans_b:
        return False
    entry = "cols" if trans_a else "rows"
    # 8 columns of C a workgroup (4 where N <= 4), rank 16 in two column groups: 16 ran 10-30%
    # slower on an H200 (bench/results/h200_s1204e_rank_variants.log)
    cw = 4 if N <= 4 else 8
    consts = {"CW": cw}
    a_vec = a_off % 4 == 0 and (M if trans_a else K) % 4 == 0
    b_vec = b_off % 4 == 0 and (K if trans_b else N) % 4 == 0
    pipe = ctx.pipeline("rank_gemm", entry, "urrw", consts=consts,
                        overrides={"A_VEC": a_vec, "B_VEC": b_vec, "B_T": bool(trans_b)})
    gy = -(-N // cw)
    if entry == "rows":
        gx = -(-M // 32)
        splits, chunk = 1, K
    else:
        gx = -(-M // 128)
        splits = split_count(gx * gy, K)
        chunk = -(-K // (32 * splits)) * 32      # a whole number of the warps' rounds
        splits = -(-K // chunk)
    if max(gx, gy) > MAX_GROUPS:
        raise ValueError(f"gemm_gpu: C[{M}, {N}] needs a grid ({gx}, {gy}) over the {MAX_GROUPS} limit")
    fmt = "IIIIfIIIIIII"
    if splits == 1:
        par = ctx.uniform(fmt, M, N, K, int(accumulate), float(alpha), a_off, b_off, c_off, int(c_trans), K, 0, 0)
        ctx.dispatch(pipe, [par, a, b, c], (gx, gy))
        return True
    part = ctx.scratch(splits * M * N)
    par = ctx.uniform(fmt, M, N, K, 0, float(alpha), a_off, b_off, 0, int(c_trans), chunk, 0, 0)
    ctx.dispatch(pipe, [par, a, b, part], (gx, gy, splits))
    _sum_splits(ctx, a, b, part, c, M, N, K, chunk, splits, accumulate, c_off)
    return True


# Fewer workgroups than this leave a large GPU mostly idle: split K to reach it.
_TARGET_GROUPS = 256
_MIN_SPLIT_K = 256


def split_count(groups: int, K: int, target: int = _TARGET_GROUPS, min_k: int = _MIN_SPLIT_K) -> int:
    """K splits for a grid of `groups` workgroups (1: no split), each at least min_k deep."""
    if groups >= target or K < 2 * min_k:
        return 1
    return max(1, min(-(-target // groups), K // min_k))

