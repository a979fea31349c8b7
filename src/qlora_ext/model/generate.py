"""Batched token generation with a KV cache, on the model's own device.

Prompts go in groups whose KV cache holds at most GENERATE_TOKENS positions (rows x (longest
prompt + max_new_tokens)), which bounds the cache and the prefill's activations whatever the
number and length of the prompts.  A group's prompts run once through the layers,
right-padded to the longest (causal attention keeps every real token blind to the padding
after it, so the prefill needs no mask); then each step feeds one new token per row.
Row b's new tokens sit in the cache after the padded prompt block, at RoPE positions len_b,
len_b + 1, ...; a per-row key mask hides the padding slots [len_b, Tp) from them.  Rows that
stop leave the batch where the cache compacts (the host's: a long answer does not make the
short ones pay); a GPU cache keeps them (the step costs the same, and a fixed shape keeps its
buffers), and their tokens are dropped.

Each step's device returns only the k most likely next tokens of each row (k = 1 greedy; the
top-k of sampling), and the host draws from those (temperature, then the nucleus cut): a GPU
sends k ids per row back, not the logits.

Shapes: B rows, Tp padded prompt length, S cache slots, Tn new tokens per row and call,
Hq/Hkv heads, D head dim, g = Hq/Hkv, V vocabulary, k candidates."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._native import available_memory

# The cache may take at most this share of the memory the OS reports as available.
CACHE_MEMORY_SHARE = 0.5
# Positions of one group's KV cache (rows x slots): a 4 x 1024 training batch's tokens, so
# that generation's cache and prefill take no more than a forward of that batch.
GENERATE_TOKENS = 4096
# sampling's default top-k, as transformers' GenerationConfig
DEFAULT_TOP_K = 50


class KVCache:
    """Keys (after RoPE) and values of every layer in host memory, k[l], v[l] [B, S, Hkv, D]
    float32, and which slots each row may attend to: valid [B, S] (True = a real token of that
    row).  `length` slots are filled in every layer (advanced by advance())."""

    compacts = True     # keep_rows() drops finished rows

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


def top_candidates(logits: np.ndarray, k: int) -> tuple:
    """logits [n, V] -> (values [n, k], ids int64 [n, k]): each row's k largest (k 0: all V),
    descending, equal values by lower id (a stable sort), found without sorting the vocabulary."""
    n, V = logits.shape
    if k == 1:
        ids = np.argmax(logits, axis=1)[:, None]
        return np.take_along_axis(logits, ids, 1), ids.astype(np.int64)
    k = V if k == 0 else min(k, V)
    ids = np.empty((n, k), np.int64)
    for r, row in enumerate(logits):
        if k == V:
            ids[r] = np.argsort(-row, kind="stable")
            continue
        t = np.partition(row, V - k)[V - k]                # the k-th largest value
        above = np.flatnonzero(row > t)
        sel = np.concatenate([above, np.flatnonzero(row == t)[:k - above.size]])
        ids[r] = sel[np.lexsort((sel, -row[sel]))]
    return np.take_along_axis(logits, ids, 1), ids


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy at temperature 0; else a draw at `temperature` from
    the top_k most likely tokens (0: all), cut to the smallest prefix holding top_p of their mass
    (transformers' order: temperature, top-k, top-p)."""

    temperature: float = 0.0
    top_k: int = DEFAULT_TOP_K
    top_p: float = 1.0

    @property
    def k(self) -> int:
        """Candidates the device returns per row (0: every token)."""
        return 1 if self.temperature == 0.0 else self.top_k

    def choose(self, values, ids: np.ndarray, rows, rngs) -> np.ndarray:
        """The next token of each row in `rows` (a bool mask; the others get -1) from the
        device's candidates: values [n, k] (None for greedy), ids [n, k] best first.  Row r
        draws from its own generator rngs[r]."""
        out = np.full(ids.shape[0], -1, np.int64)
        if self.k == 1:                         # greedy, or a draw from one candidate
            out[rows] = ids[rows, 0]
            return out
        for r in np.flatnonzero(rows):
            z = values[r].astype(np.float64) / self.temperature
            p = np.exp(z - z[0])                # z[0] is the largest
            p /= p.sum()
            keep = p.size
            if self.top_p < 1.0:
                keep = int(np.searchsorted(np.cumsum(p), self.top_p)) + 1   # mass >= top_p
                keep = min(keep, p.size)
                p = p[:keep] / p[:keep].sum()
            out[r] = ids[r, int(rngs[r].choice(keep, p=p))]
        return out


def group_rows(rows: int, slots: int) -> int:
    """Prompts decoded together when each needs `slots` cache positions."""
    return min(rows, max(1, GENERATE_TOKENS // slots))


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
             seed=None, stop_ids=None, progress=None, top_k: int = DEFAULT_TOP_K):
    """New tokens after each prompt (a stop token ends its row and is not returned).

    prompt_ids: one prompt (a sequence of ids) -> list[int]; several (a list of sequences, or
    an int array [B, T]) -> one list per prompt, decoded together.  temperature 0 is greedy;
    else tokens are drawn as Sampling says, each prompt from its own generator of
    np.random.SeedSequence(seed).spawn (so a prompt's answer does not depend on the others
    decoded with it).  `progress`, if given, is advanced by one per decoding step."""
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
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = every token), got {top_k!r}")
    outs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens > 0:
        pick = Sampling(float(temperature), min(int(top_k), V), float(top_p))
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(prompts))]
        stops = _stop_set(model, stop_ids)
        n = group_rows(len(prompts), longest + max_new_tokens)
        for r0 in range(0, len(prompts), n):
            _decode(model, prompts[r0:r0 + n], int(max_new_tokens), pick, rngs[r0:r0 + n], stops,
                    outs[r0:r0 + n], progress)
    return outs[0] if single else outs


def _decode(model, prompts, max_new, pick: Sampling, rngs, stops, outs, progress) -> None:
    """Runs model.kv_cache(rows, slots) -> a cache, and model.decode_step(ids [n, T],
    positions [T] or [n, T], cache, last [n], k) -> (values [n, k] or None, ids [n, k]): the
    k most likely tokens after row r's position last[r] (the two things each model provides)."""
    lens = np.array([len(p) for p in prompts], np.int64)
    B, Tp = len(prompts), int(lens.max())
    cache = model.kv_cache(B, Tp + max_new)
    ids = np.zeros((B, Tp), np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    values, cand = model.decode_step(ids, np.arange(Tp, dtype=np.int64), cache, lens - 1, pick.k)
    cache.advance(Tp, np.arange(Tp)[None, :] < lens[:, None])
    active = np.arange(B)               # original index of each row in the batch
    going = np.ones(B, bool)            # rows still generating
    for i in range(max_new):
        toks = pick.choose(values, cand, going, [rngs[a] for a in active])
        for r in np.flatnonzero(going):
            if toks[r] in stops:
                going[r] = False
                continue
            outs[active[r]].append(int(toks[r]))
            going[r] = len(outs[active[r]]) < max_new
        if progress is not None:
            progress.update(1)
        if not going.any():
            return
        if cache.compacts and not going.all():
            keep = np.flatnonzero(going)
            cache.keep_rows(keep)
            active, lens, toks, going = active[keep], lens[keep], toks[keep], going[keep]
        n = len(toks)
        # a kept finished row feeds token 0; what it yields is never read
        values, cand = model.decode_step(np.where(going, toks, 0)[:, None], (lens + i)[:, None], cache,
                                         np.zeros(n, np.int64), pick.k)
        cache.advance(1, np.ones((n, 1), bool))
