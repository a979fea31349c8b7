"""The GPU context of the resident mode: one wgpu device, WGSL shaders loaded by name from
shaders/, pipelines and bind groups created once and cached by content, and one command
encoder that records every dispatch of a step until `submit()`.

This is a thin stand-in for the ffn engineer's device/pipeline code in qlora_ext.gpu (not yet
committed when this was written); it keeps the same ideas (adapter limits requested, shaders
by name, caches) so that switching to theirs later only changes this file.

A `GpuTensor` is a storage buffer plus a shape and a dtype (f32, i32 or u32): the kernels'
buffer-in/buffer-out forms take and return these without any host round trip."""
from __future__ import annotations

import os
import struct
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_DTYPES = {"f32": np.float32, "i32": np.int32, "u32": np.uint32}
# The WebGPU limit on workgroups per dimension (wgpu 0.32 enforces it: GPU.md).
MAX_GROUPS = 65535
_BIND_GROUP_CACHE = 1024
# Writes of at least this many bytes go up through one reused MAP_WRITE staging buffer of
# STAGING_BYTES, chunk by chunk.  queue.write_buffer makes a staging buffer per call and keeps
# it until the next submit; the construction-time uploads (GiBs, before any submit) piled up
# as ~4 GiB of extra GPU memory for a 4B model on an H200, and a reused mapped buffer
# uploads about twice as fast (GPU.md).  Smaller writes (ids, labels) stay on write_buffer.
STAGING_MIN_BYTES = 1 << 20
STAGING_BYTES = 64 << 20


def _shader_dirs():
    env = os.environ.get("QLORA_EXT_SHADERS")
    here = Path(__file__).resolve()
    dirs = [Path(env)] if env else []
    # Source tree: <root>/src/qlora_ext/gpu/resident/context.py -> <root>/shaders;
    # installed wheel: shaders next to the package.
    dirs += [here.parents[4] / "shaders", here.parents[2] / "shaders"]
    return dirs


def _shader_text(name: str) -> str:
    for d in _shader_dirs():
        p = d / f"{name}.wgsl"
        if p.is_file():
            return p.read_text()
    raise OSError(f"shader {name!r}: no {name}.wgsl in any of {[str(d) for d in _shader_dirs()]}")


def load_shader_source(name: str) -> str:
    """The text of shaders/<name>.wgsl with its `//!include other` lines expanded
    (QLORA_EXT_SHADERS overrides the folder)."""
    from ..context import expand_includes

    return expand_includes(_shader_text(name), _shader_text, name)


@dataclass
class GpuTensor:
    """A storage buffer holding a C-ordered array of `shape` and `dtype` ('f32', 'i32', 'u32')."""

    buffer: object
    shape: tuple
    dtype: str = "f32"

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return 4 * self.size


# The resident kernels were developed and validated on wgpu 0.32 (wgpu-native 29); wgpu 0.31's
# shader translator lays out some uniform structs differently and the kernels fail validation.
MIN_WGPU_FOR_RESIDENT = (0, 32)


def require_wgpu_for_resident(version: str) -> None:
    """Raise OSError (with the fix) when the installed wgpu is too old for the resident mode."""
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_WGPU_FOR_RESIDENT:
        need = ".".join(map(str, MIN_WGPU_FOR_RESIDENT))
        raise OSError(f"the GPU-resident mode needs wgpu >= {need} (installed: {version}; wgpu {need} needs "
                      f"Python >= 3.11): pip install 'wgpu>={need}', or use the split placement")


