"""wgpu (WebGPU) backend: device and shaders (context.py), kernel launch helpers (kernels.py),
the FFN backend (ffn.py).  Imported lazily: qlora_ext works without a GPU."""
