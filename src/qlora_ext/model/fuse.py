"""Fuse a LoRA adapter into its base: W' = W + scale · B A (scale = alpha / r, rsLoRA
alpha / sqrt(r)), written as an HF directory that transformers loads and/or a GGUF file
that llama.cpp runs.

The merge reads the base checkpoint's own tensors (bf16 stays bf16: only the adapted
projections change, rounded once after the sum in float64), not the NF4 copy the model
trained on, unless `dequantize=True` asks for the NF4 round trip of each projection
(quantized exactly as load_model quantizes it)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from ..nf4 import dequantize_nf4, quantize_nf4
from .config import ModelConfig
from .lora import PROJECTIONS, LoraWeights, load_peft_adapter
from .safetensors_io import SafetensorsFile, save_file

DEFAULT_MAX_SHARD_SIZE = 5 * 2**30  # transformers' save_pretrained default ("5GB")
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# files of an HF model directory that describe the tokenizer and generation (never code)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def _module(proj: str) -> str:
    return "self_attn" if proj in PROJECTIONS[:4] else "mlp"


def projection_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{_module(proj)}.{proj}.weight"


class BaseCheckpoint:
    """The base model's tensors by HF name, as stored: an HF directory or a .gguf file (or a
    name resolve_model_path knows).  `names` is the checkpoint's order, `dtype` the stored
    float type the fused output keeps ("float32" for quantized GGUF tensors)."""

    def __init__(self, path, revision: str | None = None):
        from .loading import _StateBuilder, _shard_files, config_from_gguf, gguf_to_hf_name, resolve_model_path

        self.path = resolve_model_path(path, revision=revision)
        self._files, self._gguf, self.where, self.shapes = [], None, {}, {}
        if os.path.isdir(self.path):
            cpath = os.path.join(self.path, "config.json")
            self.config = ModelConfig.from_file(cpath)
            with open(cpath, encoding="utf-8") as f:
                self.config_json = json.load(f)
            check = _StateBuilder(self.config, None, False, 64, None)
            self._files = [SafetensorsFile(s) for s in _shard_files(self.path)]
            for f in self._files:
                for name in f.keys():
                    info = f.info(name)
                    if check.wants(name, info["shape"], f.path):
                        self.where[name] = (f, _DTYPES[info["dtype"]])
                        self.shapes[name] = tuple(info["shape"])
            proj = self.where[projection_name(0, "q_proj")][1] if self.where else "float32"
            self.dtype = proj
        else:
            from .gguf import GGUFFile

            self._gguf = GGUFFile(self.path)
            self.config = config_from_gguf(self._gguf)
            self.config_json = dict(self.config.to_hf())
            check = _StateBuilder(self.config, None, False, 64, None)
            types = set()
            for gname in self._gguf.keys():
                if gname == "rope_freqs.weight":  # carried by config.rope_scaling
                    continue
                t = self._gguf.info(gname)
                hf = gguf_to_hf_name(gname)
                if hf is None:
                    raise ValueError(f"{self.path}: unexpected tensor {gname!r} for architecture "
                                     f"{self.config.model_type}")
                if check.wants(hf, t.shape, f"{self.path}: tensor {gname!r}"):
                    self.where[hf] = (gname, t.type_name)
                    self.shapes[hf] = tuple(t.shape)
                    if hf.endswith("_proj.weight"):
                        types.add(t.type_name)
            self.dtype = {"F16": "float16", "BF16": "bfloat16"}.get(types.pop(), "float32") \
                if len(types) == 1 else "float32"
            self.config_json["torch_dtype"] = self.dtype
        missing = [n for n in check.expected if n not in self.where]
        if missing:
            raise ValueError(f"{self.path}: missing tensor(s) {', '.join(missing[:5])}")

    @property
    def names(self) -> list:
        return list(self.where)

    def get(self, name: str) -> np.ndarray:
        """float32 copy of a tensor in HF layout (llama Q/K rows un-permuted for GGUF)."""
        if self._gguf is None:
            return self.where[name][0].get(name)
        from .gguf import unpermute_qk

        w = self._gguf.get(self.where[name][0])
        if self.config.model_type == "llama" and (".q_proj." in name or ".k_proj." in name):
            c = self.config
            w = unpermute_qk(w, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
        return np.ascontiguousarray(w, dtype=np.float32)

    def tokenizer(self):
        from .tokenizer import Tokenizer

        if self._gguf is None:
            ok = os.path.isfile(os.path.join(self.path, "tokenizer.json"))
            return Tokenizer.from_dir(self.path) if ok else None
        if "tokenizer.ggml.model" not in self._gguf.metadata:
            return None
        return Tokenizer.from_gguf_metadata(self._gguf.metadata, source=self.path)

    @property
    def gguf_metadata(self) -> dict | None:
        return None if self._gguf is None else self._gguf.metadata

    def close(self) -> None:
        for f in self._files:
            f.close()
        if self._gguf is not None:
            self._gguf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def merge(w: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float) -> np.ndarray:
    """W + scale · B A, summed in float64 and rounded once to float32.  w [out, in], A [r, in],
    B [out, r]."""
    if A.shape[1] != w.shape[1] or B.shape[0] != w.shape[0] or A.shape[0] != B.shape[1]:
        raise ValueError(f"LoRA A {A.shape} / B {B.shape} do not fit a weight of shape {w.shape}")
    delta = B.astype(np.float64) @ A.astype(np.float64)
    return (w.astype(np.float64) + float(scale) * delta).astype(np.float32)


class FusedTensors:
    """The fused model's tensors by HF name (computed one at a time on `get`)."""

    def __init__(self, base: BaseCheckpoint, lora: LoraWeights, lm_head=None, dequantize: bool = False,
                 blocksize: int = 64, double_quant: bool = False):
        self.base, self.lora, self.lm_head = base, lora, lm_head
        self.dequantize, self.blocksize, self.double_quant = dequantize, blocksize, double_quant
        c = base.config
        self.tie_word_embeddings = c.tie_word_embeddings and lm_head is None
        self.shapes = dict(base.shapes)
        if lm_head is not None:
            self.shapes["lm_head.weight"] = tuple(lm_head.shape)
        self._pairs = {projection_name(l, p): pair for (l, p), pair in lora.pairs.items()}
        for name in self._pairs:
            if name not in self.shapes:
                raise ValueError(f"the adapter adapts {name}, which the base {base.path} does not have")

    @property
    def names(self) -> list:
        return list(self.shapes)

    def get(self, name: str) -> np.ndarray:
        if name == "lm_head.weight" and self.lm_head is not None:
            return np.ascontiguousarray(self.lm_head, dtype=np.float32)
        w = self.base.get(name)
        pair = self._pairs.get(name)
        if pair is None:
            return w
        if self.dequantize:
            w = dequantize_nf4(quantize_nf4(w, blocksize=self.blocksize, double_quant=self.double_quant))
        return merge(w, pair.A, pair.B, pair.scale)

    def config_json(self) -> dict:
        cfg = dict(self.base.config_json)
        cfg["tie_word_embeddings"] = self.tie_word_embeddings
        return cfg


