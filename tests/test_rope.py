"""RoPE tables and the in-place rotation against float64 references on every SIMD path;
the backward is the transpose (checked by finite differences and by <Rx, g> = <x, R^T g>);
transformers' own RoPE (default, linear, llama3); bad input."""
import math

import numpy as np
import pytest

from qlora_ext.cpu import kernels as K

RTOL = 1e-5


def ref_rope(x, pos, cos, sin, direction=1):
    """float64 HF rotate_half: x [B, T, H, D], pos [B, T], tables [P, D/2]."""
    x = x.astype(np.float64)
    half = x.shape[-1] // 2
    c = cos.astype(np.float64)[pos][:, :, None, :]
    s = direction * sin.astype(np.float64)[pos][:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def rel_err(a, ref):
    return np.abs(a.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30)


def ref_inv_freq_f64(D, theta, scaling=None):
    """float64 formulas straight from the RoPE / llama3 definitions."""
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
        inv = inv / scaling["factor"]
    elif scaling and scaling.get("rope_type") == "llama3":
        f, lo, hi, old = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings"))
        wl = 2 * math.pi / inv
        smooth = (old / wl - lo) / (hi - lo)
        mid = (1 - smooth) * inv / f + smooth * inv
        inv = np.where(wl > old / lo, inv / f, np.where(wl < old / hi, inv, mid))
    return inv


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", [None, {"rope_type": "default"}, {"type": "linear", "factor": 4.0}, LLAMA3])
def test_tables_match_float64_formulas(scaling):
    D, P, theta = 128, 300, 500000.0
    t = K.rope_tables(D, P, theta, scaling)
    assert t.cos.shape == (P, D // 2) and t.cos.dtype == np.float32
    inv = ref_inv_freq_f64(D, theta, scaling)
    ang = np.arange(P)[:, None] * inv[None, :]
    # float32 inv_freq and angle (as HF): error grows like position * ulp(inv_freq)
    assert np.abs(t.cos - np.cos(ang)).max() < 5e-5
    assert np.abs(t.sin - np.sin(ang)).max() < 5e-5


@pytest.mark.parametrize("B,T,H,D", [(1, 1, 1, 2), (2, 7, 3, 32), (1, 13, 2, 80), (3, 5, 4, 96),
                                     (1, 31, 2, 128), (2, 3, 1, 256), (1, 4, 2, 6)])
def test_rope_matches_reference(simd_level, B, T, H, D):
    rng = np.random.default_rng(B * 100 + T * 10 + D)
    t = K.rope_tables(D, 64, 10000.0)
    x = rng.standard_normal((B, T, H, D)).astype(np.float32)
    pos = rng.integers(0, 64, (B, T))
    y = x.copy()
    assert K.rope_forward(y, pos, t, threads=2) is y
    assert rel_err(y, ref_rope(x, pos, t.cos, t.sin)) <= RTOL
    g = x.copy()
    K.rope_backward(g, pos, t, threads=2)
    assert rel_err(g, ref_rope(x, pos, t.cos, t.sin, -1)) <= RTOL
    # a shared [T] positions row broadcasts over the batch
    y1 = x.copy()
    K.rope_forward(y1, pos[0], t)
    assert rel_err(y1, ref_rope(x, np.broadcast_to(pos[0], (B, T)), t.cos, t.sin)) <= RTOL


def test_rope_large_threaded():
    rng = np.random.default_rng(5)
    t = K.rope_tables(64, 4097, 1e6)
    x = rng.standard_normal((1, 4097, 4, 64)).astype(np.float32)
    pos = np.arange(4097)
    y = x.copy()
    K.rope_forward(y, pos, t, threads=2)
    assert rel_err(y, ref_rope(x, pos[None], t.cos, t.sin)) <= RTOL
    K.rope_backward(y, pos, t, threads=2)  # a rotation: backward undoes forward
    np.testing.assert_allclose(y, x, atol=2e-6)


def test_rope_backward_is_the_transpose():
    """<R x, g> = <x, R^T g> in float64, and finite differences of the float64 reference."""
    rng = np.random.default_rng(6)
    t = K.rope_tables(8, 10, 10000.0)
    x = rng.standard_normal((2, 3, 2, 8))
    g = rng.standard_normal((2, 3, 2, 8))
    pos = rng.integers(0, 10, (2, 3))
    gk = g.astype(np.float32)
    K.rope_backward(gk, pos, t)
    lhs = (ref_rope(x, pos, t.cos, t.sin) * g).sum()
    assert abs(lhs - (x * gk).sum()) < 1e-5 * np.abs(x).sum()
    h = 1e-6
    for idx in [(0, 0, 0, 0), (1, 2, 1, 5), (0, 1, 1, 7)]:
        e = np.zeros_like(x)
        e[idx] = h
        fd = ((ref_rope(x + e, pos, t.cos, t.sin) * g).sum() - (ref_rope(x - e, pos, t.cos, t.sin) * g).sum()) / (2 * h)
        assert abs(fd - gk[idx]) < 1e-5


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0}, LLAMA3])
def test_rope_matches_transformers(scaling):
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    D, H, T = 64, 2, 40
    # rope_theta + rope_scaling: the config keys both transformers 4.x and 5.x accept
    cfg = LlamaConfig(hidden_size=D * H, num_attention_heads=H, num_key_value_heads=H, head_dim=D,
                      max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=scaling)
    emb = llama.LlamaRotaryEmbedding(cfg)
    assert emb.rope_type == ("default" if scaling is None else scaling["rope_type"])
    rng = np.random.default_rng(7)
    pos = np.sort(rng.integers(0, 20000, (1, T)), axis=1)
    x = rng.standard_normal((1, T, H, D)).astype(np.float32)
    cos, sin = emb(torch.zeros(1, dtype=torch.float32), torch.from_numpy(pos))
    xt = torch.from_numpy(x).transpose(1, 2)  # HF layout [B, H, T, D]
    ref, _ = llama.apply_rotary_pos_emb(xt, xt, cos, sin)
    ref = ref.transpose(1, 2).numpy()
    t = K.rope_tables(D, 20000, 500000.0, scaling)
    np.testing.assert_allclose(t.cos[pos[0]], cos[0, :, : D // 2].numpy(), atol=2e-6, rtol=0)
    np.testing.assert_allclose(t.sin[pos[0]], sin[0, :, : D // 2].numpy(), atol=2e-6, rtol=0)
    y = x.copy()
    K.rope_forward(y, pos, t)
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)


def test_rope_bad_input():
    t = K.rope_tables(8, 16, 10000.0)
    x = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="positions"):
        K.rope_forward(x, np.array([0, 1, 2, 16]), t)
    with pytest.raises(ValueError, match="positions"):
        K.rope_forward(x, np.array([0, -1, 2, 3]), t)
    with pytest.raises(ValueError, match="positions"):
        K.rope_forward(x, np.arange(5), t)
    with pytest.raises(ValueError, match="integer"):
        K.rope_forward(x, np.arange(4.0), t)
    with pytest.raises(ValueError, match="head_dim"):
        K.rope_forward(np.zeros((1, 4, 2, 6), np.float32), np.arange(4), t)
    with pytest.raises(ValueError, match="even"):
        K.rope_forward(np.zeros((1, 4, 2, 7), np.float32), np.arange(4), t)
    with pytest.raises(ValueError, match="float32"):
        K.rope_backward(x.astype(np.float64), np.arange(4), t)
    with pytest.raises(ValueError, match="contiguous"):
        K.rope_forward(np.zeros((1, 2, 4, 8), np.float32).transpose(0, 2, 1, 3), np.arange(4), t)
    with pytest.raises(ValueError, match="even"):
        K.rope_tables(7, 16, 10000.0)
    with pytest.raises(ValueError, match="yarn"):
        K.rope_tables(8, 16, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        K.rope_tables(8, 16, 10000.0, {"rope_type": "llama3", "factor": 8.0})
    np.testing.assert_array_equal(x, 0)
