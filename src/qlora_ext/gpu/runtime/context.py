"""GpuContext: one wgpu device with the adapter's real limits, shaders by name, GPU objects
cached by content (modules, layouts, pipelines, bind groups, uniform blocks), buffers (owned
GpuTensors and a pool of per-call temporaries), uploads and readbacks, and one pending
command encoder that records dispatches and copies until submit().

Kernels record with `dispatch(ctx.pipeline(...), buffers, groups)`: per step the code only
writes buffers and records dispatches (STYLE.md: GPU objects created once, cached by content)."""
from __future__ import annotations

import math
import struct
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .adapter import GpuError, adapter_summary, default_adapter, import_wgpu
from .shaders import compile_module
from .recording import dispatch_recorder
from .timing import PassTimer
from .transfer import PendingRead, StagingPool, default_copy_threads, read_staged, upload_staged
from .tuning import Tuning

_DTYPES = {"f32": np.float32, "i32": np.int32, "u32": np.uint32}
# limits requested at the adapter's real value instead of the WebGPU defaults
_LIMITS = ("max-storage-buffer-binding-size", "max-buffer-size", "max-compute-workgroup-storage-size",
           "max-storage-buffers-per-shader-stage", "max-compute-invocations-per-workgroup",
           "max-compute-workgroup-size-x", "max-compute-workgroup-size-y",
           "max-compute-workgroups-per-dimension", "max-uniform-buffer-binding-size")
_FEATURES = ("timestamp-query", "timestamp-query-inside-passes")
# The WebGPU default of workgroups per dimension (wgpu 0.32 enforces the device's: GPU.md).
MAX_GROUPS = 65535
# Bind groups kept (LRU).  A step binds about 70 distinct groups per layer and batch shape
# (2,100 for a 30-layer model), and batches padded to their longest row come in several
# widths: a cache smaller than all of them re-creates every group of every step once three
# shapes alternate.  32,768 holds ~15 shapes of a 30-layer model; a group is a few hundred
# bytes of host and descriptor memory.
_BIND_GROUP_CACHE = 32768
_KINDS = {"u": "uniform", "r": "read_only_storage", "w": "storage"}


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

    def view(self, shape) -> "GpuTensor":
        """The same buffer seen with another shape of at most as many elements."""
        shape = tuple(int(x) for x in shape)
        if math.prod(shape) > self.size:     # math.prod: views are made per op, np.prod costs ~10x
            raise ValueError(f"view {shape} of a tensor of shape {self.shape}")
        return GpuTensor(self.buffer, shape, self.dtype)


