"""numpy forms of the GPU device's kernels, for the tests: numpy in, numpy out, checked at the
boundary, each a thin wrapper over the `<op>_gpu` host binding in qlora_ext.gpu.bindings that
the engine chains (and, for RMSNorm's weight gradient, the shader entry only tests use: the
norms are frozen in training).

Shape letters: N rows, C channels, B batch, T tokens, H heads, D head_dim, P table positions,
V vocabulary, F FFN width.  Same conventions as qlora_ext.cpu.kernels."""
from __future__ import annotations

import math

import numpy as np

from qlora_ext.cpu.kernels import _f32 as _cpu_f32
from qlora_ext.gpu import kernels
from qlora_ext.gpu.kernels import Operand
from qlora_ext.gpu.bindings.adamw import AdamWGpu
from qlora_ext.gpu.bindings.attention import attention_backward_gpu, attention_forward_gpu
from qlora_ext.model.packing import document_starts
from qlora_ext.gpu.bindings.cross_entropy import LmHeadLoss
from qlora_ext.gpu.bindings.gemm import gemm_gpu
from qlora_ext.gpu.bindings.layer_ops import (_RMS_WG, add_gpu, bias_add_gpu,
                                              embedding_gather_gpu, rmsnorm_backward_gpu, rmsnorm_forward_gpu,
                                              rope_apply_gpu)
from qlora_ext.gpu.runtime import GpuContext, GpuTensor, grid_2d, shared_context

IGNORE_INDEX = -100


def _ctx(ctx):
    return shared_context() if ctx is None else ctx


def _f32(name: str, a, ndim: int, letters: str) -> np.ndarray:
    """The CPU kernels' float32 check, on a contiguous copy of a strided array (uploads take any)."""
    if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return _cpu_f32(name, a, ndim, letters)


def _shape(name: str, a, shape: tuple, letters: str) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} [{letters}], got {tuple(a.shape)}")


