"""GPU row-wise and elementwise kernels of the step, at the memory bandwidth they reach: RMSNorm
forward + backward on hidden rows [N, C] and on per-head q rows [N*H, D] (Qwen3's q norm), RoPE
on q [N, H, D], the residual add on [N, C], NF4 dequantization of a [OUT, IN] weight.  Rates: GB/s of the bytes each kernel
must move (reads + writes once), over the wall time of a round and, where the adapter has
timestamp queries, over the GPU time of its dispatches (gpu_GB_per_s).  PyTorch references on the same machine in the same run where
torch sees a CUDA GPU (HF's RMSNorm and rotate_half RoPE written as HF writes them).
Default sizes are small so that CI runs this on lavapipe as a test; the Qwen3-0.6B step's
shapes (4 x 1024 tokens):
  QLORA_EXT_ROWWISE_BENCH="N=4096,C=1024,H=16,D=128,OUT=3072,IN=1024" \\
  PYTHONPATH=src pytest bench/bench_gpu_rowwise.py --benchmark-enable --benchmark-only"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from bench_small_gemm import kernel_seconds, wait_gpu  # noqa: E402
from bench_support import gpu_context, sizes_from_env  # noqa: E402

pytestmark = pytest.mark.gpu

_DEFAULT = {"N": 64, "C": 96, "H": 4, "D": 32, "OUT": 96, "IN": 64}
_REPS = 20   # dispatches a round: one submit and wait for all of them


S = sizes_from_env("QLORA_EXT_ROWWISE_BENCH", _DEFAULT)
SHAPES = {"hidden": (S["N"], S["C"]), "q-heads": (S["N"] * S["H"], S["D"])}


@pytest.fixture(scope="module")
def ctx():
    return gpu_context()


def _rate(benchmark, nbytes: float, ctx=None, step=None):
    """extra_info GB_per_s: bytes over the median wall time of a round (host recording included,
    which at these sizes can cost more than the GPU work); with ctx (and an adapter with timestamp
    queries), gpu_GB_per_s: bytes over the median GPU time of a round's dispatches (3 more rounds)."""
    if benchmark.stats is None:
        return
    benchmark.extra_info["GB_per_s"] = nbytes * _REPS / benchmark.stats.stats.median / 1e9
    if ctx is not None and ctx.has_timestamps:
        gpu_s = sum(kernel_seconds(ctx, step, 3).values())
        benchmark.extra_info["gpu_GB_per_s"] = nbytes * _REPS / gpu_s / 1e9


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("the PyTorch reference runs on CUDA only")
    return torch


@pytest.mark.benchmark(group="gpu-rmsnorm")
@pytest.mark.parametrize("rows", sorted(SHAPES))
def test_rmsnorm_fwd_bwd_gpu(benchmark, ctx, rows):
    from qlora_ext.gpu.bindings.layer_ops import rmsnorm_backward_gpu, rmsnorm_forward_gpu

    N, C = SHAPES[rows]
    g = np.random.default_rng(0)
    x, dy = (ctx.upload(g.standard_normal((N, C)).astype(np.float32)) for _ in range(2))
    w = ctx.upload(g.standard_normal(C).astype(np.float32))
    y, rstd, dx = ctx.empty((N, C)), ctx.empty((N,)), ctx.empty((N, C))

    def step():
        for _ in range(_REPS):
            rmsnorm_forward_gpu(ctx, x, w, 1e-6, y, rstd)
            rmsnorm_backward_gpu(ctx, x, w, rstd, dy, dx)
        wait_gpu(ctx)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    _rate(benchmark, 4.0 * N * C * 5, ctx, step)   # forward: x in, y out; backward: x, dy in, dx out
    benchmark.extra_info.update(rows=N, cols=C)


