"""Token generation with a KV cache: the prompt runs once through the layers (the attention
kernel on the whole prompt), then each new token attends to the cached keys and values.

Shapes (batch 1): S cached positions, Tn new tokens, Hq/Hkv heads, D head dim, g = Hq/Hkv."""
from __future__ import annotations

import numpy as np

from .layers import StepInputs


class KVCache:
    """Keys (after RoPE) and values of every layer: k[l], v[l] [S_max, Hkv, D] float32."""

    def __init__(self, layers: int, max_len: int, Hkv: int, D: int):
        self.k = [np.empty((max_len, Hkv, D), np.float32) for _ in range(layers)]
        self.v = [np.empty((max_len, Hkv, D), np.float32) for _ in range(layers)]
        self.length = 0          # positions filled in every layer (advanced by advance())

    def store(self, l: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v [1, Tn, Hkv, D] at positions length .. length+Tn-1 of layer l."""
        t = k.shape[1]
        self.k[l][self.length:self.length + t] = k[0]
        self.v[l][self.length:self.length + t] = v[0]

    def advance(self, t: int) -> None:
        self.length += t

    def attend(self, l: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Store k, v [1, Tn, Hkv, D], then causal attention of q [1, Tn, Hq, D] over all S =
        length + Tn cached positions; returns [1, Tn, Hq, D]."""
        self.store(l, k, v)
        _, Tn, Hq, D = q.shape
        Hkv = k.shape[2]
        g = Hq // Hkv
        S = self.length + Tn
        K, V = self.k[l][:S], self.v[l][:S]
        # query head h uses kv head h // g (transformers' repeat_kv); rows ordered (g, t)
        qg = q[0].reshape(Tn, Hkv, g, D).transpose(1, 2, 0, 3).reshape(Hkv, g * Tn, D)
        s = qg @ K.transpose(1, 2, 0)                                   # [Hkv, g*Tn, S]
        s *= np.float32(1.0 / np.sqrt(D))
        t_of_row = np.tile(np.arange(Tn), g)
        hidden = np.arange(S)[None, :] > (self.length + t_of_row)[:, None]
        s[:, hidden] = -np.inf
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        out = s @ V.transpose(1, 0, 2)                                  # [Hkv, g*Tn, D]
        return np.ascontiguousarray(out.reshape(Hkv, g, Tn, D).transpose(2, 0, 1, 3).reshape(1, Tn, Hq, D))


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


def generate(model, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed=None, stop_ids=None) -> list[int]:
    """New tokens after prompt_ids (a stop token ends generation and is not returned)."""
    ids = np.asarray(prompt_ids)
    if ids.size and (ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"prompt_ids must be a 1-D list of integer token ids, got {ids.dtype} {ids.shape}")
    prompt = [int(t) for t in ids]
    V = int(model.config.vocab_size)
    if not prompt:
        raise ValueError("prompt_ids is empty; expected at least one token id")
    if any(t < 0 or t >= V for t in prompt):
        raise ValueError(f"prompt_ids must be in [0, {V})")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    context = int(model.config.max_position_embeddings)
    if len(prompt) + max_new_tokens > context:  # the KV cache is allocated for the whole length
        raise ValueError(f"max_new_tokens {max_new_tokens} with a {len(prompt)}-token prompt exceeds the "
                         f"model's context of {context} positions (max_position_embeddings)")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature!r}, {top_p!r}")
    stops = _stop_set(model, stop_ids)
    rng = np.random.default_rng(seed)
    layers = model._layers
    total = len(prompt) + max_new_tokens
    layers.ensure_positions(total)
    cache = KVCache(len(model.state.layers), total, layers.Hkv, layers.D)
    out: list[int] = []
    ids = np.asarray(prompt, dtype=np.int64)[None]
    while len(out) < max_new_tokens:
        T = ids.shape[1]
        inp = StepInputs(1, T, np.arange(cache.length, cache.length + T, dtype=np.int64), None)
        x = model._embed(ids)
        for l in range(len(model.state.layers)):
            x, _ = layers.forward(l, x, inp, keep=False, cache=cache)
        cache.advance(T)
        h, _ = model._final_norm(x[-1:])
        with model.timer("lm_head"):
            logits = (h @ model.lm_head_weight.T)[0]
        tok = _sample(logits, float(temperature), float(top_p), rng)
        if tok in stops:
            break
        out.append(tok)
        ids = np.array([[tok]], dtype=np.int64)
    return out