class GpuContext:
    """One device, its caches and one pending command encoder.  adapter None: the default
    adapter (a real GPU, else a software one); tuning None: Tuning.from_env()."""

    def __init__(self, adapter=None, tuning: Tuning | None = None):
        self.wgpu = import_wgpu()
        self.tuning = Tuning.from_env() if tuning is None else tuning
        if adapter is None:
            adapter = default_adapter()
            if adapter is None:
                raise GpuError("no wgpu adapter found (need Vulkan, Metal or DX12; Mesa lavapipe works)")
        self.adapter = adapter
        self.info = adapter_summary(adapter)
        self.software = self.info["software"]
        lim = adapter.limits
        wanted = {k: lim[k] for k in _LIMITS if k in lim}
        # timestamp queries when the adapter has them: per-kernel GPU times (enable_timing)
        feats = [f for f in _FEATURES if f in adapter.features]
        try:
            self.device = adapter.request_device_sync(required_limits=wanted, required_features=feats,
                                                      label="qlora_ext")
        except Exception as e:
            raise GpuError(f"{self.describe()}: could not create a device with limits {wanted}: {e}") from e
        self.has_timestamps = "timestamp-query" in feats
        self.limits = dict(self.device.limits)
        self.max_binding = int(self.limits["max-storage-buffer-binding-size"])
        self.max_groups = int(self.limits.get("max-compute-workgroups-per-dimension", MAX_GROUPS))
        self.trusted = (not self.software) if self.tuning.trusted is None else self.tuning.trusted
        self.queue = self.device.queue
        self._modules, self._layouts, self._pipelines, self._uniforms = {}, {}, {}, {}
        # Bind groups by (layout, buffer ids, ranges), LRU-bounded.  A group is dropped when
        # one of its buffers is collected (weakref.finalize), so a recycled id never finds a
        # stale group and short-lived buffers are not kept alive by the cache.
        self._bind_groups = OrderedDict()
        self._groups_of = {}   # id(buffer) -> keys of the groups that bind it
        self._free = {}        # (size, usage) -> pooled buffers
        self._dummies = []
        self._scratch = None
        self.scratch_version = 0    # counts the scratch's growths (a new buffer each)
        self._objects = {}     # cached(): per-context objects of the kernels' modules
        self._encoder = self._pass = self._timing = None
        self._captured, self._capture_ok = None, False     # begin_capture / end_capture
        self._record = dispatch_recorder(self.tuning.native_recording)
        self.staging_pool = StagingPool(self)
        self.copy_threads = self.tuning.copy_threads or default_copy_threads()
        # Held around every use of the context by code that drives it from several threads
        # (the split placement's lanes): one pending encoder is shared.
        self.lock = threading.RLock()
        # Bytes of every buffer made through empty() (never decreases: callers keep what they
        # allocate); memory reports take differences of it.
        self.allocated_bytes = 0

    def describe(self) -> str:
        return f"adapter {self.info['name']!r} ({self.info['backend']}, {self.info['type']})"

    # ---- tensors: owned storage buffers --------------------------------------------------
    def empty(self, shape, dtype: str = "f32") -> GpuTensor:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
        shape = tuple(int(s) for s in shape)
        nbytes = max(4 * int(np.prod(shape, dtype=np.int64)), 16)
        if nbytes > self.max_binding:
            raise GpuError(f"{self.describe()}: a tensor of shape {shape} ({nbytes} bytes) exceeds the "
                           f"storage binding limit of {self.max_binding} bytes")
        u = self.wgpu.BufferUsage
        buf = self._create(nbytes, u.STORAGE | u.COPY_SRC | u.COPY_DST, f"tensor {shape}", align=16)
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
        copy is recorded).  Writes of at least tuning.staging_min_bytes go through pooled
        MAP_WRITE staging buffers (transfer.py and tuning.py say why)."""
        a = np.ascontiguousarray(a, dtype=_DTYPES[t.dtype])
        if a.size != t.size:
            raise ValueError(f"write: {a.size} elements into a tensor of shape {t.shape}")
        self.write_bytes(t.buffer, 0, a.reshape(-1).view(np.uint8))

    def write_bytes(self, buf, offset: int, raw: np.ndarray) -> None:
        """write() for a raw buffer: the bytes raw (uint8, a multiple of 4) into buf from byte
        offset (a multiple of 4), with the same ordering and staging."""
        if not raw.size:
            return
        self._capture_ok = False     # a capture's replay would not write these bytes
        if raw.size >= self.tuning.staging_min_bytes:
            upload_staged(self, buf, offset, raw, self.copy_threads)
        else:
            # queue.write_buffer lands before the next submit's work: submit what is recorded
            self.submit()
            self.queue.write_buffer(buf, offset, raw)

    def to_numpy(self, t: GpuTensor) -> np.ndarray:
        self.submit()     # (ends a capture's replayability, as every read does)
        if t.size == 0:
            return np.zeros(t.shape, _DTYPES[t.dtype])
        raw = self.queue.read_buffer(t.buffer, 0, t.nbytes)
        return np.frombuffer(raw, dtype=_DTYPES[t.dtype]).reshape(t.shape).copy()

    def read_into(self, t: GpuTensor, out: np.ndarray) -> None:
        """t's contents into out (C-contiguous, t's dtype and size), after all recorded work:
        read_start(t, out).finish()."""
        self.read_start(t, out).finish()

    def read_start(self, t: GpuTensor, out: np.ndarray) -> PendingRead:
        """Start reading t into out (C-contiguous, t's dtype and size) after all recorded work;
        out holds it once the result's finish() returns.  Reads of at least
        tuning.staging_min_bytes go through pooled MAP_READ staging buffers, and only finish()
        waits for the GPU, so the caller may release `lock` before it; smaller ones are read
        at once through queue.read_buffer."""
        if out.dtype != np.dtype(_DTYPES[t.dtype]) or out.size != t.size or not out.flags.c_contiguous:
            raise ValueError(f"read_into: out {out.dtype} {out.shape} does not hold a tensor "
                             f"{t.dtype} {t.shape} (C-contiguous)")
        raw = out.reshape(-1).view(np.uint8)
        self._capture_ok = False
        if t.nbytes < self.tuning.staging_min_bytes:
            if t.size:
                out.reshape(-1)[...] = self.to_numpy(t).reshape(-1)
            return PendingRead(self, [], raw, 1)
        return read_staged(self, t.buffer, raw, self.copy_threads)

    # ---- pooled buffers: per-call temporaries --------------------------------------------
    def buffer(self, nbytes: int, usage=None, what: str = "buffer"):
        """A pooled buffer of at least nbytes (rounded up to 256); give it back with release()."""
        u = self.wgpu.BufferUsage
        usage = (u.STORAGE | u.COPY_SRC | u.COPY_DST) if usage is None else usage
        size = max(256, (int(nbytes) + 255) // 256 * 256)
        free = self._free.get((size, int(usage)))
        if free:
            return free.pop()
        if usage & u.STORAGE and size > self.max_binding:
            raise GpuError(f"{self.describe()}: {what} of {nbytes} bytes exceeds the storage binding "
                           f"limit of {self.max_binding} bytes")
        return self._create(size, usage, what)

    def release(self, *bufs) -> None:
        for b in bufs:
            if b is not None:
                self._free.setdefault((b.size, int(b.usage)), []).append(b)

    def dummy(self, i: int = 0):
        """The i-th 256-byte storage buffer for bindings a pipeline variant does not read or
        write (a writable binding may not alias another binding of the same dispatch)."""
        while len(self._dummies) <= i:
            self._dummies.append(self.buffer(256, what=f"dummy binding {len(self._dummies)}"))
        return self._dummies[i]

    def cached(self, key, make):
        """The per-context object `key`, made once by make() (tile choosers, buffers that the
        kernels keep between calls)."""
        obj = self._objects.get(key)
        if obj is None:
            obj = self._objects[key] = make()
        return obj

    def scratch(self, n: int) -> GpuTensor:
        """A grow-only f32 scratch of at least n elements for what one op writes and reads back
        before the next op starts (split-K partial products, the attention backward's dS):
        one per context, as the queue orders the dispatches that use it."""
        t = self._scratch
        if t is None or t.size < n:
            t = self._scratch = self.empty((n,))
            self.scratch_version += 1
        return t

    def staging(self, nbytes: int, write: bool, what: str):
        """A MAP_WRITE (upload) or MAP_READ (readback) buffer of at least nbytes."""
        u = self.wgpu.BufferUsage
        usage = (u.MAP_WRITE | u.COPY_SRC) if write else (u.MAP_READ | u.COPY_DST)
        return self._create(max(256, (int(nbytes) + 255) // 256 * 256), usage, f"{what} staging")

    def _create(self, nbytes: int, usage, what: str, align: int = 256):
        size = (int(nbytes) + align - 1) // align * align
        try:
            return self.device.create_buffer(size=size, usage=usage, label=what)
        except Exception as e:
            raise GpuError(f"{self.describe()}: allocating {what} of {size} bytes failed: {e}") from e

    # ---- pipelines ------------------------------------------------------------------------
    def module(self, name: str, consts: tuple = ()):
        key = (name, consts)
        m = self._modules.get(key)
        if m is None:
            tn = self.tuning
            m, self.trusted = compile_module(self.device, name, consts, self.trusted, tn.wgsl_debug,
                                             tn.shader_dir, self.describe())
            self._modules[key] = m
        return m

    def layout(self, kinds: str):
        """(bind group layout, pipeline layout) for bindings 0..: one letter per binding,
        u = uniform, r = read-only storage, w = read-write storage."""
        lay = self._layouts.get(kinds)
        if lay is None:
            w = self.wgpu
            bgl = self.device.create_bind_group_layout(entries=[
                {"binding": i, "visibility": w.ShaderStage.COMPUTE,
                 "buffer": {"type": getattr(w.BufferBindingType, _KINDS[k])}} for i, k in enumerate(kinds)])
            lay = self._layouts[kinds] = (bgl, self.device.create_pipeline_layout(bind_group_layouts=[bgl]))
        return lay

    def pipeline(self, name: str, entry: str, kinds: str, consts: dict | None = None,
                 overrides: dict | None = None):
        """(pipeline, bind group layout, label) of shaders/<name>.wgsl's `entry`; consts are
        prepended `const`s (compile time), overrides the WGSL `override` values."""
        consts_t = tuple(sorted((consts or {}).items()))
        over_t = tuple(sorted((overrides or {}).items()))
        key = (name, entry, kinds, consts_t, over_t)
        p = self._pipelines.get(key)
        if p is None:
            bgl, pl = self.layout(kinds)
            compute = {"module": self.module(name, consts_t), "entry_point": entry}
            if over_t:
                compute["constants"] = {k: (v if isinstance(v, bool) else float(v)) for k, v in over_t}
            try:
                pipe = self.device.create_compute_pipeline(layout=pl, compute=compute)
            except Exception as e:
                raise GpuError(f"{self.describe()}: pipeline {name}.wgsl:{entry} with {dict(over_t)} "
                               f"failed: {e}") from e
            p = self._pipelines[key] = (pipe, bgl, name + "." + entry)
        return p

    def uniform(self, fmt: str, *values):
        """A uniform buffer holding struct.pack(fmt, *values), cached by its bytes: the shapes
        and flags of a step repeat, so steady-state steps create no buffers."""
        data = struct.pack("<" + fmt, *values)
        data += b"\0" * (-len(data) % 16)
        buf = self._uniforms.get(data)
        if buf is None:
            buf = self._uniforms[data] = self.device.create_buffer_with_data(
                data=data, usage=self.wgpu.BufferUsage.UNIFORM)
        return buf

    # ---- recording ------------------------------------------------------------------------
    def encoder(self):
        """The pending command encoder, for copies and clears (ends an open compute pass).
        What callers record on it directly is not captured: it ends a capture's replayability."""
        self._capture_ok = False
        return self._enc()

    def _enc(self):
        self._end_pass()
        if self._encoder is None:
            self._encoder = self.device.create_command_encoder()
        return self._encoder

    def _end_pass(self) -> None:
        if self._pass is not None:
            self._pass.end()
            self._pass = None

    def copy(self, src, src_off: int, dst, dst_off: int, nbytes: int) -> None:
        """Record a buffer copy of nbytes (rounded up to 4)."""
        if nbytes:
            if self._captured is not None:
                self._captured.append((None, src, src_off, dst, dst_off, nbytes))
            self._enc().copy_buffer_to_buffer(src, src_off, dst, dst_off, (nbytes + 3) // 4 * 4)

    def _bind_group(self, bgl, buffers):
        """The cached group binding `buffers` (as dispatch() takes them) to bgl.  Keyed by the
        buffers' ids (and ranges where given) without resolving them first: a step looks up
        thousands of groups, and nearly all of them are found."""
        key = [id(bgl)]
        for b in buffers:
            t = type(b)
            key.append(id(b.buffer) if t is GpuTensor else (id(b[0]), b[1], b[2]) if t is tuple else id(b))
        key = tuple(key)
        bg = self._bind_groups.get(key)
        if bg is not None:
            self._bind_groups.move_to_end(key)
            return bg
        bufs = [(b.buffer, 0, b.buffer.size) if isinstance(b, GpuTensor) else
                (b if isinstance(b, tuple) else (b, 0, b.size)) for b in buffers]
        bg = self._bind_groups[key] = self.device.create_bind_group(layout=bgl, entries=[
            {"binding": i, "resource": {"buffer": b, "offset": o, "size": n}} for i, (b, o, n) in enumerate(bufs)])
        for b, _, _ in bufs:
            keys = self._groups_of.get(id(b))
            if keys is None:
                keys = self._groups_of[id(b)] = set()
                weakref.finalize(b, self._evict, id(b))
            keys.add(key)
        if len(self._bind_groups) > _BIND_GROUP_CACHE:
            self._bind_groups.popitem(last=False)
        return bg

    def _evict(self, buffer_id: int) -> None:
        for key in self._groups_of.pop(buffer_id, ()):
            self._bind_groups.pop(key, None)

    def dispatch(self, pipeline, buffers, groups) -> None:
        """Record one dispatch: `buffers` bound at 0.. in order (a GpuTensor, a wgpu buffer, or
        (buffer, byte offset, byte size) for a range), `groups` (x[, y[, z]]) workgroups."""
        pipe, bgl, label = pipeline
        n = len(groups)
        gx, gy, gz = int(groups[0]), int(groups[1]) if n > 1 else 1, int(groups[2]) if n > 2 else 1
        if max(gx, gy, gz) > self.max_groups:
            raise GpuError(f"{self.describe()}: dispatch {label} of {(gx, gy, gz)} workgroups: at most "
                           f"{self.max_groups} per dimension")
        if not (gx and gy and gz):
            return
        bg = self._bind_group(bgl, buffers)
        if self._captured is not None:
            self._captured.append((pipe, bg, gx, gy, gz, label))
        self._emit(pipe, bg, gx, gy, gz, label)

    def _emit(self, pipe, bg, gx, gy, gz, label) -> None:
        if self._timing is not None:
            # one pass per dispatch: timestamps are taken at pass boundaries
            cp = self._timing.begin_pass(self, label)
            self._record(cp, pipe, bg, gx, gy, gz)
            cp.end()
            return
        # consecutive dispatches share a pass (wgpu orders their storage accesses; a pass per
        # dispatch costs host time per kernel)
        if self._pass is None:
            self._pass = self._enc().begin_compute_pass()
        self._record(self._pass, pipe, bg, gx, gy, gz)

    # ---- capture and replay ----------------------------------------------------------------
    # A training step records the same dispatches every step of a batch shape (GPU objects are
    # cached by content, so even the uniform blocks repeat), and recording them through the
    # ops' Python costs several times what wgpu takes.  A run of ops captured once replays as
    # its (pipeline, bind group, grid) list; the caller keys it by everything the ops read.
    def begin_capture(self) -> None:
        """Capture the dispatches and copies recorded from now until end_capture()."""
        self._captured, self._capture_ok = [], True

    def end_capture(self):
        """What was recorded since begin_capture(), for replay(); None when anything else was
        (a write or read, a submit, a clear or a copy made through encoder()): a run whose
        effect is not only its dispatches and copies cannot be replayed."""
        got, ok = self._captured, self._capture_ok
        self._captured = None
        return got if ok else None

    def replay(self, captured) -> None:
        """Record a captured run again: the same dispatches and copies, in order."""
        for act in captured:
            if act[0] is None:
                _, src, src_off, dst, dst_off, nbytes = act
                self.copy(src, src_off, dst, dst_off, nbytes)
            else:
                self._emit(*act)

    def submit(self) -> None:
        self._capture_ok = False
        self._end_pass()
        if self._encoder is not None:
            enc, self._encoder = self._encoder, None
            if self._timing is not None:
                self._timing.submitted()
            try:
                self.queue.submit([enc.finish()])
            except Exception as e:
                raise GpuError(f"{self.describe()}: submitting the recorded work failed: {e}") from e
            finally:
                self.staging_pool.submitted()

    def enable_timing(self, on: bool = True, profiler=None) -> None:
        """Time every compute pass with timestamp queries (needs the adapter's timestamp-query
        feature); kernel_times() then returns GPU seconds per kernel.  With a
        qlora_ext.profile.Profiler, every pass also becomes a "gpu" span of it."""
        if on and not self.has_timestamps:
            raise GpuError(f"{self.describe()} has no timestamp-query feature: per-kernel GPU times "
                           "are unavailable")
        self.submit()
        self._timing = PassTimer(self, profiler) if on else None

    def kernel_times(self) -> dict:
        """{kernel: (seconds, passes)} accumulated since timing was enabled (waits for the GPU;
        the passes not yet collected become spans of enable_timing's profiler)."""
        if self._timing is None:
            raise ValueError("kernel_times: timing is off (call enable_timing() first)")
        self._timing.collect(self)
        return dict(self._timing.totals)


def grid_2d(n_groups: int) -> tuple:
    """Split n_groups workgroups over (x, y) with x <= MAX_GROUPS; shaders rebuild the linear
    id as wid.x + wid.y * num_workgroups.x and skip ids >= n_groups."""
    if n_groups <= MAX_GROUPS:
        return (n_groups, 1)
    y = (n_groups + MAX_GROUPS - 1) // MAX_GROUPS
    x = (n_groups + y - 1) // y
    return (x, y)


_shared = {}


def shared_context(adapter=None) -> GpuContext:
    """The process's GpuContext for `adapter` (None: the default adapter), made on first use
    with Tuning.from_env(): a device per model or backend would duplicate pipelines and
    driver memory."""
    if adapter is None:
        adapter = default_adapter()
        if adapter is None:
            raise GpuError("no wgpu adapter found (need Vulkan, Metal or DX12; Mesa lavapipe works)")
    # wgpu returns new adapter objects on every enumeration: key by what they describe
    key = repr(sorted((str(k), str(v)) for k, v in dict(adapter.info).items()))
    ctx = _shared.get(key)
    if ctx is None:
        ctx = _shared[key] = GpuContext(adapter)
    return ctx
