"""GEMM on the CPU backend at FFN shapes: numpy fp32 sgemm on fp32 weights, the NF4 path below
AVX-512 (dequantize_nf4 into a reused buffer, then the same sgemm), and the fused NF4 kernel
qlora_ext.cpu.base_matmul takes on AVX-512 (forward x Wᵀ and input gradient dy W, compute_dtype
fp32 and bf16), timed in the same run; GFLOP/s in extra_info.  (The wgpu GEMMs are in
bench_gemm.py.)

Shapes y[M, N] = x[M, K] @ W[N, K]^T: SmolLM2-135M gate|up (N 3072, K 576) and down (N 576,
K 1536) at M 256 tokens; QLORA_EXT_BENCH_GEMM_M overrides M."""
import os

import numpy as np
import pytest

import qlora_ext as qx

M = int(os.environ.get("QLORA_EXT_BENCH_GEMM_M", 256))
SHAPES = {"gate_up": (3072, 576), "down": (576, 1536)}


def _case(shape, timed):
    n, k = SHAPES[shape]
    m = M if timed else 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.02))
    return x, w, m, n, k


def _timed(config):
    return config.getoption("benchmark_enable") or not config.getoption("benchmark_disable")


def _rate(benchmark, flop):
    if benchmark.stats is not None:
        benchmark.extra_info["GFLOP_per_s"] = flop / benchmark.stats.stats.median / 1e9


@pytest.mark.benchmark(group="cpu-gemm")
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_sgemm_fp32_weights(benchmark, request, shape):
    x, w, m, n, k = _case(shape, _timed(request.config))
    out = np.empty((m, n), np.float32)
    benchmark.pedantic(np.matmul, args=(x, w.T), kwargs={"out": out}, rounds=10, warmup_rounds=2)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)
    benchmark.extra_info.update(M=m, N=n, K=k)
    _rate(benchmark, 2.0 * m * n * k)


@pytest.mark.benchmark(group="cpu-gemm")
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_nf4_dequant_then_sgemm(benchmark, request, shape):
    x, w, m, n, k = _case(shape, _timed(request.config))
    t = qx.quantize_nf4(w, blocksize=64)
    wbuf = np.empty((n, k), np.float32)
    out = np.empty((m, n), np.float32)

    def step():
        qx.dequantize_nf4(t, out=wbuf, threads=1)
        return np.matmul(x, wbuf.T, out=out)

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    ref = x.astype(np.float64) @ qx.dequantize_nf4(t).T.astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    benchmark.extra_info.update(M=m, N=n, K=k)
    _rate(benchmark, 2.0 * m * n * k)


@pytest.mark.benchmark(group="cpu-gemm")
@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("direction", ["forward", "input_grad"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_nf4_fused(benchmark, request, shape, direction, compute_dtype):
    from qlora_ext.cpu.base_matmul import base_matmul, fused_nf4_available, round_to_bf16

    if not fused_nf4_available():
        pytest.skip("the fused NF4 kernel needs AVX-512")
    x, w, m, n, k = _case(shape, _timed(request.config))
    t = qx.quantize_nf4(w, blocksize=64)
    fwd = direction == "forward"
    a = x if fwd else np.random.default_rng(1).standard_normal((m, n), dtype=np.float32)
    out = np.empty((m, n) if fwd else (m, k), np.float32)
    benchmark.pedantic(base_matmul, args=(a, t, compute_dtype, fwd), kwargs={"out": out}, rounds=10,
                       warmup_rounds=2)
    wd = qx.dequantize_nf4(t)
    if compute_dtype == "bf16":
        a, wd = round_to_bf16(a), round_to_bf16(wd)
    ref = a.astype(np.float64) @ (wd.T if fwd else wd).astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    benchmark.extra_info.update(M=m, N=n, K=k, cpu_level=qx.cpu_features()["active"])
    _rate(benchmark, 2.0 * m * n * k)
