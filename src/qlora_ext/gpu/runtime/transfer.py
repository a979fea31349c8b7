"""Host <-> GPU copies through mapped staging buffers taken from a pool, the host-side copies
cut across threads.

Why it is built so (rates in GPU.md): queue.write_buffer / read_buffer make a staging buffer per
call and copy twice; a reused mapped buffer is about twice as fast both ways, so every large
transfer goes through pooled MAP_WRITE / MAP_READ buffers.  The host's copy into or out of
mapped memory is then what remains, and one thread's memcpy is far below the bus: numpy's
copies release the GIL, so the bytes are cut into pieces copied by a few threads at once."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .adapter import GpuError

# Copies below this many bytes per thread stay on the calling thread: handing a piece to a
# thread costs tens of microseconds.
COPY_PIECE_MIN = 1 << 20
# Staging buffers are made in power-of-two sizes from this up, so that a few sizes serve every
# transfer and the pool stays small.
POOL_MIN_BYTES = 1 << 16

_executors: dict = {}
_executors_lock = threading.Lock()


def default_copy_threads() -> int:
    """Threads of a host copy: up to 8 (memory bandwidth, not cores, bounds a copy)."""
    return max(1, min(8, os.cpu_count() or 1))


def _executor(threads: int) -> ThreadPoolExecutor:
    with _executors_lock:
        ex = _executors.get(threads)
        if ex is None:
            ex = _executors[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="qlora_ext-copy")
        return ex


def copy_bytes(dst: np.ndarray, src: np.ndarray, threads: int) -> None:
    """dst[...] = src for uint8 arrays of one size, cut into up to `threads` pieces of at least
    COPY_PIECE_MIN bytes, the calling thread copying the first."""
    n = src.size
    parts = max(1, min(int(threads), n // COPY_PIECE_MIN))
    if parts == 1:
        np.copyto(dst, src)
        return
    bounds = [n * i // parts // 64 * 64 for i in range(parts)] + [n]
    futures = [_executor(parts).submit(np.copyto, dst[a:b], src[a:b]) for a, b in zip(bounds[1:-1], bounds[2:])]
    try:
        np.copyto(dst[:bounds[1]], src[:bounds[1]])
    finally:
        for f in futures:
            f.result()


def _writable_view(buf, nbytes: int):
    """The mapped range of a MAP_WRITE buffer as a writable uint8 array, or None where this
    wgpu has no writable mapped view (then write_mapped copies on one thread)."""
    get = getattr(buf, "_experimental_get_mapped_range", None)
    if get is None:
        return None
    return np.frombuffer(get(0, nbytes), np.uint8)


class StagingPool:
    """Mapped staging buffers by (size, direction), reused.  An upload buffer whose copy is
    recorded in the pending command encoder comes back to the pool only when that encoder is
    submitted (mapping it earlier would fail the submit); mapping a buffer waits for the GPU
    to finish the copies that use it, so a buffer taken from the pool is always safe to fill."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._free: dict = {}       # (size, write) -> [buffer]
        self._recorded: list = []   # upload buffers used by the pending encoder
        self._lock = threading.Lock()

    @staticmethod
    def size_for(nbytes: int) -> int:
        return max(POOL_MIN_BYTES, 1 << (max(int(nbytes), 1) - 1).bit_length())

    def take(self, nbytes: int, write: bool):
        size = self.size_for(nbytes)
        with self._lock:
            free = self._free.get((size, write))
            if free:
                return free.pop()
        return self.ctx.staging(size, write, "upload" if write else "readback")

    def give(self, buf, write: bool) -> None:
        with self._lock:
            self._free.setdefault((buf.size, write), []).append(buf)

    def recorded(self, buf) -> None:
        with self._lock:
            self._recorded.append(buf)

    @property
    def recorded_count(self) -> int:
        return len(self._recorded)

    def submitted(self) -> None:
        """The pending encoder went to the queue: its upload buffers may be mapped again."""
        with self._lock:
            done, self._recorded = self._recorded, []
            for b in done:
                self._free.setdefault((b.size, True), []).append(b)

    def buffers(self) -> list:
        """Every buffer the pool holds now (free or recorded)."""
        with self._lock:
            return [b for bufs in self._free.values() for b in bufs] + list(self._recorded)


def _map(ctx, buf, write: bool, nbytes: int) -> None:
    mode = ctx.wgpu.MapMode.WRITE if write else ctx.wgpu.MapMode.READ
    try:
        buf.map_sync(mode=mode, offset=0, size=nbytes)
    except Exception as e:  # a lost device or a failed submit surfaces here
        what = "upload" if write else "readback"
        raise GpuError(f"{ctx.describe()}: mapping the {buf.size}-byte {what} staging buffer failed: {e}") from e


def upload_staged(ctx, dst, dst_off: int, raw: np.ndarray, threads: int) -> None:
    """Record copies of the bytes raw (uint8, a multiple of 4) into the buffer dst from byte
    dst_off, ctx.tuning.staging_bytes at a time through pooled MAP_WRITE buffers, in the
    pending encoder (work recorded before sees the old contents, work recorded after the new
    ones).  The pending encoder is submitted whenever it holds two pieces, so a large upload
    keeps at most three pieces of staging (the third is filled while the GPU copies two)."""
    piece_max = max(256, int(ctx.tuning.staging_bytes) // 256 * 256)
    pool = ctx.staging_pool
    for off in range(0, raw.size, piece_max):
        piece = raw[off:off + piece_max]
        n = piece.size
        buf = pool.take(n, write=True)
        _map(ctx, buf, True, n)
        try:
            view = _writable_view(buf, n)
            if view is None:
                buf.write_mapped(piece, 0)
            else:
                copy_bytes(view, piece, threads)
                del view
        finally:
            buf.unmap()
        ctx.copy(buf, 0, dst, dst_off + off, n)
        pool.recorded(buf)
        if pool.recorded_count >= 2:
            ctx.submit()


class PendingRead:
    """Copies from GPU buffers into pooled MAP_READ buffers, submitted; finish() waits for them
    and copies the bytes out into the host array."""

    def __init__(self, ctx, pieces: list, out: np.ndarray, threads: int):
        self.ctx, self.pieces, self.out, self.threads = ctx, pieces, out, threads

    def finish(self) -> None:
        ctx, pool = self.ctx, self.ctx.staging_pool
        pieces, self.pieces = self.pieces, []
        try:
            for buf, off, n in pieces:
                _map(ctx, buf, False, n)
                try:
                    src = np.frombuffer(buf.read_mapped(0, n, copy=False), np.uint8)
                    copy_bytes(self.out[off:off + n], src, self.threads)
                    del src   # the mapped view must be gone before unmap
                finally:
                    buf.unmap()
        finally:
            for buf, _, _ in pieces:
                pool.give(buf, write=False)


def read_staged(ctx, src, raw: np.ndarray, threads: int) -> PendingRead:
    """Record copies of src's first raw.size bytes (a multiple of 4) into pooled MAP_READ
    buffers, ctx.tuning.staging_bytes at a time, and submit them after all recorded work;
    the returned PendingRead's finish() fills raw (uint8)."""
    piece_max = max(256, int(ctx.tuning.staging_bytes) // 256 * 256)
    pieces = []
    for off in range(0, raw.size, piece_max):
        n = min(piece_max, raw.size - off)
        buf = ctx.staging_pool.take(n, write=False)
        ctx.copy(src, off, buf, 0, n)
        pieces.append((buf, off, n))
    ctx.submit()
    return PendingRead(ctx, pieces, raw, threads)
