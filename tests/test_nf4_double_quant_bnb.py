"""Double quantization against bitsandbytes (compress_statistics=True) on many random inputs
of awkward sizes.  Everything is bit-exact except the float32 mean of the block scales that
both subtract before the 8-bit code: torch sums it in an order that depends on its SIMD width
and thread count, this package rounds the exact mean once.  The two offsets differ by a few
float32 ulps, so where a centred scale lies that close to a code boundary its 8-bit code
differs by one (README states this tolerance)."""
import warnings

import numpy as np
import pytest

from qlora_ext import nf4 as qx
from qlora_ext._native import kernels



def _bnb():
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch, pytest.importorskip("bitsandbytes.functional")


def _cases(count, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        bs = int(rng.choice([32, 64, 128, 256, 1024, 4096]))
        n = int(rng.integers(0, min(400, 100_000 // bs))) * bs + int(rng.integers(1, bs + 1))
        scale = float(10.0 ** rng.uniform(-4, 1))
        yield bs, (rng.standard_normal(n) * scale).astype(np.float32)


def test_blockwise8_codes_are_the_nearest_grid_code():
    """Every point of bitsandbytes' 65536-point grid gets the nearest code of the sorted
    dynamic map, ties to the lower code (float64 brute force)."""
    code = qx.dynamic_code()
    x = np.concatenate([np.linspace(-1, 1, 4 * 65536, dtype=np.float32), [1.0]]).astype(np.float32)
    q = np.empty(x.size, np.uint8)
    kernels().blockwise8_quantize(x, x.size, code, q, np.empty(1, np.float32))
    grid = ((np.clip(x, -1, 1) + np.float32(1)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5))
    idx = grid.astype(np.uint16)
    v = np.arange(65536, dtype=np.float64) / 65535.0 * 2.0 - 1.0
    nearest = np.concatenate([np.abs(v[i:i + 4096, None] - code.astype(np.float64)[None, :]).argmin(axis=1)
                              for i in range(0, 65536, 4096)])  # argmin: the lowest index of a tie
    np.testing.assert_array_equal(q, nearest[idx])
    with pytest.raises(ValueError, match="invalid argument"):
        kernels().blockwise8_quantize(x[:10], 256, code[::-1].copy(), q[:10], np.empty(1, np.float32))


def test_double_quant_matches_bitsandbytes_up_to_the_offset():
    torch, F = _bnb()
    for bs, x in _cases(25):
        packed, st = F.quantize_4bit(torch.from_numpy(x), blocksize=bs, quant_type="nf4",
                                     compress_statistics=True)
        t = qx.quantize_nf4(x, blocksize=bs, double_quant=True)
        np.testing.assert_array_equal(t.packed, packed.numpy().reshape(-1))
        bnb_q, bnb_offset = st.absmax.numpy(), np.float32(st.offset.item())
        ours_offset = np.float32(t.absmax_offset)
        # the stated tolerance: offsets a few ulps apart, codes at most one apart
        assert abs(float(ours_offset) - float(bnb_offset)) <= 8 * np.spacing(bnb_offset)
        assert np.abs(t.absmax_q.astype(int) - bnb_q.astype(int)).max(initial=0) <= 1
        np.testing.assert_allclose(t.absmax_nested, st.state2.absmax.numpy(), rtol=1e-5)
        # and the offset is the only difference: given bitsandbytes' offset, the same codes
        # and nested scales bit for bit
        single = qx.quantize_nf4(x, blocksize=bs)
        q = np.empty(single.absmax.size, np.uint8)
        nested = np.empty(-(-q.size // qx.NESTED_BLOCKSIZE), np.float32)
        kernels().blockwise8_quantize((single.absmax - bnb_offset).astype(np.float32),
                                      qx.NESTED_BLOCKSIZE, qx.dynamic_code(), q, nested)
        np.testing.assert_array_equal(q, bnb_q)
        np.testing.assert_array_equal(nested.view(np.uint32), st.state2.absmax.numpy().view(np.uint32))
