"""LM head + chunked cross-entropy of the resident mode: logits = hidden @ W_lmᵀ, loss with
HF's shift (token t predicts labels[t + 1]) and -100 ignored.  The [N, V] logits never exist
whole: rows go through in chunks of `chunk_rows`; each chunk's logits are turned into dlogits
in place and multiplied back into dhidden (and into dW when the head trains) before the next.
Shaders: resident_gemm.wgsl, resident_cross_entropy.wgsl."""
from __future__ import annotations

import numpy as np

from .context import GpuContext, GpuTensor, default_context, grid_2d
from .gemm import gemm_gpu

IGNORE_INDEX = -100
_WG = 256
# Default chunk: this many bytes of logits at a time.
CHUNK_BYTES = 64 << 20


def chunk_rows_for(ctx: GpuContext, vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    lim = min(chunk_bytes, ctx.limits["max-storage-buffer-binding-size"])
    return max(1, lim // (4 * max(vocab, 1)))


class LmHeadLoss:
    """Buffers of one (N, C, V) configuration, reused step to step: the logits chunk, per-row
    losses and counts, stats [loss_sum, count]."""

    def __init__(self, ctx: GpuContext, n_rows: int, hidden: int, vocab: int,
                 chunk_rows: int | None = None):
        self.ctx, self.N, self.C, self.V = ctx, int(n_rows), int(hidden), int(vocab)
        self.R = min(self.N, chunk_rows or chunk_rows_for(ctx, self.V))
        self.logits = ctx.empty((self.R, self.V))
        self.losses = ctx.empty((self.N,))
        self.counted = ctx.empty((self.N,), "u32")
        self.stats = ctx.empty((2,))

    def record(self, hidden: GpuTensor, w_lm: GpuTensor, labels: GpuTensor, T: int,
               grad_scale: float, dhidden: GpuTensor | None = None,
               dw_lm: GpuTensor | None = None, w_off: int = 0, dw_off: int = 0) -> GpuTensor:
        """hidden [N, C] (final-normed), w_lm [V, C] (at element offset w_off of its buffer),
        labels i32 [N] (flattened [B, T]).  Records the loss into self.stats; with dhidden
        [N, C] writes d(grad_scale * loss_sum)/dhidden, with dw_lm [V, C] (at dw_off) *adds*
        d(...)/dW into it.  Returns self.stats."""
        ctx, N, C, V, R = self.ctx, self.N, self.C, self.V, self.R
        want = dhidden is not None or dw_lm is not None
        pipe = ctx.pipeline("resident_cross_entropy", "rows", "urwwww", overrides={"WG": _WG})
        for r0 in range(0, N, R):
            rows = min(R, N - r0)
            # logits[rows, V] = hidden[r0:r0+rows] @ w_lmᵀ
            gemm_gpu(ctx, hidden, w_lm, self.logits, rows, V, C, trans_b=True, a_off=r0 * C,
                     b_off=w_off)
            par = ctx.uniform("IIIIIf", r0, rows, V, T, int(want), float(grad_scale))
            ctx.dispatch(pipe, [par, labels, self.logits, self.losses, self.counted, self.stats],
                         grid_2d(rows))
            if dhidden is not None:
                # dhidden[r0:r0+rows] = dlogits @ w_lm
                gemm_gpu(ctx, self.logits, w_lm, dhidden, rows, C, V, b_off=w_off, c_off=r0 * C)
            if dw_lm is not None:
                # dW[V, C] += dlogitsᵀ @ hidden[r0:r0+rows]
                gemm_gpu(ctx, self.logits, hidden, dw_lm, V, C, rows, trans_a=True,
                         accumulate=True, b_off=r0 * C, c_off=dw_off)
        red = ctx.pipeline("resident_cross_entropy", "reduce", "urwwww", overrides={"WG": _WG})
        ctx.dispatch(red, [ctx.uniform("IIIIIf", 0, N, V, T, 0, 0.0), labels, self.logits,
                           self.losses, self.counted, self.stats], (1,))
        return self.stats


def count_targets(labels: np.ndarray) -> int:
    """Tokens that count in the loss for labels [B, T] (HF shift: labels[:, 1:] != -100)."""
    return int(np.count_nonzero(labels[:, 1:] != IGNORE_INDEX))


def lm_head_loss(hidden: np.ndarray, w_lm: np.ndarray, labels, want_grad: bool = True,
                 train_head: bool = False, chunk_rows: int | None = None, ctx=None):
    """numpy: hidden [B, T, C], w_lm [V, C], labels int [B, T] -> (loss_sum, count, dhidden
    [B, T, C] or None, dw_lm [V, C] or None), loss_sum and count as computed on the GPU;
    gradients are those of the mean loss loss_sum / count (zero when count is 0)."""
    if not isinstance(hidden, np.ndarray) or hidden.dtype != np.float32 or hidden.ndim != 3:
        raise ValueError(f"hidden: expected float32 [B, T, C], got "
                         f"{getattr(hidden, 'dtype', type(hidden).__name__)} {getattr(hidden, 'shape', '')}")
    B, T, C = hidden.shape
    if not isinstance(w_lm, np.ndarray) or w_lm.dtype != np.float32 or w_lm.ndim != 2 or w_lm.shape[1] != C:
        raise ValueError(f"w_lm: expected float32 [V, {C}], got {getattr(w_lm, 'shape', type(w_lm).__name__)}")
    V = w_lm.shape[0]
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.shape != (B, T):
        raise ValueError(f"labels: expected an integer array of shape ({B}, {T}), got "
                         f"{labels.dtype} {labels.shape}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
    if bad.any():
        raise ValueError(f"labels: values must be -100 or lie in [0, {V}), got {labels[bad][0]}")
    count = count_targets(labels)
    ctx = default_context() if ctx is None else ctx
    head = LmHeadLoss(ctx, B * T, C, V, chunk_rows)
    gh, gw = ctx.upload(hidden.reshape(B * T, C)), ctx.upload(w_lm)
    dh = ctx.empty((B * T, C)) if want_grad else None
    dw = ctx.zeros((V, C)) if (want_grad and train_head) else None
    stats = head.record(gh, gw, ctx.upload(labels.reshape(-1).astype(np.int32), "i32"), T,
                        1.0 / count if count else 0.0, dh, dw)
    loss_sum, n = ctx.to_numpy(stats)
    return (float(loss_sum), int(n), None if dh is None else ctx.to_numpy(dh).reshape(B, T, C),
            None if dw is None else ctx.to_numpy(dw))
