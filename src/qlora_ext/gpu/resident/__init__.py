"""The WGSL kernels of the gpu placement (qlora_ext.engine.gpu_device runs the layer program
on them).

Modules: context (device, shaders by name, cached pipelines, GpuTensor), layer_ops (RMSNorm,
RoPE, SwiGLU, embedding gather, residual add), attention (causal GQA flash attention),
gemm (fp32 tiled GEMM), cross_entropy (LM head + chunked CE), adamw (AdamW on a flat buffer),
weights (NF4/fp32 base weights, GPU dequant)."""
from .context import GpuContext, GpuTensor, default_context, find_adapter

__all__ = ["GpuContext", "GpuTensor", "default_context", "find_adapter"]
