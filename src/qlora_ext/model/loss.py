"""Cross-entropy over the vocabulary in chunks of token rows, so that the [tokens, vocab]
logits matrix never exists whole (Qwen3's vocabulary is 151,936: 256 tokens would be 155 MB).

Shapes: M counted rows, H hidden, V vocab, c rows per chunk."""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
# Bytes of one float32 logits chunk [c, V]: big enough for efficient sgemm, small next to the model.
CHUNK_BYTES = 32 << 20


def shifted_targets(labels: np.ndarray) -> np.ndarray:
    """labels [B, T] (aligned with input_ids) -> targets [B, T]: position t predicts labels[t+1];
    the last position and -100 labels are ignored (-100), as transformers' causal-LM loss."""
    tgt = np.full(labels.shape, IGNORE_INDEX, dtype=np.int64)
    tgt[:, :-1] = labels[:, 1:]
    return tgt


def chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    return max(16, budget // (4 * max(vocab, 1)))


def cross_entropy(h: np.ndarray, W: np.ndarray, targets: np.ndarray, grad_scale: float | None,
                  dW: np.ndarray | None = None, timer=None):
    """Summed cross-entropy of softmax(h Wᵀ) at `targets`, chunk by chunk.

    h [M, H] float32 (final-norm output of the counted rows), W [V, H] the LM head,
    targets [M] in [0, V).  With grad_scale (1/count for a mean, 1 for a sum) also returns
    dh [M, H] = grad_scale · (softmax - onehot) W, and adds grad_scale · (softmax - onehot)ᵀ h
    into dW [V, H] when given.  Returns (loss_sum as a Python float, dh or None)."""
    M = h.shape[0]
    V = W.shape[0]
    c = chunk_rows(V)
    total = 0.0
    dh = np.empty_like(h) if grad_scale is not None else None
    nullctx = _NullTimer()
    tm = timer if timer is not None else nullctx
    for r0 in range(0, M, c):
        r1 = min(M, r0 + c)
        hc, tc = h[r0:r1], targets[r0:r1]
        with tm("lm_head"):
            logits = hc @ W.T                                   # [c, V]
        with tm("loss"):
            rows = np.arange(r1 - r0)
            m = logits.max(axis=1, keepdims=True)
            picked = logits[rows, tc] - m[:, 0]
            logits -= m
            np.exp(logits, out=logits)                           # e = exp(logit - max)
            z = logits.sum(axis=1, dtype=np.float64)
            total += float(np.sum(np.log(z) - picked.astype(np.float64)))
            if grad_scale is None:
                continue
            # dlogits = scale * (softmax - onehot), built in the logits buffer
            logits *= (grad_scale / z).astype(np.float32)[:, None]
            logits[rows, tc] -= np.float32(grad_scale)
        with tm("lm_head"):
            np.matmul(logits, W, out=dh[r0:r1])                  # [c, H]
            if dW is not None:
                dW += logits.T @ hc
    return total, dh


class _NullTimer:
    def __call__(self, name):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
