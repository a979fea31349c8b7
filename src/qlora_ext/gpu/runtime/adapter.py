"""Adapters: which wgpu adapters exist, which one a process uses, what it is, and whether the
installed wgpu can run the GPU kernels at all."""
from __future__ import annotations

_SOFTWARE_NAMES = ("llvmpipe", "lavapipe", "swiftshader", "softpipe", "warp")
# The GPU kernels were developed and validated on wgpu 0.32 (wgpu-native 29);
# wgpu 0.31's shader translator lays out some of their uniform structs differently and they fail
# validation.  The split placement's kernels also run on 0.31 (Python 3.10's last wgpu).
MIN_WGPU_FOR_RESIDENT = (0, 32)


class GpuError(OSError):
    """A wgpu failure (no adapter, out of memory, lost device, validation, a shader that does
    not compile), with the adapter and the request in the message.  An OSError: the API's
    contract is ValueError for bad arguments, OSError for what the machine cannot do."""


def import_wgpu():
    try:
        import wgpu  # noqa: PLC0415  (optional at import time of qlora_ext)
    except Exception as e:  # pragma: no cover - depends on the install
        raise GpuError(f"the wgpu package is not usable: {e}") from e
    return wgpu


def require_wgpu_for_kernels(version: str) -> None:
    """Raise GpuError (with the fix) when the installed wgpu is too old for the GPU kernels."""
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_WGPU_FOR_RESIDENT:
        need = ".".join(map(str, MIN_WGPU_FOR_RESIDENT))
        raise GpuError(f"the gpu and split placements need wgpu >= {need} (installed: {version}; wgpu {need} needs "
                       f"Python >= 3.11): pip install 'wgpu>={need}', or use the split placement")


def is_software(adapter) -> bool:
    """True for CPU rasterizers (llvmpipe/lavapipe, SwiftShader, WARP)."""
    info = adapter.info
    if str(info.get("adapter_type", "")).lower() == "cpu":
        return True
    text = f"{info.get('device', '')} {info.get('description', '')}".lower()
    return any(s in text for s in _SOFTWARE_NAMES)


def adapter_summary(adapter) -> dict:
    info = adapter.info
    name = info.get("device") or info.get("description") or "unknown"
    return {"name": name, "backend": info.get("backend_type", ""), "type": info.get("adapter_type", ""),
            "vendor": info.get("vendor", ""), "description": info.get("description", ""),
            "software": is_software(adapter)}


def list_adapters() -> list:
    """All adapters wgpu sees (empty if wgpu or every driver is missing)."""
    try:
        wgpu = import_wgpu()
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
        from ...launcher import local_rank  # noqa: PLC0415

        index = local_rank()
    return best[index % len(best)]


def default_adapter():
    """A real GPU if there is one, else a software adapter, else None."""
    return pick_adapter(allow_software=False) or pick_adapter(allow_software=True)


def unavailable_reason() -> str | None:
    """Why the gpu and split placements cannot run here (wgpu missing or too old, no adapter), or None."""
    try:
        import wgpu  # noqa: PLC0415
    except ImportError:
        return "wgpu is not installed"
    try:
        require_wgpu_for_kernels(wgpu.__version__)
    except GpuError as e:
        return str(e)
    if default_adapter() is None:
        return "no wgpu adapter (install Mesa lavapipe or run on a GPU)"
    return None
