"""shaders/gemm.wgsl at every GEMM shape of the Qwen3 4 × 1024 training step against cuBLAS fp32
(torch, TF32 off) at the same shapes in the same run: the 7 NF4 projections forward (x · Wᵀ,
LoRA B in the epilogue) and backward dx (dy · W, LoRA A in the epilogue), M = 4096 token rows,
and the fp32 LM head (logits x · Wᵀ, N = vocab; dhidden dlogits · W, K = vocab) at the engine's
chunk rows.  Shapes that repeat (k/v, gate/up) are timed once.

Each GEMM is timed with GPU timestamp queries (median of --reps dispatches) for a list of
variants: `current` is kernels.step_gemm_tiles' per-shape choice; the others name gemm.wgsl tiles
(wgx,wgy,tm,tn,bk) and override constants; `base:` variants run a second shader given by
--base-shader (another version of gemm.wgsl, for a before/after in one run); `probe:` variants
run gemm.wgsl with every K tile fetched from k = 0 (the operands stay in L1/L2: the speed of
the multiply and the workgroup-memory traffic alone; a diagnostic, its results are not a GEMM);
`mul:` variants run gemm.wgsl with the k loop's fma() written as `acc += b * s`; `unroll:`
variants with the k loop unrolled in the source (BK 8 or 16 only).
TFLOP/s count 2·M·N·K for ours and cuBLAS alike (the LoRA epilogue's 2·M·N·r is extra work of
ours, not counted).

    python bench/bench_gemm_ceiling.py --json out.json [--variants "label=wgx,wgy,tm,tn,bk[,KEY=V...]";...]

pytest runs `test_gemm_ceiling_smoke` once on a software adapter (a tiny shape, all paths)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from bench_gemm import cublas_time  # noqa: E402
from bench_resident_gemm import MODELS, fill, kernel_seconds, projections  # noqa: E402

from qlora_ext.gpu import kernels  # noqa: E402
from qlora_ext.gpu.kernels import GemmTiles, Operand  # noqa: E402
from qlora_ext.gpu.bindings.weights import GpuWeight  # noqa: E402

RANK = 16
DEFAULT_VARIANTS = "current"


def parse_variants(text: str):
    """'label=wgx,wgy,tm,tn,bk[,KEY=V...];...' -> [(label, GemmTiles | None, {KEY: value})];
    label 'current' alone is the per-shape choice; a label starting 'base:' or 'probe:' picks
    that shader."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        if item == "current":
            out.append(("current", None, {}))
            continue
        label, _, spec = item.partition("=")
        parts = spec.split(",")
        tiles = GemmTiles(*[int(v) for v in parts[:5]])
        extra = {}
        for kv in parts[5:]:
            k, _, v = kv.partition("=")
            extra[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)
        out.append((label, tiles, extra))
    return out


def step_shapes(model: str):
    """[(name, M, N, K, b_t, nf4, lora)] of one training step, repeats removed."""
    H, F, hq, hkv, d, chunk, V, M, _ = MODELS[model]
    seen, out = set(), []
    for name, inn, out_f in projections(model):
        for case in ((f"{name}.fwd", M, out_f, inn, True, True, 1), (f"{name}.dx", M, inn, out_f, False, True, 2)):
            if case[1:] not in seen:
                seen.add(case[1:])
                out.append(case)
    out.append(("lm.logits", chunk, V, H, True, False, 0))
    out.append(("lm.dhidden", chunk, H, V, False, False, 0))
    return out


def shader_dir_with(base_shader: str | None):
    """A folder for QLORA_EXT_SHADERS holding gemm_base (--base-shader) and gemm_probe."""
    from qlora_ext.gpu.runtime import load_shader

    d = tempfile.mkdtemp(prefix="gemm_ceiling_")
    src = load_shader("gemm")
    probe, n = re.subn(r"let kf = t \* BK;", "let kf = 0u;", src)
    if n != 1:
        raise ValueError("gemm.wgsl: the probe needs exactly one line 'let kf = t * BK;'")
    # the multiply as vector-times-scalar plus add (left to the driver to fuse) instead of fma()
    mul, n1 = re.subn(r"let s = vec4<f32>\((fa\d)\[r\]\[i\]\);", r"let s = \1[r][i];", src)
    mul, n2 = re.subn(r"acc\[o\] = fma\(s, (fb\d)\[q\], acc\[o\]\);", r"acc[o] += \1[q] * s;", mul)
    if n1 != 2 or n2 != 2:
        raise ValueError("gemm.wgsl: the mul variant needs the two splat and fma lines of the k loop")
    files = {"gemm_probe": probe, "gemm_mul": mul}
    # the k loop unrolled in the source (BK 8 and 16), for drivers that keep it rolled
    head = "for (var kk = 0u; kk < BK; kk += 2u) {"
    start = src.index(head)
    end, depth = start + len(head), 1
    while depth:
        depth += {"{": 1, "}": -1}.get(src[end], 0)
        end += 1
    body = src[start + len(head):end - 1]
    for bk in (8, 16):
        files[f"gemm_unroll{bk}"] = src[:start] + "".join(
            f"{{ let kk = {k}u;{body}}}\n" for k in range(0, bk, 2)) + src[end:]
    for name, text in files.items():
        with open(os.path.join(d, name + ".wgsl"), "w") as f:
            f.write(text)
    if base_shader:
        shutil.copy(base_shader, os.path.join(d, "gemm_base.wgsl"))
    return d