def rmsnorm_dweight_gpu(ctx: GpuContext, x: GpuTensor, rstd: GpuTensor, dy: GpuTensor,
                        weight: GpuTensor, dweight: GpuTensor | None = None,
                        accumulate: bool = False):
    """dweight [C] (+)= sum_n dy * x * rstd (weight is only bound, not read)."""
    N, C = x.shape
    dweight = ctx.empty((C,)) if dweight is None else dweight
    pipe = ctx.pipeline("rmsnorm", "dweight", "urrwwr", overrides={"WG": _RMS_WG})
    ctx.dispatch(pipe, [ctx.uniform("IIfI", N, C, 0.0, int(accumulate)), x, weight, dweight, rstd, dy],
                 grid_2d((C + _RMS_WG - 1) // _RMS_WG))
    return dweight


def _eps(eps) -> float:
    eps = float(eps)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps={eps!r}: expected a finite value >= 0")
    return eps


def _rmsnorm_inputs(x, weight) -> tuple:
    """x float32 [N, C] with C >= 1 and weight float32 [C], both contiguous."""
    x = _f32("x", x, 2, "N, C")
    C = x.shape[1]
    if C == 0:
        raise ValueError("x: C (the normalised dimension) must be >= 1")
    weight = _f32("weight", weight, 1, "C")
    _shape("weight", weight, (C,), "C")
    return x, weight


def rmsnorm_forward(x: np.ndarray, weight: np.ndarray, eps: float, ctx=None):
    """x [N, C], weight [C] -> (y [N, C], rstd [N]), as qlora_ext.cpu.kernels.rmsnorm_forward."""
    x, weight = _rmsnorm_inputs(x, weight)
    eps = _eps(eps)
    ctx = _ctx(ctx)
    y, rstd = rmsnorm_forward_gpu(ctx, ctx.upload(x), ctx.upload(weight), eps)
    return ctx.to_numpy(y), ctx.to_numpy(rstd)


def rmsnorm_backward(x: np.ndarray, weight: np.ndarray, rstd: np.ndarray, dy: np.ndarray,
                     weight_grad: bool = False, ctx=None):
    """x, dy [N, C], weight [C], rstd [N] -> (dx [N, C], dweight [C] or None)."""
    x, weight = _rmsnorm_inputs(x, weight)
    N, C = x.shape
    rstd = _f32("rstd", rstd, 1, "N")
    _shape("rstd", rstd, (N,), "N")
    dy = _f32("dy", dy, 2, "N, C")
    _shape("dy", dy, (N, C), "N, C")
    ctx = _ctx(ctx)
    gx, gw, gr, gdy = ctx.upload(x), ctx.upload(weight), ctx.upload(rstd), ctx.upload(dy)
    dx = rmsnorm_backward_gpu(ctx, gx, gw, gr, gdy)
    dw = rmsnorm_dweight_gpu(ctx, gx, gr, gdy, gw) if weight_grad else None
    return ctx.to_numpy(dx), (ctx.to_numpy(dw) if weight_grad else None)


def _rope_np(name: str, x, positions, tables, sign: int, ctx):
    # The CPU module's checks define the contract (shape, even D, table range): reuse them.
    from qlora_ext.cpu.kernels import _rope_args

    x = _f32(name, x, 4, "B, T, H, D")
    pos = _rope_args(name, x, positions, tables)
    B, T, H, D = x.shape
    pos = np.ascontiguousarray(np.broadcast_to(pos, (B, T)), dtype=np.int32).reshape(-1)
    ctx = _ctx(ctx)
    gx = ctx.upload(x)
    rope_apply_gpu(ctx, gx, ctx.upload(pos), ctx.upload(tables.cos), ctx.upload(tables.sin), sign)
    return ctx.to_numpy(gx)


def rope_forward(x: np.ndarray, positions, tables, ctx=None) -> np.ndarray:
    """x [B, T, H, D], positions int [B, T] or [T], tables (qlora_ext.cpu.kernels.rope_tables)
    -> rotated copy of x (HF rotate_half)."""
    return _rope_np("x", x, positions, tables, 1, ctx)


def rope_backward(dx: np.ndarray, positions, tables, ctx=None) -> np.ndarray:
    """Gradient of rope_forward: dx [B, T, H, D] -> rotated back copy."""
    return _rope_np("dx", dx, positions, tables, -1, ctx)


def _same_f32(names, arrays):
    out = [_f32(names[0], arrays[0], np.ndim(arrays[0]), "N, F")]
    for nm, a in zip(names[1:], arrays[1:]):
        a = _f32(nm, a, out[0].ndim, "N, F")
        _shape(nm, a, out[0].shape, "same as " + names[0])
        out.append(a)
    return out


def _rows(a: np.ndarray) -> tuple:
    """(rows, F) of a [..., F] array as the [M, I] matrix swiglu.wgsl takes."""
    F = a.shape[-1] if a.ndim else 1
    return (a.size // F if F else 0), F


def swiglu_forward(g: np.ndarray, u: np.ndarray, ctx=None) -> np.ndarray:
    """g, u [..., F] -> silu(g) * u (qlora_ext.gpu.kernels.swiglu_forward)."""
    g, u = _same_f32(("g", "u"), (g, u))
    ctx = _ctx(ctx)
    h = ctx.empty(g.shape)
    kernels.swiglu_forward(ctx, *_rows(g), Operand(ctx.upload(g)), Operand(ctx.upload(u)), Operand(h))
    return ctx.to_numpy(h)


def swiglu_backward(g: np.ndarray, u: np.ndarray, dh: np.ndarray, ctx=None):
    """g, u, dh [..., F] -> (dg, du) (qlora_ext.gpu.kernels.swiglu_backward)."""
    g, u, dh = _same_f32(("g", "u", "dh"), (g, u, dh))
    ctx = _ctx(ctx)
    dg, du = ctx.empty(g.shape), ctx.empty(g.shape)
    kernels.swiglu_backward(ctx, *_rows(g), Operand(ctx.upload(g)), Operand(ctx.upload(u)), ctx.upload(dh),
                            Operand(dg), Operand(du))
    return ctx.to_numpy(dg), ctx.to_numpy(du)


def embedding_gather(ids, table: np.ndarray, ctx=None) -> np.ndarray:
    """ids int [...], table [V, C] -> [..., C]."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"ids: expected an integer array, got dtype {ids.dtype}")
    table = _f32("table", table, 2, "V, C")
    V = table.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(f"ids: values must lie in [0, {V}) (the vocabulary), "
                         f"got min {ids.min()} max {ids.max()}")
    ctx = _ctx(ctx)
    flat = np.ascontiguousarray(ids.reshape(-1), dtype=np.int32)
    out = embedding_gather_gpu(ctx, ctx.upload(flat, "i32"), ctx.upload(table))
    return ctx.to_numpy(out).reshape(ids.shape + (table.shape[1],))


def bias_add(y: np.ndarray, bias: np.ndarray, ctx=None) -> np.ndarray:
    """numpy: y [N, C] + bias [C]."""
    y = _f32("y", y, 2, "N, C")
    bias = _f32("bias", bias, 1, "C")
    _shape("bias", bias, (y.shape[1],), "C")
    ctx = _ctx(ctx)
    return ctx.to_numpy(bias_add_gpu(ctx, ctx.upload(y), ctx.upload(bias)))


def residual_add(x: np.ndarray, r: np.ndarray, alpha: float = 1.0, ctx=None) -> np.ndarray:
    """x + alpha * r for same-shaped float32 arrays."""
    x, r = _same_f32(("x", "r"), (x, r))
    ctx = _ctx(ctx)
    return ctx.to_numpy(add_gpu(ctx, ctx.upload(x), ctx.upload(r), alpha))


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


def _starts(ctx, q, segments):
    if segments is None:
        return None
    st = document_starts(segments)
    if st.shape != q.shape[:2]:
        raise ValueError(f"segments: expected shape {q.shape[:2]} [B, T], got {st.shape}")
    return ctx.upload(st, "i32")


def attention_forward(q, k, v, mask=None, ctx=None, segments=None):
    """numpy q [B, T, Hq, D], k, v [B, T, Hkv, D], mask [B, T] (nonzero = attend) or None,
    segments int [B, T] (packed documents, runs of equal ids) or None -> (o [B, T, Hq, D],
    lse [B, Hq, T])."""
    mask = _check(q, k, v, mask)
    ctx = shared_context() if ctx is None else ctx
    gm = None if mask is None else ctx.upload(mask, "u32")
    o, lse = attention_forward_gpu(ctx, ctx.upload(q), ctx.upload(k), ctx.upload(v), gm,
                                   starts=_starts(ctx, q, segments))
    return ctx.to_numpy(o), ctx.to_numpy(lse)


def attention_backward(q, k, v, o, lse, do, mask=None, ctx=None, segments=None):
    """numpy: gradients (dq, dk, dv) of attention_forward for upstream gradient do."""
    mask = _check(q, k, v, mask)
    B, T, Hq, D = q.shape
    for name, a, shape in (("o", o, q.shape), ("do", do, q.shape), ("lse", lse, (B, Hq, T))):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != shape:
            raise ValueError(f"{name}: expected float32 of shape {shape}, got "
                             f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    ctx = shared_context() if ctx is None else ctx
    gm = None if mask is None else ctx.upload(mask, "u32")
    up = ctx.upload
    dq, dk, dv = attention_backward_gpu(ctx, up(q), up(k), up(v), up(o), up(lse), up(do), gm,
                                        starts=_starts(ctx, q, segments))
    return ctx.to_numpy(dq), ctx.to_numpy(dk), ctx.to_numpy(dv)


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
    ctx = shared_context() if ctx is None else ctx
    head = LmHeadLoss(ctx, B * T, C, V, chunk_rows)
    gh, gw = ctx.upload(hidden.reshape(B * T, C)), ctx.upload(w_lm)
    dh = ctx.empty((B * T, C)) if want_grad else None
    dw = ctx.zeros((V, C)) if (want_grad and train_head) else None
    stats = head.record(gh, gw, ctx.upload(labels.reshape(-1).astype(np.int32), "i32"), T,
                        1.0 / count if count else 0.0, dh, dw)
    loss_sum, n = ctx.to_numpy(stats)
    return (float(loss_sum), int(n), None if dh is None else ctx.to_numpy(dh).reshape(B, T, C),
            None if dw is None else ctx.to_numpy(dw))


def gemm(a: np.ndarray, b: np.ndarray, trans_a: bool = False, trans_b: bool = False,
         ctx=None) -> np.ndarray:
    """numpy float32: op(a) @ op(b)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, np.ndarray) or t.dtype != np.float32 or t.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D float32 array, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {getattr(t, 'shape', '')}")
    M, K = a.shape[::-1] if trans_a else a.shape
    K2, N = b.shape[::-1] if trans_b else b.shape
    if K != K2:
        raise ValueError(f"b: inner dimension {K2} does not match a's {K}")
    ctx = shared_context() if ctx is None else ctx
    c = ctx.empty((M, N))
    gemm_gpu(ctx, ctx.upload(a), ctx.upload(b), c, M, N, K, trans_a, trans_b)
    return ctx.to_numpy(c)


def adamw_steps(param: np.ndarray, grads, lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 0.0, ctx=None):
    """numpy: run len(grads) AdamW steps on a copy of param (flat float32) from the given
    gradients; returns (param, exp_avg, exp_avg_sq)."""
    if not isinstance(param, np.ndarray) or param.dtype != np.float32 or param.ndim != 1:
        raise ValueError(f"param: expected a flat float32 array, got "
                         f"{getattr(param, 'dtype', type(param).__name__)} {getattr(param, 'shape', '')}")
    ctx = shared_context() if ctx is None else ctx
    opt = AdamWGpu(ctx, param.size, lr, betas, eps, weight_decay)
    p = ctx.upload(param)
    g = ctx.empty(param.shape)
    for i, gi in enumerate(grads):
        gi = np.asarray(gi)
        if gi.shape != param.shape:
            raise ValueError(f"grads[{i}]: expected shape {param.shape}, got {gi.shape}")
        ctx.write(g, gi.astype(np.float32))
        opt.step(p, g)
    st = opt.state_dict()
    return ctx.to_numpy(p), st["exp_avg"], st["exp_avg_sq"]
