"""GPU-resident mode: the whole layer (norms, RoPE, attention, FFN, loss, optimizer) runs in
WGSL on one wgpu device; per step only token ids and labels go up and the loss comes down.

Modules: context (device, shaders by name, cached pipelines, GpuTensor), layer_ops (RMSNorm,
RoPE, SwiGLU, embedding gather, residual add)."""
from .context import GpuContext, GpuTensor, default_context, find_adapter

__all__ = ["GpuContext", "GpuTensor", "default_context", "find_adapter"]
