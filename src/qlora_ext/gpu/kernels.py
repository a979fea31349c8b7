"""Host side of the WGSL kernels: parameter blocks, variant constants, grids.

Each function records ONE dispatch into a Recorder; operands are (buffer, element offset, row
stride) with the shapes stated per function.  Tile sizes (GemmTiles) are chosen per adapter."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .context import GpuError, Recorder, pack

GEMM_KINDS = ("uniform", "read", "read", "read", "read", "read", "read", "rw")


@dataclass(frozen=True)
class GemmTiles:
    """Workgroup WGX × WGY threads, each TM × TN outputs; K tile BK (see shaders/gemm.wgsl)."""

    wgx: int = 8
    wgy: int = 8
    tm: int = 4
    tn: int = 4
    bk: int = 8

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
        if not ok:
            raise ValueError(f"unsupported GEMM tiles {self}: TM, TN multiples of 4 (≤16, TM·TN ≤ 128), "
                             "BK and BN multiples of 8, at most 8 vec4 loads per thread per K tile")
        if ctx is not None:
            smem = 2 * self.bk * (self.bm + self.bn) * 4 + 64
            if smem > int(ctx.limits["max-compute-workgroup-storage-size"]) or nt > int(
                    ctx.limits["max-compute-invocations-per-workgroup"]):
                raise ValueError(f"GEMM tiles {self} need {smem} B workgroup memory / {nt} threads; "
                                 f"{ctx.describe()} allows {ctx.limits['max-compute-workgroup-storage-size']} B")
        return self

    def constants(self) -> dict:
        return {"WGX": self.wgx, "WGY": self.wgy, "TM": self.tm, "TN": self.tn, "BK": self.bk}


def tiles_for(ctx) -> GemmTiles:
    """Per-adapter default; QLORA_EXT_GEMM_TILES='wgx,wgy,tm,tn,bk' overrides (benchmarks)."""
    env = os.environ.get("QLORA_EXT_GEMM_TILES")
    if env:
        try:
            t = GemmTiles(*[int(v) for v in env.split(",")])
        except (TypeError, ValueError):
            raise ValueError(f"QLORA_EXT_GEMM_TILES={env!r}: expected five integers wgx,wgy,tm,tn,bk") from None
        return t.check(ctx)
    if ctx.info["software"]:
        return GemmTiles(8, 8, 4, 4, 8).check(ctx)
    # 128 x 128 tiles, 8 x 8 per thread, BK 16: 26.1-30.7 TFLOP/s with NF4 B at every
    # projection GEMM of the Qwen3 steps on an NVIDIA H200 (bench_gemm_ceiling.py; BK 8: 21-26)
    big = GemmTiles(16, 16, 8, 8, 16)
    try:
        return big.check(ctx)
    except ValueError:
        return GemmTiles(16, 16, 4, 4, 8).check(ctx)


class TileChooser:
    """Tiles per GEMM shape: `big` unless its grid would leave the GPU part idle (fewer than
    `min_groups` workgroups: the N = hidden GEMMs at small M, and the rank-r LoRA GEMMs), then
    `small`.  QLORA_EXT_GEMM_TILES / QLORA_EXT_GEMM_TILES_SMALL override (benchmarks)."""

    # Defaults from the sweep on an NVIDIA H200 (bench_gemm.py --direct): 64 x 128 tiles win
    # for N = 2560 at M = 2048 (down 23.7 vs 21.4, dx 26.4 vs 21.5, dh 26.4 vs 25.5 TFLOP/s fp32)
    # and 128 x 128 for gate|up (27.0 vs 24.9); grids of 128 x 128 tiles: gate|up 2432, dh 1216.
    def __init__(self, ctx, big: GemmTiles | None = None, small: GemmTiles | None = None, min_groups: int = 1300):
        self.big = (big or tiles_for(ctx)).check(ctx)
        env = os.environ.get("QLORA_EXT_GEMM_TILES_SMALL")
        if small is None and env:
            small = GemmTiles(*[int(v) for v in env.split(",")])
        if small is None:
            small = GemmTiles(8, 8, 4, 4, 8) if ctx.info["software"] else GemmTiles(16, 16, 4, 8, 8)
        self.small = small.check(ctx)
        self.min_groups = int(os.environ.get("QLORA_EXT_GEMM_MIN_GROUPS", min_groups))

    def __call__(self, M: int, N: int) -> GemmTiles:
        groups = -(-M // self.big.bm) * -(-N // self.big.bn)
        return self.big if groups >= self.min_groups else self.small

    def check(self, ctx):
        return self


@dataclass
class Operand:
    """A row-major fp32 matrix in a buffer: element (i, j) at off + i·ld + j."""

    buf: object
    off: int = 0
    ld: int = 0


@dataclass
class Nf4B:
    """One or two NF4 tensors stacked by rows (stored [rows, ncols], row-major blocking):
    rows < split in part 0 (from word 0, block 0), the rest in part 1 (from word code_off1,
    block abs_off1)."""

    codes: object
    absmax: object
    ncols: int
    split: int
    code_off1: int
    abs_off1: int
    blocksize: int


def gemm(rec: Recorder, tiles, M: int, N: int, K: int, a: Operand, b, c: Operand,
         b_t: bool, lora=None, accum: bool = False) -> None:
    """C[M, N] (+)= A[M, K] · op(B) (+ T · op(L)).

    b: Operand (fp32; stored [N, K] if b_t else [K, N], row stride b.ld) or Nf4B.
    lora: None or (T: Operand [M, R], R, L buffer, mode) with mode 1: L stored [N, R], 2: [R, N]."""
    ctx = rec.ctx
    if isinstance(tiles, TileChooser):
        tiles = tiles(M, N)
    nf4 = isinstance(b, Nf4B)
    dummy = ctx.dummy()
    if nf4:
        ldb = b.ncols
        b_vec = ldb % 8 == 0
        nf4_fields = (b.split, b.code_off1, b.abs_off1, b.blocksize.bit_length() - 1)
        b_off = 0
        bufs_b = (dummy, b.codes, b.absmax)
    else:
        ldb = b.ld
        b_vec = ldb % 4 == 0 and b.off % 4 == 0 and (K if b_t else N) % 4 == 0
        nf4_fields = (1 << 31, 0, 0, 0)
        b_off = b.off
        bufs_b = (b.buf, dummy, dummy)
    if lora is not None:
        t, R, lbuf, mode = lora
        lfields = (R, t.ld, t.off)
        bufs_l = (t.buf, lbuf)
    else:
        mode, lfields, bufs_l = 0, (0, 0, 0), (dummy, dummy)
    a_vec = a.off % 4 == 0 and a.ld % 4 == 0 and K % 4 == 0
    c_vec = c.off % 4 == 0 and c.ld % 4 == 0 and N % 4 == 0
    consts = dict(tiles.constants(), B_T=bool(b_t), B_NF4=nf4, A_VEC=a_vec, B_VEC=bool(b_vec), C_VEC=c_vec,
                  LORA=mode, ACCUM=bool(accum))
    params = pack("16I", M, N, K, a.ld, ldb, c.ld, a.off, c.off, *lfields, nf4_fields[0],
                  nf4_fields[1], nf4_fields[2], nf4_fields[3], b_off)
    grid = ((N + tiles.bn - 1) // tiles.bn, (M + tiles.bm - 1) // tiles.bm)
    rec.dispatch("gemm", "main", GEMM_KINDS, consts, params, (a.buf,) + bufs_b + bufs_l + (c.buf,), grid,
                 f"M={M} N={N} K={K} {'nf4' if nf4 else 'fp32'} {'NT' if b_t else 'NN'} lora={mode} "
                 f"tiles={tiles.bm}x{tiles.bn}")


def swiglu_forward(rec: Recorder, M: int, I: int, gu, h) -> None:
    """gu [M, 2I] -> h [M, I]."""
    d = rec.ctx.dummy()
    rec.dispatch("swiglu", "forward", ("uniform", "read", "read", "rw", "rw"), {}, pack("4I", M, I, 0, 0),
                 (gu, d, _second_dummy(rec.ctx), h), ((I + 255) // 256, M))


def swiglu_backward(rec: Recorder, M: int, I: int, gu, dh, dgu) -> None:
    """gu [M, 2I], dh [M, I] -> dgu [M, 2I]."""
    rec.dispatch("swiglu", "backward", ("uniform", "read", "read", "rw", "rw"), {}, pack("4I", M, I, 0, 0),
                 (gu, dh, dgu, _second_dummy(rec.ctx)), ((I + 255) // 256, M))


def _second_dummy(ctx):
    # a writable binding may not alias another binding of the same dispatch: a second dummy
    if getattr(ctx, "_dummy2", None) is None:
        ctx._dummy2 = ctx.buffer(256, what="dummy binding 2")
    return ctx._dummy2


def dropout(rec: Recorder, rows: int, cols: int, z: Operand, out: Operand, key: int, thr: int, scale: float,
            row0: int, add: bool = False) -> None:
    """out[rows, cols] (+)= z · mask · scale with the hash mask of global rows row0.."""
    params = pack("9If2I", rows, cols, z.ld, out.ld, z.off, out.off, key & 0xFFFFFFFF, thr, row0, scale, 0, 0)
    rec.dispatch("dropout", "main", ("uniform", "read", "rw"), {"ADD": bool(add)}, params, (z.buf, out.buf),
                 ((cols + 255) // 256, rows))


def lora_grad(rec: Recorder, M: int, P: int, Q: int, x: Operand, y: Operand, g_buf, g_off: int,
              trans_out: bool, accum: bool) -> None:
    """G[P, Q] (or [Q, P] with trans_out) (+)= Σ_m X[m, p] Y[m, q]; X [M, P], Y [M, Q]."""
    if P == 0 or Q == 0:
        return
    params = pack("8I", M, P, Q, x.ld, y.ld, x.off, y.off, g_off)
    rec.dispatch("lora_grad", "main", ("uniform", "read", "read", "rw"),
                 {"TRANS_OUT": bool(trans_out), "ACCUM": bool(accum)}, params, (x.buf, y.buf, g_buf),
                 ((Q + 63) // 64, (P + 15) // 16))


def check_grid(ctx, rows: int) -> None:
    lim = int(ctx.limits["max-compute-workgroups-per-dimension"])
    if rows > lim:
        raise GpuError(f"{ctx.describe()}: {rows} rows in one dispatch exceed {lim}")
