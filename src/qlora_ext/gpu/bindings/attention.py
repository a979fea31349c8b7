"""Causal GQA flash attention on the GPU, forward and backward.

Conventions as qlora_ext.cpu.kernels: q [B, T, Hq, D], k/v [B, T, Hkv, D], query head h uses
kv head h // (Hq/Hkv), scale 1/sqrt(D), lse [B, Hq, T]; optional key padding mask [B, T]
(nonzero = attend).  A query row that sees no key gets o = 0 and lse = -inf.  Packed rows:
documents as runs of equal segment ids attend only within themselves (block-diagonal causal),
as the CPU kernels' `segments`; the kernels take each position's document start, which
qlora_ext.model.packing.document_starts() makes from the ids on the host.
Shaders: shaders/attention_fwd.wgsl, attention_bwd.wgsl (their header
comments describe the register tiling), attention_group_sum.wgsl (GQA dk/dv)."""
from __future__ import annotations

import math

import numpy as np

from ..runtime import GpuContext, GpuTensor, grid_2d

# Register tilings tried in order, (BR, BC, TM, TN): BR query rows (keys in dkdv) per
# workgroup, BC keys (queries in dkdv) per block, TM x TN scores per thread.  The first
# whose workgroup buffers fit the adapter's limit is taken, with the largest D chunk DK4
# (vec4s) that fits; 64 x 64 with 4 x 4 per thread fits 32 KiB (lavapipe) with DK4 <= 4
# and 48 KiB (NVIDIA) with DK4 = 8.
_TILINGS = ((64, 64, 4, 4), (32, 32, 4, 4), (16, 16, 2, 2))
_MAX_HEAD_DIM = 256   # the output's register tile (TM rows x D / NX dims per thread) grows with D


