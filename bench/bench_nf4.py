"""NF4 quantize/dequantize throughput against bitsandbytes' CPU kernels and memcpy.

Targets (DESIGN.md): dequantize >= 10x bitsandbytes' CPU dequantize_4bit and >= 70% of the
machine's memcpy bandwidth (bytes read + written); quantize >= 20x bitsandbytes quantize_4bit.
Size: 64 Mi elements (QLORA_EXT_BENCH_NF4_ELEMS overrides for quick runs)."""
import os

import numpy as np
import pytest

import qlora_ext as qx

N = int(os.environ.get("QLORA_EXT_BENCH_NF4_ELEMS", 64 * 2**20))
BLOCKSIZE = 64


@pytest.fixture(scope="module")
def weights(request):
    # untimed runs (the test suite) only check that the benchmarks work: 1 Mi elements
    cfg = request.config
    timed = cfg.getoption("benchmark_enable") or not cfg.getoption("benchmark_disable")
    n = N if timed else 1 << 20
    return np.random.default_rng(0).standard_normal(n).astype(np.float32)


@pytest.fixture(scope="module")
def quantized(weights):
    return qx.quantize_nf4(weights, blocksize=BLOCKSIZE)


def _rate(benchmark, elems, nbytes):
    if benchmark.stats is None:  # --benchmark-disable: ran once as a test, nothing timed
        return
    s = benchmark.stats.stats.median
    benchmark.extra_info["Gelem_per_s"] = elems / s / 1e9
    benchmark.extra_info["GB_per_s"] = nbytes / s / 1e9
    benchmark.extra_info["elements"] = elems


@pytest.mark.benchmark(group="nf4-dequantize")
def test_memcpy(benchmark, weights):
    """numpy copy of the dequantized output size (read + write of 4 bytes per element)."""
    dst = np.empty_like(weights)
    benchmark.pedantic(np.copyto, args=(dst, weights), rounds=10, warmup_rounds=2)
    _rate(benchmark, weights.size, 2 * weights.nbytes)


@pytest.mark.benchmark(group="nf4-dequantize")
def test_dequantize(benchmark, quantized):
    out = np.empty(quantized.shape, np.float32)
    benchmark.pedantic(qx.dequantize_nf4, args=(quantized,), kwargs={"out": out}, rounds=10, warmup_rounds=2)
    _rate(benchmark, out.size, quantized.nbytes + out.nbytes)


@pytest.mark.benchmark(group="nf4-dequantize")
def test_dequantize_bitsandbytes(benchmark, weights):
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    packed, state = F.quantize_4bit(torch.from_numpy(weights), blocksize=BLOCKSIZE, quant_type="nf4")
    benchmark.pedantic(F.dequantize_4bit, args=(packed, state), rounds=5, warmup_rounds=2)
    _rate(benchmark, weights.size, packed.numel() + state.absmax.numel() * 4 + weights.nbytes)


@pytest.mark.benchmark(group="nf4-quantize")
def test_quantize(benchmark, weights):
    benchmark.pedantic(qx.quantize_nf4, args=(weights,), kwargs={"blocksize": BLOCKSIZE}, rounds=5, warmup_rounds=1)
    _rate(benchmark, weights.size, weights.nbytes + weights.size // 2)


@pytest.mark.benchmark(group="nf4-quantize")
def test_quantize_bitsandbytes(benchmark, weights):
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    x = torch.from_numpy(weights)
    benchmark.pedantic(F.quantize_4bit, args=(x,), kwargs={"blocksize": BLOCKSIZE, "quant_type": "nf4"},
                       rounds=3, warmup_rounds=1)
    _rate(benchmark, weights.size, weights.nbytes + weights.size // 2)
