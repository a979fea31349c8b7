"""The fused NF4 products (csrc/nf4_matmul.c through qlora_ext.cpu.base_matmul) against float64
references, at every SIMD level: y = x Wᵀ and dx = dy W, exact fp32 and bf16 (the reference
rounds both operands to bf16 in numpy, then multiplies in float64).

Tolerance: the error of a float32 sum scales with the sum of |terms|, so each element's error
is measured against (|a| @ |w|) of its row and column.  Measured maxima of that ratio over
these shapes, every level: fp32 4e-8 to 2.1e-7, bf16 up to 8.4e-8 (its products are exact in
float32); the bound is 1e-6."""
import numpy as np
import pytest

from qlora_ext._native import kernels
from qlora_ext.cpu.base_matmul import base_matmul, check_compute_dtype, fused_nf4_available, round_to_bf16
from qlora_ext.model.lora import LoraConfig
from qlora_ext.nf4 import dequantize_nf4, quantize_nf4

TOL = 1e-6

# (N, out, in, blocksize): single rows and columns, primes, in not a multiple of the 16-wide
# decode, the 32-wide tile or the block, odd in (rows start mid-byte), blocks of 32; N <= 8
# takes the few-rows (generation) kernel, larger N the tiles
SHAPES = [(1, 1, 1, 64), (1, 17, 5, 64), (3, 1, 64, 64), (8, 9, 33, 32), (5, 40, 100, 64),
          (13, 29, 97, 64), (31, 37, 33, 32), (12, 24, 32, 32), (33, 65, 130, 64), (50, 3, 1537, 128)]