def with_variant(ctx, shader: str, extra: dict):
    """Route kernels.gemm's 'gemm' pipelines to `shader` with extra override constants."""
    cls_pipeline = type(ctx).pipeline

    def pipeline(name, entry, kinds, consts=None, overrides=None):
        if name == "gemm":
            name, overrides = shader, dict(overrides or {}, **extra)
        return cls_pipeline(ctx, name, entry, kinds, consts, overrides)

    ctx.pipeline = pipeline


def run_shape(ctx, case, variants, reps, rng, bufs):
    name, M, N, K, b_t, nf4, lmode = case
    a_buf, c_buf, t, params = bufs
    if nf4:
        out_f, inn = (N, K) if b_t else (K, N)
        n = out_f * inn
        w = GpuWeight((out_f, inn), packed=ctx.upload(rng.integers(0, 2**32, (n + 7) // 8, dtype=np.uint32)),
                           absmax=ctx.upload(rng.uniform(0.02, 0.06, (n + 63) // 64).astype(np.float32)))
    else:
        w = GpuWeight((N, K) if b_t else (K, N), fp32=fill(ctx, N * K, rng, 0.02))
    lora = (Operand(t), RANK, Operand(params), lmode) if lmode else None
    rows = []
    for label, tiles, extra in variants:
        prefix = label.partition(":")[0] if ":" in label else ""
        shader = {"base": "gemm_base", "probe": "gemm_probe", "mul": "gemm_mul",
                  "unroll": f"gemm_unroll{tiles.bk if tiles else 0}"}.get(prefix, "gemm")
        try:
            if tiles is not None:
                tiles.check(ctx)
        except ValueError as e:
            rows.append({"variant": label, "skipped": str(e)})
            continue
        with_variant(ctx, shader, extra)
        used = tiles or kernels.step_gemm_tiles(ctx)(M, N)
        rec = lambda: kernels.gemm(ctx, M, N, K, Operand(a_buf), w.operand(), Operand(c_buf), b_t=b_t,  # noqa: E731
                                   lora=lora, tiles=used)
        s = kernel_seconds(ctx, rec, reps)[shader + ".main"]
        rows.append({"variant": label, "tiles": [used.wgx, used.wgy, used.tm, used.tn, used.bk], "extra": extra,
                     "s": s, "tflops": 2.0 * M * N * K / s / 1e12})
        del ctx.pipeline
    del w
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen3-0.6b,qwen3-4b")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--base-shader", default=None)
    ap.add_argument("--only", default=None, help="comma-separated GEMM names (q.fwd,lm.logits,...)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-cublas", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--table", default=None, help="print BENCHMARKS.md rows from this --json log and exit")
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.table))
        return
    os.environ["QLORA_EXT_SHADERS"] = shader_dir_with(a.base_shader)
    from qlora_ext.gpu.runtime import GpuContext

    ctx = GpuContext()
    if not ctx.has_timestamps:
        raise SystemExit(f"{ctx.describe()} has no timestamp-query feature")
    variants = parse_variants(a.variants)
    log = [{"adapter": ctx.info, "trusted": ctx.trusted, "variants": a.variants}]
    print(ctx.info, "trusted", ctx.trusted, flush=True)
    rng = np.random.default_rng(0)
    for model in a.shapes.split(","):
        cases = [c for c in step_shapes(model) if not a.only or c[0] in a.only.split(",")]
        big = max(max(M * K, M * N) for _, M, N, K, *_ in cases)
        bufs = (fill(ctx, big, rng), ctx.empty((big,)), fill(ctx, MODELS[model][7] * RANK, rng, 0.1),
                fill(ctx, RANK * 151936, rng, 0.01))
        for case in cases:
            name, M, N, K, b_t = case[:5]
            rows = run_shape(ctx, case, variants, a.reps, rng, bufs)
            ref = None if a.no_cublas else cublas_time(M, N, K, reps=3, b_t=b_t)
            entry = {"model": model, "gemm": name, "M": M, "N": N, "K": K, "b_t": b_t, "nf4": case[5],
                     "lora": case[6], "rows": rows,
                     "cublas_tflops": 2.0 * M * N * K / ref / 1e12 if ref else None}
            log.append(entry)
            timed = sorted((r for r in rows if "s" in r), key=lambda r: r["s"])
            print(f"{model} {name:10s} M={M} N={N} K={K} cuBLAS {entry['cublas_tflops'] or float('nan'):5.1f} | "
                  + "  ".join(f"{r['variant']} {r['tflops']:.1f}" for r in timed), flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(log, f)
        del bufs


def table(path: str, before: str = "base:b16,base:w8,base:s8") -> str:
    """BENCHMARKS.md rows from a --json log: per GEMM, ours with step_gemm_tiles' choice (the
    `current` row, else the row of the same tiles without a variant prefix), cuBLAS fp32 and the
    `before` variants (base: rows, in the order BIG, WIDE, SMALL) chosen by the previous rule:
    WIDE for N >= 32768, SMALL for 133-197 tiles of 128 x 128, else BIG."""
    from qlora_ext.gpu.kernels import StepGemmTiles

    chooser = object.__new__(StepGemmTiles)
    chooser.own = True
    big, wide, small = before.split(",")
    lines = ["| GEMM | M × N × K | B | ours TFLOP/s | tiles | cuBLAS fp32 | ours / cuBLAS | before |",
             "|---|---|---|---|---|---|---|---|"]
    for e in json.load(open(path))[1:]:
        M, N, K = e["M"], e["N"], e["K"]
        t = chooser(M, N)
        want = [t.wgx, t.wgy, t.tm, t.tn, t.bk]
        rows = {r["variant"]: r for r in e["rows"] if "s" in r}
        ours = rows.get("current") or next(
            r for r in rows.values() if ":" not in r["variant"] and r["tiles"] == want
            and not any(r.get("extra", {}).values()))
        groups = -(-M // 128) * -(-N // 128)
        old = rows.get(wide if N >= 32768 else small if 133 <= groups <= 197 else big)
        cub = e["cublas_tflops"]
        kind = ("NF4" if e["nf4"] else "fp32") + (" Wᵀ" if e["b_t"] else " W") + (" + LoRA" if e["lora"] else "")
        was = f"{old['tflops']:.1f}" if old else "—"
        lines.append(f"| {e['model']} {e['gemm']} | {M} × {N} × {K} | {kind} | **{ours['tflops']:.1f}** | "
                     f"{','.join(map(str, ours['tiles']))} | {cub:.1f} | {ours['tflops'] / cub:.2f} | {was} |")
    return "\n".join(lines)


def test_gemm_ceiling_smoke(tmp_path):
    """Every path of the script once on a tiny shape (software adapters included)."""
    import pytest

    from qlora_ext.gpu.runtime import unavailable_reason

    if unavailable_reason():
        pytest.skip(unavailable_reason())
    base = os.path.join(os.path.dirname(__file__), "..", "shaders", "gemm.wgsl")
    out = tmp_path / "log.json"
    old = os.environ.get("QLORA_EXT_SHADERS")
    try:
        main(["--shapes", "tiny", "--only", "q.fwd,down.dx,lm.dhidden", "--reps", "1", "--no-cublas",
              "--base-shader", base, "--json", str(out),
              "--variants", "current;a=8,8,4,4,8;base:b=8,8,4,4,8;probe:p=8,8,4,4,8;mul:m=8,8,4,4,8;"
              "unroll:u=8,8,4,4,8"])
    finally:
        if old is None:
            os.environ.pop("QLORA_EXT_SHADERS", None)
        else:
            os.environ["QLORA_EXT_SHADERS"] = old
    log = json.loads(out.read_text())
    assert [e["gemm"] for e in log[1:]] == ["q.fwd", "down.dx", "lm.dhidden"]
    assert all(len([r for r in e["rows"] if r.get("tflops", 0) > 0]) == 6 for e in log[1:])


if __name__ == "__main__":
    main()
