"""Elementwise and row-wise layer kernels of the GPU device: RMSNorm (also per-head q/k
norm), RoPE, embedding gather and the residual add, forward next to backward (SwiGLU's host
binding is qlora_ext.gpu.kernels'; its numpy form is here with the others).

Each op has two forms:
- `<op>_gpu(ctx, ...)`: GpuTensor in, GpuTensor out; only records dispatches into ctx's
  pending encoder (no host round trip) -- what the step engine chains;
- `<op>(...)`: numpy in, numpy out, checked at the boundary (tests, one-off use).

Shape letters: N rows, C channels, B batch, T tokens, H heads, D head_dim, P table positions,
V vocabulary, F FFN width.  Same conventions as qlora_ext.cpu.kernels."""
from __future__ import annotations

import math

import numpy as np

from ...cpu.kernels import _f32 as _cpu_f32
from .. import kernels
from ..kernels import Operand
from ..runtime import GpuContext, GpuTensor, grid_2d, shared_context


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


def _elementwise_groups(n: int, wg: int) -> tuple:
    return grid_2d((n + wg - 1) // wg)


# ---- RMSNorm --------------------------------------------------------------------------------

_RMS_WG = 128


def rmsnorm_forward_gpu(ctx: GpuContext, x: GpuTensor, weight: GpuTensor, eps: float,
                        y: GpuTensor | None = None, rstd: GpuTensor | None = None):
    """x [N, C], weight [C] -> (y [N, C], rstd [N]).  y and rstd may be given (reused)."""
    N, C = x.shape
    y = ctx.empty((N, C)) if y is None else y
    rstd = ctx.empty((N,)) if rstd is None else rstd
    pipe = ctx.pipeline("resident_rmsnorm", "forward", "urrww", overrides={"WG": _RMS_WG})
    ctx.dispatch(pipe, [ctx.uniform("IIfI", N, C, eps, 0), x, weight, y, rstd], grid_2d(N))
    return y, rstd


def rmsnorm_backward_gpu(ctx: GpuContext, x: GpuTensor, weight: GpuTensor, rstd: GpuTensor,
                         dy: GpuTensor, dx: GpuTensor | None = None, accumulate: bool = False):
    """x, dy [N, C], weight [C], rstd [N] -> dx [N, C]; with accumulate, dx += the gradient."""
    N, C = x.shape
    if dx is None:
        if accumulate:
            raise ValueError("rmsnorm_backward_gpu: accumulate=True needs dx")
        dx = ctx.empty((N, C))
    pipe = ctx.pipeline("resident_rmsnorm", "backward", "urrwwr", overrides={"WG": _RMS_WG})
    ctx.dispatch(pipe, [ctx.uniform("IIfI", N, C, 0.0, int(accumulate)), x, weight, dx, rstd, dy],
                 grid_2d(N))
    return dx


def rmsnorm_dweight_gpu(ctx: GpuContext, x: GpuTensor, rstd: GpuTensor, dy: GpuTensor,
                        weight: GpuTensor, dweight: GpuTensor | None = None,
                        accumulate: bool = False):
    """dweight [C] (+)= sum_n dy * x * rstd (weight is only bound, not read)."""
    N, C = x.shape
    dweight = ctx.empty((C,)) if dweight is None else dweight
    pipe = ctx.pipeline("resident_rmsnorm", "dweight", "urrwwr", overrides={"WG": _RMS_WG})
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


# ---- RoPE -----------------------------------------------------------------------------------

_ROPE_WG = 64


def rope_apply_gpu(ctx: GpuContext, x: GpuTensor, positions: GpuTensor, cos: GpuTensor,
                   sin: GpuTensor, sign: int = 1) -> GpuTensor:
    """Rotate x [B, T, H, D] in place; positions i32 [B*T]; cos, sin [P, D/2].
    sign +1: forward; -1: backward (apply to dx)."""
    B, T, H, D = x.shape
    half = D // 2
    n = B * T * H * half
    pipe = ctx.pipeline("resident_rope", "apply", "uwrrr", overrides={"WG": _ROPE_WG})
    ctx.dispatch(pipe, [ctx.uniform("IIIIf", n, H, half, cos.shape[0], float(sign)),
                        x, positions, cos, sin], _elementwise_groups(n, _ROPE_WG))
    return x


def _rope_np(name: str, x, positions, tables, sign: int, ctx):
    # The CPU module's checks define the contract (shape, even D, table range): reuse them.
    from ...cpu.kernels import _rope_args

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


# ---- SwiGLU ---------------------------------------------------------------------------------


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


# ---- embedding gather -----------------------------------------------------------------------

_EW_WG = 64

def embedding_gather_gpu(ctx: GpuContext, ids: GpuTensor, table: GpuTensor,
                         out: GpuTensor | None = None) -> GpuTensor:
    """ids i32 [N], table [V, C] -> out [N, C] (rows of table); ids outside [0, V) give zeros."""
    (N,), (V, C) = ids.shape, table.shape
    out = ctx.empty((N, C)) if out is None else out
    n = N * C
    pipe = ctx.pipeline("resident_embedding", "gather", "urrw", overrides={"WG": _EW_WG})
    ctx.dispatch(pipe, [ctx.uniform("III", n, C, V), ids, table, out], _elementwise_groups(n, _EW_WG))
    return out


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


# ---- residual add ---------------------------------------------------------------------------

def add_gpu(ctx: GpuContext, dst: GpuTensor, src: GpuTensor, alpha: float = 1.0) -> GpuTensor:
    """dst += alpha * src (same number of elements), in place; returns dst."""
    if dst.size != src.size:
        raise ValueError(f"add_gpu: dst has shape {dst.shape}, src {src.shape}")
    n = dst.size
    pipe = ctx.pipeline("resident_add", "axpy", "uwr", overrides={"WG": _EW_WG})
    ctx.dispatch(pipe, [ctx.uniform("IfI", n, float(alpha), 1), dst, src], _elementwise_groups(n, _EW_WG))
    return dst


def bias_add_gpu(ctx: GpuContext, y: GpuTensor, bias: GpuTensor) -> GpuTensor:
    """y [N, C] += bias [C] on every row, in place; returns y."""
    C = bias.size
    if C == 0 or y.size % C:
        raise ValueError(f"bias_add_gpu: y of shape {y.shape} is not rows of the bias size {C}")
    n = y.size
    pipe = ctx.pipeline("resident_add", "bias_rows", "uwr", overrides={"WG": _EW_WG})
    ctx.dispatch(pipe, [ctx.uniform("IfI", n, 1.0, C), y, bias], _elementwise_groups(n, _EW_WG))
    return y


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
