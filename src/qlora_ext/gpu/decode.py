"""Generation's GPU kernels: the KV cache's store (shaders/kv_store.wgsl), attention of new
tokens over the cache (shaders/decode_attention.wgsl) and the top-k of each row of logits
(shaders/topk.wgsl), so that a decoding step sends only k token ids (and values) per row back.

Shape letters: B rows, S slots, Tn new tokens per row, Hq/Hkv
heads, D head dim, V vocabulary, k candidates."""
from __future__ import annotations

import math

from .runtime import GpuContext, GpuTensor, grid_2d

_STORE_WG = 64
_MAX_HEAD_DIM = 256     # decode_attention.wgsl: DPT * WG output dims per workgroup
_TOPK_CHUNK = 1024      # topk.wgsl's CHUNK
# Candidates per row the top-k kernel takes: k rounds of a workgroup reduction each, and a pass
# shrinks a row only while k is well under the chunk (the nucleus cut needs a few dozen).
MAX_TOP_K = 256


def kv_store_gpu(ctx: GpuContext, k: GpuTensor, v: GpuTensor, kc: GpuTensor, vc: GpuTensor, length: int) -> None:
    """k, v [B, Tn, Hkv, D] into kc, vc [B, S, Hkv, D] at slots length .. length + Tn - 1."""
    B, Tn, Hkv, D = k.shape
    S = kc.shape[1]
    if length + Tn > S or tuple(kc.shape) != (B, S, Hkv, D):
        raise ValueError(f"kv_store: new keys {k.shape} at slot {length} do not fit the cache {kc.shape}")
    n = B * Tn * Hkv * D
    pipe = ctx.pipeline("kv_store", "store", "urrww", overrides={"WG": _STORE_WG})
    ctx.dispatch(pipe, [ctx.uniform("IIIII", n, Tn, S, Hkv * D, length), k, v, kc, vc],
                 grid_2d((n + _STORE_WG - 1) // _STORE_WG))


def decode_attention_gpu(ctx: GpuContext, q: GpuTensor, kc: GpuTensor, vc: GpuTensor, valid: GpuTensor,
                         length: int, out: GpuTensor) -> None:
    """q [B, Tn, Hq, D] over the cache kc, vc [B, S, Hkv, D] (the Tn new tokens already stored
    at slots length ..), valid u32 [B, S] -> out [B, Tn, Hq, D]."""
    B, Tn, Hq, D = q.shape
    S, Hkv = kc.shape[1], kc.shape[2]
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim D={D}: the decode attention kernel takes 1 <= D <= {_MAX_HEAD_DIM}")
    if kc.shape[0] != B or length + Tn > S or Hq % Hkv:
        raise ValueError(f"decode attention: q {q.shape} against a cache {kc.shape} at slot {length}")
    pipe = ctx.pipeline("decode_attention", "attend", "urrrrw")
    par = ctx.uniform("IIIIIIf", S, Tn, Hq, Hkv, D, length, 1.0 / math.sqrt(D))
    ctx.dispatch(pipe, [par, q, kc, vc, valid, out], (Hq, Tn, B))


def topk_gpu(ctx: GpuContext, logits: GpuTensor, k: int) -> tuple:
    """logits [R, n] -> (values [R, k], indices u32 [R, k]): each row's k largest, descending,
    equal values by lower index.  The result tensors are kept per shape (the next call with
    the same shape writes them again)."""
    R, n = logits.shape
    if not 1 <= k <= min(n, MAX_TOP_K):
        raise ValueError(f"top-k: k={k} must be in [1, {min(n, MAX_TOP_K)}] for rows of {n}")
    pipe = ctx.pipeline("topk", "chunk_topk", "urrww")
    vals, idx, has_idx = logits, logits, 0
    while True:
        chunks = -(-n // _TOPK_CHUNK)
        ov, oi = ctx.cached(("topk", R, chunks, k),
                            lambda: (ctx.empty((R, chunks, k)), ctx.empty((R, chunks, k), "u32")))
        ctx.dispatch(pipe, [ctx.uniform("IIII", n, chunks, k, has_idx), vals, idx, ov, oi], (chunks, R))
        if chunks == 1:
            return ov.view((R, k)), oi.view((R, k))
        vals, idx, has_idx, n = ov, oi, 1, chunks * k
