"""LM head + chunked cross-entropy on the GPU: logits = hidden @ W_lmᵀ, loss with
HF's shift (token t predicts labels[t + 1]) and -100 ignored.  The [N, V] logits never exist
whole: rows go through in chunks of at most `chunk_rows`; each chunk's logits are turned into
dlogits in place and multiplied back into dhidden (and into dW when the head trains) before
the next.  Shaders: gemm_f32.wgsl (qlora_ext.gpu.kernels.gemm) for logits and dhidden, cross_entropy.wgsl, small_gemm.wgsl for
the trained head's dW (a transposed-A product gemm.wgsl does not take)."""
from __future__ import annotations

from ..kernels import Operand, gemm
from ..runtime import GpuContext, GpuTensor, grid_2d
from .gemm import gemm_gpu

_WG = 256
# Default chunk.  The skinny product of a chunk, dhidden[R, H] = dlogits[R, V] @ W[V, H] (K = V
# is long), has only R*H/(64*128) workgroups of gemm.wgsl, so R sets how busy a large GPU is.
# Measured on an H200 (N = 4096, V = 151936, gemm.wgsl's 64x128 tiles): dhidden ran at 3.8,
# 7.6, 24.0 TFLOP/s for R = 256, 512, 2048 at H = 1024, and 9.5, 14.4, 20.9, 25.6 for R = 256,
# 512, 1024, 2048 at H = 2560; the logits product ran at 28 TFLOP/s at every R >= 256.  The
# old 64 MiB chunk (110 rows on small_gemm) took 290 / 612 ms for the whole head at
# H = 1024 / 2560, 1024 rows on gemm.wgsl ~130 (the step profile's gemm.main growth) / 267 ms,
# 2048 rows 101 / 238 ms.  So: rows
# for R*H >= 2M elements (2048 rows at H = 1024, where it pays 30 ms a step), at least 1024
# (the 4B shape stays at 1024 rows = 594 MiB of logits: another 594 MiB there would buy
# 0.6% against its 10 GiB memory target), within CHUNK_BYTES and the adapter's binding
# limit (lavapipe: 128 MiB).
CHUNK_BYTES = 1280 << 20
MIN_CHUNK_ROWS = 1024
DHIDDEN_ELEMS = 1 << 21
# Chunks are a multiple of the GEMM's largest row tile (BM = 128) when at least that long.
_ROW_TILE = 128


