"""GPU layer kernels (RMSNorm, RoPE, SwiGLU, embedding gather, residual add) against
float64 numpy references on awkward sizes (1, primes, non-multiples of the workgroup size)."""
import numpy as np
import pytest

from gpu_support import rel_err

pytestmark = pytest.mark.gpu


def _rng(seed):
    return np.random.default_rng(seed)


# ---- RMSNorm --------------------------------------------------------------------------------

def _rms_ref(x, w, eps):
    x = x.astype(np.float64)
    r = 1.0 / np.sqrt((x * x).mean(axis=1) + eps)
    return w.astype(np.float64) * x * r[:, None], r


def _rms_bwd_ref(x, w, dy, eps):
    x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
    C = x.shape[1]
    r = 1.0 / np.sqrt((x * x).mean(axis=1) + eps)
    s = (w * dy * x).sum(axis=1)
    dx = r[:, None] * w * dy - x * (r ** 3 * s / C)[:, None]
    dw = (dy * x * r[:, None]).sum(axis=0)
    return dx, dw


@pytest.mark.parametrize("N,C", [(1, 1), (1, 7), (5, 13), (3, 129), (17, 300), (2, 1031), (1, 4), (37, 128),
                                 (9, 1024), (3, 2052), (2, 8196)])
def test_rmsnorm_forward_backward(ctx, N, C):
    from gpu_numpy_forms import rmsnorm_backward, rmsnorm_forward

    g = _rng(N * 1000 + C)
    x = g.standard_normal((N, C)).astype(np.float32) * 3
    w = g.standard_normal(C).astype(np.float32)
    dy = g.standard_normal((N, C)).astype(np.float32)
    eps = 1e-6
    y, rstd = rmsnorm_forward(x, w, eps, ctx=ctx)
    y_ref, r_ref = _rms_ref(x, w, eps)
    assert rel_err(y, y_ref) <= 1e-5
    assert rel_err(rstd, r_ref) <= 1e-5
    dx, dw = rmsnorm_backward(x, w, rstd, dy, weight_grad=True, ctx=ctx)
    dx_ref, dw_ref = _rms_bwd_ref(x, w, dy, eps)
    # dx is a difference of two terms that cancel (exactly, up to eps, when C = 1): the first
    # term r * w * dy sets the scale.
    term = (r_ref[:, None] * w * dy.astype(np.float64))
    assert rel_err(dx, dx_ref, scale=max(np.abs(dx_ref).max(), np.abs(term).max())) <= 1e-5
    assert rel_err(dw, dw_ref) <= 1e-5


def test_rmsnorm_per_head_qk_norm(ctx):
    """Qwen3's q/k norm: the same kernel over [B*T*H, D] with one weight per head dim."""
    from gpu_numpy_forms import rmsnorm_forward

    g = _rng(3)
    B, T, H, D = 2, 5, 3, 10
    q = g.standard_normal((B, T, H, D)).astype(np.float32)
    w = g.standard_normal(D).astype(np.float32)
    y, _ = rmsnorm_forward(q.reshape(-1, D), w, 1e-6, ctx=ctx)
    y_ref, _ = _rms_ref(q.reshape(-1, D), w, 1e-6)
    assert rel_err(y.reshape(B, T, H, D), y_ref.reshape(B, T, H, D)) <= 1e-5


def test_rmsnorm_backward_accumulates(ctx):
    from qlora_ext.gpu.bindings.layer_ops import rmsnorm_backward_gpu, rmsnorm_forward_gpu

    g = _rng(4)
    x = g.standard_normal((6, 11)).astype(np.float32)
    w = g.standard_normal(11).astype(np.float32)
    dy = g.standard_normal((6, 11)).astype(np.float32)
    prior = g.standard_normal((6, 11)).astype(np.float32)
    gx, gw = ctx.upload(x), ctx.upload(w)
    _, rstd = rmsnorm_forward_gpu(ctx, gx, gw, 1e-5)
    dx = ctx.upload(prior)
    rmsnorm_backward_gpu(ctx, gx, gw, rstd, ctx.upload(dy), dx=dx, accumulate=True)
    dx_ref, _ = _rms_bwd_ref(x, w, dy, 1e-5)
    assert rel_err(ctx.to_numpy(dx), prior + dx_ref) <= 1e-5


