"""NF4 quantize/dequantize against a float64 numpy reference and (where installed) bitsandbytes."""
import numpy as np
import pytest

import qlora_ext as qx
from qlora_ext.nf4 import NF4_CODE, dynamic_code

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
SIZES = [1, 2, 31, 33, 64, 97, 1000, 4097, 12289]


def reference_quantize(x: np.ndarray, blocksize: int):
    """The bitsandbytes nf4 algorithm written out: float32 scale steps, codes = number of
    float32 midpoints strictly below the scaled value, odd tails padded with 0."""
    x = x.astype(np.float32).reshape(-1)
    n = x.size
    mids = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
    codes = np.empty(n + (n & 1), dtype=np.uint8)
    absmax = []
    for start in range(0, n, blocksize):
        blk = x[start:start + blocksize]
        am = np.float32(np.abs(blk).max())
        if blk.size == blocksize:
            scaled = blk * (np.float32(1) / max(am, np.float32(1e-38)))
        else:
            am = max(am, np.float32(1e-38))
            scaled = blk / am
        scaled = np.clip(scaled, -1, 1).astype(np.float32)
        codes[start:start + blk.size] = (mids[None, :] < scaled[:, None]).sum(1)
        absmax.append(am)
    if n & 1:
        codes[n] = 7
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.astype(np.uint8), np.array(absmax, dtype=np.float32)


def reference_dequantize(packed, absmax, n, blocksize):
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2], codes[1::2] = packed >> 4, packed & 15
    vals = NF4_CODE[codes[:n]].astype(np.float64) * np.repeat(absmax.astype(np.float64), blocksize)[:n]
    return vals


def random_weights(rng, n):
    x = (rng.standard_normal(n) * rng.uniform(0.01, 5)).astype(np.float32)
    if n > 80:
        x[10:74] = 0.0  # an all-zero block for the smallest blocksize
        x[-1] = np.float32(NF4_CODE[9] + NF4_CODE[10]) / 2 * np.abs(x).max()
    return x


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_matches_reference(simd_level, blocksize):
    rng = np.random.default_rng(blocksize)
    for n in SIZES:
        x = random_weights(rng, n)
        t = qx.quantize_nf4(x, blocksize=blocksize)
        packed, absmax = reference_quantize(x, blocksize)
        np.testing.assert_array_equal(t.packed, packed, err_msg=f"n={n}")
        np.testing.assert_array_equal(t.absmax, absmax, err_msg=f"n={n}")
        assert t.shape == (n,) and t.blocksize == blocksize
        d = qx.dequantize_nf4(t)
        ref = reference_dequantize(packed, absmax, n, blocksize)
        # float32 product of two float32 numbers: exact to half an ulp of the float64 product
        np.testing.assert_allclose(d, ref, rtol=6e-8, atol=0)


def test_midpoint_goes_to_lower_code(simd_level):
    mids = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
    x = np.concatenate([mids, [1.0], -np.ones(16, np.float32)]).astype(np.float32)  # absmax 1
    t = qx.quantize_nf4(x, blocksize=32)
    codes = np.empty(32, np.uint8)
    codes[0::2], codes[1::2] = t.packed >> 4, t.packed & 15
    np.testing.assert_array_equal(codes[:15], np.arange(15))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs(simd_level, dtype):
    rng = np.random.default_rng(3)
    x32 = rng.standard_normal((37, 29)).astype(np.float32)
    if dtype == "float16":
        x = x32.astype(np.float16)
        exact = x.astype(np.float32)
        t = qx.quantize_nf4(x, blocksize=64)
    else:
        x = (x32.view(np.uint32) >> 16).astype(np.uint16)
        exact = (x.astype(np.uint32) << 16).view(np.float32)
        t = qx.quantize_nf4(x, blocksize=64, dtype="bfloat16")
    ref = qx.quantize_nf4(exact, blocksize=64)
    np.testing.assert_array_equal(t.packed, ref.packed)
    np.testing.assert_array_equal(t.absmax, ref.absmax)
    assert t.shape == (37, 29)


def test_strided_and_shaped_input():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((64, 130)).astype(np.float32)
    view = base[:, 1:128:3]  # non-contiguous
    t = qx.quantize_nf4(view, blocksize=32)
    ref = qx.quantize_nf4(np.ascontiguousarray(view), blocksize=32)
    np.testing.assert_array_equal(t.packed, ref.packed)
    assert qx.dequantize_nf4(t).shape == view.shape


