"""GGUF files for llama.cpp, written with the `gguf` package's GGUFWriter: a fused model
(write_model_gguf) and a LoRA adapter (write_adapter_gguf, llama.cpp's `--lora` form), and
the adapter read back (read_adapter_gguf, through our own GGUF reader).

Conventions as llama.cpp's converters write them: tensor names `token_embd`, `blk.N.attn_q`,
... (loading.hf_to_gguf_name); llama's Q/K rows permuted (gguf.permute_qk), for an adapter
the rows of lora_b; 1-D tensors (norms, biases) stay F32; q8_0 falls back to F16 for rows
that are not a multiple of 32; llama3 RoPE scaling as the `rope_freqs.weight` divisors.
An adapter GGUF has general.type "adapter", adapter.type "lora", adapter.lora.alpha, and
per adapted weight `<name>.lora_a` [r, in] and `<name>.lora_b` [out, r] (numpy shapes);
llama.cpp scales by alpha / r, so an rsLoRA adapter is written with alpha · sqrt(r)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re

import numpy as np

from .config import ModelConfig
from .lora import PROJECTIONS, LoraConfig, LoraPair, LoraWeights

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ADAPTER_OUTTYPES = ("f32", "f16", "bf16")
_Q8_BLOCK = 32


def _gguf():
    try:
        import gguf
    except ImportError:
        raise OSError("writing GGUF needs the gguf package: pip install 'qlora_ext[gguf]'") from None
    return gguf


def check_outtype(outtype: str, allowed=OUTTYPES) -> None:
    if outtype not in allowed:
        raise ValueError(f"GGUF outtype must be one of {', '.join(allowed)}, got {outtype!r}")


def _kind(shape: tuple, outtype: str) -> str:
    """The stored type of a tensor: 1-D tensors stay F32 (as llama.cpp's converter keeps
    them), q8_0 falls back to f16 for rows that do not split into 32-element blocks."""
    if len(shape) == 1 or outtype == "f32":
        return "f32"
    if outtype == "q8_0" and shape[-1] % _Q8_BLOCK:
        return "f16"
    return outtype


def _encode(gguf, w: np.ndarray, kind: str) -> np.ndarray:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if kind == "f32":
        return w
    if kind == "f16":
        return w.astype(np.float16)
    Q = gguf.GGMLQuantizationType
    return gguf.quants.quantize(w, Q.Q8_0 if kind == "q8_0" else Q.BF16)


def _tensor_info(gguf, shape: tuple, kind: str) -> tuple:
    """(shape, numpy dtype, bytes, ggml type or None) of the encoded tensor, without its data,
    in the form GGUFWriter.add_tensor_info takes (quantized types by their byte shape)."""
    n = int(np.prod(shape, dtype=np.int64))
    if kind in ("f32", "f16"):
        dtype = np.dtype(np.float32 if kind == "f32" else np.float16)
        return tuple(shape), dtype, n * dtype.itemsize, None
    qtype = gguf.GGMLQuantizationType.Q8_0 if kind == "q8_0" else gguf.GGMLQuantizationType.BF16
    byte_shape = gguf.quants.quant_shape_to_byte_shape(tuple(shape), qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape, dtype=np.int64)), qtype


@contextlib.contextmanager
def _new_file(gguf, path: str, arch: str):
    """A GGUFWriter onto path + ".tmp", renamed to `path` by _write; removed on an error."""
    writer = gguf.GGUFWriter(path + ".tmp", arch)
    try:
        yield writer
    except BaseException:
        writer.close()
        if os.path.exists(path + ".tmp"):
            os.unlink(path + ".tmp")
        raise


def _write(writer, gguf, path: str, tensors: list, outtype: str) -> str:
    """tensors: [(GGUF name, shape, callable -> float32 array)].  The tensor table is written
    first and each tensor's data as it is computed, so one tensor at a time is in memory."""
    plan = []
    for name, shape, produce in tensors:
        kind = _kind(tuple(shape), outtype)
        tshape, dtype, nbytes, qtype = _tensor_info(gguf, tuple(shape), kind)
        writer.add_tensor_info(name, tshape, dtype, nbytes, raw_dtype=qtype)
        plan.append((name, produce, kind, nbytes))
    writer.write_header_to_file(path + ".tmp")
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, produce, kind, nbytes in plan:
        data = _encode(gguf, produce(), kind)
        if data.nbytes != nbytes:
            raise ValueError(f"{path}: tensor {name!r} came out with {data.nbytes} bytes, its table entry says {nbytes}")
        writer.write_tensor_data(data)
    writer.close()
    os.replace(path + ".tmp", path)
    return path


def _file_type(gguf, outtype: str) -> int:
    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[outtype]


def _add_hparams(writer, gguf, c: ModelConfig) -> None:
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    if c.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
    elif c.rope_type == "llama3":  # the divisors are the rope_freqs tensor; the context lets readers check them
        writer.add_rope_scaling_orig_ctx_len(int(c.rope_scaling["original_max_position_embeddings"]))
    elif c.rope_type != "default":
        raise ValueError(f"rope_scaling type {c.rope_type!r} has no GGUF form here (linear and llama3 do)")