class GpuContext:
    """One device, its pipelines and one pending command encoder.

    Kernels call `dispatch(...)`, which records a compute pass into the pending encoder;
    `submit()` sends it.  Reading a tensor back (`to_numpy`) submits first."""

    def __init__(self, adapter=None):
        import wgpu

        require_wgpu_for_resident(wgpu.__version__)
        self.wgpu = wgpu
        if adapter is None:
            adapter = find_adapter()
            if adapter is None:
                raise OSError("no wgpu adapter found (need Vulkan, Metal or DX12; Mesa lavapipe works)")
        self.adapter = adapter
        limits = adapter.limits
        want = {k: limits[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size",
                                       "max-compute-workgroup-storage-size",
                                       "max-compute-invocations-per-workgroup",
                                       "max-storage-buffers-per-shader-stage") if k in limits}
        # timestamp-query when the adapter has it: per-kernel GPU times (enable_timing).
        feats = [f for f in ("timestamp-query",) if f in adapter.features]
        self.device = adapter.request_device_sync(required_limits=want, required_features=feats)
        self.has_timestamps = bool(feats)
        info = adapter.info
        self.software = str(info.get("adapter_type", "")).lower() == "cpu" or any(
            n in str(info.get("device", "")).lower() for n in ("llvmpipe", "lavapipe", "swiftshader"))
        env = os.environ.get("QLORA_EXT_WGSL_TRUSTED")
        self.trusted = (env == "1") if env in ("0", "1") else not self.software
        # what the FFN backend's tile choice (qlora_ext.gpu.kernels.TileChooser) reads
        self.info = {"software": self.software, "name": info.get("device", "unknown")}
        self.limits = dict(self.device.limits)
        self.queue = self.device.queue
        self._modules = {}
        self._pipelines = {}
        self._layouts = {}
        # Bind groups by (layout, buffer ids, ranges), LRU-bounded.  A group is dropped when
        # one of its buffers is collected (weakref.finalize), so a recycled id never finds a
        # stale group and short-lived buffers are not kept alive by the cache.
        self._bind_groups = OrderedDict()
        self._groups_of = {}   # id(buffer) -> keys of the groups that bind it
        self._uniforms = {}
        self._encoder = None
        self._pass = None
        self._sync_buf = None
        self.staging_bytes, self.staging_min_bytes = STAGING_BYTES, STAGING_MIN_BYTES
        self._staging = None
        # Bytes of every storage buffer made through empty() (never decreases: callers keep
        # what they allocate); memory reports take differences of it.
        self.allocated_bytes = 0
        self._timing = None

    def describe(self) -> str:
        return f"adapter {self.info['name']!r}"

    # ---- buffers ---------------------------------------------------------------------------
    def empty(self, shape, dtype: str = "f32") -> GpuTensor:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
        shape = tuple(int(s) for s in shape)
        n = int(np.prod(shape, dtype=np.int64))
        nbytes = max(4 * n, 16)
        lim = self.limits["max-storage-buffer-binding-size"]
        if nbytes > lim:
            raise ValueError(f"tensor of shape {shape}: {nbytes} bytes exceeds the adapter's "
                             f"storage binding limit of {lim} bytes")
        u = self.wgpu.BufferUsage
        buf = self.device.create_buffer(size=(nbytes + 15) // 16 * 16,
                                        usage=u.STORAGE | u.COPY_SRC | u.COPY_DST)
        self.allocated_bytes += buf.size
        return GpuTensor(buf, shape, dtype)

    def zeros(self, shape, dtype: str = "f32") -> GpuTensor:
        t = self.empty(shape, dtype)
        self.encoder().clear_buffer(t.buffer)
        return t

    def upload(self, a: np.ndarray, dtype: str | None = None) -> GpuTensor:
        """A new tensor holding a (float32, int32 or uint32; dtype converts)."""
        a = np.asarray(a)
        if dtype is None:
            dtype = {np.dtype(np.float32): "f32", np.dtype(np.int32): "i32",
                     np.dtype(np.uint32): "u32"}.get(a.dtype)
            if dtype is None:
                raise ValueError(f"upload: dtype {a.dtype} has no GPU form (float32, int32, uint32)")
        a = np.ascontiguousarray(a, dtype=_DTYPES[dtype])
        t = self.empty(a.shape, dtype)
        self.write(t, a)
        return t

    def write(self, t: GpuTensor, a: np.ndarray) -> None:
        """Replace t's contents with a.  Work recorded before the call sees the old contents,
        work recorded after it the new ones (the pending encoder is submitted first, then the
        copy is queued).  Large writes go through the staging buffer (STAGING_MIN_BYTES)."""
        a = np.ascontiguousarray(a, dtype=_DTYPES[t.dtype])
        if a.size != t.size:
            raise ValueError(f"write: {a.size} elements into a tensor of shape {t.shape}")
        if a.size:
            # Recorded work that reads t must see the old contents: flush it first.
            self.submit()
            if a.nbytes >= self.staging_min_bytes:
                self._write_staged(t.buffer, a)
            else:
                self.queue.write_buffer(t.buffer, 0, a)

    def _write_staged(self, buf, a: np.ndarray) -> None:
        """Copy a (4-byte elements, so every piece is a multiple of 4 bytes) into buf from
        byte 0, staging_bytes at a time: map the staging buffer (map_sync waits until the GPU
        has done the previous piece's copy, so the buffer is free to overwrite), fill it, one
        copy_buffer_to_buffer, submit.  Each piece is its own submit: queue order puts it
        after all work submitted before and before all work submitted after."""
        w = self.wgpu
        size = max(256, int(self.staging_bytes) // 256 * 256)
        st = self._staging
        if st is None or st.size != size:
            st = self._staging = self.device.create_buffer(
                size=size, usage=w.BufferUsage.MAP_WRITE | w.BufferUsage.COPY_SRC,
                label="resident upload staging")
        raw = a.reshape(-1).view(np.uint8)
        for off in range(0, raw.size, size):
            piece = raw[off:off + size]
            st.map_sync(mode=w.MapMode.WRITE, offset=0, size=piece.size)
            try:
                st.write_mapped(piece, 0)
            finally:
                st.unmap()
            enc = self.device.create_command_encoder()
            enc.copy_buffer_to_buffer(st, 0, buf, off, piece.size)
            self.queue.submit([enc.finish()])

    def to_numpy(self, t: GpuTensor) -> np.ndarray:
        self.submit()
        if t.size == 0:
            return np.zeros(t.shape, _DTYPES[t.dtype])
        raw = self.queue.read_buffer(t.buffer, 0, t.nbytes)
        return np.frombuffer(raw, dtype=_DTYPES[t.dtype]).reshape(t.shape).copy()

    # ---- pipelines -------------------------------------------------------------------------
    def _module(self, name: str, consts: tuple):
        key = (name, consts)
        m = self._modules.get(key)
        if m is None:
            src = load_shader_source(name)
            # Consts a shader needs at compile time (array sizes of private memory) are prepended;
            # tile sizes stay WGSL `override`s set per pipeline.
            head = "".join(f"const {k}: u32 = {int(v)}u;\n" for k, v in consts)
            try:
                m = self._create_module(head + src, name)
            except Exception as e:  # noqa: BLE001 - show the source on demand, re-raise as is
                if os.environ.get("QLORA_EXT_SHADER_DEBUG"):
                    lines = (head + src).splitlines()
                    print("\n".join(f"{i + 1:4d} {s}" for i, s in enumerate(lines)))
                raise OSError(f"shader {name!r} failed to compile: {e}") from e
            self._modules[key] = m
        return m

    def _create_module(self, code: str, label: str):
        """Trusted (no naga bounds checks or loop bounding) on real GPUs, as the FFN backend
        does (2 -> 27 TFLOP/s for its GEMM on an H200); checked on software adapters.
        QLORA_EXT_WGSL_TRUSTED=0|1 overrides.  The trusted path is the FFN backend's
        GpuContext._create_module (it only uses .device and .trusted), reused as is.  Every
        resident_*.wgsl access is guarded by its own bounds test."""
        from ..context import GpuContext as FfnContext

        return FfnContext._create_module(self, code, label)

    def _layout(self, kinds: str):
        """kinds: one letter per binding, r = read-only storage, w = read-write storage,
        u = uniform."""
        lay = self._layouts.get(kinds)
        if lay is None:
            w = self.wgpu
            types = {"r": w.BufferBindingType.read_only_storage, "w": w.BufferBindingType.storage,
                     "u": w.BufferBindingType.uniform}
            bgl = self.device.create_bind_group_layout(entries=[
                {"binding": i, "visibility": w.ShaderStage.COMPUTE, "buffer": {"type": types[k]}}
                for i, k in enumerate(kinds)])
            lay = (bgl, self.device.create_pipeline_layout(bind_group_layouts=[bgl]))
            self._layouts[kinds] = lay
        return lay

    def pipeline(self, name: str, entry: str, kinds: str, consts: dict | None = None,
                 overrides: dict | None = None):
        consts_t = tuple(sorted((consts or {}).items()))
        over_t = tuple(sorted((overrides or {}).items()))
        key = (name, entry, kinds, consts_t, over_t)
        p = self._pipelines.get(key)
        if p is None:
            bgl, pl = self._layout(kinds)
            compute = {"module": self._module(name, consts_t), "entry_point": entry}
            if over_t:
                compute["constants"] = dict(over_t)
            p = (self.device.create_compute_pipeline(layout=pl, compute=compute), bgl,
                 name.removeprefix("resident_") + "." + entry)
            self._pipelines[key] = p
        return p

    def uniform(self, fmt: str, *values) -> object:
        """A uniform buffer holding struct.pack(fmt, *values), cached by its bytes: the shapes
        and flags of a step repeat, so steady-state steps create no buffers."""
        data = struct.pack("<" + fmt, *values)
        data += b"\0" * (-len(data) % 16)
        buf = self._uniforms.get(data)
        if buf is None:
            u = self.wgpu.BufferUsage
            buf = self.device.create_buffer_with_data(data=data, usage=u.UNIFORM)
            self._uniforms[data] = buf
        return buf

    # ---- recording -------------------------------------------------------------------------
    def encoder(self):
        """The pending command encoder, for copies and clears (ends an open compute pass)."""
        self._end_pass()
        if self._encoder is None:
            self._encoder = self.device.create_command_encoder()
        return self._encoder

    def _end_pass(self) -> None:
        if self._pass is not None:
            self._pass.end()
            self._pass = None

    def dispatch(self, pipeline, buffers, groups) -> None:
        """Record one compute pass: `buffers` bound at 0.. in order, `groups` (x[, y[, z]])."""
        pipe, bgl, label = pipeline
        # Entries: GpuTensor, a wgpu buffer, or (buffer, byte offset, byte size) for a range.
        bufs = [(b.buffer, 0, b.buffer.size) if isinstance(b, GpuTensor) else
                (b if isinstance(b, tuple) else (b, 0, b.size)) for b in buffers]
        key = (id(bgl),) + tuple((id(b), o, n) for b, o, n in bufs)
        hit = self._bind_groups.get(key)
        if hit is not None:
            self._bind_groups.move_to_end(key)
            bg = hit
        else:
            bg = self.device.create_bind_group(layout=bgl, entries=[
                {"binding": i, "resource": {"buffer": b, "offset": o, "size": n}}
                for i, (b, o, n) in enumerate(bufs)])
            self._bind_groups[key] = bg
            for b, _, _ in bufs:
                keys = self._groups_of.get(id(b))
                if keys is None:
                    keys = self._groups_of[id(b)] = set()
                    weakref.finalize(b, self._evict, id(b))
                keys.add(key)
            if len(self._bind_groups) > _BIND_GROUP_CACHE:
                self._bind_groups.popitem(last=False)
        g = tuple(int(x) for x in groups) + (1, 1)
        if min(g[:3]) == 0:
            return
        if max(g[:3]) > MAX_GROUPS:
            raise ValueError(f"dispatch of {g[:3]} workgroups: at most {MAX_GROUPS} per dimension")
        if self._timing is not None:
            # one pass per dispatch: timestamps are taken at pass boundaries
            cp = self._timing.begin_pass(self, label)
        else:
            # consecutive dispatches share a pass (wgpu orders their storage accesses; a
            # pass per dispatch costs host time per kernel)
            if self._pass is None:
                self._pass = self.encoder().begin_compute_pass()
            cp = self._pass
        cp.set_pipeline(pipe)
        cp.set_bind_group(0, bg)
        cp.dispatch_workgroups(g[0], g[1], g[2])
        if self._timing is not None:
            cp.end()

    def submit(self) -> None:
        self._end_pass()
        if self._encoder is not None:
            self.queue.submit([self._encoder.finish()])
            self._encoder = None

    # ---- per-kernel GPU time ---------------------------------------------------------------
    def enable_timing(self, on: bool = True, profiler=None) -> None:
        """Time every compute pass with timestamp queries (needs the adapter's timestamp-query
        feature); kernel_times() then returns GPU seconds per kernel.  With a
        qlora_ext.profile.Profiler, every pass also becomes a "gpu" span of it."""
        if on and not self.has_timestamps:
            raise OSError("this adapter has no timestamp-query feature: per-kernel GPU times "
                          "are unavailable")
        self.submit()
        self._timing = _PassTimer(self, profiler) if on else None

    def kernel_times(self) -> dict:
        """{kernel: (seconds, passes)} accumulated since timing was enabled (waits for the GPU;
        the passes not yet collected become spans of enable_timing's profiler)."""
        if self._timing is None:
            raise ValueError("kernel_times: timing is off (call enable_timing() first)")
        self._timing.collect(self)
        return dict(self._timing.totals)

    def sync(self) -> None:
        """Submit and wait until the GPU has finished (wgpu 0.32's on_submitted_work_done_sync
        is broken: GPU.md; a 4-byte read back waits for the queue instead)."""
        self.submit()
        if self._sync_buf is None:
            u = self.wgpu.BufferUsage
            self._sync_buf = self.device.create_buffer(size=16, usage=u.STORAGE | u.COPY_SRC)
        self.queue.read_buffer(self._sync_buf, 0, 4)

    def _evict(self, buffer_id: int) -> None:
        for key in self._groups_of.pop(buffer_id, ()):
            self._bind_groups.pop(key, None)


class _PassTimer:
    """Begin/end timestamps of each compute pass in a query set; resolved on collect() or
    when the set is full.  Timestamps are taken as nanoseconds (WebGPU's unit; Vulkan's
    timestampPeriod is 1 ns on NVIDIA and lavapipe)."""

    CAPACITY = 4096  # queries = 2 per pass

    def __init__(self, ctx: GpuContext, profiler=None):
        w = ctx.wgpu
        self.qs = ctx.device.create_query_set(type=w.QueryType.timestamp, count=self.CAPACITY)
        self.resolve = ctx.device.create_buffer(size=8 * self.CAPACITY,
                                                usage=w.BufferUsage.QUERY_RESOLVE | w.BufferUsage.COPY_SRC)
        self.labels: list[str] = []
        self.totals: dict = {}
        # Spans go to the profiler at every collect, including the ones forced mid-step by a
        # full query set (a step has more passes than CAPACITY / 2).
        self.profiler = profiler

    def begin_pass(self, ctx: GpuContext, label: str):
        if 2 * (len(self.labels) + 1) > self.CAPACITY:
            self.collect(ctx)
        i = len(self.labels)
        self.labels.append(label)
        return ctx.encoder().begin_compute_pass(timestamp_writes={
            "query_set": self.qs, "beginning_of_pass_write_index": 2 * i,
            "end_of_pass_write_index": 2 * i + 1})

    def collect(self, ctx: GpuContext) -> None:
        """Resolve the pending passes' timestamps into totals (and profiler spans, placed on
        the host clock by anchoring the last pass's end at the moment the wait returned)."""
        import time

        profiler = self.profiler

        n = len(self.labels)
        if n == 0:
            return
        ctx.encoder().resolve_query_set(self.qs, 0, 2 * n, self.resolve, 0)
        ctx.submit()
        raw = ctx.queue.read_buffer(self.resolve, 0, 16 * n)
        t_host = time.perf_counter()
        ticks = np.frombuffer(raw, dtype=np.uint64).reshape(n, 2).astype(np.int64)
        for label, (t0, t1) in zip(self.labels, ticks):
            sec, cnt = self.totals.get(label, (0.0, 0))
            self.totals[label] = (sec + max(int(t1 - t0), 0) * 1e-9, cnt + 1)
        if profiler is not None:
            last = int(ticks[:, 1].max())
            for label, (t0, t1) in zip(self.labels, ticks):
                profiler.record(label, "gpu", t_host - (last - int(t0)) * 1e-9,
                                t_host - (last - int(t1)) * 1e-9)
        self.labels = []


def grid_2d(n_groups: int) -> tuple:
    """Split n_groups workgroups over (x, y) with x <= 65535; shaders rebuild the linear id as
    wid.x + wid.y * num_workgroups.x and skip ids >= n_groups."""
    if n_groups <= MAX_GROUPS:
        return (n_groups, 1)
    y = (n_groups + MAX_GROUPS - 1) // MAX_GROUPS
    x = (n_groups + y - 1) // y
    return (x, y)


def find_adapter():
    """The adapter the resident mode uses by default: a real GPU if there is one, else a
    software one (the FFN backend's choice, qlora_ext.gpu.context.pick_adapter), or None."""
    from ..context import pick_adapter

    return pick_adapter(allow_software=False) or pick_adapter(allow_software=True)


def unavailable_reason() -> str | None:
    """Why the resident mode cannot run here (wgpu missing or too old, no adapter), or None."""
    try:
        import wgpu
    except ImportError:
        return "wgpu is not installed"
    try:
        require_wgpu_for_resident(wgpu.__version__)
    except OSError as e:
        return str(e)
    if find_adapter() is None:
        return "no wgpu adapter (install Mesa lavapipe or run on a GPU)"
    return None


_default = None


def default_context() -> GpuContext:
    """A process-wide context on the best adapter, made on first use."""
    global _default
    if _default is None:
        _default = GpuContext()
    return _default
