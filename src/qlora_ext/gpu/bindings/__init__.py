"""Host bindings of the GPU device's WGSL kernels (qlora_ext.engine.gpu_device runs the layer
program on them, on the one runtime of qlora_ext.gpu.runtime).

Modules: layer_ops (RMSNorm, RoPE, embedding gather, residual add), attention (causal GQA
flash attention), gemm (the fp32 small_gemm.wgsl products), cross_entropy (LM head +
chunked CE), adamw (AdamW on a flat buffer), weights (NF4/fp32 base weights, GPU dequant).
The gemm.wgsl / gemm_f32.wgsl / swiglu.wgsl / dropout.wgsl bindings are qlora_ext.gpu.kernels."""
