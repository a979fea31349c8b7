"""CPU FFN backend: numpy BLAS (float32 sgemm) + the C NF4 dequant kernel.

Shapes (Llama/Qwen MLP), N = all token rows of the batch, H = hidden, I = intermediate:
    x [N, H];  Wg, Wu [I, H];  Wd [H, I]  (HF Linear layout, y = x Wᵀ)
    gu = x [Wg; Wu]ᵀ  [N, 2I]   (gate and up in ONE sgemm: g = gu[:, :I], u = gu[:, I:])
    h  = silu(g) * u  [N, I]
    y  = h Wdᵀ        [N, H]
    LoRA on proj p with input z: + scale · ((drop(z) Aᵀ) Bᵀ),  A [r, in], B [out, r]

The products with the frozen weights go through qlora_ext.cpu.base_matmul, in the backend's
compute_dtype ("fp32" exact, or "bf16"; DecoderLayers sets it from LoraConfig through
set_base_products); on AVX-512 it decodes NF4 inside the GEMM and the buffers below are unused.

Weights: each layer's NF4 weights are dequantized just in time into two reused fp32 buffers
([2I, H] for gate+up, [H, I] for down) and are overwritten by the next layer.  The buffers
remember which layer they hold, so the backward of the layer the forward just ran (the last
layer, at the turn of a training step) reuses them without a second dequant: a one-layer
cache that costs no memory beyond the two buffers."""
from __future__ import annotations

import numpy as np

from ..backend import FfnBackend, FfnGrads, FfnLora
from ..model.lora import PROJECTIONS
from ..nf4 import NF4Tensor, dequantize_nf4
from .base_matmul import base_matmul, fused_nf4_available

