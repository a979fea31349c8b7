"""qlora_ext: QLoRA fine-tuning with an NF4 base in CPU RAM, C/Cython CPU kernels and
WGSL compute shaders through wgpu.  See README.md for the tour."""
from ._native import cpu_features, refresh_cpu_features
from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__version__ = "0.1.0"

__all__ = ["NF4Tensor", "cpu_features", "dequantize_nf4", "quantize_nf4", "refresh_cpu_features"]
