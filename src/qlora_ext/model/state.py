"""The in-memory base model: NF4 (or fp32) projections per layer, fp32 embeddings, norms and
LM head, the config and the tokenizer.  Built by qlora_ext.model.loading.load_state."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..nf4 import NF4Tensor, dequantize_nf4
from .config import ModelConfig
from .lora import PROJECTIONS


@dataclass
class LayerWeights:
    """One decoder layer.  proj[name] is [out, in] (HF Linear layout), NF4 or float32."""

    input_layernorm: np.ndarray  # [H] f32
    post_attention_layernorm: np.ndarray  # [H] f32
    proj: dict = field(default_factory=dict)  # {q_proj..down_proj: NF4Tensor | f32 [out, in]}
    bias: dict = field(default_factory=dict)  # {q_proj, k_proj, v_proj: f32 [out]} when attention_bias
    q_norm: np.ndarray | None = None  # [head_dim] f32, qwen3
    k_norm: np.ndarray | None = None  # [head_dim] f32, qwen3

    def weight(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """float32 [out, in] of a projection: dequantized (into `out` if given) for NF4, the
        stored array (or a copy into `out`) for fp32."""
        try:
            w = self.proj[name]
        except KeyError:
            raise KeyError(f"no projection {name!r}; expected one of {', '.join(PROJECTIONS)}") from None
        if isinstance(w, NF4Tensor):
            return dequantize_nf4(w, out=out)
        if out is None:
            return w
        if out.shape != w.shape or out.dtype != np.float32:
            raise ValueError(f"out for {name} must be float32 {w.shape}, got {out.dtype} {out.shape}")
        np.copyto(out, w)
        return out

    def shape(self, name: str) -> tuple:
        return tuple(self.proj[name].shape)


@dataclass
class ModelState:
    config: ModelConfig
    embed_tokens: np.ndarray  # [V, H] f32
    norm: np.ndarray  # [H] f32
    lm_head: np.ndarray | None  # [V, H] f32, None when tied to embed_tokens
    layers: list
    tokenizer: object | None = None  # qlora_ext.model.tokenizer.Tokenizer
    quantize: str | None = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    source: str = ""
    name: str = ""  # the model as a user names it (a hub id where known): adapter_config.json's base model

    @property
    def lm_head_weight(self) -> np.ndarray:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def layer_shapes(self) -> list:
        """[{proj: (out, in)}] per layer, the argument LoraWeights.init takes."""
        return [{p: l.shape(p) for p in PROJECTIONS} for l in self.layers]

    def memory_report(self) -> dict:
        """Bytes held per component.  LoRA is added by the model that owns the adapters."""
        r = dict(nf4_codes=0, absmax=0, embeddings=int(self.embed_tokens.nbytes),
                 lm_head=0 if self.lm_head is None else int(self.lm_head.nbytes),
                 norms=int(self.norm.nbytes), biases=0, fp32_projections=0)
        for l in self.layers:
            r["norms"] += l.input_layernorm.nbytes + l.post_attention_layernorm.nbytes
            for n in (l.q_norm, l.k_norm):
                if n is not None:
                    r["norms"] += n.nbytes
            r["biases"] += sum(b.nbytes for b in l.bias.values())
            for w in l.proj.values():
                if isinstance(w, NF4Tensor):
                    r["nf4_codes"] += w.packed.nbytes
                    r["absmax"] += w.nbytes - w.packed.nbytes
                else:
                    r["fp32_projections"] += w.nbytes
        r = {k: int(v) for k, v in r.items()}
        r["total"] = sum(r.values())
        return r