def _rope_freqs(c: ModelConfig) -> np.ndarray:
    """llama3 scaling as llama.cpp stores it: per-frequency divisors of the inverse frequencies."""
    from .rope_freq import rope_inv_freq

    return (rope_inv_freq(c.head_dim, c.rope_theta) / rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
            ).astype(np.float32)


# ---- tokenizer metadata ----

def _typed(gguf, value):
    """(value, GGUFValueType, element type) of a metadata value as our reader returns it."""
    T = gguf.GGUFValueType
    if isinstance(value, bool):
        return value, T.BOOL, None
    if isinstance(value, int):
        return value, T.UINT32 if 0 <= value < 2**32 else T.INT64, None
    if isinstance(value, float):
        return value, T.FLOAT32, None
    if isinstance(value, str):
        return value, T.STRING, None
    if isinstance(value, np.ndarray):
        sub = {np.dtype(np.int32): T.INT32, np.dtype(np.uint32): T.UINT32, np.dtype(np.float32): T.FLOAT32,
               np.dtype(bool): T.BOOL, np.dtype(np.int64): T.INT64, np.dtype(np.uint8): T.UINT8}.get(value.dtype)
        if sub is None:
            raise ValueError(f"GGUF metadata array of {value.dtype} cannot be copied")
        return value.tolist(), T.ARRAY, sub
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value, T.ARRAY, T.STRING
    raise ValueError(f"GGUF metadata value of type {type(value).__name__} cannot be copied")


def _pre_tokenizer_name(pre: dict | None, where: str) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json pre_tokenizer
    (the split regex decides; the names are those our GGUF reader rebuilds)."""
    from .tokenizer import _DIGITS_THEN_GPT2, _SPLITS

    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's spelling; it rejects "gpt2"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in _SPLITS.items():
            if regex == split:
                return name
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return _DIGITS_THEN_GPT2[0]
    raise ValueError(f"{where}: the tokenizer's pre-tokenizer {kinds} has no llama.cpp name known here "
                     "(byte-level BPE with the GPT-2, Llama 3, Qwen2 or SmolLM split is); write an HF "
                     "directory (--out) and convert it with llama.cpp's convert_hf_to_gguf.py")


def _hf_tokenizer_metadata(gguf, tok, vocab_size: int, where: str) -> list:
    """[(key, value, type, element type)] for a byte-level BPE tokenizer.json."""
    T, TT = gguf.GGUFValueType, gguf.TokenType
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: tokenizer model {model.get('type')!r} has no GGUF form here (BPE has)")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), where)
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]  # llama.cpp's filler for ids the vocabulary skips
    types = [int(TT.UNUSED)] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, int(TT.NORMAL)
    for added in spec.get("added_tokens", []):
        types[added["id"]] = int(TT.CONTROL if added.get("special") else TT.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    md = [("tokenizer.ggml.model", "gpt2", T.STRING, None), ("tokenizer.ggml.pre", pre, T.STRING, None),
          ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
          ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
          ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)]
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "padding": tok.pad_token_id}
    for key, i in ids.items():
        i = i[0] if isinstance(i, (list, tuple)) else i
        if i is not None:
            md.append((f"tokenizer.ggml.{key}_token_id", int(i), T.UINT32, None))
    bos = tok.bos_token_id
    adds_bos = bos is not None and tok.encode("a", add_special_tokens=True)[:1] == [bos] \
        and tok.encode("a")[:1] != [bos]
    md.append(("tokenizer.ggml.add_bos_token", bool(adds_bos), T.BOOL, None))
    if tok.chat_template:
        md.append(("tokenizer.chat_template", tok.chat_template, T.STRING, None))
    return md


def tokenizer_metadata(gguf, base) -> list:
    """The base's tokenizer as GGUF metadata: copied from a GGUF base, built from an HF
    directory's tokenizer.json; [] when the base has no tokenizer."""
    src = base.gguf_metadata
    if src is not None:
        return [(k, *_typed(gguf, v)) for k, v in src.items() if k.startswith("tokenizer.")]
    tok = base.tokenizer()
    return [] if tok is None else _hf_tokenizer_metadata(gguf, tok, base.config.vocab_size, base.path)


# ---- files ----

