"""Cross-entropy over the vocabulary in chunks of token rows, so that the [tokens, vocab]
logits matrix never exists whole (Qwen3's vocabulary is 151,936: 256 tokens would be 155 MB).

Shapes: M counted rows, H hidden, V vocab, c rows per chunk."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._native import kernels

IGNORE_INDEX = -100
# Bytes of one float32 logits chunk [c, V]: big enough for efficient sgemm, small next to the model.
CHUNK_BYTES = 32 << 20
# Rows below which a part of a threaded cross_entropy is not worth a thread.
MIN_PART_ROWS = 16


def shifted_targets(labels: np.ndarray) -> np.ndarray:
    """labels [B, T] (aligned with input_ids) -> targets [B, T]: position t predicts labels[t+1];
    the last position and -100 labels are ignored (-100), as transformers' causal-LM loss."""
    tgt = np.full(labels.shape, IGNORE_INDEX, dtype=np.int64)
    tgt[:, :-1] = labels[:, 1:]
    return tgt


def chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    return max(16, budget // (4 * max(vocab, 1)))


def _numpy_product(x: np.ndarray, W: np.ndarray, transpose: bool, out: np.ndarray) -> None:
    np.matmul(x, W.T if transpose else W, out=out)


def cross_entropy(h: np.ndarray, W: np.ndarray, targets: np.ndarray, grad_scale: float | None,
                  dW: np.ndarray | None = None, timer=None, threads: int = 1, product=None):
    """Summed cross-entropy of softmax(h Wᵀ) at `targets`, chunk by chunk.

    h [M, H] float32 (final-norm output of the counted rows), W [V, H] the LM head,
    targets [M] in [0, V).  With grad_scale (1/count for a mean, 1 for a sum) also returns
    dh [M, H] = grad_scale · (softmax - onehot) W, and adds grad_scale · (softmax - onehot)ᵀ h
    into dW [V, H] when given.  Returns (loss_sum as a Python float, dh or None).

    threads > 1: the rows are cut into that many contiguous parts computed at once, for a
    caller that holds numpy's BLAS to one thread (its products release the GIL); the whole
    call is then timed as "lm_head".

    product(x, W, transpose, out): the two products with the frozen head, out = x Wᵀ
    (transpose) or x W, e.g. in the device's compute dtype; numpy's float32 matmul by default.
    The trained head's gradient dW is always a float32 numpy product."""
    product = _numpy_product if product is None else product
    M = h.shape[0]
    dh = np.empty_like(h) if grad_scale is not None else None
    parts = min(int(threads), M // MIN_PART_ROWS)
    if parts <= 1:
        return _rows_loss(h, W, targets, grad_scale, dh, dW, timer if timer is not None else _NullTimer(), None,
                          product), dh
    bounds = [M * i // parts for i in range(parts + 1)]
    lock = threading.Lock() if dW is not None else None
    tm = timer if timer is not None else _NullTimer()
    with tm("lm_head"), ThreadPoolExecutor(parts) as pool:
        sums = list(pool.map(
            lambda i: _rows_loss(h[bounds[i]:bounds[i + 1]], W, targets[bounds[i]:bounds[i + 1]], grad_scale,
                                 None if dh is None else dh[bounds[i]:bounds[i + 1]], dW, _NullTimer(), lock,
                                 product),
            range(parts)))
    return float(sum(sums)), dh


def _rows_loss(h, W, targets, grad_scale, dh, dW, tm, lock, product) -> float:
    """cross_entropy's work on rows h [m, H] (dh: their gradient rows, written); `lock`
    serializes the additions into a shared dW."""
    M = h.shape[0]
    c = chunk_rows(W.shape[0])
    total = 0.0
    for r0 in range(0, M, c):
        r1 = min(M, r0 + c)
        hc, tc = h[r0:r1], targets[r0:r1]
        with tm("lm_head"):
            logits = np.empty((r1 - r0, W.shape[0]), np.float32)
            product(hc, W, True, logits)                        # [c, V]
        with tm("loss"):
            total += _softmax_rows(logits, tc, grad_scale)
            if grad_scale is None:
                continue
        with tm("lm_head"):
            product(logits, W, False, dh[r0:r1])                # [c, H]
            if dW is not None:
                g = logits.T @ hc
                with lock if lock is not None else _NullTimer():
                    dW += g
    return total


def _softmax_rows(logits: np.ndarray, targets: np.ndarray, grad_scale: float | None) -> float:
    """Summed loss of the chunk's rows; with grad_scale the logits become grad_scale ·
    (softmax - onehot) in place.  On AVX-512 one C pass per row (csrc/cross_entropy.c, the
    row stays in cache), elsewhere numpy's passes over the chunk."""
    if kernels().cpu_level_name() in ("avx512", "avx512_bf16"):
        loss = np.empty(logits.shape[0], np.float64)
        kernels().cross_entropy_rows(logits, np.ascontiguousarray(targets, np.int64), loss,
                                     1.0 if grad_scale is None else float(grad_scale),
                                     grad_scale is not None, 1)
        return float(np.sum(loss))
    rows = np.arange(logits.shape[0])
    m = logits.max(axis=1, keepdims=True)
    picked = logits[rows, targets] - m[:, 0]
    logits -= m
    np.exp(logits, out=logits)                           # e = exp(logit - max)
    z = logits.sum(axis=1, dtype=np.float64)
    total = float(np.sum(np.log(z) - picked.astype(np.float64)))
    if grad_scale is not None:
        # dlogits = scale * (softmax - onehot), built in the logits buffer
        logits *= (grad_scale / z).astype(np.float32)[:, None]
        logits[rows, targets] -= np.float32(grad_scale)
    return total


class _NullTimer:
    def __call__(self, name):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
