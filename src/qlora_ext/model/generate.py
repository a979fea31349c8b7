"""Batched token generation with a KV cache.

The prompts run once through the layers, right-padded to the longest (causal attention
keeps every real token blind to the padding after it, so the prefill needs no mask); then
each step feeds one new token per row.  Row b's new tokens sit in the cache after the
padded prompt block, at RoPE positions len_b, len_b + 1, ...; a per-row key mask hides the
padding slots [len_b, Tp) from them.  Rows that stop leave the batch (their cache rows are
dropped), so a long answer does not make the short ones pay.

Shapes: B rows, Tp padded prompt length, S cache slots, Tn new tokens per row and call,
Hq/Hkv heads, D head dim, g = Hq/Hkv."""
from __future__ import annotations

import numpy as np

from .._native import available_memory

# The cache may take at most this share of the memory the OS reports as available.
CACHE_MEMORY_SHARE = 0.5


class KVCache:
    """Keys (after RoPE) and values of every layer, k[l], v[l] [B, S, Hkv, D] float32, and
    which slots each row may attend to: valid [B, S] (True = a real token of that row).
    `length` slots are filled in every layer (advanced by advance())."""

    def __init__(self, layers: int, rows: int, slots: int, Hkv: int, D: int):
        need = 2 * layers * rows * slots * Hkv * D * 4
        avail = available_memory()
        if need > CACHE_MEMORY_SHARE * avail:
            raise ValueError(f"max_new_tokens: the KV cache for {rows} prompt(s) x {slots} positions needs "
                             f"{need / 2**30:.1f} GiB, more than half of the {avail / 2**30:.1f} GiB available")
        self.k = [np.zeros((rows, slots, Hkv, D), np.float32) for _ in range(layers)]
        self.v = [np.zeros((rows, slots, Hkv, D), np.float32) for _ in range(layers)]
        self.valid = np.zeros((rows, slots), bool)
        self.length = 0

    def store(self, l: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v [B, Tn, Hkv, D] into slots length .. length+Tn-1 of layer l."""
        t = k.shape[1]
        self.k[l][:, self.length:self.length + t] = k
        self.v[l][:, self.length:self.length + t] = v

    def advance(self, t: int, valid: np.ndarray) -> None:
        """Mark the t slots just stored: valid [B, t] says which hold real tokens."""
        self.valid[:, self.length:self.length + t] = valid
        self.length += t

    def keep_rows(self, rows: np.ndarray) -> None:
        """Drop every row not in `rows` (finished generations)."""
        self.k = [a[rows] for a in self.k]
        self.v = [a[rows] for a in self.v]
        self.valid = self.valid[rows]

    def attend(self, l: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Store k, v [B, Tn, Hkv, D]; then attention of q [B, Tn, Hq, D] over the row's
        valid slots and, causally, the Tn new ones; returns [B, Tn, Hq, D]."""
        self.store(l, k, v)
        B, Tn, Hq, D = q.shape
        Hkv = k.shape[2]
        g = Hq // Hkv
        S = self.length + Tn
        K, V = self.k[l][:, :S], self.v[l][:, :S]
        # query head h uses kv head h // g (transformers' repeat_kv); rows ordered (g, t)
        qg = q.reshape(B, Tn, Hkv, g, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, g * Tn, D)
        s = qg @ K.transpose(0, 2, 3, 1)                                # [B, Hkv, g*Tn, S]
        s *= np.float32(1.0 / np.sqrt(D))
        t_of_row = np.tile(np.arange(Tn), g)
        seen = np.zeros((B, g * Tn, S), bool)
        seen[:, :, :self.length] = self.valid[:, None, :self.length]
        seen[:, :, self.length:] = np.arange(Tn)[None, :] <= t_of_row[:, None]
        s = np.where(seen[:, None], s, np.float32(-np.inf))
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        out = s @ V.transpose(0, 2, 1, 3)                               # [B, Hkv, g*Tn, D]
        return np.ascontiguousarray(out.reshape(B, Hkv, g, Tn, D).transpose(0, 3, 1, 2, 4).reshape(B, Tn, Hq, D))


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    """logits [V] -> a token: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]   # smallest prefix with mass >= top_p
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.size, p=p))


def _stop_set(model, stop_ids) -> set:
    if stop_ids is None:
        eos = model.config.eos_token_id
        stop_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return {int(t) for t in stop_ids}


def _prompts(prompt_ids, V: int) -> tuple:
    """(list of prompts as int lists, whether one prompt was given)."""
    arr = prompt_ids if isinstance(prompt_ids, np.ndarray) else None
    if arr is None:
        items = list(prompt_ids)
        single = not items or not isinstance(items[0], (list, tuple, np.ndarray))
        prompts = [items] if single else [list(p) for p in items]
    else:
        single = arr.ndim == 1
        prompts = [list(arr)] if single else [list(r) for r in arr]
    if not prompts:
        raise ValueError("prompt_ids holds no prompt")
    out = []
    for i, p in enumerate(prompts):
        where = "prompt_ids" if single else f"prompt_ids[{i}]"
        if not p:
            raise ValueError(f"{where} is empty; expected at least one token id")
        for t in p:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"{where} must hold integer token ids, got {t!r}")
            if not 0 <= int(t) < V:
                raise ValueError(f"{where} must be in [0, {V}), got {int(t)}")
        out.append([int(t) for t in p])
    return out, single


def generate(model, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed=None, stop_ids=None, progress=None):
    """New tokens after each prompt (a stop token ends its row and is not returned).

    prompt_ids: one prompt (a sequence of ids) -> list[int]; several (a list of sequences, or
    an int array [B, T]) -> one list per prompt, decoded together.  `progress`, if given, is
    advanced by one per decoding step."""
    V = int(model.config.vocab_size)
    prompts, single = _prompts(prompt_ids, V)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    context = int(model.config.max_position_embeddings)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > context:
        raise ValueError(f"max_new_tokens {max_new_tokens} with a {longest}-token prompt exceeds the "
                         f"model's context of {context} positions (max_position_embeddings)")
    if not (temperature >= 0 and np.isfinite(temperature)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need a finite temperature >= 0 and 0 < top_p <= 1, got {temperature!r}, {top_p!r}")
    outs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens > 0:
        _decode(model, prompts, int(max_new_tokens), float(temperature), float(top_p),
                np.random.default_rng(seed), _stop_set(model, stop_ids), outs, progress)
    return outs[0] if single else outs


def _decode(model, prompts, max_new, temperature, top_p, rng, stops, outs, progress) -> None:
    """model.decode_step(ids [n, T], positions [T] or [n, T], cache, last [n]) -> logits [n, V]
    of row r at position last[r]: the one thing each model provides."""
    lens = np.array([len(p) for p in prompts], np.int64)
    B, Tp = len(prompts), int(lens.max())
    cfg = model.config
    cache = KVCache(len(model.state.layers), B, Tp + max_new, int(cfg.num_key_value_heads), int(cfg.head_dim))
    ids = np.zeros((B, Tp), np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    positions = np.arange(Tp, dtype=np.int64)
    last = lens - 1                     # the row position whose logits give the next token
    active = np.arange(B)               # original index of each row still generating
    for i in range(max_new):
        n, T = ids.shape
        logits = model.decode_step(ids, positions, cache, last)           # [n, V]
        cache.advance(T, np.arange(T)[None, :] < lens[:, None] if i == 0 else np.ones((n, T), bool))
        toks = [_sample(logits[r], temperature, top_p, rng) for r in range(n)]
        going = []
        for r, tok in enumerate(toks):
            if tok not in stops:
                outs[active[r]].append(tok)
                if len(outs[active[r]]) < max_new:
                    going.append(r)
        if progress is not None:
            progress.update(1)
        if not going:
            return
        if len(going) < n:
            keep = np.array(going)
            cache.keep_rows(keep)
            active, lens = active[keep], lens[keep]
            toks = [toks[r] for r in going]
        ids = np.array(toks, np.int64)[:, None]
        positions = (lens + i)[:, None]                        # [n, 1] per-row RoPE position
        last = np.zeros(len(toks), np.int64)
