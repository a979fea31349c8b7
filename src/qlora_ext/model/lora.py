"""LoRA adapters in PEFT's convention: y = x Wᵀ + scale · (x Aᵀ) Bᵀ, A [r, in] starts
Kaiming-uniform, B [out, r] at zero, scale = alpha / r (rsLoRA: alpha / sqrt(r))."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .._native import require_memory
from .json_input import read_json

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


COMPUTE_DTYPES = ("fp32", "bf16")
_ALIASES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}


def check_compute_dtype(value, what: str = "compute_dtype") -> str:
    """'fp32' or 'bf16' ('float32' / 'bfloat16' accepted); ValueError naming `what` otherwise."""
    name = _ALIASES.get(value) if isinstance(value, str) else None
    if name is None:
        raise ValueError(f"{what} must be 'fp32' or 'bf16', got {value!r}")
    return name


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    target_modules: tuple = PROJECTIONS
    dropout: float = 0.0
    use_rslora: bool = False
    # precision of the frozen base's products on the CPU, as bitsandbytes' bnb_4bit_compute_dtype:
    # "fp32" (exact) or "bf16" (qlora_ext.cpu.base_matmul); the adapters always train in fp32
    compute_dtype: str = "fp32"

    def __post_init__(self):
        self.compute_dtype = check_compute_dtype(self.compute_dtype, "LoraConfig.compute_dtype")
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive int, got {self.r!r}")
        for name in ("alpha", "dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                raise ValueError(f"LoRA {name} must be a finite number, got {v!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, (bool, np.bool_)):
            raise ValueError(f"LoRA use_rslora must be True or False, got {self.use_rslora!r}")
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
        n = sum(config.r * (shapes[p][0] + shapes[p][1]) for shapes in layer_shapes for p in config.target_modules)
        require_memory(4 * n, f"LoRA rank r={config.r} ({n} adapter parameters)")
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


# ------------------------------------------------------------------ PEFT adapter files
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LM_HEAD_NAME = "base_model.model.lm_head.weight"


def _parse_peft_name(name: str):
    """base_model.model.model.layers.{i}.{module}.{proj}.lora_{A|B}[.default].weight
    -> (i, proj, 'A'|'B'), or None for other names."""
    parts = name.split(".")
    if parts[-1] == "weight" and len(parts) >= 2 and parts[-2] == "default":
        parts = parts[:-2] + ["weight"]
    if (len(parts) != 9 or parts[:4] != ["base_model", "model", "model", "layers"]
            or parts[-2] not in ("lora_A", "lora_B") or not parts[4].isdigit()):
        return None
    proj = parts[6]
    if proj not in PROJECTIONS or parts[5] != _module_of(proj):
        return None
    return int(parts[4]), proj, parts[-2][-1]


def save_peft_adapter(directory, lora: LoraWeights, base_model: str = "", lm_head=None) -> None:
    """Write adapter_config.json + adapter_model.safetensors as PEFT does (names without the
    '.default' adapter suffix; a trained LM head as modules_to_save)."""
    import json
    import os

    from .safetensors_io import save_file

    os.makedirs(directory, exist_ok=True)
    c = lora.config
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": int(c.r), "lora_alpha": float(c.alpha), "lora_dropout": float(c.dropout),
        "use_rslora": bool(c.use_rslora), "target_modules": list(c.target_modules), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": ["lm_head"] if lm_head is not None else None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    tensors = dict(lora.named_parameters())
    if lm_head is not None:
        tensors[LM_HEAD_NAME] = lm_head
    # weights first, config last: a directory with a config has complete weights
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    tmp = os.path.join(directory, ADAPTER_CONFIG + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, os.path.join(directory, ADAPTER_CONFIG))


def load_peft_adapter(directory, layer_shapes: list[dict], lm_head_shape=None):
    """Read a PEFT LoRA adapter for a model whose projections have layer_shapes[l][proj] =
    (out, in).  r, alpha, dropout, rsLoRA and targets come from adapter_config.json.
    Returns (LoraWeights, lm_head [V, H] or None)."""
    import os

    from .safetensors_io import SafetensorsFile

    cpath = os.path.join(directory, ADAPTER_CONFIG)
    wpath = os.path.join(directory, ADAPTER_WEIGHTS)
    config = _adapter_config(read_json(cpath, "adapter config (expected a PEFT adapter directory)"), cpath)
    targets = list(config.target_modules)
    if not os.path.exists(wpath):
        raise OSError(f"{wpath}: adapter weights not found")
    found: dict = {}
    lm_head = None
    with SafetensorsFile(wpath) as f:
        for name in f.keys():
            if name.replace(".modules_to_save.default", "") == LM_HEAD_NAME:
                if lm_head is not None:
                    raise ValueError(f"{wpath}: {name} is a second LM head (with and without the "
                                     "'.modules_to_save.default' suffix)")
                lm_head = f.get(name)
                if lm_head_shape is not None and lm_head.shape != tuple(lm_head_shape):
                    raise ValueError(f"{wpath}: {name} has shape {lm_head.shape}, expected {tuple(lm_head_shape)}")
                continue
            parsed = _parse_peft_name(name)
            if parsed is None:
                raise ValueError(f"{wpath}: unexpected tensor {name!r}; expected LoRA tensors such as "
                                 f"{peft_name(0, 'q_proj', 'A')!r}")
            l, proj, which = parsed
            if l >= len(layer_shapes):
                raise ValueError(f"{wpath}: {name} is for layer {l}, the model has {len(layer_shapes)} layers")
            if proj not in config.target_modules:
                raise ValueError(f"{wpath}: {name} adapts {proj}, which is not in target_modules {targets}")
            out_f, in_f = layer_shapes[l][proj]
            arr = np.ascontiguousarray(f.get(name), dtype=np.float32)
            want = (config.r, in_f) if which == "A" else (out_f, config.r)
            if arr.shape != want:
                raise ValueError(f"{wpath}: {name} has shape {arr.shape}, expected {want}")
            slot = found.setdefault((l, proj), {})
            if which in slot:
                raise ValueError(f"{wpath}: {name} is a second lora_{which} of layer {l} {proj} (names with "
                                 "and without the '.default' adapter suffix)")
            slot[which] = arr
    pairs = {}
    for key, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{wpath}: layer {key[0]} {key[1]} has lora_{''.join(ab)} but not both A and B")
        pairs[key] = LoraPair(ab["A"], ab["B"], config.scale)
    if not pairs:
        raise ValueError(f"{wpath}: no LoRA tensors found")
    return LoraWeights(config, pairs), lm_head


def _adapter_config(cfg, cpath: str) -> LoraConfig:
    """The LoraConfig of a parsed adapter_config.json, every field read type-checked (JSON
    booleans for flags, an integer r, finite numbers); ValueError naming the file and key."""
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cpath}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else None!r}, expected 'LORA'")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{cpath}: {key} is not supported (one r and alpha for every module)")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{cpath}: bias {cfg.get('bias')!r} is not supported, expected 'none'")
    for key, default in (("use_rslora", False), ("fan_in_fan_out", False), ("use_dora", False)):
        v = cfg.get(key, default)
        if v is None and key != "use_rslora":
            continue
        if not isinstance(v, bool):
            raise ValueError(f"{cpath}: {key} must be true or false (a JSON boolean), got {v!r}")
        if v and key != "use_rslora":
            raise ValueError(f"{cpath}: {key}=true is not supported")
    if "r" not in cfg:
        raise ValueError(f"{cpath}: required key 'r' is missing")
    r = cfg["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{cpath}: r must be a positive integer, got {r!r}")
    numbers = {}
    for key, default in (("lora_alpha", r), ("lora_dropout", 0.0)):
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{cpath}: {key} must be a number, got {v!r}")
        numbers[key] = v
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{cpath}: target_modules must be a list of module names, got {targets!r}")
    try:
        return LoraConfig(r=r, alpha=float(numbers["lora_alpha"]), target_modules=tuple(targets),
                          dropout=float(numbers["lora_dropout"]), use_rslora=cfg.get("use_rslora", False))
    except ValueError as e:
        raise ValueError(f"{cpath}: {e}") from None
