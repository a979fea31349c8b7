"""The training step's GEMMs against cuBLAS fp32 (torch, TF32 off) at the same shapes in the
same run: the 7 NF4 projections forward (x · Wᵀ, LoRA B as extra K tiles) and backward dx
(dy · W, LoRA A), M = 4096 token rows, and the fp32 LM head (logits x · Wᵀ, N = vocab; dhidden
dlogits · W, K = vocab) at the engine's chunk rows.  Shapes that repeat (k/v, gate/up) are
timed once.

Each GEMM is timed with GPU timestamp queries (median of --reps calls) for a list of variants:
`current` is what the gpu placement's step records (NF4: the weight dequantized into the fp32
scratch, shaders/nf4.wgsl, then shaders/gemm_f32.wgsl with kernels.step_gemm_tiles'
choice; the row's time is both kernels); a variant `label=wgx,wgy,tm,tn,bk[,unroll=0][,splits=s]`
runs gemm_f32.wgsl with those tiles on the fp32 weight (at NF4 shapes the dequantized one; the
row's time is the GEMM alone, `dequant_s` of the shape is logged apart); `nf4:label=...` runs
shaders/gemm.wgsl with NF4 B dequantized in the tile loads (the `fused` GEMM).  Split variants
run only where the unsplit grid has fewer than 2 workgroups per SM (264).
TFLOP/s count 2·M·N·K for ours and cuBLAS alike (the LoRA term's 2·M·N·r is extra work of
ours, not counted).

    python bench/bench_gemm_ceiling.py --json out.json [--variants "current;label=16,16,8,8,16,unroll=0;..."]
    python bench/bench_gemm_ceiling.py --table out.json     # BENCHMARKS.md rows

pytest runs `test_gemm_ceiling_smoke` once on a software adapter (a tiny shape, all paths)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from bench_gemm import cublas_time  # noqa: E402
from bench_small_gemm import MODELS, fill, kernel_seconds, projections  # noqa: E402

from qlora_ext.gpu import kernels  # noqa: E402
from qlora_ext.gpu.kernels import GemmTiles, Operand  # noqa: E402
from qlora_ext.gpu.bindings.weights import GpuWeight, WeightScratch  # noqa: E402

RANK = 16
DEFAULT_VARIANTS = "current"
FULL_GRID = 264     # 2 workgroups per SM of an H200


def parse_variants(text: str):
    """'label=wgx,wgy,tm,tn,bk[,unroll=0][,splits=s];...' -> [(label, GemmTiles | None)];
    label 'current' alone is the step's choice; a label starting 'nf4:' runs the NF4 GEMM."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        if item == "current":
            out.append(("current", None))
            continue
        label, _, spec = item.partition("=")
        parts = spec.split(",")
        kw = {}
        for kv in parts[5:]:
            k, _, v = kv.partition("=")
            if k not in ("unroll", "splits"):
                raise ValueError(f"variant {label}: unknown key {k!r}")
            kw[k] = int(v) if k == "splits" else bool(int(v))
        out.append((label, GemmTiles(*[int(v) for v in parts[:5]], **kw)))
    return out


def step_shapes(model: str, rows: int | None = None):
    """[(name, M, N, K, b_t, nf4, lora)] of one training step, repeats removed; rows: the
    step's token rows (None: the model's 4 x 1024), the LM head's chunk at most that."""
    H, F, hq, hkv, d, chunk, V, M, _ = MODELS[model]
    if rows:
        M, chunk = rows, min(chunk, rows)
    seen, out = set(), []
    for name, inn, out_f in projections(model):
        for case in ((f"{name}.fwd", M, out_f, inn, True, True, 1), (f"{name}.dx", M, inn, out_f, False, True, 2)):
            if case[1:] not in seen:
                seen.add(case[1:])
                out.append(case)
    out.append(("lm.logits", chunk, V, H, True, False, 0))
    out.append(("lm.dhidden", chunk, H, V, False, False, 0))
    return out


