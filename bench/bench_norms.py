"""RMSNorm and RoPE forward + backward throughput, against the same math in PyTorch ops (HF's
LlamaRMSNorm and apply_rotary_pos_emb formulas) on the same cores, same run.
Rates: Gelem/s over the activation's elements.
Run: PYTHONPATH=src python -m pytest bench/bench_norms.py --benchmark-enable --benchmark-only"""
import numpy as np
import pytest

from qlora_ext._native import default_threads
from qlora_ext.cpu import kernels as K

THREADS = default_threads()
N, C = 4096, 2048             # rows x hidden (RMSNorm)
RB, RT, RH, RD = 1, 2048, 16, 128  # RoPE on q (B, T, H, D)


def _rate(benchmark, elems):
    if benchmark.stats is None:  # --benchmark-disable: ran once as a test, nothing timed
        return
    benchmark.extra_info.update(Gelem_per_s=elems / benchmark.stats.stats.median / 1e9,
                                threads=THREADS)


@pytest.fixture(scope="module")
def norm_inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((N, C)).astype(np.float32), rng.standard_normal(C).astype(np.float32),
            rng.standard_normal((N, C)).astype(np.float32))


@pytest.mark.benchmark(group="rmsnorm-fwd-bwd")
def test_rmsnorm_fwd_bwd(benchmark, norm_inputs):
    x, w, dy = norm_inputs

    def step():
        y, rstd = K.rmsnorm_forward(x, w, 1e-6, threads=THREADS)
        return K.rmsnorm_backward(x, w, rstd, dy, weight_grad=True, threads=THREADS)

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    _rate(benchmark, N * C)


@pytest.mark.benchmark(group="rmsnorm-fwd-bwd")
def test_rmsnorm_fwd_bwd_torch(benchmark, norm_inputs):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(THREADS)
    x, w, dy = norm_inputs
    xt, wt, dyt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(w).requires_grad_(True), torch.from_numpy(dy)

    def step():
        xt.grad = wt.grad = None
        var = xt.pow(2).mean(-1, keepdim=True)
        y = wt * (xt * torch.rsqrt(var + 1e-6))
        y.backward(dyt)

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    _rate(benchmark, N * C)


@pytest.fixture(scope="module")
def rope_inputs():
    rng = np.random.default_rng(1)
    tables = K.rope_tables(RD, RT, 500000.0)
    return rng.standard_normal((RB, RT, RH, RD)).astype(np.float32), np.arange(RT), tables


@pytest.mark.benchmark(group="rope-fwd-bwd")
def test_rope_fwd_bwd(benchmark, rope_inputs):
    x, pos, tables = rope_inputs
    x = x.copy()

    def step():
        K.rope_forward(x, pos, tables, threads=THREADS)
        K.rope_backward(x, pos, tables, threads=THREADS)

    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    _rate(benchmark, x.size)


@pytest.mark.benchmark(group="rope-fwd-bwd")
def test_rope_fwd_bwd_torch(benchmark, rope_inputs):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(THREADS)
    x, pos, tables = rope_inputs
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    cos = torch.from_numpy(np.concatenate([tables.cos, tables.cos], -1))[None, :, None, :]
    sin = torch.from_numpy(np.concatenate([tables.sin, tables.sin], -1))[None, :, None, :]
    dy = torch.ones_like(xt)

    def rotate_half(t):
        return torch.cat((-t[..., RD // 2:], t[..., : RD // 2]), dim=-1)

    def step():
        xt.grad = None
        y = xt * cos + rotate_half(xt) * sin
        y.backward(dy)

    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
    _rate(benchmark, x.size)
