"""Which GPU adapter a run would use (`adapter_info`, shown by `qlora-ext info`) and the
accepted values of `device=`:

    "auto"  a real GPU adapter if wgpu finds one (discrete first, then integrated); the CPU
            when there is none (no adapter, or only a CPU rasterizer such as lavapipe)
    "gpu"   wgpu even on a software adapter (the tests check the shaders so)
    "cpu"   the CPU alone"""
from __future__ import annotations

DEVICES = ("auto", "gpu", "cpu")


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(map(repr, DEVICES))}, got {device!r}")


def adapter_info() -> dict | None:
    """The adapter device="auto" would use: {name, backend, type, vendor, description,
    software}; the best software adapter if no real GPU exists; None without any adapter."""
    from .gpu.runtime import adapter_summary, pick_adapter  # noqa: PLC0415

    a = pick_adapter(allow_software=False) or pick_adapter(allow_software=True)
    return adapter_summary(a) if a is not None else None
