"""The CPU device of the layer program: the frozen NF4 products through the fused NF4 GEMM on
AVX-512 (else NF4 dequantized just in time and numpy's BLAS), LoRA's products through numpy,
the C kernels for norms, RoPE and attention.

Buffers are numpy arrays; every op writes into the arrays it is given (engine/program.py
states the contracts).  LoRA parameters and their gradients are views into two flat float32
arrays (engine/params.py), the same layout the GPU device keeps in its buffers.

Phases (qlora_ext.profile): each op is timed under the phase users see in the table: embed,
norms, projections (q/k/v/o), dequant, rope, attention, ffn (gate/up/SwiGLU/down), lm_head, loss."""
from __future__ import annotations

import copy
from contextlib import nullcontext

import numpy as np

from ..cpu.base_matmul import base_matmul, fused_nf4_available
from ..cpu.lora_products import LoraProducts
from .._native import resolve_threads
from ..cpu.blas_threads import single_threaded_blas
from ..model.dropout import apply_dropout, dropout_key, dropout_seed
from ..model.generate import KVCache, top_candidates
from ..model.lora import FFN_PROJECTIONS
from ..model.loss import IGNORE_INDEX, cross_entropy, shifted_targets
from ..nf4 import NF4Tensor, dequantize_nf4
from ..profile import PhaseTimer
from .acts import allocate_step

# Attention work (B * Hq * T^2 * D) above which the attention kernels get every core.
ATTENTION_ALL_CORES_WORK = 1 << 28


class _LayerNorms:
    __slots__ = ("ln1", "ln2", "q_norm", "k_norm")

    def __init__(self, lw):
        self.ln1, self.ln2 = lw.input_layernorm, lw.post_attention_layernorm
        self.q_norm, self.k_norm = lw.q_norm, lw.k_norm


