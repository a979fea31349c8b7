"""Tokenizer: a `tokenizers.Tokenizer` plus special ids and the chat template.

Built from an HF directory (tokenizer.json + tokenizer_config.json) or from a GGUF file's
vocabulary (tokenizer.ggml.*).  The chat template is rendered by a sandboxed Jinja2
environment; nothing else from a model directory is ever executed."""
from __future__ import annotations

import json
import os

import numpy as np

from .chat_template import ChatTemplate

# Pre-tokenizer split patterns keyed by GGUF `tokenizer.ggml.pre` (how the vocabulary's
# merges were learned).  Each is followed by byte-level mapping without its own regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# pre-tokenizers that are GPT-2's regex after splitting digits one by one
_DIGITS_THEN_GPT2 = ("smollm",)
# GPT-2's own regex ("default" is what llama.cpp assumes when the key is absent)
_GPT2 = ("default", "gpt-2", "gpt2")

# GGUF token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    def __init__(self, backend, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 chat_template: str | None = None, source: str = "", template_source: str = ""):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        self.source = source
        self.template_source = template_source  # the file (and key) the chat template came from
        self._compiled = None
        self._special_ids = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str):
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int):
        return self.backend.id_to_token(i)

    @property
    def bos_token(self):
        return None if self.bos_token_id is None else self.id_to_token(self.bos_token_id)

    @property
    def eos_token(self):
        e = self.eos_token_id[0] if isinstance(self.eos_token_id, (list, tuple)) else self.eos_token_id
        return None if e is None else self.id_to_token(e)

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        return self.backend.encode(_text(text), add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts, add_special_tokens: bool = False) -> list:
        texts = [_text(t) for t in texts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_offsets(self, text: str) -> tuple:
        """(ids, [(start, end)] character offsets into text) without special tokens added."""
        enc = self.backend.encode(_text(text), add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)

    @property
    def special_ids(self) -> frozenset:
        """Ids of the special added tokens (end-of-turn markers among them)."""
        if self._special_ids is None:
            self._special_ids = frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)
        return self._special_ids

    def render_chat(self, messages, add_generation_prompt: bool = False, **kwargs) -> tuple:
        """(text, [(start, end)] character spans of the template's `{% generation %}` blocks):
        the model's chat template rendered as transformers renders it (see chat_template.py)."""
        if not self.chat_template:
            raise ValueError(f"{self.source or 'tokenizer'}: no chat template (tokenizer_config.json "
                             "'chat_template' or GGUF 'tokenizer.chat_template')")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        if self._compiled is None:
            self._compiled = ChatTemplate(self.chat_template, self.template_source or self.source or "tokenizer")
        return self._compiled.render(messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, **kwargs) -> str:
        """The rendered conversation (text only)."""
        return self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)[0]

    # ---- construction ----

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """From tokenizer.json (+ tokenizer_config.json and config.json for special ids)."""
        from tokenizers import Tokenizer as Backend

        d = os.fspath(path)
        tj = os.path.join(d, "tokenizer.json")
        if not os.path.isfile(tj):
            raise OSError(f"{tj}: tokenizer.json not found")
        try:
            backend = Backend.from_file(tj)
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"{tj}: cannot parse tokenizer ({e})") from None
        cfg = _read_json(os.path.join(d, "tokenizer_config.json"))
        model_cfg = _read_json(os.path.join(d, "config.json"))
        tc = os.path.join(d, "tokenizer_config.json")
        template, template_source = cfg.get("chat_template"), f"{tc} 'chat_template'"
        if isinstance(template, list):  # named templates: take "default"
            if not all(isinstance(t, dict) for t in template):
                raise ValueError(f"{tc}: 'chat_template' as a list must hold {{'name', 'template'}} objects")
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{tc}: 'chat_template' must be a string, got {type(template).__name__}")
        jt = os.path.join(d, "chat_template.jinja")
        if template is None and os.path.isfile(jt):
            try:
                with open(jt, encoding="utf-8") as f:
                    template, template_source = f.read(), jt
            except UnicodeDecodeError as e:
                raise ValueError(f"{jt}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        vocab = backend.get_vocab_size(with_added_tokens=True)

        def special(key):
            tok = cfg.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                i = backend.token_to_id(tok)
                if i is not None:
                    return i
            return _check_id(model_cfg.get(f"{key}_id"), vocab, f"{os.path.join(d, 'config.json')}: '{key}_id'",
                             many=key == "eos_token")

        return cls(backend, bos_token_id=special("bos_token"), eos_token_id=special("eos_token"),
                   pad_token_id=special("pad_token"), chat_template=template, source=tj,
                   template_source=template_source)

    @classmethod
    def from_gguf_metadata(cls, md: dict, source: str = "") -> "Tokenizer":
        """Rebuild the tokenizer from GGUF metadata (tokenizer.ggml.model "gpt2": byte-level BPE)."""
        from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
        from tokenizers import Tokenizer as Backend
        from tokenizers.models import BPE

        kind = md.get("tokenizer.ggml.model")
        tokens = md.get("tokenizer.ggml.tokens")
        if kind is None or tokens is None:
            raise ValueError(f"{source}: no tokenizer in the GGUF metadata (tokenizer.ggml.model/tokens missing)")
        if not isinstance(tokens, (list, tuple)) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{source}: tokenizer.ggml.tokens must be a non-empty array of strings")
        template = md.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{source}: tokenizer.chat_template must be a string")
        if kind == "llama":
            return cls._from_gguf_sentencepiece(md, source)
        if kind != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model {kind!r} is not supported; expected 'gpt2' "
                             "(byte-level BPE) or 'llama' (SentencePiece BPE)")
        merges = md.get("tokenizer.ggml.merges")
        if merges is None:
            raise ValueError(f"{source}: tokenizer.ggml.merges is missing for a BPE tokenizer")
        types = md.get("tokenizer.ggml.token_type")
        if types is not None and len(types) != len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries, tokens {len(tokens)}")
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise ValueError(f"{source}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
            pairs.append((a, b))
        backend = Backend(BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        pre = md.get("tokenizer.ggml.pre", "default")
        if pre in _SPLITS:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre in _DIGITS_THEN_GPT2:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        elif pre in _GPT2:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:  # another split would give other tokens than the model was trained on: refuse, don't guess
            known = sorted(set(_SPLITS) | set(_DIGITS_THEN_GPT2) | set(_GPT2))
            raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported (its pre-tokenizer split "
                             f"is unknown here); supported: {', '.join(known)}")
        backend.decoder = decoders.ByteLevel()
        if types is not None:
            added = [AddedToken(tokens[i], special=int(t) == _CONTROL, normalized=False)
                     for i, t in enumerate(types) if int(t) in (_CONTROL, _USER_DEFINED)]
            backend.add_tokens(added)
        bos = _check_id(md.get("tokenizer.ggml.bos_token_id"), len(tokens), f"{source}: tokenizer.ggml.bos_token_id")
        eos = _check_id(md.get("tokenizer.ggml.eos_token_id"), len(tokens), f"{source}: tokenizer.ggml.eos_token_id")
        pad = _check_id(md.get("tokenizer.ggml.padding_token_id"), len(tokens),
                        f"{source}: tokenizer.ggml.padding_token_id")
        if md.get("tokenizer.ggml.add_bos_token") and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
        else:
            backend.post_processor = processors.ByteLevel(trim_offsets=False)
        return cls(backend, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                   chat_template=md.get("tokenizer.chat_template"), source=source,
                   template_source=f"{source} tokenizer.chat_template")

    @classmethod
    def _from_gguf_sentencepiece(cls, md: dict, source: str) -> "Tokenizer":
        """tokenizer.ggml.model "llama": SentencePiece BPE over pieces with scores, "▁" for
        spaces, <0xXX> byte tokens for anything outside the vocabulary.  The merges are
        recovered from the vocabulary: every split of a piece into two pieces, the merged
        piece's score giving the priority."""
        from tokenizers import AddedToken, decoders, normalizers
        from tokenizers import Tokenizer as Backend
        from tokenizers.models import BPE

        tokens = list(md["tokenizer.ggml.tokens"])
        scores = md.get("tokenizer.ggml.scores")
        types = md.get("tokenizer.ggml.token_type")
        if scores is None or len(scores) != len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.scores must give one score per token for a SentencePiece vocabulary")
        if types is None or len(types) != len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.token_type must give one type per token")
        vocab = {t: i for i, t in enumerate(tokens)}
        mergeable = {t for t, ty in zip(tokens, types) if int(ty) in (_NORMAL, _USER_DEFINED)}
        merges = []
        for piece in mergeable:
            for k in range(1, len(piece)):
                a, b = piece[:k], piece[k:]
                if a in mergeable and b in mergeable:
                    merges.append((-float(scores[vocab[piece]]), vocab[a], vocab[b], a, b))
        merges.sort()
        unk_id = _check_id(md.get("tokenizer.ggml.unknown_token_id", 0), len(tokens),
                           f"{source}: tokenizer.ggml.unknown_token_id")
        backend = Backend(BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges],
                              unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True))
        prefix = md.get("tokenizer.ggml.add_space_prefix", True)
        steps = [normalizers.Prepend("\u2581")] if prefix else []
        backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        backend.add_tokens([AddedToken(tokens[i], special=int(t) in (_CONTROL, _UNKNOWN), normalized=False)
                            for i, t in enumerate(types) if int(t) in (_CONTROL, _UNKNOWN, _USER_DEFINED)])
        return cls(backend,
                   bos_token_id=_check_id(md.get("tokenizer.ggml.bos_token_id"), len(tokens),
                                          f"{source}: tokenizer.ggml.bos_token_id"),
                   eos_token_id=_check_id(md.get("tokenizer.ggml.eos_token_id"), len(tokens),
                                          f"{source}: tokenizer.ggml.eos_token_id"),
                   pad_token_id=_check_id(md.get("tokenizer.ggml.padding_token_id"), len(tokens),
                                          f"{source}: tokenizer.ggml.padding_token_id"),
                   chat_template=md.get("tokenizer.chat_template"), source=source,
                   template_source=f"{source} tokenizer.chat_template")


def _text(text) -> str:
    """text, if the tokenizer can encode it: a str without lone surrogates (an undecodable
    byte in a command-line argument arrives as one)."""
    if not isinstance(text, str):
        raise ValueError(f"encode expects a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text holds a lone surrogate ({text[e.start]!r} at character {e.start}; an undecodable "
                         "byte?), which is not valid Unicode") from None
    return text


def _check_id(value, vocab: int, where: str, many: bool = False):
    """A special token id from a file: None, an int in [0, vocab) (or, for EOS, a non-empty
    list of them); ValueError naming the key otherwise."""
    if value is None:
        return None
    ids = value if many and isinstance(value, list) and value else [value]
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < vocab:
            raise ValueError(f"{where} must be a token id in [0, {vocab}), got {value!r}")
    return [int(i) for i in ids] if ids is value else int(value)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d