def _gguf_weight(name: str, w: np.ndarray, c: ModelConfig) -> np.ndarray:
    from .gguf import permute_qk

    if c.model_type == "llama" and (".q_proj." in name or ".k_proj." in name):
        return permute_qk(w, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
    return w


def write_model_gguf(path, fused, outtype: str = "f16") -> str:
    """The fused model (a fuse.FusedTensors) as one GGUF file llama.cpp runs."""
    from .loading import hf_to_gguf_name

    gguf = _gguf()
    check_outtype(outtype)
    path = os.fspath(path)
    c = fused.base.config
    with _new_file(gguf, path, c.model_type) as writer:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(os.path.basename(os.path.normpath(fused.base.path)))
        writer.add_file_type(_file_type(gguf, outtype))
        if outtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, gguf, c)
        for key, value, vtype, sub in tokenizer_metadata(gguf, fused.base):
            writer.add_key_value(key, value, vtype, sub)
        tensors = [("rope_freqs.weight", (c.head_dim // 2,), lambda: _rope_freqs(c))] if c.rope_type == "llama3" else []
        tensors += [(hf_to_gguf_name(n), fused.shapes[n], lambda n=n: _gguf_weight(n, fused.get(n), c))
                    for n in fused.names]
        return _write(writer, gguf, path, tensors, outtype)


def write_adapter_gguf(path, lora: LoraWeights, config: ModelConfig, outtype: str = "f32",
                       lm_head=None) -> str:
    """A LoRA adapter in llama.cpp's adapter GGUF form (`llama-cli --lora FILE`)."""
    from .loading import hf_to_gguf_name
    from .fuse import projection_name

    gguf = _gguf()
    check_outtype(outtype, ADAPTER_OUTTYPES)
    if lm_head is not None:
        raise ValueError("the adapter trains the LM head (modules_to_save), which llama.cpp's LoRA adapters "
                         "cannot hold; fuse it into the model instead (qlora-ext fuse --gguf)")
    path = os.fspath(path)
    lc = lora.config
    alpha = float(lc.alpha) * (math.sqrt(lc.r) if lc.use_rslora else 1.0)
    with _new_file(gguf, path, config.model_type) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        tensors = []
        for (l, proj), pair in sorted(lora.pairs.items(), key=lambda kv: (kv[0][0], PROJECTIONS.index(kv[0][1]))):
            hf = projection_name(l, proj)
            g = hf_to_gguf_name(hf)
            tensors.append((g + ".lora_a", pair.A.shape, lambda p=pair: p.A))
            tensors.append((g + ".lora_b", pair.B.shape, lambda p=pair, hf=hf: _gguf_weight(hf, p.B, config)))
        return _write(writer, gguf, path, tensors, outtype)


_LORA_NAME = re.compile(r"^(blk\.\d+\.[a-z_]+\.weight)\.lora_([ab])$")


def read_adapter_gguf(path, config: ModelConfig) -> LoraWeights:
    """An adapter GGUF (llama.cpp's LoRA form) -> LoraWeights for a model of `config`, with
    scale alpha / r as llama.cpp applies it."""
    from .gguf import GGUFFile, unpermute_qk
    from .loading import gguf_to_hf_name

    path = os.fspath(path)
    found = {}
    with GGUFFile(path) as g:
        md = g.metadata
        if md.get("general.type") != "adapter" or md.get("adapter.type") != "lora":
            raise ValueError(f"{path}: not a LoRA adapter GGUF (general.type {md.get('general.type')!r}, "
                             f"adapter.type {md.get('adapter.type')!r})")
        if md.get("general.architecture") != config.model_type:
            raise ValueError(f"{path}: adapter for architecture {md.get('general.architecture')!r}, the model is "
                             f"{config.model_type!r}")
        alpha = md.get("adapter.lora.alpha")
        for name in g.keys():
            m = _LORA_NAME.match(name)
            hf = gguf_to_hf_name(m.group(1)) if m else None
            parts = hf.split(".") if hf else []
            if len(parts) != 6 or parts[4] not in PROJECTIONS:
                raise ValueError(f"{path}: unexpected tensor {name!r}; expected blk.N.<projection>.weight.lora_a/_b")
            l, proj = int(parts[2]), parts[4]
            if l >= config.num_hidden_layers:
                raise ValueError(f"{path}: tensor {name!r} is for layer {l}; the model has {config.num_hidden_layers}")
            w = g.get(name)
            if m.group(2) == "b" and config.model_type == "llama" and proj in ("q_proj", "k_proj"):
                w = unpermute_qk(w, config.num_attention_heads if proj == "q_proj" else config.num_key_value_heads)
            found.setdefault((l, proj), {})[m.group(2)] = np.ascontiguousarray(w, dtype=np.float32)
    if not found:
        raise ValueError(f"{path}: no LoRA tensors")
    shapes = config.projection_shapes()
    ranks = set()
    for (l, proj), ab in found.items():
        if set(ab) != {"a", "b"}:
            raise ValueError(f"{path}: layer {l} {proj} has lora_{''.join(ab)} but not both a and b")
        r = ab["a"].shape[0]
        out_f, in_f = shapes[proj]
        if ab["a"].shape != (r, in_f) or ab["b"].shape != (out_f, r):
            raise ValueError(f"{path}: layer {l} {proj}: lora_a {ab['a'].shape} / lora_b {ab['b'].shape} do not "
                             f"fit a [{out_f}, {in_f}] weight")
        ranks.add(r)
    if len(ranks) != 1:
        raise ValueError(f"{path}: adapters of several ranks {sorted(ranks)} (one rank is supported)")
    r = ranks.pop()
    lc = LoraConfig(r=r, alpha=float(alpha if alpha else r), target_modules=tuple({p for _, p in found}))
    return LoraWeights(lc, {k: LoraPair(ab["a"], ab["b"], lc.scale) for k, ab in found.items()})
