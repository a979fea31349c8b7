"""The rank-r LoRA products of the resident engine (shaders/resident_lora.wgsl): per adapted
projection, forward u = s·x Aᵀ; backward dB += dyᵀ u, du = s·dy B, dA += duᵀ x.  One operand
is [tokens, in|out] and streamed once, the other is [.., r]: memory-bound work that the
general tiled GEMM (resident_gemm.wgsl) ran at 0.3-0.8 TB/s.

    lora_rows_gpu: C[M, R]  = alpha · X[M, K] · op(W)   (u: W = A [R, K]; du: W = B [K, R])
    lora_cols_gpu: G (+)= X[M, P]ᵀ · Y[M, R]             (dB: G [P, R]; dA: G [R, P])

Both split the long reduced dimension into chunks when the grid alone is small, and sum the
chunks' partials in a fixed order (no float atomics: bit-reproducible).  Defaults from the
sweep in bench/bench_resident_gemm.py --lora on an NVIDIA H100."""
from __future__ import annotations

import os

from .context import GpuContext, GpuTensor, grid_2d
from .gemm import _scratch

# rows: 16·TR rows per workgroup; split K until about ROWS_TARGET workgroups, chunks of at
# least ROWS_MIN_K.  cols: 256 columns per workgroup; split the token rows likewise.
ROWS_TR = 4
ROWS_TARGET = 512
ROWS_MIN_K = 256
COLS_TARGET = 512
COLS_MIN_ROWS = 128
_KINDS = "urrww"


def _env(name: str, n: int):
    """QLORA_EXT_LORA_ROWS='tr,target,min_k' / QLORA_EXT_LORA_COLS='target,min_rows' replace
    the defaults (benchmarks); None when unset."""
    v = os.environ.get(name)
    if not v:
        return None
    try:
        vals = tuple(int(t) for t in v.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n or min(vals) < 1:
        raise ValueError(f"{name}={v!r}: expected {n} positive integers")
    return vals


def _split(base_groups: int, length: int, target: int, min_chunk: int) -> tuple:
    """(splits, chunk) of a reduced length: chunk a multiple of 64 (the kernels' step) of at
    least min_chunk, about target workgroups in all."""
    want = max(1, -(-target // base_groups))
    chunk = max(min_chunk, -(-length // want), 1)
    chunk = -(-chunk // 64) * 64
    return -(-length // chunk), chunk


def _check(name, t, off, need):
    if off < 0 or off + need > t.size:
        raise ValueError(f"{name}: holds {t.size} elements, needs {off + need} (offset {off})")


def _record(ctx, entry, fields, x, w, c, n_out, splits, grid, x_vec, tr):
    """One dispatch of `entry` (and the reduce when split); fields: the 12 parameters."""
    ov = {"TR": tr, "X_VEC": bool(x_vec)}
    pipe = ctx.pipeline("resident_lora", entry, _KINDS, overrides=ov)
    par = ctx.uniform("IIIIIIIIfIII", *fields)
    if splits == 1:
        ctx.dispatch(pipe, [par, x, w, _scratch(ctx, 4), c], grid)
        return
    part = _scratch(ctx, splits * n_out)
    ctx.dispatch(pipe, [par, x, w, part, c], grid)
    # reduce: the output count in `m`; c_off and accumulate as given
    red = ctx.pipeline("resident_lora", "reduce", _KINDS, overrides=ov)
    c_off, accumulate = fields[5], fields[7]
    rpar = ctx.uniform("IIIIIIIIfIII", n_out, 0, 0, 0, 0, c_off, 0, accumulate, 1.0, 0, splits, 0)
    ctx.dispatch(red, [rpar, x, w, part, c], grid_2d((n_out + 255) // 256))


def lora_rows_gpu(ctx: GpuContext, x: GpuTensor, w: GpuTensor, c: GpuTensor, M: int, K: int, R: int,
                  w_t: bool, alpha: float = 1.0, x_off: int = 0, w_off: int = 0, c_off: int = 0,
                  tr: int | None = None, target: int | None = None, min_k: int | None = None) -> GpuTensor:
    """C[M, R] = alpha · X[M, K] · op(W); X row-major from element x_off; W from w_off, stored
    [R, K] when w_t (op = transpose: LoRA A in u = s·x Aᵀ) else [K, R] (LoRA B in du = s·dy B).
    tr, target, min_k replace the defaults (benchmarks)."""
    _check("lora_rows_gpu: x", x, x_off, M * K)
    _check("lora_rows_gpu: w", w, w_off, R * K)
    _check("lora_rows_gpu: c", c, c_off, M * R)
    env = _env("QLORA_EXT_LORA_ROWS", 3) or (ROWS_TR, ROWS_TARGET, ROWS_MIN_K)
    tr = env[0] if tr is None else int(tr)
    if not 1 <= tr <= 4:
        raise ValueError(f"lora_rows_gpu: tr={tr}, expected 1..4 rows per thread")
    gx, gz = -(-M // (16 * tr)), -(-R // 16)
    splits, chunk = _split(gx * gz, K, env[1] if target is None else target,
                           env[2] if min_k is None else min_k)
    fields = (M, K, R, x_off, w_off, c_off, int(bool(w_t)), 0, float(alpha), chunk, splits, 0)
    _record(ctx, "rows", fields, x, w, c, M * R, splits, (gx, splits, gz),
            K % 4 == 0 and x_off % 4 == 0, tr)
    return c


def lora_cols_gpu(ctx: GpuContext, x: GpuTensor, y: GpuTensor, g: GpuTensor, M: int, P: int, R: int,
                  trans_out: bool, accumulate: bool = True, x_off: int = 0, y_off: int = 0,
                  g_off: int = 0, target: int | None = None, min_rows: int | None = None) -> GpuTensor:
    """G (+)= X[M, P]ᵀ · Y[M, R]; G stored [P, R] from g_off, or [R, P] with trans_out.
    dB += dyᵀ u: X = dy, Y = u, G [out, r];  dA += duᵀ x: X = x, Y = du, trans_out (G [r, in]).
    Adds into G when accumulate (the engine's gradients), else overwrites."""
    _check("lora_cols_gpu: x", x, x_off, M * P)
    _check("lora_cols_gpu: y", y, y_off, M * R)
    _check("lora_cols_gpu: g", g, g_off, P * R)
    env = _env("QLORA_EXT_LORA_COLS", 2) or (COLS_TARGET, COLS_MIN_ROWS)
    gx, gz = -(-P // 256), -(-R // 16)
    splits, chunk = _split(gx * gz, M, env[0] if target is None else target,
                           env[1] if min_rows is None else min_rows)
    fields = (M, P, R, x_off, y_off, g_off, 0, int(bool(accumulate)), 1.0, chunk, splits, int(bool(trans_out)))
    _record(ctx, "cols", fields, x, y, g, P * R, splits, (gx, splits, gz),
            P % 4 == 0 and x_off % 4 == 0, ROWS_TR)
    return g