def _bf16_ref(a):
    """Round to bf16 (ties to even) by integer arithmetic in int64, independently of the helper
    under test."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.int64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def _case(N, O, I, bs, seed=0):
    rng = np.random.default_rng(seed)
    t = quantize_nf4(rng.standard_normal((O, I)).astype(np.float32), blocksize=bs)
    W = dequantize_nf4(t).astype(np.float64)
    x = rng.standard_normal((N, I)).astype(np.float32)
    dy = rng.standard_normal((N, O)).astype(np.float32)
    return t, W, x, dy


def _err_ratio(got, a, w, transpose):
    """max |got - a·w| / (|a|·|w|), float64, w [O, I]; a rounded as the mode rounds it."""
    a64 = a.astype(np.float64)
    ref = a64 @ (w.T if transpose else w)
    scale = np.abs(a64) @ (np.abs(w).T if transpose else np.abs(w))
    return float((np.abs(got - ref) / np.maximum(scale, 1e-300)).max())


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
@pytest.mark.parametrize("N,O,I,bs", SHAPES)
def test_kernel_matches_float64_reference(simd_level, N, O, I, bs, mode):
    t, W, x, dy = _case(N, O, I, bs)
    k = kernels()
    y = np.empty((N, O), np.float32)
    dx = np.empty((N, I), np.float32)
    k.nf4_matmul_xwt(x, t.packed, t.absmax, bs, O, y, mode, 2)
    k.nf4_matmul_xw(dy, t.packed, t.absmax, bs, I, dx, mode, 2)
    rnd = _bf16_ref if mode == "bf16" else (lambda a: a)
    w = rnd(W.astype(np.float32)).astype(np.float64)
    assert _err_ratio(y, rnd(x), w, True) <= TOL
    assert _err_ratio(dx, rnd(dy), w, False) <= TOL


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
@pytest.mark.parametrize("N,O,I", [(1, 1, 1), (1, 17, 5), (7, 29, 97), (8, 9, 33), (13, 131, 31),
                                   (33, 65, 130), (50, 3, 1537), (97, 1021, 64)])
def test_dense_kernel_matches_float64_reference(simd_level, N, O, I, mode):
    """The same kernel with a float32 weight (the LM head): read instead of decoded, odd widths
    included (no NF4 byte pairing), N <= 8 through the few-rows path."""
    rng = np.random.default_rng(N * 7 + O + I)
    W = rng.standard_normal((O, I)).astype(np.float32)
    x = rng.standard_normal((N, I)).astype(np.float32)
    dy = rng.standard_normal((N, O)).astype(np.float32)
    k = kernels()
    y = np.full((N, O), np.nan, np.float32)
    dx = np.full((N, I), np.nan, np.float32)
    k.dense_matmul_xwt(x, W, y, mode, 2)
    k.dense_matmul_xw(dy, W, dx, mode, 2)
    rnd = _bf16_ref if mode == "bf16" else (lambda a: a)
    w = rnd(W).astype(np.float64)
    assert _err_ratio(y, rnd(x), w, True) <= TOL
    assert _err_ratio(dx, rnd(dy), w, False) <= TOL
    with pytest.raises(ValueError, match="do not match"):
        k.dense_matmul_xwt(x, W[:, :0] if I > 1 else np.zeros((O, 2), np.float32), y, mode)


def test_bf16_mode_rounds_both_operands(simd_level):
    """Against the UNROUNDED float64 product the bf16 result is off by ~bf16 precision (2^-9),
    far beyond TOL: the rounding is applied, to x and to W."""
    t, W, x, dy = _case(40, 48, 256, 64, seed=4)
    y = np.empty((40, 48), np.float32)
    kernels().nf4_matmul_xwt(x, t.packed, t.absmax, 64, 48, y, "bf16", 1)
    assert _err_ratio(y, x, W, True) > 100 * TOL
    x_only = _bf16_ref(x).astype(np.float64) @ W.T  # rounding x alone misses it too: W is rounded
    assert np.abs(y - x_only).max() > 100 * TOL * np.abs(x_only).max()
    again = np.empty_like(y)
    kernels().nf4_matmul_xwt(_bf16_ref(x), t.packed, t.absmax, 64, 48, again, "bf16", 1)
    np.testing.assert_array_equal(again, y)  # bf16 values round to themselves


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_column_slices_in_and_out(simd_level, mode):
    """Strided rows (the FFN writes [gate | up] halves in place); neighbours stay untouched."""
    t, W, x, dy = _case(21, 40, 70, 64, seed=2)
    xs = np.full((21, 75), 7.0, np.float32)
    xs[:, 3:73] = x
    ys = np.full((21, 90), -3.0, np.float32)
    k = kernels()
    k.nf4_matmul_xwt(xs[:, 3:73], t.packed, t.absmax, 64, 40, ys[:, 50:], mode, 2)
    y = np.empty((21, 40), np.float32)
    k.nf4_matmul_xwt(x, t.packed, t.absmax, 64, 40, y, mode, 2)
    np.testing.assert_array_equal(ys[:, 50:], y)
    assert (ys[:, :50] == -3.0).all()
    dxs = np.full((21, 71), 5.0, np.float32)
    dx = np.empty((21, 70), np.float32)
    k.nf4_matmul_xw(np.ascontiguousarray(dy), t.packed, t.absmax, 64, 70, dxs[:, 1:], mode, 2)
    k.nf4_matmul_xw(dy, t.packed, t.absmax, 64, 70, dx, mode, 2)
    np.testing.assert_array_equal(dxs[:, 1:], dx)
    assert (dxs[:, 0] == 5.0).all()


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_base_matmul_fused_and_numpy_paths_agree(monkeypatch, mode):
    """base_matmul runs the fused kernel on AVX-512 and numpy products below: same function."""
    import qlora_ext

    t, W, x, dy = _case(19, 45, 96, 64, seed=3)
    fused = base_matmul(x, t, mode), base_matmul(dy, t, mode, transpose=False)
    monkeypatch.setenv("QLORA_EXT_CPU", "avx2")
    qlora_ext.refresh_cpu_features()
    assert not fused_nf4_available()
    plain = base_matmul(x, t, mode), base_matmul(dy, t, mode, transpose=False)
    dense = base_matmul(x, W.astype(np.float32), mode), base_matmul(dy, W.astype(np.float32), mode, transpose=False)
    rnd = _bf16_ref if mode == "bf16" else (lambda a: a)
    w = rnd(W.astype(np.float32)).astype(np.float64)
    for got in (fused, plain, dense):
        assert _err_ratio(got[0], rnd(x), w, True) <= TOL
        assert _err_ratio(got[1], rnd(dy), w, False) <= TOL


def test_round_to_bf16_ties_to_even_and_nan():
    # 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1);
    # 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6
    vals = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 3.0e38, np.inf, np.nan],
                    np.float32)
    got = round_to_bf16(vals)
    np.testing.assert_array_equal(got[:4], np.array([1.0, 1 + 2**-6, -1.0, 1 + 2**-7], np.float32))
    assert got[4] == _bf16_ref(vals[4:5])[0] and got[5] == np.inf and np.isnan(got[6])
    np.testing.assert_array_equal(round_to_bf16(vals[:5]), _bf16_ref(vals[:5]))


def test_bad_inputs_name_what_is_wrong():
    t, W, x, dy = _case(4, 6, 8, 32)
    k = kernels()
    with pytest.raises(ValueError, match="compute_dtype must be 'fp32' or 'bf16'"):
        base_matmul(x, t, "fp16")
    with pytest.raises(ValueError, match="LoraConfig.compute_dtype must be"):
        LoraConfig(compute_dtype="int8")
    assert check_compute_dtype("bfloat16") == "bf16" and LoraConfig(compute_dtype="float32").compute_dtype == "fp32"
    with pytest.raises(ValueError, match=r"float32 \[N, 8\]"):
        base_matmul(dy, t)
    with pytest.raises(ValueError, match=r"out must be float32 \[4, 6\]"):
        base_matmul(x, t, out=np.empty((4, 7), np.float32))
    with pytest.raises(ValueError, match="y has shape"):
        k.nf4_matmul_xwt(x, t.packed, t.absmax, 32, 6, np.empty((4, 5), np.float32))
    with pytest.raises(ValueError, match="do not match an NF4 weight"):
        k.nf4_matmul_xwt(x, t.packed[:-1], t.absmax, 32, 6, np.empty((4, 6), np.float32))
    with pytest.raises(ValueError, match="do not match an NF4 weight"):
        k.nf4_matmul_xw(dy, t.packed, t.absmax, 32, 9, np.empty((4, 9), np.float32))
    with pytest.raises(ValueError, match="rows must be contiguous"):
        k.nf4_matmul_xwt(np.asfortranarray(x), t.packed, t.absmax, 32, 6, np.empty((4, 6), np.float32))
    with pytest.raises(ValueError, match="invalid argument"):  # blocksize not a power of two >= 32
        k.nf4_matmul_xwt(x, t.packed, np.zeros(2, np.float32), 24, 6, np.empty((4, 6), np.float32))
