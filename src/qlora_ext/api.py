"""load_model: a checkpoint (HF directory, .gguf, a known name such as "smollm2-135m", or a hub id)
-> a Model with LoRA adapters in the placement chosen for it (cpu, split or resident)."""
from __future__ import annotations

import dataclasses

from .finite import check_base_weights
from .model.lora import LoraConfig
from .placement import check_mode


def load_model(path, lora: LoraConfig | None = None, quantize: str | None = "nf4", double_quant: bool = False,
               device: str = "auto", gradient_checkpointing: bool = False, train_lm_head: bool = False,
               threads: int | None = None, progress=None, seed: int = 0, mode: str = "auto",
               batch_shape: tuple | None = None, revision: str | None = None, compute_dtype: str | None = None):
    """Load the base (NF4 projections unless quantize=None) and attach fresh LoRA adapters
    (A Kaiming-uniform from `seed`, B zero; lora=None -> LoraConfig() defaults).

    mode: "split" (projections, FFN and LM head on the GPU; norms, RoPE and attention on the
    CPU; everything on the CPU with device="cpu" or without a GPU), "resident" (the whole
    step on the GPU), or "auto" (resident when the GPU's free memory holds it for
    `batch_shape` = (rows, tokens), default (4, 1024); see qlora_ext.placement).  The result
    says what it took: `model.placement` ("cpu", "split" or "resident") and
    `model.placement_reason`.  path: a model directory, .gguf file, known name, or Hugging
    Face hub id ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B@main" or `revision`) from the local
    cache, downloaded when the network is allowed.

    compute_dtype ("fp32" or "bf16", as bitsandbytes' bnb_4bit_compute_dtype): the precision
    of the frozen base's CPU products; None keeps lora.compute_dtype (default "fp32")."""
    from . import placement
    from .engine.gpu_model import GpuModel, SplitModel
    from .gpu.runtime import shared_context
    from .engine.model import Model as CpuModel
    from .model.loading import load_state

    if lora is not None and not isinstance(lora, LoraConfig):
        raise ValueError(f"lora must be a qlora_ext LoraConfig or None, got {type(lora).__name__}")
    check_mode(mode, device)
    if batch_shape is not None and (len(batch_shape) != 2 or min(int(v) for v in batch_shape) < 1):
        raise ValueError(f"batch_shape must be (rows, tokens) with both >= 1, got {batch_shape!r}")
    lora = lora if lora is not None else LoraConfig()
    if compute_dtype is not None:
        lora = dataclasses.replace(lora, compute_dtype=compute_dtype)
    state = load_state(path, quantize=quantize, double_quant=double_quant, progress=progress, threads=threads,
                       revision=revision)
    check_base_weights(state)  # NaN/Inf in the base: refused here, before any training
    common = dict(gradient_checkpointing=gradient_checkpointing, train_lm_head=train_lm_head, threads=threads,
                  seed=seed)
    reason = "asked for"
    if mode != "split" and device != "cpu":
        where, adapter, reason, weights = placement.choose(mode, device, state, lora, batch_shape,
                                                           gradient_checkpointing, train_lm_head)
        if where == "resident":
            model = GpuModel(state, lora, ctx=shared_context(adapter), weights=weights, **common)
            model.placement_reason = reason
            return model
    ctx, why_cpu = (None, "device='cpu'") if device == "cpu" else split_context(device)
    if ctx is None:
        model = CpuModel(state, lora, **common)
        model.placement_reason = why_cpu if mode != "split" or device == "cpu" else f"asked for split; {why_cpu}"
        return model
    model = SplitModel(state, lora, ctx=ctx, **common)
    model.placement_reason = reason
    return model


def split_context(device: str) -> tuple:
    """(the GPU runtime context for the split placement, None) or, where no GPU serves,
    (None, why): device='auto' falls back to the CPU with a warning when the GPU fails to
    start; device='gpu' raises."""
    import warnings

    from .gpu.runtime import GpuError, pick_adapter, shared_context, unavailable_reason

    adapter = pick_adapter(allow_software=(device == "gpu"))
    if adapter is None:
        if device == "gpu":
            raise GpuError("device='gpu': wgpu found no adapter (is a Vulkan/Metal/DX12 driver installed?)")
        return None, "no GPU adapter"
    blocker = unavailable_reason()
    if blocker:
        if device == "gpu":
            raise OSError(f"device='gpu': {blocker}")
        return None, blocker
    try:
        return shared_context(adapter), ""
    except Exception as e:   # a driver that fails to create a device
        if device == "gpu":
            raise
        warnings.warn(f"device='auto': GPU unusable, using the CPU ({e})", RuntimeWarning, stacklevel=3)
        return None, f"GPU unusable ({e})"
