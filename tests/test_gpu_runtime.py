"""The GPU runtime (qlora_ext.gpu.runtime): Tuning read from the environment in one place,
errors that name the adapter, the shader loader, and the transfers (large arrays go up and
come back through pooled mapped staging buffers in pieces, copied by several threads; contents
must arrive bit-exact, writes must keep their ordering with recorded work, and the pool must
reuse its buffers)."""
import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from qlora_ext.gpu.runtime.transfer import POOL_MIN_BYTES

from gpu_support import gpu_context

gpu = pytest.mark.gpu
SRC = Path(__file__).resolve().parents[1] / "src" / "qlora_ext"

_STAGE = 1024  # bytes: a tiny staging piece, so that small arrays take several pieces


@pytest.fixture
def small_staging(ctx, monkeypatch):
    """Every transfer staged, in pieces of 1 KiB, from an empty pool."""
    from qlora_ext.gpu.runtime.transfer import StagingPool

    monkeypatch.setattr(ctx, "tuning", dataclasses.replace(ctx.tuning, staging_bytes=_STAGE, staging_min_bytes=0))
    monkeypatch.setattr(ctx, "staging_pool", StagingPool(ctx))
    return ctx


# ---- Tuning ---------------------------------------------------------------------------------

def test_tuning_from_env_reads_every_knob(tmp_path):
    from qlora_ext.gpu.runtime import Tuning

    assert Tuning.from_env({}) == Tuning()
    t = Tuning.from_env({"QLORA_EXT_GEMM_TILES": "16,16,8,8,16", "QLORA_EXT_GEMM_TILES_SMALL": " 8,8,4,4,8 ",
                         "QLORA_EXT_GEMM_MIN_GROUPS": "100", "QLORA_EXT_SMALL_GEMM_TILES": "64,64,16",
                         "QLORA_EXT_ATTN_TILES": "32,32,4,4,2", "QLORA_EXT_ATTN_HEAD_SPLIT": "0",
                         "QLORA_EXT_ATTN_STORED_DS": "0",
                         "QLORA_EXT_WGSL_TRUSTED": "1", "QLORA_EXT_WGSL_DEBUG": "1",
                         "QLORA_EXT_SHADERS": str(tmp_path), "QLORA_EXT_GPU_MEMORY_GIB": "1.5",
                         "QLORA_EXT_COPY_THREADS": "3", "QLORA_EXT_NATIVE_RECORDING": "0"})
    assert (t.gemm_tiles, t.gemm_tiles_small, t.gemm_min_groups) == ((16, 16, 8, 8, 16), (8, 8, 4, 4, 8), 100)
    assert (t.fp32_gemm_tiles, t.attn_tiles, t.attn_head_split) == ((64, 64, 16), (32, 32, 4, 4, 2), False)
    assert (t.trusted, t.wgsl_debug, t.shader_dir, t.gpu_memory_gib) == (True, True, str(tmp_path), 1.5)
    assert t.copy_threads == 3 and not t.native_recording and Tuning().native_recording
    assert t.attn_stored_ds is False and Tuning().attn_stored_ds is None
    assert t.gemm_overridden and not Tuning(fp32_gemm_tiles=(64, 64, 16)).gemm_overridden
    assert Tuning.from_env({"QLORA_EXT_WGSL_DEBUG": "0", "QLORA_EXT_ATTN_TILES": ""}) == Tuning()


@pytest.mark.parametrize("var,value", [
    ("QLORA_EXT_GEMM_TILES", "8,8,4,4"), ("QLORA_EXT_GEMM_TILES_SMALL", "a,b,c,d,e"),
    ("QLORA_EXT_GEMM_MIN_GROUPS", "0"), ("QLORA_EXT_SMALL_GEMM_TILES", "64,64"),
    ("QLORA_EXT_ATTN_TILES", "16,3,8"), ("QLORA_EXT_ATTN_TILES", "16,16,3,4"), ("QLORA_EXT_ATTN_TILES", "16,18,2,2"),
    ("QLORA_EXT_ATTN_TILES", "a,b,c,d"), ("QLORA_EXT_ATTN_HEAD_SPLIT", "yes"), ("QLORA_EXT_WGSL_TRUSTED", "2"),
    ("QLORA_EXT_NATIVE_RECORDING", "on"), ("QLORA_EXT_ATTN_STORED_DS", "2"), ("QLORA_EXT_SHADERS", "/nonexistent/qlora-ext-shaders"), ("QLORA_EXT_GPU_MEMORY_GIB", "lots"),
    ("QLORA_EXT_GPU_MEMORY_GIB", "-1"), ("QLORA_EXT_COPY_THREADS", "0")])
