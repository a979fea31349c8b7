"""Host <-> GPU copies through mapped staging buffers, timed as profiler spans."""
from __future__ import annotations

import time

import numpy as np

from ...profile import PROFILER
from .adapter import GpuError


def fill_mapped(ctx, buf, pieces, size: int | None = None) -> None:
    """Map a MAP_WRITE buffer once (its first `size` bytes; None: all of it) and write
    (byte offset, ndarray) pieces; sizes need not be multiples of 4 (the tail is padded)."""
    try:
        if size is None:
            buf.map_sync(mode=ctx.wgpu.MapMode.WRITE)
        else:
            buf.map_sync(mode=ctx.wgpu.MapMode.WRITE, offset=0, size=size)
    except Exception as e:
        raise GpuError(f"{ctx.describe()}: mapping the {buf.size}-byte upload buffer {buf.label!r} failed: {e}") from e
    try:
        for off, arr in pieces:
            raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            n4 = raw.size // 4 * 4
            if n4:
                buf.write_mapped(raw[:n4], off)
            if n4 != raw.size:
                tail = np.zeros(4, np.uint8)
                tail[: raw.size - n4] = raw[n4:]
                buf.write_mapped(tail, off + n4)
    finally:
        buf.unmap()


def write_staging(ctx, buf, pieces, what: str = "upload") -> None:
    """fill_mapped, timed as a profiler "transfer" span `what`."""
    with PROFILER.phase(what, "transfer"):
        fill_mapped(ctx, buf, pieces)


def upload_chunked(ctx, staging, dst, dst_off: int, raw: np.ndarray) -> None:
    """Copy the bytes raw (a multiple of 4) into dst from byte dst_off, staging.size at a time: map
    the staging buffer (map_sync waits until the GPU has done the previous piece's copy, so
    the buffer is free to overwrite), fill it, one copy_buffer_to_buffer, submit.  Each piece
    is its own submit: queue order puts it after all work submitted before and before all
    work submitted after."""
    size = staging.size
    for off in range(0, raw.size, size):
        piece = raw[off:off + size]
        fill_mapped(ctx, staging, [(0, piece)], size=piece.size)
        enc = ctx.device.create_command_encoder()
        enc.copy_buffer_to_buffer(staging, 0, dst, dst_off + off, piece.size)
        ctx.queue.submit([enc.finish()])


def copy_mapped_out(ctx, buf, nbytes: int, out: np.ndarray) -> None:
    """Map a MAP_READ buffer (waits for the GPU's copy into it), copy its first nbytes into
    out (uint8, preallocated), unmap."""
    try:
        buf.map_sync(mode=ctx.wgpu.MapMode.READ, offset=0, size=(nbytes + 3) // 4 * 4 if nbytes else 4)
    except Exception as e:  # a lost device or a failed submit surfaces here
        raise GpuError(f"{ctx.describe()}: reading back {nbytes} bytes through {buf.label!r} failed: {e}") from e
    try:
        if nbytes:
            mem = buf.read_mapped(0, (nbytes + 3) // 4 * 4, copy=False)
            np.copyto(out.reshape(-1).view(np.uint8)[:nbytes], np.frombuffer(mem, np.uint8, count=nbytes))
    finally:
        buf.unmap()


def read_chunked(ctx, staging, src, raw: np.ndarray) -> None:
    """Copy src's first raw.size bytes (a multiple of 4) into raw (uint8, preallocated),
    staging.size at a time: one copy_buffer_to_buffer and submit per piece, then map and copy
    out (the reused MAP_READ buffer avoids queue.read_buffer's buffer per call and its extra
    copy: GPU.md measured 2.8 against 1.45 GB/s)."""
    size = staging.size
    for off in range(0, raw.size, size):
        n = min(size, raw.size - off)
        enc = ctx.device.create_command_encoder()
        enc.copy_buffer_to_buffer(src, off, staging, 0, n)
        ctx.queue.submit([enc.finish()])
        copy_mapped_out(ctx, staging, n, raw[off:off + n])


def read_staging(ctx, buf, nbytes: int, out: np.ndarray, submitted_at: float | None = None,
                 gpu_phase: str = "gpu") -> None:
    """Wait for the GPU, copy the first nbytes of a MAP_READ buffer into out (preallocated).
    With `submitted_at` (perf_counter at the submit), the profiler gets a "gpu" span from the
    submit to the end of the wait (the queue's work as the host sees it), the wait itself as
    "wait", and the copy out as a "readback" transfer."""
    t_wait = time.perf_counter()
    try:
        buf.map_sync(mode=ctx.wgpu.MapMode.READ, offset=0, size=(nbytes + 3) // 4 * 4 if nbytes else 4)
    except Exception as e:  # a lost device or a failed submit surfaces here
        raise GpuError(f"{ctx.describe()}: reading back {nbytes} bytes through {buf.label!r} failed: {e}") from e
    t_done = time.perf_counter()
    if submitted_at is not None:
        PROFILER.record(gpu_phase, "gpu", submitted_at, t_done)
    PROFILER.record("gpu wait", "wait", t_wait, t_done)
    try:
        if nbytes:
            mem = buf.read_mapped(0, (nbytes + 3) // 4 * 4, copy=False)
            np.copyto(out.reshape(-1).view(np.uint8), np.frombuffer(mem, np.uint8, count=nbytes))
    finally:
        buf.unmap()
        PROFILER.record("readback", "transfer", t_done, time.perf_counter())
