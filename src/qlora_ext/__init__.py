"""qlora_ext: QLoRA fine-tuning with an NF4 base in CPU RAM, C/Cython CPU kernels and
WGSL compute shaders through wgpu.  See README.md for the tour.

    import qlora_ext as qx
    model = qx.load_model("smollm2-135m", lora=qx.LoraConfig(r=16, alpha=32))
    trainer = qx.Trainer(model, qx.TrainConfig(lr=2e-4))
    loss = trainer.step(input_ids, labels)
"""
from importlib import import_module

from ._native import cpu_features, refresh_cpu_features
from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__version__ = "0.1.0"

# The heavier parts load on first use, so `import qlora_ext` stays quick (no wgpu, no
# tokenizers) for code that only quantizes.
_LAZY = {
    "load_model": "qlora_ext.api",
    "LoadOptions": "qlora_ext.options",
    "Model": "qlora_ext.engine.model",
    "LoraConfig": "qlora_ext.model.lora",
    "ModelConfig": "qlora_ext.model.config",
    "load_state": "qlora_ext.model.loading",
    "fuse": "qlora_ext.model.fuse",
    "Trainer": "qlora_ext.train.trainer",
    "TrainConfig": "qlora_ext.train.trainer",
    "adapter_info": "qlora_ext.device",
    "PROFILER": "qlora_ext.profile",
}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'qlora_ext' has no attribute {name!r}")
    value = getattr(import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["NF4Tensor", "cpu_features", "dequantize_nf4", "quantize_nf4", "refresh_cpu_features", *_LAZY]
