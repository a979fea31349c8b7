"""Packed rows: causal GQA attention with segment ids (documents as runs of equal ids) on every
SIMD path, against the float64 reference run on each document alone (so nothing may cross a
boundary, and each document's result is what it would be unpacked); awkward sizes: T = 1,
primes, documents of length 1, boundaries on and off the 64-row tiles, a long row of many
documents, padding together with segments; bad segment arrays."""
import numpy as np
import pytest

from qlora_ext.cpu import kernels as K
from gpu_support import attention_inputs, rel_err
from test_attention import RTOL, ref_attention


def segments_of(lengths):
    return np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)


def ref_packed(q, k, v, do, seg_rows, mask=None):
    """The reference run document by document, results put back in place."""
    outs = [np.zeros(a.shape) for a in (q, q, k, v)]
    lse = np.zeros((q.shape[0], q.shape[2], q.shape[1]))
    for b, seg in enumerate(seg_rows):
        starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
        for s0, s1 in zip(starts, np.r_[starts[1:], len(seg)]):
            m = None if mask is None else mask[b:b + 1, s0:s1]
            o, l, dq, dk, dv = ref_attention(q[b:b + 1, s0:s1], k[b:b + 1, s0:s1],
                                             v[b:b + 1, s0:s1], m, do[b:b + 1, s0:s1])
            for dst, src in zip(outs, (o, dq, dk, dv)):
                dst[b, s0:s1] = src[0]
            lse[b, :, s0:s1] = l[0]
    return outs[0], lse, outs[1], outs[2], outs[3]


def check_packed(lengths_rows, Hq, Hkv, D, mask=None, threads=2, seed=0):
    T = sum(lengths_rows[0])
    seg = np.stack([segments_of(ls) for ls in lengths_rows])
    q, k, v, do = attention_inputs(seed, len(lengths_rows), T, Hq, Hkv, D)
    out, lse = K.attention_forward(q, k, v, mask=mask, threads=threads, segments=seg)
    dq, dk, dv = K.attention_backward(q, k, v, out, lse, do, mask=mask, threads=threads,
                                      segments=seg)
    r_out, r_lse, r_dq, r_dk, r_dv = ref_packed(q, k, v, do, seg, mask)
    assert rel_err(out, r_out) <= RTOL
    assert np.array_equal(np.isneginf(lse), np.isneginf(r_lse))
    fin = np.isfinite(r_lse)
    assert np.abs(lse[fin] - r_lse[fin]).max() <= RTOL * max(1.0, np.abs(r_lse[fin]).max())
    # a document of one token has dq = dk = 0 exactly (one key: pure cancellation), so the
    # floor is 1% of one term's size as in test_attention.check
    for got, want, other in ((dq, r_dq, k), (dk, r_dk, q), (dv, r_dv, None)):
        floor = 0.0 if other is None else (1e-2 * np.abs(do).max() * np.abs(v).max()
                                           * np.abs(other).max() * np.sqrt(D))
        assert rel_err(got, want, max(np.abs(want).max(), floor)) <= RTOL
    return out, lse, dq, dk, dv


LAYOUTS = [  # per row, the document lengths; Hq, Hkv, D
    ([[1]], 1, 1, 2),
    ([[1, 1, 1, 1, 1, 1, 1]], 4, 2, 8),
    ([[3, 1, 7, 2], [13]], 4, 2, 32),
    ([[64, 64, 3], [1, 63, 65, 2]], 2, 1, 64),
    ([[61, 1, 67, 2, 41], [172]], 6, 2, 80),
    ([[5, 97, 31, 2, 1, 127], [263]], 2, 2, 96),
    ([[1] * 70 + [59]], 3, 3, 6),
]


@pytest.mark.parametrize("rows,Hq,Hkv,D", LAYOUTS)
def test_segments_match_per_document_reference(simd_level, rows, Hq, Hkv, D):
    check_packed(rows, Hq, Hkv, D)


def test_segments_long_row_many_documents(simd_level):
    rng = np.random.default_rng(3)
    lengths = list(rng.integers(1, 300, 9)) + [1, 1]
    check_packed([lengths], 4, 2, 64)


def test_segments_with_padding():
    rows = [[4, 9, 70], [83]]
    mask = np.ones((2, 83), np.uint8)
    mask[0, 4:6] = 0  # padding keys inside the second document
    mask[1, :11] = 0  # left padding
    check_packed(rows, 4, 2, 32, mask=mask)


def test_segments_thread_counts_agree():
    rows = [[37, 101, 5, 150, 1]]
    a = check_packed(rows, 4, 2, 64, threads=1)
    b = check_packed(rows, 4, 2, 64, threads=3)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_one_segment_is_plain_causal():
    q, k, v, do = attention_inputs(0, 2, 139, 4, 2, 32)
    seg = np.zeros((2, 139), np.int32)
    plain = K.attention_forward(q, k, v)
    packed = K.attention_forward(q, k, v, segments=seg)
    for x, y in zip(plain, packed):
        assert np.array_equal(x, y)


def test_segments_bad_input():
    q, k, v, _ = attention_inputs(0, 1, 5, 2, 1, 8)
    with pytest.raises(ValueError, match="segments"):
        K.attention_forward(q, k, v, segments=np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="segments"):
        K.attention_forward(q, k, v, segments=np.zeros((1, 5), np.float32))
