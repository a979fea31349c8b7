"""Thread counts and sizes the kernels are given: every count is bounded by what the machine
can run, every bad one is a ValueError naming the argument, and no size reaches C unchecked."""
import numpy as np
import pytest

import qlora_ext.cpu.kernels as K
from qlora_ext import nf4 as qx
from qlora_ext._native import default_threads, kernels, max_threads, resolve_threads

HUGE = 100_000


def _attention_inputs(T=70):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, T, 4, 16), dtype=np.float32)
    k = rng.standard_normal((1, T, 2, 16), dtype=np.float32)
    v = rng.standard_normal((1, T, 2, 16), dtype=np.float32)
    return q, k, v


def _calls(threads):
    """Every public kernel entry point that takes `threads`, with inputs big enough to start
    a thread team."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 256), dtype=np.float32)
    w = rng.standard_normal(256, dtype=np.float32)
    q, k, v = _attention_inputs()
    tables = K.rope_tables(16, 128, 10000.0)
    pos = np.arange(70)
    big = rng.standard_normal(1 << 18, dtype=np.float32)
    t = qx.quantize_nf4(big, threads=1)
    return {
        "quantize_nf4": lambda: qx.quantize_nf4(big, threads=threads).packed,
        "dequantize_nf4": lambda: qx.dequantize_nf4(t, threads=threads),
        "rmsnorm_forward": lambda: K.rmsnorm_forward(x, w, 1e-6, threads=threads),
        "rmsnorm_backward": lambda: K.rmsnorm_backward(x, w, np.ones(300, np.float32), x, True, threads=threads),
        "rope_forward": lambda: K.rope_forward(q.copy(), pos, tables, threads=threads),
        "attention_forward": lambda: K.attention_forward(q, k, v, threads=threads),
        "attention_backward": lambda: K.attention_backward(q, k, v, *K.attention_forward(q, k, v, threads=1),
                                                           q, threads=threads),
    }


def _same(a, b):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        if x is not None:
            np.testing.assert_array_equal(x, y)


def test_huge_thread_count_is_cut_down_and_gives_the_same_result():
    """threads=100000 used to crash inside OpenMP; now it is cut down to max_threads()."""
    assert resolve_threads(HUGE) == max_threads()
    ones, huge = _calls(1), _calls(HUGE)
    for name in ones:
        _same(ones[name](), huge[name]())


@pytest.mark.parametrize("bad", [0, -1, -(2**40), 1.5, True, "2", float("nan")])
def test_bad_thread_counts_are_value_errors_naming_threads(bad):
    for name, call in _calls(bad).items():
        with pytest.raises(ValueError, match="threads"):
            call()


def test_kernels_bound_a_huge_count_themselves():
    """The compiled layer clamps too (QX_THREADS_PER_CPU per core), whoever calls it."""
    x = np.random.default_rng(2).standard_normal(1 << 18).astype(np.float32)
    t = qx.quantize_nf4(x, threads=1)
    out = np.empty(x.shape[0], np.float32)
    kernels().nf4_dequantize(t.packed, t.absmax, t.blocksize, out, 2**31 - 1)
    np.testing.assert_array_equal(out, qx.dequantize_nf4(t, threads=1))
    q, k, v = _attention_inputs()
    o = np.empty_like(q)
    lse = np.empty((1, 4, 70), np.float32)
    kernels().attention_forward(q, k, v, None, o, lse, 2**31 - 1)
    np.testing.assert_array_equal(o, K.attention_forward(q, k, v, threads=1)[0])


def test_environment_thread_count(monkeypatch):
    monkeypatch.setenv("QLORA_EXT_THREADS", str(HUGE))
    assert default_threads() == max_threads()
    _same(_calls(None)["attention_forward"](), _calls(1)["attention_forward"]())
    for bad in ("0", "-3", "many", "1.5"):
        monkeypatch.setenv("QLORA_EXT_THREADS", bad)
        with pytest.raises(ValueError, match="QLORA_EXT_THREADS"):
            K.rmsnorm_forward(np.ones((2, 4), np.float32), np.ones(4, np.float32), 1e-6)


@pytest.mark.parametrize("blocksize", [0, -64, 48, 2**62, 2**63 - 1, 8192, 1.5, True])
def test_dequantize_checks_a_hand_built_tensor_blocksize(blocksize):
    """An absurd blocksize used to overflow the block-count check (a UBSan report)."""
    t = qx.quantize_nf4(np.ones(256, np.float32))
    t.blocksize = blocksize
    with pytest.raises(ValueError, match="blocksize"):
        qx.dequantize_nf4(t)


def test_dequantize_checks_a_hand_built_tensor_sizes():
    x = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    for field, value, match in [
        ("shape", (8, -64), "shape"), ("shape", (2**40, 2**40), "too many"), ("shape", [8, 64], "shape"),
        ("shape", (9, 64), "packed"), ("packed", np.zeros(256, np.int8), "packed"),
        ("packed", np.zeros(255, np.uint8), "packed"), ("absmax_f32", np.ones(7, np.float32), "absmax_f32"),
        ("absmax_f32", np.ones(8, np.float64), "absmax_f32"),
    ]:
        t = qx.quantize_nf4(x)
        setattr(t, field, value)
        with pytest.raises(ValueError, match=match):
            qx.dequantize_nf4(t)
    t = qx.quantize_nf4(x, double_quant=True)
    t.absmax_nested = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="absmax_nested"):
        qx.dequantize_nf4(t)


@pytest.mark.parametrize("blocksize", [0, -1, 48, 2**62])
def test_compiled_nf4_wrappers_check_blocksize_first(blocksize):
    k = kernels()
    x = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="blocksize"):
        k.nf4_quantize_f32(x, blocksize, np.empty(32, np.uint8), np.empty(1, np.float32), 1)
    with pytest.raises(ValueError, match="blocksize"):
        k.nf4_dequantize(np.empty(32, np.uint8), np.empty(1, np.float32), blocksize, x.copy(), 1)


def test_blockwise8_refuses_non_finite_input_and_bad_blocksize():
    k = kernels()
    code = qx.dynamic_code()
    x = np.ones(10, np.float32)
    x[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        k.blockwise8_quantize(x, 256, code, np.empty(10, np.uint8), np.empty(1, np.float32))
    for bs in (0, -5, 2**62):
        with pytest.raises(ValueError, match="blocksize"):
            k.blockwise8_quantize(np.ones(10, np.float32), bs, code, np.empty(10, np.uint8), np.empty(1, np.float32))


def test_rope_tables_checked_against_ram():
    with pytest.raises(ValueError, match=r"max_positions=1000000000000000.*RAM"):
        K.rope_tables(64, 10**15, 10000.0)