def test_tuning_bad_value_names_the_variable(var, value):
    from qlora_ext.gpu.runtime import Tuning

    with pytest.raises(ValueError, match=var):
        Tuning.from_env({var: value})


# Reading the environment is allowed here only: the GPU knobs (Tuning), the XDG workaround of
# the Vulkan loader, the CPU kernels' thread/SIMD switches, the progress bar, the MPI
# launcher's rank variables, the command's traceback switch and where the token cache lives.
_ENV_READERS = {"gpu/runtime/tuning.py", "gpu/__init__.py", "_native.py", "progress.py", "train/distributed.py",
                "launcher.py", "cli.py", "train/token_cache.py"}


def test_environment_read_only_in_the_allowed_modules():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            hit = (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb")
                   and isinstance(node.value, ast.Name) and node.value.id == "os")
            hit = hit or (isinstance(node, ast.ImportFrom) and node.module == "os"
                          and any(a.name in ("environ", "getenv") for a in node.names))
            if hit and rel not in _ENV_READERS:
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"environment read outside Tuning.from_env: {offenders}"


# ---- errors and shaders ---------------------------------------------------------------------

@gpu
def test_gpu_errors_are_oserrors_naming_adapter_and_size(ctx):
    from qlora_ext.gpu.kernels import GemmTiles
    from qlora_ext.gpu.runtime import GpuError

    assert issubclass(GpuError, OSError)
    with pytest.raises(GpuError, match=r"adapter .*bytes"):
        ctx.buffer(ctx.max_binding + 1024, what="too big")
    with pytest.raises(GpuError, match=r"adapter .*storage binding limit"):
        ctx.empty((ctx.max_binding // 4 + 1,))
    pipe = ctx.pipeline("add", "axpy", "uwr", overrides={"WG": 64})
    with pytest.raises(GpuError, match=r"adapter .*per dimension"):
        ctx.dispatch(pipe, [ctx.uniform("IfI", 1, 1.0, 1), ctx.empty((4,)), ctx.empty((4,))], (ctx.max_groups + 1,))
    with pytest.raises(ValueError, match="tiles"):
        GemmTiles(8, 8, 3, 4, 8).check(ctx)


@gpu
@pytest.mark.parametrize("native", [True, False])
def test_dispatches_recorded_natively_or_through_wgpu_py(native):
    """Both recorders run the same commands: a chain of dependent dispatches (each reads the
    last one's output, through whole buffers and bound ranges) gives float64's result, with
    and without a timed pass per dispatch."""
    from qlora_ext.gpu.runtime import GpuContext
    from qlora_ext.gpu.runtime.recording import _public

    base = gpu_context()
    c = GpuContext(base.adapter, tuning=dataclasses.replace(base.tuning, native_recording=native))
    assert (c._record is _public) == (not native)
    n = 37
    x0 = np.random.default_rng(5).standard_normal(n).astype(np.float32)
    pipe = c.pipeline("add", "axpy", "uwr", overrides={"WG": 64})
    for timed in (False, True) if c.has_timestamps else (False,):
        c.enable_timing(timed)
        y, x = c.upload(x0), c.upload(x0)
        for i in range(5):      # y += 0.5 * x, then x's range gets y: 5 dependent steps
            src = x if i % 2 else (x.buffer, 0, x.buffer.size)
            c.dispatch(pipe, [c.uniform("IfI", n, 0.5, 0), y, src], (1,))
            c.copy(y.buffer, 0, x.buffer, 0, 4 * n)
        want = x0.astype(np.float64) * 1.5 ** 5
        assert np.allclose(c.to_numpy(y), want, rtol=1e-6)
    c.enable_timing(False)


@gpu
def test_tuned_gemm_tiles_that_do_not_fit_name_the_variable(ctx, monkeypatch):
    from qlora_ext.gpu.kernels import tiles_for

    monkeypatch.setattr(ctx, "tuning", dataclasses.replace(ctx.tuning, gemm_tiles=(8, 8, 3, 4, 8)))
    with pytest.raises(ValueError, match="QLORA_EXT_GEMM_TILES"):
        tiles_for(ctx)


def test_shader_includes_expand_once_and_refuse_cycles(tmp_path):
    """`//!include name` puts shaders/name.wgsl in place (the attention kernels share one
    helper file, the dropout shader the hash); the override folder comes first; a cycle is an
    error naming the chain."""
    from qlora_ext.gpu.runtime import load_shader

    common = load_shader("attention_common").strip()
    for name in ("attention_fwd", "attention_bwd"):
        src = load_shader(name)
        assert src.count(common) == 1 and "//!include" not in src, name
    assert load_shader("dropout").count("fn hash32(") == 1
    (tmp_path / "a.wgsl").write_text("//!include b\n")
    (tmp_path / "b.wgsl").write_text("fn f() {}\n//!include a\n")
    (tmp_path / "dropout_hash.wgsl").write_text("fn hash32(v: u32) -> u32 { return v; }\n")
    with pytest.raises(ValueError, match="a -> b -> a"):
        load_shader("a", str(tmp_path))
    assert "return v;" in load_shader("dropout", str(tmp_path))   # the override wins, includes too
    with pytest.raises(OSError, match="nope.wgsl"):
        load_shader("nope", str(tmp_path))


@gpu
def test_shader_compile_error_lists_source(ctx, capsys, tmp_path):
    from qlora_ext.gpu.runtime import GpuContext, GpuError, Tuning

    (tmp_path / "broken.wgsl").write_text("@compute @workgroup_size(1)\nfn main() { let x: u32 = 1.5; }\n")
    dbg = GpuContext(ctx.adapter, Tuning(shader_dir=str(tmp_path), wgsl_debug=True))
    with pytest.raises(GpuError, match=r"adapter .*broken.wgsl"):
        dbg.module("broken")
    assert "   2  fn main()" in capsys.readouterr().err
    quiet = GpuContext(ctx.adapter, Tuning(shader_dir=str(tmp_path)))
    with pytest.raises(GpuError, match="broken.wgsl"):
        quiet.module("broken")
    assert "fn main()" not in capsys.readouterr().err


# ---- uploads --------------------------------------------------------------------------------

def _staging_sizes(ctx, write: bool) -> set:
    flag = ctx.wgpu.BufferUsage.MAP_WRITE if write else ctx.wgpu.BufferUsage.MAP_READ
    return {b.size for b in ctx.staging_pool.buffers() if b.usage & flag}


def _bits(n, seed, dtype):
    # every 32-bit pattern is fair game (f32 NaNs and denormals included): compare as u32
    return np.random.default_rng(seed).integers(0, 2**32, size=n, dtype=np.uint32).view(dtype)


@gpu
@pytest.mark.parametrize("n", [1, 3, _STAGE // 4 - 1, _STAGE // 4, _STAGE // 4 + 1, 3 * _STAGE // 4,
                               3 * _STAGE // 4 + 1, 1009])
@pytest.mark.parametrize("dtype", ["f32", "u32", "i32"])
def test_staged_upload_bit_exact(small_staging, n, dtype):
    ctx = small_staging
    a = _bits(n, n, {"f32": np.float32, "u32": np.uint32, "i32": np.int32}[dtype])
    t = ctx.upload(a, dtype)
    assert _staging_sizes(ctx, write=True) == {POOL_MIN_BYTES}
    got = ctx.to_numpy(t)
    assert got.shape == (n,) and np.array_equal(got.view(np.uint32), a.view(np.uint32))
    # a second write into the same tensor replaces every element
    b = _bits(n, n + 1, a.dtype)
    ctx.write(t, b)
    assert np.array_equal(ctx.to_numpy(t).view(np.uint32), b.view(np.uint32))


@gpu
def test_staged_write_shapes(small_staging):
    ctx = small_staging
    a = _bits(7 * 37, 3, np.float32).reshape(7, 37)
    assert np.array_equal(ctx.to_numpy(ctx.upload(a)).view(np.uint32), a.view(np.uint32))
    with pytest.raises(ValueError, match="write"):
        ctx.write(ctx.empty((7, 36)), a)


@gpu
def test_staged_write_keeps_order_with_recorded_work(small_staging):
    """Work recorded before write() sees the old contents, work recorded after sees the new."""
    ctx = small_staging
    n = 3 * _STAGE // 4 + 5
    old, new = _bits(n, 1, np.uint32), _bits(n, 2, np.uint32)
    t = ctx.upload(old)
    before, after = ctx.empty((n,), "u32"), ctx.empty((n,), "u32")
    ctx.encoder().copy_buffer_to_buffer(t.buffer, 0, before.buffer, 0, t.nbytes)   # recorded, not sent
    ctx.write(t, new)
    ctx.encoder().copy_buffer_to_buffer(t.buffer, 0, after.buffer, 0, t.nbytes)
    assert np.array_equal(ctx.to_numpy(before), old)
    assert np.array_equal(ctx.to_numpy(after), new)
    assert np.array_equal(ctx.to_numpy(t), new)


@gpu
def test_staged_write_bytes_at_an_offset(small_staging):
    """write_bytes (weights kept on the GPU go up so) from byte 40, in three pieces."""
    ctx = small_staging
    old, raw = _bits(800, 8, np.uint32), _bits(700, 9, np.uint32)
    t = ctx.upload(old)
    ctx.write_bytes(t.buffer, 40, raw.view(np.uint8))
    got = ctx.to_numpy(t)
    assert np.array_equal(got[:10], old[:10]) and np.array_equal(got[10:710], raw)
    assert np.array_equal(got[710:], old[710:])


@gpu
def test_default_threshold(ctx):
    """With the defaults, a write of STAGING_MIN_BYTES + 4 takes the staging buffer (one
    piece); smaller ones keep queue.write_buffer.  Both arrive bit-exact."""
    from qlora_ext.gpu.runtime.tuning import STAGING_BYTES, STAGING_MIN_BYTES

    assert STAGING_MIN_BYTES <= STAGING_BYTES
    small = _bits(STAGING_MIN_BYTES // 4 - 1, 4, np.float32)
    pool = ctx.staging_pool
    before = len(pool.buffers())
    t = ctx.upload(small)
    assert len(pool.buffers()) == before
    assert np.array_equal(ctx.to_numpy(t).view(np.uint32), small.view(np.uint32))
    big = _bits(STAGING_MIN_BYTES // 4 + 1, 5, np.float32)
    t = ctx.upload(big)
    assert pool.size_for(big.nbytes) in _staging_sizes(ctx, write=True)
    assert np.array_equal(ctx.to_numpy(t).view(np.uint32), big.view(np.uint32))



@pytest.mark.parametrize("n", [0, 1, 63, 64, 1009, 4099])
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_copy_bytes_in_pieces_bit_exact(monkeypatch, n, threads):
    """copy_bytes cuts the bytes across threads (pieces of at least COPY_PIECE_MIN, here 64):
    every byte lands once, nothing outside dst's range is touched."""
    from qlora_ext.gpu.runtime import transfer

    monkeypatch.setattr(transfer, "COPY_PIECE_MIN", 64)
    src = _bits((n + 3) // 4, n, np.uint32).view(np.uint8)[:n]
    dst = np.full(n + 8, 7, np.uint8)
    transfer.copy_bytes(dst[4:4 + n], src, threads)
    assert np.array_equal(dst[4:4 + n], src) and (dst[:4] == 7).all() and (dst[4 + n:] == 7).all()


@gpu
def test_staging_pool_reuses_its_buffers(small_staging):
    """Repeated uploads and readbacks of one size keep the pool at the buffers one of each
    needs (uploads return at submit, readbacks after finish)."""
    ctx = small_staging
    a = _bits(700, 11, np.uint32)
    t = ctx.upload(a)
    out = np.empty_like(a)
    for i in range(3):
        b = _bits(700, 12 + i, np.uint32)
        ctx.write(t, b)
        ctx.read_into(t, out)
        assert np.array_equal(out, b)
    writes, reads = (len([x for x in ctx.staging_pool.buffers() if x.usage & flag])
                     for flag in (ctx.wgpu.BufferUsage.MAP_WRITE, ctx.wgpu.BufferUsage.MAP_READ))
    assert writes <= 3 and reads == 3   # 700 u32 = 2,800 bytes: three 1 KiB pieces


@gpu
def test_reads_in_flight_finish_in_any_order(small_staging):
    """Two read_starts before either finishes (the split placement's lanes do so), finished in
    the other order: each gets its own tensor; staging comes back to the pool."""
    ctx = small_staging
    a, b = _bits(300, 21, np.uint32), _bits(200, 22, np.uint32)
    ta, tb = ctx.upload(a), ctx.upload(b)
    oa, ob = np.empty_like(a), np.empty_like(b)
    ra, rb = ctx.read_start(ta, oa), ctx.read_start(tb, ob)
    rb.finish()
    ra.finish()
    assert np.array_equal(oa, a) and np.array_equal(ob, b)
    ra.finish()   # a finished read has nothing left to do
    assert np.array_equal(oa, a)


@gpu
def test_upload_without_a_writable_mapped_view(small_staging, monkeypatch):
    """Where wgpu has no writable view of mapped memory, write_mapped copies (one thread)."""
    from qlora_ext.gpu.runtime import transfer

    monkeypatch.setattr(transfer, "_writable_view", lambda buf, n: None)
    a = _bits(1009, 31, np.float32)
    assert np.array_equal(small_staging.to_numpy(small_staging.upload(a)).view(np.uint32), a.view(np.uint32))

# ---- context ----------------------------------------------------------------------------------

@gpu
def test_shared_context_per_adapter_and_cached_objects(ctx):
    from qlora_ext.gpu.runtime import pick_adapter, shared_context

    assert shared_context() is ctx and shared_context(ctx.adapter) is ctx
    # wgpu hands out a new adapter object per enumeration: the same device is still shared
    assert shared_context(pick_adapter(allow_software=ctx.software)) is ctx
    made = []
    first = ctx.cached(("test object",), lambda: made.append(1) or object())
    assert ctx.cached(("test object",), lambda: made.append(1) or object()) is first and made == [1]
    t = ctx.upload(np.arange(12, dtype=np.float32))
    assert np.array_equal(ctx.to_numpy(t.view((3, 4))), np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(ValueError, match="view"):
        t.view((13,))


@gpu
@pytest.mark.parametrize("n", [1, _STAGE // 4 - 1, _STAGE // 4, _STAGE // 4 + 1, 3 * _STAGE // 4 + 1, 1009])
@pytest.mark.parametrize("dtype", ["f32", "i32"])
def test_staged_readback_bit_exact(small_staging, n, dtype):
    """read_into: through the reused MAP_READ staging buffer in pieces, after the recorded work."""
    ctx = small_staging
    a = _bits(n, n + 7, {"f32": np.float32, "i32": np.int32}[dtype])
    t = ctx.upload(a, dtype)
    later = ctx.empty((n,), dtype)
    ctx.encoder().copy_buffer_to_buffer(t.buffer, 0, later.buffer, 0, t.nbytes)   # recorded, not sent
    out = np.full(n, 5, a.dtype)
    ctx.read_into(later, out)
    assert _staging_sizes(ctx, write=False) == {POOL_MIN_BYTES}
    assert np.array_equal(out.view(np.uint32), a.view(np.uint32))
    with pytest.raises(ValueError, match="read_into"):
        ctx.read_into(t, np.empty(n + 1, a.dtype))


@gpu
def test_timed_passes_are_placed_after_their_submit_not_at_the_read(ctx):
    """The profiler's GPU spans sit on the host clock from their submit: a kernel submitted to
    an idle GPU and read 0.3 s later shows at its submit, not 0.3 s late (which would show the
    GPU busy while the host alone worked)."""
    import time

    from qlora_ext.gpu.bindings.layer_ops import add_gpu
    from qlora_ext.profile import Profiler

    if not ctx.has_timestamps:
        pytest.skip("adapter without timestamp-query")
    prof = Profiler()
    prof.start()
    x = ctx.upload(np.ones(1000, np.float32))
    y = ctx.upload(np.zeros(1000, np.float32))
    ctx.enable_timing(profiler=prof)
    try:
        ctx.to_numpy(y)   # the uploads done: the GPU is idle
        add_gpu(ctx, y, x)
        t_submit = time.perf_counter()
        ctx.submit()
        time.sleep(0.3)
        ctx.kernel_times()
    finally:
        ctx.enable_timing(False)
    spans = [s for s in prof.spans if s.device == "gpu"]
    assert spans and np.array_equal(ctx.to_numpy(y), np.ones(1000, np.float32))
    assert all(t_submit - 0.01 <= s.start <= s.end < t_submit + 0.15 for s in spans), \
        [(s.start - t_submit, s.end - t_submit) for s in spans]
