"""Causal GQA flash attention on the GPU (resident mode), forward and backward.

Conventions as qlora_ext.cpu.kernels: q [B, T, Hq, D], k/v [B, T, Hkv, D], query head h uses
kv head h // (Hq/Hkv), scale 1/sqrt(D), lse [B, Hq, T]; optional key padding mask [B, T]
(nonzero = attend).  A query row that sees no key gets o = 0 and lse = -inf.
Shaders: shaders/resident_attention_fwd.wgsl, resident_attention_bwd.wgsl."""
from __future__ import annotations

import math
import os

import numpy as np

from .context import GpuContext, GpuTensor, default_context, grid_2d

_ROWS = 32     # rows (queries; keys in dkdv) per workgroup
_TILE = 16     # keys (forward, dq) / queries (dkdv) per workgroup-memory tile


def _lanes(D: int) -> int:
    """Threads per row: each holds D / lanes dims of its row's vectors in registers."""
    for lanes in (4, 2):
        if D % lanes == 0:
            return lanes
    return 1


def _tile(ctx: GpuContext, D: int, lanes: int) -> int:
    """The largest tile <= _TILE whose workgroup buffers (two [TILE, D] tiles, the partial
    dot products [ROWS, LANES, 2, TILE] and per-tile scalars) fit workgroup memory."""
    limit = ctx.limits.get("max-compute-workgroup-storage-size", 16384)
    tile = _TILE
    while tile > 1 and 4 * (2 * tile * D + 2 * _ROWS * lanes * tile + 3 * tile) > limit:
        tile //= 2
    return tile


