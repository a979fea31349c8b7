"""CPU kernels of a layer: causal GQA attention, RoPE, RMSNorm and SwiGLU, forward
and backward.  Checks live here (every bad input raises ValueError before any memory is
touched); the loops live in csrc/{attention,rope,rmsnorm,swiglu}.c behind the Cython contracts in
src/qlora_ext/{attention,rope,rmsnorm,swiglu}.pxi.

Shape letters: B batch, T tokens, Hq query heads, Hkv key/value heads, D head_dim,
N rows, C channels, P table positions.  Arrays are float32 and C-contiguous."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..model import reference_kernels
from ..model.rope_freq import rope_inv_freq

from .._native import kernels, require_memory, resolve_threads


def _f32(name: str, a, ndim: int, letters: str) -> np.ndarray:
    """a must be a C-contiguous float32 ndarray of ndim dimensions (named by letters)."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: expected a numpy float32 array [{letters}], got {type(a).__name__}")
    if a.dtype != np.float32:
        raise ValueError(f"{name}: expected dtype float32, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions [{letters}], got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array (use np.ascontiguousarray)")
    return a


def _same_shape(name: str, a: np.ndarray, shape: tuple, letters: str) -> None:
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} [{letters}], got {a.shape}")


# ---- RMSNorm ------------------------------------------------------------------------------

def rmsnorm_forward(x: np.ndarray, weight: np.ndarray, eps: float, threads=None):
    """x [N, C], weight [C] -> (y [N, C], rstd [N]); rstd = 1/sqrt(mean(x^2) + eps),
    y = weight * (x * rstd) (HF's float32 order).  For per-head q/k norm pass x as [N*H, D]."""
    _f32("x", x, 2, "N, C")
    _f32("weight", weight, 1, "C")
    N, C = x.shape
    if C == 0:
        raise ValueError("x: C (the normalised dimension) must be >= 1")
    _same_shape("weight", weight, (C,), "C")
    eps = float(eps)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps={eps!r}: expected a finite value >= 0")
    nt = resolve_threads(threads)
    y = np.empty_like(x)
    rstd = np.empty(N, np.float32)
    kernels().rmsnorm_forward(x, weight, eps, y, rstd, nt)
    return y, rstd


def rmsnorm_backward(x: np.ndarray, weight: np.ndarray, rstd: np.ndarray, dy: np.ndarray,
                     weight_grad: bool = False, threads=None):
    """x, dy [N, C], weight [C], rstd [N] (from rmsnorm_forward) -> (dx [N, C], dweight [C]
    or None).  dweight = sum_n dy * x * rstd, returned only when weight_grad is true."""
    _f32("x", x, 2, "N, C")
    N, C = x.shape
    if C == 0:
        raise ValueError("x: C (the normalised dimension) must be >= 1")
    _same_shape("weight", _f32("weight", weight, 1, "C"), (C,), "C")
    _same_shape("rstd", _f32("rstd", rstd, 1, "N"), (N,), "N")
    _same_shape("dy", _f32("dy", dy, 2, "N, C"), (N, C), "N, C")
    nt = resolve_threads(threads)
    dx = np.empty_like(x)
    dw = np.empty(C, np.float32) if weight_grad else None
    kernels().rmsnorm_backward(x, weight, rstd, dy, dx, dw, nt)
    return dx, dw


# ---- RoPE ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RopeTables:
    """cos, sin: float32 [P, D/2] for positions 0..P-1 (the second half of HF's [P, D] tables
    repeats the first, so only one half is kept)."""

    cos: np.ndarray
    sin: np.ndarray

    @property
    def head_dim(self) -> int:
        return 2 * self.cos.shape[1]

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]


