"""SwiGLU (csrc/swiglu.c) and the cross-entropy rows (csrc/cross_entropy.c) against float64
numpy, at every SIMD level, on awkward sizes; and the chunked cross_entropy's kernel and numpy
paths agree."""
import numpy as np
import pytest

from qlora_ext._native import kernels
from qlora_ext.cpu import kernels as cpu_kernels
from qlora_ext.model.loss import cross_entropy


def _sig64(g):
    return 1.0 / (1.0 + np.exp(-g))


@pytest.mark.parametrize("raw_kernel", [False, True])
@pytest.mark.parametrize("n,f", [(1, 1), (1, 15), (3, 17), (7, 97), (64, 1536), (1, 70001)])
def test_swiglu_matches_float64(simd_level, n, f, raw_kernel):
    """Through qlora_ext.cpu.kernels (C on AVX-512, numpy below) and the C kernel itself at
    every level (its scalar path included)."""
    rng = np.random.default_rng(n * f)
    g = (rng.standard_normal((n, f)) * 4).astype(np.float32)
    g.flat[0] = -120.0                    # σ underflows: no overflow, no NaN
    if g.size > 1:
        g.flat[1] = 95.0
    u, dm = (rng.standard_normal((n, f)).astype(np.float32) for _ in range(2))
    m, dg, du = (np.full((n, f), np.nan, np.float32) for _ in range(3))
    if raw_kernel:
        kernels().swiglu_forward(g.reshape(-1), u.reshape(-1), m.reshape(-1), 2)
        kernels().swiglu_backward(g.reshape(-1), u.reshape(-1), dm.reshape(-1), dg.reshape(-1), du.reshape(-1), 3)
    else:
        cpu_kernels.swiglu_forward(g, u, m, threads=2)
        cpu_kernels.swiglu_backward(g, u, dm, dg, du, threads=3)
    G, U, D = (a.astype(np.float64) for a in (g, u, dm))
    s = _sig64(G)
    # dg's factor 1 + g(1 - σ) cancels near g = -1.28: its error is measured against the size
    # of its terms, 1 + |g|(1 - σ), not against the result
    terms = np.abs(D * U * s) * (1 + np.abs(G) * (1 - s))
    for got, ref, scale in ((m, G * s * U, np.abs(G * s * U)), (du, D * G * s, np.abs(D * G * s)),
                            (dg, D * U * s * (1 + G * (1 - s)), terms)):
        assert np.all(np.isfinite(got))
        assert np.all(np.abs(got - ref) <= 2e-6 * scale + 1e-37), float(np.max(np.abs(got - ref) / (scale + 1e-37)))


def test_swiglu_rejects_bad_arrays():
    g = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="expected shape"):
        cpu_kernels.swiglu_forward(g, np.zeros((3, 5), np.float32), np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.swiglu_forward(g, g.astype(np.float64), g.copy())


def _xent_ref(logits, t, scale):
    L = logits.astype(np.float64)
    m = L.max(axis=1, keepdims=True)
    e = np.exp(L - m)
    z = e.sum(axis=1)
    loss = np.log(z) - (L[np.arange(len(t)), t] - m[:, 0])
    grad = scale * e / z[:, None]
    grad[np.arange(len(t)), t] -= scale
    return loss, grad


@pytest.mark.parametrize("rows,V", [(1, 1), (1, 16), (3, 17), (5, 257), (13, 49152), (2, 151936)])
def test_cross_entropy_rows_match_float64(simd_level, rows, V):
    rng = np.random.default_rng(rows + V)
    wide = (rng.standard_normal((rows, V + 3)) * 5).astype(np.float32)
    logits = wide[:, 1:V + 1]                   # row stride > V
    logits[0, 0] = -1e30                        # exp underflows to 0
    t = rng.integers(0, V, rows).astype(np.int64)
    outside = np.concatenate([wide[:, :1], wide[:, V + 1:]], axis=1).copy()
    want_loss, want_grad = _xent_ref(logits, t, 0.25)
    loss = np.empty(rows, np.float64)
    kernels().cross_entropy_rows(logits, t, loss, 0.25, True, 2)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits, want_grad, rtol=2e-6, atol=1e-9)
    np.testing.assert_array_equal(np.concatenate([wide[:, :1], wide[:, V + 1:]], axis=1), outside)
    again = (rng.standard_normal((rows, V)) * 5).astype(np.float32)
    before = again.copy()
    kernels().cross_entropy_rows(again, t, loss, 1.0, False, 1)
    np.testing.assert_array_equal(again, before)   # no gradient asked: logits untouched
    np.testing.assert_allclose(loss, _xent_ref(before, t, 1.0)[0], rtol=1e-6, atol=1e-6)


def test_cross_entropy_rows_rejects_bad_targets():
    logits = np.zeros((2, 5), np.float32)
    loss = np.empty(2, np.float64)
    with pytest.raises(ValueError, match="outside"):
        kernels().cross_entropy_rows(logits, np.array([0, 5], np.int64), loss)
    with pytest.raises(ValueError, match="rows"):
        kernels().cross_entropy_rows(logits, np.array([0], np.int64), loss)


def test_chunked_cross_entropy_kernel_and_numpy_paths_agree(monkeypatch):
    import qlora_ext

    rng = np.random.default_rng(5)
    h = rng.standard_normal((37, 24)).astype(np.float32)
    W = rng.standard_normal((1003, 24)).astype(np.float32)
    t = rng.integers(0, 1003, 37)
    a_loss, a_dh = cross_entropy(h, W, t, 1 / 37)
    monkeypatch.setenv("QLORA_EXT_CPU", "avx2")
    qlora_ext.refresh_cpu_features()
    b_loss, b_dh = cross_entropy(h, W, t, 1 / 37)
    np.testing.assert_allclose(a_loss, b_loss, rtol=1e-6)
    np.testing.assert_allclose(a_dh, b_dh, rtol=1e-5, atol=1e-7)
