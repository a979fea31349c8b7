"""Causal GQA attention forward/backward against a float64 numpy reference on every SIMD
path (T = 1, primes, tile-crossing sizes, 4097, every usual head_dim, padding masks); the
reference's gradient checked by finite differences; a 16k-token sequence; torch SDPA interop;
bad input."""
import numpy as np
import pytest

from qlora_ext.cpu import kernels as K

from gpu_support import attention_inputs, rel_err

RTOL = 1e-5


def ref_attention(q, k, v, mask=None, dout=None, chunk=256):
    """float64 reference, query rows in chunks (never more than chunk x T scores at once).
    Returns out, lse and, given dout, dq, dk, dv."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    scale = 1.0 / np.sqrt(D)
    out = np.zeros_like(q)
    lse = np.full((B, Hq, T), -np.inf)
    grads = dout is not None
    if grads:
        dout = dout.astype(np.float64)
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    keys = np.arange(T)
    for b in range(B):
        real = np.ones(T, bool) if mask is None else mask[b].astype(bool)
        for h in range(Hq):
            Kh, Vh = k[b, :, h // g], v[b, :, h // g]
            for i0 in range(0, T, chunk):
                i1 = min(T, i0 + chunk)
                Q = q[b, i0:i1, h]
                allowed = (keys[None, :] <= np.arange(i0, i1)[:, None]) & real[None, :]
                s = np.where(allowed, Q @ Kh.T * scale, -np.inf)
                mx = s.max(1, keepdims=True)
                has = np.isfinite(mx)
                p = np.where(allowed, np.exp(s - np.where(has, mx, 0.0)), 0.0)
                l = p.sum(1, keepdims=True)
                p = p / np.where(has, l, 1.0)
                o = p @ Vh
                out[b, i0:i1, h] = o
                lse[b, h, i0:i1] = np.where(has, mx + np.log(np.where(has, l, 1.0)), -np.inf)[:, 0]
                if grads:
                    dO = dout[b, i0:i1, h]
                    dv[b, :, h // g] += p.T @ dO
                    ds = p * (dO @ Vh.T - (dO * o).sum(1, keepdims=True)) * scale
                    dq[b, i0:i1, h] = ds @ Kh
                    dk[b, :, h // g] += ds.T @ Q
    return (out, lse, dq, dk, dv) if grads else (out, lse)


def check(q, k, v, do, mask=None, threads=2, rtol=RTOL):
    out, lse = K.attention_forward(q, k, v, mask=mask, threads=threads)
    dq, dk, dv = K.attention_backward(q, k, v, out, lse, do, mask=mask, threads=threads)
    r_out, r_lse, r_dq, r_dk, r_dv = ref_attention(q, k, v, mask, do)
    assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert rel_err(out, r_out) <= rtol
    assert np.array_equal(np.isneginf(lse), np.isneginf(r_lse))
    fin = np.isfinite(r_lse)
    assert np.abs(lse[fin] - r_lse[fin]).max() <= rtol * max(1.0, np.abs(r_lse[fin]).max())
    # gradients: error relative to the largest value; dq and dk are pure cancellation when a
    # row sees one key (T = 1: they vanish), so there the floor is 1% of one term's size,
    # |dS K| <= |dO| |V| sqrt(D) |K|.
    D = q.shape[3]
    for got, want, other in ((dq, r_dq, k), (dk, r_dk, q), (dv, r_dv, None)):
        assert got.shape == want.shape
        floor = 0.0 if other is None else 1e-2 * np.abs(do).max() * np.abs(v).max() * np.abs(other).max() * np.sqrt(D)
        assert rel_err(got, want, max(np.abs(want).max(), floor)) <= rtol
    return out, lse, dq, dk, dv


SHAPES = [  # B, T, Hq, Hkv, D
    (1, 1, 1, 1, 2),
    (1, 1, 4, 2, 64),
    (2, 13, 4, 2, 32),
    (1, 67, 6, 2, 80),
    (1, 64, 2, 1, 96),
    (2, 131, 2, 2, 128),
    (1, 29, 4, 1, 256),
    (3, 7, 3, 3, 6),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D", SHAPES)
def test_attention_matches_reference(simd_level, B, T, Hq, Hkv, D):
    check(*attention_inputs(T * 7 + D, B, T, Hq, Hkv, D))


@pytest.mark.parametrize("kind", ["right", "left", "random"])
def test_attention_padding_mask(simd_level, kind):
    B, T, Hq, Hkv, D = 3, 71, 4, 2, 32
    q, k, v, do = attention_inputs(11, B, T, Hq, Hkv, D)
    lengths = np.array([71, 50, 3])
    idx = np.arange(T)[None, :]
    if kind == "right":
        mask = idx < lengths[:, None]
    elif kind == "left":
        mask = idx >= (T - lengths)[:, None]
    else:
        mask = np.random.default_rng(12).random((B, T)) > 0.3
    out, lse, *_ = check(q, k, v, do, mask=mask)
    if kind == "left":  # queries with only padding before them: zeros and lse = -inf
        assert np.all(out[1, : T - 50] == 0) and np.all(np.isneginf(lse[1, :, : T - 50]))
    assert np.isfinite(out).all()
    out8, _ = K.attention_forward(q, k, v, mask=mask.astype(np.uint8))
    np.testing.assert_array_equal(out, out8)


@pytest.fixture(scope="module")
def case_4097():
    args = attention_inputs(4097, 1, 4097, 2, 1, 32)
    return args, ref_attention(*args[:3], None, args[3], chunk=1024)


def test_attention_4097_every_path(simd_level, case_4097):
    """T = 4097: one past a tile boundary; small heads keep it cheap (reference computed once)."""
    (q, k, v, do), ref = case_4097
    out, lse = K.attention_forward(q, k, v)
    got = (out, lse) + K.attention_backward(q, k, v, out, lse, do)
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= RTOL


def test_attention_threads_agree():
    """Results do not depend on the thread count (deterministic training steps)."""
    q, k, v, do = attention_inputs(3, 2, 150, 4, 2, 64)
    o1, l1 = K.attention_forward(q, k, v, threads=1)
    o2, l2 = K.attention_forward(q, k, v, threads=2)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(l1, l2)
    g1 = K.attention_backward(q, k, v, o1, l1, do, threads=1)
    for threads in (2, 3, 2):  # dq takes key tiles' shares in a fixed order: bit for bit
        for a, b in zip(g1, K.attention_backward(q, k, v, o1, l1, do, threads=threads)):
            np.testing.assert_array_equal(a, b)
    # one kv head, more threads than cores: threads wait for each other's dq shares
    q, k, v, do = attention_inputs(4, 1, 1000, 2, 1, 32)
    o, lse = K.attention_forward(q, k, v, threads=1)
    g1 = K.attention_backward(q, k, v, o, lse, do, threads=1)
    for threads in (4, 8):
        for a, b in zip(g1, K.attention_backward(q, k, v, o, lse, do, threads=threads)):
            np.testing.assert_array_equal(a, b)


def test_reference_gradient_finite_differences():
    """The float64 reference's backward against central differences of its forward, so the
    reference the kernel is held to is itself right (GQA, mask and causality included)."""
    B, T, Hq, Hkv, D = 1, 5, 4, 2, 4
    rng = np.random.default_rng(5)
    q, k, v, do = (rng.standard_normal(s) for s in [(B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hq, D)])
    mask = np.array([[1, 1, 0, 1, 1]], bool)
    _, _, dq, dk, dv = ref_attention(q, k, v, mask, do)
    f = lambda q_, k_, v_: (ref_attention(q_, k_, v_, mask)[0] * do).sum()  # noqa: E731
    h = 1e-6
    for which, x, grad in (("q", q, dq), ("k", k, dk), ("v", v, dv)):
        for idx in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[idx] = h
            args_p = [q + e if which == "q" else q, k + e if which == "k" else k, v + e if which == "v" else v]
            args_m = [q - e if which == "q" else q, k - e if which == "k" else k, v - e if which == "v" else v]
            fd = (f(*args_p) - f(*args_m)) / (2 * h)
            assert abs(fd - grad[idx]) < 1e-6, (which, idx)
    # padding keys get no gradient, and the kernel agrees with the reference here too
    assert np.all(dk[0, 2] == 0) and np.all(dv[0, 2] == 0)
    check(*(a.astype(np.float32) for a in (q, k, v, do)), mask=mask)


def test_attention_16k_tokens():
    """A 16k-token sequence runs in O(T * D) memory; spot-check against float64: out, lse and
    dq of some query rows, dk and dv of the last keys (which only the last queries see)."""
    T, D = 16384, 16
    q, k, v, do = attention_inputs(16, 1, T, 2, 1, D)
    out, lse = K.attention_forward(q, k, v)
    dq, dk, dv = K.attention_backward(q, k, v, out, lse, do)
    rows = np.array([1, 4095, 9001, T - 1])
    K0, V0 = k[0, :, 0].astype(np.float64), v[0, :, 0].astype(np.float64)
    for r in rows:  # one query row needs only itself and the keys up to it
        for h in range(2):
            qr, dor = q[0, r, h].astype(np.float64), do[0, r, h].astype(np.float64)
            s = K0[: r + 1] @ qr / np.sqrt(D)
            lse_r = np.logaddexp.reduce(s)
            p = np.exp(s - lse_r)
            o = p @ V0[: r + 1]
            ds = p * (V0[: r + 1] @ dor - dor @ o) / np.sqrt(D)
            assert rel_err(out[0, r, h], o) <= RTOL
            assert abs(lse[0, h, r] - lse_r) <= RTOL * max(1.0, abs(lse_r))
            assert rel_err(dq[0, r, h], ds @ K0[: r + 1]) <= RTOL
    # dk/dv of the last 100 keys: those keys are attended only by the last 100 queries,
    # whose probabilities need their full rows (lse from the reference over all keys)
    tail = 100
    s = np.einsum("thd,sd->hts", q[0, T - tail:].astype(np.float64), k[0, :, 0].astype(np.float64)) / np.sqrt(D)
    s = np.where(np.arange(T)[None, None, :] <= np.arange(T - tail, T)[None, :, None], s, -np.inf)
    lse_t = np.logaddexp.reduce(s, axis=2)
    p = np.exp(s - lse_t[..., None])[:, :, T - tail:]  # only the last keys' columns
    dO = do[0, T - tail:].astype(np.float64)
    vv = v[0, T - tail:, 0].astype(np.float64)
    o_t = np.einsum("hts,sd->thd", np.exp(s - lse_t[..., None]), v[0, :, 0].astype(np.float64))
    dv_ref = np.einsum("hts,thd->sd", p, dO)
    dp = np.einsum("thd,sd->hts", dO, vv)
    di = np.einsum("thd,thd->ht", dO, o_t)
    ds = p * (dp - di[..., None]) / np.sqrt(D)
    dk_ref = np.einsum("hts,thd->sd", ds, q[0, T - tail:].astype(np.float64))
    assert rel_err(dv[0, T - tail:, 0], dv_ref) <= RTOL
    assert rel_err(dk[0, T - tail:, 0], dk_ref) <= RTOL


@pytest.mark.parametrize("B,T,Hq,Hkv,D", [(2, 37, 8, 2, 64), (1, 130, 4, 4, 128)])
def test_attention_matches_torch_sdpa(B, T, Hq, Hkv, D):
    torch = pytest.importorskip("torch")
    q, k, v, do = attention_inputs(21, B, T, Hq, Hkv, D)
    g = Hq // Hkv
    qt, kt, vt = (torch.from_numpy(a).double().transpose(1, 2).requires_grad_(True) for a in (q, k, v))
    ot = torch.nn.functional.scaled_dot_product_attention(
        qt, kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1), is_causal=True)
    ot.backward(torch.from_numpy(do).double().transpose(1, 2))
    out, lse = K.attention_forward(q, k, v)
    dq, dk, dv = K.attention_backward(q, k, v, out, lse, do)
    want = [x.transpose(1, 2).numpy() for x in (ot.detach(), qt.grad, kt.grad, vt.grad)]
    for got, ref in zip((out, dq, dk, dv), want):
        assert rel_err(got, ref) <= RTOL


def test_attention_bad_input():
    q, k, v, do = attention_inputs(0, 1, 8, 4, 2, 16)
    out, lse = K.attention_forward(q, k, v)
    with pytest.raises(ValueError, match="float32"):
        K.attention_forward(q.astype(np.float64), k, v)
    with pytest.raises(ValueError, match="contiguous"):
        K.attention_forward(np.asfortranarray(q), k, v)
    with pytest.raises(ValueError, match="multiple"):
        K.attention_forward(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
    with pytest.raises(ValueError, match="even"):
        K.attention_forward(q[..., :15].copy(), k[..., :15].copy(), v[..., :15].copy())
    with pytest.raises(ValueError, match="k:"):
        K.attention_forward(q, k[:, :7].copy(), v)
    with pytest.raises(ValueError, match="v:"):
        K.attention_forward(q, k, v[:, :, :1].copy())
    with pytest.raises(ValueError, match="dimensions"):
        K.attention_forward(q[0], k, v)
    with pytest.raises(ValueError, match="mask"):
        K.attention_forward(q, k, v, mask=np.ones((1, 7), bool))
    with pytest.raises(ValueError, match="mask"):
        K.attention_forward(q, k, v, mask=np.ones((1, 8), np.float32))
    with pytest.raises(ValueError, match="mask"):
        K.attention_forward(q, k, v, mask=np.full((1, 8), 2, np.uint8))
    with pytest.raises(ValueError, match="lse"):
        K.attention_backward(q, k, v, out, lse[:, :2].copy(), do)
    with pytest.raises(ValueError, match="dout"):
        K.attention_backward(q, k, v, out, lse, do[:, :4].copy())
    with pytest.raises(ValueError, match="threads"):
        K.attention_forward(q, k, v, threads=-1)
