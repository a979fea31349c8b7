"""load_model: a checkpoint (HF directory, .gguf, a known name such as "smollm2-135m", or a hub id)
-> a Model with LoRA adapters in the placement chosen for it (cpu, split or gpu)."""
from __future__ import annotations

import dataclasses

from .finite import check_base_weights
from .model.lora import LoraConfig
from .options import LoadOptions


def load_model(path, lora: LoraConfig | None = None, options: LoadOptions | None = None, **changes):
    """Load the base (NF4 projections unless quantize=None) and attach fresh LoRA adapters
    (A Kaiming-uniform from `seed`, B zero; lora=None -> LoraConfig() defaults).

    options: a LoadOptions (qlora_ext.options: placement "auto"/"cpu"/"split"/"gpu", device,
    gradient_checkpointing, batch_shape, quantize, compute_dtype, ...); keyword arguments
    replace its fields (`load_model(path, placement="gpu")`).  `mode=` ("resident" for "gpu")
    still works and warns.  The result says what it took: `model.placement` ("cpu", "split"
    or "gpu") and `model.placement_reason`.  path: a model directory, .gguf file, known name,
    or Hugging Face hub id ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B@main" or `revision`) from the
    local cache, downloaded when the network is allowed."""
    from .model.loading import load_state
    from .placement import choose_placement

    if lora is not None and not isinstance(lora, LoraConfig):
        raise ValueError(f"lora must be a qlora_ext LoraConfig or None, got {type(lora).__name__}")
    if options is not None and not isinstance(options, LoadOptions):
        raise ValueError(f"options must be a qlora_ext LoadOptions or None, got {type(options).__name__}")
    options = (options or LoadOptions()).replace(**changes)
    lora = lora if lora is not None else LoraConfig()
    if options.compute_dtype is not None:
        lora = dataclasses.replace(lora, compute_dtype=options.compute_dtype)
    state = load_state(path, quantize=options.quantize, double_quant=options.double_quant, progress=options.progress,
                       threads=options.threads, revision=options.revision)
    check_base_weights(state)  # NaN/Inf in the base: refused here, before any training
    return build_model(state, lora, choose_placement(state, lora, options), options)


def build_model(state, lora: LoraConfig, placement, options: LoadOptions):
    """The Model of `placement` (a qlora_ext.placement.Placement) over a loaded state."""
    from .engine.gpu_model import GpuModel, SplitModel
    from .engine.model import Model as CpuModel
    from .gpu.runtime import shared_context

    common = dict(gradient_checkpointing=placement.recompute_layers, train_lm_head=options.train_lm_head,
                  threads=options.threads, seed=options.seed)
    if placement.name == "cpu":
        model = CpuModel(state, lora, **common)
    elif placement.name == "gpu":
        model = GpuModel(state, lora, ctx=shared_context(placement.adapter), weights=placement.weights, **common)
    else:
        model = SplitModel(state, lora, ctx=shared_context(placement.adapter), lanes=options.lanes, **common)
    model.placement_reason = placement.reason
    return model
