"""The GEMMs of the gpu placement's training step at their exact shapes (M = B·T = 4096 token rows),
timed per kernel with GPU timestamp queries through the GpuContext (what the engine records),
for a list of tile settings:

  --fused   qlora_ext.gpu.kernels.gemm (gemm.wgsl with NF4 B, gemm_f32.wgsl with fp32 B): the 7 NF4
            projections forward (N = out, K = in, LoRA B as extra K tiles) and backward dx (N = in,
            K = out, LoRA A), and the fp32 LM head (logits: N = V, K = H; dhidden: N = H, K = V) at the
            engine's chunk rows (2048 at H = 1024, 1024 at H = 2560).
  --lora    the rank-r products per projection via gemm_gpu, u = s·x Aᵀ, dB += dyᵀ u,
            du = s·dy B, dA += duᵀ x: gemm_gpu's choice ("current": small_gemm.wgsl's `skinny`
            at few rows, rank_gemm.wgsl above gemm._SKINNY_MAX_ELEMS), `skinny` forced, and
            forced small_gemm.wgsl `gemm` tiles with split K and its summing pass (LORA_SPLIT_K)
            as references.

    python bench/bench_small_gemm.py --fused --lora --shapes qwen3-0.6b,qwen3-4b --json out.json

Each row: the kernel's GPU seconds (median of `reps` dispatches), TFLOP/s and, for --lora, the
bytes of its big operand over the time (GB/s).  The rows marked "current" are the choices in
the code as it stands.  pytest-benchmark: `pytest bench/bench_small_gemm.py --benchmark-only`
times the LoRA products' current choice at a Qwen3-0.6B projection (a shape shrunk to lavapipe
on a software adapter), GB/s and GFLOP/s in extra_info.

Measured 2026-11-26 on an NVIDIA H100 80GB HBM3 (Vulkan, wgpu 0.32, trusted shaders):
--fused: kernels.StepGemmTiles 25.0-26.9 TFLOP/s on every NF4 projection GEMM of both Qwen3
shapes (the split mode's TileChooser: 20.7-25.6), LM head logits 29.2/29.7 (28.6), dhidden
24.7/21.1 (24.1/21.1).  --lora, `gemm` with split K: 16 x 256 tiles, TK 8, split (1024, 64):
45 / 103 ms of LoRA products per step at 0.6B / 4B shapes (64 x 64, (256, 256): 70 / 238 ms)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from qlora_ext.gpu.kernels import GemmTiles, Operand, gemm, step_gemm_tiles  # noqa: E402
from qlora_ext.gpu.bindings.gemm import gemm_gpu  # noqa: E402
from qlora_ext.gpu.bindings.weights import GpuWeight  # noqa: E402
from qlora_ext.gpu.runtime import GpuContext, shared_context, unavailable_reason  # noqa: E402

# (hidden, intermediate, q heads, kv heads, head dim, LM-head chunk rows, vocab, token rows,
# layers); "tiny" is a smoke test of this script on a software adapter
MODELS = {"qwen3-0.6b": (1024, 3072, 16, 8, 128, 2048, 151936, 4096, 28),
          "qwen3-4b": (2560, 9728, 32, 8, 128, 1024, 151936, 4096, 36),
          "smollm2-135m": (576, 1536, 9, 3, 64, 2048, 49152, 4096, 30),
          "tiny": (64, 96, 4, 2, 16, 64, 1000, 257, 2)}
FUSED_SWEEP = [(16, 16, 8, 8, 8), (16, 16, 4, 8, 8), (16, 16, 8, 8, 16), (16, 16, 4, 8, 16), (16, 8, 8, 8, 16),
               (8, 16, 8, 8, 16), (16, 16, 8, 16, 8), (16, 16, 16, 8, 8), (8, 8, 8, 8, 16), (32, 8, 4, 8, 16),
               (16, 16, 4, 4, 16), (16, 16, 8, 4, 8), (8, 16, 8, 8, 8), (16, 8, 8, 8, 8), (8, 8, 8, 8, 8)]
# References: (short side, long side, TK) of forced `gemm` tiles for the rank side with (target
# groups, min K per split): the split-K path that `skinny` (few rows) and rank_gemm.wgsl (many)
# replace for these products (the first was its best setting in the H100 sweep)
LORA_SPLIT_K = [((16, 256, 8), (1024, 64)), ((64, 64, 16), (256, 256)), ((16, 256, 16), (1024, 64)),
                ((16, 256, 32), (1024, 64)), ((16, 256, 16), (512, 128)), ((16, 128, 16), (1024, 64)),
                ((16, 256, 8), (2048, 32))]


def projections(model):
    H, F, hq, hkv, d = MODELS[model][:5]
    # (name, in, out)
    return [("q", H, hq * d), ("k", H, hkv * d), ("v", H, hkv * d), ("o", hq * d, H),
            ("gate", H, F), ("up", H, F), ("down", F, H)]


def fill(ctx, n, rng, scale=1.0, dtype=np.float32):
    """A tensor of n elements from a repeated random block (the values do not change speed)."""
    block = (rng.standard_normal(min(n, 1 << 20)) * scale).astype(np.float32)
    return ctx.upload(np.resize(block, n).astype(dtype, copy=False))


def wait_gpu(ctx):
    """Submit and wait until the GPU is done (a 4-byte read back waits for the queue; wgpu
    0.32's on_submitted_work_done_sync is broken: GPU.md)."""
    ctx.to_numpy(ctx.cached("bench wait", lambda: ctx.empty((1,))))


def kernel_seconds(ctx, record, reps):
    """{kernel: median GPU seconds per call} over `reps` calls, each pass timestamped."""
    record()   # compiles the pipelines
    wait_gpu(ctx)
    per = {}
    for _ in range(reps):
        ctx.enable_timing(True)
        record()
        for k, (s, _) in ctx.kernel_times().items():
            per.setdefault(k, []).append(s)
        ctx.enable_timing(False)
    return {k: statistics.median(v) for k, v in per.items()}


def sweep_fused(ctx, model, tiles_list, reps, log, json_path):
    H, F, hq, hkv, d, chunk, V, M, _ = MODELS[model]
    rng = np.random.default_rng(0)
    r = 16
    a = fill(ctx, M * max(F, hq * d, H), rng)
    c = ctx.empty((M * max(F, hq * d, H),))
    t = fill(ctx, M * r, rng, 0.1)
    params = fill(ctx, r * max(F, hq * d), rng, 0.01)
    cases = []
    for name, inn, out in projections(model):
        n = out * inn
        w = GpuWeight((out, inn), packed=ctx.upload(rng.integers(0, 2**32, (n + 7) // 8, dtype=np.uint32)),
                           absmax=ctx.upload(rng.uniform(0.02, 0.06, (n + 63) // 64).astype(np.float32)))
        cases.append((f"{name}.fwd", M, out, inn, w, True, (Operand(t), r, Operand(params), 1)))
        cases.append((f"{name}.dx", M, inn, out, w, False, (Operand(t), r, Operand(params), 2)))
    wl = GpuWeight((V, H), fp32=fill(ctx, V * H, rng, 0.02))
    logits = ctx.empty((chunk * V,))
    cases.append(("lm.logits", chunk, V, H, wl, True, None))
    cases.append(("lm.dhidden", chunk, H, V, wl, False, None))
    for name, Mc, N, K, w, b_t, lora in cases:
        av, cv = (logits, a) if name == "lm.dhidden" else (a, logits if name == "lm.logits" else c)
        current = step_gemm_tiles(ctx)(Mc, N, K, w.fp32 is None)
        rows = []
        for tl in tiles_list:
            tiles = GemmTiles(*tl)
            try:
                tiles.check(ctx)
            except ValueError:
                continue
            rec = lambda: gemm(ctx, Mc, N, K, Operand(av), w.operand(), Operand(cv), b_t=b_t, lora=lora,  # noqa: E731
                               tiles=tiles)
            s = sum(kernel_seconds(ctx, rec, reps).values())   # gemm.wgsl (NF4) or gemm_f32.wgsl
            flop = 2.0 * Mc * N * K + (2.0 * Mc * N * r if lora else 0.0)
            row = {"kind": "fused", "model": model, "gemm": name, "M": Mc, "N": N, "K": K, "b_t": b_t,
                   "tiles": list(tl), "current": tiles == current, "s": s, "tflops": flop / s / 1e12}
            rows.append(row)
            log.append(row)
        best = min(rows, key=lambda x: x["s"])
        cur = next((x for x in rows if x["current"]), None)
        print(f"{model} {name:10s} M={Mc} N={N} K={K}: current {current.bm}x{current.bn} "
              f"{cur['tflops'] if cur else float('nan'):6.2f} TFLOP/s; best {best['tiles']} {best['tflops']:6.2f} "
              "(" + "  ".join("{}:{:.1f}".format(tuple(x["tiles"]), x["tflops"])
                              for x in sorted(rows, key=lambda x: x["s"])[:4]) + ")",
              flush=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(log, f)


def lora_calls(ctx, M, inn, out, r, bufs, tiles=None, split=None, skinny=False):
    """The engine's four rank-r products for one projection (gpu_device.py linear_*), as
    {name: (record, flop, big-operand bytes)}; tiles / split force `gemm`, skinny `skinny`."""
    x, dy, p, g, u, du = bufs
    a_off, b_off = 0, r * inn + 60

    def pick(Mc, N):
        if tiles is None:
            return None
        s, l, tk = tiles
        return (l, s, tk) if N <= Mc else (s, l, tk)

    kw = lambda Mc, N: dict(tiles=pick(Mc, N), split=split, skinny=skinny)  # noqa: E731
    return {
        "u": (lambda: gemm_gpu(ctx, x, p, u, M, r, inn, trans_b=True, alpha=2.0, b_off=a_off, **kw(M, r)),
              2.0 * M * r * inn, 4 * M * inn),
        "dB": (lambda: gemm_gpu(ctx, dy, u, g, out, r, M, trans_a=True, accumulate=True, c_off=b_off, **kw(out, r)),
               2.0 * M * r * out, 4 * M * out),
        "du": (lambda: gemm_gpu(ctx, dy, p, du, M, r, out, alpha=2.0, b_off=b_off, **kw(M, r)),
               2.0 * M * r * out, 4 * M * out),
        "dA": (lambda: gemm_gpu(ctx, du, x, g, r, inn, M, trans_a=True, accumulate=True, c_off=a_off, **kw(r, inn)),
               2.0 * M * r * inn, 4 * M * inn),
    }


def sweep_lora(ctx, model, reps, log, json_path, r=16, rows=None):
    H, F, hq, hkv, d, _, _, M, layers = MODELS[model]
    M = rows or M
    rng = np.random.default_rng(1)
    big = max(F, hq * d, H)
    bufs = (fill(ctx, M * big, rng), fill(ctx, M * big, rng), fill(ctx, 2 * r * big + 64, rng, 0.01),
            ctx.zeros((2 * r * big + 64,)), ctx.empty((M, r)), ctx.empty((M, r)))
    configs = ([("current", {}), ("skinny", {"skinny": True})]
               + [(f"gemm {t}/{s}", {"tiles": t, "split": s}) for t, s in LORA_SPLIT_K])
    totals = {}
    seen = set()
    for pname, inn, out in projections(model):
        if (inn, out) in seen:
            continue
        count = sum(1 for _, i, o in projections(model) if (i, o) == (inn, out))
        seen.add((inn, out))
        for label, opts in configs:
            try:
                calls = lora_calls(ctx, M, inn, out, r, bufs, **opts)
                for op, (rec, flop, nbytes) in calls.items():
                    ks = kernel_seconds(ctx, rec, reps)
                    s = sum(v for k, v in ks.items() if k.startswith(("small_gemm.", "rank_gemm.")))
                    row = {"kind": "lora", "model": model, "M": M, "proj": pname, "in": inn, "out": out, "op": op,
                           "config": label, "s": s, "kernels": ks, "tflops": flop / s / 1e12,
                           "gbps": nbytes / s / 1e9}
                    log.append(row)
                    totals[label] = totals.get(label, 0.0) + count * s
            except ValueError as e:
                print(f"skip {label}: {e}")
        cur = [x for x in log if x.get("kind") == "lora" and x["model"] == model and x["M"] == M and x["proj"] == pname
               and x["config"] == "current"]
        print(f"{model} M={M} {pname:5s} in={inn} out={out} current: " + "  ".join(
            f"{x['op']} {x['s'] * 1e6:.1f} us {x['gbps']:.0f} GB/s {x['tflops']:.2f} TFLOP/s" for x in cur),
              flush=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(log, f)
    ranked = sorted(totals.items(), key=lambda kv: kv[1])
    print(f"{model} M={M}: LoRA products per step (x{layers} layers), current {totals['current'] * layers * 1e3:.1f} ms; "
          "best: " + "  ".join(f"{k} {v * layers * 1e3:.1f} ms" for k, v in ranked[:6]), flush=True)
    log.append({"kind": "lora_total", "model": model, "M": M, "ms_per_step": {k: v * layers * 1e3 for k, v in ranked}})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--shapes", default="qwen3-0.6b,qwen3-4b")
    ap.add_argument("--tiles", default=None, help="--fused configs 'wgx,wgy,tm,tn,bk;...' (default: FUSED_SWEEP)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", default=None, help="--lora: token rows, comma-separated (default: each shape's 4096)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    ctx = GpuContext()
    if not ctx.has_timestamps:
        raise SystemExit(f"{ctx.describe()} has no timestamp-query feature")
    log = [{"adapter": ctx.info, "trusted": ctx.trusted}]
    print(ctx.info, "trusted", ctx.trusted, flush=True)
    tiles_list = ([tuple(int(v) for v in s.split(",")) for s in a.tiles.split(";")] if a.tiles else FUSED_SWEEP)
    for model in a.shapes.split(","):
        if a.lora:
            for rows in (a.rows.split(",") if a.rows else [None]):
                sweep_lora(ctx, model, a.reps, log, a.json, rows=int(rows) if rows else None)
        if a.fused:
            sweep_fused(ctx, model, tiles_list, a.reps, log, a.json)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(log, f)


# -- pytest-benchmark: the LoRA products at one projection ------------------------------------------
# (M tokens, in, out, r): a Qwen3-0.6B q projection at 4 x 1024 tokens on a GPU; on a software
# adapter a shape it runs in seconds
_RATE_SHAPES = {"gpu": (4096, 1024, 2048, 16), "cpu": (512, 256, 384, 16)}


def test_lora_products_rate(benchmark):
    """The four rank-r products with gemm_gpu's choice (on a GPU at this size: rank_gemm.wgsl),
    against `gemm` with the sweep's first setting (16 x 256 tiles, TK 8, split (1024, 64)) and
    numpy float32 in the same run; GB/s counts each product's big operand once."""
    import time

    import pytest

    if unavailable_reason():
        pytest.skip(unavailable_reason())
    ctx = shared_context()
    rng = np.random.default_rng(0)
    M, inn, out, r = _RATE_SHAPES["cpu" if ctx.software else "gpu"]
    big = max(inn, out)
    bufs = (fill(ctx, M * big, rng), fill(ctx, M * big, rng), fill(ctx, 2 * r * big + 64, rng, 0.01),
            ctx.zeros((2 * r * big + 64,)), ctx.empty((M, r)), ctx.empty((M, r)))

    def run(tiles=None, split=None):
        t0 = time.perf_counter()
        for rec, _, _ in lora_calls(ctx, M, inn, out, r, bufs, tiles, split).values():
            rec()
        wait_gpu(ctx)
        return time.perf_counter() - t0

    calls = lora_calls(ctx, M, inn, out, r, bufs).values()
    flop = sum(f for _, f, _ in calls)
    nbytes = sum(b for _, _, b in calls)
    split_k = LORA_SPLIT_K[0]
    run()
    run(*split_k)
    s = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    ref = min(run(*split_k) for _ in range(3))
    x = rng.standard_normal((M, inn), dtype=np.float32)
    dy = rng.standard_normal((M, out), dtype=np.float32)
    A = rng.standard_normal((r, inn), dtype=np.float32)
    B = rng.standard_normal((out, r), dtype=np.float32)
    t0 = time.perf_counter()
    u = x @ A.T
    dy.T @ u
    du = dy @ B
    du.T @ x
    host = time.perf_counter() - t0
    benchmark.extra_info.update({"adapter": ctx.info["name"], "M": M, "in": inn, "out": out, "r": r,
                                 "GB_per_s": nbytes / s / 1e9, "GFLOP_per_s": flop / s / 1e9,
                                 "split_k_GB_per_s": nbytes / ref / 1e9, "split_k_GFLOP_per_s": flop / ref / 1e9,
                                 "numpy_GFLOP_per_s": flop / host / 1e9})


if __name__ == "__main__":
    main()
