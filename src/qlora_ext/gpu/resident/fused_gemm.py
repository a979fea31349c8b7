"""Thin adapter to the ffn engineer's register-tiled GEMM (shaders/gemm.wgsl, host side in
qlora_ext.gpu.kernels.gemm) for the resident engine's context: NF4 weights dequantized while
staged in workgroup memory, LoRA term in the epilogue, one dispatch per projection product.

Their `gemm()` records into their own Recorder/device; the resident engine keeps everything
in one GpuContext (one device, one encoder per step), so this module re-packs the same
parameter block for the same shader through GpuContext.dispatch.  It relies on gemm.wgsl's
binding order (uniform, a, bf, codes, absmax, lt, ll, c) and 16-u32 parameter block as
committed in 4d3e69c; tests/test_gpu_resident_engine.py checks the result against the CPU.

The LoRA matrix L has no element offset in that shader, so it is bound as a sub-range of the
flat parameter buffer: the engine aligns every tensor there to 64 elements (256 bytes, the
usual min-storage-buffer-offset-alignment)."""
from __future__ import annotations

import os

from ..kernels import GemmTiles, TileChooser
from .context import GpuContext, GpuTensor
from .weights import ResidentWeight

# Element alignment of LoRA tensors in the flat parameter buffer (256 bytes).
PARAM_ALIGN = 64
_KINDS = "urrrrrrw"


