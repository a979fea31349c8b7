"""GPU-resident mode: the whole layer (norms, RoPE, attention, projections + LoRA, FFN, loss,
optimizer) runs in WGSL on one wgpu device (qlora_ext.gpu.runtime); per step only token ids
and labels go up and the loss comes down.

Modules: layer_ops (RMSNorm, RoPE, embedding gather, residual add), attention (causal GQA
flash attention), gemm (the fp32 resident_gemm.wgsl products), cross_entropy (LM head +
chunked CE), adamw (AdamW on a flat buffer), weights (NF4/fp32 base weights, GPU dequant),
engine (ResidentEngine: a Model's step), model (ResidentModel), memory (the byte estimate).
The gemm.wgsl / swiglu.wgsl / dropout.wgsl bindings are qlora_ext.gpu.kernels, shared with
the FFN backend."""