FFN_PROJ = ("gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------
# Dropout masks: a counter-based hash, the same on CPU (here) and GPU (shaders/lora_dropout.wgsl)
# so that a step is reproducible across backends.  Element (i, j) of z [N, in] for projection
# p of layer l is kept iff  (hash(idx ^ key) >> 8) >= round(p_drop · 2^24),  idx = i·in + j,
# key = hash(seed_lo ^ hash(seed_hi ^ hash(l·3 + p + 1))).  Kept values are scaled by
# keep_scale = float32(1 / (1 - p_drop)).

def _hash32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer mixer (xorshift-multiply, 2 rounds); uint32 in, uint32 out."""
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        x = x ^ (x >> np.uint32(16))
    return x


def dropout_key(seed: int, layer: int, proj: str) -> int:
    """The per-(seed, layer, projection) 32-bit key of the dropout hash; any of the 7
    projections (the attention ones too: every placement draws all its masks this way)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    k = _hash32(np.uint32((layer * 8 + PROJECTIONS.index(proj) + 1) & 0xFFFFFFFF))
    k = _hash32(np.uint32(s >> 32) ^ k)
    return int(_hash32(np.uint32(s & 0xFFFFFFFF) ^ k))


def dropout_threshold(p: float) -> int:
    """Integer threshold on the top 24 hash bits: P(drop) = threshold / 2^24."""
    return int(round(float(p) * (1 << 24)))


def dropout_keep_scale(p: float) -> np.float32:
    return np.float32(1.0 / (1.0 - float(p)))


def apply_dropout(z: np.ndarray, p: float, key: int) -> np.ndarray:
    """z [N, in] float32 -> z · mask · keep_scale (a new array); p == 0 returns z itself."""
    if p == 0.0:
        return z
    n, k = z.shape
    out = np.empty_like(z)
    thr = np.uint32(dropout_threshold(p))
    scale = dropout_keep_scale(p)
    # in row chunks: the uint32 temporaries stay a few MB
    rows = max(1, (1 << 20) // max(k, 1))
    cols = np.arange(k, dtype=np.uint32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        idx = (np.arange(r0, r1, dtype=np.uint32)[:, None] * np.uint32(k)) + cols[None, :]
        keep = (_hash32(idx ^ np.uint32(key)) >> np.uint32(8)) >= thr
        np.multiply(z[r0:r1], scale, out=out[r0:r1])
        out[r0:r1][~keep] = 0.0
    return out


# ---------------------------------------------------------------------------------------------

def check_ffn_weights(state) -> tuple:
    """(H, I, {proj: (out, in)}) of a ModelState's FFN; ValueError naming the layer and
    projection whose weight has another shape or is neither NF4 nor float32."""
    cfg = state.config
    H, I = int(cfg.hidden_size), int(cfg.intermediate_size)
    shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    for l, layer in enumerate(state.layers):
        for p in FFN_PROJ:
            w = layer.proj[p]
            if tuple(w.shape) != shapes[p]:
                raise ValueError(f"layer {l} {p}: weight shape {tuple(w.shape)}, expected {shapes[p]}")
            if not isinstance(w, NF4Tensor) and (not isinstance(w, np.ndarray) or w.dtype != np.float32):
                raise ValueError(f"layer {l} {p}: expected NF4Tensor or float32 ndarray, got "
                                 f"{type(w).__name__} {getattr(w, 'dtype', '')}")
    return H, I, shapes


def check_ffn_input(x, hidden: int, what: str = "x") -> np.ndarray:
    """x must be float32 [N, hidden]; returns it C-contiguous (copies only if it was not)."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"{what} must be float32, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != hidden:
        raise ValueError(f"{what} has shape {x.shape}, expected [N, {hidden}]")
    return np.ascontiguousarray(x)


def check_lora(lora: FfnLora | None, shapes: dict) -> None:
    """shapes[proj] = (out, in); every pair must be float32 A [r, in], B [out, r]."""
    if lora is None:
        return
    if not 0.0 <= float(lora.dropout) < 1.0:
        raise ValueError(f"FfnLora.dropout must be in [0, 1), got {lora.dropout!r}")
    for proj, pair in lora.pairs.items():
        if proj not in FFN_PROJ:
            raise ValueError(f"FfnLora has an adapter for {proj!r}; expected some of {FFN_PROJ}")
        out_f, in_f = shapes[proj]
        A, B = pair.A, pair.B
        if A.dtype != np.float32 or B.dtype != np.float32:
            raise ValueError(f"LoRA {proj}: A and B must be float32, got {A.dtype}, {B.dtype}")
        if A.ndim != 2 or A.shape[1] != in_f or B.ndim != 2 or B.shape != (out_f, A.shape[0]):
            raise ValueError(f"LoRA {proj}: A {A.shape}, B {B.shape}; expected A [r, {in_f}], B [{out_f}, r]")


def silu_mul(gu: np.ndarray, inter: int) -> tuple[np.ndarray, np.ndarray]:
    """gu [N, 2I] -> (h = silu(g)·u [N, I], sig = sigmoid(g) [N, I]), float32."""
    g, u = gu[:, :inter], gu[:, inter:]
    sig = np.negative(g)
    np.exp(sig, out=sig)
    sig += 1.0
    np.reciprocal(sig, out=sig)
    h = g * sig
    h *= u
    return h, sig


class _Ctx:
    """What ffn_backward needs: x [N, H], gu [N, 2I] (pre-activation, LoRA included), and per
    adapted proj the dropped input z_p (None = the undropped input) and t_p = z_p Aᵀ [N, r]."""

    __slots__ = ("layer", "x", "gu", "lora", "z", "t")

    def __init__(self, layer, x, gu, lora):
        self.layer, self.x, self.gu, self.lora = layer, x, gu, lora
        self.z, self.t = {}, {}


class CpuFfnBackend(FfnBackend):
    """The FFN on the CPU: OpenBLAS/MKL sgemm through numpy, NF4 dequantized per layer."""

    name = "cpu"

    def __init__(self, threads: int | None = 1):
        # Threads of the C dequant (None = all cores).  Default 1: right after an sgemm,
        # OpenBLAS's worker threads are still spinning, and an OpenMP team started then fights
        # them for the cores (measured on 2 cores: 2.5-3.5 ms instead of 0.2 ms for a 1536x576
        # dequant, the whole FFN fwd+bwd 1.5-2x slower).  One thread dequantizes at ~7 Gelem/s,
        # a few percent of the sgemm time at N >= 512.  BLAS keeps its own thread setting.
        self.threads = threads
        self.compute_dtype = "fp32"  # of the frozen products (qlora_ext.cpu.base_matmul)
        self.base_threads = None     # their threads (None: QLORA_EXT_THREADS, else all cores)
        self.state = None
        self._wgu = self._wd = None  # reused fp32 buffers [2I, H], [H, I]
        self._held = None            # layer index whose weights are in the buffers

    def set_base_products(self, compute_dtype: str, threads: int | None) -> None:
        """The model's compute_dtype and thread count for the products with the frozen weights."""
        self.compute_dtype, self.base_threads = compute_dtype, threads

    # -- weights -------------------------------------------------------------------------------
    def prepare(self, state) -> None:
        self.state = state
        self.hidden, self.inter, self.shapes = check_ffn_weights(state)
        self._held = None
        self._wgu = self._wd = None

    def _weights(self, layer: int):
        """(Wgu [2I, H] or (Wg, Wu), Wd [H, I]) as float32, dequantizing NF4 into the buffers."""
        if self.state is None:
            raise ValueError("CpuFfnBackend: call prepare(state) first")
        if not 0 <= layer < len(self.state.layers):
            raise ValueError(f"layer {layer} out of range [0, {len(self.state.layers)})")
        proj = self.state.layers[layer].proj
        wg, wu, wd = proj["gate_proj"], proj["up_proj"], proj["down_proj"]
        if all(isinstance(w, NF4Tensor) for w in (wg, wu, wd)) and fused_nf4_available():
            return (wg, wu), wd  # decoded inside base_matmul's kernel
        H, I = self.hidden, self.inter
        fresh = self._held != layer
        if isinstance(wg, NF4Tensor) and isinstance(wu, NF4Tensor):
            if self._wgu is None:
                self._wgu = np.empty((2 * I, H), dtype=np.float32)
            if fresh:
                dequantize_nf4(wg, out=self._wgu[:I], threads=self.threads)
                dequantize_nf4(wu, out=self._wgu[I:], threads=self.threads)
            gate_up = self._wgu
        else:
            gate_up = (self._fp32(wg, None), self._fp32(wu, None))
        if isinstance(wd, NF4Tensor):
            if self._wd is None:
                self._wd = np.empty((H, I), dtype=np.float32)
            if fresh:
                dequantize_nf4(wd, out=self._wd, threads=self.threads)
            down = self._wd
        else:
            down = wd
        self._held = layer
        return gate_up, down

    def _fp32(self, w, out):
        return dequantize_nf4(w, out=out, threads=self.threads) if isinstance(w, NF4Tensor) else w

    # -- forward -------------------------------------------------------------------------------
    def ffn_forward(self, layer: int, x: np.ndarray, lora: FfnLora | None, need_backward: bool = True,
                    while_waiting=None):
        x = check_ffn_input(x, self.hidden if self.state is not None else x.shape[-1])
        gate_up, wd = self._weights(layer)
        check_lora(lora, self.shapes)
        I = self.inter
        N, cd, nt = x.shape[0], self.compute_dtype, self.base_threads
        if isinstance(gate_up, np.ndarray):
            gu = base_matmul(x, gate_up, cd, threads=nt)         # [N, 2I], one product
        else:
            gu = np.empty((N, 2 * I), dtype=np.float32)
            base_matmul(x, gate_up[0], cd, threads=nt, out=gu[:, :I])
            base_matmul(x, gate_up[1], cd, threads=nt, out=gu[:, I:])
        ctx = _Ctx(layer, x, gu, lora) if need_backward else None
        pairs = lora.pairs if lora is not None else {}
        for p, sl in (("gate_proj", slice(0, I)), ("up_proj", slice(I, 2 * I))):
            if p in pairs:
                gu[:, sl] += self._lora_fwd(ctx, layer, p, x, pairs[p], lora)
        h, _ = silu_mul(gu, I)
        y = base_matmul(h, wd, cd, threads=nt)                   # [N, H]
        if "down_proj" in pairs:
            y += self._lora_fwd(ctx, layer, "down_proj", h, pairs["down_proj"], lora)
        if while_waiting is not None:  # nothing to overlap on the host: run it after
            while_waiting()
        return y, ctx

    @staticmethod
    def _lora_fwd(ctx, layer, p, z, pair, lora):
        """scale · (drop(z) Aᵀ) Bᵀ; records drop(z) (if dropped) and t = drop(z) Aᵀ in ctx."""
        zd = apply_dropout(z, lora.dropout, dropout_key(lora.seed, layer, p)) if lora.dropout else z
        t = zd @ pair.A.T                                        # [N, r]
        if ctx is not None:
            ctx.t[p] = t
            ctx.z[p] = zd if zd is not z else None
        return (t * np.float32(pair.scale)) @ pair.B.T

    # -- backward ------------------------------------------------------------------------------
    def ffn_backward(self, layer: int, ctx, dy: np.ndarray, while_waiting=None) -> FfnGrads:
        if not isinstance(ctx, _Ctx):
            raise ValueError("ffn_backward needs the ctx of ffn_forward(..., need_backward=True)")
        if ctx.layer != layer:
            raise ValueError(f"ffn_backward for layer {layer} got the ctx of layer {ctx.layer}")
        dy = check_ffn_input(dy, self.hidden, "dy")
        if dy.shape[0] != ctx.x.shape[0]:
            raise ValueError(f"dy has {dy.shape[0]} rows, the forward had {ctx.x.shape[0]}")
        gate_up, wd = self._weights(layer)
        I = self.inter
        pairs = ctx.lora.pairs if ctx.lora is not None else {}
        grads = {}
        h, sig = silu_mul(ctx.gu, I)
        cd, nt = self.compute_dtype, self.base_threads
        dh = base_matmul(dy, wd, cd, transpose=False, threads=nt)  # [N, I]
        if "down_proj" in pairs:
            dh += self._lora_bwd(ctx, "down_proj", h, pairs["down_proj"], dy, grads)
        del h
        # SwiGLU backward into one [N, 2I] buffer so that dx is one sgemm with [Wg; Wu]
        g, u = ctx.gu[:, :I], ctx.gu[:, I:]
        dgu = np.empty_like(ctx.gu)
        dg, du = dgu[:, :I], dgu[:, I:]
        np.multiply(g, sig, out=du)                              # silu(g)
        du *= dh                                                 # du = dh · silu(g)
        # dg = dh · u · sig · (1 + g (1 - sig))
        np.subtract(1.0, sig, out=dg)
        dg *= g
        dg += 1.0
        dg *= sig
        dg *= u
        dg *= dh
        del dh, sig
        if isinstance(gate_up, np.ndarray):
            dx = base_matmul(dgu, gate_up, cd, transpose=False, threads=nt)  # [N, H], one product
        else:
            dx = base_matmul(dg, gate_up[0], cd, transpose=False, threads=nt)
            dx += base_matmul(du, gate_up[1], cd, transpose=False, threads=nt)
        for p, d in (("gate_proj", dg), ("up_proj", du)):
            if p in pairs:
                dx += self._lora_bwd(ctx, p, ctx.x, pairs[p], np.ascontiguousarray(d), grads)
        if while_waiting is not None:
            while_waiting()
        return FfnGrads(dx=dx, lora=grads)

    @staticmethod
    def _lora_bwd(ctx, p, z, pair, dout, grads):
        """dB = s·doutᵀ t, dt = s·dout B, dA = dtᵀ drop(z); returns dz = drop'(dt A)."""
        s = np.float32(pair.scale)
        t = ctx.t[p]
        zd = ctx.z[p] if ctx.z[p] is not None else z
        dB = (dout.T @ t) * s                                    # [out, r]
        dt = (dout @ pair.B) * s                                 # [N, r]
        dA = dt.T @ zd                                           # [r, in]
        grads[p] = (dA, dB)
        dz = dt @ pair.A                                         # [N, in]
        lora = ctx.lora
        if lora.dropout:
            # dropout is z·mask·keep_scale, so its backward applies the same mask and scale
            dz = apply_dropout(dz, lora.dropout, dropout_key(lora.seed, ctx.layer, p))
        return dz

    def close(self) -> None:
        self._wgu = self._wd = None
        self._held = None
        self.state = None