def test_dequantize_out_and_threads():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 7)).astype(np.float32)
    t = qx.quantize_nf4(x, blocksize=128)
    out = np.empty((300, 7), np.float32)
    r = qx.dequantize_nf4(t, out=out, threads=1)
    assert r is out
    np.testing.assert_array_equal(out, qx.dequantize_nf4(t, threads=2))
    with pytest.raises(ValueError, match="shape"):
        qx.dequantize_nf4(t, out=np.empty((7, 300), np.float32))
    with pytest.raises(ValueError, match="float32"):
        qx.dequantize_nf4(t, out=np.empty((300, 7), np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        qx.dequantize_nf4(t, out=np.empty((300, 14), np.float32)[:, ::2])


def test_large_tensor_multithreaded(simd_level):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(3 * 65536 + 77).astype(np.float32)
    t = qx.quantize_nf4(x, blocksize=64)
    packed, absmax = reference_quantize(x, 64)
    np.testing.assert_array_equal(t.packed, packed)
    d = qx.dequantize_nf4(t)
    np.testing.assert_allclose(d, reference_dequantize(packed, absmax, x.size, 64), rtol=6e-8, atol=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_rejected(simd_level, bad):
    x = np.ones((5, 40), np.float32)
    x[3, 17] = bad
    with pytest.raises(ValueError, match=r"non-finite.*\(3, 17\)"):
        qx.quantize_nf4(x)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 8192, 100, 64.0, True])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        qx.quantize_nf4(np.ones(64, np.float32), blocksize=blocksize)


def test_bad_dtype():
    with pytest.raises(ValueError, match="unsupported dtype"):
        qx.quantize_nf4(np.ones(64, np.int32))
    with pytest.raises(ValueError, match="bfloat16"):
        qx.quantize_nf4(np.ones(64, np.float32), dtype="bfloat16")
    with pytest.raises(ValueError, match="NF4Tensor"):
        qx.dequantize_nf4(np.ones(4))


def test_double_quant_reference():
    rng = np.random.default_rng(7)
    x = rng.standard_normal(64 * 600 + 5).astype(np.float32)
    single = qx.quantize_nf4(x, blocksize=64)
    t = qx.quantize_nf4(x, blocksize=64, double_quant=True)
    np.testing.assert_array_equal(t.packed, single.packed)
    assert t.absmax_q.dtype == np.uint8 and t.absmax_nested.size == (single.absmax.size + 255) // 256
    # the 8-bit dynamic code keeps the centred scale within its step (< 1.5% of the block max)
    err = np.abs(t.absmax - single.absmax)
    assert err.max() < 0.015 * np.abs(single.absmax - t.absmax_offset).max()
    assert t.nbytes < single.nbytes
    code = dynamic_code()
    assert code.size == 256 and np.all(np.diff(code) >= 0) and code[-1] == 1.0


# ---- interop with bitsandbytes ---------------------------------------------------------

def _bnb():
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    return torch, F


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_bitsandbytes_bit_exact(simd_level, blocksize):
    torch, F = _bnb()
    rng = np.random.default_rng(blocksize + 1)
    for n in [1, 31, 4097, 12289]:
        x = random_weights(rng, n)
        packed, state = F.quantize_4bit(torch.from_numpy(x), blocksize=blocksize, quant_type="nf4")
        t = qx.quantize_nf4(x, blocksize=blocksize)
        np.testing.assert_array_equal(t.packed, packed.numpy().reshape(-1))
        np.testing.assert_array_equal(t.absmax.view(np.uint32), state.absmax.numpy().view(np.uint32))
        ref = F.dequantize_4bit(packed, state).numpy().reshape(-1)
        np.testing.assert_array_equal(qx.dequantize_nf4(t).view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_bitsandbytes_half_inputs(dtype):
    torch, F = _bnb()
    rng = np.random.default_rng(11)
    xt = torch.from_numpy(rng.standard_normal(4097).astype(np.float32)).to(getattr(torch, dtype))
    packed, state = F.quantize_4bit(xt, blocksize=64, quant_type="nf4")
    if dtype == "bfloat16":
        t = qx.quantize_nf4(xt.view(torch.int16).numpy().view(np.uint16), blocksize=64, dtype="bfloat16")
    else:
        t = qx.quantize_nf4(xt.numpy(), blocksize=64)
    np.testing.assert_array_equal(t.packed, packed.numpy().reshape(-1))
    np.testing.assert_array_equal(t.absmax, state.absmax.numpy())


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_bitsandbytes_double_quant(blocksize):
    torch, F = _bnb()
    rng = np.random.default_rng(blocksize + 2)
    x = (rng.standard_normal(blocksize * 700 + 3) * 0.05).astype(np.float32)
    packed, state = F.quantize_4bit(torch.from_numpy(x), blocksize=blocksize, quant_type="nf4",
                                    compress_statistics=True)
    t = qx.quantize_nf4(x, blocksize=blocksize, double_quant=True)
    np.testing.assert_array_equal(t.packed, packed.numpy().reshape(-1))
    np.testing.assert_array_equal(t.absmax_q, state.absmax.numpy())
    np.testing.assert_allclose(t.absmax_nested, state.state2.absmax.numpy(), rtol=1e-6)
    ref = F.dequantize_4bit(packed, state).numpy().reshape(-1)
    np.testing.assert_allclose(qx.dequantize_nf4(t), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_bitsandbytes_dynamic_code():
    torch, F = _bnb()
    np.testing.assert_array_equal(dynamic_code(), F.create_dynamic_map(signed=True).numpy())


def test_streaming_store_path_matches_cached_path(simd_level):
    """Outputs over 64 MiB use non-temporal stores when 16-byte aligned; an output shifted
    by one float takes the ordinary store path: both must agree bit for bit."""
    n = (64 << 20) // 4 + 4099
    x = np.random.default_rng(8).standard_normal(n).astype(np.float32)
    t = qx.quantize_nf4(x, blocksize=64)
    aligned = qx.dequantize_nf4(t)
    backing = np.empty(n + 1, np.float32)
    shifted = backing[1:]
    assert shifted.ctypes.data % 16 != 0
    qx.dequantize_nf4(t, out=shifted)
    np.testing.assert_array_equal(aligned, shifted)
    np.testing.assert_array_equal(aligned[:4096], qx.dequantize_nf4(qx.quantize_nf4(x[:4096], blocksize=64)))
