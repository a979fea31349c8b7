"""GPU causal GQA flash attention, forward and backward, against the CPU tests' float64 numpy
reference (test_attention.ref_attention, which forms the score rows the kernels never keep)."""
import dataclasses

import numpy as np
import pytest

from gpu_support import attention_ds_mode, attention_inputs, poison_scratch, rel_err  # noqa: F401
from test_attention import ref_attention

pytestmark = pytest.mark.gpu


def _check(ctx, q, k, v, do, mask, tol=1e-5):
    from gpu_numpy_forms import attention_backward, attention_forward

    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = ref_attention(q, k, v, mask, do)
    o, lse = attention_forward(q, k, v, mask=mask, ctx=ctx)
    assert rel_err(o, o_ref) <= tol
    fin = np.isfinite(lse_ref)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    assert np.all(lse[~fin] == -np.inf)
    assert rel_err(lse[fin], lse_ref[fin]) <= tol
    dq, dk, dv = attention_backward(q, k, v, o, lse, do, mask=mask, ctx=ctx)
    assert rel_err(dq, dq_ref) <= tol
    assert rel_err(dk, dk_ref) <= tol
    assert rel_err(dv, dv_ref) <= tol


# (B, T, Hq, Hkv, D): T = 1, primes, T = 64 + 1 (one row past the default 64-row block:
# a second query block and a second key block holding one key), T > 2 blocks; T below a
# block; MHA (G = 1), GQA G = 2, 3 and 4; D = 5, 6 (not multiples of 4: zero-padded vec4s),
# 16, 128 (Qwen3's) and 256 (the largest taken).
@pytest.mark.parametrize("B,T,Hq,Hkv,D", [
    (1, 1, 1, 1, 16),
    (2, 37, 4, 2, 16),
    (1, 71, 6, 2, 5),
    (1, 67, 3, 3, 16),
    (1, 65, 4, 1, 8),
    (1, 131, 2, 2, 12),
    (1, 19, 2, 1, 128),
    (1, 9, 2, 2, 6),
    (1, 5, 1, 1, 256),
])
def test_attention_forward_backward(ctx, attention_ds_mode, B, T, Hq, Hkv, D):
    q, k, v, do = attention_inputs(B * 1000 + T * 10 + D, B, T, Hq, Hkv, D)
    if attention_ds_mode:   # dq must read only the dS entries dk/dv wrote
        poison_scratch(ctx, B * Hq * T * T)
    _check(ctx, q, k, v, do, None)


def test_attention_key_padding_mask(ctx):
    """Left padding on one sequence (its first query sees no key: o = 0, lse = -inf, zero
    gradients) and holes in the other."""
    B, T, Hq, Hkv, D = 2, 29, 4, 2, 16
    q, k, v, do = attention_inputs(7, B, T, Hq, Hkv, D)
    mask = np.ones((B, T), np.int64)
    mask[0, :5] = 0
    mask[1, [3, 10, 11, 28]] = 0
    _check(ctx, q, k, v, do, mask)


def test_attention_large_scores(ctx):
    """Scores of a few hundred: the online softmax must rescale, not overflow."""
    B, T, Hq, Hkv, D = 1, 23, 2, 1, 16
    q, k, v, do = attention_inputs(11, B, T, Hq, Hkv, D)
    q *= 12.0
    k *= 12.0
    # Probabilities exp(s - lse) carry the absolute rounding of the scores (|s| up to ~500):
    # relative error ~ |s| * 2^-24 in every output, whatever the kernel.
    smax = float(np.abs(np.einsum("bihd,bjhd->bhij", q.astype(np.float64), np.repeat(k, 2, axis=2))).max()) / 4
    _check(ctx, q, k, v, do, None, tol=1e-5 + 2 * smax * 2.0 ** -24)


def test_attention_bad_input(ctx):
    from gpu_numpy_forms import attention_forward

    q, k, v, _ = attention_inputs(1, 1, 4, 3, 2, 8)
    with pytest.raises(ValueError, match="Hq=3"):
        attention_forward(q, k, v, ctx=ctx)
    q, k, v, _ = attention_inputs(1, 1, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="v:"):
        attention_forward(q, k, v[:, :, :1], ctx=ctx)
    with pytest.raises(ValueError, match="mask"):
        attention_forward(q, k, v, mask=np.ones((1, 5)), ctx=ctx)


# br,bc,tm,tn[,dk4]: the NVIDIA default (64,64,4,4,8 needs 48 KiB) with a smaller D chunk,
# the fallbacks, non-square blocks and thread tiles, a TN that is not a power of two, DK4 = 1.
@pytest.mark.parametrize("tiles", ["64,64,4,4,2", "32,32,4,4", "16,16,2,2", "16,32,4,2,1",
                                   "32,8,8,1", "8,12,2,3"])
