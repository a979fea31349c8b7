"""LoRA adapters in PEFT's convention: y = x Wᵀ + scale · (x Aᵀ) Bᵀ, A [r, in] starts
Kaiming-uniform, B [out, r] at zero, scale = alpha / r (rsLoRA: alpha / sqrt(r))."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_PROJECTIONS = PROJECTIONS[:4]
FFN_PROJECTIONS = PROJECTIONS[4:]
# Short names accepted on the command line (--targets q,k,v,o,gate,up,down).
SHORT_NAMES = {p.split("_")[0]: p for p in PROJECTIONS}


def _module_of(proj: str) -> str:
    return "self_attn" if proj in ATTN_PROJECTIONS else "mlp"


def peft_name(layer: int, proj: str, which: str) -> str:
    """PEFT tensor name, e.g. base_model.model.model.layers.3.mlp.down_proj.lora_B.weight."""
    if which not in ("A", "B"):
        raise ValueError(f"which must be 'A' or 'B', got {which!r}")
    return f"base_model.model.model.layers.{layer}.{_module_of(proj)}.{proj}.lora_{which}.weight"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    target_modules: tuple = PROJECTIONS
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.r, (int, np.integer)) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive int, got {self.r!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = []
        for t in (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules:
            name = SHORT_NAMES.get(t, t)
            if name not in PROJECTIONS:
                raise ValueError(f"unknown LoRA target {t!r}; expected some of {', '.join(PROJECTIONS)}")
            targets.append(name)
        if not targets:
            raise ValueError("LoRA target_modules is empty")
        self.target_modules = tuple(p for p in PROJECTIONS if p in targets)

    @property
    def scale(self) -> float:
        return float(self.alpha) / (float(self.r) ** 0.5 if self.use_rslora else float(self.r))


@dataclass
class LoraPair:
    """One adapted projection: A [r, in], B [out, r], float32, and its scale."""

    A: np.ndarray
    B: np.ndarray
    scale: float


@dataclass
class LoraWeights:
    """All adapters of a model, keyed by (layer, projection name)."""

    config: LoraConfig
    pairs: dict = field(default_factory=dict)

    @classmethod
    def init(cls, config: LoraConfig, layer_shapes: list[dict], seed: int = 0) -> "LoraWeights":
        """layer_shapes[l][proj] = (out, in).  A ~ Kaiming-uniform(a=sqrt(5)) as PEFT/torch
        (bound = 1/sqrt(in)), B = 0."""
        rng = np.random.default_rng(seed)
        pairs = {}
        for l, shapes in enumerate(layer_shapes):
            for proj in config.target_modules:
                out_f, in_f = shapes[proj]
                bound = 1.0 / np.sqrt(in_f)
                A = rng.uniform(-bound, bound, size=(config.r, in_f)).astype(np.float32)
                B = np.zeros((out_f, config.r), dtype=np.float32)
                pairs[(l, proj)] = LoraPair(A, B, config.scale)
        return cls(config, pairs)

    def get(self, layer: int, proj: str) -> LoraPair | None:
        return self.pairs.get((layer, proj))

    def named_parameters(self) -> dict:
        """{PEFT name: array} (views, not copies) in a stable order."""
        out = {}
        for (l, proj), p in sorted(self.pairs.items(), key=lambda kv: (kv[0][0], PROJECTIONS.index(kv[0][1]))):
            out[peft_name(l, proj, "A")] = p.A
            out[peft_name(l, proj, "B")] = p.B
        return out

    def num_parameters(self) -> int:
        return sum(p.A.size + p.B.size for p in self.pairs.values())
