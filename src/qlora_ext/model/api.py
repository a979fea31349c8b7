"""load_model: a checkpoint (HF directory, .gguf, or a known name such as "smollm2-135m")
-> a Model with LoRA adapters, placed split (CPU + FFN backend) or GPU-resident."""
from __future__ import annotations

import dataclasses

from ..device import select_backend
from ..placement import check_mode
from .lora import LoraConfig
from .model import Model


def load_model(path, lora: LoraConfig | None = None, quantize: str | None = "nf4", double_quant: bool = False,
               device: str = "auto", gradient_checkpointing: bool = False, train_lm_head: bool = False,
               threads: int | None = None, progress=None, seed: int = 0, mode: str = "auto",
               batch_shape: tuple | None = None, compute_dtype: str | None = None) -> Model:
    """Load the base (NF4 projections unless quantize=None) and attach fresh LoRA adapters
    (A Kaiming-uniform from `seed`, B zero; lora=None -> LoraConfig() defaults).

    mode: "split" (attention on the CPU, FFN on `device`'s backend), "resident" (the whole
    step on the GPU), or "auto" (resident when the GPU's free memory holds it for
    `batch_shape` = (rows, tokens), default (4, 1024); see qlora_ext.placement).  The result
    says what it took: `model.placement` ("cpu", "split" or "resident") and
    `model.placement_reason`.

    compute_dtype ("fp32" or "bf16", as bitsandbytes' bnb_4bit_compute_dtype): the precision
    of the frozen base's CPU products; None keeps lora.compute_dtype (default "fp32")."""
    from .loading import load_state
    from .. import placement

    if lora is not None and not isinstance(lora, LoraConfig):
        raise ValueError(f"lora must be a qlora_ext LoraConfig or None, got {type(lora).__name__}")
    check_mode(mode, device)
    if batch_shape is not None and (len(batch_shape) != 2 or min(int(v) for v in batch_shape) < 1):
        raise ValueError(f"batch_shape must be (rows, tokens) with both >= 1, got {batch_shape!r}")
    lora = lora if lora is not None else LoraConfig()
    if compute_dtype is not None:
        lora = dataclasses.replace(lora, compute_dtype=compute_dtype)
    state = load_state(path, quantize=quantize, double_quant=double_quant, progress=progress, threads=threads)
    reason = "asked for" if mode == "split" else "device='cpu'"
    if mode != "split" and device != "cpu":
        where, adapter, reason, weights = placement.choose(mode, device, state, lora, batch_shape,
                                                           gradient_checkpointing, train_lm_head)
        if where == "resident":
            from ..gpu.resident.model import ResidentModel

            model = ResidentModel(state, lora, ctx=placement.context_for(adapter),
                                  gradient_checkpointing=gradient_checkpointing, train_lm_head=train_lm_head,
                                  threads=threads, seed=seed, weights=weights)
            model.placement_reason = reason
            return model
    backend = select_backend(device)
    model = Model(state, lora, backend, gradient_checkpointing=gradient_checkpointing, train_lm_head=train_lm_head,
                  threads=threads, seed=seed)
    model.placement_reason = reason
    return model