def rope_tables(head_dim: int, max_positions: int, theta: float, scaling=None) -> RopeTables:
    """cos/sin tables [max_positions, head_dim/2] for HF rotate_half RoPE.

    scaling: None or the config's rope_scaling / rope_parameters dict ("default", "linear"
    with factor, "llama3" with factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings).  As in HF, inv_freq and the angle position * inv_freq
    are float32; cos and sin of that float32 angle are taken in float64 and rounded once."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim!r}: expected an even integer >= 2")
    if isinstance(max_positions, bool) or not isinstance(max_positions, (int, np.integer)) or max_positions < 1:
        raise ValueError(f"max_positions={max_positions!r}: expected an integer >= 1")
    theta = float(theta)
    if not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"theta={theta!r}: expected a positive number")
    # float32 tables, float64 while they are built
    require_memory(16 * int(max_positions) * int(head_dim), f"rope tables for max_positions={max_positions}")
    inv = rope_inv_freq(int(head_dim), theta, scaling)
    pos = np.arange(int(max_positions), dtype=np.float32)
    angle = (pos[:, None] * inv[None, :]).astype(np.float32).astype(np.float64)
    return RopeTables(cos=np.ascontiguousarray(np.cos(angle).astype(np.float32)),
                      sin=np.ascontiguousarray(np.sin(angle).astype(np.float32)))


def _rope_args(name: str, x, positions, tables: RopeTables):
    _f32(name, x, 4, "B, T, H, D")
    B, T, H, D = x.shape
    if not isinstance(tables, RopeTables):
        raise ValueError(f"tables: expected a RopeTables from rope_tables(), got {type(tables).__name__}")
    if D % 2:
        raise ValueError(f"{name}: head_dim D={D} must be even")
    if tables.head_dim != D:
        raise ValueError(f"tables: built for head_dim {tables.head_dim}, {name} has D={D}")
    for tname in ("cos", "sin"):
        t = getattr(tables, tname)
        _f32(f"tables.{tname}", t, 2, "P, D/2")
        _same_shape(f"tables.{tname}", t, tables.cos.shape, "P, D/2")
    pos = np.asarray(positions)
    if pos.dtype.kind not in "iu":
        raise ValueError(f"positions: expected an integer array, got dtype {pos.dtype}")
    if pos.ndim == 1:
        _same_shape("positions", pos, (T,), "T")
        pos = pos[None, :]
    elif pos.ndim == 2:
        _same_shape("positions", pos, (B, T), "B, T")
    else:
        raise ValueError(f"positions: expected shape [B, T] or [T], got {pos.shape}")
    P = tables.max_positions
    if pos.size and (pos.min() < 0 or pos.max() >= P):
        raise ValueError(f"positions: values must lie in [0, {P}) (the table's range), "
                         f"got min {pos.min()} max {pos.max()}")
    return np.ascontiguousarray(pos, dtype=np.int64)


def rope_forward(x: np.ndarray, positions, tables: RopeTables, threads=None) -> np.ndarray:
    """Rotate x [B, T, H, D] in place (HF rotate_half): x1' = x1 cos - x2 sin,
    x2' = x2 cos + x1 sin at each token's position; positions int [B, T] or [T].
    Returns x."""
    pos = _rope_args("x", x, positions, tables)
    kernels().rope_apply(x, pos, tables.cos, tables.sin, 1, resolve_threads(threads))
    return x


def rope_backward(dx: np.ndarray, positions, tables: RopeTables, threads=None) -> np.ndarray:
    """Gradient of rope_forward, in place on dx [B, T, H, D] (the transpose rotation).
    Returns dx."""
    pos = _rope_args("dx", dx, positions, tables)
    kernels().rope_apply(dx, pos, tables.cos, tables.sin, -1, resolve_threads(threads))
    return dx


# ---- causal GQA attention -------------------------------------------------------------------

def _attn_args(q, k, v, mask):
    _f32("q", q, 4, "B, T, Hq, D")
    _f32("k", k, 4, "B, T, Hkv, D")
    _f32("v", v, 4, "B, T, Hkv, D")
    B, T, Hq, D = q.shape
    if B < 1 or T < 1 or Hq < 1:
        raise ValueError(f"q: expected B, T, Hq >= 1, got shape {q.shape}")
    if D < 2 or D % 2:
        raise ValueError(f"q: head_dim D={D} must be even and >= 2")
    Hkv = k.shape[2]
    if Hkv < 1 or k.shape != (B, T, Hkv, D):
        raise ValueError(f"k: expected shape (B, T, Hkv, D) = ({B}, {T}, Hkv, {D}), got {k.shape}")
    if Hq % Hkv:
        raise ValueError(f"k: Hq={Hq} query heads are not a multiple of Hkv={Hkv} key/value heads")
    _same_shape("v", v, k.shape, "B, T, Hkv, D")
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.dtype not in (np.bool_, np.uint8):
            raise ValueError(f"mask: expected a bool or uint8 numpy array [B, T], got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)}")
        _same_shape("mask", mask, (B, T), "B, T")
        mask = np.ascontiguousarray(mask).view(np.uint8)
        if mask.max(initial=0) > 1:
            raise ValueError("mask: uint8 values must be 0 (padding) or 1 (real token)")
    return B, T, Hq, Hkv, D, mask


def _segment_arg(segments, B, T):
    if segments is None:
        return None
    if not isinstance(segments, np.ndarray) or segments.dtype.kind not in "iu":
        raise ValueError(f"segments: expected an integer numpy array [B, T], got "
                         f"{getattr(segments, 'dtype', type(segments).__name__)}")
    _same_shape("segments", segments, (B, T), "B, T")
    return np.ascontiguousarray(segments, dtype=np.int32)


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask=None, threads=None,
                      segments=None):
    """Causal self-attention with grouped-query heads.

    q [B, T, Hq, D], k, v [B, T, Hkv, D]: query head h uses key/value head h // (Hq // Hkv);
    scale 1/sqrt(D); mask [B, T] bool/uint8 (1 = real token, 0 = padding key nobody attends)
    or None.  Returns (out [B, T, Hq, D], lse [B, Hq, T]), lse the log-sum-exp of each row's
    scaled scores (what attention_backward needs).  A query row with no key to attend (left
    padding) gets out = 0 and lse = -inf.  segments [B, T] integer or None: documents packed
    into one row, each a run of equal ids, attend only within their run (block-diagonal causal;
    key tiles wholly before a query tile's run are skipped).  Work memory O(T * D) per head."""
    B, T, Hq, Hkv, D, mask = _attn_args(q, k, v, mask)
    segments = _segment_arg(segments, B, T)
    nt = resolve_threads(threads)
    out = np.empty_like(q)
    lse = np.empty((B, Hq, T), np.float32)
    kernels().attention_forward(q, k, v, mask, out, lse, nt, segments)
    return out, lse


def attention_backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray,
                       lse: np.ndarray, dout: np.ndarray, mask=None, threads=None, segments=None):
    """Gradients (dq [B, T, Hq, D], dk, dv [B, T, Hkv, D]) of attention_forward for the
    upstream gradient dout [B, T, Hq, D], given its out and lse.  Scores are recomputed tile
    by tile (flash-attention style); memory stays O(T * D) per head.  segments as in
    attention_forward."""
    B, T, Hq, Hkv, D, mask = _attn_args(q, k, v, mask)
    segments = _segment_arg(segments, B, T)
    _same_shape("out", _f32("out", out, 4, "B, T, Hq, D"), q.shape, "B, T, Hq, D")
    _same_shape("dout", _f32("dout", dout, 4, "B, T, Hq, D"), q.shape, "B, T, Hq, D")
    _same_shape("lse", _f32("lse", lse, 3, "B, Hq, T"), (B, Hq, T), "B, Hq, T")
    nt = resolve_threads(threads)
    dq = np.empty_like(q)
    dk = np.empty_like(k)
    dv = np.empty_like(v)
    kernels().attention_backward(q, k, v, out, lse, dout, mask, dq, dk, dv, nt, segments)
    return dq, dk, dv


