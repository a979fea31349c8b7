"""The wgpu device: adapter choice, real limits, shaders loaded by name, pipelines and bind
groups cached by content, a buffer pool, and command recording (one encoder, one submit).

Everything GPU-side in qlora_ext goes through one GpuContext per device; per step the backends
only write buffers and record dispatches (STYLE.md: GPU objects created once, cached by content).

Environment:
  QLORA_EXT_WGSL_DEBUG=1    on a shader compile error, print the WGSL with line numbers to stderr
  QLORA_EXT_WGSL_TRUSTED=0|1  create shader modules without naga's runtime bounds checks and loop
                            bounding (wgpuDeviceCreateShaderModuleTrusted; our shaders bound every
                            access and loop themselves).  Default: on for real GPUs, off on CPU adapters.
"""
from __future__ import annotations

import os
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np

from ..profile import PROFILER

_SOFTWARE_NAMES = ("llvmpipe", "lavapipe", "swiftshader", "softpipe", "warp")
# limits we ask for at the adapter's real value instead of the WebGPU defaults
_LIMITS = ("max-storage-buffer-binding-size", "max-buffer-size", "max-compute-workgroup-storage-size",
           "max-storage-buffers-per-shader-stage", "max-compute-invocations-per-workgroup",
           "max-compute-workgroup-size-x", "max-compute-workgroup-size-y",
           "max-compute-workgroups-per-dimension", "max-uniform-buffer-binding-size")


class GpuError(RuntimeError):
    """A wgpu failure (out of memory, lost device, validation), with the adapter and the request."""


def _import_wgpu():
    try:
        import wgpu  # noqa: PLC0415  (optional at import time of qlora_ext)
    except Exception as e:  # pragma: no cover - depends on the install
        raise GpuError(f"the wgpu package is not usable: {e}") from e
    return wgpu


def adapter_summary(adapter) -> dict:
    info = adapter.info
    name = info.get("device") or info.get("description") or "unknown"
    return {"name": name, "backend": info.get("backend_type", ""), "type": info.get("adapter_type", ""),
            "vendor": info.get("vendor", ""), "description": info.get("description", ""),
            "software": is_software(adapter)}


def is_software(adapter) -> bool:
    """True for CPU rasterizers (llvmpipe/lavapipe, SwiftShader, WARP)."""
    info = adapter.info
    if str(info.get("adapter_type", "")).lower() == "cpu":
        return True
    text = f"{info.get('device', '')} {info.get('description', '')}".lower()
    return any(s in text for s in _SOFTWARE_NAMES)


def list_adapters() -> list:
    """All adapters wgpu sees (empty if wgpu or every driver is missing)."""
    try:
        wgpu = _import_wgpu()
        return list(wgpu.gpu.enumerate_adapters_sync())
    except Exception:
        return []


def pick_adapter(allow_software: bool, index: int | None = None):
    """Discrete GPU first, then integrated, then other real ones; software adapters only if
    allowed.  Among equal kinds Vulkan/Metal/DX12 before OpenGL.  None if nothing fits.
    Several equally good adapters (a host with several GPUs): the index-th modulo their
    count, in enumeration order; index None = this process's local MPI rank (0 alone), so
    the ranks on one host spread over its GPUs and share them when there are fewer."""
    rank_type = {"discretegpu": 0, "integratedgpu": 1, "virtualgpu": 2, "unknown": 3, "cpu": 4}
    rank_backend = {"vulkan": 0, "metal": 0, "d3d12": 0, "opengl": 1, "gl": 1}
    best, best_key = [], None
    for a in list_adapters():
        soft = is_software(a)
        if soft and not allow_software:
            continue
        info = a.info
        key = (soft, rank_type.get(str(info.get("adapter_type", "")).lower().replace(" ", ""), 3),
               rank_backend.get(str(info.get("backend_type", "")).lower(), 2))
        if best_key is None or key < best_key:
            best, best_key = [a], key
        elif key == best_key:
            best.append(a)
    if not best:
        return None
    if index is None:
        from ..train.distributed import local_rank  # noqa: PLC0415

        index = local_rank()
    return best[index % len(best)]


def shader_dir() -> Path:
    """shaders/ installed as qlora_ext/shaders in the wheel; <repo>/shaders in a source checkout."""
    here = Path(__file__).resolve().parent.parent
    for d in (here / "shaders", here.parent.parent / "shaders"):
        if d.is_dir():
            return d
    raise GpuError(f"no shaders directory next to {here} or in the source tree")


def _shader_text(name: str) -> str:
    path = shader_dir() / f"{name}.wgsl"
    if not path.is_file():
        raise GpuError(f"shader {name!r} not found at {path}")
    return path.read_text()


