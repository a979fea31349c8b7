"""load_model: a checkpoint (HF directory, .gguf, or a known name such as "smollm2-135m")
-> a Model with LoRA adapters on an FFN backend."""
from __future__ import annotations

from ..device import select_backend
from .lora import LoraConfig
from .model import Model


def load_model(path, lora: LoraConfig | None = None, quantize: str | None = "nf4", double_quant: bool = False,
               device: str = "auto", gradient_checkpointing: bool = False, train_lm_head: bool = False,
               threads: int | None = None, progress=None, seed: int = 0) -> Model:
    """Load the base (NF4 projections unless quantize=None) and attach fresh LoRA adapters
    (A Kaiming-uniform from `seed`, B zero; lora=None -> LoraConfig() defaults)."""
    from .loading import load_state

    if lora is not None and not isinstance(lora, LoraConfig):
        raise ValueError(f"lora must be a qlora_ext LoraConfig or None, got {type(lora).__name__}")
    backend = select_backend(device)
    state = load_state(path, quantize=quantize, double_quant=double_quant, progress=progress, threads=threads)
    return Model(state, lora if lora is not None else LoraConfig(), backend,
                 gradient_checkpointing=gradient_checkpointing, train_lm_head=train_lm_head,
                 threads=threads, seed=seed)
