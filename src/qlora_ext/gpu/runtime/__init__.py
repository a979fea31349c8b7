"""The one GPU runtime every GPU code path uses:
    tuning.py    Tuning: every knob, read from the environment once and validated
    adapter.py   adapters (choice, software detection), GpuError, the wgpu version check
    shaders.py   the shader loader (`//!include`, override folder, debug listing, trusted modules)
    recording.py one dispatch into a compute pass (wgpu-native directly where available)
    context.py   GpuContext (device, limits, caches, tensors and pooled buffers, recording),
                 GpuTensor, shared_context
    transfer.py  staged uploads and readbacks (a pool of mapped buffers, threaded host copies)
    timing.py    per-kernel GPU times from timestamp queries"""
from .adapter import (GpuError, adapter_summary, default_adapter, is_software, list_adapters, pick_adapter,
                      unavailable_reason)
from .context import MAX_GROUPS, GpuContext, GpuTensor, grid_2d, shared_context
from .shaders import load_shader
from .tuning import Tuning

__all__ = ["MAX_GROUPS", "GpuContext", "GpuError", "GpuTensor", "Tuning", "adapter_summary", "default_adapter",
           "grid_2d", "is_software", "list_adapters", "load_shader", "pick_adapter",
           "shared_context", "unavailable_reason"]
