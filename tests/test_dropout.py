"""The LoRA dropout hash (qlora_ext.model.dropout), shared by every device: the rate, the
keep scale, and independent masks per layer and projection."""
import numpy as np

from qlora_ext.model.dropout import apply_dropout, dropout_key, dropout_threshold


def test_dropout_mask_rate_and_independence():
    z = np.ones((256, 512), np.float32)
    for p in (0.05, 0.1, 0.5):
        k = dropout_key(7, 3, "gate_proj")
        m = apply_dropout(z, p, k)
        kept = m != 0
        assert abs(1 - kept.mean() - p) < 0.01
        assert np.all(m[kept] == np.float32(1 / (1 - p)))
    m_gate = apply_dropout(z, 0.5, dropout_key(7, 3, "gate_proj")) != 0
    m_up = apply_dropout(z, 0.5, dropout_key(7, 3, "up_proj")) != 0
    m_l4 = apply_dropout(z, 0.5, dropout_key(7, 4, "gate_proj")) != 0
    assert 0.4 < (m_gate == m_up).mean() < 0.6 and 0.4 < (m_gate == m_l4).mean() < 0.6
    assert dropout_threshold(0.0) == 0
    assert apply_dropout(z, 0.0, 5) is z


def test_dropout_rows_in_chunks_equal_one_pass():
    """apply_dropout works in row chunks: the mask of a row does not depend on the chunking."""
    z = np.random.default_rng(1).standard_normal((3000, 700)).astype(np.float32)
    key = dropout_key(11, 2, "down_proj")
    whole = apply_dropout(z, 0.3, key)
    assert np.array_equal(whole[1500:1501], apply_dropout(z, 0.3, key)[1500:1501])
    idx = 1500 * 700 + np.arange(700, dtype=np.uint32)
    from qlora_ext.model.dropout import _hash32
    keep = (_hash32(idx ^ np.uint32(key)) >> np.uint32(8)) >= dropout_threshold(0.3)
    np.testing.assert_array_equal(whole[1500] != 0, keep)