def shard_plan(shapes: dict, itemsize: int, max_shard_size: int) -> list:
    """[[names of shard 1], ...]: tensors in order, a new shard when the next one would pass
    max_shard_size bytes (a tensor larger than the limit gets a shard of its own)."""
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be >= 1 byte, got {max_shard_size}")
    shards, size = [[]], 0
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_hf_dir(out, fused: FusedTensors, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> str:
    """Write config.json, model.safetensors (or shards + model.safetensors.index.json) in the
    base's dtype, and the tokenizer files, into a new directory `out` (atomically: a temp
    directory renamed at the end).  `out` must not exist or be empty."""
    out = os.fspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise OSError(f"{out}: already exists and is not an empty directory (fuse writes a new model directory)")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)  # mode from the umask, as the directory it becomes
    try:
        dtype = fused.base.dtype
        plan = shard_plan(fused.shapes, _ITEMSIZE[dtype], max_shard_size)
        weight_map, total = {}, 0
        for k, names in enumerate(plan):
            fname = "model.safetensors" if len(plan) == 1 else f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
            part = {n: fused.get(n) for n in names}
            save_file(part, os.path.join(tmp, fname), metadata={"format": "pt"}, dtype=dtype)
            total += sum(a.size for a in part.values()) * _ITEMSIZE[dtype]
            weight_map.update({n: fname for n in names})
            del part
        if len(plan) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(fused.config_json(), f, indent=2)
        _write_tokenizer_files(fused.base, tmp)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_tokenizer_files(base: BaseCheckpoint, d: str) -> None:
    if base.gguf_metadata is None:
        for name in TOKENIZER_FILES:
            src = os.path.join(base.path, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(d, name))
        return
    tok = base.tokenizer()
    if tok is None:
        return
    tok.backend.save(os.path.join(d, "tokenizer.json"))

    def token(i):
        i = i[0] if isinstance(i, (list, tuple)) else i
        return None if i is None else tok.id_to_token(int(i))

    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(tok.bos_token_id),
           "eos_token": token(tok.eos_token_id), "pad_token": token(tok.pad_token_id),
           "chat_template": tok.chat_template}
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in cfg.items() if v is not None}, f, indent=2)


