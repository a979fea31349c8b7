"""GPU bytes the resident placement will allocate, computed before anything is allocated: the
automatic placement choice compares it with the adapter's free memory.

It mirrors the buffers of ResidentEngine (resident weights, the flat LoRA buffers and AdamW
moments, and the per-batch-shape activations of ResidentEngine._bufs);
tests/test_gpu_resident_placement.py holds it equal to what an engine really allocates."""
from __future__ import annotations

import numpy as np

from ...model.lora import PROJECTIONS
from ...nf4 import NF4Tensor
from .cross_entropy import chunk_rows_for
from ..kernels import PARAM_ALIGN


def _buf(n_elems: int) -> int:
    """Bytes of a GpuContext.empty buffer of n 4-byte elements (>= 16, a multiple of 16)."""
    return (max(4 * int(n_elems), 16) + 15) // 16 * 16


def _weight_bytes(w) -> int:
    if isinstance(w, NF4Tensor):
        n = int(np.prod(w.shape))
        return _buf(-(-((n + 1) // 2) // 4)) + _buf(int(np.asarray(w.absmax).size))
    return _buf(int(np.prod(w.shape)))


def lora_shapes(state, lora_config, train_lm_head: bool) -> list:
    """Shapes of every trainable tensor (LoRA A [r, in], B [out, r], the LM head)."""
    r = int(lora_config.r)
    shapes = []
    for lw in state.layers:
        for p in PROJECTIONS:
            if p in lora_config.target_modules:
                out_f, in_f = lw.proj[p].shape
                shapes += [(r, in_f), (out_f, r)]
    if train_lm_head:
        shapes.append(tuple(state.lm_head_weight.shape))
    return shapes


def resident_bytes(state, lora_config, train_lm_head: bool = False, weights: str = "resident") -> int:
    """Weights, norms, embeddings and the four flat LoRA buffers (weights, grads, m, v)."""
    cfg = state.config
    V, H = int(cfg.vocab_size), int(cfg.hidden_size)
    total = _buf(V * H) + _buf(H) + _buf(16)            # embeddings, final norm, NF4 code table
    if state.lm_head is not None and not train_lm_head:
        total += _buf(V * H)
    for i, lw in enumerate(state.layers):
        total += 2 * _buf(H)
        if lw.q_norm is not None:
            total += _buf(lw.q_norm.size) + _buf(lw.k_norm.size)
        for b in (lw.bias or {}).values():
            total += _buf(np.asarray(b).size)
        if weights == "resident" or i == 0:                # streamed: one slot per projection
            total += sum(_weight_bytes(lw.proj[p]) for p in PROJECTIONS)
    n_params = sum(-(-int(np.prod(s)) // PARAM_ALIGN) * PARAM_ALIGN for s in lora_shapes(state, lora_config, train_lm_head))
    return total + 4 * _buf(n_params)


def activation_bytes(ctx, state, lora_config, B: int, T: int, gradient_checkpointing: bool = False) -> int:
    """The per-(B, T) buffers: saved activations (one set with checkpointing, plus each
    layer's input), gradient scratch, and the LM head's logits chunk."""
    cfg = state.config
    N, H, V = B * T, int(cfg.hidden_size), int(cfg.vocab_size)
    Hq, Hkv, D = int(cfg.num_attention_heads), int(cfg.num_key_value_heads), int(cfg.head_dim)
    F = int(state.layers[0].proj["gate_proj"].shape[0])
    L = len(state.layers)
    qk = state.layers[0].q_norm is not None
    r = int(lora_config.r)
    per_layer = (4 * _buf(N * H) + 2 * _buf(N) + 2 * _buf(N * Hq * D) + 2 * _buf(N * Hkv * D)
                 + _buf(B * Hq * T) + 3 * _buf(N * F) + len(lora_config.target_modules) * _buf(N * r))
    if qk:
        per_layer += _buf(N * Hq * D) + _buf(N * Hkv * D) + _buf(N * Hq) + _buf(N * Hkv)
    total = per_layer * (1 if gradient_checkpointing else L)
    if gradient_checkpointing:
        total += L * _buf(N * H)
    total += 3 * _buf(N) + _buf(B * T)                      # ids, labels, positions, mask
    total += 6 * _buf(N * H) + _buf(N)                      # x, xf, gy, gx, dx2, dh; rstdf
    total += 3 * _buf(N * F) + 2 * _buf(N * Hq * D) + 2 * _buf(N * Hkv * D) + _buf(B * Hq * T) + _buf(N * r)
    if qk:
        total += _buf(N * Hq * D) + _buf(N * Hkv * D)
    if float(lora_config.dropout) > 0.0:                 # dropped input, masked gradient; keys
        total += 2 * _buf(N * max(H, Hq * D, F)) + _buf(L * len(PROJECTIONS))
    R = min(N, chunk_rows_for(ctx, V, hidden=H))
    total += _buf(R * V) + 2 * _buf(N) + _buf(2)           # logits chunk, losses, counted, stats
    return total


def estimate_bytes(ctx, state, lora_config, B: int, T: int, gradient_checkpointing: bool = False,
                   train_lm_head: bool = False, weights: str = "resident") -> int:
    """resident_bytes + activation_bytes for batches of B rows of T tokens, plus the GQA
    attention backward's per-query-head dk/dv partials (2 x [B, T, Hq, D], allocated on the
    first backward where it splits heads: counted whenever Hq != Hkv)."""
    cfg = state.config
    Hq, Hkv, D = int(cfg.num_attention_heads), int(cfg.num_key_value_heads), int(cfg.head_dim)
    partials = 2 * _buf(B * T * Hq * D) if Hq != Hkv else 0
    return (resident_bytes(state, lora_config, train_lm_head, weights)
            + activation_bytes(ctx, state, lora_config, B, T, gradient_checkpointing) + partials)
