"""GPU fp32 GEMM and LM head + chunked cross-entropy against float64 numpy."""
import numpy as np
import pytest

from gpu_support import rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (7, 13, 5), (67, 3, 131), (65, 129, 17), (68, 132, 100)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm(ctx, M, N, K, trans_a, trans_b):
    from gpu_numpy_forms import gemm

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
    from qlora_ext.gpu.bindings.gemm import gemm_gpu, split_count

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
    from qlora_ext.gpu.bindings.gemm import gemm_gpu

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
                                            (1, 19, 16, 1000, None), (2, 150, 7, 257, 128),
                                            (3, 61, 12, 131, 130), (1, 23, 8, 64, 5)])
def test_lm_head_chunked_cross_entropy(ctx, B, T, C, V, chunk):
    from gpu_numpy_forms import lm_head_loss

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
    from gpu_numpy_forms import lm_head_loss

    hidden = np.ones((1, 4, 3), np.float32)
    w = np.ones((5, 3), np.float32)
    loss_sum, count, dh, _ = lm_head_loss(hidden, w, np.full((1, 4), -100), ctx=ctx)
    assert (loss_sum, count) == (0.0, 0) and not dh.any()
    with pytest.raises(ValueError, match="labels"):
        lm_head_loss(hidden, w, np.array([[0, 1, 5, 2]]), ctx=ctx)
    with pytest.raises(ValueError, match="w_lm"):
        lm_head_loss(hidden, w[:, :2].copy(), np.zeros((1, 4), np.int64), ctx=ctx)


