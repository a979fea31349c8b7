"""Write a synthetic, random-weight HF checkpoint of a real model's shape (sharded safetensors,
bf16 by default) for loading benchmarks, without torch.

    python bench/make_checkpoint.py /tmp/qwen3-4b-synth --shape qwen3-4b      # ~8 GB, 9 shards

Values are N(0, 0.02) rounded to bf16; to keep generation cheap each tensor repeats a pool
of 16M random values from a random start (loading cost does not depend on the values)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from qlora_ext.model.config import ModelConfig  # noqa: E402
from qlora_ext.model.lora import PROJECTIONS  # noqa: E402
from qlora_ext.model.safetensors_io import f32_to_bf16_bits, save_file  # noqa: E402

SHAPES = {
    # the published config.json values of these models
    "qwen3-4b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                     tie_word_embeddings=True, qk_norm=True, bos_token_id=151643, eos_token_id=151645),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                     tie_word_embeddings=False, qk_norm=True, bos_token_id=151643, eos_token_id=151645),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                      tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    # a small stand-in with the same structure, for CI (~60 MB)
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                       tie_word_embeddings=True, qk_norm=True, bos_token_id=None, eos_token_id=151645),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "qwen3-mini": dict(model_type="qwen3", vocab_size=8192, hidden_size=512, intermediate_size=1408,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=4096,
                       tie_word_embeddings=True, qk_norm=True, bos_token_id=1, eos_token_id=2),
}


def tensor_shapes(c: ModelConfig) -> list:
    """[(HF name, shape)] in the order transformers saves them."""
    out = [("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))]
    shapes = c.projection_shapes()
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        out.append((pre + "input_layernorm.weight", (c.hidden_size,)))
        for p in PROJECTIONS:
            out.append((f"{pre}{'self_attn' if p in PROJECTIONS[:4] else 'mlp'}.{p}.weight", shapes[p]))
        for p in c.bias_names():
            out.append((f"{pre}self_attn.{p}.bias", (shapes[p][0],)))
        if c.qk_norm:
            out.append((pre + "self_attn.q_norm.weight", (c.head_dim,)))
            out.append((pre + "self_attn.k_norm.weight", (c.head_dim,)))
        out.append((pre + "post_attention_layernorm.weight", (c.hidden_size,)))
    out.append(("model.norm.weight", (c.hidden_size,)))
    if not c.tie_word_embeddings:
        out.append(("lm_head.weight", (c.vocab_size, c.hidden_size)))
    return out


def make_checkpoint(out_dir: str, shape: str = "qwen3-4b", shard_bytes: int = 1 << 30, seed: int = 0,
                    dtype: str = "bfloat16", verbose: bool = True) -> str:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    c = ModelConfig(**SHAPES[shape])
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 24) * 0.02).astype(np.float32)
    pool = f32_to_bf16_bits(pool) if dtype == "bfloat16" else pool.astype(np.float16)
    itemsize = 2
    # group tensors into shards of at most shard_bytes (a bigger tensor gets its own)
    shards, cur, cur_bytes = [], [], 0
    for name, shp in tensor_shapes(c):
        nb = int(np.prod(shp)) * itemsize
        if cur and cur_bytes + nb > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shp))
        cur_bytes += nb
    shards.append(cur)
    weight_map, total, t0 = {}, 0, time.time()
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shp in group:
            if len(shp) == 1:  # norms: near 1, as trained models have
                w = np.full(shp, 1.0, np.float32)
                tensors[name] = f32_to_bf16_bits(w) if dtype == "bfloat16" else w.astype(np.float16)
            else:
                start = int(rng.integers(pool.shape[0]))
                tensors[name] = np.resize(np.roll(pool, -start), shp)
            total += tensors[name].nbytes
            weight_map[name] = fname
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"},
                  dtype="bfloat16" if dtype == "bfloat16" else None)
        del tensors
        if verbose:
            print(f"  {fname} ({time.time() - t0:.1f} s)", flush=True)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    cfg = c.to_hf()
    cfg["torch_dtype"] = dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if verbose:
        print(f"wrote {out_dir}: {shape}, {total / 1e9:.2f} GB in {len(shards)} shards, {time.time() - t0:.1f} s")
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--shape", default="qwen3-4b", choices=sorted(SHAPES))
    ap.add_argument("--shard-gb", type=float, default=1.0, help="maximum shard size in GiB")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    make_checkpoint(a.out_dir, a.shape, int(a.shard_gb * (1 << 30)), a.seed, a.dtype)


if __name__ == "__main__":
    main()