def run_shape(ctx, case, variants, reps, rng, bufs):
    """(rows, dequant seconds or None) of one GEMM shape."""
    name, M, N, K, b_t, nf4, lmode = case
    a_buf, c_buf, t, params, split_buf, scratch = bufs
    if nf4:
        out_f, inn = (N, K) if b_t else (K, N)
        n = out_f * inn
        w = GpuWeight((out_f, inn), packed=ctx.upload(rng.integers(0, 2**32, (n + 7) // 8, dtype=np.uint32)),
                      absmax=ctx.upload(rng.uniform(0.02, 0.06, (n + 63) // 64).astype(np.float32)))
        deq = kernel_seconds(ctx, lambda: scratch.fp32(w), reps)["nf4.dequant"]
    else:
        w = GpuWeight((N, K) if b_t else (K, N), fp32=fill(ctx, N * K, rng, 0.02))
        deq = None
    wf = scratch.fp32(w)
    lora = (Operand(t), RANK, Operand(params), lmode) if lmode else None
    rows = []
    for label, tiles in variants:
        if label.startswith("nf4:") and not nf4:
            continue
        try:
            if tiles is not None:
                tiles.check(ctx)
                grid = -(-M // tiles.bm) * -(-N // tiles.bn)
                if tiles.splits > 1 and grid >= FULL_GRID:
                    continue
        except ValueError as e:
            rows.append({"variant": label, "skipped": str(e)})
            continue
        fb = Operand(wf, 0, w.shape[1])
        if label == "current":
            # as the step: the LM head's split K goes through the weight scratch (idle then)
            used = kernels.step_gemm_tiles(ctx)(M, N, K, False, b_t)
            rec = lambda: kernels.gemm(ctx, M, N, K, Operand(a_buf), Operand(scratch.fp32(w), 0, w.shape[1]),  # noqa: E731
                                       Operand(c_buf), b_t=b_t, lora=lora, scratch=None if nf4 else scratch.buf)
        elif label.startswith("nf4:"):
            used = tiles
            rec = lambda: kernels.gemm(ctx, M, N, K, Operand(a_buf), w.operand(), Operand(c_buf), b_t=b_t,  # noqa: E731
                                       lora=lora, tiles=used)
        else:
            used = tiles
            rec = lambda: kernels.gemm(ctx, M, N, K, Operand(a_buf), fb, Operand(c_buf), b_t=b_t,  # noqa: E731
                                       lora=lora, tiles=used, scratch=split_buf)
        per = kernel_seconds(ctx, rec, reps)
        s = sum(per.values())
        rows.append({"variant": label, "tiles": [used.wgx, used.wgy, used.tm, used.tn, used.bk],
                     "unroll": used.unroll, "splits": used.splits, "kernels": per, "s": s,
                     "tflops": 2.0 * M * N * K / s / 1e12})
    del w
    return rows, deq


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen3-0.6b,qwen3-4b")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--only", default=None, help="comma-separated GEMM names (q.fwd,lm.logits,...)")
    ap.add_argument("--rows", default=None,
                    help="comma-separated token-row counts M of the step (default: the model's 4 x 1024)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-cublas", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--table", default=None, help="print BENCHMARKS.md rows from this --json log and exit")
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.table))
        return
    from qlora_ext.gpu.runtime import GpuContext

    ctx = GpuContext()
    if not ctx.has_timestamps:
        raise SystemExit(f"{ctx.describe()} has no timestamp-query feature")
    variants = parse_variants(a.variants)
    max_splits = max([t.splits for _, t in variants if t is not None] + [kernels.StepGemmTiles.F32_THIN.splits])
    log = [{"adapter": ctx.info, "trusted": ctx.trusted, "variants": a.variants}]
    print(ctx.info, "trusted", ctx.trusted, flush=True)
    rng = np.random.default_rng(0)
    for model, rows in ((m, r) for m in a.shapes.split(",")
                        for r in ([int(x) for x in a.rows.split(",")] if a.rows else [None])):
        cases = [c for c in step_shapes(model, rows) if not a.only or c[0] in a.only.split(",")]
        big = max(max(M * K, M * N) for _, M, N, K, *_ in cases)
        thin = max([M * N for _, M, N, *_ in cases if -(-M // 128) * -(-N // 128) < FULL_GRID] + [1])
        bufs = (fill(ctx, big, rng), ctx.empty((big,)), fill(ctx, max(MODELS[model][7], rows or 0) * RANK, rng, 0.1),
                fill(ctx, RANK * 151936, rng, 0.01), ctx.empty((max_splits * thin,)),
                WeightScratch(ctx, [(o, i) for _, i, o in projections(model)]))
        for case in cases:
            name, M, N, K, b_t = case[:5]
            rows, deq = run_shape(ctx, case, variants, a.reps, rng, bufs)
            ref = None if a.no_cublas else cublas_time(M, N, K, reps=3, b_t=b_t)
            entry = {"model": model, "gemm": name, "M": M, "N": N, "K": K, "b_t": b_t, "nf4": case[5],
                     "lora": case[6], "rows": rows, "dequant_s": deq,
                     "cublas_tflops": 2.0 * M * N * K / ref / 1e12 if ref else None}
            log.append(entry)
            timed = sorted((r for r in rows if "s" in r), key=lambda r: r["s"])
            print(f"{model} {name:10s} M={M} N={N} K={K} cuBLAS {entry['cublas_tflops'] or float('nan'):5.1f} "
                  f"dequant {1e6 * (deq or 0):.0f} us | "
                  + "  ".join(f"{r['variant']} {r['tflops']:.1f}" for r in timed), flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(log, f)
        del bufs


def table(path: str) -> str:
    """BENCHMARKS.md rows from a --json log: per GEMM, the step's tiles (StepGemmTiles' rule for
    a real GPU): the `current` row if it ran them, else the variant row of those tiles, plus
    the shape's dequant time at NF4 shapes (both from the same run); the GEMM alone; cuBLAS
    fp32; and the `nf4:` row (the NF4 GEMM dequantizing in its tile loads) where there is one."""
    chooser = object.__new__(kernels.StepGemmTiles)
    chooser.own = True
    lines = ["| GEMM | M × N × K | B | ours TFLOP/s | GEMM alone | tiles | cuBLAS fp32 | ours / cuBLAS | "
             "NF4 in the tile loads |", "|---|---|---|---|---|---|---|---|---|"]
    for e in json.load(open(path))[1:]:
        M, N, K = e["M"], e["N"], e["K"]
        flop = 2.0 * M * N * K
        t = chooser(M, N, K, False, e["b_t"])
        key = ([t.wgx, t.wgy, t.tm, t.tn, t.bk], t.unroll, t.splits)
        rows = [r for r in e["rows"] if "s" in r]
        same = [r for r in rows if (r["tiles"], r["unroll"], r["splits"]) == key
                and not r["variant"].startswith("nf4:")]
        cur = next((r for r in same if r["variant"] == "current"), None)
        if cur is not None:
            gemm_s = sum(v for k, v in cur["kernels"].items() if k.startswith("gemm"))
            total, kernels_run = cur["s"], cur["kernels"]
        else:
            r = same[0]
            gemm_s, kernels_run = r["s"], r["kernels"]
            total = gemm_s + (e["dequant_s"] or 0.0)
        split = "gemm_f32.reduce" in kernels_run
        fused = next((r for r in rows if r["variant"].startswith("nf4:")), None)
        cub = e["cublas_tflops"]
        kind = ("NF4" if e["nf4"] else "fp32") + (" Wᵀ" if e["b_t"] else " W") + (" + LoRA" if e["lora"] else "")
        tiles = ",".join(map(str, key[0])) + (f" split {t.splits}" if split else "")
        lines.append(f"| {e['model']} {e['gemm']} | {M} × {N} × {K} | {kind} | **{flop / total / 1e12:.1f}** | "
                     f"{flop / gemm_s / 1e12:.1f} | {tiles} | {cub:.1f} | {flop / total / 1e12 / cub:.2f} | "
                     + (f"{fused['tflops']:.1f} |" if fused else "— |"))
    return "\n".join(lines)


def test_gemm_ceiling_smoke(tmp_path):
    """Every path of the script once on a tiny shape (software adapters included)."""
    import pytest

    from qlora_ext.gpu.runtime import unavailable_reason

    if unavailable_reason():
        pytest.skip(unavailable_reason())
    out = tmp_path / "log.json"
    main(["--shapes", "tiny", "--rows", "131", "--only", "q.fwd,down.dx,lm.dhidden", "--reps", "1", "--no-cublas",
          "--json", str(out), "--variants", "current;a=8,8,4,4,8;r=8,8,4,4,16,unroll=0;s=8,8,4,4,8,splits=3;t=16,8,8,8,16,splits=4;b=16,8,8,8,8;"
          "f=16,8,8,8,8,splits=8;nf4:n=8,8,4,4,8"])
    log = json.loads(out.read_text())
    assert [e["gemm"] for e in log[1:]] == ["q.fwd", "down.dx", "lm.dhidden"]
    assert [e["M"] for e in log[1:]] == [131, 131, 64]
    assert [len([r for r in e["rows"] if r.get("tflops", 0) > 0]) for e in log[1:]] == [8, 8, 7]
    assert all(e["dequant_s"] > 0 for e in log[1:3]) and log[3]["dequant_s"] is None
    for e in log[1:]:
        e["cublas_tflops"] = 1.0
    out.write_text(json.dumps(log))
    rows = table(str(out)).splitlines()[2:]   # the step's tiles on a real GPU: variant rows here
    assert [r.split(" | ")[0] for r in rows] == ["| tiny q.fwd", "| tiny down.dx", "| tiny lm.dhidden"]
    assert all("16,8,8,8,8 split 8" in r for r in rows)   # few rows: K split 8 ways


if __name__ == "__main__":
    main()
