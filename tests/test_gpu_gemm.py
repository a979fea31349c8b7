"""WGSL kernels (gemm, swiglu, dropout) against float64 numpy, on whatever wgpu
adapter exists (lavapipe in CI).  Shapes are deliberately not multiples of the tiles."""
from __future__ import annotations

import numpy as np
import pytest

import qlora_ext as qx
from qlora_ext.model.dropout import apply_dropout, dropout_keep_scale, dropout_threshold

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ctx(gpu_ctx):
    return gpu_ctx


def up(ctx, a):
    raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    pad = np.zeros((raw.size + 3) // 4 * 4, np.uint8)
    pad[: raw.size] = raw
    b = ctx.buffer(pad.nbytes)
    ctx.device.queue.write_buffer(b, 0, pad)
    return b


def down(ctx, b, n):
    return np.frombuffer(ctx.device.queue.read_buffer(b), np.float32)[:n].copy()


def rel(a, ref):
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


def run(ctx, fn):
    fn(ctx)
    ctx.submit()


TILES = [None, (4, 8, 4, 8, 8), (8, 4, 8, 4, 16)]


def tiles_of(ctx, t):
    from qlora_ext.gpu import kernels as K

    return K.tiles_for(ctx) if t is None else K.GemmTiles(*t).check(ctx)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (37, 45, 23), (33, 64, 40), (70, 13, 97)])
