"""NaN and Inf in attention's q or k on every SIMD path: a query row whose q, or one of whose
valid (causal, unmasked) keys, is non-finite comes out NaN (out and lse) — never a silent 0
or a finite value — every other row matches the float64 reference, and all paths agree on
which values are NaN, forward and backward."""
import os

import numpy as np
import pytest

import qlora_ext
from qlora_ext.cpu import kernels as K
from gpu_support import attention_inputs, rel_err
from test_attention import ref_attention

BAD = (np.nan, np.inf, -np.inf)


def at_level(level, fn):
    """fn() with the SIMD path capped at `level`, the previous cap restored after."""
    before = os.environ.get("QLORA_EXT_CPU")
    os.environ["QLORA_EXT_CPU"] = level
    qlora_ext.refresh_cpu_features()
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["QLORA_EXT_CPU"]
        else:
            os.environ["QLORA_EXT_CPU"] = before
        qlora_ext.refresh_cpu_features()


def poisoned_rows(q, k, mask):
    """(B, T, Hq) bool: rows with a valid key whose q or some valid key's k is non-finite."""
    B, T, Hq, _ = q.shape
    g = Hq // k.shape[2]
    real = np.ones((B, T), bool) if mask is None else mask.astype(bool)
    q_bad = ~np.isfinite(q).all(-1)  # (B, T, Hq)
    k_bad = ~np.isfinite(k).all(-1) & real[:, :, None]  # (B, T, Hkv), padding keys ignored
    seen = np.maximum.accumulate(k_bad, axis=1)[:, :, np.arange(Hq) // g]  # any bad key j <= t
    has_key = np.maximum.accumulate(real, axis=1)[:, :, None]
    return has_key & (q_bad | seen)


CASES = [  # B, T, Hq, Hkv, D, where
    (1, 1, 1, 1, 2, "q"), (1, 1, 2, 1, 8, "k"), (1, 7, 4, 2, 6, "q"), (2, 70, 4, 2, 64, "k"),
    (1, 130, 2, 2, 80, "both"), (2, 67, 6, 3, 34, "k"), (1, 200, 2, 1, 128, "q"),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,where", CASES)
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_non_finite_q_or_k_poisons_exactly_its_rows(simd_level, B, T, Hq, Hkv, D, where, bad, masked):
    q, k, v, do = attention_inputs(T + D, B, T, Hq, Hkv, D)
    rng = np.random.default_rng(T * 7 + D)
    mask = None
    if masked:
        mask = np.ones((B, T), np.uint8)
        mask[0, : T // 3] = 0  # left padding on the first sequence
        mask[-1, T - T // 4:] = 0  # right padding on the last
    ref_out, ref_lse, *ref_grads = ref_attention(q, k, v, mask, do)
    qb, kb = q.copy(), k.copy()
    for _ in range(2):
        if where in ("q", "both"):
            qb[rng.integers(B), rng.integers(T), rng.integers(Hq), rng.integers(D)] = bad
        if where in ("k", "both"):
            kb[rng.integers(B), rng.integers(T), rng.integers(Hkv), rng.integers(D)] = bad
    poison = poisoned_rows(qb, kb, mask)
    out, lse = K.attention_forward(qb, kb, v, mask=mask, threads=2)
    assert np.isnan(out[poison]).all() and np.isnan(lse.transpose(0, 2, 1)[poison]).all()
    clean = ~poison
    assert np.isfinite(out[clean]).all()
    if clean.any():
        assert rel_err(out[clean], ref_out[clean], np.abs(ref_out).max()) <= 1e-5
    lse_t, ref_lse_t = lse.transpose(0, 2, 1)[clean], ref_lse.transpose(0, 2, 1)[clean]
    np.testing.assert_array_equal(np.isneginf(lse_t), np.isneginf(ref_lse_t))  # rows without keys
    fin = np.isfinite(ref_lse_t)
    np.testing.assert_allclose(lse_t[fin], ref_lse_t[fin], rtol=1e-5, atol=1e-5)
    grads = K.attention_backward(qb, kb, v, out, lse, do, mask=mask, threads=2)
    assert np.isnan(grads[0][poison]).all()
    if simd_level != "scalar":  # the same values are NaN (and Inf) as on the scalar path
        want = at_level("scalar", lambda: (K.attention_forward(qb, kb, v, mask=mask, threads=2),))[0]
        want_grads = at_level("scalar", lambda: K.attention_backward(qb, kb, v, *want, do, mask=mask, threads=2))
        for got, ref in zip((out, lse) + grads, want + want_grads):
            np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
            np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))


def test_lone_key_with_an_infinite_score_is_nan_not_zero(simd_level):
    """T = 1: the only score is -inf (q = -inf against k > 0); the row used to come out 0 with
    lse -inf, as if it had no key."""
    q = np.full((1, 1, 1, 4), 1.0, np.float32)
    q[..., 0] = -np.inf
    k = np.ones((1, 1, 1, 4), np.float32)
    out, lse = K.attention_forward(q, k, k.copy())
    assert np.isnan(out).all() and np.isnan(lse).all()


def test_nan_lse_gives_nan_gradients(simd_level):
    q, k, v, do = attention_inputs(1, 1, 40, 2, 1, 16)
    out, lse = K.attention_forward(q, k, v)
    lse[0, 1, 20] = np.nan
    dq, dk, dv = K.attention_backward(q, k, v, out, lse, do)
    assert np.isnan(dq[0, 20, 1]).all() and np.isfinite(dq[0, :20]).all()
