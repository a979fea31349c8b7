"""Host bindings of the WGSL kernels the GPU device uses: gemm_f32.wgsl (fp32 B) and gemm.wgsl
(NF4 B), both with the LoRA term as extra K tiles, swiglu.wgsl and dropout.wgsl, with the GEMM
tile choices.  Each function records ONE kernel into the context's pending encoder (a dispatch per
65535 rows where a grid could exceed that); operands are Operands (buffer, element offset, row
stride) with the shapes stated per function."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .runtime import GpuTensor, grid_2d

GEMM_KINDS = "urrrrrw"
# gemm.wgsl binds the LoRA matrix L as a sub-range of its buffer, and binding offsets must be
# multiples of 256 bytes: L starts at a multiple of PARAM_ALIGN elements (flat parameter
# buffers align every tensor so).
PARAM_ALIGN = 64


@dataclass(frozen=True)
class GemmTiles:
    """Workgroup WGX × WGY threads, each TM × TN outputs; K tile BK (see shaders/gemm.wgsl)."""

    wgx: int = 8
    wgy: int = 8
    tm: int = 4
    tn: int = 4
    bk: int = 8
    # gemm_f32.wgsl only (fp32 B): the tile's k steps written out (UNROLL), and K cut into
    # `splits` runs whose partial products a reduction sums (needs the caller's scratch)
    unroll: bool = True
    splits: int = 1

    @property
    def bm(self):
        return self.wgy * self.tm

    @property
    def bn(self):
        return self.wgx * self.tn

    def check(self, ctx=None) -> "GemmTiles":
        nt = self.wgx * self.wgy
        ok = (self.tm % 4 == 0 and self.tn % 4 == 0 and self.tm <= 16 and self.tn <= 16
              and self.tm * self.tn <= 128 and self.bk % 8 == 0 and self.bn % 8 == 0
              and (self.bm * self.bk // 4 + nt - 1) // nt <= 8 and (self.bn * self.bk // 4 + nt - 1) // nt <= 8)
        ok = ok and self.splits >= 1
        if not ok:
            raise ValueError(f"unsupported GEMM tiles {self}: TM, TN multiples of 4 (≤16, TM·TN ≤ 128), "
                             "BK and BN multiples of 8, at most 8 vec4 loads per thread per K tile, "
                             "splits ≥ 1")
        if ctx is not None:
            smem = 2 * self.bk * (self.bm + self.bn) * 4 + 64
            if smem > int(ctx.limits["max-compute-workgroup-storage-size"]) or nt > int(
                    ctx.limits["max-compute-invocations-per-workgroup"]):
                raise ValueError(f"GEMM tiles {self} need {smem} B workgroup memory / {nt} threads; "
                                 f"{ctx.describe()} allows {ctx.limits['max-compute-workgroup-storage-size']} B")
        return self

    def constants(self) -> dict:
        return {"WGX": self.wgx, "WGY": self.wgy, "TM": self.tm, "TN": self.tn, "BK": self.bk}


def _tuned(ctx, field: str, var: str):
    """GemmTiles from ctx.tuning.<field> (None if unset), checked against the adapter."""
    vals = getattr(ctx.tuning, field)
    if vals is None:
        return None
    try:
        return GemmTiles(*vals).check(ctx)
    except ValueError as e:
        raise ValueError(f"{var}={','.join(map(str, vals))}: {e}") from None


def tiles_for(ctx) -> GemmTiles:
    """Per-adapter default of the large GEMMs (tuning.gemm_tiles overrides)."""
    t = _tuned(ctx, "gemm_tiles", "QLORA_EXT_GEMM_TILES")
    if t is not None:
        return t
    if ctx.software:
        return GemmTiles(8, 8, 4, 4, 8).check(ctx)
    # 128 x 128 tiles, 8 x 8 per thread, BK 16: 26.1-30.7 TFLOP/s with NF4 B at every
    # projection GEMM of the Qwen3 steps on an NVIDIA H200 (bench_gemm_ceiling.py; BK 8: 21-26)
    big = GemmTiles(16, 16, 8, 8, 16)
    try:
        return big.check(ctx)
    except ValueError:
        return GemmTiles(16, 16, 4, 4, 8).check(ctx)


class TileChooser:
    """Tiles per GEMM shape of the FFN backend: `big` unless its grid would leave the GPU part
    idle (fewer than `min_groups` workgroups: the N = hidden GEMMs at small M, and the rank-r
    LoRA GEMMs), then `small`.  tuning.gemm_tiles / gemm_tiles_small / gemm_min_groups
    override (benchmarks)."""

    # Defaults from the sweep on an NVIDIA H200 (bench_gemm.py --direct): 64 x 128 tiles win
    # for N = 2560 at M = 2048 (down 23.7 vs 21.4, dx 26.4 vs 21.5, dh 26.4 vs 25.5 TFLOP/s fp32)
    # and 128 x 128 for gate|up (27.0 vs 24.9); grids of 128 x 128 tiles: gate|up 2432, dh 1216.
    def __init__(self, ctx, big: GemmTiles | None = None, small: GemmTiles | None = None, min_groups: int = 1300):
        self.big = (big or tiles_for(ctx)).check(ctx)
        if small is None:
            small = _tuned(ctx, "gemm_tiles_small", "QLORA_EXT_GEMM_TILES_SMALL")
        if small is None:
            small = GemmTiles(8, 8, 4, 4, 8) if ctx.software else GemmTiles(16, 16, 4, 8, 8)
        self.small = small.check(ctx)
        self.min_groups = ctx.tuning.gemm_min_groups or int(min_groups)

    def __call__(self, M: int, N: int, K: int = 0, nf4: bool = True, b_t: bool = False) -> GemmTiles:
        groups = -(-M // self.big.bm) * -(-N // self.big.bn)
        return self.big if groups >= self.min_groups else self.small

    def check(self, ctx):
        return self


class StepGemmTiles:
    """Tiles per shape for the gpu placement's GEMMs: M = B·T token rows (4096 at 4 x 1024) for
    the projections, the LM head's chunk rows (1024-2048) with N or K = vocab.

    NF4 B (shaders/gemm.wgsl, the `fused` GEMM), from bench/bench_gemm_ceiling.py on an NVIDIA
    H200 (BENCHMARKS.md):
    - 128 x 128 tiles, 8 x 8 per thread, BK 16 (16,16,8,8,16): 26.1-30.7 TFLOP/s on every
      projection GEMM, within 1-2 of the best setting at each shape.
    - grids of fewer than 200 128 x 128 tiles: 64 x 128 tiles, 4 x 8 per thread (16,16,4,8,8).
    fp32 B (shaders/gemm_f32.wgsl: the dequantized projections and the LM head), from the same
    script (bench/results/h200_gemm_f32_sweep2.json):
    - B stored [K, N] (dx = dy · W): 64 x 128 tiles of 128 threads, 8 x 8 per thread, BK 8, k
      loop written out (16,8,8,8,8): 32.1-33.9 TFLOP/s; BK 16 slower everywhere.  Where K <=
      DX_WIDE_K and N <= DX_WIDE_N, 128 x 128 tiles of 256 threads (16,16,8,8,8): 2-5% faster
      at every Qwen3-0.6B dx shape (K, N of 1024-3072), and at the 4B o.dx (N 4096, K 2560);
      4-13% slower at the 4B dx shapes with K 4096 or 9728 or N 9728, a tie at N 2560, K 1024
      (bench/results/h200_s1204c_gemm_coalesced_*.json, h200_s1204g_gemm_tiles.json).
    - B stored [N, K] (x · Wᵀ, the logits): 128 x 128 tiles of 256 threads (16,16,8,8,8):
      31.8-34.4 TFLOP/s against 29.4-31.2 for 64 x 128, the best at every shape.
    - grids of fewer than THIN_GRID 128 x 128 tiles (dhidden: K = vocab): 64 x 128 tiles with
      BK 16 and K split 4 ways where the caller's scratch holds the partials (32.4 at 4B,
      where the projections' weight scratch does; unsplit at 0.6B: 32.7).
    - grids of fewer than SPLIT_GRID 64 x 128 tiles (few token rows: every projection of a
      SmolLM2-135M step at 256 or 1024 rows, bench/results/h200_s1204b_gemm_small_rows.json):
      BK 8 and K split 2, 4 or 8 ways, the fewest that reach SPLIT_GRID workgroups; within
      0.93 of the best of 20 settings at each shape, and 1.5-4x the unsplit tiles (e.g. q at
      256 rows: 6.2 against 2.1 TFLOP/s, the reduction included), whose few workgroups each
      walk all of K.
    Software adapters (lavapipe's 32 KiB of workgroup memory) and the gemm tile knobs of
    Tuning keep TileChooser."""

    BIG = GemmTiles(16, 16, 8, 8, 16)
    SMALL = GemmTiles(16, 16, 4, 8, 8)
    F32_64 = GemmTiles(16, 8, 8, 8, 8)
    F32_128 = GemmTiles(16, 16, 8, 8, 8)
    F32_THIN = GemmTiles(16, 8, 8, 8, 16, splits=4)
    DX_WIDE_K = 3072
    DX_WIDE_N = 4096
    F32_SPLIT = GemmTiles(16, 8, 8, 8, 8)
    THIN_GRID = 200
    SPLIT_GRID = 256
    MAX_SPLITS = 8

    def __init__(self, ctx):
        self.fallback = TileChooser(ctx)
        own = not ctx.software and not ctx.tuning.gemm_overridden
        if own:
            try:
                for t in (self.BIG, self.SMALL, self.F32_64, self.F32_128, self.F32_THIN):
                    t.check(ctx)
            except ValueError:
                own = False
        self.own = own

    def __call__(self, M: int, N: int, K: int = 0, nf4: bool = True, b_t: bool = False) -> GemmTiles:
        if not self.own:
            return self.fallback(M, N)
        thin = -(-M // 128) * -(-N // 128) < self.THIN_GRID
        if nf4:
            return self.SMALL if thin else self.BIG
        if not thin:
            wide = b_t or (K <= self.DX_WIDE_K and N <= self.DX_WIDE_N)
            return self.F32_128 if wide else self.F32_64
        grid = -(-M // self.F32_SPLIT.bm) * -(-N // self.F32_SPLIT.bn)
        if grid >= self.SPLIT_GRID:
            return self.F32_THIN
        splits = 2
        while grid * splits < self.SPLIT_GRID and splits < self.MAX_SPLITS:
            splits *= 2
        return replace(self.F32_SPLIT, splits=splits)


def step_gemm_tiles(ctx) -> StepGemmTiles:
    """The context's StepGemmTiles, made once."""
    return ctx.cached("StepGemmTiles", lambda: StepGemmTiles(ctx))


@dataclass
class Operand:
    """A row-major fp32 matrix in a buffer (a wgpu buffer or a GpuTensor): element (i, j) at
    off + i·ld + j; ld 0 = contiguous (ld = the matrix's column count)."""

    buf: object
    off: int = 0
    ld: int = 0


@dataclass
class Nf4B:
    """One or two NF4 tensors stacked by rows (stored [rows, ncols], row-major blocking):
    rows < split in part 0 (from word 0, block 0), the rest in part 1 (from word code_off1,
    block abs_off1).  One tensor: split = 1 << 31."""

    codes: object
    absmax: object
    ncols: int
    split: int = 1 << 31
    code_off1: int = 0
    abs_off1: int = 0
    blocksize: int = 64


def _raw(b):
    return b.buffer if isinstance(b, GpuTensor) else b


def _check_span(what: str, op: Operand, rows: int, cols: int, ld: int) -> None:
    """The matrix [rows, cols] at op.off with row stride ld lies inside op's tensor (buffer)."""
    have = op.buf.size if isinstance(op.buf, GpuTensor) else op.buf.size // 4
    need = op.off + (rows - 1) * ld + cols
    if rows and cols and need > have:
        raise ValueError(f"gemm: {what} holds {have} elements, needs {need} ([{rows}, {cols}] with row "
                         f"stride {ld} from element {op.off})")


def gemm(ctx, M: int, N: int, K: int, a: Operand, b, c: Operand, b_t: bool, lora=None,
         accumulate: bool = False, tiles=None, scratch: GpuTensor | None = None) -> None:
    """C[M, N] (+)= A[M, K] · op(B) (+ T · op(L)).

    b: Operand (fp32, stored [N, K] if b_t else [K, N]: shaders/gemm_f32.wgsl) or Nf4B
    (shaders/gemm.wgsl, NF4 dequantized in the tile loads).
    lora: None or (T: Operand [M, R], R, L: Operand, mode) with mode 1: L stored [N, R] (LoRA
    B, forward), 2: [R, N] (LoRA A, backward); L.off must be a multiple of PARAM_ALIGN; the
    LoRA scale must already be in T or L.
    tiles: GemmTiles, a chooser (M, N, K, nf4, b_t) -> GemmTiles, or None (the context's StepGemmTiles).
    scratch: f32 GpuTensor for the partial products of split K (tiles.splits > 1, fp32 B):
    splits·M·N elements; without it (or too small) the context's scratch holds them if
    they fit in SPLIT_SCRATCH_FLOATS, else K is not split."""
    nf4 = isinstance(b, Nf4B)
    tiles = step_gemm_tiles(ctx) if tiles is None else tiles
    tiles = tiles if isinstance(tiles, GemmTiles) else tiles(M, N, K, nf4, b_t)
    lda, ldc = a.ld or K, c.ld or N
    _check_span("a", a, M, K, lda)
    _check_span("c", c, M, N, ldc)
    d = ctx.dummy()
    if lora is not None:
        t, R, ll, mode = lora
        if ll.off % PARAM_ALIGN:
            raise ValueError(f"gemm: the LoRA matrix starts at element {ll.off}, not a multiple of {PARAM_ALIGN}")
        lbuf = _raw(ll.buf)
        lfields = (R, t.ld or R, t.off)
        bufs_l = [_raw(t.buf), (lbuf, 4 * ll.off, min(max(16, 4 * R * N), lbuf.size - 4 * ll.off))]
    else:
        mode, lfields, bufs_l = 0, (0, 0, 0), [d, d]
    a_vec = a.off % 4 == 0 and lda % 4 == 0 and K % 4 == 0
    grid = ((N + tiles.bn - 1) // tiles.bn, (M + tiles.bm - 1) // tiles.bm)
    if not nf4:
        _gemm_f32(ctx, M, N, K, a, b, c, b_t, lda, ldc, a_vec, mode, lfields, bufs_l, accumulate, tiles, grid,
                  scratch)
        return
    ldb = b.ncols
    nf4_fields = (b.split, b.code_off1, b.abs_off1, b.blocksize.bit_length() - 1)
    consts = dict(tiles.constants(), B_T=bool(b_t), A_VEC=a_vec, B_VEC=ldb % 8 == 0,
                  C_VEC=c.off % 4 == 0 and ldc % 4 == 0 and N % 4 == 0, LORA=mode, ACCUM=bool(accumulate))
    par = ctx.uniform("16I", M, N, K, lda, ldb, ldc, a.off, c.off, *lfields, *nf4_fields, 0)
    ctx.dispatch(ctx.pipeline("gemm", "main", GEMM_KINDS, overrides=consts),
                 [par, _raw(a.buf), _raw(b.codes), _raw(b.absmax)] + bufs_l + [_raw(c.buf)], grid)


GEMM_F32_KINDS = "urrrrw"
# gemm_f32.wgsl's workgroup order for grids at least WIDE_GRID N tiles wide (the LM head's
# logits: N = vocab): runs of GROUP_M M tiles down each N tile column, so that the workgroups
# in flight share B's tiles.  On an H200 the Qwen3-0.6B logits (2048 x 151936 x 1024) ran
# 34.2 -> 35.1 TFLOP/s; the projections' grids (at most 76 N tiles) ran up to 4% slower with
# it (BENCHMARKS.md), so they keep the plain order.
WIDE_GRID = 512
GROUP_M = 16
# The most split-K partials a GEMM without its own scratch keeps in the context's (16 MiB):
# StepGemmTiles' K splits of small grids need at most 2·SPLIT_GRID 64 x 128 tiles of them.
SPLIT_SCRATCH_FLOATS = 2 * StepGemmTiles.SPLIT_GRID * 64 * 128


def _gemm_f32(ctx, M, N, K, a, b, c, b_t, lda, ldc, a_vec, mode, lfields, bufs_l, accumulate, tiles, grid,
              scratch) -> None:
    """kernels.gemm with fp32 B on shaders/gemm_f32.wgsl (split K through `scratch`)."""
    if tiles.unroll and tiles.bk not in (8, 16):
        raise ValueError(f"gemm_f32: the unrolled k loop needs BK 8 or 16, got {tiles}")
    ldb = b.ld or (K if b_t else N)
    _check_span("b", b, N if b_t else K, K if b_t else N, ldb)
    b_vec = ldb % 4 == 0 and b.off % 4 == 0 and (K if b_t else N) % 4 == 0
    ntiles = -(-K // tiles.bk) + (-(-lfields[0] // tiles.bk) if mode else 0)
    splits = min(tiles.splits, ntiles)
    if splits > 1 and (scratch is None or scratch.size < splits * M * N):
        scratch = ctx.scratch(splits * M * N) if splits * M * N <= SPLIT_SCRATCH_FLOATS else None
        splits = splits if scratch is not None else 1
    tps = -(-ntiles // splits)
    splits = -(-ntiles // tps)
    base = dict(tiles.constants(), UNROLL=bool(tiles.unroll), B_T=bool(b_t), A_VEC=a_vec, B_VEC=bool(b_vec),
                LORA=mode, GROUP_M=GROUP_M if grid[0] >= WIDE_GRID else 0)
    c_vec = c.off % 4 == 0 and ldc % 4 == 0 and N % 4 == 0
    ab = [_raw(a.buf), _raw(b.buf)] + bufs_l
    if splits == 1:
        par = ctx.uniform("16I", M, N, K, lda, ldb, ldc, a.off, c.off, *lfields, b.off, tps, 0, 1, 0)
        pipe = ctx.pipeline("gemm_f32", "main", GEMM_F32_KINDS, overrides=dict(base, C_VEC=c_vec,
                                                                              ACCUM=bool(accumulate)))
        ctx.dispatch(pipe, [par] + ab + [_raw(c.buf)], grid)
        return
    par = ctx.uniform("16I", M, N, K, lda, ldb, N, a.off, 0, *lfields, b.off, tps, M * N, splits, 0)
    pipe = ctx.pipeline("gemm_f32", "main", GEMM_F32_KINDS, overrides=dict(base, C_VEC=N % 4 == 0, ACCUM=False))
    ctx.dispatch(pipe, [par] + ab + [scratch], grid + (splits,))
    par = ctx.uniform("16I", M, N, K, lda, ldb, ldc, a.off, c.off, *lfields, b.off, tps, M * N, splits, 0)
    red = ctx.pipeline("gemm_f32", "reduce", GEMM_F32_KINDS, overrides={"ACCUM": bool(accumulate)})
    d = ctx.dummy()
    ctx.dispatch(red, [par, scratch, d, d, d, _raw(c.buf)], grid_2d(-(-M * N // 256)))


_EW_WG = 256   # threads per workgroup of the row-wise elementwise kernels (swiglu, dropout)


def _row_blocks(ctx, rows: int):
    """(first row, rows) of each dispatch: grids take at most ctx.max_groups rows."""
    step = ctx.max_groups
    return [(r0, min(step, rows - r0)) for r0 in range(0, rows, step)]


def _swiglu(ctx, entry: str, M: int, I: int, g: Operand, u: Operand, out0: Operand, out1, dh) -> None:
    ld_in, ld_out = g.ld or I, out0.ld or I
    if (u.ld or I) != ld_in or (out1 is not None and (out1.ld or I) != ld_out):
        raise ValueError("swiglu: g and u (and the two outputs) must share a row stride")
    one_out = out1 is None or _raw(out1.buf) is _raw(out0.buf)
    o1 = ctx.dummy(1) if out1 is None else _raw(out1.buf)
    du_off = 0 if out1 is None else out1.off
    vec = all(x % 4 == 0 for x in (I, ld_in, ld_out, g.off, u.off, out0.off, du_off))   # dh: from 0
    pipe = ctx.pipeline("swiglu", entry, "urrwwr", overrides={"WG": _EW_WG, "ONE_OUT": one_out, "VEC": vec})
    cols = -(-I // 4) if vec else I
    for r0, rows in _row_blocks(ctx, M):
        par = ctx.uniform("9I", rows, I, ld_in, g.off + r0 * ld_in, u.off + r0 * ld_in, ld_out,
                          out0.off + r0 * ld_out, du_off + r0 * ld_out, r0 * I)
        ctx.dispatch(pipe, [par, _raw(g.buf), _raw(u.buf), _raw(out0.buf), ctx.dummy(1) if one_out else o1,
                            _raw(g.buf) if dh is None else _raw(dh)], ((cols + _EW_WG - 1) // _EW_WG, rows))


def swiglu_forward(ctx, M: int, I: int, g: Operand, u: Operand, h: Operand) -> None:
    """h [M, I] = silu(g) · u for g, u [M, I] with one row stride (the split backend's gu
    [M, 2I] passes Operand(gu, 0, 2I) and Operand(gu, I, 2I))."""
    _swiglu(ctx, "forward", M, I, g, u, h, None, None)


def swiglu_backward(ctx, M: int, I: int, g: Operand, u: Operand, dh, dg: Operand, du: Operand) -> None:
    """dh [M, I] (contiguous) -> dg, du [M, I] (one row stride; may share a buffer, as the
    halves of dgu [M, 2I])."""
    _swiglu(ctx, "backward", M, I, g, u, dg, du, dh)


def dropout(ctx, rows: int, cols: int, z: Operand, out: Operand, keys, key_index: int, thr: int,
            scale: float, row0: int, add: bool = False) -> None:
    """out[rows, cols] (+)= z · mask · scale with the hash mask of global rows row0.. and the
    key keys[key_index] (keys: u32 in a buffer or GpuTensor, so the uniform block repeats from
    step to step while the key changes)."""
    ld_in, ld_out = z.ld or cols, out.ld or cols
    pipe = ctx.pipeline("dropout", "main", "urrw", overrides={"WG": _EW_WG, "ADD": bool(add)})
    for r0, n in _row_blocks(ctx, rows):
        par = ctx.uniform("9If", n, cols, ld_in, ld_out, z.off + r0 * ld_in, out.off + r0 * ld_out,
                          int(key_index), int(thr), row0 + r0, float(scale))
        ctx.dispatch(pipe, [par, _raw(keys), _raw(z.buf), _raw(out.buf)], ((cols + _EW_WG - 1) // _EW_WG, n))