@pytest.mark.parametrize("b_t", [True, False])
def test_gemm_fp32(ctx, tiles, M, N, K, b_t):
    from qlora_ext.gpu import kernels as Kk
    from qlora_ext.gpu.kernels import Operand

    rng = np.random.default_rng(M * 1000 + N)
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((N, K) if b_t else (K, N)).astype(np.float32)
    ab, bb, cb = up(ctx, A), up(ctx, B), ctx.buffer(M * N * 4)
    run(ctx, lambda c: Kk.gemm(c, M, N, K, Operand(ab, 0, K), Operand(bb, 0, B.shape[1]), Operand(cb, 0, N),
                               b_t=b_t, tiles=tiles_of(ctx, tiles)))
    ref = A.astype(np.float64) @ (B.T if b_t else B).astype(np.float64)
    assert rel(down(ctx, cb, M * N).reshape(M, N), ref) <= 1e-5


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("vec", [True, False])
def test_gemm_offsets_lora_accum(ctx, mode, vec):
    """Sub-matrices (offsets, strides), the LoRA epilogue and accumulation."""
    from qlora_ext.gpu import kernels as Kk
    from qlora_ext.gpu.kernels import Operand

    rng = np.random.default_rng(7)
    M, N, K, R = 29, 36 if vec else 35, 44 if vec else 43, 5
    lda, ldc, a_off, c_off, b_off = K + 8, N + 4, 8, 12, 4
    A = rng.standard_normal((M + 1, lda)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    T = rng.standard_normal((M, R + 3)).astype(np.float32)
    L = rng.standard_normal((N, R) if mode == 1 else (R, N)).astype(np.float32)
    C0 = rng.standard_normal((M + 1, ldc)).astype(np.float32)
    Bflat = np.concatenate([np.zeros(b_off, np.float32), B.reshape(-1)])
    ab, bb, tb, lb = up(ctx, A.reshape(-1)[a_off:]), up(ctx, Bflat), up(ctx, T), up(ctx, L)
    cb = up(ctx, C0.reshape(-1))
    run(ctx, lambda c: Kk.gemm(c, M, N, K, Operand(ab, 0, lda), Operand(bb, b_off, N), Operand(cb, c_off, ldc),
                               b_t=False, lora=(Operand(tb, 1, R + 3), R, Operand(lb), mode), accumulate=True,
                               tiles=Kk.tiles_for(ctx)))
    A64 = A.reshape(-1)[a_off:][: M * lda].reshape(M, lda)[:, :K].astype(np.float64)
    Lm = (L.T if mode == 1 else L).astype(np.float64)
    ref_flat = C0.reshape(-1).astype(np.float64).copy()
    block = A64 @ B + T[:, 1:1 + R].astype(np.float64) @ Lm
    got = down(ctx, cb, C0.size)
    for i in range(M):
        s = c_off + i * ldc
        ref_flat[s: s + N] += block[i]
    assert rel(got, ref_flat) <= 1e-5
    # outside the written rows/columns nothing changed
    mask = np.ones(C0.size, bool)
    for i in range(M):
        mask[c_off + i * ldc: c_off + i * ldc + N] = False
    assert np.array_equal(got[mask], C0.reshape(-1)[mask])


def nf4_stack(ctx, tensors):
    """Upload one or two NF4 tensors the way the FFN backend does; returns the Nf4B operand."""
    from qlora_ext.gpu.kernels import Nf4B

    codes = [np.concatenate([t.packed, np.zeros((-t.packed.size) % 8, np.uint8)]) for t in tensors]
    absm = [np.concatenate([t.absmax, np.zeros((-t.absmax.size) % 2, np.float32)]) for t in tensors]
    cb, ab = up(ctx, np.concatenate(codes)), up(ctx, np.concatenate(absm))
    split = tensors[0].shape[0] if len(tensors) == 2 else 1 << 31
    return Nf4B(cb, ab, tensors[0].shape[1], split, codes[0].size // 4, absm[0].size, tensors[0].blocksize)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("shapes", [[(48, 64)], [(40, 24)], [(13, 21), (11, 21)], [(24, 40), (16, 40)]])
@pytest.mark.parametrize("b_t", [True, False])
def test_gemm_nf4_reads_exact_dequant(ctx, tiles, shapes, b_t):
    """A = identity makes the GEMM output the weights it dequantized: bit-for-bit dequantize_nf4,
    through the whole-word (cols % 8 == 0) and the per-element paths, one or two stacked parts."""
    from qlora_ext.gpu import kernels as Kk
    from qlora_ext.gpu.kernels import Operand

    rng = np.random.default_rng(len(shapes) * 100 + shapes[0][0])
    ts = [qx.quantize_nf4(rng.standard_normal(s).astype(np.float32), blocksize=32 if s[1] % 8 else 64)
          for s in shapes]
    W = np.concatenate([qx.dequantize_nf4(t) for t in ts], 0)   # stored [rows, cols]
    b = nf4_stack(ctx, ts)
    rows, cols = W.shape
    if b_t:      # C[cols, rows] = I · Wᵀ
        M, N, K = cols, rows, cols
    else:        # C[rows, cols] = I · W
        M, N, K = rows, cols, rows
    eye = up(ctx, np.eye(M, K, dtype=np.float32))
    cb = ctx.buffer(M * N * 4)
    run(ctx, lambda c: Kk.gemm(c, M, N, K, Operand(eye, 0, K), b, Operand(cb, 0, N), b_t=b_t,
                               tiles=tiles_of(ctx, tiles)))
    got = down(ctx, cb, M * N).reshape(M, N)
    assert np.array_equal(got, W.T if b_t else W)


@pytest.mark.parametrize("b_t", [True, False])
def test_gemm_nf4_matches_float64(ctx, b_t):
    from qlora_ext.gpu import kernels as Kk
    from qlora_ext.gpu.kernels import Operand

    rng = np.random.default_rng(3)
    ts = [qx.quantize_nf4(rng.standard_normal((40, 56)).astype(np.float32)),
          qx.quantize_nf4(rng.standard_normal((24, 56)).astype(np.float32))]
    W = np.concatenate([qx.dequantize_nf4(t) for t in ts], 0).astype(np.float64)
    M = 19
    K, N = (56, 64) if b_t else (64, 56)
    A = rng.standard_normal((M, K)).astype(np.float32)
    ab, cb = up(ctx, A), ctx.buffer(M * N * 4)
    run(ctx, lambda c: Kk.gemm(c, M, N, K, Operand(ab, 0, K), nf4_stack(ctx, ts), Operand(cb, 0, N), b_t=b_t,
                               tiles=Kk.tiles_for(ctx)))
    ref = A.astype(np.float64) @ (W.T if b_t else W)
    assert rel(down(ctx, cb, M * N).reshape(M, N), ref) <= 1e-5


@pytest.mark.parametrize("rows_per_dispatch", [None, 3])
def test_swiglu_forward_backward(ctx, monkeypatch, rows_per_dispatch):
    """One kernel for both callers: gate|up side by side in one [M, 2I] buffer with dgu written
    into one buffer (the FFN backend), and g, u, dg, du as separate [M, I] tensors (the
    gpu placement); with 3 rows per dispatch the row blocks advance every offset."""
    from qlora_ext.gpu import kernels as Kk
    from qlora_ext.gpu.kernels import Operand

    if rows_per_dispatch:
        monkeypatch.setattr(ctx, "max_groups", rows_per_dispatch)
    rng = np.random.default_rng(5)
    M, I = 7, 301
    gu = (rng.standard_normal((M, 2 * I)) * 4).astype(np.float32)
    gu[0, :3] = (-100.0, 100.0, 0.0)   # exp(-g) overflows to inf: sig -> 0
    dh = rng.standard_normal((M, I)).astype(np.float32)
    g, u = gu[:, :I].astype(np.float64), gu[:, I:].astype(np.float64)
    sig = 1 / (1 + np.exp(-g))
    h_ref = g * sig * u
    dg_ref, du_ref = dh * u * sig * (1 + g * (1 - sig)), dh * g * sig
    # interleaved: the FFN backend's gu / dgu
    gb, db, hb, dgb = up(ctx, gu), up(ctx, dh), ctx.buffer(M * I * 4), ctx.buffer(M * 2 * I * 4)
    run(ctx, lambda c: (Kk.swiglu_forward(c, M, I, Operand(gb, 0, 2 * I), Operand(gb, I, 2 * I), Operand(hb)),
                        Kk.swiglu_backward(c, M, I, Operand(gb, 0, 2 * I), Operand(gb, I, 2 * I), db,
                                           Operand(dgb, 0, 2 * I), Operand(dgb, I, 2 * I))))
    assert rel(down(ctx, hb, M * I).reshape(M, I), h_ref) <= 1e-5
    assert rel(down(ctx, dgb, M * 2 * I).reshape(M, 2 * I), np.concatenate([dg_ref, du_ref], 1)) <= 1e-5
    # separate tensors: the GPU device's g, u, m, dg, du
    gt, ut = ctx.upload(np.ascontiguousarray(gu[:, :I])), ctx.upload(np.ascontiguousarray(gu[:, I:]))
    ht, dgt, dut = ctx.empty((M, I)), ctx.empty((M, I)), ctx.empty((M, I))
    Kk.swiglu_forward(ctx, M, I, Operand(gt), Operand(ut), Operand(ht))
    Kk.swiglu_backward(ctx, M, I, Operand(gt), Operand(ut), ctx.upload(dh), Operand(dgt), Operand(dut))
    assert np.array_equal(ctx.to_numpy(ht), down(ctx, hb, M * I).reshape(M, I))
    assert np.array_equal(np.concatenate([ctx.to_numpy(dgt), ctx.to_numpy(dut)], 1),
                          down(ctx, dgb, M * 2 * I).reshape(M, 2 * I))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("add", [False, True])
def test_dropout_mask_equals_cpu(ctx, monkeypatch, p, add):
    """One kernel for both callers: a strided row chunk that starts at global row row0 with its
    key among the LoRA weights (the FFN backend), and whole contiguous tensors in dispatches of
    a few rows with the key from a per-step key buffer (the GPU device)."""
    from qlora_ext.gpu import kernels as Kk
    from qlora_ext.gpu.kernels import Operand

    rng = np.random.default_rng(11)
    rows, cols, row0, key, ld = 9, 77, 5, 0xDEADBEEF, 80
    full = rng.standard_normal((row0 + rows, cols)).astype(np.float32)
    base = rng.standard_normal((rows, ld)).astype(np.float32)
    keys = np.array([1, 2, key], np.uint32)
    zp = np.zeros((rows, ld), np.float32)
    zp[:, :cols] = full[row0:]
    zb, ob, kb = up(ctx, zp), up(ctx, base), up(ctx, keys)
    run(ctx, lambda c: Kk.dropout(c, rows, cols, Operand(zb, 0, ld), Operand(ob, 0, ld), kb, 2,
                                  dropout_threshold(p), float(dropout_keep_scale(p)), row0, add=add))
    masked = apply_dropout(full, p, key)[row0:] if p else full[row0:]
    ref = base.copy()
    ref[:, :cols] = base[:, :cols] + masked if add else masked
    assert np.array_equal(down(ctx, ob, rows * ld).reshape(rows, ld), ref)
    monkeypatch.setattr(ctx, "max_groups", 4)
    z, out = ctx.upload(full), ctx.upload(np.zeros_like(full))
    Kk.dropout(ctx, row0 + rows, cols, Operand(z), Operand(out), ctx.upload(keys), 2, dropout_threshold(p),
               float(dropout_keep_scale(p)), 0)
    assert np.array_equal(ctx.to_numpy(out), apply_dropout(full, p, key) if p else full)



def test_trusted_modules_give_the_same_results(ctx):
    """Shader modules without naga's runtime checks (the default on real GPUs) compute the same."""
    import wgpu

    if tuple(int(p) for p in wgpu.__version__.split(".")[:2]) < (0, 32):
        pytest.skip(f"wgpu {wgpu.__version__} has no trusted shader modules (checked modules are used)")
    from qlora_ext.gpu import kernels as Kk
    from qlora_ext.gpu.kernels import Operand
    from qlora_ext.gpu.runtime import GpuContext, Tuning

    trusted = GpuContext(ctx.adapter, Tuning(trusted=True))
    rng = np.random.default_rng(17)
    M, N, K = 21, 50, 37
    A, B = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32)
    outs = []
    for c in (ctx, trusted):
        ab, bb, cb = up(c, A), up(c, B), c.buffer(M * N * 4)
        run(c, lambda c, ab=ab, bb=bb, cb=cb: Kk.gemm(c, M, N, K, Operand(ab, 0, K), Operand(bb, 0, K),
                                                      Operand(cb, 0, N), b_t=True, tiles=Kk.tiles_for(c)))
        outs.append(down(c, cb, M * N))
    assert trusted.trusted
    assert np.array_equal(outs[0], outs[1])


# Tile settings of the H200 table's shapes (128 x 128, 64 x 128, 128 x 64, 256 x 128 threads'
# layouts) that fit a software adapter's 32 KiB of workgroup memory: the warp-shaped thread map
# (WGX % 8 == 0, WGY % 4 == 0), several loads per thread, the k loop's two register sets.
BIG_TILES = [(16, 16, 8, 8, 8), (16, 8, 8, 8, 16), (8, 16, 8, 8, 16), (16, 16, 4, 8, 16), (8, 8, 16, 8, 8)]


# each setting once, alternating the per-element (odd sizes) and the vec4 / whole-word paths
@pytest.mark.parametrize("tiles,M,N,K", [(t, *[(131, 137, 203), (257, 264, 328)][i % 2])
                                         for i, t in enumerate(BIG_TILES)])
@pytest.mark.parametrize("b_t", [True, False])
@pytest.mark.parametrize("nf4", [True, False])
def test_gemm_big_tiles_awkward_shapes(ctx, tiles, M, N, K, b_t, nf4):
    """Primes and non-multiples of every tile (K not a multiple of BK nor of the NF4 block, so
    blocks straddle rows), NF4 and fp32 B in both layouts, the LoRA epilogue (mode 1 with
    Wᵀ, 2 with W) and accumulation into C, against float64."""
    from qlora_ext.gpu import kernels as Kk
    from qlora_ext.gpu.kernels import Operand

    g = np.random.default_rng(M * 7 + N + K + b_t)
    try:
        t = Kk.GemmTiles(*tiles).check(ctx)
    except ValueError as e:
        pytest.skip(f"{tiles}: {e}")
    rows, cols = (N, K) if b_t else (K, N)
    W32 = (g.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    if nf4:
        wq = qx.quantize_nf4(W32, blocksize=64)
        W, b = qx.dequantize_nf4(wq).astype(np.float64), nf4_stack(ctx, [wq])
    else:
        W, b = W32.astype(np.float64), Operand(up(ctx, W32), 0, cols)
    R, mode = 16, 1 if b_t else 2
    A = g.standard_normal((M, K)).astype(np.float32)
    T = g.standard_normal((M, R)).astype(np.float32)
    L = g.standard_normal((N, R) if b_t else (R, N)).astype(np.float32)
    C0 = g.standard_normal((M, N)).astype(np.float32)
    cb = up(ctx, C0)
    run(ctx, lambda c: Kk.gemm(c, M, N, K, Operand(up(ctx, A), 0, K), b, Operand(cb, 0, N), b_t=b_t,
                               lora=(Operand(up(ctx, T), 0, R), R, Operand(up(ctx, L)), mode), accumulate=True,
                               tiles=t))
    ref = C0 + A.astype(np.float64) @ (W.T if b_t else W) + T.astype(np.float64) @ (L.T if b_t else L)
    assert rel(down(ctx, cb, M * N).reshape(M, N), ref) <= 2e-6


# gemm_f32.wgsl's forms (fp32 B): the k loop written out (BK 8 and 16), rolled, and split K
# (2 and 5 splits: the LoRA tiles in the last split, a split count above the tile count
# clipped), on tiles that fit a software adapter (the step's 64 x 128 ones included).
F32_FORMS = [dict(tiles=(8, 8, 4, 4, 8)), dict(tiles=(8, 8, 4, 4, 16)), dict(tiles=(16, 8, 8, 8, 8)),
             dict(tiles=(4, 8, 4, 8, 8), unroll=False), dict(tiles=(8, 4, 8, 4, 16), splits=2),
             dict(tiles=(16, 8, 8, 8, 16), splits=5), dict(tiles=(8, 8, 8, 8, 8), splits=64)]


@pytest.mark.parametrize("form", range(len(F32_FORMS)))
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (37, 45, 23), (131, 137, 203)])
@pytest.mark.parametrize("b_t", [True, False])
@pytest.mark.parametrize("lora_accum", [(False, False), (True, True), (True, False)])
def test_gemm_f32_forms_awkward_shapes(ctx, form, M, N, K, b_t, lora_accum):
    """Every form against float64 at 1, primes and non-multiples of every tile, both B
    layouts, with and without the LoRA term (mode 1 with Wᵀ, 2 with W) and accumulation."""
    from qlora_ext.gpu import kernels as Kk
    from qlora_ext.gpu.kernels import Operand

    f = dict(F32_FORMS[form])
    tiles = Kk.GemmTiles(*f.pop("tiles"), **f).check(ctx)
    lora_on, accum = lora_accum
    g = np.random.default_rng(M * 31 + N + K + form)
    B = g.standard_normal((N, K) if b_t else (K, N)).astype(np.float32)
    A = g.standard_normal((M, K)).astype(np.float32)
    C0 = g.standard_normal((M, N)).astype(np.float32)
    ref = A.astype(np.float64) @ (B.T if b_t else B).astype(np.float64) + (C0 if accum else 0.0)
    lora = None
    if lora_on:
        R = 5
        T = g.standard_normal((M, R)).astype(np.float32)
        L = g.standard_normal((N, R) if b_t else (R, N)).astype(np.float32)
        lora = (Operand(ctx.upload(T)), R, Operand(ctx.upload(L)), 1 if b_t else 2)
        ref = ref + T.astype(np.float64) @ (L.T if b_t else L).astype(np.float64)
    c = ctx.upload(C0)
    scratch = ctx.empty((tiles.splits * M * N,)) if tiles.splits > 1 else None
    Kk.gemm(ctx, M, N, K, Operand(ctx.upload(A)), Operand(ctx.upload(B)), Operand(c), b_t=b_t, lora=lora,
            accumulate=accum, tiles=tiles, scratch=scratch)
    assert rel(ctx.to_numpy(c), ref) <= 2e-6


