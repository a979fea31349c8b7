"""GPU bytes of the `gpu` placement before anything is allocated: the automatic placement
compares them with the adapter's free memory.

The estimate runs the GPU device's own allocation code (GpuDevice construction, its per-shape
buffers, the optimizer's moments) against a CountingContext that only adds up the bytes each
buffer would take, so the estimate and the allocation cannot drift apart."""
from __future__ import annotations

import numpy as np

from ..gpu.runtime import GpuTensor
from ..model.lora import LoraConfig, LoraPair, LoraWeights
from ..model.generate import group_rows
from ..options import WEIGHTS_ON_GPU
from .params import FlatParams


def buffer_bytes(nbytes: int) -> int:
    """What the runtime allocates for a tensor of `nbytes` (>= 16, a multiple of 16)."""
    return (max(int(nbytes), 16) + 15) // 16 * 16


class CountingContext:
    """The runtime's allocation calls, counted instead of made; everything else (limits,
    tiling choices) is read from the real context."""

    def __init__(self, ctx):
        self._real = ctx
        self.allocated_bytes = 0
        held = getattr(ctx, "_scratch", None)
        self._scratch_n = 0 if held is None else held.size

    def __getattr__(self, name):
        return getattr(self._real, name)

    def empty(self, shape, dtype: str = "f32") -> GpuTensor:
        shape = tuple(int(s) for s in shape)
        self.allocated_bytes += buffer_bytes(4 * int(np.prod(shape, dtype=np.int64)))
        return GpuTensor(None, shape, dtype)

    zeros = empty

    def scratch(self, n: int) -> GpuTensor:
        """GpuContext.scratch: grows (a new buffer) only past what the real context holds."""
        if n > self._scratch_n:
            self._scratch_n = n
            return self.empty((n,))
        return GpuTensor(None, (n,))

    def upload(self, a, dtype: str | None = None) -> GpuTensor:
        a = np.asarray(a)
        return self.empty(a.shape, dtype or {"int32": "i32", "uint32": "u32"}.get(str(a.dtype), "f32"))


def _shape_only_lora(state, lora_config: LoraConfig) -> LoraWeights:
    """LoraWeights with the config's shapes and uninitialised values (only sizes are read)."""
    pairs = {}
    for l, lw in enumerate(state.layers):
        for p in lora_config.target_modules:
            out_f, in_f = lw.proj[p].shape
            pairs[(l, p)] = LoraPair(np.empty((lora_config.r, in_f), np.float32),
                                     np.empty((out_f, lora_config.r), np.float32), lora_config.scale)
    return LoraWeights(lora_config, pairs)


# Prompts the estimate plans to generate for: the held-out eval's batch (train.loop.exact_match),
# each with up to T positions of prompt and answer.
GENERATE_ROWS = 32


def estimate_bytes(ctx, state, lora_config, B: int, T: int, recompute_layers: int = 0,
                   train_lm_head: bool = False, weights: str = WEIGHTS_ON_GPU) -> int:
    """Bytes the gpu placement allocates for training batches of B rows x T tokens with the
    first `recompute_layers` layers recomputing their activations: the weights (on the GPU, or
    the streamed layers' slots), parameters, gradients and AdamW moments, the batch shape's
    buffers (engine/acts.py's plan: kept activations, the recompute slot, saved inputs), and the GQA
    attention backward's per-query-head dk/dv partials (allocated on the first backward that
    splits heads: counted whenever Hq != Hkv); and beside them, generation of GENERATE_ROWS
    prompts of T positions (train's eval, in groups as model.generate makes them): the KV
    cache, the prefill's and the decoding step's buffers."""
    from .gpu_device import GpuDevice
    from .model import Model, RopeCache, default_kernels

    counting = CountingContext(ctx)
    head = np.empty(state.lm_head_weight.shape, np.float32) if train_lm_head else None
    params = FlatParams(_shape_only_lora(state, lora_config), head)
    rope = RopeCache(state.config, default_kernels())
    dev = GpuDevice(state, params, counting, rope, recompute_layers=recompute_layers, weights=weights,
                    dropout=float(lora_config.dropout))
    dev.shape_bytes(Model.dims_of(state, B, T))
    rows = group_rows(GENERATE_ROWS, T)
    dev.generation_bytes(Model.dims_of(state, rows, T), Model.dims_of(state, rows, 1))  # its buffers
    dev.kv_cache(rows, T)                               # and the cache, here counted by `counting`
    counting.empty((params.size,))
    counting.empty((params.size,))                      # AdamW's two moments
    cfg = state.config
    Hq, Hkv, D = int(cfg.num_attention_heads), int(cfg.num_key_value_heads), int(cfg.head_dim)
    partials = 2 * buffer_bytes(4 * B * T * Hq * D) if Hq != Hkv else 0
    return counting.allocated_bytes + partials
