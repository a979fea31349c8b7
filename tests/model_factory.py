"""Tiny random checkpoints for tests, written without torch: HF layout (config.json,
safetensors single or sharded, tokenizer.json, tokenizer_config.json) and GGUF.

Shapes are small but awkward: hidden 64, intermediate 96 (not a multiple of 64), 2 layers,
4 heads, 2 KV heads, head_dim 16 (qwen3: 24, independent of hidden / heads), vocab 101."""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from qlora_ext.model.config import ModelConfig
from qlora_ext.model.gguf import GGML_TYPE_IDS
from qlora_ext.model.lora import PROJECTIONS
from qlora_ext.model.safetensors_io import save_file

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_config(model_type: str = "qwen3", tie_word_embeddings: bool | None = None, **overrides) -> ModelConfig:
    d = dict(model_type=model_type, vocab_size=101, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=24 if model_type == "qwen3" else 16, rms_norm_eps=1e-6, rope_theta=10000.0,
             rope_scaling=None, max_position_embeddings=128,
             tie_word_embeddings=(model_type == "llama") if tie_word_embeddings is None else tie_word_embeddings,
             attention_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    d.update(overrides)
    return ModelConfig(**d)


def tiny_weights(config: ModelConfig, seed: int = 0) -> dict:
    """HF-named float32 tensors with std ~0.05-0.1 so that logits are far from uniform."""
    rng = np.random.default_rng(seed)
    c = config

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight(n):
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    w = {"model.embed_tokens.weight": normal((c.vocab_size, c.hidden_size), 0.1)}
    shapes = c.projection_shapes()
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        w[pre + "input_layernorm.weight"] = norm_weight(c.hidden_size)
        for p in PROJECTIONS:
            mod = "self_attn" if p in PROJECTIONS[:4] else "mlp"
            w[f"{pre}{mod}.{p}.weight"] = normal(shapes[p], 0.05)
        for p in c.bias_names():
            w[f"{pre}self_attn.{p}.bias"] = normal((shapes[p][0],), 0.05)
        if c.qk_norm:
            w[pre + "self_attn.q_norm.weight"] = norm_weight(c.head_dim)
            w[pre + "self_attn.k_norm.weight"] = norm_weight(c.head_dim)
        w[pre + "post_attention_layernorm.weight"] = norm_weight(c.hidden_size)
    w["model.norm.weight"] = norm_weight(c.hidden_size)
    if not c.tie_word_embeddings:
        w["lm_head.weight"] = normal((c.vocab_size, c.hidden_size), 0.1)
    return w


def tiny_tokenizer_json(vocab_size: int = 101) -> str:
    """A character-level BPE over printable ASCII with a few merges, as tokenizer.json text."""
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    chars = [chr(i) for i in range(32, 127)]
    merges = [("t", "h"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n")]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    for a, b in merges:
        if len(vocab) >= vocab_size:
            break
        vocab[a + b] = len(vocab)
    merges = [m for m in merges if m[0] + m[1] in vocab]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<|endoftext|>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok.to_str()


def make_tiny_checkpoint(dir, model_type: str = "qwen3", seed: int = 0, dtype: str = "float32",
                         sharded: bool = False, tie_word_embeddings: bool | None = None, **overrides) -> str:
    """Write a tiny random HF checkpoint into `dir` and return the directory path.

    dtype: stored precision ("float32" | "bfloat16" | "float16"); sharded: 3 shards + index.
    overrides: any ModelConfig field (hidden_size=..., rope_scaling=..., ...)."""
    d = os.fspath(dir)
    os.makedirs(d, exist_ok=True)
    config = tiny_config(model_type, tie_word_embeddings, **overrides)
    weights = tiny_weights(config, seed)
    cfg = config.to_hf()
    cfg["torch_dtype"] = dtype
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if sharded:
        names = list(weights)
        parts = np.array_split(np.arange(len(names)), 3)
        n = len(parts)
        weight_map, total = {}, 0
        for k, idx in enumerate(parts):
            fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            part = {names[i]: weights[names[i]] for i in idx}
            save_file(part, os.path.join(d, fname), metadata={"format": "pt"}, dtype=dtype)
            weight_map.update({name: fname for name in part})
            total += sum(a.size for a in part.values()) * (4 if dtype == "float32" else 2)
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    else:
        save_file(weights, os.path.join(d, "model.safetensors"), metadata={"format": "pt"}, dtype=dtype)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        f.write(tiny_tokenizer_json(config.vocab_size))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)
    return d


# ---- GGUF writing (test side only; the package reads GGUF, it never writes it) ----

def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_value(v) -> bytes:
    """Encode a metadata value with its type id: bool, int (u32 or i64), float (f32), str,
    or a list of str / ints (i32) / floats (f32)."""
    if isinstance(v, bool):
        return struct.pack("<IB", 7, int(v))
    if isinstance(v, int):
        return struct.pack("<II", 4, v) if 0 <= v < 2**32 else struct.pack("<Iq", 11, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _gguf_string(v)
    if isinstance(v, (list, tuple)):
        if all(isinstance(x, str) for x in v):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_gguf_string(x) for x in v)
        if all(isinstance(x, int) for x in v):
            return struct.pack("<IIQ", 9, 5, len(v)) + np.asarray(v, "<i4").tobytes()
        return struct.pack("<IIQ", 9, 6, len(v)) + np.asarray(v, "<f4").tobytes()
    raise TypeError(f"cannot encode {type(v).__name__} as GGUF metadata")


def write_gguf(path, metadata: dict, tensors: dict, alignment: int = 32, version: int = 3) -> str:
    """tensors: {name: (ggml type name, numpy shape, raw bytes)}; shape row-major as numpy."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for k, v in metadata.items():
        head += _gguf_string(k) + _gguf_value(v)
    infos, blobs, off = b"", [], 0
    for name, (tname, shape, raw) in tensors.items():
        dims = tuple(reversed(shape))
        infos += _gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", x) for x in dims)
        infos += struct.pack("<IQ", GGML_TYPE_IDS[tname], off)
        blobs.append(raw)
        off += len(raw) + (-len(raw) % alignment)
    body = head + infos
    body += b"\0" * (-len(body) % alignment)
    with open(path, "wb") as f:
        f.write(body)
        for raw in blobs:
            f.write(raw)
            f.write(b"\0" * (-len(raw) % alignment))
    return os.fspath(path)


def quantize_q8_0(x: np.ndarray) -> bytes:
    """Reference Q8_0: blocks of 32, d = absmax / 127 (as f16), q = round(x / d)."""
    b = np.asarray(x, np.float32).reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    d = (amax / 127.0).astype(np.float16)
    inv = np.where(d.astype(np.float32) > 0, 1.0 / np.maximum(d.astype(np.float32), 1e-30), 0.0)
    q = np.clip(np.rint(b * inv), -127, 127).astype(np.int8)
    out = np.empty((b.shape[0], 34), np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


def gguf_from_hf(hf_dir, path, tensor_type: str = "F32", rope_freqs: np.ndarray | None = None,
                 extra_metadata: dict | None = None) -> str:
    """Convert a tiny HF checkpoint to GGUF as llama.cpp would (names, Q/K row permutation
    for llama, config in metadata; no tokenizer).  Projections are
    stored as `tensor_type` (F32, F16 or Q8_0); norms stay F32."""
    from qlora_ext.model.safetensors_io import SafetensorsFile

    config = ModelConfig.from_file(os.path.join(hf_dir, "config.json"))
    arch = config.model_type
    md = {"general.architecture": arch, "general.alignment": 32,
          f"{arch}.block_count": config.num_hidden_layers,
          f"{arch}.context_length": config.max_position_embeddings,
          f"{arch}.embedding_length": config.hidden_size,
          f"{arch}.feed_forward_length": config.intermediate_size,
          f"{arch}.attention.head_count": config.num_attention_heads,
          f"{arch}.attention.head_count_kv": config.num_key_value_heads,
          f"{arch}.attention.key_length": config.head_dim,
          f"{arch}.attention.value_length": config.head_dim,
          f"{arch}.rope.freq_base": float(config.rope_theta),
          f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
          f"{arch}.vocab_size": config.vocab_size}
    inverse = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
    layer_map = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                 "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
                 "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    tensors = {}
    with SafetensorsFile(os.path.join(hf_dir, "model.safetensors")) as f:
        for name in f.keys():
            w = f.get(name)
            if name in inverse:
                g = inverse[name]
            else:
                _, _, i, rest = name.split(".", 3)
                g = f"blk.{i}.{layer_map[rest]}"
            if arch == "llama" and rest_is_qk(name):
                n_head = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
                w = _permute_qk(w, n_head)
            if w.ndim == 2 and name.endswith("_proj.weight") and tensor_type != "F32":
                raw = w.astype("<f2").tobytes() if tensor_type == "F16" else quantize_q8_0(w)
                tensors[g] = (tensor_type, w.shape, raw)
            else:
                tensors[g] = ("F32", w.shape, np.ascontiguousarray(w, "<f4").tobytes())
    md.update(extra_metadata or {})
    if rope_freqs is not None:  # llama.cpp's form of llama3 RoPE scaling: per-frequency divisors
        tensors["rope_freqs.weight"] = ("F32", rope_freqs.shape, np.ascontiguousarray(rope_freqs, "<f4").tobytes())
    return write_gguf(path, md, tensors)


def rest_is_qk(name: str) -> bool:
    return ".self_attn.q_proj." in name or ".self_attn.k_proj." in name


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion order: each head's two halves interleaved row by row."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

