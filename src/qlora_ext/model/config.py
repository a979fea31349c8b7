"""Model configuration: the subset of an HF config.json (or GGUF metadata) that the forward
pass needs, for the Llama (incl. Mistral, SmolLM2), Qwen2 and Qwen3 families."""
from __future__ import annotations

import math
import os
from dataclasses import InitVar, asdict, dataclass, field

from .._native import require_memory
from .json_input import read_json

# config.json model_type -> our family; Mistral's dense models are Llama-shaped.
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# RoPE variants the forward implements (rotate_half convention); others are refused at load.
ROPE_TYPES = ("default", "linear", "llama3")
# Upper bounds of the integer fields: several times the largest released model's value, far
# below what would overflow a product of them; whether a model fits is checked against the
# machine's RAM by check_memory before loading.
INT_LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 18, "intermediate_size": 1 << 20,
              "num_hidden_layers": 1 << 12, "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12,
              "head_dim": 1 << 12, "max_position_embeddings": 1 << 26}
TOKEN_ID_LIMIT = 1 << 31


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _token_id_ok(v, allow_list: bool) -> bool:
    if v is None:
        return True
    if allow_list and isinstance(v, list):
        return all(_token_id_ok(x, False) for x in v) and v != []
    return _is_int(v) and 0 <= v < TOKEN_ID_LIMIT


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
    source: InitVar[str] = "config"  # the file named in validation errors

    def __post_init__(self, source: str):
        self.validate(source)

    def validate(self, source: str = "config") -> None:
        """Raise ValueError naming the key when a value cannot describe a model we run."""
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"{source}: model_type {self.model_type!r} is not supported; "
                             f"expected one of {', '.join(sorted(MODEL_TYPES))}")
        for key, limit in INT_LIMITS.items():
            v = getattr(self, key)
            if not _is_int(v) or not 1 <= v <= limit:
                raise ValueError(f"{source}: {key} must be a positive integer (at most {limit}), got {v!r}")
        for key in ("tie_word_embeddings", "attention_bias", "qk_norm"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{source}: {key} must be true or false, got {getattr(self, key)!r}")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not _token_id_ok(getattr(self, key), allow_list=key == "eos_token_id"):
                raise ValueError(f"{source}: {key} must be a token id (an integer from 0 to {TOKEN_ID_LIMIT - 1})"
                                 f"{', a non-empty list of them' if key == 'eos_token_id' else ''} or null, "
                                 f"got {getattr(self, key)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"{source}: head_dim must be even for RoPE, got {self.head_dim}")
        if not (_is_number(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ValueError(f"{source}: rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not (_is_number(self.rope_theta) and self.rope_theta > 0):
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
                if not (_is_number(rs.get(k)) and rs.get(k) > 0):
                    raise ValueError(f"{source}: rope_scaling.{k} is required for rope_type {kind!r} "
                                     f"(a positive number), got {rs.get(k)!r}")

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

    def check_memory(self, source: str, quantize: str | None = "nf4", blocksize: int = 64) -> None:
        """ValueError naming the key when the model this config describes cannot fit in the
        RAM available, before anything is allocated for it.  Counts what loading holds: the
        projections (NF4 codes and scales, or float32), the float32 embeddings and LM head,
        and the RoPE tables built for max_position_embeddings (float32, float64 while built)."""
        proj = sum(o * i for o, i in self.projection_shapes().values())
        per_layer = proj // 2 + 4 * -(-proj // blocksize) if quantize == "nf4" else 4 * proj
        per_layer += 4 * (2 * self.hidden_size + 2 * self.head_dim + sum(o for o, _ in self.projection_shapes().values()))
        terms = {
            f"num_hidden_layers={self.num_hidden_layers} (with hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size})": self.num_hidden_layers * per_layer,
            f"vocab_size={self.vocab_size} x hidden_size={self.hidden_size}":
                4 * self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2),
            f"max_position_embeddings={self.max_position_embeddings} x head_dim={self.head_dim}":
                16 * self.max_position_embeddings * self.head_dim,
        }
        largest = max(terms, key=terms.get)
        require_memory(sum(terms.values()), f"{source}: the model ({largest} above all)")

    # ---- HF config.json ----

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """From a config.json dict (transformers 4 or 5 layout)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if not isinstance(mt, str) or mt not in MODEL_TYPES:
            raise ValueError(f"{source}: model_type {mt!r} is not supported; expected one of "
                             f"{', '.join(sorted(MODEL_TYPES))}")
        family = MODEL_TYPES[mt]

        def req(key):
            if key not in d or d[key] is None:
                raise ValueError(f"{source}: required key {key!r} is missing")
            return d[key]

        def integer(key, default=None):
            v = req(key) if default is None else d.get(key, default)
            if v is None:
                v = default
            if not _is_int(v) or not 1 <= v <= INT_LIMITS[key]:
                raise ValueError(f"{source}: {key} must be a positive integer (at most {INT_LIMITS[key]}), got {v!r}")
            return v

        def flag(key, default=False):
            v = d.get(key, default)
            if not isinstance(v, bool):
                raise ValueError(f"{source}: {key} must be true or false (a JSON boolean), got {v!r}")
            return v

        def number(key, v):
            if not (_is_number(v) and v > 0):
                raise ValueError(f"{source}: {key} must be a positive number, got {v!r}")
            return float(v)

        heads = integer("num_attention_heads")
        hidden = integer("hidden_size")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"{source}: no head_dim and hidden_size {hidden} is not divisible by "
                                 f"num_attention_heads {heads}")
            head_dim = hidden // heads
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported; these families use 'silu'")
        # transformers 5 stores rope_theta and the scaling inside rope_parameters
        rp = d.get("rope_parameters") or {}
        if not isinstance(rp, dict):
            raise ValueError(f"{source}: rope_parameters must be an object or null, got {rp!r}")
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
        attention_bias = True if family == "qwen2" else flag("attention_bias")
        known = {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
                 "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id", "architectures", "hidden_act"}
        return cls(
            model_type=family,
            vocab_size=integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size"),
            num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=integer("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=number("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            rope_theta=number("rope_theta", rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=integer("max_position_embeddings", 2048),
            tie_word_embeddings=flag("tie_word_embeddings"),
            attention_bias=attention_bias,
            qk_norm=family == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            extra={k: v for k, v in d.items() if k not in known and not k.startswith("_")},
            source=source,
        )

    @classmethod
    def from_file(cls, path) -> "ModelConfig":
        """From config.json, or from a directory holding one."""
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        return cls.from_hf(read_json(p, "config file"), source=p)

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
