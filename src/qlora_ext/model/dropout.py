"""LoRA dropout masks, the same on every device: a counter-based hash that the CPU computes
here and shaders/dropout_hash.wgsl computes on the GPU, so a step is reproducible across
placements and a recompute (activation checkpointing) draws the same mask.

Element (i, j) of z [N, in] for projection
p of layer l is kept iff  (hash(idx ^ key) >> 8) >= round(p_drop · 2^24),  idx = i·in + j,
key = hash(seed_lo ^ hash(seed_hi ^ hash(l·3 + p + 1))).  Kept values are scaled by
keep_scale = float32(1 / (1 - p_drop))."""
from __future__ import annotations

import numpy as np

from .lora import PROJECTIONS


def dropout_seed(seed: int, step: int, layer: int) -> int:
    """The dropout seed of one (step, layer): every projection's mask of that layer derives
    from it (dropout_key), on every device, so all placements drop the same inputs."""
    return int(np.random.default_rng([seed, step, layer, 7]).integers(2**31))


def _hash32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer mixer (xorshift-multiply, 2 rounds); uint32 in, uint32 out."""
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        x = x ^ (x >> np.uint32(16))
    return x


def dropout_key(seed: int, layer: int, proj: str) -> int:
    """The per-(seed, layer, projection) 32-bit key of the dropout hash; any of the 7
    projections (the attention ones too: every placement draws all its masks this way)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    k = _hash32(np.uint32((layer * 8 + PROJECTIONS.index(proj) + 1) & 0xFFFFFFFF))
    k = _hash32(np.uint32(s >> 32) ^ k)
    return int(_hash32(np.uint32(s & 0xFFFFFFFF) ^ k))


def dropout_threshold(p: float) -> int:
    """Integer threshold on the top 24 hash bits: P(drop) = threshold / 2^24."""
    return int(round(float(p) * (1 << 24)))


def dropout_keep_scale(p: float) -> np.float32:
    return np.float32(1.0 / (1.0 - float(p)))


def apply_dropout(z: np.ndarray, p: float, key: int) -> np.ndarray:
    """z [N, in] float32 -> z · mask · keep_scale (a new array); p == 0 returns z itself."""
    if p == 0.0:
        return z
    n, k = z.shape
    out = np.empty_like(z)
    thr = np.uint32(dropout_threshold(p))
    scale = dropout_keep_scale(p)
    # in row chunks: the uint32 temporaries stay a few MB
    rows = max(1, (1 << 20) // max(k, 1))
    cols = np.arange(k, dtype=np.uint32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        idx = (np.arange(r0, r1, dtype=np.uint32)[:, None] * np.uint32(k)) + cols[None, :]
        keep = (_hash32(idx ^ np.uint32(key)) >> np.uint32(8)) >= thr
        np.multiply(z[r0:r1], scale, out=out[r0:r1])
        out[r0:r1][~keep] = 0.0
    return out
