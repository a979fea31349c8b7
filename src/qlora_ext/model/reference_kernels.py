"""Slow, always-correct numpy versions of the CPU kernels the model calls (attention, RoPE,
RMSNorm), with the same signatures (`threads` accepted and ignored) and in-place conventions as `qlora_ext.cpu.kernels`.

They compute in float64 and hand back float32.  The model falls back to them when the
compiled kernels are not available, and the tests use them as the reference.

Shape letters: B batch, T tokens, Hq query heads, Hkv key/value heads, D head dim,
N rows, C channels, P positions."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .packing import document_starts


# --------------------------------------------------------------------------- attention
def _scores(q, k, mask, segments=None):
    """q [B,T,Hq,D], k [B,T,Hkv,D] -> masked scores [B,Hq,T,T] float64 (-inf where hidden);
    segments [B,T]: packed documents (runs of equal ids) see only their own keys."""
    B, T, Hq, D = q.shape
    g = Hq // k.shape[2]
    kk = np.repeat(k.astype(np.float64), g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q.astype(np.float64), kk) / np.sqrt(D)
    hidden = np.triu(np.ones((T, T), dtype=bool), 1)[None, None]
    if mask is not None:
        hidden = hidden | (np.asarray(mask) == 0)[:, None, None, :]
    if segments is not None:
        st = document_starts(np.asarray(segments))
        hidden = hidden | (st[:, :, None] != st[:, None, :])[:, None]
    return np.where(hidden, -np.inf, s)


def attention_forward(q, k, v, mask=None, threads=None, segments=None):
    """Causal GQA attention, scale 1/sqrt(D).  q [B,T,Hq,D], k/v [B,T,Hkv,D], mask [B,T]
    (1 = real token; padding keys ignored).  Returns (out [B,T,Hq,D], lse [B,Hq,T]).
    A query that sees no key (left padding) gets out = 0 and lse = -inf."""
    g = q.shape[2] // k.shape[2]
    s = _scores(q, k, mask, segments)
    m = s.max(axis=-1, keepdims=True)
    live = np.isfinite(m)
    m = np.where(live, m, 0.0)
    e = np.exp(s - m)
    z = e.sum(axis=-1, keepdims=True)
    p = np.where(live, e / np.where(live, z, 1.0), 0.0)
    vv = np.repeat(v.astype(np.float64), g, axis=2)
    out = np.einsum("bhts,bshd->bthd", p, vv)
    with np.errstate(divide="ignore"):
        lse = np.where(live, m + np.log(np.where(live, z, 1.0)), -np.inf)[..., 0]
    return out.astype(np.float32), lse.astype(np.float32)


def attention_backward(q, k, v, out, lse, dout, mask=None, threads=None, segments=None):
    """Gradients of attention_forward: (dq [B,T,Hq,D], dk, dv [B,T,Hkv,D])."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    s = _scores(q, k, mask, segments)
    lse64 = lse.astype(np.float64)[..., None]
    live = np.isfinite(lse64)
    p = np.where(live, np.exp(s - np.where(live, lse64, 0.0)), 0.0)
    do = dout.astype(np.float64)
    vv = np.repeat(v.astype(np.float64), g, axis=2)
    kk = np.repeat(k.astype(np.float64), g, axis=2)
    dp = np.einsum("bthd,bshd->bhts", do, vv)
    delta = np.einsum("bthd,bthd->bht", do, out.astype(np.float64))[..., None]
    ds = p * (dp - delta) / np.sqrt(D)
    dq = np.einsum("bhts,bshd->bthd", ds, kk)
    dkk = np.einsum("bhts,bthd->bshd", ds, q.astype(np.float64))
    dvv = np.einsum("bhts,bthd->bshd", p, do)
    dk = dkk.reshape(B, T, Hkv, g, D).sum(axis=3)
    dv = dvv.reshape(B, T, Hkv, g, D).sum(axis=3)
    return dq.astype(np.float32), dk.astype(np.float32), dv.astype(np.float32)