class CpuDevice:
    """state: a ModelState; params: engine.params.FlatParams; kernels: the C kernel module."""

    name = "cpu"
    # Batch rows are padded to a multiple of this many tokens: the C kernels take any length
    # and a step's buffers are made for its shape, so padding would only cost time.
    pad_multiple = 1

    def __init__(self, state, params, kernels, rope, threads=None, attention_threads=None, recompute_layers: int = 0,
                 timer: PhaseTimer | None = None, compute_dtype: str = "fp32"):
        cfg = state.config
        self.state, self.params, self.k = state, params, kernels
        self.layers = len(state.layers)
        self.recompute_layers = int(recompute_layers)
        self.threads, self.user_attention_threads = threads, attention_threads
        # the frozen base's products (qlora_ext.cpu.base_matmul): fp32 exact or bf16
        self.compute_dtype = compute_dtype
        self.fused = fused_nf4_available()
        # the LoRA products: the C small-GEMM where the fused kernel runs (same thread team)
        self.lora = LoraProducts(self.fused, attention_threads)
        self.eps = float(cfg.rms_norm_eps)
        self.final_norm = state.norm
        self.timer = timer if timer is not None else PhaseTimer()
        self._norms = [_LayerNorms(lw) for lw in state.layers]
        self.rope_cache = rope
        self._held: dict = {}       # proj -> (layer, fp32 weight buffer)
        self.dims = None
        self.positions = self.mask = self.segments = None
        self.dropout = 0.0
        self.drop_seed = self.drop_step = None

    # ---- the step's inputs ---------------------------------------------------------------
    def prepare(self, dims, positions, mask, ids, labels=None, dropout: float = 0.0, seed: int = 0,
                step: int | None = None, segments=None) -> None:
        """Take the batch: ids int [B, T], labels [B, T] or None, positions int [T] or [B, T],
        mask uint8 [B, T] or None, segments int [B, T] of packed rows or None; dropout applies
        when `step` is given."""
        self.dims, self.positions, self.mask, self.segments = dims, positions, mask, segments
        self.ids, self.labels = ids, labels
        self.tables = self.rope_cache.covering(int(np.max(positions)) + 1)
        self.dropout = float(dropout) if step is not None else 0.0
        self.drop_seed, self.drop_step = int(seed), step

    def lane(self) -> "CpuDevice":
        """A device for a micro-batch run beside this one (the split placement's lanes): the
        same weights, parameters and timer; prepare() gives it its own batch."""
        return copy.copy(self)

    def buffers(self, dims, keep: bool):
        """The program's buffers (LayerActs list, StepScratch), fresh each step."""
        return allocate_step(dims, self.layers, self.recompute_layers, keep, self.params.ranks, self.empty)

    def begin(self, dims, positions, mask, ids, labels=None, keep: bool = False, dropout: float = 0.0,
              seed: int = 0, step: int | None = None, segments=None):
        """prepare() and buffers(): the program's buffers for this batch."""
        self.prepare(dims, positions, mask, ids, labels, dropout, seed, step, segments)
        return self.buffers(dims, keep)

    def empty(self, shape, dtype=np.float32):
        return np.empty(shape, dtype)

    def zeros(self, shape, dtype=np.float32):
        return np.zeros(shape, dtype)

    @staticmethod
    def view(t, shape):
        return t.reshape(shape)

    @staticmethod
    def copy(src, dst) -> None:
        np.copyto(dst, src)

    def layer_weights(self, l: int) -> _LayerNorms:
        return self._norms[l]

    def layer_done(self) -> None:
        """Nothing to flush on the CPU."""

    # ---- weights -------------------------------------------------------------------------
    def compute_scope(self):
        """The context every computation of this device runs in: with the fused NF4 kernel,
        numpy's BLAS on one thread (qlora_ext.cpu.blas_threads says why)."""
        return single_threaded_blas() if self.fused else nullcontext()

    def weight(self, l: int, proj: str):
        """[out, in]: where the fused kernel runs (AVX-512), the NF4Tensor itself: the kernel
        decodes it inside the GEMM, in either compute dtype.  Elsewhere float32: NF4 is
        dequantized into a buffer per projection that remembers its layer, so the backward (or
        recompute) right after the same layer's forward reuses it, and BLAS does the product."""
        w = self.state.layers[l].proj[proj]
        if not isinstance(w, NF4Tensor) or self.fused:
            return w
        held = self._held.get(proj)
        if held is not None and held[0] == l:
            return held[1]
        buf = held[1] if held is not None and held[1].shape == tuple(w.shape) else np.empty(tuple(w.shape), np.float32)
        with self.timer("dequant"):
            # one thread: an OpenMP team started while OpenBLAS's threads still spin after the
            # last sgemm fights them for the cores
            dequantize_nf4(w, out=buf, threads=1)
        self._held[proj] = (l, buf)
        return buf

    # ---- LoRA linear ---------------------------------------------------------------------
    @staticmethod
    def _phase(proj: str) -> str:
        return "ffn" if proj in FFN_PROJECTIONS else "projections"

    def _mask(self, l: int, proj: str, shape):
        """Inverted-dropout multiplier [N, in] of (step, layer, proj), or None (no dropout)."""
        if self.dropout == 0.0 or self.params.lora(l, proj) is None:
            return None
        key = dropout_key(dropout_seed(self.drop_seed, self.drop_step, l), l, proj)
        return apply_dropout(np.ones(shape, np.float32), self.dropout, key)

    def linear_forward(self, l, proj, x, y, u) -> None:
        lo = self.params.lora(l, proj)
        with self.timer(self._phase(proj)):
            if y is not None:
                base_matmul(x, self.weight(l, proj), self.compute_dtype, transpose=True,
                            threads=self.user_attention_threads, out=y)
                bias = self.state.layers[l].bias.get(proj) if self.state.layers[l].bias else None
                if bias is not None:
                    y += bias
            if lo is None:
                return
            mask = self._mask(l, proj, x.shape)
            xd = x if mask is None else x * mask
            self.lora.forward(xd, self.params.A(lo), self.params.B(lo), lo.scale, u, y)

    def linear_backward(self, l, proj, dy, x, u, dx, accumulate) -> None:
        lo = self.params.lora(l, proj)
        with self.timer(self._phase(proj)):
            if dx is not None:
                W = self.weight(l, proj)
                if accumulate:
                    dx += base_matmul(dy, W, self.compute_dtype, transpose=False, threads=self.user_attention_threads)
                else:
                    base_matmul(dy, W, self.compute_dtype, transpose=False, threads=self.user_attention_threads,
                                out=dx)
            if lo is None:
                return
            mask = self._mask(l, proj, x.shape)
            xd = x if mask is None else x * mask
            self.lora.backward(xd, dy, u, self.params.A(lo), self.params.B(lo), lo.scale,
                               self.params.gA(lo), self.params.gB(lo), dx, mask)

    # ---- norms, RoPE, attention, SwiGLU, residual ----------------------------------------
    def rmsnorm_forward(self, x, w, y, rstd) -> None:
        with self.timer("norms"):
            yy, rr = self.k.rmsnorm_forward(x, w, self.eps, threads=self.threads)
            np.copyto(y, yy)
            np.copyto(rstd, rr)

    def rmsnorm_backward(self, x, w, rstd, dy, dx, accumulate) -> None:
        with self.timer("norms"):
            d, _ = self.k.rmsnorm_backward(x, w, rstd, dy, threads=self.threads)
            if accumulate:
                dx += d
            else:
                np.copyto(dx, d)

    def rope(self, t, sign: int) -> None:
        """In place on t [B, T, heads, D]: RoPE (sign +1) or its transpose (-1)."""
        with self.timer("rope"):
            f = self.k.rope_forward if sign > 0 else self.k.rope_backward
            f(t, self.positions, self.tables, threads=self.threads)

    def _attention_threads(self):
        if self.user_attention_threads is not None:
            return self.user_attention_threads
        d = self.dims
        # every core once the work is large (long sequences: attention dominates the step)
        return None if d.B * d.Hq * d.T * d.T * d.D >= ATTENTION_ALL_CORES_WORK else self.threads

    def attention_forward(self, q, k, v, attn, lse) -> None:
        with self.timer("attention"):
            o, s = self.k.attention_forward(q, k, v, self.mask, threads=self._attention_threads(),
                                            segments=self.segments)
            np.copyto(attn, o)
            np.copyto(lse, s)

    def attention_cached(self, l, cache, q, k, v, attn, lse) -> None:
        """Generation: the prompts' causal attention (cache empty) or the new tokens' over the
        cache; the new keys and values go into the cache.  lse is not written."""
        with self.timer("attention"):
            if cache.length == 0:
                o, _ = self.k.attention_forward(q, k, v, self.mask, threads=self._attention_threads())
                cache.store(l, k, v)
            else:
                o = cache.attend(l, q, k, v)
            np.copyto(attn, o)

    def attention_backward(self, q, k, v, attn, lse, dattn, dq, dk, dv) -> None:
        with self.timer("attention"):
            a, b, c = self.k.attention_backward(q, k, v, attn, lse, dattn, self.mask,
                                                threads=self._attention_threads(), segments=self.segments)
            np.copyto(dq, a)
            np.copyto(dk, b)
            np.copyto(dv, c)

    def swiglu_forward(self, g, u, m) -> None:
        """m = silu(g) * u."""
        with self.timer("ffn"):
            self.k.swiglu_forward(g, u, m, threads=self.user_attention_threads)

    def swiglu_backward(self, g, u, dm, dg, du) -> None:
        """du = dm silu(g); dg = dm u sig (1 + g (1 - sig)), sig = sigmoid(g)."""
        with self.timer("ffn"):
            self.k.swiglu_backward(g, u, dm, dg, du, threads=self.user_attention_threads)

    @staticmethod
    def add(y, x) -> None:
        y += x

    # ---- embedding and loss --------------------------------------------------------------
    def embed(self, out) -> None:
        with self.timer("embed"):
            np.take(self.state.embed_tokens, self.ids.reshape(-1), axis=0, out=out)

    def lm_head_weight(self) -> np.ndarray:
        head = self.params.lm_head()
        return head if head is not None else self.state.lm_head_weight

    def lm_head_loss(self, xf, scale: float, dh) -> float:
        """Summed cross-entropy over the counted targets of the step's labels (shifted, -100
        ignored); with dh [N, H], dh = scale · its gradient (zero on rows not counted) and
        the trained LM head's gradient added."""
        tgt = shifted_targets(self.labels).reshape(-1)
        rows = np.flatnonzero(tgt != IGNORE_INDEX)
        want = dh is not None
        total, d = cross_entropy(xf[rows], self.lm_head_weight(), tgt[rows], scale if want else None,
                                 dW=self.params.grad_lm_head() if want else None, timer=self.timer,
                                 threads=self._lm_head_threads(), product=self._lm_head_product(want))
        if want:
            dh[...] = 0.0
            dh[rows] = d
        return total

    def _lm_head_product(self, train_step: bool):
        """The frozen head's products in the device's compute dtype (the fused kernel on one
        thread per row part where it runs); numpy's float32 matmul when the head is trained
        (its gradient's products stay float32) or the kernel is not used."""
        if not self.fused or (train_step and self.params.lm_head() is not None):
            return None

        def product(x, W, transpose, out):
            base_matmul(x, W, self.compute_dtype, transpose=transpose, threads=1, out=out)
        return product

    def _lm_head_threads(self) -> int:
        """Threads of the LM head's products: with BLAS held to one thread (compute_scope),
        the rows are cut across the cores; otherwise BLAS threads them itself."""
        return resolve_threads(self.user_attention_threads) if self.fused else 1

    @staticmethod
    def loss_value(pending) -> float:
        return float(pending)

    def clear_grads(self) -> None:
        """A fresh zero gradient array: gradients handed out before stay as they were."""
        self.params.grads = np.zeros(self.params.size, np.float32)

    def logits(self, xf) -> np.ndarray:
        with self.timer("lm_head"):
            return xf @ self.lm_head_weight().T

    # ---- generation ----------------------------------------------------------------------
    def kv_cache(self, rows: int, slots: int) -> KVCache:
        cfg = self.state.config
        return KVCache(self.layers, rows, slots, int(cfg.num_key_value_heads), int(cfg.head_dim))

    def final_rows(self, x, last) -> np.ndarray:
        """The final norm of rows last[r] of each sequence of x [N, H] -> [n, H]."""
        rows = x[np.arange(len(last)) * self.dims.T + last]
        h = np.empty_like(rows)
        self.rmsnorm_forward(rows, self.final_norm, h, np.empty(len(last), np.float32))
        return h

    def next_tokens(self, x, last, k: int) -> tuple:
        """(values [n, k], ids [n, k]): the k most likely tokens after position last[r] of
        each sequence of x [N, H] (the layers' output), best first; k 0: all."""
        return top_candidates(self.logits(self.final_rows(x, last)), k)