def test_rmsnorm_bad_input(ctx):
    from gpu_numpy_forms import rmsnorm_forward

    with pytest.raises(ValueError, match="weight"):
        rmsnorm_forward(np.ones((2, 3), np.float32), np.ones(4, np.float32), 1e-6, ctx=ctx)
    with pytest.raises(ValueError, match="float32"):
        rmsnorm_forward(np.ones((2, 3)), np.ones(3, np.float32), 1e-6, ctx=ctx)
    with pytest.raises(ValueError, match="eps"):
        rmsnorm_forward(np.ones((2, 3), np.float32), np.ones(3, np.float32), float("nan"), ctx=ctx)


# ---- RoPE -----------------------------------------------------------------------------------

def _rope_ref(x, pos, tables, sign):
    x = x.astype(np.float64)
    half = x.shape[-1] // 2
    c = tables.cos.astype(np.float64)[pos][:, :, None, :]  # [B, T, 1, half]
    s = sign * tables.sin.astype(np.float64)[pos][:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


@pytest.mark.parametrize("B,T,H,D", [(1, 1, 1, 2), (2, 7, 3, 10), (1, 13, 2, 66), (3, 5, 5, 128), (1, 3, 1, 8),
                                     (2, 9, 3, 24), (1, 5, 2, 256)])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16}])
def test_rope_forward_backward(ctx, B, T, H, D, scaling):
    from qlora_ext.cpu.kernels import rope_tables
    from gpu_numpy_forms import rope_backward, rope_forward

    g = _rng(B * 100 + T * 10 + D)
    tables = rope_tables(D, 64, 10000.0, scaling)
    x = g.standard_normal((B, T, H, D)).astype(np.float32)
    pos = g.integers(0, 64, size=(B, T))
    y = rope_forward(x, pos, tables, ctx=ctx)
    assert rel_err(y, _rope_ref(x, pos, tables, 1)) <= 1e-5
    dx = rope_backward(x, pos, tables, ctx=ctx)
    assert rel_err(dx, _rope_ref(x, pos, tables, -1)) <= 1e-5
    # Backward undoes forward (the rotation is orthogonal).
    assert rel_err(rope_backward(y, pos, tables, ctx=ctx), x) <= 1e-5


def test_rope_positions_1d_and_checks(ctx):
    from qlora_ext.cpu.kernels import rope_tables
    from gpu_numpy_forms import rope_forward

    tables = rope_tables(8, 10, 1e6)
    x = _rng(5).standard_normal((2, 4, 3, 8)).astype(np.float32)
    pos = np.arange(4)
    y = rope_forward(x, pos, tables, ctx=ctx)
    assert rel_err(y, _rope_ref(x, np.broadcast_to(pos, (2, 4)), tables, 1)) <= 1e-5
    with pytest.raises(ValueError, match="positions"):
        rope_forward(x, np.array([0, 1, 2, 10]), tables, ctx=ctx)
    with pytest.raises(ValueError, match="head_dim"):
        rope_forward(np.zeros((1, 1, 1, 6), np.float32), [0], tables, ctx=ctx)


# ---- SwiGLU ---------------------------------------------------------------------------------

# widths not a multiple of 4 take a column a thread, the others (4, 132) a vec4 a thread
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (11, 65), (5, 131), (1, 4), (7, 132)])
def test_swiglu_forward_backward(ctx, shape):
    from gpu_numpy_forms import swiglu_backward, swiglu_forward

    g_ = _rng(shape[0] * 7 + shape[1])
    gate = (g_.standard_normal(shape) * 4).astype(np.float32)
    gate.flat[0] = -100.0  # exp overflow path: sigmoid -> 0
    up = g_.standard_normal(shape).astype(np.float32)
    dh = g_.standard_normal(shape).astype(np.float32)
    g64, u64, d64 = (a.astype(np.float64) for a in (gate, up, dh))
    s = 1.0 / (1.0 + np.exp(-g64))
    h = swiglu_forward(gate, up, ctx=ctx)
    assert rel_err(h, g64 * s * u64) <= 1e-5
    dg, du = swiglu_backward(gate, up, dh, ctx=ctx)
    assert rel_err(dg, d64 * u64 * s * (1 + g64 * (1 - s))) <= 1e-5
    assert rel_err(du, d64 * g64 * s) <= 1e-5
    assert np.all(np.isfinite(dg))


