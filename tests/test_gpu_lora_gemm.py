"""The rank-r LoRA products of the GPU device (gpu_device.py linear_forward/linear_backward)
through gemm_gpu against float64 numpy:
  u  = scale · x Aᵀ      [N, r]   (K = in)
  dB += dyᵀ u            [out, r] (K = N)
  du = scale · dy B      [N, r]   (K = out)
  dA += duᵀ x            [r, in]  (K = N)
A [r, in] and B [out, r] sit at offsets in a flat parameter buffer, dA and dB at offsets in a
flat gradient buffer, as in the engine.  A side of C <= 64 takes small_gemm.wgsl's `skinny`
(one dispatch) up to gemm._SKINNY_MAX_ELEMS elements of the big operand and rank_gemm.wgsl
above it; forced tiles / split take `gemm` with split K and its summing pass.

Tolerance of the shape grid: a float32 sum's error scales with the sum of |terms|, so each
element's error is measured against alpha (|op(A)| @ |op(B)|) + |C0| of that element."""
import numpy as np
import pytest

from gpu_support import rel_err

pytestmark = pytest.mark.gpu


def _operands(seed, N, inn, out, r):
    """Random x [N, in], dy [N, out], A [r, in], B [out, r] and a zero gradient buffer."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((N, inn)).astype(np.float32)
    dy = g.standard_normal((N, out)).astype(np.float32)
    A = g.standard_normal((r, inn)).astype(np.float32)
    B = g.standard_normal((out, r)).astype(np.float32)
    return x, dy, A, B, np.zeros(r * inn + out * r, np.float32)


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
    x, dy, A, B, _ = _operands(N + inn + out + r, N, inn, out, r)
    g = np.random.default_rng(N * inn)
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


# (product, tokens, r, in/out): the four products at awkward sizes (ones, primes, non-multiples
# of the 4 x 4 micro-tile and of the 64-column tile, K from 1 to 8209 either way); the engine's
# operand layouts, alpha, accumulate and unaligned offsets
_SHAPES = [("u", 1, 16, 1000), ("u", 2, 3, 131), ("u", 61, 64, 5), ("u", 257, 17, 64), ("u", 1031, 1, 131),
           ("dB", 1, 3, 1000), ("dB", 7, 16, 1), ("dB", 257, 64, 131), ("dB", 1031, 17, 5),
           ("du", 7, 17, 1000), ("du", 1031, 3, 64), ("du", 61, 1, 1),
           ("dA", 2, 64, 64), ("dA", 61, 17, 1000), ("dA", 257, 1, 5), ("dA", 1031, 16, 131),
           ("dA", 8209, 5, 37),   # K = 8209: skinny's longest lanes (257 k each); cols split 4 ways
           ("du", 61, 16, 8209)]  # K = 8209: rows' 65 K chunks, the last one 17 k


def _problem(kind, n_tok, r, dim, rng):
    """gemm_gpu's arguments (M, N, K, trans_a, trans_b, alpha, accumulate) and the stored A and
    B of one product; dim is in (u, dA) or out (dB, du)."""
    big = rng.standard_normal((n_tok, dim)).astype(np.float32)     # x or dy
    small = rng.standard_normal((n_tok, r)).astype(np.float32)     # u or du
    w = rng.standard_normal((r, dim) if kind == "u" else (dim, r)).astype(np.float32)  # A or B
    return {"u": ((n_tok, r, dim, False, True, 0.75, False), big, w),
            "dB": ((dim, r, n_tok, True, False, 1.0, True), big, small),
            "du": ((n_tok, r, dim, False, False, 0.75, False), big, w),
            "dA": ((r, dim, n_tok, True, False, 1.0, True), small, big)}[kind]


@pytest.mark.parametrize("offs", [(3, 5, 7), (0, 4, 8)])
@pytest.mark.parametrize("path", ["skinny", "rank"])
@pytest.mark.parametrize("kind,n_tok,r,dim", _SHAPES)
def test_rank_r_products_match_float64(ctx, monkeypatch, path, kind, n_tok, r, dim, offs):
    """Both paths of the rank-r products: `skinny` (small ones) and rank_gemm.wgsl (the large
    ones: here every size, with the threshold at 0); offsets that are multiples of 4 let the
    kernels read the operands whose rows run in whole vec4s as vec4s."""
    from qlora_ext.gpu.bindings import gemm as G
    from qlora_ext.gpu.bindings.gemm import gemm_gpu

    if path == "rank":
        monkeypatch.setattr(G, "_SKINNY_MAX_ELEMS", 0)

    rng = np.random.default_rng(n_tok * 7 + r * 3 + dim)
    (M, N, K, ta, tb, alpha, acc), A, B = _problem(kind, n_tok, r, dim, rng)
    a_off, b_off, c_off = offs
    c0 = rng.standard_normal(c_off + M * N + 2).astype(np.float32)
    ag = ctx.upload(np.concatenate([np.ones(a_off, np.float32), A.ravel()]))
    bg = ctx.upload(np.concatenate([np.ones(b_off, np.float32), B.ravel()]))
    cg = ctx.upload(c0)
    gemm_gpu(ctx, ag, bg, cg, M, N, K, trans_a=ta, trans_b=tb, alpha=alpha, accumulate=acc,
             a_off=a_off, b_off=b_off, c_off=c_off)
    got = ctx.to_numpy(cg)
    opa = (A.T if ta else A).astype(np.float64)
    opb = (B.T if tb else B).astype(np.float64)
    before = c0[c_off:c_off + M * N].reshape(M, N).astype(np.float64)
    ref = alpha * opa @ opb + (before if acc else 0.0)
    bound = alpha * np.abs(opa) @ np.abs(opb) + (np.abs(before) if acc else 0.0)
    err = np.abs(got[c_off:c_off + M * N].reshape(M, N) - ref) / bound
    # fp32 sums of up to 8209 terms in lanes and the lanes' sums in fixed runs (skinny, rows),
    # or in warps' and K splits' sequential sums and their sequential totals (cols)
    assert err.max() <= 1e-6, err.max()
    assert np.array_equal(got[:c_off], c0[:c_off]) and np.array_equal(got[c_off + M * N:], c0[c_off + M * N:])


@pytest.mark.parametrize("r,row_stable", [(16, False), (3, False), (80, True)])
def test_skinny_rows_do_not_depend_on_the_row_count(ctx, r, row_stable):
    """u = s · x Aᵀ of a token row has the same bits whatever rows share the call (the split
    placement's lanes rely on it), and a run repeated gives the same bits.  r 80 takes the
    skinny kernel only with row_stable, and with 64 rows or fewer it runs as C transposed."""
    from qlora_ext.gpu.bindings.gemm import gemm_gpu

    rng = np.random.default_rng(r)
    inn = 1000
    x = rng.standard_normal((1031, inn)).astype(np.float32)
    A = rng.standard_normal((r, inn)).astype(np.float32)
    xg, ag = ctx.upload(x), ctx.upload(A)

    def u(rows, first=0):
        out = ctx.empty((rows, r))
        gemm_gpu(ctx, xg, ag, out, rows, r, inn, trans_b=True, alpha=0.5, a_off=first * inn, row_stable=row_stable)
        return ctx.to_numpy(out).view(np.uint32)

    full = u(1031)
    assert np.array_equal(full, u(1031))
    for rows, first in ((1, 0), (2, 500), (7, 3), (61, 900), (257, 11)):
        assert np.array_equal(u(rows, first), full[first:first + rows]), (rows, first)
    ref = 0.5 * x.astype(np.float64) @ A.T.astype(np.float64)
    assert rel_err(full.view(np.float32), ref) <= 2e-6


def test_lora_products_one_dispatch_each(ctx, monkeypatch):
    """The four rank-r products record one dispatch each (no split-K summing pass) up to
    _SKINNY_MAX_ELEMS elements of their big operand; above it rank_gemm.wgsl's `rows` (u, du)
    and `cols` (dB, dA, K split with a summing pass where its grid is small); the layout
    rank_gemm lacks (both operands transposed) and a shape with both sides of C over 64 (the
    LM head's dW) take `gemm`, K split where the grid is small."""
    from qlora_ext.gpu.bindings import gemm as G
    from qlora_ext.gpu.bindings.gemm import gemm_gpu

    entries = []
    real = ctx.dispatch
    monkeypatch.setattr(ctx, "dispatch", lambda pipe, *a, **k: (entries.append(pipe[2]), real(pipe, *a, **k)))
    N, inn, out, r = 1031, 300, 270, 16
    x, dy, A, B, g0 = _operands(1, N, inn, out, r)
    _products(ctx, x, dy, A, B, 0.5, g0, 0, r * inn, 0, r * inn)
    assert entries == ["small_gemm.skinny"] * 4
    entries.clear()
    with monkeypatch.context() as m:
        m.setattr(G, "_SKINNY_MAX_ELEMS", N * min(inn, out) - 1)   # every product is over it
        _products(ctx, x, dy, A, B, 0.5, g0, 0, r * inn, 0, r * inn)
        assert entries == ["rank_gemm.rows", "rank_gemm.cols", "small_gemm.reduce_splits",
                           "rank_gemm.rows", "rank_gemm.cols", "small_gemm.reduce_splits"]
        entries.clear()
        # C[in, r] = op(A) op(B) with A = x stored [N, in] and B stored [r, N]: both transposed
        got = ctx.empty((inn, r))
        gemm_gpu(ctx, ctx.upload(x), ctx.upload(np.ascontiguousarray(x[:, :r].T)), got, inn, r, N,
                 trans_a=True, trans_b=True)
        assert entries[0] == "small_gemm.gemm"
        ref = x.astype(np.float64).T @ x[:, :r].astype(np.float64)
        assert rel_err(ctx.to_numpy(got), ref) <= 2e-6
    entries.clear()
    gemm_gpu(ctx, ctx.upload(dy), ctx.upload(x), ctx.empty((out, inn)), out, inn, N, trans_a=True)
    assert entries == ["small_gemm.gemm", "small_gemm.reduce_splits"]
    with pytest.raises(ValueError, match="row_stable"):
        gemm_gpu(ctx, ctx.upload(x), ctx.upload(A), ctx.empty((N, r)), N, r, inn, trans_b=True, row_stable=True,
                 tiles=(64, 64, 16))


def test_rank_rows_do_not_depend_on_the_row_count(ctx, monkeypatch):
    """rank_gemm.wgsl's `rows` (u = s · x Aᵀ over many tokens): a token row's bits do not depend
    on which rows share the call, and a run repeated gives the same bits."""
    from qlora_ext.gpu.bindings import gemm as G
    from qlora_ext.gpu.bindings.gemm import gemm_gpu

    monkeypatch.setattr(G, "_SKINNY_MAX_ELEMS", 0)
    rng = np.random.default_rng(5)
    inn, r = 1000, 16
    x = rng.standard_normal((1031, inn)).astype(np.float32)
    A = rng.standard_normal((r, inn)).astype(np.float32)
    xg, ag = ctx.upload(x), ctx.upload(A)
    entries = []
    real = ctx.dispatch
    monkeypatch.setattr(ctx, "dispatch", lambda pipe, *a, **k: (entries.append(pipe[2]), real(pipe, *a, **k)))

    def u(rows, first=0):
        out = ctx.empty((rows, r))
        gemm_gpu(ctx, xg, ag, out, rows, r, inn, trans_b=True, alpha=0.5, a_off=first * inn)
        return ctx.to_numpy(out).view(np.uint32)

    full = u(1031)
    assert np.array_equal(full, u(1031))
    for rows, first in ((65, 0), (97, 500), (257, 11), (700, 331)):
        assert np.array_equal(u(rows, first), full[first:first + rows]), (rows, first)
    assert set(entries) == {"rank_gemm.rows"}
    ref = 0.5 * x.astype(np.float64) @ A.T.astype(np.float64)
    assert rel_err(full.view(np.float32), ref) <= 2e-6


@pytest.mark.parametrize("kw", [dict(tiles=(64, 64, 16), split=(256, 256)), dict(tiles=(128, 16, 16), split=(1024, 16)),
                                dict(tiles=(16, 128, 8), split=(64, 64)), dict(tiles=(256, 4, 8), split=(4, 512)),
                                dict(skinny=True)])
def test_lora_products_any_tiles_deterministic(ctx, kw):
    """Every `gemm` tile / split setting the benchmark sweeps, and `skinny`, give the
    float64 result, and the same bits twice (split K and the K slices are summed in a fixed
    order: resume is bit-exact)."""
    N, inn, out, r = 263, 45, 38, 16
    x, dy, A, B, g0 = _operands(7, N, inn, out, r)
    first = _products(ctx, x, dy, A, B, 0.5, g0, 0, r * inn, 0, r * inn, **kw)
    again = _products(ctx, x, dy, A, B, 0.5, g0, 0, r * inn, 0, r * inn, **kw)
    for f, s in zip(first, again):
        assert np.array_equal(f, s)
    u_ref = 0.5 * x.astype(np.float64) @ A.T.astype(np.float64)
    du_ref = 0.5 * dy.astype(np.float64) @ B.astype(np.float64)
    assert rel_err(first[0], u_ref) <= 2e-6 and rel_err(first[1], du_ref) <= 2e-6
    assert rel_err(first[2][:r * inn].reshape(r, inn), du_ref.T @ x) <= 2e-6
    assert rel_err(first[2][r * inn:].reshape(out, r), dy.astype(np.float64).T @ u_ref) <= 2e-6



def test_rank_r_tiles_fit_the_kernel(ctx):
    """tiles_for's rank-r tiles pass check_tiles at every rank (TK at most 2·min(TM, TN): a
    deeper slice than the threads can stage once gave wrong products at rank 1)."""
    from qlora_ext.gpu.bindings.gemm import check_tiles, tiles_for

    for short in range(1, 65):
        for M, N in ((4096, short), (short, 4096)):
            tm, tn, tk = tiles_for(ctx, M, N)
            assert check_tiles(ctx, tm, tn, tk) == (tm, tn, tk)
            assert min(tm, tn) >= short


@pytest.mark.parametrize("M,N,K,ta,tb,entry", [(16, 300, 257, False, True, "rank_gemm.rows"),
                                               (5, 131, 1000, True, True, "rank_gemm.rows"),
                                               (16, 300, 257, True, False, "rank_gemm.cols"),
                                               (3, 77, 129, False, False, "small_gemm.gemm")])
def test_rank_products_with_a_short_m(ctx, monkeypatch, M, N, K, ta, tb, entry):
    """A short M (with N long) runs as C transposed: rank_gemm's `rows` or `cols` by the swapped
    operands' layout, stored transposed, or `gemm` for the layout rank_gemm lacks."""
    from qlora_ext.gpu.bindings import gemm as G
    from qlora_ext.gpu.bindings.gemm import gemm_gpu

    monkeypatch.setattr(G, "_SKINNY_MAX_ELEMS", 0)
    entries = []
    real = ctx.dispatch
    monkeypatch.setattr(ctx, "dispatch", lambda pipe, *a, **k: (entries.append(pipe[2]), real(pipe, *a, **k)))
    rng = np.random.default_rng(M * N + K)
    A = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    B = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    c = ctx.empty((M, N))
    gemm_gpu(ctx, ctx.upload(A), ctx.upload(B), c, M, N, K, trans_a=ta, trans_b=tb, alpha=0.5)
    assert entries[0] == entry
    ref = 0.5 * (A.T if ta else A).astype(np.float64) @ (B.T if tb else B).astype(np.float64)
    assert rel_err(ctx.to_numpy(c), ref) <= 2e-6
