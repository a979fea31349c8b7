"""Elementwise and row-wise layer kernels of the GPU device: RMSNorm (also per-head q/k
norm), RoPE, embedding gather, the bias and residual adds, forward next to backward (SwiGLU's
host binding is qlora_ext.gpu.kernels').  Each `<op>_gpu(ctx, ...)` takes and returns
GpuTensors and only records dispatches into ctx's pending encoder (no host round trip); the
tests reach them through numpy forms (tests/gpu_numpy_forms.py).

Shape letters: N rows, C channels, B batch, T tokens, H heads, D head_dim, P table positions,
V vocabulary, F FFN width.  Same conventions as qlora_ext.cpu.kernels."""
from __future__ import annotations

from ..runtime import GpuContext, GpuTensor, grid_2d


def _elementwise_groups(n: int, wg: int) -> tuple:
    return grid_2d((n + wg - 1) // wg)


# ---- RMSNorm --------------------------------------------------------------------------------

_RMS_WG = 256
_RMS_UNITS_PER_THREAD = 8


def _rms_layout(C: int) -> tuple:
    """(overrides, rows per workgroup) of rmsnorm.wgsl for rows of C: vec4 units where C % 4 == 0,
    and the fewest threads per row (a power of two) that leave each about 8 units: short rows
    (per-head q/k norm, D 128) then share a workgroup, and a row's tree is short."""
    vec = C % 4 == 0
    units = C // 4 if vec else C
    tpr = 1
    while tpr < _RMS_WG and tpr * _RMS_UNITS_PER_THREAD < units:
        tpr *= 2
    return {"WG": _RMS_WG, "TPR": tpr, "VEC": vec}, _RMS_WG // tpr


def rmsnorm_forward_gpu(ctx: GpuContext, x: GpuTensor, weight: GpuTensor, eps: float,
                        y: GpuTensor | None = None, rstd: GpuTensor | None = None):
    """x [N, C], weight [C] -> (y [N, C], rstd [N]).  y and rstd may be given (reused)."""
    N, C = x.shape
    y = ctx.empty((N, C)) if y is None else y
    rstd = ctx.empty((N,)) if rstd is None else rstd
    over, rows = _rms_layout(C)
    pipe = ctx.pipeline("rmsnorm", "forward", "urrww", overrides=over)
    ctx.dispatch(pipe, [ctx.uniform("IIfI", N, C, eps, 0), x, weight, y, rstd], grid_2d(-(-N // rows)))
    return y, rstd


def rmsnorm_backward_gpu(ctx: GpuContext, x: GpuTensor, weight: GpuTensor, rstd: GpuTensor,
                         dy: GpuTensor, dx: GpuTensor | None = None, accumulate: bool = False):
    """x, dy [N, C], weight [C], rstd [N] -> dx [N, C]; with accumulate, dx += the gradient."""
    N, C = x.shape
    if dx is None:
        if accumulate:
            raise ValueError("rmsnorm_backward_gpu: accumulate=True needs dx")
        dx = ctx.empty((N, C))
    over, rows = _rms_layout(C)
    pipe = ctx.pipeline("rmsnorm", "backward", "urrwwr", overrides=over)
    ctx.dispatch(pipe, [ctx.uniform("IIfI", N, C, 0.0, int(accumulate)), x, weight, dx, rstd, dy],
                 grid_2d(-(-N // rows)))
    return dx


# ---- RoPE -----------------------------------------------------------------------------------

_ROPE_WG = 64


def rope_apply_gpu(ctx: GpuContext, x: GpuTensor, positions: GpuTensor, cos: GpuTensor,
                   sin: GpuTensor, sign: int = 1) -> GpuTensor:
    """Rotate x [B, T, H, D] in place; positions i32 [B*T]; cos, sin [P, D/2].
    sign +1: forward; -1: backward (apply to dx)."""
    B, T, H, D = x.shape
    half = D // 2
    n = B * T * H * half
    vec = half % 4 == 0   # a thread rotates 4 pairs as vec4s
    pipe = ctx.pipeline("rope", "apply", "uwrrr", overrides={"WG": _ROPE_WG, "VEC": vec})
    ctx.dispatch(pipe, [ctx.uniform("IIIIf", n, H, half, cos.shape[0], float(sign)),
                        x, positions, cos, sin], _elementwise_groups(n // 4 if vec else n, _ROPE_WG))
    return x


# ---- SwiGLU ---------------------------------------------------------------------------------


# ---- embedding gather -----------------------------------------------------------------------

_EW_WG = 64

def embedding_gather_gpu(ctx: GpuContext, ids: GpuTensor, table: GpuTensor,
                         out: GpuTensor | None = None) -> GpuTensor:
    """ids i32 [N], table [V, C] -> out [N, C] (rows of table); ids outside [0, V) give zeros."""
    (N,), (V, C) = ids.shape, table.shape
    out = ctx.empty((N, C)) if out is None else out
    n = N * C
    pipe = ctx.pipeline("embedding", "gather", "urrw", overrides={"WG": _EW_WG})
    ctx.dispatch(pipe, [ctx.uniform("III", n, C, V), ids, table, out], _elementwise_groups(n, _EW_WG))
    return out


# ---- residual add ---------------------------------------------------------------------------

def add_gpu(ctx: GpuContext, dst: GpuTensor, src: GpuTensor, alpha: float = 1.0) -> GpuTensor:
    """dst += alpha * src (same number of elements), in place; returns dst."""
    if dst.size != src.size:
        raise ValueError(f"add_gpu: dst has shape {dst.shape}, src {src.shape}")
    n = dst.size
    pipe = ctx.pipeline("add", "axpy", "uwr", overrides={"WG": _EW_WG})
    # a thread per vec4
    ctx.dispatch(pipe, [ctx.uniform("IfI", n, float(alpha), 1), dst, src], _elementwise_groups(-(-n // 4), _EW_WG))
    return dst


def bias_add_gpu(ctx: GpuContext, y: GpuTensor, bias: GpuTensor) -> GpuTensor:
    """y [N, C] += bias [C] on every row, in place; returns y."""
    C = bias.size
    if C == 0 or y.size % C:
        raise ValueError(f"bias_add_gpu: y of shape {y.shape} is not rows of the bias size {C}")
    n = y.size
    pipe = ctx.pipeline("add", "bias_rows", "uwr", overrides={"WG": _EW_WG})
    ctx.dispatch(pipe, [ctx.uniform("IfI", n, 1.0, C), y, bias], _elementwise_groups(n, _EW_WG))
    return y