def test_chunk_rows_and_starts(ctx):
    """Chunks cover every row once, none longer than the buffer, near-equal in length."""
    from qlora_ext.gpu.bindings.cross_entropy import chunk_rows_for, chunk_starts

    lim = ctx.limits["max-storage-buffer-binding-size"]
    R = chunk_rows_for(ctx, 151936)
    assert R * 151936 * 4 <= lim and (R % 128 == 0 or R < 128)
    big = 1 << 40   # budget and binding limit out of the way: the rows the GEMM wants
    ctx_big = type("Ctx", (), {"limits": {"max-storage-buffer-binding-size": big}})()
    assert chunk_rows_for(ctx_big, 151936, big) == 1024
    assert chunk_rows_for(ctx_big, 151936, big, hidden=1024) == 2048
    assert chunk_rows_for(ctx_big, 151936, big, hidden=2560) == 1024
    assert chunk_rows_for(ctx_big, 151936, big, hidden=600) == 3584      # 2^21 / 600 -> 3496 -> 3584
    # the budget caps it: 1280 MiB hold 2208 rows of V = 151936 -> 2176 (128-row multiple)
    assert chunk_rows_for(ctx_big, 151936, hidden=600) == 2176
    assert chunk_rows_for(ctx_big, 151936, 1000 * 151936 * 4, hidden=1024) == 896
    assert chunk_rows_for(ctx_big, 151936, 100 * 151936 * 4) == 100
    assert chunk_rows_for(ctx, 10**9) == 1
    for n, r in [(4096, 1104), (4096, 1408), (300, 128), (14, 3), (1, 1), (1, 1024), (129, 128), (997, 131)]:
        ch = chunk_starts(n, r)
        assert [r0 for r0, _ in ch] == list(np.cumsum([0] + [k for _, k in ch])[:-1])
        assert sum(k for _, k in ch) == n and all(0 < k <= r for _, k in ch)
        assert len(ch) == -(-n // r)
    assert chunk_starts(4096, 1104) == [(i * 1024, 1024) for i in range(4)]


@pytest.mark.parametrize("w_off", [0, 5, 64])
def test_lm_head_weight_offset_and_trained_head(ctx, w_off):
    """The head read from (and its gradient added into) a flat buffer at an element offset, as
    the engine's trained head does; odd offsets take gemm.wgsl's scalar loads."""
    from qlora_ext.gpu.bindings.cross_entropy import LmHeadLoss

    g = np.random.default_rng(w_off)
    B, T, C, V = 2, 9, 11, 53
    hidden = g.standard_normal((B, T, C)).astype(np.float32)
    w = (g.standard_normal((V, C)) / np.sqrt(C)).astype(np.float32)
    labels = g.integers(0, V, size=(B, T))
    labels[0, 3] = -100
    flat = np.zeros(w_off + V * C + 3, np.float32)
    flat[w_off:w_off + V * C] = w.reshape(-1)
    dw0 = g.standard_normal(flat.shape).astype(np.float32)
    head = LmHeadLoss(ctx, B * T, C, V, chunk_rows=4)
    gp, dw, dh = ctx.upload(flat), ctx.upload(dw0), ctx.empty((B * T, C))
    ls_ref, n_ref, dh_ref, dw_ref = _ce_reference(hidden, w, labels)
    stats = head.record(ctx.upload(hidden.reshape(B * T, C)), gp, ctx.upload(labels.reshape(-1).astype(np.int32), "i32"),
                        T, 1.0 / n_ref, dhidden=dh, dw_lm=dw, w_off=w_off, dw_off=w_off)
    loss_sum, count = ctx.to_numpy(stats)
    assert int(count) == n_ref and abs(loss_sum - ls_ref) <= 1e-5 * abs(ls_ref)
    assert rel_err(ctx.to_numpy(dh).reshape(B, T, C), dh_ref) <= 1e-5
    got = ctx.to_numpy(dw)
    ref = dw0.astype(np.float64)
    ref[w_off:w_off + V * C] += dw_ref.reshape(-1)
    # the untouched ends stay bit-exact; the head's part is dw0 + dW
    assert np.array_equal(got[:w_off], dw0[:w_off]) and np.array_equal(got[w_off + V * C:], dw0[w_off + V * C:])
    assert rel_err(got, ref, scale=np.abs(dw_ref).max() + np.abs(dw0).max()) <= 1e-6


@pytest.mark.parametrize("b_t", [True, False])
@pytest.mark.parametrize("M,N,K,a_off,b_off,c_off", [(5, 9, 7, 14, 3, 18), (6, 12, 8, 16, 8, 24),
                                                     (1, 1, 1, 0, 1, 3), (33, 67, 17, 17, 0, 67)])
def test_gemm_fp32_offsets_on_tensors(ctx, b_t, M, N, K, a_off, b_off, c_off):
    """gemm.wgsl's element offsets for A, fp32 W and C on GpuTensors (the LM head's row chunks)."""
    from qlora_ext.gpu.kernels import Operand, gemm

    g = np.random.default_rng(M * N + K)
    a = g.standard_normal(a_off + M * K + 2).astype(np.float32)
    w = g.standard_normal((N, K) if b_t else (K, N)).astype(np.float32)
    wb = np.concatenate([g.standard_normal(b_off), w.reshape(-1)]).astype(np.float32)
    c0 = g.standard_normal(c_off + M * N + 5).astype(np.float32)
    for accumulate in (False, True):
        c = ctx.upload(c0)
        gemm(ctx, M, N, K, Operand(ctx.upload(a), a_off), Operand(ctx.upload(wb), b_off), Operand(c, c_off),
             b_t=b_t, accumulate=accumulate)
        prod = a[a_off:a_off + M * K].reshape(M, K).astype(np.float64) @ (w.T if b_t else w)
        ref = c0.astype(np.float64)
        ref[c_off:c_off + M * N] = (ref[c_off:c_off + M * N] if accumulate else 0) + prod.reshape(-1)
        got = ctx.to_numpy(c)
        assert np.array_equal(got[:c_off], c0[:c_off]) and np.array_equal(got[c_off + M * N:], c0[c_off + M * N:])
        assert rel_err(got, ref) <= 2e-6
    with pytest.raises(ValueError, match="a holds"):
        gemm(ctx, M, N, K, Operand(ctx.upload(a[:a_off + M * K - 1].copy()), a_off), Operand(ctx.upload(wb), b_off),
             Operand(ctx.upload(c0)), b_t=b_t)


@pytest.mark.parametrize("room", [0, 1])
def test_lm_head_dhidden_split_k_through_scratch(ctx, room):
    """The step's tile rule on (as on a real GPU): dhidden (K = vocab, a thin grid) splits K
    into the scratch the caller lends when it holds the partials (room 1), else into the
    context's (room 0); both give float64's loss gradients, over several row chunks."""
    from qlora_ext.gpu import kernels
    from qlora_ext.gpu.bindings.cross_entropy import LmHeadLoss
    from qlora_ext.gpu.runtime import GpuContext

    own = GpuContext(ctx.adapter)
    ch = kernels.step_gemm_tiles(own)
    for t in (ch.F32_64, ch.F32_128, ch.F32_THIN, ch.F32_SPLIT):
        try:
            t.check(own)
        except ValueError as e:
            pytest.skip(f"{t}: {e}")
    ch.own = True
    g = np.random.default_rng(41 + room)
    B, T, C, V = 2, 21, 19, 1003
    hidden = g.standard_normal((B, T, C)).astype(np.float32)
    w = (g.standard_normal((V, C)) / np.sqrt(C)).astype(np.float32)
    labels = g.integers(0, V, size=(B, T))
    head = LmHeadLoss(own, B * T, C, V, chunk_rows=16)
    rows = max(k for _, k in head.chunks)
    splits = ch(rows, C, V, False).splits
    assert splits > 1
    assert len(head.chunks) > 1 and all(k == rows for _, k in head.chunks)
    scratch = own.upload(np.full(splits * rows * C - (1 - room), 3.0, np.float32))
    dh = own.empty((B * T, C))
    ls_ref, n_ref, dh_ref, _ = _ce_reference(hidden, w, labels)
    stats = head.record(own.upload(hidden.reshape(B * T, C)), own.upload(w),
                        own.upload(labels.reshape(-1).astype(np.int32), "i32"), T, 1.0 / n_ref, dhidden=dh,
                        scratch=scratch)
    loss_sum, count = own.to_numpy(stats)
    assert int(count) == n_ref and abs(loss_sum - ls_ref) <= 1e-5 * abs(ls_ref)
    assert rel_err(own.to_numpy(dh).reshape(B, T, C), dh_ref) <= 1e-5
    assert np.all(own.to_numpy(scratch) == 3.0) == (room == 0)