def _tiling(ctx: GpuContext, D: int, br: int, bc: int, tm: int, tn: int, dk4: int | None):
    """The prepended consts of both shaders for one tiling, or None where it does not fit
    (workgroup memory, threads per workgroup).  dk4 None: the largest that fits."""
    mem = ctx.limits.get("max-compute-workgroup-storage-size", 16384)
    threads = ctx.limits.get("max-compute-invocations-per-workgroup", 256)
    nx, ny = bc // tn, br // tm
    if nx * ny > threads:
        return None
    dp4 = (D + 3) // 4
    for cand in ((dk4,) if dk4 else (8, 4, 2, 1)):
        cand = min(cand, dp4)
        stage = (br + bc) * (cand + 1)          # vec4s: row-side + column-side D chunk
        vk = 4                                  # rows of the accumulate's column side per pass
        while vk * 2 <= bc and bc % (vk * 2) == 0 and vk * 2 * dp4 <= stage:
            vk *= 2
        tile_v4 = max(stage, vk * dp4)
        # forward: staging + P [BR][BC/4 + 1] vec4 + row partials [BR][NX] f32
        nbytes = 16 * (tile_v4 + br * (bc // 4 + 1)) + 4 * br * nx
        if nbytes <= mem:
            return {"HEAD_DIM": D, "BR": br, "BC": bc, "TM": tm, "TN": tn, "DK4": cand,
                    "VK": vk, "TILE_V4": tile_v4, "PREP_LANES": _prep_lanes(nx * ny, dp4, mem)}
    return None


def _prep_lanes(nt: int, dp4: int, mem: int) -> int:
    """Lanes a row of attention_bwd.wgsl's `prep` (its rows a workgroup: nt // lanes): as many
    rows as keep the do and o staging ([rows][DP4] vec4s each) within 16 KiB and the adapter's
    workgroup memory; more rows a workgroup, more of the lane-0 sums at once."""
    rows = max(1, min(nt, 512 // dp4, mem // (32 * dp4)))
    return -(-nt // rows)


def _consts(ctx: GpuContext, D: int):
    """Prepended consts of the attention shaders.  tuning.attn_tiles (QLORA_EXT_ATTN_TILES=
    "br,bc,tm,tn[,dk4]") picks the tiling (tuning runs on a real GPU)."""
    if not 1 <= D <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim D={D}: the GPU attention kernels take 1 <= D <= {_MAX_HEAD_DIM}")
    vals = ctx.tuning.attn_tiles
    if vals is not None:
        c = _tiling(ctx, D, *vals[:4], vals[4] if len(vals) == 5 else None)
        if c is None:
            raise ValueError(f"QLORA_EXT_ATTN_TILES={','.join(map(str, vals))}: does not fit this adapter's "
                             f"workgroup limits at D={D}")
        return c
    for t in _TILINGS:
        c = _tiling(ctx, D, *t, None)
        if c is not None:
            return c
    raise ValueError(f"head_dim D={D}: no attention tiling fits this adapter's workgroup memory")


# Per-query-head dk / dv partials [B, T, Hq, D] of the GQA backward where it splits heads
# (_head_split), one pair per context and shape, kept for the next call (the GPU device
# calls backward per layer): 2 * B*T*Hq*D * 4 bytes on top of the caller's buffers.
def _group_partials(ctx: GpuContext, shape: tuple):
    return ctx.cached(("attention dk/dv partials", shape), lambda: (ctx.empty(shape), ctx.empty(shape)))


def _params(ctx, B, T, Hq, Hkv, D, has_mask, head_split=False):
    return ctx.uniform("IIIIIfI", B, T, Hq, Hkv, int(has_mask), 1.0 / math.sqrt(D), int(head_split))


# GQA dk/dv: up to this many workgroups for the per-kv-head loop (B * Hkv * ceil(T / BR)),
# one workgroup per (key block, query head) instead, with per-head partials (memory:
# 2 * B*T*Hq*D floats).  The causal loop is uneven (the first key block sees every query
# block), and few large workgroups leave a long tail.  Measured on an H200 (Hq 32, Hkv 8,
# D 128, backward): B 1 T 1024 (128) split 2.17 ms vs loop 2.53 ms; B 4 T 1024 (512)
# split 6.30 ms vs loop 6.86 ms.
_HEAD_SPLIT_MAX = 512


def _head_split(ctx, B, T, Hq, Hkv, br):
    """tuning.attn_head_split (QLORA_EXT_ATTN_HEAD_SPLIT=0|1) forces the choice (tests, tuning)."""
    if Hq == Hkv:
        return False
    if ctx.tuning.attn_head_split is not None:
        return ctx.tuning.attn_head_split
    return B * Hkv * ((T + br - 1) // br) <= _HEAD_SPLIT_MAX


# The backward keeps dS (B*Hq*T*T floats, in the context's scratch) for dq when it takes at most
# this many bytes and fits one binding: dq then reads it instead of recomputing S and dP.
_STORED_DS_MAX_BYTES = 1 << 31


def stored_ds_floats(ctx: GpuContext, B: int, T: int, Hq: int) -> int:
    """Floats of dS the backward keeps for dq (0: it recomputes P instead).
    tuning.attn_stored_ds (QLORA_EXT_ATTN_STORED_DS=0|1) forces the choice (tests, tuning)."""
    n = B * Hq * T * T
    on = ctx.tuning.attn_stored_ds
    if on is None:
        on = 4 * n <= min(_STORED_DS_MAX_BYTES, ctx.max_binding)
    return n if on else 0


def _consts_for(ctx: GpuContext, D: int, starts: GpuTensor | None):
    return dict(_consts(ctx, D), SEGMENTS=int(starts is not None))


def _dims(q: GpuTensor, k: GpuTensor):
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    return B, T, Hq, Hkv, D


def attention_forward_gpu(ctx: GpuContext, q: GpuTensor, k: GpuTensor, v: GpuTensor,
                          mask: GpuTensor | None = None, o: GpuTensor | None = None,
                          lse: GpuTensor | None = None, starts: GpuTensor | None = None):
    """q [B, T, Hq, D], k, v [B, T, Hkv, D], mask u32 [B, T] or None, starts i32 [B, T]
    (document_starts of the segment ids) or None -> (o [B, T, Hq, D], lse [B, Hq, T])."""
    B, T, Hq, Hkv, D = _dims(q, k)
    o = ctx.empty(q.shape) if o is None else o
    lse = ctx.empty((B, Hq, T)) if lse is None else lse
    c = _consts_for(ctx, D, starts)
    pipe = ctx.pipeline("attention_fwd", "forward", "urrrrrww", consts=c)
    ctx.dispatch(pipe, [_params(ctx, B, T, Hq, Hkv, D, mask is not None), q, k, v,
                        q if mask is None else mask, q if starts is None else starts, o, lse],
                 ((T + c["BR"] - 1) // c["BR"], Hq, B))
    return o, lse


def attention_backward_gpu(ctx: GpuContext, q: GpuTensor, k: GpuTensor, v: GpuTensor,
                           o: GpuTensor, lse: GpuTensor, do: GpuTensor,
                           mask: GpuTensor | None = None, dq: GpuTensor | None = None,
                           dk: GpuTensor | None = None, dv: GpuTensor | None = None,
                           delta: GpuTensor | None = None, starts: GpuTensor | None = None):
    """Gradients of attention_forward_gpu: do [B, T, Hq, D] -> (dq, dk, dv), written (not
    accumulated).  delta [B, Hq, T] is scratch (given to reuse it); starts as the forward's.
    dS goes through the context's scratch where stored_ds_floats allows."""
    B, T, Hq, Hkv, D = _dims(q, k)
    dq = ctx.empty(q.shape) if dq is None else dq
    dk = ctx.empty(k.shape) if dk is None else dk
    dv = ctx.empty(k.shape) if dv is None else dv
    delta = ctx.empty((B, Hq, T)) if delta is None else delta
    m = q if mask is None else mask
    st = q if starts is None else starts
    n_ds = stored_ds_floats(ctx, B, T, Hq)
    c = dict(_consts_for(ctx, D, starts), STORED_DS=int(n_ds > 0))
    br, nt = c["BR"], (c["BR"] // c["TM"]) * (c["BC"] // c["TN"])
    split = _head_split(ctx, B, T, Hq, Hkv, br)
    par = _params(ctx, B, T, Hq, Hkv, D, mask is not None, split)
    ds = ctx.scratch(n_ds) if n_ds else ctx.dummy()
    kinds = "urrrrrrrwwww"

    def pipe(entry):
        return ctx.pipeline("attention_bwd", entry, kinds, consts=c)

    rowblocks = (T + br - 1) // br
    prep_rows = nt // c["PREP_LANES"]
    ctx.dispatch(pipe("prep"), [par, q, k, v, m, st, do, lse, delta, o, dq, ds],
                 grid_2d(-(-B * Hq * T // prep_rows)))
    if not n_ds:
        ctx.dispatch(pipe("dq"), [par, q, k, v, m, st, do, lse, delta, dq, dk, ds], (rowblocks, Hq, B))
    if not split:
        ctx.dispatch(pipe("dkdv"), [par, q, k, v, m, st, do, lse, delta, dk, dv, ds], (rowblocks, Hkv, B))
    else:
        # per-query-head partials [B, T, Hq, D], summed in head order
        pk, pv = _group_partials(ctx, q.shape)
        ctx.dispatch(pipe("dkdv"), [par, q, k, v, m, st, do, lse, delta, pk, pv, ds], (rowblocks, Hq, B))
        n = B * T * Hkv * D
        sp = ctx.uniform("IIII", n, Hkv, Hq // Hkv, D)
        ctx.dispatch(ctx.pipeline("attention_group_sum", "group_sum", "urrww"),
                     [sp, pk, pv, dk, dv], grid_2d((n + 255) // 256))
    if n_ds:   # dkdv wrote dS
        ctx.dispatch(pipe("dq"), [par, q, k, v, m, st, do, lse, delta, dq, dk, ds], (rowblocks, Hq, B))
    return dq, dk, dv