def load_shader(name: str) -> str:
    return expand_includes(_shader_text(name), _shader_text, name)


_INCLUDE = re.compile(r"^//!include\s+(\w+)\s*$", re.MULTILINE)


def expand_includes(code: str, load, name: str, _seen: tuple = ()) -> str:
    """Replace each line `//!include other` with the text of shaders/other.wgsl (itself
    expanded): WGSL has no imports, and helpers shared by several shaders live once this way.
    `load(name)` reads a shader's raw text; a cycle is a ValueError naming the chain."""
    seen = _seen + (name,)

    def sub(m):
        other = m.group(1)
        if other in seen:
            raise ValueError(f"shader include cycle: {' -> '.join(seen + (other,))}")
        return expand_includes(load(other), load, other, seen)

    return _INCLUDE.sub(lambda m: sub(m).rstrip("\n"), code)


def _numbered(code: str) -> str:
    return "\n".join(f"{i + 1:4d}  {line}" for i, line in enumerate(code.splitlines()))


class GpuContext:
    """One wgpu device with the adapter's real limits."""

    def __init__(self, adapter=None, allow_software: bool = True, trusted: bool | None = None):
        self.wgpu = _import_wgpu()
        if adapter is None:
            adapter = pick_adapter(allow_software=allow_software)
        if adapter is None:
            raise GpuError("no wgpu adapter found" + ("" if allow_software else " (software adapters excluded)"))
        self.adapter = adapter
        self.info = adapter_summary(adapter)
        lim = adapter.limits
        wanted = {k: lim[k] for k in _LIMITS if k in lim}
        try:
            self.device = adapter.request_device_sync(required_limits=wanted, label="qlora_ext")
        except Exception as e:
            raise GpuError(f"{self.describe()}: could not create a device with limits {wanted}: {e}") from e
        self.limits = self.device.limits
        self.max_binding = int(self.limits["max-storage-buffer-binding-size"])
        self.max_buffer = int(self.limits["max-buffer-size"])
        self.uniform_align = int(self.limits.get("min-uniform-buffer-offset-alignment", 256))
        env = os.environ.get("QLORA_EXT_WGSL_TRUSTED")
        self.trusted = (env == "1") if env in ("0", "1") else (not self.info["software"] if trusted is None else trusted)
        self._modules: dict = {}
        self._pipelines: dict = {}
        self._layouts: dict = {}
        self._bind_groups: dict = {}
        self._free: dict = {}   # (size, usage) -> [buffers]
        self._dummy = None

    def describe(self) -> str:
        return f"adapter {self.info['name']!r} ({self.info['backend']}, {self.info['type']})"

    # -- shaders and pipelines -------------------------------------------------------------------
    def module(self, name: str):
        if name not in self._modules:
            code = load_shader(name)
            try:
                self._modules[name] = self._create_module(code, name)
            except Exception as e:
                if os.environ.get("QLORA_EXT_WGSL_DEBUG"):
                    print(f"--- {name}.wgsl ---\n{_numbered(code)}", file=sys.stderr)
                raise GpuError(f"{self.describe()}: shader {name}.wgsl failed to compile: {e}") from e
        return self._modules[name]

    def _create_module(self, code: str, label: str):
        if not self.trusted:
            return self.device.create_shader_module(code=code, label=label)
        # wgpu 0.32 has no wrapper for the trusted entry point; build the same descriptor as
        # create_shader_module does and call it with no runtime checks.  These are wgpu-py
        # internals: if a later wgpu moves them, fall back to checked modules (slower, correct).
        try:
            from wgpu.backends.wgpu_native import _api  # noqa: PLC0415
            ffi, lib = _api.ffi, _api.lib
            lib.wgpuDeviceCreateShaderModuleTrusted  # noqa: B018
        except (ImportError, AttributeError):
            self.trusted = False
            return self.device.create_shader_module(code=code, label=label)
        src = _api.new_struct_p("WGPUShaderSourceWGSL *", code=_api.to_c_string_view(code))
        src[0].chain.next = ffi.NULL
        src[0].chain.sType = lib.WGPUSType_ShaderSourceWGSL
        desc = _api.new_struct_p("WGPUShaderModuleDescriptor *",
                                 nextInChain=ffi.cast("WGPUChainedStruct *", src),
                                 label=_api.to_c_string_view(label))
        mid = lib.wgpuDeviceCreateShaderModuleTrusted(self.device._internal, desc, 0)
        if mid == ffi.NULL:
            raise GpuError("shader module creation failed")
        return _api.GPUShaderModule(label, mid, self.device)

    def layout(self, kinds: tuple):
        """Bind group layout for bindings 0..len-1; kinds: 'uniform' | 'read' | 'rw'."""
        if kinds not in self._layouts:
            B = self.wgpu.BufferBindingType
            t = {"uniform": B.uniform, "read": B.read_only_storage, "rw": B.storage}
            entries = [{"binding": i, "visibility": self.wgpu.ShaderStage.COMPUTE, "buffer": {"type": t[k]}}
                       for i, k in enumerate(kinds)]
            bgl = self.device.create_bind_group_layout(entries=entries)
            self._layouts[kinds] = (bgl, self.device.create_pipeline_layout(bind_group_layouts=[bgl]))
        return self._layouts[kinds]

    def pipeline(self, shader: str, entry: str, kinds: tuple, constants: dict):
        key = (shader, entry, kinds, tuple(sorted(constants.items())))
        p = self._pipelines.get(key)
        if p is None:
            bgl, pl = self.layout(kinds)
            consts = {k: (float(v) if not isinstance(v, bool) else v) for k, v in constants.items()}
            try:
                p = self.device.create_compute_pipeline(
                    layout=pl, compute={"module": self.module(shader), "entry_point": entry, "constants": consts})
            except GpuError:
                raise
            except Exception as e:
                raise GpuError(f"{self.describe()}: pipeline {shader}.wgsl:{entry} with {constants} failed: {e}") from e
            p = self._pipelines[key] = (p, bgl)
        return p

    def bind_group(self, bgl, buffers: tuple):
        """buffers: (buffer, offset, size) per binding; cached by content."""
        key = (id(bgl),) + tuple((id(b), o, s) for b, o, s in buffers)
        hit = self._bind_groups.get(key)
        if hit is None:
            if len(self._bind_groups) > 4096:
                self._bind_groups.clear()
            entries = [{"binding": i, "resource": {"buffer": b, "offset": o, "size": s}}
                       for i, (b, o, s) in enumerate(buffers)]
            bg = self.device.create_bind_group(layout=bgl, entries=entries)
            hit = self._bind_groups[key] = (bg, bgl, buffers)  # holding the buffers keeps ids unique
        return hit[0]

    # -- buffers -----------------------------------------------------------------------------------
    def buffer(self, nbytes: int, usage=None, what: str = "buffer"):
        """A pooled buffer of at least nbytes (rounded up to 256); give it back with release()."""
        wgpu = self.wgpu
        if usage is None:
            usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
        size = max(256, (int(nbytes) + 255) // 256 * 256)
        free = self._free.get((size, int(usage)))
        if free:
            return free.pop()
        if usage & wgpu.BufferUsage.STORAGE and size > self.max_binding:
            raise GpuError(f"{self.describe()}: {what} of {nbytes} bytes exceeds the storage binding "
                           f"limit of {self.max_binding} bytes")
        try:
            return self.device.create_buffer(size=size, usage=usage, label=what)
        except Exception as e:
            raise GpuError(f"{self.describe()}: allocating {what} of {size} bytes failed: {e}") from e

    def release(self, *bufs) -> None:
        for b in bufs:
            if b is not None:
                self._free.setdefault((b.size, int(b.usage)), []).append(b)

    def trim(self) -> None:
        """Drop pooled free buffers (and the bind groups that hold them)."""
        self._free.clear()
        self._bind_groups.clear()

    def dummy(self):
        """A 256-byte storage buffer for bindings a pipeline variant does not read."""
        if self._dummy is None:
            self._dummy = self.buffer(256, what="dummy binding")
        return self._dummy

    def staging(self, nbytes: int, write: bool, what: str):
        wgpu = self.wgpu
        usage = (wgpu.BufferUsage.MAP_WRITE | wgpu.BufferUsage.COPY_SRC) if write else \
                (wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        size = max(256, (int(nbytes) + 255) // 256 * 256)
        try:
            return self.device.create_buffer(size=size, usage=usage, label=what)
        except Exception as e:
            raise GpuError(f"{self.describe()}: allocating {what} staging of {size} bytes failed: {e}") from e

    def close(self) -> None:
        self.trim()
        self._pipelines.clear()
        self._modules.clear()
        self._layouts.clear()


def write_staging(buf, pieces, what: str = "upload") -> None:
    """Map a MAP_WRITE buffer once and write (offset, ndarray) pieces; sizes need not be
    multiples of 4 (the tail is padded).  Timed as a profiler "transfer" span `what`."""
    import wgpu  # noqa: PLC0415
    with PROFILER.phase(what, "transfer"):
        _write_staging(wgpu, buf, pieces)


def _write_staging(wgpu, buf, pieces) -> None:
    try:
        buf.map_sync(mode=wgpu.MapMode.WRITE)
    except Exception as e:
        raise GpuError(f"mapping the {buf.size}-byte upload buffer {buf.label!r} failed: {e}") from e
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


def read_staging(buf, nbytes: int, out: np.ndarray, submitted_at: float | None = None,
                 gpu_phase: str = "gpu") -> None:
    """Wait for the GPU, copy the first nbytes of a MAP_READ buffer into out (preallocated).
    With `submitted_at` (perf_counter at the submit), the profiler gets a "gpu" span from the
    submit to the end of the wait (the queue's work as the host sees it: no timestamp queries
    in this path), the wait itself as "wait", and the copy out as a "readback" transfer."""
    import wgpu  # noqa: PLC0415
    t_wait = time.perf_counter()
    try:
        buf.map_sync(mode=wgpu.MapMode.READ, offset=0, size=(nbytes + 3) // 4 * 4 if nbytes else 4)
    except Exception as e:  # a lost device or a failed submit surfaces here
        raise GpuError(f"reading back {nbytes} bytes through {buf.label!r} failed: {e}") from e
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


class Recorder:
    """Dispatches and copies for ONE command encoder and ONE submit.  Parameters of all
    dispatches go into one uniform buffer (one slot per dispatch) written just before submit."""

    def __init__(self, ctx: GpuContext):
        self.ctx = ctx
        self.ops = []
        self.params = []
        self.keep = []

    def dispatch(self, shader, entry, kinds, constants, params: bytes, buffers, grid, label: str = ""):
        """buffers: for bindings 1.. (binding 0 is the uniform): buffer or (buffer, offset, size)."""
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        lim = int(self.ctx.limits["max-compute-workgroups-per-dimension"])
        if max(gx, gy, gz) > lim:
            raise GpuError(f"{self.ctx.describe()}: dispatch {shader}:{entry} grid {(gx, gy, gz)} exceeds {lim}")
        if gx == 0 or gy == 0 or gz == 0:
            return
        pipe, bgl = self.ctx.pipeline(shader, entry, kinds, constants)
        self.params.append(params)
        slot = len(self.params) - 1
        self.ops.append(("dispatch", pipe, bgl, slot, [b if isinstance(b, tuple) else (b, 0, b.size) for b in buffers],
                         (gx, gy, gz), f"{shader}:{entry} grid={gx}x{gy} {label}"))

    def copy(self, src, src_off, dst, dst_off, nbytes):
        if nbytes:
            self.ops.append(("copy", src, src_off, dst, dst_off, (nbytes + 3) // 4 * 4))

    def submit(self):
        ubuf, align = self._write_params()
        try:
            self._encode_submit(self.ops, ubuf, align)
        finally:
            if ubuf is not None:
                self.ctx.release(ubuf)  # reused only by later submits, which the queue orders after this one
        self.ops, self.params = [], []

    def _write_params(self):
        ctx = self.ctx
        align = max(ctx.uniform_align, 64)
        if not self.params:
            return None, align
        blob = bytearray(align * len(self.params))
        for i, p in enumerate(self.params):
            blob[i * align: i * align + len(p)] = p
        wgpu = ctx.wgpu
        ubuf = ctx.buffer(len(blob), wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST, "dispatch params")
        ctx.device.queue.write_buffer(ubuf, 0, bytes(blob))
        return ubuf, align

    def _encode_submit(self, ops, ubuf, align):
        ctx = self.ctx
        enc = ctx.device.create_command_encoder()
        cpass = None
        try:
            for op in ops:
                if op[0] == "dispatch":
                    _, pipe, bgl, slot, bufs, grid, _label = op
                    if cpass is None:
                        cpass = enc.begin_compute_pass()
                    bg = ctx.bind_group(bgl, ((ubuf, slot * align, 64),) + tuple(bufs))
                    cpass.set_pipeline(pipe)
                    cpass.set_bind_group(0, bg)
                    cpass.dispatch_workgroups(*grid)
                else:
                    if cpass is not None:
                        cpass.end()
                        cpass = None
                    _, src, so, dst, do, n = op
                    enc.copy_buffer_to_buffer(src, so, dst, do, n)
            if cpass is not None:
                cpass.end()
            ctx.device.queue.submit([enc.finish()])
        except GpuError:
            raise
        except Exception as e:
            raise GpuError(f"{ctx.describe()}: submitting {len(ops)} commands failed: {e}") from e


def pack(fmt: str, *vals) -> bytes:
    """Uniform parameter block: u32 ('I') and f32 ('f') fields, padded to 64 bytes."""
    b = struct.pack("<" + fmt, *vals)
    return b + bytes(max(0, 64 - len(b)))