def test_gemm_f32_split_scratch(ctx, monkeypatch):
    """Split K keeps its partials in the caller's scratch when it holds splits·M·N, else in the
    context's split scratch (the caller's left untouched), the same sums either way; partials
    over SPLIT_SCRATCH_FLOATS without room run unsplit (the bits of no split)."""
    from qlora_ext.gpu import kernels as Kk
    from qlora_ext.gpu.kernels import Operand

    g = np.random.default_rng(23)
    M, N, K = 19, 29, 301
    A, B = g.standard_normal((M, K)).astype(np.float32), g.standard_normal((K, N)).astype(np.float32)

    def run(splits, room):
        tiles = Kk.GemmTiles(8, 8, 4, 4, 8, splits=splits).check(ctx)
        scratch = ctx.upload(np.full(max(room, 1), 7.0, np.float32))
        c = ctx.empty((M, N))
        Kk.gemm(ctx, M, N, K, Operand(ctx.upload(A)), Operand(ctx.upload(B)), Operand(c), b_t=False, tiles=tiles,
                scratch=scratch)
        if room < splits * M * N:
            assert np.all(ctx.to_numpy(scratch) == 7.0)
        return ctx.to_numpy(c)

    unsplit, own, shared = run(1, 0), run(3, 3 * M * N), run(3, 3 * M * N - 1)
    assert rel(own, A.astype(np.float64) @ B) <= 2e-6 and not np.array_equal(own, unsplit)
    assert np.array_equal(shared, own)
    monkeypatch.setattr(Kk, "SPLIT_SCRATCH_FLOATS", 3 * M * N - 1)
    assert np.array_equal(run(3, 3 * M * N - 1), unsplit)


