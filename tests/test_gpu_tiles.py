"""The gpu placement's per-shape GEMM tiles (kernels.StepGemmTiles): the choice per shape, and
the NF4 GEMM with the LoRA epilogue (kernels.gemm on the weights kept on the GPU) under
each tile setting that fits the adapter, against float64 numpy."""
import dataclasses

import numpy as np
import pytest

from gpu_support import rel_err

pytestmark = pytest.mark.gpu


def test_step_gemm_tiles_choice(ctx, monkeypatch):
    from qlora_ext.gpu.kernels import StepGemmTiles

    ch = StepGemmTiles(ctx)
    if ctx.info["software"]:
        assert not ch.own and ch(4096, 1024) == ch.fallback(4096, 1024)
    ch.own = True   # the rule itself, as on a real GPU
    assert ch(2048, 151936, 1024, False, True) == StepGemmTiles.F32_128   # logits (x · Wᵀ)
    assert ch(2048, 151936, 1024, False) == StepGemmTiles.F32_64        # B stored [K, N], N wide
    assert ch(1024, 2560, 151936, False) == StepGemmTiles.F32_THIN  # 4B dhidden: 160 groups
    assert ch(2048, 1024, 151936, False) == StepGemmTiles.F32_THIN  # 0.6B dhidden: 128 groups
    assert ch(2048, 1024, 151936, True) == StepGemmTiles.SMALL
    # few token rows (SmolLM2-135M at 256 / 1024 rows): K split to reach SPLIT_GRID workgroups
    for M, N, splits in ((256, 576, 8), (256, 49152 // 100, 8), (1024, 576, 4), (1024, 1536, 2), (1, 1, 8)):
        assert ch(M, N, 576, False) == dataclasses.replace(StepGemmTiles.F32_SPLIT, splits=splits), (M, N)
        assert ch(M, N, 576, True) == StepGemmTiles.SMALL
    for M, N in ((4096, 1024), (4096, 9728), (4096, 2560), (1600, 2048)):
        assert ch(M, N, 1024, True) == StepGemmTiles.BIG, (M, N)
        assert ch(M, N, 1024, False, True) == StepGemmTiles.F32_128, (M, N)
        assert ch(M, N, 1024, True, True) == StepGemmTiles.BIG, (M, N)
    # dx = dy · W (B stored [K, N]): 128 x 128 up to K 3072 and N 4096 (Qwen3-0.6B's dx
    # shapes, 4B's o.dx and k.dx), 64 x 128 past either (4B's q, gate and down dx)
    for N, K in ((1024, 2048), (1024, 1024), (2048, 1024), (1024, 3072), (3072, 1024), (4096, 2560), (2560, 1024)):
        assert ch(4096, N, K, False) == StepGemmTiles.F32_128, (N, K)
    for N, K in ((2560, 4096), (2560, 9728), (9728, 2560), (4097, 1024), (1024, 3073)):
        assert ch(4096, N, K, False) == StepGemmTiles.F32_64, (N, K)
    monkeypatch.setattr(ctx, "tuning", dataclasses.replace(ctx.tuning, gemm_tiles=(8, 8, 4, 4, 8)))
    assert not StepGemmTiles(ctx).own                             # benchmarks' override wins


@pytest.mark.parametrize("which", ["BIG", "SMALL"])
@pytest.mark.parametrize("b_t,M,N,K", [(True, 67, 200, 136), (False, 45, 136, 264)])
def test_nf4_lora_gemm_each_tile_setting(ctx, which, b_t, M, N, K):
    from qlora_ext.gpu.kernels import Operand, StepGemmTiles, gemm
    from qlora_ext.gpu.bindings.weights import upload_weight
    from qlora_ext.nf4 import dequantize_nf4, quantize_nf4

    tiles = getattr(StepGemmTiles, which)
    try:
        tiles.check(ctx)
    except ValueError as e:
        pytest.skip(f"{tiles} does not fit {ctx.describe()}: {e}")
    g = np.random.default_rng(M + N + K)
    out, inn = (N, K) if b_t else (K, N)
    wq = quantize_nf4(g.standard_normal((out, inn)).astype(np.float32) * 0.05)
    W = dequantize_nf4(wq).astype(np.float64)
    a = g.standard_normal((M, K)).astype(np.float32)
    R = 16
    T = g.standard_normal((M, R)).astype(np.float32)
    L = g.standard_normal((N, R) if b_t else (R, N)).astype(np.float32)   # mode 1: [N, R]; 2: [R, N]
    params = np.zeros(64 + L.size, np.float32)
    params[64:] = L.ravel()
    c = ctx.empty((M, N))
    gemm(ctx, M, N, K, Operand(ctx.upload(a)), upload_weight(ctx, wq).operand(), Operand(c), b_t=b_t,
         lora=(Operand(ctx.upload(T)), R, Operand(ctx.upload(params), 64), 1 if b_t else 2), tiles=tiles)
    ref = a.astype(np.float64) @ (W.T if b_t else W) + T.astype(np.float64) @ (L.T if b_t else L)
    assert rel_err(ctx.to_numpy(c), ref) <= 2e-6
