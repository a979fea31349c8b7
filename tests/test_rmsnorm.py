"""RMSNorm forward/backward against a float64 numpy reference, on every SIMD path; finite
differences on tiny sizes; HF LlamaRMSNorm interop; bad input."""
import numpy as np
import pytest

from qlora_ext.cpu import kernels as K

RTOL = 1e-5


def ref_forward(x, w, eps):
    x, w = x.astype(np.float64), w.astype(np.float64)
    rstd = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return x * rstd * w, rstd[:, 0]


def ref_backward(x, w, dy, eps):
    x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
    C = x.shape[1]
    rstd = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    g = dy * w
    dx = rstd * g - x * rstd**3 * (g * x).sum(-1, keepdims=True) / C
    dw = (dy * x * rstd).sum(0)
    return dx, dw


def rel_err(a, ref, scale=None):
    """max abs error over the largest reference value (or a given scale of the terms that
    cancel in it: dx = rstd*g - x*k vanishes for C = 1)."""
    scale = np.abs(ref).max() if scale is None else scale
    return np.abs(a.astype(np.float64) - ref).max() / max(scale, 1e-30)


@pytest.mark.parametrize("N,C", [(1, 1), (3, 7), (17, 64), (5, 129), (64, 896), (2, 2048)])
def test_rmsnorm_matches_reference(simd_level, N, C):
    rng = np.random.default_rng(N * 1000 + C)
    x = (rng.standard_normal((N, C)) * 3).astype(np.float32)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    dy = rng.standard_normal((N, C)).astype(np.float32)
    eps = 1e-6
    y, rstd = K.rmsnorm_forward(x, w, eps, threads=2)
    y_ref, r_ref = ref_forward(x, w, eps)
    assert rel_err(y, y_ref) <= RTOL and rel_err(rstd, r_ref) <= RTOL
    dx, dw = K.rmsnorm_backward(x, w, rstd, dy, weight_grad=True, threads=2)
    dx_ref, dw_ref = ref_backward(x, w, dy, eps)
    assert rel_err(dx, dx_ref, np.abs(r_ref[:, None] * dy * w).max()) <= RTOL
    assert rel_err(dw, dw_ref) <= RTOL
    dx2, none = K.rmsnorm_backward(x, w, rstd, dy, threads=1)
    assert none is None
    np.testing.assert_array_equal(dx, dx2)


def test_rmsnorm_threads_agree_and_many_rows():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4099, 96)).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    dy = rng.standard_normal((4099, 96)).astype(np.float32)
    y1, r1 = K.rmsnorm_forward(x, w, 1e-5, threads=1)
    y2, r2 = K.rmsnorm_forward(x, w, 1e-5, threads=2)
    np.testing.assert_array_equal(y1, y2)
    _, dw1 = K.rmsnorm_backward(x, w, r1, dy, weight_grad=True, threads=1)
    _, dw2 = K.rmsnorm_backward(x, w, r1, dy, weight_grad=True, threads=2)
    assert rel_err(dw2, ref_backward(x, w, dy, 1e-5)[1]) <= RTOL
    np.testing.assert_array_equal(dw1, dw2)  # fixed row blocks: independent of threads
    _, dw3 = K.rmsnorm_backward(x, w, r1, dy, weight_grad=True, threads=3)
    np.testing.assert_array_equal(dw1, dw3)


def test_rmsnorm_backward_finite_differences():
    """The analytic gradient formula (float64 reference) against central differences."""
    rng = np.random.default_rng(2)
    x, w, dy = rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal((3, 5))
    eps, h = 1e-5, 1e-6
    dx, dw = ref_backward(x, w, dy, eps)
    f = lambda x_, w_: (ref_forward(x_, w_, eps)[0] * dy).sum()  # noqa: E731
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        assert abs((f(x + e, w) - f(x - e, w)) / (2 * h) - dx[idx]) < 1e-6
    for c in range(5):
        e = np.zeros_like(w)
        e[c] = h
        assert abs((f(x, w + e) - f(x, w - e)) / (2 * h) - dw[c]) < 1e-6
    # and the kernel agrees with that reference
    x32, w32, dy32 = x.astype(np.float32), w.astype(np.float32), dy.astype(np.float32)
    _, rstd = K.rmsnorm_forward(x32, w32, eps)
    dxk, dwk = K.rmsnorm_backward(x32, w32, rstd, dy32, weight_grad=True)
    assert rel_err(dxk, ref_backward(x32, w32, dy32, eps)[0]) <= RTOL
    assert rel_err(dwk, ref_backward(x32, w32, dy32, eps)[1]) <= RTOL


def test_rmsnorm_per_head_reshape():
    """Qwen3 q/k norm: [B*T, H, D] viewed as [B*T*H, D] with one weight [D]."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((7, 4, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    y, _ = K.rmsnorm_forward(q.reshape(-1, 64), w, 1e-6)
    assert rel_err(y.reshape(q.shape), ref_forward(q.reshape(-1, 64), w, 1e-6)[0].reshape(q.shape)) <= RTOL


def test_rmsnorm_matches_hf():
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((9, 48)).astype(np.float32)
    w = rng.standard_normal(48).astype(np.float32)
    m = llama.LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = m(xt)
    dy = rng.standard_normal((9, 48)).astype(np.float32)
    yt.backward(torch.from_numpy(dy))
    y, rstd = K.rmsnorm_forward(x, w, 1e-6)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    dx, dw = K.rmsnorm_backward(x, w, rstd, dy, weight_grad=True)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, m.weight.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_rmsnorm_bad_input():
    x = np.ones((4, 8), np.float32)
    w = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="float32"):
        K.rmsnorm_forward(x.astype(np.float64), w, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        K.rmsnorm_forward(x, np.ones(7, np.float32), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        K.rmsnorm_forward(np.ones((8, 4), np.float32).T, np.ones(8, np.float32), 1e-6)
    with pytest.raises(ValueError, match="dimensions"):
        K.rmsnorm_forward(x[None], w, 1e-6)
    with pytest.raises(ValueError, match="eps"):
        K.rmsnorm_forward(x, w, float("nan"))
    _, r = K.rmsnorm_forward(x, w, 1e-6)
    with pytest.raises(ValueError, match="rstd"):
        K.rmsnorm_backward(x, w, r[:3], x)
    with pytest.raises(ValueError, match="dy"):
        K.rmsnorm_backward(x, w, r, x[:2])
    with pytest.raises(ValueError, match="threads"):
        K.rmsnorm_forward(x, w, 1e-6, threads=0)