def test_gemm_f32_unrolled_needs_bk_8_or_16(ctx):
    from qlora_ext.gpu import kernels as Kk
    from qlora_ext.gpu.kernels import Operand

    t = ctx.upload(np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="BK 8 or 16"):
        Kk.gemm(ctx, 4, 4, 4, Operand(t), Operand(t), Operand(ctx.empty((4, 4))), b_t=True,
                tiles=Kk.GemmTiles(8, 8, 4, 4, 24))


@pytest.mark.parametrize("b_t", [True, False])
def test_gemm_f32_wide_grid_grouped_order(ctx, b_t):
    """A grid at least kernels.WIDE_GRID N tiles wide takes its C tiles in runs of GROUP_M M
    tiles (gemm_f32.wgsl's tile_of): 18 M tiles (a full run and a short one) by 513 N tiles,
    every tile written once, against float64."""
    from qlora_ext.gpu import kernels as Kk
    from qlora_ext.gpu.kernels import Operand

    tiles = Kk.GemmTiles(8, 8, 4, 4, 8).check(ctx)
    M, N, K = (Kk.GROUP_M + 1) * tiles.bm + 3, (Kk.WIDE_GRID + 1) * tiles.bn - 5, 3
    g = np.random.default_rng(7)
    A = g.standard_normal((M, K)).astype(np.float32)
    B = g.standard_normal((N, K) if b_t else (K, N)).astype(np.float32)
    c = ctx.upload(np.full((M, N), np.nan, np.float32))
    Kk.gemm(ctx, M, N, K, Operand(ctx.upload(A)), Operand(ctx.upload(B)), Operand(c), b_t=b_t, tiles=tiles)
    ref = A.astype(np.float64) @ (B.T if b_t else B).astype(np.float64)
    got = ctx.to_numpy(c).reshape(M, N)
    assert np.isfinite(got).all()
    assert rel(got, ref) <= 2e-6
