"""The small-GEMM kernel of the LoRA products (csrc/small_gemm.c) and LoraProducts
(qlora_ext.cpu.lora_products) against float64 numpy, at every SIMD level.

Tolerance: a float32 sum's error scales with the sum of |terms|, so each element's error is
measured against (|a| @ |b|) of its row and column (bound 1e-6, as for the NF4 products)."""
import numpy as np
import pytest

from qlora_ext._native import kernels
from qlora_ext.cpu.lora_products import LoraProducts

TOL = 1e-6

# (N, M, K): ones, primes, widths around the 16-lane vector and the 64-wide tile, row counts
# around the 6- and 12-row tiles, the rank as M, K or N, a long depth
SHAPES = [(1, 1, 1), (1, 16, 7), (7, 1, 13), (12, 16, 576), (13, 17, 97), (6, 64, 16), (5, 65, 16),
          (37, 33, 1), (16, 1537, 31), (256, 16, 1536), (3, 200, 0)]


def _check(got, ref64, a, b, alpha=1.0, base=None):
    scale = abs(alpha) * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
    if base is not None:
        scale = scale + np.abs(base.astype(np.float64))
    err = np.abs(got.astype(np.float64) - ref64)
    assert np.all(err <= TOL * scale + 1e-30), float(np.max(err / (scale + 1e-30)))


@pytest.mark.parametrize("n,m,k", SHAPES)
@pytest.mark.parametrize("transposed_a", [False, True])
def test_small_gemm_matches_float64(simd_level, n, m, k, transposed_a):
    rng = np.random.default_rng(n * 1000 + m * 10 + k)
    a = rng.standard_normal((k, n)).astype(np.float32).T if transposed_a else \
        rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal((k, m)).astype(np.float32)
    c = np.full((n, m), np.nan, np.float32)           # overwritten, never read
    kernels().small_gemm(a, b, c, 0.5, False, 2)
    ref = 0.5 * (a.astype(np.float64) @ b.astype(np.float64))
    _check(c, ref, a, b, 0.5)


@pytest.mark.parametrize("n,m,k", [(1, 1, 3), (29, 16, 97), (16, 131, 256), (300, 48, 16)])
def test_small_gemm_accumulates_into_column_slices(simd_level, n, m, k):
    """c and b as column slices of wider arrays (row stride > width), accumulate=True."""
    rng = np.random.default_rng(k)
    a = rng.standard_normal((n, k)).astype(np.float32)
    wide_b = rng.standard_normal((k, m + 5)).astype(np.float32)
    b = wide_b[:, 2:2 + m]
    wide_c = rng.standard_normal((n, m + 9)).astype(np.float32)
    before = wide_c.copy()
    c = wide_c[:, 3:3 + m]
    base = c.copy()
    kernels().small_gemm(a, b, c, -1.5, True, 3)
    ref = base.astype(np.float64) - 1.5 * (a.astype(np.float64) @ b.astype(np.float64))
    _check(c, ref, a, b, -1.5, base)
    # columns outside the slice untouched
    np.testing.assert_array_equal(wide_c[:, :3], before[:, :3])
    np.testing.assert_array_equal(wide_c[:, 3 + m:], before[:, 3 + m:])


def test_small_gemm_result_does_not_depend_on_threads():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((97, 1031)).astype(np.float32)
    b = rng.standard_normal((1031, 16)).astype(np.float32)
    outs = []
    for t in (1, 2, 3):
        c = np.empty((97, 16), np.float32)
        kernels().small_gemm(a, b, c, 1.0, False, t)
        outs.append(c)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_small_gemm_rejects_mismatched_shapes():
    a = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="do not match"):
        kernels().small_gemm(a, np.zeros((5, 2), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        kernels().small_gemm(a, np.zeros((4, 2), np.float32), np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="rows must be contiguous"):
        kernels().small_gemm(a, np.zeros((2, 4), np.float32).T, np.zeros((3, 2), np.float32))


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("n,inp,out,r,dropout", [(1, 5, 3, 1, False), (37, 96, 40, 16, True),
                                                 (64, 576, 192, 16, False), (13, 17, 1537, 7, True)])
def test_lora_products_match_float64(use_kernel, n, inp, out, r, dropout):
    """Forward and backward of y = x Wᵀ + s (xd Aᵀ) Bᵀ (the LoRA branch only), both paths."""
    rng = np.random.default_rng(n + r)
    f = np.float32
    x = rng.standard_normal((n, inp)).astype(f)
    mask = (rng.random((n, inp)) > 0.3).astype(f) / f(0.7) if dropout else None
    xd = x if mask is None else x * mask
    A = rng.standard_normal((r, inp)).astype(f)
    B = rng.standard_normal((out, r)).astype(f)
    dy = rng.standard_normal((n, out)).astype(f)
    s = 2.0 / r
    lp = LoraProducts(use_kernel, threads=2)
    u = np.empty((n, r), f)
    y = rng.standard_normal((n, out)).astype(f)
    y0 = y.copy()
    lp.forward(xd, A, B, s, u, y)
    gA = np.ones((r, inp), f)
    gB = np.ones((out, r), f)
    dx = rng.standard_normal((n, inp)).astype(f)
    dx0 = dx.copy()
    lp.backward(xd, dy, u, A, B, s, gA, gB, dx, mask)

    d = np.float64
    u64 = s * (xd.astype(d) @ A.T.astype(d))
    du64 = s * (dy.astype(d) @ B.astype(d))
    m64 = 1.0 if mask is None else mask.astype(d)
    for got, ref in ((u, u64), (y, y0 + u64 @ B.T.astype(d)), (gB, 1.0 + dy.T.astype(d) @ u64),
                     (gA, 1.0 + du64.T @ xd.astype(d)), (dx, dx0 + (du64 @ A.astype(d)) * m64)):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-4 * (1.0 + np.abs(ref).max()))
