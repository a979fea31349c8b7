"""The shader loader: shaders/<name>.wgsl by name (Tuning.shader_dir first), `//!include other`
lines expanded, consts a shader needs at compile time prepended, and the module created
trusted (no naga runtime checks) where the tuning says so."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from .adapter import GpuError

_INCLUDE = re.compile(r"^//!include\s+(\w+)\s*$", re.MULTILINE)


def shader_dirs(override: str | None = None) -> list:
    """Where shaders are looked up, in order: the override, <repo>/shaders in a source checkout,
    qlora_ext/shaders in an installed wheel."""
    here = Path(__file__).resolve()
    dirs = [Path(override)] if override else []
    return dirs + [here.parents[4] / "shaders", here.parents[2] / "shaders"]


def shader_text(name: str, override: str | None = None) -> str:
    """The raw text of <name>.wgsl (includes not expanded)."""
    dirs = shader_dirs(override)
    for d in dirs:
        p = d / f"{name}.wgsl"
        if p.is_file():
            return p.read_text()
    raise GpuError(f"shader {name!r}: no {name}.wgsl in any of {[str(d) for d in dirs]}")


def expand_includes(code: str, load, name: str, _seen: tuple = ()) -> str:
    """Replace each line `//!include other` with the text of other.wgsl (itself expanded):
    WGSL has no imports, and helpers shared by several shaders live once this way.
    `load(name)` reads a shader's raw text; a cycle is a ValueError naming the chain."""
    seen = _seen + (name,)

    def sub(m):
        other = m.group(1)
        if other in seen:
            raise ValueError(f"shader include cycle: {' -> '.join(seen + (other,))}")
        return expand_includes(load(other), load, other, seen)

    return _INCLUDE.sub(lambda m: sub(m).rstrip("\n"), code)


def load_shader(name: str, override: str | None = None) -> str:
    """The text of <name>.wgsl with its includes expanded."""
    load = lambda n: shader_text(n, override)  # noqa: E731
    return expand_includes(load(name), load, name)


def numbered(code: str) -> str:
    return "\n".join(f"{i + 1:4d}  {line}" for i, line in enumerate(code.splitlines()))


def compile_module(device, name: str, consts: tuple, trusted: bool, debug: bool, override: str | None,
                   describe: str):
    """(module, trusted) for shaders/<name>.wgsl with `const K: u32 = v` lines prepended for
    consts ((K, v) pairs: array sizes of private memory, which WGSL overrides cannot set);
    tile sizes stay `override`s set per pipeline.  trusted comes back False where this wgpu
    has no trusted entry point.  A compile error is a GpuError naming the adapter and the
    file; with debug the WGSL goes to stderr with line numbers."""
    head = "".join(f"const {k}: u32 = {int(v)}u;\n" for k, v in consts)
    try:
        code = head + load_shader(name, override)
    except GpuError as e:
        raise GpuError(f"{describe}: {e}") from None
    try:
        return _create(device, code, name, trusted)
    except Exception as e:
        if debug:
            print(f"--- {name}.wgsl ---\n{numbered(code)}", file=sys.stderr)
        raise GpuError(f"{describe}: shader {name}.wgsl failed to compile: {e}") from e


def _create(device, code: str, label: str, trusted: bool):
    if not trusted:
        return device.create_shader_module(code=code, label=label), False
    # Trusted: no naga bounds checks or loop bounding (2 -> 27 TFLOP/s for gemm.wgsl on an
    # H200); every access in our shaders is guarded by its own bounds test.  wgpu 0.32 has no
    # wrapper for wgpuDeviceCreateShaderModuleTrusted: build the descriptor create_shader_module
    # builds and call it.  These are wgpu-py internals: if a later wgpu moves them, fall back to
    # checked modules (slower, correct).
    try:
        from wgpu.backends.wgpu_native import _api  # noqa: PLC0415
        ffi, lib = _api.ffi, _api.lib
        lib.wgpuDeviceCreateShaderModuleTrusted  # noqa: B018
    except (ImportError, AttributeError):
        return device.create_shader_module(code=code, label=label), False
    src = _api.new_struct_p("WGPUShaderSourceWGSL *", code=_api.to_c_string_view(code))
    src[0].chain.next = ffi.NULL
    src[0].chain.sType = lib.WGPUSType_ShaderSourceWGSL
    desc = _api.new_struct_p("WGPUShaderModuleDescriptor *",
                             nextInChain=ffi.cast("WGPUChainedStruct *", src),
                             label=_api.to_c_string_view(label))
    mid = lib.wgpuDeviceCreateShaderModuleTrusted(device._internal, desc, 0)
    if mid == ffi.NULL:
        raise GpuError("shader module creation failed")
    return _api.GPUShaderModule(label, mid, device), True
