"""CPU FFN backend against a float64 numpy reference (forward, backward, LoRA, dropout, NF4).

The reference and the fake model state here are also used by tests/test_gpu_ffn.py."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import qlora_ext as qx
from qlora_ext.backend import FfnLora
from qlora_ext.cpu.ffn import CpuFfnBackend, apply_dropout, dropout_key, dropout_threshold
from qlora_ext.model.lora import LoraPair

FFN = ("gate_proj", "up_proj", "down_proj")


class FakeLayer:
    def __init__(self, proj):
        self.proj = proj

    def weight(self, name):
        w = self.proj[name]
        return qx.dequantize_nf4(w) if isinstance(w, qx.NF4Tensor) else w


def fake_state(hidden, inter, n_layers=2, nf4=True, seed=0, blocksize=64):
    """A stand-in for the loader's ModelState: .config and .layers[l].proj[name]."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(n_layers):
        proj = {}
        for p, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
            w = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
            proj[p] = qx.quantize_nf4(w, blocksize=blocksize) if nf4 else w
        layers.append(FakeLayer(proj))
    cfg = SimpleNamespace(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers)
    return SimpleNamespace(config=cfg, layers=layers)


def make_lora(hidden, inter, r, targets=FFN, dropout=0.0, seed=0, rng_seed=1):
    rng = np.random.default_rng(rng_seed)
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    pairs = {}
    for p in targets:
        o, i = shapes[p]
        A = rng.uniform(-1, 1, (r, i)).astype(np.float32) / np.float32(np.sqrt(i))
        B = rng.standard_normal((o, r)).astype(np.float32) * np.float32(0.1)  # nonzero: B's grad path
        pairs[p] = LoraPair(A, B, 2.0)
    return FfnLora(pairs=pairs, dropout=dropout, seed=seed)


def ref_ffn(state, layer, x, dy, lora):
    """float64 forward and backward; dropout masks from the same hash as the backends."""
    L = state.layers[layer]
    W = {p: L.weight(p).astype(np.float64) for p in FFN}
    x = x.astype(np.float64)
    pairs = lora.pairs if lora is not None else {}

    def mask(p, z):
        if lora is None or not lora.dropout:
            return np.ones_like(z)
        m = apply_dropout(np.ones(z.shape, np.float32), lora.dropout, dropout_key(lora.seed, layer, p))
        return m.astype(np.float64)

    def fwd(p, z):
        out = z @ W[p].T
        if p in pairs:
            A, B, s = pairs[p].A.astype(np.float64), pairs[p].B.astype(np.float64), pairs[p].scale
            out = out + s * ((z * mask(p, z)) @ A.T) @ B.T
        return out

    g, u = fwd("gate_proj", x), fwd("up_proj", x)
    sig = 1.0 / (1.0 + np.exp(-g))
    h = g * sig * u
    y = fwd("down_proj", h)

    grads = {}

    def bwd(p, z, dout):
        dz = dout @ W[p]
        if p in pairs:
            A, B, s = pairs[p].A.astype(np.float64), pairs[p].B.astype(np.float64), pairs[p].scale
            m = mask(p, z)
            t = (z * m) @ A.T
            grads[p] = ((s * dout @ B).T @ (z * m), s * dout.T @ t)
            dz = dz + ((s * dout @ B) @ A) * m
        return dz

    dh = bwd("down_proj", h, dy.astype(np.float64))
    dg = dh * u * sig * (1 + g * (1 - sig))
    du = dh * g * sig
    dx = bwd("gate_proj", x, dg) + bwd("up_proj", x, du)
    return y, dx, grads


