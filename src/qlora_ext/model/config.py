"""Model configuration: the subset of an HF config.json (or GGUF metadata) that the forward
pass needs, for the Llama (incl. Mistral, SmolLM2), Qwen2 and Qwen3 families."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

# config.json model_type -> our family; Mistral's dense models are Llama-shaped.
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# RoPE variants the forward implements (rotate_half convention); others are refused at load.
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (always on for qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (qwen3)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # other config.json keys, kept for to_hf

    def __post_init__(self):
        self.validate()

    def validate(self, source: str = "config") -> None:
        """Raise ValueError naming the key when a value cannot describe a model we run."""
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"{source}: model_type {self.model_type!r} is not supported; "
                             f"expected one of {', '.join(sorted(MODEL_TYPES))}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{source}: {key} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"{source}: head_dim must be even for RoPE, got {self.head_dim}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"{source}: rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"{source}: rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if not isinstance(rs, dict):
                raise ValueError(f"{source}: rope_scaling must be a dict or null, got {rs!r}")
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported; expected one of "
                                 f"{', '.join(ROPE_TYPES)}")
            need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                      "original_max_position_embeddings")}.get(kind, ())
            for k in need:
                if not isinstance(rs.get(k), (int, float)):
                    raise ValueError(f"{source}: rope_scaling.{k} is required for rope_type {kind!r}, got {rs.get(k)!r}")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def projection_shapes(self) -> dict:
        """{projection: (out, in)} in HF Linear layout."""
        H, I = self.hidden_size, self.intermediate_size
        return {"q_proj": (self.q_dim, H), "k_proj": (self.kv_dim, H), "v_proj": (self.kv_dim, H),
                "o_proj": (H, self.q_dim), "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}

    def bias_names(self) -> tuple:
        """Projections with a bias: Qwen2 has q/k/v; Llama/Qwen3 with attention_bias add o."""
        if self.model_type == "qwen2":
            return ("q_proj", "k_proj", "v_proj")
        return ("q_proj", "k_proj", "v_proj", "o_proj") if self.attention_bias else ()

    # ---- HF config.json ----

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """From a config.json dict (transformers 4 or 5 layout)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"{source}: model_type {mt!r} is not supported; expected one of "
                             f"{', '.join(sorted(MODEL_TYPES))}")
        family = MODEL_TYPES[mt]

        def req(key):
            if key not in d or d[key] is None:
                raise ValueError(f"{source}: required key {key!r} is missing")
            return d[key]

        heads = req("num_attention_heads")
        hidden = req("hidden_size")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if not isinstance(heads, int) or heads < 1 or hidden % heads:
                raise ValueError(f"{source}: no head_dim and hidden_size {hidden} is not divisible by "
                                 f"num_attention_heads {heads}")
            head_dim = hidden // heads
        # transformers 5 stores rope_theta and the scaling inside rope_parameters
        rp = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is None and rp:
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default":
                rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if isinstance(rope_scaling, dict):
            rope_scaling = dict(rope_scaling)
            if "rope_type" not in rope_scaling and "type" in rope_scaling:
                rope_scaling["rope_type"] = rope_scaling.pop("type")
            if rope_scaling.get("rope_type") == "default":
                rope_scaling = None
        if family == "qwen2":
            attention_bias = True
        else:
            attention_bias = bool(d.get("attention_bias", False))
        known = {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
                 "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id", "architectures", "hidden_act"}
        return cls(
            model_type=family,
            vocab_size=req("vocab_size"),
            hidden_size=hidden,
            intermediate_size=req("intermediate_size"),
            num_hidden_layers=req("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=family == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            extra={k: v for k, v in d.items() if k not in known and not k.startswith("_")},
        )

    @classmethod
    def from_file(cls, path) -> "ModelConfig":
        """From config.json, or from a directory holding one."""
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        try:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise OSError(f"{p}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        return cls.from_hf(d, source=p)

    def to_hf(self) -> dict:
        """A config.json dict that transformers (4.x and 5.x) loads as this architecture."""
        d = {k: v for k, v in self.extra.items()}
        d.update({
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        })
        if self.model_type != "qwen2":  # Qwen2 has no such key: its q/k/v biases are fixed
            d["attention_bias"] = self.attention_bias
        return d

    def to_dict(self) -> dict:
        return asdict(self)