def adapter_for(adapter, config: ModelConfig, where: str):
    """(LoraWeights, trained LM head or None) from a PEFT directory or LoraWeights."""
    if isinstance(adapter, LoraWeights):
        return adapter, None
    if adapter is None:
        raise ValueError("fuse needs an adapter (a PEFT adapter directory)")
    shapes = [config.projection_shapes() for _ in range(config.num_hidden_layers)]
    try:
        return load_peft_adapter(os.fspath(adapter), shapes, lm_head_shape=(config.vocab_size, config.hidden_size))
    except ValueError as e:
        raise ValueError(f"{e} (base {where})") from None


def fuse(model, adapter=None, out=None, *, gguf=None, outtype: str = "f16", dequantize: bool = False,
         revision: str | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
         blocksize: int = 64, double_quant: bool = False) -> dict:
    """Merge `adapter` into the base `model` and write it.

    model: a path, hub id or known name of the base checkpoint, or a loaded qlora_ext Model
    (its checkpoint on disk is re-read; its adapters, trained LM head, NF4 block size and
    double quant are used unless `adapter` is given).  adapter: a PEFT adapter directory or
    LoraWeights.  out: a new HF directory; gguf: a .gguf file (outtype f32|f16|bf16|q8_0).
    dequantize: merge into the NF4 round trip of each projection (what the model trained
    against) instead of the checkpoint's weights.  Returns {"out": dir or None, "gguf": file
    or None}."""
    if out is None and gguf is None:
        raise ValueError("fuse needs out=DIR and/or gguf=FILE to write to")
    lm_head = None
    if hasattr(model, "state") and hasattr(model, "lora"):  # a loaded Model
        if adapter is None:
            model.parameters()  # a GPU placement's model refreshes its host copy here
            adapter, lm_head = model.lora, model.lm_head
        blocksize, double_quant = model.state.blocksize, model.state.double_quant
        source = model.state.source
        if not source:
            raise ValueError("this model was not loaded from a checkpoint on disk; fuse needs the base's "
                             "original weights (Model.fuse() without out returns the fused arrays instead)")
        model = source
    if gguf is not None:
        from .gguf_export import check_outtype

        check_outtype(outtype)
    with BaseCheckpoint(model, revision=revision) as base:
        lora, head = adapter_for(adapter, base.config, base.path)
        fused = FusedTensors(base, lora, lm_head if lm_head is not None else head, dequantize=dequantize,
                             blocksize=blocksize, double_quant=double_quant)
        result = {"out": None, "gguf": None}
        if out is not None:
            result["out"] = write_hf_dir(out, fused, max_shard_size=max_shard_size)
        if gguf is not None:
            from .gguf_export import write_model_gguf

            result["gguf"] = write_model_gguf(gguf, fused, outtype=outtype)
    return result


def fused_projections(model) -> dict:
    """{HF name: float32 fused weight} for every adapted projection of a loaded Model, from
    the model's own base (the NF4 dequantization when it holds NF4)."""
    model.parameters()  # refresh a GPU placement's model's host copy
    out = {}
    for (l, proj), pair in sorted(model.lora.pairs.items(), key=lambda kv: (kv[0][0], PROJECTIONS.index(kv[0][1]))):
        w = model.state.layers[l].weight(proj)
        out[projection_name(l, proj)] = merge(w, pair.A, pair.B, pair.scale)
    return out