def rel_err(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


def check_backend(be, state, layer, N, lora, tol):
    H = state.config.hidden_size
    rng = np.random.default_rng(N)
    x = rng.standard_normal((N, H)).astype(np.float32)
    dy = rng.standard_normal((N, H)).astype(np.float32)
    y, ctx = be.ffn_forward(layer, x, lora)
    g = be.ffn_backward(layer, ctx, dy)
    y_ref, dx_ref, grads_ref = ref_ffn(state, layer, x, dy, lora)
    assert y.shape == (N, H) and y.dtype == np.float32
    assert g.dx.shape == (N, H) and g.dx.dtype == np.float32
    assert rel_err(y, y_ref) <= tol, rel_err(y, y_ref)
    assert rel_err(g.dx, dx_ref) <= tol, rel_err(g.dx, dx_ref)
    expected = set(lora.pairs) if lora is not None else set()
    assert set(g.lora) == expected
    for p in expected:
        dA, dB = g.lora[p]
        assert dA.shape == lora.pairs[p].A.shape and dB.shape == lora.pairs[p].B.shape
        assert rel_err(dA, grads_ref[p][0]) <= tol, (p, "dA", rel_err(dA, grads_ref[p][0]))
        assert rel_err(dB, grads_ref[p][1]) <= tol, (p, "dB", rel_err(dB, grads_ref[p][1]))
    return y, g


@pytest.mark.parametrize("nf4", [True, False])
@pytest.mark.parametrize("N,H,I", [(1, 32, 48), (7, 64, 96), (37, 96, 160)])
@pytest.mark.parametrize("targets", [FFN, ("down_proj",), ()])
def test_cpu_ffn_matches_float64(nf4, N, H, I, targets):
    state = fake_state(H, I, nf4=nf4)
    be = CpuFfnBackend()
    be.prepare(state)
    lora = make_lora(H, I, r=4, targets=targets) if targets else None
    for layer in (0, 1, 1, 0):  # buffer reuse and the one-layer cache must not mix layers up
        check_backend(be, state, layer, N, lora, tol=1e-5)


def test_cpu_ffn_dropout_matches_reference_and_zero_is_exact():
    H, I, N = 64, 96, 11
    state = fake_state(H, I)
    be = CpuFfnBackend()
    be.prepare(state)
    check_backend(be, state, 1, N, make_lora(H, I, r=8, dropout=0.3, seed=1234567890123), tol=1e-5)
    x = np.random.default_rng(0).standard_normal((N, H)).astype(np.float32)
    y0, _ = be.ffn_forward(0, x, make_lora(H, I, r=8, dropout=0.0), need_backward=False)
    y1, _ = be.ffn_forward(0, x, make_lora(H, I, r=8, dropout=0.0, seed=99), need_backward=False)
    assert np.array_equal(y0, y1)


def test_dropout_mask_rate_and_independence():
    z = np.ones((256, 512), np.float32)
    for p in (0.05, 0.1, 0.5):
        k = dropout_key(7, 3, "gate_proj")
        m = apply_dropout(z, p, k)
        kept = m != 0
        assert abs(1 - kept.mean() - p) < 0.01
        assert np.all(m[kept] == np.float32(1 / (1 - p)))
    m_gate = apply_dropout(z, 0.5, dropout_key(7, 3, "gate_proj")) != 0
    m_up = apply_dropout(z, 0.5, dropout_key(7, 3, "up_proj")) != 0
    m_l4 = apply_dropout(z, 0.5, dropout_key(7, 4, "gate_proj")) != 0
    assert 0.4 < (m_gate == m_up).mean() < 0.6 and 0.4 < (m_gate == m_l4).mean() < 0.6
    assert dropout_threshold(0.0) == 0
    assert apply_dropout(z, 0.0, 5) is z


def test_cpu_ffn_zero_B_equals_base():
    H, I, N = 32, 64, 5
    state = fake_state(H, I)
    be = CpuFfnBackend()
    be.prepare(state)
    x = np.random.default_rng(3).standard_normal((N, H)).astype(np.float32)
    lora = make_lora(H, I, r=4)
    for p in lora.pairs.values():
        p.B[:] = 0
    y_lora, _ = be.ffn_forward(0, x, lora, need_backward=False)
    y_base, _ = be.ffn_forward(0, x, None, need_backward=False)
    np.testing.assert_array_equal(y_lora, y_base)


def test_cpu_ffn_bad_input():
    state = fake_state(32, 48)
    be = CpuFfnBackend()
    with pytest.raises(ValueError, match="prepare"):
        be.ffn_forward(0, np.zeros((2, 32), np.float32), None)
    be.prepare(state)
    with pytest.raises(ValueError, match=r"expected \[N, 32\]"):
        be.ffn_forward(0, np.zeros((2, 31), np.float32), None)
    with pytest.raises(ValueError, match="float32"):
        be.ffn_forward(0, np.zeros((2, 32), np.float64), None)
    with pytest.raises(ValueError, match="out of range"):
        be.ffn_forward(5, np.zeros((2, 32), np.float32), None)
    bad = make_lora(32, 48, r=4)
    bad.pairs["up_proj"] = LoraPair(np.zeros((4, 31), np.float32), np.zeros((48, 4), np.float32), 1.0)
    with pytest.raises(ValueError, match="up_proj"):
        be.ffn_forward(0, np.zeros((2, 32), np.float32), bad)
    _, ctx = be.ffn_forward(0, np.zeros((2, 32), np.float32), None)
    with pytest.raises(ValueError, match="layer 0"):
        be.ffn_backward(1, ctx, np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="rows"):
        be.ffn_backward(0, ctx, np.zeros((3, 32), np.float32))
    wrong = fake_state(32, 48)
    wrong.layers[1].proj["down_proj"] = np.zeros((32, 47), np.float32)
    with pytest.raises(ValueError, match="layer 1 down_proj"):
        be.prepare(wrong)


def test_select_backend_falls_back_to_cpu_without_real_gpu(monkeypatch):
    from qlora_ext.device import select_backend
    from qlora_ext.gpu import runtime as context

    monkeypatch.setattr(context, "pick_adapter", lambda allow_software: None)
    assert isinstance(select_backend("auto"), CpuFfnBackend)
    assert isinstance(select_backend("cpu", threads=2), CpuFfnBackend)
    with pytest.raises(context.GpuError, match="no adapter"):
        select_backend("gpu")
