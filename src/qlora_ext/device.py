"""Which FFN backend runs: wgpu on a real GPU adapter, else the CPU backend.

    select_backend("auto")  wgpu on a real GPU adapter (discrete first, then integrated), the CPU
                            backend when there is none (no adapter, or only a CPU rasterizer such
                            as llvmpipe/lavapipe) or when the GPU fails to initialise
    select_backend("gpu")   wgpu even on a software adapter (the tests check the shaders so)
    select_backend("cpu")   numpy BLAS + the C NF4 dequant
GPU failures raise qlora_ext.gpu.runtime.GpuError (an OSError) naming the adapter and the request; the CPU
backend stays usable after one (select_backend("cpu"))."""
from __future__ import annotations

import warnings

from .backend import FfnBackend

DEVICES = ("auto", "gpu", "cpu")


def adapter_info() -> dict | None:
    """The adapter device="auto" would use: {name, backend, type, vendor, description,
    software}; the best software adapter if no real GPU exists; None without any adapter."""
    from .gpu.runtime import adapter_summary, pick_adapter  # noqa: PLC0415

    a = pick_adapter(allow_software=False) or pick_adapter(allow_software=True)
    return adapter_summary(a) if a is not None else None


def select_backend(device: str = "auto", resident: bool = False, **kw) -> FfnBackend:
    """An FfnBackend for `device`.  kw: for wgpu `tiles`, `max_rows`; for the CPU `threads`."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(map(repr, DEVICES))}, got {device!r}")
    if device == "cpu":
        from .cpu.ffn import CpuFfnBackend  # noqa: PLC0415

        return CpuFfnBackend(**kw)
    from .gpu.runtime import GpuError, pick_adapter, shared_context  # noqa: PLC0415
    from .gpu.ffn import WgpuFfnBackend  # noqa: PLC0415

    gpu_kw = {k: v for k, v in kw.items() if k in ("tiles", "max_rows")}
    if device == "gpu":
        adapter = pick_adapter(allow_software=True)
        if adapter is None:
            raise GpuError("device='gpu': wgpu found no adapter (is a Vulkan/Metal/DX12 driver installed?)")
        return WgpuFfnBackend(shared_context(adapter), resident=resident, **gpu_kw)
    adapter = pick_adapter(allow_software=False)
    if adapter is not None:
        try:
            return WgpuFfnBackend(shared_context(adapter), resident=resident, **gpu_kw)
        except GpuError as e:
            warnings.warn(f"device='auto': GPU unusable, using the CPU backend ({e})", RuntimeWarning, stacklevel=2)
    from .cpu.ffn import CpuFfnBackend  # noqa: PLC0415

    return CpuFfnBackend(**{k: v for k, v in kw.items() if k == "threads"})