@pytest.mark.benchmark(group="gpu-rmsnorm")
@pytest.mark.parametrize("rows", sorted(SHAPES))
def test_rmsnorm_fwd_bwd_torch(benchmark, rows):
    torch = _torch_cuda()
    N, C = SHAPES[rows]
    x = torch.randn(N, C, device="cuda", requires_grad=True)
    w = torch.randn(C, device="cuda")
    dy = torch.randn(N, C, device="cuda")

    def step():
        for _ in range(_REPS):
            var = x.pow(2).mean(-1, keepdim=True)
            y = w * (x * torch.rsqrt(var + 1e-6))
            (gx,) = torch.autograd.grad(y, x, dy)
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    _rate(benchmark, 4.0 * N * C * 5)
    benchmark.extra_info.update(rows=N, cols=C)


def _rope_inputs():
    from qlora_ext.cpu.kernels import rope_tables

    g = np.random.default_rng(1)
    N, H, D = S["N"], S["H"], S["D"]
    return (g.standard_normal((1, N, H, D)).astype(np.float32), np.arange(N, dtype=np.int32),
            rope_tables(D, N, 1e6))


@pytest.mark.benchmark(group="gpu-rope")
def test_rope_gpu(benchmark, ctx):
    from qlora_ext.gpu.bindings.layer_ops import rope_apply_gpu

    x, pos, tab = _rope_inputs()
    gx, gp = ctx.upload(x), ctx.upload(pos, "i32")
    cos, sin = ctx.upload(tab.cos), ctx.upload(tab.sin)

    def step():
        for r in range(_REPS):
            rope_apply_gpu(ctx, gx, gp, cos, sin, 1 if r % 2 == 0 else -1)
        wait_gpu(ctx)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    _rate(benchmark, 4.0 * x.size * 2, ctx, step)   # x in and out (the tables stay in cache)
    benchmark.extra_info.update(tokens=S["N"], heads=S["H"], head_dim=S["D"])


@pytest.mark.benchmark(group="gpu-rope")
def test_rope_torch(benchmark):
    torch = _torch_cuda()
    x, pos, tab = _rope_inputs()
    q = torch.from_numpy(x).cuda().transpose(1, 2)                    # [1, H, N, D] as HF holds it
    half = x.shape[-1] // 2
    cos = torch.from_numpy(np.concatenate([tab.cos, tab.cos], -1)).cuda()[None, None]
    sin = torch.from_numpy(np.concatenate([tab.sin, tab.sin], -1)).cuda()[None, None]

    def step():
        for _ in range(_REPS):
            rot = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
            q * cos + rot * sin
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    _rate(benchmark, 4.0 * x.size * 2)
    benchmark.extra_info.update(tokens=S["N"], heads=S["H"], head_dim=S["D"])


@pytest.mark.benchmark(group="gpu-residual-add")
def test_residual_add_gpu(benchmark, ctx):
    from qlora_ext.gpu.bindings.layer_ops import add_gpu

    N, C = SHAPES["hidden"]
    g = np.random.default_rng(3)
    y, x = (ctx.upload(g.standard_normal((N, C)).astype(np.float32)) for _ in range(2))

    def step():
        for _ in range(_REPS):
            add_gpu(ctx, y, x)
        wait_gpu(ctx)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    _rate(benchmark, 4.0 * N * C * 3, ctx, step)   # y and x in, y out
    benchmark.extra_info.update(rows=N, cols=C)


@pytest.mark.benchmark(group="gpu-nf4-dequant")
def test_nf4_dequant_gpu(benchmark, ctx):
    from qlora_ext.gpu.bindings.weights import WeightScratch, upload_weight
    from qlora_ext.nf4 import quantize_nf4

    shape = (S["OUT"], S["IN"])
    t = quantize_nf4(np.random.default_rng(2).standard_normal(shape).astype(np.float32))
    gw, scratch = upload_weight(ctx, t), WeightScratch(ctx, [shape])

    def step():
        for _ in range(_REPS):
            scratch.fp32(gw)
        wait_gpu(ctx)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    n = shape[0] * shape[1]
    _rate(benchmark, n * 4.0 + n / 2 + 4.0 * n / t.blocksize, ctx, step)   # fp32 out, packed nibbles and absmax in
    benchmark.extra_info.update(out=shape[0], inp=shape[1])
