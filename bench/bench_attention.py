"""Causal GQA attention forward + backward against PyTorch's scaled_dot_product_attention on
the same cores, same shapes, same run.

Target (DESIGN.md): at batch 1, T 512 and 2048, 16 query heads, 8 KV heads, head_dim 128,
our forward + backward is faster than torch SDPA forward + backward.
Threads: QLORA_EXT_THREADS if set, else all cores, for both (torch.set_num_threads).
FLOPs counted: forward 2 products (Q K^T, P V), backward 5 (Q K^T again, dO V^T, P^T dO,
dS K, dS^T Q), each 2 * T^2 * D per head halved by causality: 7 * B * Hq * T^2 * D in all.
Run: PYTHONPATH=src python -m pytest bench/bench_attention.py --benchmark-enable --benchmark-only"""
import numpy as np
import pytest

from qlora_ext._native import default_threads
from qlora_ext.cpu import kernels as K

B, HQ, HKV, D = 1, 16, 8, 128
THREADS = default_threads()


def _inputs(T):
    rng = np.random.default_rng(T)
    q = rng.standard_normal((B, T, HQ, D)).astype(np.float32)
    k = rng.standard_normal((B, T, HKV, D)).astype(np.float32)
    v = rng.standard_normal((B, T, HKV, D)).astype(np.float32)
    do = rng.standard_normal((B, T, HQ, D)).astype(np.float32)
    return q, k, v, do


def _rate(benchmark, T, products):
    if benchmark.stats is None:  # --benchmark-disable: ran once as a test, nothing timed
        return
    s = benchmark.stats.stats.median
    flop = products * B * HQ * T * T * D
    benchmark.extra_info.update(GFLOP_per_s=flop / s / 1e9, T=T, heads=HQ, kv_heads=HKV,
                                head_dim=D, threads=THREADS)


def _rounds(T):
    return (10, 2) if T <= 512 else (4, 1)


@pytest.mark.parametrize("T", [512, 2048])
@pytest.mark.benchmark(group="attention-fwd-bwd")
def test_attention_fwd_bwd(benchmark, T):
    q, k, v, do = _inputs(T)

    def step():
        out, lse = K.attention_forward(q, k, v, threads=THREADS)
        return K.attention_backward(q, k, v, out, lse, do, threads=THREADS)

    rounds, warm = _rounds(T)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warm)
    _rate(benchmark, T, 7)


@pytest.mark.parametrize("T", [512, 2048])
@pytest.mark.benchmark(group="attention-fwd-bwd")
def test_attention_fwd_bwd_torch_sdpa(benchmark, T):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(THREADS)
    q, k, v, do = _inputs(T)
    # torch's native layout (B, H, T, D), contiguous, prepared outside the timed region
    qt, kt, vt = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()).requires_grad_(True) for a in (q, k, v))
    dot = torch.from_numpy(do.transpose(0, 2, 1, 3).copy())
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def step():
        for t in (qt, kt, vt):
            t.grad = None
        out = sdpa(qt, kt, vt, is_causal=True, enable_gqa=True)
        out.backward(dot)

    rounds, warm = _rounds(T)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warm)
    _rate(benchmark, T, 7)


@pytest.mark.parametrize("T", [512, 2048])
@pytest.mark.benchmark(group="attention-fwd")
def test_attention_fwd(benchmark, T):
    q, k, v, _ = _inputs(T)
    rounds, warm = _rounds(T)
    benchmark.pedantic(K.attention_forward, args=(q, k, v), kwargs={"threads": THREADS},
                       rounds=rounds, warmup_rounds=warm)
    _rate(benchmark, T, 2)


@pytest.mark.parametrize("T", [512, 2048])
@pytest.mark.benchmark(group="attention-fwd")
def test_attention_fwd_torch_sdpa(benchmark, T):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(THREADS)
    q, k, v, _ = _inputs(T)
    qt, kt, vt = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()) for a in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def step():
        with torch.no_grad():
            return sdpa(qt, kt, vt, is_causal=True, enable_gqa=True)

    rounds, warm = _rounds(T)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warm)
    _rate(benchmark, T, 2)
