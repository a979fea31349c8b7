"""Which GPU adapter a run would use (`adapter_info`, shown by `qlora-ext info`); the accepted
values of `device=` are those of qlora_ext.options."""
from __future__ import annotations


def adapter_info() -> dict | None:
    """The adapter device="auto" would use: {name, backend, type, vendor, description,
    software}; the best software adapter if no real GPU exists; None without any adapter."""
    from .gpu.runtime import adapter_summary, pick_adapter  # noqa: PLC0415

    a = pick_adapter(allow_software=False) or pick_adapter(allow_software=True)
    return adapter_summary(a) if a is not None else None