@pytest.mark.parametrize("I", [8, 36])
def test_swiglu_vec4_and_scalar_paths_agree_bitwise(ctx, I):
    """The gate and up halves of one gu [M, 2I] buffer, dg and du into the halves of one dgu
    (the split placement's layout).  Starting at element 0 the kernel takes vec4s; the same
    values one column further in (row stride 2I + 1) take a column a thread; both paths give
    the same bits."""
    from qlora_ext.gpu import kernels
    from qlora_ext.gpu.kernels import Operand

    M = 5
    g_ = _rng(I)
    gu = (g_.standard_normal((M, 2 * I)) * 3).astype(np.float32)
    dh = g_.standard_normal((M, I)).astype(np.float32)
    got = []
    for off in (0, 1):
        ld = 2 * I + off
        buf = ctx.upload(np.concatenate([np.zeros((M, off), np.float32), gu], axis=1))
        h, dgu = ctx.zeros((M, ld)), ctx.zeros((M, ld))
        g_op, u_op = Operand(buf, off, ld), Operand(buf, off + I, ld)
        kernels.swiglu_forward(ctx, M, I, g_op, u_op, Operand(h, off, ld))
        kernels.swiglu_backward(ctx, M, I, g_op, u_op, ctx.upload(dh), Operand(dgu, off, ld),
                                Operand(dgu, off + I, ld))
        got.append((ctx.to_numpy(h)[:, off:], ctx.to_numpy(dgu)[:, off:]))
    g64, u64, d64 = gu[:, :I].astype(np.float64), gu[:, I:].astype(np.float64), dh.astype(np.float64)
    s = 1.0 / (1.0 + np.exp(-g64))
    assert rel_err(got[0][0][:, :I], g64 * s * u64) <= 1e-5
    assert rel_err(got[0][1][:, :I], d64 * u64 * s * (1 + g64 * (1 - s))) <= 1e-5
    assert rel_err(got[0][1][:, I:], d64 * g64 * s) <= 1e-5
    np.testing.assert_array_equal(got[0][0][:, :I], got[1][0][:, :I])
    np.testing.assert_array_equal(got[0][1], got[1][1])


# ---- embedding and residual -----------------------------------------------------------------

@pytest.mark.parametrize("N,V,C", [(1, 1, 1), (7, 11, 13), (29, 5, 67)])
def test_embedding_gather(ctx, N, V, C):
    from gpu_numpy_forms import embedding_gather

    g = _rng(N + V + C)
    table = g.standard_normal((V, C)).astype(np.float32)
    ids = g.integers(0, V, size=(1, N))
    out = embedding_gather(ids, table, ctx=ctx)
    np.testing.assert_array_equal(out, table[ids])  # a gather is exact
    with pytest.raises(ValueError, match="ids"):
        embedding_gather(np.array([V]), table, ctx=ctx)


@pytest.mark.parametrize("n", [1, 63, 1031])
def test_residual_add(ctx, n):
    from gpu_numpy_forms import residual_add

    g = _rng(n)
    x = g.standard_normal(n).astype(np.float32)
    r = g.standard_normal(n).astype(np.float32)
    assert rel_err(residual_add(x, r, ctx=ctx), x.astype(np.float64) + r) <= 1e-6
    assert rel_err(residual_add(x, r, alpha=-0.5, ctx=ctx), x - 0.5 * r.astype(np.float64)) <= 1e-6


def test_residual_add_2d_grid(ctx):
    """More than 65,535 workgroups: the linear id spans a 2-D grid."""
    from gpu_numpy_forms import residual_add
    from qlora_ext.gpu.bindings.layer_ops import _EW_WG

    n = 4 * _EW_WG * 65535 + 77   # a thread per vec4
    x = np.arange(n, dtype=np.float32) % 1000
    r = np.ones(n, np.float32)
    np.testing.assert_array_equal(residual_add(x, r, ctx=ctx), x + 1)


@pytest.mark.parametrize("n", [1, 6, 1031])
def test_residual_add_stops_at_n(ctx, n):
    """dst at the front of a longer buffer: the values past n (inside the last vec4 and after
    it) stay as they were."""
    from qlora_ext.gpu.bindings.layer_ops import add_gpu

    big = ctx.upload(np.full(n + 9, 5.0, np.float32))
    add_gpu(ctx, big.view((n,)), ctx.upload(np.ones(n, np.float32)))
    got = ctx.to_numpy(big)
    np.testing.assert_array_equal(got[:n], 6.0)
    np.testing.assert_array_equal(got[n:], 5.0)


@pytest.mark.parametrize("N,C", [(1, 1), (5, 7), (13, 67)])
def test_bias_add(ctx, N, C):
    from gpu_numpy_forms import bias_add

    g = _rng(N * C)
    y = g.standard_normal((N, C)).astype(np.float32)
    b = g.standard_normal(C).astype(np.float32)
    assert rel_err(bias_add(y, b, ctx=ctx), y.astype(np.float64) + b) <= 1e-6
    with pytest.raises(ValueError, match="bias"):
        bias_add(y, np.ones(C + 1, np.float32), ctx=ctx)