# ---- SwiGLU -------------------------------------------------------------------------------

def _swiglu_arrays(names: str, arrays, shape) -> list:
    out = []
    for name, a in zip(names.split(), arrays):
        _f32(name, a, len(shape), "N F")
        _same_shape(name, a, shape, "N F")
        out.append(a.reshape(-1))
    return out


def _swiglu_in_c() -> bool:
    """One C pass with a vector exp on AVX-512; below it numpy's SIMD passes are faster than
    the C loop's scalar expf (model.reference_kernels)."""
    return kernels().cpu_level_name() in ("avx512", "avx512_bf16")


def swiglu_forward(g: np.ndarray, u: np.ndarray, m: np.ndarray, threads=None) -> None:
    """m [N, F] = silu(g) · u, written in place (csrc/swiglu.c)."""
    flat = _swiglu_arrays("g u m", (g, u, m), g.shape)
    if not _swiglu_in_c():
        return reference_kernels.swiglu_forward(g, u, m)
    kernels().swiglu_forward(*flat, resolve_threads(threads))


def swiglu_backward(g: np.ndarray, u: np.ndarray, dm: np.ndarray, dg: np.ndarray, du: np.ndarray,
                    threads=None) -> None:
    """du = dm · silu(g), dg = dm · u · σ(g)(1 + g(1 - σ(g))), written in place."""
    flat = _swiglu_arrays("g u dm dg du", (g, u, dm, dg, du), g.shape)
    if not _swiglu_in_c():
        return reference_kernels.swiglu_backward(g, u, dm, dg, du)
    kernels().swiglu_backward(*flat, resolve_threads(threads))