# --------------------------------------------------------------------------- RoPE
@dataclass
class RopeTables:
    cos: np.ndarray  # [P, D/2] float32
    sin: np.ndarray  # [P, D/2] float32


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """[D/2] float32 inverse frequencies as transformers computes them (float32 arithmetic),
    with 'linear' and 'llama3' rope_scaling."""
    exps = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(theta), exps)).astype(np.float32)
    kind = None if not scaling else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv / np.float32(factor)).astype(np.float32)
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv
        out = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        return np.where(medium, smoothed, out).astype(np.float32)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (expected linear or llama3)")


def rope_tables(head_dim, max_positions, theta, scaling=None) -> RopeTables:
    inv = rope_inv_freq(head_dim, theta, scaling)
    ang = np.arange(max_positions, dtype=np.float32)[:, None] * inv[None, :]
    return RopeTables(np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32))


def _cos_sin(positions, tables):
    """cos/sin broadcastable to [B,T,1,D/2] for positions [B,T] or [T]."""
    pos = np.asarray(positions)
    c, s = tables.cos[pos], tables.sin[pos]
    if pos.ndim == 1:
        c, s = c[None], s[None]
    return c[:, :, None, :].astype(np.float64), s[:, :, None, :].astype(np.float64)


def rope_forward(x, positions, tables, threads=None):
    """In place on x [B,T,H,D]: rotate_half convention (first half, second half)."""
    h = x.shape[-1] // 2
    c, s = _cos_sin(positions, tables)
    x1, x2 = x[..., :h].astype(np.float64), x[..., h:].astype(np.float64)
    x[..., :h] = x1 * c - x2 * s
    x[..., h:] = x2 * c + x1 * s
    return x


def rope_backward(dx, positions, tables, threads=None):
    """In place on dx [B,T,H,D]: the transpose rotation."""
    h = dx.shape[-1] // 2
    c, s = _cos_sin(positions, tables)
    d1, d2 = dx[..., :h].astype(np.float64), dx[..., h:].astype(np.float64)
    dx[..., :h] = d1 * c + d2 * s
    dx[..., h:] = d2 * c - d1 * s
    return dx


# --------------------------------------------------------------------------- RMSNorm
def rmsnorm_forward(x, weight, eps, threads=None):
    """x [N,C] -> (y [N,C] = x * rstd * weight, rstd [N])."""
    x64 = x.astype(np.float64)
    rstd = 1.0 / np.sqrt((x64 * x64).mean(axis=-1) + eps)
    y = x64 * rstd[:, None] * weight.astype(np.float64)
    return y.astype(np.float32), rstd.astype(np.float32)


def rmsnorm_backward(x, weight, rstd, dy, weight_grad=False, threads=None):
    """(dx [N,C], dweight [C] or None)."""
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    xhat = x64 * rstd.astype(np.float64)[:, None]
    g = dy64 * weight.astype(np.float64)
    dx = rstd.astype(np.float64)[:, None] * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    dw = (dy64 * xhat).sum(axis=0).astype(np.float32) if weight_grad else None
    return dx.astype(np.float32), dw


def swiglu_forward(g, u, m, threads=None):
    """m = silu(g) * u, in place (numpy)."""
    np.negative(g, out=m)
    np.exp(m, out=m)
    m += 1.0
    np.reciprocal(m, out=m)               # sigmoid(g)
    m *= g
    m *= u


def swiglu_backward(g, u, dm, dg, du, threads=None):
    """du = dm silu(g); dg = dm u sig (1 + g (1 - sig)), sig = sigmoid(g), in place (numpy)."""
    sig = np.negative(g)
    np.exp(sig, out=sig)
    sig += 1.0
    np.reciprocal(sig, out=sig)
    np.multiply(g, sig, out=du)
    du *= dm
    np.subtract(1.0, sig, out=dg)
    dg *= g
    dg += 1.0
    dg *= sig
    dg *= u
    dg *= dm
