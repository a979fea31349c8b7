"""A tiny stand-in for qlora_ext's Model API, for testing the trainer, data and CLI without
the real transformer: a byte-level tokenizer with a ChatML template, and a bigram
softmax-regression "LM" (logits[t] = E[ids[t]] @ W + b) whose trainable W, b have exact
float64 gradients."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qlora_ext.model.packing import mask_cross_document_targets
from qlora_ext.train.checkpoint import read_safetensors, write_safetensors

SPECIALS = {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258, "<|im_start|>": 259, "<|im_end|>": 260}
VOCAB = 261


class ByteTokenizer:
    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258

    def encode(self, text, add_special_tokens=False):
        ids = [self.bos_token_id] if add_special_tokens else []
        i = 0
        while i < len(text):
            for s, sid in SPECIALS.items():
                if text.startswith(s, i):
                    ids.append(sid)
                    i += len(s)
                    break
            else:
                ids.extend(text[i].encode("utf-8"))
                i += 1
        return ids

    def encode_offsets(self, text):
        """(ids, character offsets): a character's bytes all point at that character."""
        ids, offsets, i = [], [], 0
        while i < len(text):
            s = next((s for s in SPECIALS if text.startswith(s, i)), None)
            if s is not None:
                ids.append(SPECIALS[s])
                offsets.append((i, i + len(s)))
                i += len(s)
            else:
                b = text[i].encode("utf-8")
                ids.extend(b)
                offsets.extend([(i, i + 1)] * len(b))
                i += 1
        return ids, offsets

    special_ids = frozenset(SPECIALS.values())

    def render_chat(self, messages, add_generation_prompt=False):
        return self.apply_chat_template(messages, add_generation_prompt), []

    def decode(self, ids, skip_special_tokens=True):
        inv = {v: k for k, v in SPECIALS.items()}
        out, buf = [], bytearray()
        for t in ids:
            if t < 256:
                buf.append(t)
            else:
                out.append(buf.decode("utf-8", "replace"))
                buf = bytearray()
                if not skip_special_tokens:
                    out.append(inv[t])
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt=False):
        s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class FakeLM:
    pad_multiple = 1

    def __init__(self, dim=8, seed=0):
        rng = np.random.default_rng(seed)
        self.tokenizer = ByteTokenizer()
        self.E = rng.standard_normal((VOCAB, dim)).astype(np.float32)
        self.params = {"lm.w": (rng.standard_normal((dim, VOCAB)) * 0.1).astype(np.float32),
                       "lm.b": np.zeros(VOCAB, np.float32)}
        self.calls = 0

    def parameters(self):
        return self.params

    @staticmethod
    def count_tokens(labels, segment_ids=None):
        if segment_ids is not None:   # packed rows: no target across a document boundary
            labels = mask_cross_document_targets(np.asarray(labels), np.asarray(segment_ids))
        return int((np.asarray(labels)[:, 1:] != -100).sum())

    def _terms(self, input_ids, labels):
        ids, lab = np.asarray(input_ids)[:, :-1], np.asarray(labels)[:, 1:]
        keep = lab != -100
        x = self.E[ids[keep]].astype(np.float64)              # [N, D]
        y = lab[keep]
        logits = x @ self.params["lm.w"].astype(np.float64) + self.params["lm.b"]
        logits -= logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits).sum(axis=1))
        loss = (lse - logits[np.arange(len(y)), y]).sum()
        return x, y, logits, lse, loss

    def loss_and_grads(self, input_ids, labels, attention_mask=None, reduction="mean", segment_ids=None):
        self.calls += 1
        if segment_ids is not None:   # a bigram model: packing only drops the cross-document targets
            labels = mask_cross_document_targets(np.asarray(labels), np.asarray(segment_ids))
        x, y, logits, lse, loss = self._terms(input_ids, labels)
        p = np.exp(logits - lse[:, None])
        p[np.arange(len(y)), y] -= 1.0
        n = max(len(y), 1) if reduction == "mean" else 1
        grads = {"lm.w": (x.T @ p / n).astype(np.float32), "lm.b": (p.sum(0) / n).astype(np.float32)}
        return loss / n, grads

    def loss(self, input_ids, labels, attention_mask=None, reduction="mean"):
        *_, loss = self._terms(input_ids, labels)
        return loss / (max(self.count_tokens(labels), 1) if reduction == "mean" else 1)

    def save_adapter(self, d):
        d = Path(d)
        write_safetensors(d / "adapter_model.safetensors", self.params)
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "fake": True}))

    def load_adapter(self, d):
        for k, v in read_safetensors(Path(d) / "adapter_model.safetensors").items():
            self.params[k][...] = v

    def generate(self, prompt_ids, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None, stop_ids=None,
                 top_k=50, progress=None):
        if len(prompt_ids) and isinstance(prompt_ids[0], (list, tuple, np.ndarray)):
            return [self.generate(p, max_new_tokens, temperature, top_p, seed, stop_ids, top_k, progress)
                    for p in prompt_ids]
        out, last = [], prompt_ids[-1]
        for _ in range(max_new_tokens):
            if progress is not None:
                progress.update(1)
            last = int(np.argmax(self.E[last] @ self.params["lm.w"] + self.params["lm.b"]))
            if stop_ids and last in stop_ids:
                break
            out.append(last)
        return out
