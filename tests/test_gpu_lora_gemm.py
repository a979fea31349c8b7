"""The rank-r LoRA products of the GPU device (engine.py _linear_forward/_linear_backward)
through small_gemm with its skinny tiles and split K, against float64 numpy:
  u  = scale · x Aᵀ      [N, r]   (K = in)
  dB += dyᵀ u            [out, r] (K = N)
  du = scale · dy B      [N, r]   (K = out)
  dA += duᵀ x            [r, in]  (K = N)
A [r, in] and B [out, r] sit at offsets in a flat parameter buffer, dA and dB at offsets in a
flat gradient buffer, as in the engine."""
import numpy as np
import pytest

from gpu_support import rel_err, gpu_context

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ctx():
    return gpu_context()


def _products(ctx, x, dy, A, B, scale, g0, a_off, b_off, ga_off, gb_off, **kw):
    from qlora_ext.gpu.bindings.gemm import gemm_gpu

    N, inn = x.shape
    out, r = B.shape
    params = np.zeros(max(a_off + r * inn, b_off + out * r) + 3, np.float32)
    params[a_off:a_off + r * inn] = A.ravel()
    params[b_off:b_off + out * r] = B.ravel()
    p, g = ctx.upload(params), ctx.upload(g0)
    xg, dyg = ctx.upload(x), ctx.upload(dy)
    u, du = ctx.empty((N, r)), ctx.empty((N, r))
    gemm_gpu(ctx, xg, p, u, N, r, inn, trans_b=True, alpha=scale, b_off=a_off, **kw)
    gemm_gpu(ctx, dyg, u, g, out, r, N, trans_a=True, accumulate=True, c_off=gb_off, **kw)
    gemm_gpu(ctx, dyg, p, du, N, r, out, alpha=scale, b_off=b_off, **kw)
    gemm_gpu(ctx, du, xg, g, r, inn, N, trans_a=True, accumulate=True, c_off=ga_off, **kw)
    return ctx.to_numpy(u), ctx.to_numpy(du), ctx.to_numpy(g)


@pytest.mark.parametrize("N,inn,out,r", [(131, 37, 53, 1), (257, 101, 67, 3), (131, 70, 263, 16),
                                         (67, 45, 29, 64), (1031, 37, 19, 16)])
def test_lora_products_match_float64(ctx, N, inn, out, r):
    g = np.random.default_rng(N + inn + out + r)
    x = g.standard_normal((N, inn)).astype(np.float32)
    dy = g.standard_normal((N, out)).astype(np.float32)
    A = g.standard_normal((r, inn)).astype(np.float32)
    B = g.standard_normal((out, r)).astype(np.float32)
    scale = 2.0 / r
    a_off, b_off = 5, 7 + r * inn          # unaligned element offsets
    ga_off, gb_off = 3, 3 + r * inn + 2
    g0 = g.standard_normal(gb_off + out * r + 1).astype(np.float32)
    u, du, grads = _products(ctx, x, dy, A, B, scale, g0, a_off, b_off, ga_off, gb_off)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    u_ref = scale * x64 @ A.astype(np.float64).T
    du_ref = scale * dy64 @ B.astype(np.float64)
    # sums of up to 1031 products of unit normals (and u of such sums): relative to the largest
    # output; fp32 rounding measured below 1e-6 here
    assert rel_err(u, u_ref) <= 2e-6
    assert rel_err(du, du_ref) <= 2e-6
    dA = grads[ga_off:ga_off + r * inn].reshape(r, inn).astype(np.float64) - g0[ga_off:ga_off + r * inn].reshape(r, inn)
    dB = grads[gb_off:gb_off + out * r].reshape(out, r).astype(np.float64) - g0[gb_off:gb_off + out * r].reshape(out, r)
    # the grads were added to g0: compare the increments on the scale of the terms
    assert rel_err(dA, du_ref.T @ x64, scale=np.abs(du_ref.T @ x64).max() + np.abs(g0).max()) <= 4e-6
    assert rel_err(dB, dy64.T @ u_ref, scale=np.abs(dy64.T @ u_ref).max() + np.abs(g0).max()) <= 4e-6
    untouched = np.ones(g0.size, bool)
    untouched[ga_off:ga_off + r * inn] = untouched[gb_off:gb_off + out * r] = False
    assert np.array_equal(grads[untouched], g0[untouched])


def test_skinny_tiles_follow_the_rank(ctx):
    """The short side of C = r gets a tile side of its own (not the general 64 x 64)."""
    from qlora_ext.gpu.bindings.gemm import _GENERAL, tiles_for

    assert tiles_for(ctx, 4096, 16)[1] == 16 and tiles_for(ctx, 16, 3072)[0] == 16
    assert tiles_for(ctx, 4096, 3)[1] == 4 and tiles_for(ctx, 64, 2048)[0] == 64
    assert tiles_for(ctx, 4096, 2048) == _GENERAL and tiles_for(ctx, 40, 50) == _GENERAL


@pytest.mark.parametrize("tiles,split", [((64, 64, 16), (256, 256)), ((128, 16, 16), (1024, 16)),
                                         ((16, 128, 8), (64, 64)), ((256, 4, 16), (4, 512))])
def test_lora_products_any_tiles_deterministic(ctx, tiles, split):
    """Every tile / split setting the sweep tries gives the float64 result, and the same bits
    twice (split K reduces its partials in a fixed order: resume is bit-exact)."""
    N, inn, out, r = 263, 45, 38, 16
    g = np.random.default_rng(7)
    x = g.standard_normal((N, inn)).astype(np.float32)
    dy = g.standard_normal((N, out)).astype(np.float32)
    A = g.standard_normal((r, inn)).astype(np.float32)
    B = g.standard_normal((out, r)).astype(np.float32)
    g0 = np.zeros(r * inn + out * r, np.float32)
    kw = dict(tiles=tiles, split=split)
    first = _products(ctx, x, dy, A, B, 0.5, g0, 0, r * inn, 0, r * inn, **kw)
    again = _products(ctx, x, dy, A, B, 0.5, g0, 0, r * inn, 0, r * inn, **kw)
    for f, s in zip(first, again):
        assert np.array_equal(f, s)
    u_ref = 0.5 * x.astype(np.float64) @ A.T.astype(np.float64)
    du_ref = 0.5 * dy.astype(np.float64) @ B.astype(np.float64)
    assert rel_err(first[0], u_ref) <= 2e-6 and rel_err(first[1], du_ref) <= 2e-6
    assert rel_err(first[2][:r * inn].reshape(r, inn), du_ref.T @ x) <= 2e-6
    assert rel_err(first[2][r * inn:].reshape(out, r), dy.astype(np.float64).T @ u_ref) <= 2e-6

