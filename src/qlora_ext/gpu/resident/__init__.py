"""GPU-resident mode: the whole layer (norms, RoPE, attention, projections + LoRA, FFN, loss,
optimizer) runs in WGSL on one wgpu device; per step only token ids and labels go up and the
loss comes down.

Modules: context (device, shaders by name, cached pipelines, GpuTensor), layer_ops (RMSNorm,
RoPE, SwiGLU, embedding gather, residual add), attention (causal GQA flash attention),
gemm (fp32 tiled GEMM), cross_entropy (LM head + chunked CE), adamw (AdamW on a flat buffer),
weights (NF4/fp32 base weights, GPU dequant), engine (ResidentEngine: a Model's step)."""
from .context import GpuContext, GpuTensor, default_context, find_adapter

__all__ = ["GpuContext", "GpuTensor", "default_context", "find_adapter"]