def test_attention_tile_override(ctx, attention_ds_mode, monkeypatch, tiles):
    """QLORA_EXT_ATTN_TILES (tuning on real GPUs) changes the tiling, not the results; T = 41
    is no multiple of any block, with a padding mask and GQA."""
    from qlora_ext.gpu.runtime import Tuning

    monkeypatch.setattr(ctx, "tuning", dataclasses.replace(
        ctx.tuning, attn_tiles=Tuning.from_env({"QLORA_EXT_ATTN_TILES": tiles}).attn_tiles))
    q, k, v, do = attention_inputs(13, 1, 41, 4, 2, 20)
    mask = np.ones((1, 41), np.int64)
    mask[0, [0, 17, 40]] = 0
    _check(ctx, q, k, v, do, mask)


def test_attention_tile_override_that_does_not_fit(ctx, monkeypatch):
    """A tiling the adapter's workgroup limits cannot hold is an error naming the variable
    (malformed values already fail in Tuning.from_env: tests/test_gpu_runtime.py)."""
    from gpu_numpy_forms import attention_forward
    from qlora_ext.gpu.runtime import Tuning

    monkeypatch.setattr(ctx, "tuning", Tuning.from_env({"QLORA_EXT_ATTN_TILES": "256,256,1,1"}))
    q, k, v, _ = attention_inputs(1, 1, 4, 2, 2, 16)
    with pytest.raises(ValueError, match="QLORA_EXT_ATTN_TILES"):
        attention_forward(q, k, v, ctx=ctx)


@pytest.mark.parametrize("split", [False, True])
def test_attention_gqa_dkdv_modes(ctx, attention_ds_mode, monkeypatch, split):
    """GQA dk/dv: the per-kv-head loop over the group (False) and one workgroup per query head
    with partials summed by attention_group_sum (True) both match the reference."""
    import dataclasses

    monkeypatch.setattr(ctx, "tuning", dataclasses.replace(ctx.tuning, attn_head_split=split))
    q, k, v, do = attention_inputs(17, 2, 67, 6, 2, 12)
    mask = np.ones((2, 67), np.int64)
    mask[1, :3] = 0
    _check(ctx, q, k, v, do, mask)


def test_attention_head_dim_limit(ctx):
    from gpu_numpy_forms import attention_forward

    q, k, v, _ = attention_inputs(1, 1, 3, 1, 1, 257)
    with pytest.raises(ValueError, match="D=257"):
        attention_forward(q, k, v, ctx=ctx)


def test_attention_backward_deterministic(ctx):
    """Bit-identical gradients run to run (checkpoint resume relies on it): no atomics, the
    GQA per-head partials are summed in head order."""
    from gpu_numpy_forms import attention_backward, attention_forward

    q, k, v, do = attention_inputs(5, 2, 70, 4, 1, 16)
    o, lse = attention_forward(q, k, v, ctx=ctx)
    first = attention_backward(q, k, v, o, lse, do, ctx=ctx)
    for _ in range(2):
        again = attention_backward(q, k, v, o, lse, do, ctx=ctx)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
    o2, lse2 = attention_forward(q, k, v, ctx=ctx)
    np.testing.assert_array_equal(o, o2)
    np.testing.assert_array_equal(lse, lse2)


@pytest.mark.parametrize("D", [6, 128])
def test_attention_single_visible_key_gives_zero_dq(ctx, attention_ds_mode, D):
    """A query that sees one key has P = 1 and o = v of that key, so dS = dP - delta = 0
    exactly and its dq row is exactly zero: delta (prep) must sum do . o in the order the
    score tiles sum do . v.  Rows: the first of each sequence, and batch 0's row 4 after
    four padded keys."""
    from gpu_numpy_forms import attention_backward, attention_forward

    B, T = 2, 9
    q, k, v, do = attention_inputs(23 + D, B, T, 2, 1, D)
    mask = np.ones((B, T), np.int64)
    mask[0, :4] = 0
    o, lse = attention_forward(q, k, v, mask=mask, ctx=ctx)
    dq, _, _ = attention_backward(q, k, v, o, lse, do, mask=mask, ctx=ctx)
    for b, t in [(0, 4), (1, 0)]:
        np.testing.assert_array_equal(o[b, t], np.repeat(v[b, t], 2, axis=0))
        np.testing.assert_array_equal(dq[b, t], 0.0)
    assert np.abs(dq[1, 1:]).min() > 0.0
