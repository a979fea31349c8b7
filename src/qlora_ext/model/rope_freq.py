"""RoPE inverse frequencies of a config (default, linear and llama3 scaling), in the float32
order of operations of transformers.modeling_rope_utils: the loaders, the GGUF export and the
kernels' cos/sin tables all read them from here."""
from __future__ import annotations

import math

import numpy as np


def _rope_type(scaling) -> str:
    if scaling is None:
        return "default"
    if not isinstance(scaling, dict):
        raise ValueError(f"rope scaling: expected None or a dict (config rope_scaling), got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope scaling: rope_type {kind!r} is not supported "
                         "(expected 'default', 'linear' or 'llama3')")
    return kind


def _scaling_value(scaling: dict, key: str) -> float:
    if key not in scaling:
        raise ValueError(f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r}: missing {key!r}")
    v = scaling[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"rope scaling: {key}={v!r}, expected a positive number")
    return float(v)


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> np.ndarray:
    """Inverse frequencies [D/2] float32, computed in float32 in the same order of operations
    as transformers.modeling_rope_utils (default, linear, llama3), so they match HF's."""
    f32 = np.float32
    D = int(head_dim)
    # HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)) in float32.  torch's float32 pow
    # rounds correctly (numpy's float32 power does not always), so take it in float64, round once.
    exps = np.arange(0, D, 2, dtype=np.int64).astype(f32) / f32(D)
    powers = (np.float64(f32(theta)) ** exps.astype(np.float64)).astype(f32)
    inv = (f32(1.0) / powers).astype(f32)
    kind = _rope_type(scaling)
    if kind == "linear":
        inv = (inv / f32(_scaling_value(scaling, "factor"))).astype(f32)
    elif kind == "llama3":
        factor = f32(_scaling_value(scaling, "factor"))
        low = f32(_scaling_value(scaling, "low_freq_factor"))
        high = f32(_scaling_value(scaling, "high_freq_factor"))
        if high == low:
            raise ValueError("rope scaling llama3: high_freq_factor must differ from low_freq_factor")
        old_len = f32(_scaling_value(scaling, "original_max_position_embeddings"))
        low_wavelen = f32(old_len / low)
        high_wavelen = f32(old_len / high)
        wavelen = (f32(2 * math.pi) / inv).astype(f32)
        inv_l = np.where(wavelen > low_wavelen, inv / factor, inv).astype(f32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(f32)
        smoothed = ((f32(1) - smooth) * inv_l / factor + smooth * inv_l).astype(f32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, inv_l).astype(f32)
    return inv