class ResidentTiles:
    """gemm.wgsl tiles per shape for the resident mode's GEMMs: M = B·T token rows (4096 at
    4 x 1024) for the projections, the LM head's chunk rows (1024-2048) with N or K = vocab.

    From bench/bench_gemm_ceiling.py on an NVIDIA H200 (2026-12-03; both Qwen3 shapes, every
    projection forward and dx with NF4 and the LoRA epilogue, the LM head; BENCHMARKS.md):
    - 128 x 128 tiles, 8 x 8 per thread, BK 16 (16,16,8,8,16): 26.1-30.7 TFLOP/s on every
      projection GEMM, within 1-2 of the best setting at each shape (8 x 16 per thread won by
      up to 1.3 at some shapes and lost 3-4 at N = 2560).
    - vocab-wide N (the logits): 128 x 128 tiles of 128 threads with 8 x 16 each, BK 8
      (8,16,8,16,8): 32.4 / 32.9 (8 x 8 per thread: 20-21).
    - grids of fewer than 200 128 x 128 tiles (dhidden: K = vocab, M x N = 2048 x 1024 or
      1024 x 2560, 128 or 160 tiles for 132 SMs): 64 x 128 tiles, 4 x 8 per thread
      (16,16,4,8,8): 29.6 / 26.2 against 23.9 / 15.3 for the previous 128 x 128 choice.
    Software adapters (lavapipe's 32 KiB of workgroup memory) and the QLORA_EXT_GEMM_TILES*
    overrides keep the FFN backend's TileChooser."""

    BIG = GemmTiles(16, 16, 8, 8, 16)
    WIDE = GemmTiles(8, 16, 8, 16, 8)
    SMALL = GemmTiles(16, 16, 4, 8, 8)
    WIDE_N = 32768
    THIN_GRID = 200

    def __init__(self, ctx: GpuContext):
        self.fallback = TileChooser(ctx)
        own = not ctx.info["software"] and not any(
            os.environ.get(v) for v in ("QLORA_EXT_GEMM_TILES", "QLORA_EXT_GEMM_TILES_SMALL",
                                        "QLORA_EXT_GEMM_MIN_GROUPS"))
        if own:
            try:
                for t in (self.BIG, self.WIDE, self.SMALL):
                    t.check(ctx)
            except ValueError:
                own = False
        self.own = own

    def __call__(self, M: int, N: int) -> GemmTiles:
        if not self.own:
            return self.fallback(M, N)
        if N >= self.WIDE_N:
            return self.WIDE
        groups = -(-M // 128) * -(-N // 128)
        return self.SMALL if groups < self.THIN_GRID else self.BIG


def _tiles(ctx: GpuContext, M: int, N: int) -> GemmTiles:
    """ResidentTiles' choice, the chooser made once per context."""
    chooser = getattr(ctx, "_resident_tiles", None)
    if chooser is None:
        chooser = ctx._resident_tiles = ResidentTiles(ctx)
    return chooser(M, N)


def _dummy(ctx: GpuContext):
    d = getattr(ctx, "_gemm_dummy", None)
    if d is None:
        d = ctx._gemm_dummy = ctx.empty((4,))
    return d


def fused_gemm_gpu(ctx: GpuContext, M: int, N: int, K: int, a: GpuTensor, w: ResidentWeight,
                   c: GpuTensor, b_t: bool, lora=None, accumulate: bool = False,
                   a_off: int = 0, c_off: int = 0, b_off: int = 0,
                   tiles: GemmTiles | None = None) -> None:
    """C[M, N] (+)= A[M, K] · op(W) (+ T · op(L)); A and C contiguous (row strides K and N)
    from element a_off / c_off of their buffers.

    w: [out, in]; b_t=True: op(W) = Wᵀ (N = out, K = in), False: op(W) = W (N = in, K = out);
    an fp32 W may start at element b_off of its buffer (NF4: b_off must be 0).
    lora: None or (T [M, R] GpuTensor, R, params GpuTensor, l_off elements, mode): mode 1 ->
    L stored [N, R] (LoRA B, forward), mode 2 -> L stored [R, N] (LoRA A, backward); the scale
    must already be in T.  l_off must be a multiple of PARAM_ALIGN.
    The offsets are fields of gemm.wgsl's parameter block (element offsets, not binding
    offsets), so they need no alignment; vec4 loads/stores are used where they are multiples
    of 4.  tiles replaces the per-shape choice (benchmarks)."""
    tiles = _tiles(ctx, M, N) if tiles is None else tiles.check(ctx)
    d = _dummy(ctx)
    for name, t, off, need in (("a", a, a_off, M * K), ("c", c, c_off, M * N),
                               ("w", w.fp32, b_off, N * K)):
        if t is not None and off + need > t.size:
            raise ValueError(f"fused_gemm_gpu: {name} holds {t.size} elements, needs {off + need}")
    if w.fp32 is not None:
        ldb = K if b_t else N
        b_vec = ldb % 4 == 0 and (K if b_t else N) % 4 == 0 and b_off % 4 == 0
        nf4_fields = (1 << 31, 0, 0, 0)
        bufs_b = [w.fp32, d, d]
        nf4 = False
    else:
        if b_off:
            raise ValueError(f"fused_gemm_gpu: b_off={b_off} for an NF4 weight (only fp32 weights "
                             "take an element offset)")
        ldb = w.shape[1]
        b_vec = ldb % 8 == 0
        nf4_fields = (1 << 31, 0, 0, w.blocksize.bit_length() - 1)
        bufs_b = [d, w.packed, w.absmax]
        nf4 = True
    if lora is not None:
        t, R, params, l_off, mode = lora
        if l_off % PARAM_ALIGN:
            raise ValueError(f"fused_gemm_gpu: LoRA offset {l_off} is not a multiple of {PARAM_ALIGN}")
        n_l = R * N
        bufs_l = [t, (params.buffer, 4 * l_off, 4 * ((n_l + 3) // 4 * 4))]
        lfields = (R, R, 0)
    else:
        mode, lfields, bufs_l = 0, (0, 0, 0), [d, d]
    consts = dict(tiles.constants(), B_T=bool(b_t), B_NF4=nf4, A_VEC=K % 4 == 0 and a_off % 4 == 0,
                  B_VEC=bool(b_vec), C_VEC=N % 4 == 0 and c_off % 4 == 0, LORA=mode,
                  ACCUM=bool(accumulate))
    par = ctx.uniform("16I", M, N, K, K, ldb, N, a_off, c_off, *lfields, *nf4_fields, b_off)
    pipe = ctx.pipeline("gemm", "main", _KINDS, overrides=consts)
    ctx.dispatch(pipe, [par, a] + bufs_b + bufs_l + [c],
                 ((N + tiles.bn - 1) // tiles.bn, (M + tiles.bm - 1) // tiles.bm))
