"""One decoder layer, forward next to backward: the attention block on the CPU (numpy BLAS for
the projections, the C kernels for norms, RoPE and attention) and the FFN on the backend.

Shape letters: B batch, T tokens, N = B*T rows, H hidden, Hq/Hkv heads, D head dim, r LoRA rank.
Backward functions return gradients (they never add into caller state) except the LoRA
grads, which are *added* into the `grads` dict the caller zeroed once per step."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..backend import FfnLora
from ..cpu.base_matmul import base_matmul, check_compute_dtype, fused_nf4_available
from ..nf4 import dequantize_nf4
from .lora import ATTN_PROJECTIONS, FFN_PROJECTIONS, PROJECTIONS, LoraPair, peft_name


class PhaseTimer:
    """Exclusive seconds per phase (embed, norms, projections, dequant, attention, rope, ffn,
    loss, lm_head), accumulated until reset().  A phase nested in another (dequant inside
    projections) pauses its parent, so the shares add up to the total; each uninterrupted
    segment also goes to the step profiler (qlora_ext.PROFILER) as a CPU span when it is on."""

    def __init__(self):
        from ..profile import PROFILER

        self.profiler = PROFILER
        self.times: dict[str, float] = {}
        # profiler device per phase (default "cpu"); the model marks "ffn" as "wait" when a
        # GPU backend runs it, since the host then only waits for the GPU
        self.devices: dict[str, str] = {}
        self._stack: list[list] = []        # [name, start of its current segment]

    def _close(self, entry, now):
        name, t0 = entry
        self.times[name] = self.times.get(name, 0.0) + now - t0
        self.profiler.record(name, self.devices.get(name, "cpu"), t0, now)

    @contextmanager
    def __call__(self, name: str):
        now = time.perf_counter()
        if self._stack:
            self._close(self._stack[-1], now)
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self._close(self._stack.pop(), now)
            if self._stack:
                self._stack[-1][1] = now

    def reset(self) -> dict:
        out, self.times = self.times, {}
        return out


def dropout_seed(seed: int, step: int, layer: int) -> int:
    """The dropout seed of one (step, layer): every projection's mask of that layer derives
    from it (qlora_ext.cpu.ffn.dropout_key), in the CPU model, the FFN backends and the
    GPU-resident engine alike, so all placements drop the same inputs."""
    return int(np.random.default_rng([seed, step, layer, 7]).integers(2**31))


def dropout_mask(seed: int, step: int, layer: int, proj: str, shape, p: float) -> np.ndarray:
    """Inverted-dropout multiplier (0 or 1/(1-p)) [N, in], reproducible from (seed, step,
    layer, proj) so that gradient checkpointing recomputes the same mask: the counter hash
    of qlora_ext.cpu.ffn.apply_dropout (shaders/dropout.wgsl on the GPU)."""
    from ..cpu.ffn import apply_dropout, dropout_key

    key = dropout_key(dropout_seed(seed, step, layer), layer, proj)
    return apply_dropout(np.ones(shape, np.float32), p, key)


@dataclass
class LinearCtx:
    """What an adapted linear keeps for backward: the adapter input after dropout xd [N, in]
    (x itself without dropout), u = scale · xd Aᵀ [N, r], and the dropout multiplier or None."""

    xd: np.ndarray | None = None
    u: np.ndarray | None = None
    mask: np.ndarray | None = None


def lora_linear_forward(x, W, bias, pair: LoraPair | None, mask=None, keep=True,
                        compute_dtype="fp32", threads=None):
    """x [N, in], W [out, in] -> y [N, out] = x Wᵀ + bias + scale (xd Aᵀ) Bᵀ, xd = x * mask.
    W is float32 or NF4; only x Wᵀ takes compute_dtype (qlora_ext.cpu.base_matmul)."""
    y = base_matmul(x, W, compute_dtype, transpose=True, threads=threads)
    if bias is not None:
        y += bias
    if pair is None:
        return y, None
    xd = x if mask is None else x * mask
    u = xd @ pair.A.T
    u *= np.float32(pair.scale)
    y += u @ pair.B.T
    return y, (LinearCtx(xd, u, mask) if keep else None)


def lora_linear_backward(dy, W, pair: LoraPair | None, ctx: LinearCtx | None, need_dx: bool = True,
                         compute_dtype="fp32", threads=None):
    """dy [N, out] -> (dx [N, in] or None when not needed, dA [r, in] | None, dB [out, r] | None).
    Only dy W takes compute_dtype; dA and dB stay float32."""
    dx = base_matmul(dy, W, compute_dtype, transpose=False, threads=threads) if need_dx else None
    if pair is None:
        return dx, None, None
    dB = dy.T @ ctx.u                     # [out, r]  (u already carries the scale)
    du = dy @ pair.B                      # [N, r]
    du *= np.float32(pair.scale)
    dA = du.T @ ctx.xd                    # [r, in]
    if need_dx:
        dxd = du @ pair.A                 # [N, in]
        if ctx.mask is not None:
            dxd *= ctx.mask
        dx += dxd
    return dx, dA, dB


def _bias(lw, proj):
    """A projection's frozen bias [out] or None: Qwen2's q/k/v; q/k/v/o of Llama-family
    configs with attention_bias=True."""
    return lw.bias.get(proj) if lw.bias else None


@dataclass
class LayerActivations:
    """Saved by DecoderLayers.forward(keep=True) for DecoderLayers.backward.  All float32.
    The normed input h1 lives on only inside `lin` (as the adapters' xd) when q/k/v are adapted."""

    x: np.ndarray                 # [N, H] layer input
    rstd1: np.ndarray             # [N]
    lin: dict                     # proj -> LinearCtx (adapted attention projections only)
    q_pre: np.ndarray | None      # [N*Hq, D] before q_norm (qk_norm models)
    k_pre: np.ndarray | None      # [N*Hkv, D]
    q_rstd: np.ndarray | None     # [N*Hq]
    k_rstd: np.ndarray | None     # [N*Hkv]
    q: np.ndarray                 # [B, T, Hq, D] after RoPE
    k: np.ndarray                 # [B, T, Hkv, D] after RoPE
    v: np.ndarray                 # [B, T, Hkv, D]
    attn: np.ndarray              # [B, T, Hq, D]
    lse: np.ndarray               # [B, Hq, T]
    x2: np.ndarray                # [N, H] after the attention residual
    rstd2: np.ndarray             # [N]
    ffn_ctx: object = None        # the backend's context


@dataclass
class StepInputs:
    """Per-call data every layer needs."""

    B: int
    T: int
    positions: np.ndarray         # [T] int64
    mask: np.ndarray | None       # [B, T] uint8, 1 = real token (None: no padding)
    step: int = 0                 # dropout masks derive from it
    training: bool = False        # dropout only when training


class DecoderLayers:
    """Runs the layers of a ModelState with LoRA weights on a kernel module and an FFN backend."""

    def __init__(self, state, lora, backend, kernels, timer: PhaseTimer, threads=None, seed=0,
                 attention_threads=None):
        self.state, self.lora, self.backend, self.k = state, lora, backend, kernels
        self.timer, self.threads, self.seed = timer, threads, seed
        self.user_attention_threads = attention_threads
        cfg = state.config
        self.cfg = cfg
        self.Hq, self.Hkv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = float(cfg.rms_norm_eps)
        self.tables = kernels.rope_tables(self.D, int(cfg.max_position_embeddings),
                                          float(cfg.rope_theta), cfg.rope_scaling)
        self._buffers: dict = {}
        # the frozen base's products (attention projections here, the FFN on a CPU backend)
        self.compute_dtype = check_compute_dtype(lora.config.compute_dtype) if lora is not None else "fp32"
        if hasattr(backend, "set_base_products"):
            backend.set_base_products(self.compute_dtype, attention_threads)

    # Attention work (B * Hq * T^2 * D) above which it gets every core by default.
    ATTENTION_ALL_CORES_WORK = 1 << 28

    def attention_threads(self, B: int, T: int):
        """Threads for the attention kernels: the caller's count if given; else every core once
        the work is large (long sequences, where attention dominates the step and runs long
        enough for OpenBLAS's spinning threads to have gone idle: on 16 cores a Qwen3-0.6B
        step at 4 x 1024 spent 22 s in one-thread attention), else the model's kernel count."""
        if self.user_attention_threads is not None:
            return self.user_attention_threads
        if B * self.Hq * T * T * self.D >= self.ATTENTION_ALL_CORES_WORK:
            return None
        return self.threads

    def ensure_positions(self, n: int) -> None:
        """Grow the RoPE tables when a sequence is longer than max_position_embeddings."""
        if n > self.tables.cos.shape[0]:
            self.tables = self.k.rope_tables(self.D, n, float(self.cfg.rope_theta), self.cfg.rope_scaling)

    # -- weights, dequantized just in time into buffers reused across layers
    def weight(self, l: int, name: str):
        """[out, in]: the NF4Tensor itself where the fused kernel decodes it inside the GEMM
        (AVX-512), else float32: an NF4 weight is dequantized into a buffer per projection that
        remembers its layer, so a backward (or checkpointed recompute) right after the same
        layer's forward reuses it."""
        lw = self.state.layers[l]
        w = lw.proj[name]
        if isinstance(w, np.ndarray) or fused_nf4_available():
            return w
        held = self._buffers.get(name)
        if held is not None and held[0] == l:
            return held[1]
        buf = held[1] if held is not None and held[1].shape == tuple(w.shape) else \
            np.empty(tuple(w.shape), dtype=np.float32)
        self._buffers.pop(name, None)
        with self.timer("dequant"):
            # one thread: an OpenMP team started while OpenBLAS's threads still spin after
            # the last sgemm fights them for the cores (15 ms instead of 0.02 ms for 576x576)
            out = dequantize_nf4(w, out=buf, threads=1)
        self._buffers[name] = (l, out)
        return out

    def _mask_for(self, inp: StepInputs, l: int, proj: str, shape):
        p = float(self.lora.config.dropout) if self.lora is not None else 0.0
        if not inp.training or p == 0.0 or self.lora.get(l, proj) is None:
            return None
        return dropout_mask(self.seed, inp.step, l, proj, shape, p)

    def _pair(self, l, proj):
        return None if self.lora is None else self.lora.get(l, proj)

    def ffn_lora(self, l: int, inp: StepInputs) -> FfnLora | None:
        if self.lora is None:
            return None
        pairs = {p: self.lora.get(l, p) for p in FFN_PROJECTIONS if self.lora.get(l, p) is not None}
        if not pairs:
            return None
        drop = float(self.lora.config.dropout) if inp.training else 0.0
        # one seed per (step, layer): the backend draws its masks from it
        return FfnLora(pairs, drop, dropout_seed(self.seed, inp.step, l))

    # ------------------------------------------------------------------ forward
    def prefetch_weights(self, l: int, projs=ATTN_PROJECTIONS) -> None:
        """Dequantize layer l's attention projections into their buffers now (no-op for fp32
        weights or a layer already held): run while the GPU computes an FFN, so that this CPU
        work overlaps it instead of following it."""
        if 0 <= l < len(self.state.layers):
            for proj in projs:
                self.weight(l, proj)

    def forward(self, l: int, x: np.ndarray, inp: StepInputs, keep: bool, cache=None,
                prefetch_next: bool = True):
        """x [N, H] -> (y [N, H], LayerActivations | None).  With a KVCache (generation, B = 1,
        no backward) the new keys/values are appended and attention covers the cached ones."""
        tm, k, lw = self.timer, self.k, self.state.layers[l]
        B, T, Hq, Hkv, D = inp.B, inp.T, self.Hq, self.Hkv, self.D
        with tm("norms"):
            h1, rstd1 = k.rmsnorm_forward(x, lw.input_layernorm, self.eps, threads=self.threads)
        lin, outs = {}, {}
        with tm("projections"):
            for proj in ("q_proj", "k_proj", "v_proj"):
                bias = _bias(lw, proj)
                y, c = lora_linear_forward(h1, self.weight(l, proj), bias, self._pair(l, proj),
                                           self._mask_for(inp, l, proj, h1.shape), keep,
                                           self.compute_dtype, self.user_attention_threads)
                outs[proj], lin[proj] = y, c
        q = outs["q_proj"].reshape(B, T, Hq, D)
        kk = outs["k_proj"].reshape(B, T, Hkv, D)
        v = outs["v_proj"].reshape(B, T, Hkv, D)
        q_pre = k_pre = q_rstd = k_rstd = None
        if lw.q_norm is not None:
            with tm("norms"):
                q_pre, k_pre = q.reshape(-1, D), kk.reshape(-1, D)
                qn, q_rstd = k.rmsnorm_forward(q_pre, lw.q_norm, self.eps, threads=self.threads)
                kn, k_rstd = k.rmsnorm_forward(k_pre, lw.k_norm, self.eps, threads=self.threads)
                q, kk = qn.reshape(B, T, Hq, D), kn.reshape(B, T, Hkv, D)
        with tm("rope"):
            k.rope_forward(q, inp.positions, self.tables, threads=self.threads)
            k.rope_forward(kk, inp.positions, self.tables, threads=self.threads)
        with tm("attention"):
            if cache is not None and cache.length > 0:
                attn, lse = cache.attend(l, q, kk, v), None
            else:
                attn, lse = k.attention_forward(q, kk, v, inp.mask, threads=self.attention_threads(B, T))
                if cache is not None:
                    cache.store(l, kk, v)
        a2 = attn.reshape(B * T, Hq * D)
        with tm("projections"):
            o, lin["o_proj"] = lora_linear_forward(a2, self.weight(l, "o_proj"), _bias(lw, "o_proj"),
                                                   self._pair(l, "o_proj"),
                                                   self._mask_for(inp, l, "o_proj", a2.shape), keep,
                                                   self.compute_dtype, self.user_attention_threads)
        x2 = o
        x2 += x
        with tm("norms"):
            h2, rstd2 = k.rmsnorm_forward(x2, lw.post_attention_layernorm, self.eps, threads=self.threads)
        with tm("ffn"):
            # while the FFN runs (on a GPU backend), the next layer's attention weights are
            # dequantized; a recompute inside backward prefetches nothing (its attention
            # backward needs this layer's weights, which are held)
            nxt = (lambda: self.prefetch_weights(l + 1)) if prefetch_next else None
            f, ffn_ctx = self.backend.ffn_forward(l, h2, self.ffn_lora(l, inp), need_backward=keep,
                                                  while_waiting=nxt)
            if l + 1 < len(self.state.layers):
                # a streaming GPU backend uploads the next layer while the CPU runs its attention
                self.backend.prefetch(l + 1)
        y = x2 + f   # not in place: a backend may hand back a buffer it reuses
        if not keep:
            return y, None
        lin = {p: c for p, c in lin.items() if c is not None}
        acts = LayerActivations(x, rstd1, lin, q_pre, k_pre, q_rstd, k_rstd, q, kk, v, attn, lse,
                                x2, rstd2, ffn_ctx)
        return y, acts

    # ------------------------------------------------------------------ backward
    def backward(self, l: int, acts: LayerActivations, dy: np.ndarray, inp: StepInputs, grads: dict,
                 need_dx: bool = True):
        """dy [N, H] (grad of the layer output) -> dx [N, H] (None with need_dx=False: the
        first layer, whose input is the frozen embedding); adds LoRA grads into `grads`."""
        tm, k, lw = self.timer, self.k, self.state.layers[l]
        B, T, Hq, Hkv, D = inp.B, inp.T, self.Hq, self.Hkv, self.D
        with tm("ffn"):
            # this layer's attention backward comes next: its weights dequantize meanwhile
            # (layer 0 has no input gradient: only o_proj's weight is needed there)
            projs = ATTN_PROJECTIONS if need_dx else ("o_proj",)
            fg = self.backend.ffn_backward(l, acts.ffn_ctx, dy,
                                           while_waiting=lambda: self.prefetch_weights(l, projs))
            if l > 0:
                self.backend.prefetch(l - 1)
        acts.ffn_ctx = None
        for proj, (dA, dB) in fg.lora.items():
            grads[peft_name(l, proj, "A")] += dA
            grads[peft_name(l, proj, "B")] += dB
        with tm("norms"):
            dx2, _ = k.rmsnorm_backward(acts.x2, lw.post_attention_layernorm, acts.rstd2, fg.dx,
                                        threads=self.threads)
        dx2 += dy
        with tm("projections"):
            da = self._linear_backward(l, "o_proj", dx2, acts, grads)
        with tm("attention"):
            dq, dk, dv = k.attention_backward(acts.q, acts.k, acts.v, acts.attn, acts.lse,
                                              da.reshape(B, T, Hq, D), inp.mask,
                                              threads=self.attention_threads(B, T))
        with tm("rope"):
            k.rope_backward(dq, inp.positions, self.tables, threads=self.threads)
            k.rope_backward(dk, inp.positions, self.tables, threads=self.threads)
        dq, dk = dq.reshape(B * T, Hq * D), dk.reshape(B * T, Hkv * D)
        if acts.q_pre is not None:
            with tm("norms"):
                dq, _ = k.rmsnorm_backward(acts.q_pre, lw.q_norm, acts.q_rstd, dq.reshape(-1, D),
                                           threads=self.threads)
                dk, _ = k.rmsnorm_backward(acts.k_pre, lw.k_norm, acts.k_rstd, dk.reshape(-1, D),
                                           threads=self.threads)
                dq, dk = dq.reshape(B * T, Hq * D), dk.reshape(B * T, Hkv * D)
        with tm("projections"):
            dh1 = self._linear_backward(l, "q_proj", dq, acts, grads, need_dx)
            dh_k = self._linear_backward(l, "k_proj", dk, acts, grads, need_dx)
            dh_v = self._linear_backward(l, "v_proj", dv.reshape(B * T, Hkv * D), acts, grads, need_dx)
        if not need_dx:
            return None
        dh1 += dh_k
        dh1 += dh_v
        with tm("norms"):
            dx, _ = k.rmsnorm_backward(acts.x, lw.input_layernorm, acts.rstd1, dh1, threads=self.threads)
        dx += dx2
        return dx

    def _linear_backward(self, l, proj, dy, acts, grads, need_dx=True):
        pair = self._pair(l, proj)
        if not need_dx and pair is None:
            return None
        W = self.weight(l, proj) if need_dx else None
        dx, dA, dB = lora_linear_backward(dy, W, pair, acts.lin.get(proj), need_dx,
                                          self.compute_dtype, self.user_attention_threads)
        if dA is not None:
            grads[peft_name(l, proj, "A")] += dA
            grads[peft_name(l, proj, "B")] += dB
        return dx
