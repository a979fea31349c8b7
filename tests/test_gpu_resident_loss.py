"""GPU-resident fp32 GEMM and LM head + chunked cross-entropy against float64 numpy."""
import numpy as np
import pytest

from gpu_resident_support import rel_err, resident_context

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ctx():
    return resident_context()


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (7, 13, 5), (67, 3, 131), (65, 129, 17)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm(ctx, M, N, K, trans_a, trans_b):
    from qlora_ext.gpu.resident.gemm import gemm

    g = np.random.default_rng(M * 100 + N * 10 + K)
    a = g.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    b = g.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    ref = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    # Sums of up to 131 products of unit normals, relative to the largest output (measured
    # <= 4e-7 up to K = 3001).
    assert rel_err(gemm(a, b, trans_a, trans_b, ctx=ctx), ref) <= 2e-6


@pytest.mark.parametrize("M,N,K,trans_a", [(16, 20, 3001, True), (70, 5, 1500, False), (3, 130, 600, True)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_split_k(ctx, M, N, K, trans_a, accumulate):
    """Skinny products with long K (LoRA grads: M = rank, K = tokens) take the split-K path."""
    from qlora_ext.gpu.resident.gemm import gemm_gpu, split_count

    assert split_count(-(-N // 64) * -(-M // 64), K) > 1
    g = np.random.default_rng(M + N + K)
    a = g.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    b = g.standard_normal((K, N)).astype(np.float32)
    c0 = g.standard_normal((M + 2, N)).astype(np.float32)
    c = ctx.upload(c0)
    gemm_gpu(ctx, ctx.upload(a), ctx.upload(b), c, M, N, K, trans_a=trans_a, alpha=0.5,
             accumulate=accumulate, c_off=2 * N)
    ref = c0.astype(np.float64)
    prod = 0.5 * (a.T if trans_a else a).astype(np.float64) @ b
    ref[2:] = (ref[2:] if accumulate else 0) + prod
    assert rel_err(ctx.to_numpy(c), ref) <= 2e-6


def test_gemm_offsets_and_accumulate(ctx):
    from qlora_ext.gpu.resident.gemm import gemm_gpu

    g = np.random.default_rng(5)
    a = g.standard_normal((10, 6)).astype(np.float32)
    b = g.standard_normal((9, 6)).astype(np.float32)
    c0 = g.standard_normal((10, 9)).astype(np.float32)
    c = ctx.upload(c0)
    # rows 3..6 of a @ bᵀ, scaled by 0.5, added into rows 3..6 of c
    gemm_gpu(ctx, ctx.upload(a), ctx.upload(b), c, 4, 9, 6, trans_b=True, alpha=0.5,
             accumulate=True, a_off=3 * 6, c_off=3 * 9)
    ref = c0.astype(np.float64)
    ref[3:7] += 0.5 * a[3:7].astype(np.float64) @ b.T
    assert rel_err(ctx.to_numpy(c), ref) <= 1e-6


def _ce_reference(hidden, w, labels):
    """float64 HF loss: mean over shifted, non-ignored targets; gradients of the mean."""
    h = hidden.astype(np.float64)
    B, T, C = h.shape
    logits = h @ w.astype(np.float64).T
    tgt = np.full((B, T), -100)
    tgt[:, :-1] = labels[:, 1:]
    valid = tgt != -100
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    t_safe = np.where(valid, tgt, 0)
    picked = np.take_along_axis(logits, t_safe[..., None], -1)[..., 0]
    loss_sum = float(((lse - picked) * valid).sum())
    count = int(valid.sum())
    dlog = np.exp(logits - lse[..., None])
    np.put_along_axis(dlog, t_safe[..., None], np.take_along_axis(dlog, t_safe[..., None], -1) - 1, -1)
    dlog *= valid[..., None] / max(count, 1)
    dh = dlog @ w.astype(np.float64)
    dw = dlog.reshape(-1, dlog.shape[-1]).T @ h.reshape(-1, C)
    return loss_sum, count, dh, dw


@pytest.mark.parametrize("B,T,C,V,chunk", [(1, 1, 5, 7, None), (2, 7, 13, 37, 3), (3, 5, 33, 301, 4),
                                            (1, 19, 16, 1000, None)])
def test_lm_head_chunked_cross_entropy(ctx, B, T, C, V, chunk):
    from qlora_ext.gpu.resident.cross_entropy import lm_head_loss

    g = np.random.default_rng(B + T + C + V)
    hidden = g.standard_normal((B, T, C)).astype(np.float32)
    w = (g.standard_normal((V, C)) / np.sqrt(C)).astype(np.float32)
    labels = g.integers(0, V, size=(B, T))
    labels[g.random((B, T)) < 0.3] = -100
    loss_sum, count, dh, dw = lm_head_loss(hidden, w, labels, train_head=True, chunk_rows=chunk, ctx=ctx)
    ls_ref, n_ref, dh_ref, dw_ref = _ce_reference(hidden, w, labels)
    assert count == n_ref
    assert abs(loss_sum - ls_ref) <= 1e-5 * max(1.0, abs(ls_ref))
    if n_ref == 0:
        assert not dh.any() and not dw.any()
        return
    assert rel_err(dh, dh_ref) <= 1e-5
    assert rel_err(dw, dw_ref) <= 1e-5


def test_lm_head_all_ignored_and_bad_labels(ctx):
    from qlora_ext.gpu.resident.cross_entropy import lm_head_loss

    hidden = np.ones((1, 4, 3), np.float32)
    w = np.ones((5, 3), np.float32)
    loss_sum, count, dh, _ = lm_head_loss(hidden, w, np.full((1, 4), -100), ctx=ctx)
    assert (loss_sum, count) == (0.0, 0) and not dh.any()
    with pytest.raises(ValueError, match="labels"):
        lm_head_loss(hidden, w, np.array([[0, 1, 5, 2]]), ctx=ctx)
    with pytest.raises(ValueError, match="w_lm"):
        lm_head_loss(hidden, w[:, :2].copy(), np.zeros((1, 4), np.int64), ctx=ctx)