def _consts(ctx: GpuContext, D: int):
    """(prepended consts, overrides).  QLORA_EXT_ATTN_TILES="rows,lanes,tile" sets the three
    (tuning runs on a real GPU; lanes must divide D)."""
    env = os.environ.get("QLORA_EXT_ATTN_TILES")
    if env:
        try:
            rows, lanes, tile = (int(v) for v in env.split(","))
        except ValueError:
            raise ValueError(f"QLORA_EXT_ATTN_TILES={env!r}: expected three integers rows,lanes,tile") from None
        if rows < 1 or lanes < 1 or tile < 1 or D % lanes:
            raise ValueError(f"QLORA_EXT_ATTN_TILES={env!r}: rows, lanes, tile >= 1 with lanes dividing D={D}")
        return {"HEAD_DIM": D, "DC": D // lanes}, {"ROWS": rows, "LANES": lanes, "TILE": tile}
    lanes = _lanes(D)
    return ({"HEAD_DIM": D, "DC": D // lanes},
            {"ROWS": _ROWS, "LANES": lanes, "TILE": _tile(ctx, D, lanes)})


def _params(ctx, B, T, Hq, Hkv, D, has_mask):
    return ctx.uniform("IIIIIf", B, T, Hq, Hkv, int(has_mask), 1.0 / math.sqrt(D))


def _dims(q: GpuTensor, k: GpuTensor):
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    return B, T, Hq, Hkv, D


def attention_forward_gpu(ctx: GpuContext, q: GpuTensor, k: GpuTensor, v: GpuTensor,
                          mask: GpuTensor | None = None, o: GpuTensor | None = None,
                          lse: GpuTensor | None = None):
    """q [B, T, Hq, D], k, v [B, T, Hkv, D], mask u32 [B, T] or None -> (o [B, T, Hq, D],
    lse [B, Hq, T])."""
    B, T, Hq, Hkv, D = _dims(q, k)
    o = ctx.empty(q.shape) if o is None else o
    lse = ctx.empty((B, Hq, T)) if lse is None else lse
    consts, ov = _consts(ctx, D)
    rows = ov["ROWS"]
    pipe = ctx.pipeline("resident_attention_fwd", "forward", "urrrrww", consts=consts, overrides=ov)
    ctx.dispatch(pipe, [_params(ctx, B, T, Hq, Hkv, D, mask is not None), q, k, v,
                        q if mask is None else mask, o, lse],
                 ((T + rows - 1) // rows, Hq, B))
    return o, lse


def attention_backward_gpu(ctx: GpuContext, q: GpuTensor, k: GpuTensor, v: GpuTensor,
                           o: GpuTensor, lse: GpuTensor, do: GpuTensor,
                           mask: GpuTensor | None = None, dq: GpuTensor | None = None,
                           dk: GpuTensor | None = None, dv: GpuTensor | None = None,
                           delta: GpuTensor | None = None):
    """Gradients of attention_forward_gpu: do [B, T, Hq, D] -> (dq, dk, dv), written (not
    accumulated).  delta [B, Hq, T] is scratch (given to reuse it)."""
    B, T, Hq, Hkv, D = _dims(q, k)
    dq = ctx.empty(q.shape) if dq is None else dq
    dk = ctx.empty(k.shape) if dk is None else dk
    dv = ctx.empty(k.shape) if dv is None else dv
    delta = ctx.empty((B, Hq, T)) if delta is None else delta
    par = _params(ctx, B, T, Hq, Hkv, D, mask is not None)
    m = q if mask is None else mask
    consts, ov = _consts(ctx, D)
    kinds = "urrrrrrwww"

    def pipe(entry):
        return ctx.pipeline("resident_attention_bwd", entry, kinds, consts=consts, overrides=ov)

    rows = ov["ROWS"]
    nrows, per_group = B * Hq * T, rows * ov["LANES"]
    ctx.dispatch(pipe("prep"), [par, q, k, v, m, do, lse, delta, o, dq],
                 grid_2d((nrows + per_group - 1) // per_group))
    ctx.dispatch(pipe("dq"), [par, q, k, v, m, do, lse, delta, dq, dk],
                 ((T + rows - 1) // rows, Hq, B))
    ctx.dispatch(pipe("dkdv"), [par, q, k, v, m, do, lse, delta, dk, dv],
                 ((T + rows - 1) // rows, Hkv, B))
    return dq, dk, dv


# ---- numpy forms ----------------------------------------------------------------------------

def _check(q, k, v, mask):
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 4:
            raise ValueError(f"{name}: expected a float32 array [B, T, H, D], got "
                             f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    B, T, Hq, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k: expected shape ({B}, {T}, Hkv, {D}) [B, T, Hkv, D], got {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {k.shape} (as k), got {v.shape}")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q/k heads: Hq={Hq} must be a multiple of Hkv={Hkv}")
    if D == 0:
        raise ValueError("q: head_dim D must be >= 1")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (B, T):
            raise ValueError(f"mask: expected shape ({B}, {T}) [B, T], got {mask.shape}")
        mask = np.ascontiguousarray(mask != 0, dtype=np.uint32)
    return mask


def attention_forward(q, k, v, mask=None, ctx=None):
    """numpy q [B, T, Hq, D], k, v [B, T, Hkv, D], mask [B, T] (nonzero = attend) or None ->
    (o [B, T, Hq, D], lse [B, Hq, T])."""
    mask = _check(q, k, v, mask)
    ctx = default_context() if ctx is None else ctx
    gm = None if mask is None else ctx.upload(mask, "u32")
    o, lse = attention_forward_gpu(ctx, ctx.upload(q), ctx.upload(k), ctx.upload(v), gm)
    return ctx.to_numpy(o), ctx.to_numpy(lse)


def attention_backward(q, k, v, o, lse, do, mask=None, ctx=None):
    """numpy: gradients (dq, dk, dv) of attention_forward for upstream gradient do."""
    mask = _check(q, k, v, mask)
    B, T, Hq, D = q.shape
    for name, a, shape in (("o", o, q.shape), ("do", do, q.shape), ("lse", lse, (B, Hq, T))):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != shape:
            raise ValueError(f"{name}: expected float32 of shape {shape}, got "
                             f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    ctx = default_context() if ctx is None else ctx
    gm = None if mask is None else ctx.upload(mask, "u32")
    up = ctx.upload
    dq, dk, dv = attention_backward_gpu(ctx, up(q), up(k), up(v), up(o), up(lse), up(do), gm)
    return ctx.to_numpy(dq), ctx.to_numpy(dk), ctx.to_numpy(dv)
