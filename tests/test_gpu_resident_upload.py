"""GpuContext.upload/write of the resident mode: large arrays go up through one reused
MAP_WRITE staging buffer in pieces; contents must arrive bit-exact and writes must keep their
ordering with recorded work."""
import numpy as np
import pytest

from gpu_resident_support import resident_context

pytestmark = pytest.mark.gpu

_STAGE = 1024  # bytes: a tiny staging buffer, so that small arrays take several pieces


@pytest.fixture(scope="module")
def ctx():
    return resident_context()


@pytest.fixture
def small_staging(ctx, monkeypatch):
    """Every write through a 1 KiB staging buffer."""
    monkeypatch.setattr(ctx, "staging_bytes", _STAGE)
    monkeypatch.setattr(ctx, "staging_min_bytes", 0)
    return ctx


def _bits(n, seed, dtype):
    # every 32-bit pattern is fair game (f32 NaNs and denormals included): compare as u32
    return np.random.default_rng(seed).integers(0, 2**32, size=n, dtype=np.uint32).view(dtype)


@pytest.mark.parametrize("n", [1, 3, _STAGE // 4 - 1, _STAGE // 4, _STAGE // 4 + 1, 3 * _STAGE // 4,
                               3 * _STAGE // 4 + 1, 1009])
@pytest.mark.parametrize("dtype", ["f32", "u32", "i32"])
def test_staged_upload_bit_exact(small_staging, n, dtype):
    ctx = small_staging
    a = _bits(n, n, {"f32": np.float32, "u32": np.uint32, "i32": np.int32}[dtype])
    t = ctx.upload(a, dtype)
    assert ctx._staging is not None and ctx._staging.size == _STAGE
    got = ctx.to_numpy(t)
    assert got.shape == (n,) and np.array_equal(got.view(np.uint32), a.view(np.uint32))
    # a second write into the same tensor replaces every element
    b = _bits(n, n + 1, a.dtype)
    ctx.write(t, b)
    assert np.array_equal(ctx.to_numpy(t).view(np.uint32), b.view(np.uint32))


def test_staged_write_shapes(small_staging):
    ctx = small_staging
    a = _bits(7 * 37, 3, np.float32).reshape(7, 37)
    assert np.array_equal(ctx.to_numpy(ctx.upload(a)).view(np.uint32), a.view(np.uint32))
    with pytest.raises(ValueError, match="write"):
        ctx.write(ctx.empty((7, 36)), a)


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


def test_default_threshold(ctx):
    """With the defaults, a write of STAGING_MIN_BYTES + 4 takes the staging buffer (one
    piece); smaller ones keep queue.write_buffer.  Both arrive bit-exact."""
    from qlora_ext.gpu.resident.context import STAGING_BYTES, STAGING_MIN_BYTES

    assert STAGING_MIN_BYTES <= STAGING_BYTES
    small = _bits(STAGING_MIN_BYTES // 4 - 1, 4, np.float32)
    ctx._staging = None
    t = ctx.upload(small)
    assert ctx._staging is None
    assert np.array_equal(ctx.to_numpy(t).view(np.uint32), small.view(np.uint32))
    big = _bits(STAGING_MIN_BYTES // 4 + 1, 5, np.float32)
    t = ctx.upload(big)
    assert ctx._staging is not None and ctx._staging.size == STAGING_BYTES
    assert np.array_equal(ctx.to_numpy(t).view(np.uint32), big.view(np.uint32))