def chunk_rows_for(ctx: GpuContext, vocab: int, chunk_bytes: int = CHUNK_BYTES,
                   hidden: int | None = None) -> int:
    """Rows of the logits chunk buffer for hidden size `hidden` (None: MIN_CHUNK_ROWS):
    max(MIN_CHUNK_ROWS, DHIDDEN_ELEMS / hidden) rounded up to 128, but no more than
    chunk_bytes (capped by the storage binding limit) of [rows, vocab] f32 hold, rounded down
    to a multiple of 128 rows when that is at least 128."""
    want = MIN_CHUNK_ROWS if not hidden else max(MIN_CHUNK_ROWS, -(-DHIDDEN_ELEMS // int(hidden)))
    want = -(-want // _ROW_TILE) * _ROW_TILE
    lim = min(chunk_bytes, ctx.limits["max-storage-buffer-binding-size"])
    cap = max(1, lim // (4 * max(vocab, 1)))
    cap = cap // _ROW_TILE * _ROW_TILE if cap >= _ROW_TILE else cap
    return min(want, cap)


def chunk_starts(n_rows: int, max_rows: int) -> list:
    """Row ranges [(r0, rows)] covering n_rows in as few chunks of <= max_rows as possible,
    of near-equal length (a multiple of 128 rows where max_rows allows): 4096 rows with a
    1152-row buffer go as 4 x 1024, not 3 x 1152 + 640 (a short last chunk is a skinny GEMM
    that leaves most of the GPU idle)."""
    n_chunks = -(-n_rows // max_rows)
    per = -(-n_rows // n_chunks)
    if max_rows >= _ROW_TILE:
        per = min(max_rows, -(-per // _ROW_TILE) * _ROW_TILE)
    return [(r0, min(per, n_rows - r0)) for r0 in range(0, n_rows, per)]


class LmHeadLoss:
    """Buffers of one (N, C, V) configuration, reused step to step: the logits chunk, per-row
    losses and counts, stats [loss_sum, count].  row_block: no chunk crosses a multiple of
    this many rows (the split placement's batch rows: the trained head's dW then adds up the
    same way however the batch is cut into lanes)."""

    def __init__(self, ctx: GpuContext, n_rows: int, hidden: int, vocab: int,
                 chunk_rows: int | None = None, row_block: int | None = None):
        self.ctx, self.N, self.C, self.V = ctx, int(n_rows), int(hidden), int(vocab)
        if chunk_rows is not None and int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows={chunk_rows}: expected a positive number of rows")
        self.R = min(self.N, int(chunk_rows) if chunk_rows else chunk_rows_for(ctx, self.V, hidden=self.C))
        block = self.N if row_block is None else int(row_block)
        self.chunks = [(b0 + r0, rows) for b0 in range(0, self.N, block)
                       for r0, rows in chunk_starts(min(block, self.N - b0), self.R)]
        self.R = max(rows for _, rows in self.chunks)
        self.logits = ctx.empty((self.R, self.V))
        self.losses = ctx.empty((self.N,))
        self.counted = ctx.empty((self.N,), "u32")
        self.stats = ctx.empty((2,))

    def record(self, hidden: GpuTensor, w_lm: GpuTensor, labels: GpuTensor, T: int,
               grad_scale: float, dhidden: GpuTensor | None = None,
               dw_lm: GpuTensor | None = None, w_off: int = 0, dw_off: int = 0,
               scratch: GpuTensor | None = None) -> GpuTensor:
        """hidden [N, C] (final-normed), w_lm [V, C] (at element offset w_off of its buffer),
        labels i32 [N] (flattened [B, T]).  Records the loss into self.stats; with dhidden
        [N, C] writes d(grad_scale * loss_sum)/dhidden, with dw_lm [V, C] (at dw_off) *adds*
        d(...)/dW into it.  scratch: f32 room for dhidden's split-K partials (kernels.gemm),
        idle during this call.  Returns self.stats."""
        ctx, N, C, V = self.ctx, self.N, self.C, self.V
        want = dhidden is not None or dw_lm is not None
        pipe = ctx.pipeline("cross_entropy", "rows", "urwwww", overrides={"WG": _WG})
        # W [V, C] as gemm.wgsl's fp32 B operand (at element w_off of its buffer)
        w = Operand(w_lm, w_off, C)
        for r0, rows in self.chunks:
            # logits[rows, V] = hidden[r0:r0+rows] @ w_lmᵀ
            gemm(ctx, rows, V, C, Operand(hidden, r0 * C), w, Operand(self.logits), b_t=True)
            par = ctx.uniform("IIIIIf", r0, rows, V, T, int(want), float(grad_scale))
            ctx.dispatch(pipe, [par, labels, self.logits, self.losses, self.counted, self.stats],
                         grid_2d(rows))
            if dhidden is not None:
                # dhidden[r0:r0+rows] = dlogits[rows, V] @ w_lm[V, C]
                gemm(ctx, rows, C, V, Operand(self.logits), w, Operand(dhidden, r0 * C), b_t=False,
                     scratch=scratch)
            if dw_lm is not None:
                # dW[V, C] += dlogitsᵀ @ hidden[r0:r0+rows]
                gemm_gpu(ctx, self.logits, hidden, dw_lm, V, C, rows, trans_a=True,
                         accumulate=True, b_off=r0 * C, c_off=dw_off)
        red = ctx.pipeline("cross_entropy", "reduce", "urwwww", overrides={"WG": _WG})
        ctx.dispatch(red, [ctx.uniform("IIIIIf", 0, N, V, T, 0, 0.0), labels, self.logits,
                           self.losses, self.counted, self.stats], (1,))
        return self.stats
