"""The GPU-resident step engine: a qlora_ext Model's whole training step on one wgpu device.

At construction the base (NF4 codes + absmax, or fp32 projections), norms, embeddings, LM
head, RoPE tables and one flat buffer of every LoRA parameter go up once.  Per step only the
token ids, labels and mask go up; the loss comes down (`train_step`), or the loss and the
flat gradient (`loss_and_grads`, for checks against the CPU model).

Per projection product, by default one dispatch of gemm.wgsl (NF4 dequantized while staged,
LoRA up-projection in the epilogue; qlora_ext.gpu.kernels.gemm); the rank-r LoRA
products and gradients use resident_gemm on the flat parameter buffer at each tensor's
offset.  gemm="dequant" instead dequantizes into an fp32 scratch (weights.py) and uses
resident_gemm throughout.

Shape letters: B batch, T tokens, N = B*T, H hidden, Hq/Hkv heads, D head dim, F FFN width,
r LoRA rank, V vocab.

LoRA dropout (training steps only) uses the counter-hash masks of every placement
(qlora_ext.model.layers.dropout_seed / qlora_ext.cpu.ffn.dropout_key): the host computes
the 7·L keys of a step (one 4·7·L-byte upload) and shaders/dropout.wgsl applies
them, so the resident mode drops exactly the inputs the split mode drops."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ...model.lora import LM_HEAD_NAME, PROJECTIONS, peft_name
from .adamw import AdamWGpu
from .attention import attention_backward_gpu, attention_forward_gpu
from .. import kernels
from ..kernels import PARAM_ALIGN, Operand
from ..runtime import GpuContext, GpuTensor, shared_context
from .cross_entropy import IGNORE_INDEX, LmHeadLoss
from .gemm import gemm_gpu
from .layer_ops import (add_gpu, bias_add_gpu, embedding_gather_gpu, rmsnorm_backward_gpu, rmsnorm_forward_gpu,
                        rope_apply_gpu)
from .weights import StreamedLayers, WeightScratch, upload_weight


@dataclass
class _Lora:
    """Offsets (elements) of A [r, in] and B [out, r] in the flat parameter buffer."""

    a_off: int
    b_off: int
    r: int
    scale: float


class _Acts:
    """One layer's saved activations (all [N, ...] f32 GpuTensors)."""

    def __init__(self, ctx: GpuContext, N, H, Hq, Hkv, D, F, B, T, loras: dict, qk_norm: bool):
        e = ctx.empty
        self.x = e((N, H))                   # layer input
        self.h1, self.rstd1 = e((N, H)), e((N,))
        self.q_pre = e((N, Hq * D)) if qk_norm else None
        self.k_pre = e((N, Hkv * D)) if qk_norm else None
        self.q_rstd = e((N * Hq,)) if qk_norm else None
        self.k_rstd = e((N * Hkv,)) if qk_norm else None
        self.q, self.k, self.v = e((B, T, Hq, D)), e((B, T, Hkv, D)), e((B, T, Hkv, D))
        self.attn, self.lse = e((B, T, Hq, D)), e((B, Hq, T))
        self.x2 = e((N, H))
        self.h2, self.rstd2 = e((N, H)), e((N,))
        self.g, self.u, self.m = e((N, F)), e((N, F)), e((N, F))
        self.lora_u = {p: e((N, lo.r)) for p, lo in loras.items()}   # scale * x Aᵀ


class ResidentEngine:
    """model: a qlora_ext.model.model.Model (its base state, LoRA config and weights)."""

    def __init__(self, model, ctx: GpuContext | None = None, gradient_checkpointing: bool = False,
                 lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 weights: str = "resident", gemm: str = "fused"):
        """weights: "resident" (the whole base uploaded once) or "stream" (the base stays on
        the host; each layer's projections go up before its forward and again before its
        backward: for GPUs too small for the NF4 base).  gemm: "fused" (shaders/gemm.wgsl:
        NF4 dequantized in the tile loads, LoRA up-projection in the
        epilogue) or "dequant" (resident_nf4 into an fp32 scratch, then resident_gemm)."""
        if weights not in ("resident", "stream"):
            raise ValueError(f"weights={weights!r}: expected 'resident' or 'stream'")
        if gemm not in ("fused", "dequant"):
            raise ValueError(f"gemm={gemm!r}: expected 'fused' (gemm.wgsl: the NF4 GEMM with "
                             "the LoRA epilogue) or 'dequant' (NF4 -> fp32 scratch, then resident_gemm)")
        self.fused = gemm == "fused"
        self.ctx = ctx = shared_context() if ctx is None else ctx
        start_bytes = ctx.allocated_bytes
        cfg = model.config
        st = model.state
        self.dropout = float(model.lora_config.dropout)
        self._drop_step = None    # the model step whose masks apply while recording a training step
        self.model = model
        self.L = len(st.layers)
        self.H, self.V = int(cfg.hidden_size), int(cfg.vocab_size)
        self.Hq, self.Hkv, self.D = int(cfg.num_attention_heads), int(cfg.num_key_value_heads), int(cfg.head_dim)
        self.F = int(st.layers[0].proj["gate_proj"].shape[0])
        self.eps = float(cfg.rms_norm_eps)
        self.qk_norm = st.layers[0].q_norm is not None
        self.checkpointing = bool(gradient_checkpointing)
        up = ctx.upload
        self.embed = up(st.embed_tokens)
        # A trained head lives in the flat parameter buffer instead (head_off below).
        self.lm_w = self.embed if (st.lm_head is None or model.train_lm_head) else up(st.lm_head)
        self.norm = up(st.norm)
        self.scratch = WeightScratch(ctx)
        self.layers = []
        for lw in st.layers:
            d = {"ln1": up(lw.input_layernorm), "ln2": up(lw.post_attention_layernorm)}
            if weights == "resident":
                d["proj"] = {p: upload_weight(ctx, lw.proj[p]) for p in PROJECTIONS}
            if self.qk_norm:
                d["q_norm"], d["k_norm"] = up(lw.q_norm), up(lw.k_norm)
            # Frozen biases keyed by projection: Qwen2's q/k/v; q/k/v/o of Llama-family configs
            # with attention_bias=True.
            d["bias"] = {p: up(lw.bias.get(p, lw.bias.get(p[0]))) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                         if lw.bias and (p in lw.bias or p[0] in lw.bias)}
            self.layers.append(d)
        self.streamed = StreamedLayers(ctx, st.layers, PROJECTIONS) if weights == "stream" else None
        # One flat buffer of all trainable parameters, in model.parameters() order.
        params = model.parameters()
        self.names = list(params)
        # Each tensor starts at a multiple of PARAM_ALIGN elements (the fused GEMM binds LoRA
        # matrices as aligned sub-ranges); the zero padding stays zero under AdamW.
        self.offsets, off = {}, 0
        for n, a in params.items():
            self.offsets[n] = (off, a.shape)
            off += -(-a.size // PARAM_ALIGN) * PARAM_ALIGN
        self.n_params = off
        flat = np.zeros(off, np.float32)
        for n, a in params.items():
            flat[self.offsets[n][0]:self.offsets[n][0] + a.size] = a.reshape(-1)
        self.params = up(flat)
        self.grads = ctx.zeros((self.n_params,))
        # A trained LM head is one more tensor of the flat buffers (model.parameters() holds
        # it, untied from the embeddings as PEFT's modules_to_save does).
        self.head_off = self.offsets[LM_HEAD_NAME][0] if LM_HEAD_NAME in self.offsets else None
        self.refresh_lora()
        self.optimizer = AdamWGpu(ctx, self.n_params, lr, betas, eps, weight_decay)
        self._shapes, self._shape_bytes = {}, {}
        self._resident_bytes = ctx.allocated_bytes - start_bytes

    def refresh_lora(self) -> None:
        """Per layer and projection: the LoRA tensors' offsets, rank and scale, from the
        model's current adapters (the scale changes when an adapter with another alpha of
        the same shapes is loaded)."""
        self.loras = []
        for l in range(self.L):
            per = {}
            for p in PROJECTIONS:
                pair = self.model.lora.get(l, p)
                if pair is not None:
                    per[p] = _Lora(self.offsets[peft_name(l, p, "A")][0], self.offsets[peft_name(l, p, "B")][0],
                                   int(pair.A.shape[0]), float(pair.scale))
            self.loras.append(per)

    def configure_optimizer(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                            weight_decay: float = 0.0) -> None:
        """A fresh AdamW (zero moments, step 0) with these hyperparameters."""
        self.optimizer = AdamWGpu(self.ctx, self.n_params, lr, betas, eps, weight_decay)

    def _proj(self, l, proj):
        if self.streamed is not None:
            return self.streamed.load(l)[proj]
        return self.layers[l]["proj"][proj]

    # ---- LoRA linear ----------------------------------------------------------------------
    def _linear_forward(self, l, proj, x: GpuTensor, y: GpuTensor | None, u: GpuTensor | None):
        """y [N, out] = x Wᵀ + (scale x Aᵀ) Bᵀ; u [N, r] keeps scale x Aᵀ for backward.
        y=None: only u (a recompute whose output nothing reads)."""
        ctx, pr = self.ctx, self._proj(l, proj)
        out, inn = pr.shape
        N = x.shape[0]
        lo = self.loras[l].get(proj)
        if lo is not None:
            xa = self._dropped(l, proj, x)   # the adapter's input: x, or x with dropout
            gemm_gpu(ctx, xa, self.params, u, N, lo.r, inn, trans_b=True, alpha=lo.scale, b_off=lo.a_off)
        if y is None:
            return
        if self.fused:
            # one dispatch: NF4 dequantized in the tile loads, u Bᵀ in the epilogue
            lora = None if lo is None else (Operand(u), lo.r, Operand(self.params, lo.b_off), 1)
            kernels.gemm(ctx, N, out, inn, Operand(x), pr.operand(), Operand(y), b_t=True, lora=lora)
        else:
            gemm_gpu(ctx, x, self.scratch.fp32(pr), y, N, out, inn, trans_b=True)
            if lo is not None:
                gemm_gpu(ctx, u, self.params, y, N, out, lo.r, trans_b=True, accumulate=True, b_off=lo.b_off)
        bias = self.layers[l]["bias"].get(proj)
        if bias is not None:
            bias_add_gpu(ctx, y, bias)

    def _linear_backward(self, l, proj, dy: GpuTensor, x: GpuTensor, u: GpuTensor | None,
                         dx: GpuTensor, accumulate: bool, du: GpuTensor):
        """dx (+)= dy W + scale (dy B) A; dA += (scale dy B)ᵀ x, dB += dyᵀ u into self.grads."""
        ctx, pr = self.ctx, self._proj(l, proj)
        out, inn = pr.shape
        N = dy.shape[0]
        lo = self.loras[l].get(proj)
        dropped = lo is not None and self._drop_key(l, proj) is not None
        if lo is not None:
            r = lo.r
            gemm_gpu(ctx, dy, u, self.grads, out, r, N, trans_a=True, accumulate=True, c_off=lo.b_off)
            gemm_gpu(ctx, dy, self.params, du, N, r, out, alpha=lo.scale, b_off=lo.b_off)
            xa = self._dropped(l, proj, x)   # recomputed from x: the same mask as forward
            gemm_gpu(ctx, du, xa, self.grads, r, inn, N, trans_a=True, accumulate=True, c_off=lo.a_off)
        if dropped:
            # dx = dy W + mask ⊙ (du A): the masked adapter term cannot ride in the GEMM's
            # epilogue, so it is formed apart and added through the mask.
            if self.fused:
                kernels.gemm(ctx, N, inn, out, Operand(dy), pr.operand(), Operand(dx), b_t=False,
                             accumulate=accumulate)
            else:
                gemm_gpu(ctx, dy, self.scratch.fp32(pr), dx, N, inn, out, accumulate=accumulate)
            t = self._drop_bufs[1].view((N, inn))
            gemm_gpu(ctx, du, self.params, t, N, inn, lo.r, b_off=lo.a_off)
            self._apply_dropout(l, proj, t, dx, add=True)
        elif self.fused:
            lora = None if lo is None else (Operand(du), lo.r, Operand(self.params, lo.a_off), 2)
            kernels.gemm(ctx, N, inn, out, Operand(dy), pr.operand(), Operand(dx), b_t=False, lora=lora,
                         accumulate=accumulate)
        else:
            gemm_gpu(ctx, dy, self.scratch.fp32(pr), dx, N, inn, out, accumulate=accumulate)
            if lo is not None:
                gemm_gpu(ctx, du, self.params, dx, N, inn, lo.r, accumulate=True, b_off=lo.a_off)

    # ---- LoRA dropout ---------------------------------------------------------------------
    def _drop_key(self, l, proj):
        """Index of (l, proj)'s key in the step's key buffer, or None (no dropout now)."""
        if self._drop_step is None or self.loras[l].get(proj) is None:
            return None
        return l * len(PROJECTIONS) + PROJECTIONS.index(proj)

    def _set_drop_keys(self, s) -> None:
        """Upload the step's keys (one per layer and projection) into s["drop_keys"]; the
        dropped adapter input and the masked adapter gradient go to s["drop"]'s buffers."""
        from ...cpu.ffn import dropout_key
        from ...model.layers import dropout_seed

        keys = np.zeros(self.L * len(PROJECTIONS), np.uint32)
        for l in range(self.L):
            seed = dropout_seed(self.model.seed, self._drop_step, l)
            for i, p in enumerate(PROJECTIONS):
                keys[l * len(PROJECTIONS) + i] = dropout_key(seed, l, p)
        self.ctx.write(s["drop_keys"], keys)
        self._drop_keys, self._drop_bufs = s["drop_keys"], s["drop"]

    def _dropped(self, l, proj, x: GpuTensor) -> GpuTensor:
        """x [N, in], or x with (l, proj)'s dropout mask and 1/(1-p) applied (a scratch view)."""
        if self._drop_key(l, proj) is None:
            return x
        xd = self._drop_bufs[0].view(x.shape)
        self._apply_dropout(l, proj, x, xd, add=False)
        return xd

    def _apply_dropout(self, l, proj, z: GpuTensor, out: GpuTensor, add: bool) -> None:
        from ...cpu.ffn import dropout_keep_scale, dropout_threshold

        rows, cols = z.shape
        kernels.dropout(self.ctx, rows, cols, Operand(z), Operand(out), self._drop_keys, self._drop_key(l, proj),
                        dropout_threshold(self.dropout), float(dropout_keep_scale(self.dropout)), 0, add=add)

    # ---- per-shape buffers ----------------------------------------------------------------
    def _bufs(self, B, T):
        key = (B, T)
        s = self._shapes.get(key)
        if s is None:
            ctx, N = self.ctx, B * T
            start_bytes = ctx.allocated_bytes
            H, Hq, Hkv, D, F = self.H, self.Hq, self.Hkv, self.D, self.F
            n_acts = 1 if self.checkpointing else self.L
            s = {
                "acts": [_Acts(ctx, N, H, Hq, Hkv, D, F, B, T, self.loras[l], self.qk_norm)
                         for l in range(n_acts)],
                "inputs": [ctx.empty((N, H)) for _ in range(self.L)] if self.checkpointing else None,
                "ids": ctx.empty((N,), "i32"), "labels": ctx.empty((N,), "i32"),
                "pos": ctx.upload(np.tile(np.arange(T, dtype=np.int32), B), "i32"),
                "mask": ctx.empty((B, T), "u32"),
                "x": ctx.empty((N, H)), "xf": ctx.empty((N, H)), "rstdf": ctx.empty((N,)),
                "gy": ctx.empty((N, H)), "gx": ctx.empty((N, H)),
                "dx2": ctx.empty((N, H)), "dh": ctx.empty((N, H)),
                "dm": ctx.empty((N, F)), "dg": ctx.empty((N, F)), "du": ctx.empty((N, F)),
                "da": ctx.empty((N, Hq * D)), "dq": ctx.empty((B, T, Hq, D)),
                "dk": ctx.empty((B, T, Hkv, D)), "dv": ctx.empty((B, T, Hkv, D)),
                "delta": ctx.empty((B, Hq, T)), "dlora": ctx.empty((N, max(
                    [lo.r for per in self.loras for lo in per.values()] or [1]))),
                "head": LmHeadLoss(ctx, N, H, self.V),
            }
            if self.qk_norm:
                s["dqn"], s["dkn"] = ctx.empty((N * Hq, D)), ctx.empty((N * Hkv, D))
            if self.dropout > 0.0:
                wide = N * max(H, Hq * D, F)
                s["drop"] = (ctx.empty((wide,)), ctx.empty((wide,)))
                s["drop_keys"] = ctx.empty((self.L * len(PROJECTIONS),), "u32")
            self._shapes[key] = s
            self._shape_bytes[key] = ctx.allocated_bytes - start_bytes
        return s

    def _tables(self, T):
        k = self.model._layers
        k.ensure_positions(T)
        tab = k.tables
        if getattr(self, "_tab_src", None) is not tab:
            self._tab_src = tab
            self.cos, self.sin = self.ctx.upload(tab.cos), self.ctx.upload(tab.sin)

    # ---- layer ----------------------------------------------------------------------------
    def _layer_forward(self, l, a: _Acts, x: GpuTensor, y: GpuTensor | None, s, B, T, mask):
        """x [N, H] (copied into a.x) -> y [N, H].  y=None (the recompute of activation
        checkpointing): everything backward reads, without the down projection's output."""
        ctx, w = self.ctx, self.layers[l]
        N, Hq, Hkv, D = B * T, self.Hq, self.Hkv, self.D
        if x is not a.x:
            ctx.encoder().copy_buffer_to_buffer(x.buffer, 0, a.x.buffer, 0, x.nbytes)
        rmsnorm_forward_gpu(ctx, a.x, w["ln1"], self.eps, a.h1, a.rstd1)
        qdst = a.q_pre if self.qk_norm else a.q
        kdst = a.k_pre if self.qk_norm else a.k
        self._linear_forward(l, "q_proj", a.h1, qdst, a.lora_u.get("q_proj"))
        self._linear_forward(l, "k_proj", a.h1, kdst, a.lora_u.get("k_proj"))
        self._linear_forward(l, "v_proj", a.h1, a.v, a.lora_u.get("v_proj"))
        if self.qk_norm:
            rmsnorm_forward_gpu(ctx, a.q_pre.view((N * Hq, D)), w["q_norm"], self.eps, a.q.view((N * Hq, D)), a.q_rstd)
            rmsnorm_forward_gpu(ctx, a.k_pre.view((N * Hkv, D)), w["k_norm"], self.eps, a.k.view((N * Hkv, D)), a.k_rstd)
        rope_apply_gpu(ctx, a.q, s["pos"], self.cos, self.sin, 1)
        rope_apply_gpu(ctx, a.k, s["pos"], self.cos, self.sin, 1)
        attention_forward_gpu(ctx, a.q, a.k, a.v, mask, a.attn, a.lse)
        self._linear_forward(l, "o_proj", a.attn.view((N, Hq * D)), a.x2, a.lora_u.get("o_proj"))
        add_gpu(ctx, a.x2, a.x)
        rmsnorm_forward_gpu(ctx, a.x2, w["ln2"], self.eps, a.h2, a.rstd2)
        self._linear_forward(l, "gate_proj", a.h2, a.g, a.lora_u.get("gate_proj"))
        self._linear_forward(l, "up_proj", a.h2, a.u, a.lora_u.get("up_proj"))
        kernels.swiglu_forward(ctx, N, self.F, Operand(a.g), Operand(a.u), Operand(a.m))
        self._linear_forward(l, "down_proj", a.m, y, a.lora_u.get("down_proj"))
        if y is not None:
            add_gpu(ctx, y, a.x2)

    def _layer_backward(self, l, a: _Acts, dy: GpuTensor, dx: GpuTensor, s, B, T, mask):
        """dy [N, H] -> dx [N, H] (dx may not alias dy); LoRA grads added into self.grads."""
        ctx, w = self.ctx, self.layers[l]
        N, Hq, Hkv, D = B * T, self.Hq, self.Hkv, self.D
        dl, enc = s["dlora"], ctx.encoder
        self._linear_backward(l, "down_proj", dy, a.m, a.lora_u.get("down_proj"), s["dm"], False, dl)
        kernels.swiglu_backward(ctx, N, self.F, Operand(a.g), Operand(a.u), s["dm"], Operand(s["dg"]),
                                Operand(s["du"]))
        self._linear_backward(l, "gate_proj", s["dg"], a.h2, a.lora_u.get("gate_proj"), s["dh"], False, dl)
        self._linear_backward(l, "up_proj", s["du"], a.h2, a.lora_u.get("up_proj"), s["dh"], True, dl)
        dx2 = s["dx2"]
        enc().copy_buffer_to_buffer(dy.buffer, 0, dx2.buffer, 0, dy.nbytes)
        rmsnorm_backward_gpu(ctx, a.x2, w["ln2"], a.rstd2, s["dh"], dx2, accumulate=True)
        self._linear_backward(l, "o_proj", dx2, a.attn.view((N, Hq * D)), a.lora_u.get("o_proj"),
                              s["da"], False, dl)
        dq, dk, dv = s["dq"], s["dk"], s["dv"]
        attention_backward_gpu(ctx, a.q, a.k, a.v, a.attn, a.lse, s["da"].view((B, T, Hq, D)), mask,
                               dq, dk, dv, s["delta"])
        rope_apply_gpu(ctx, dq, s["pos"], self.cos, self.sin, -1)
        rope_apply_gpu(ctx, dk, s["pos"], self.cos, self.sin, -1)
        if self.qk_norm:
            # Gradients through the per-head q/k norms, into their own buffers.
            rmsnorm_backward_gpu(ctx, a.q_pre.view((N * Hq, D)), w["q_norm"], a.q_rstd,
                                 dq.view((N * Hq, D)), s["dqn"])
            rmsnorm_backward_gpu(ctx, a.k_pre.view((N * Hkv, D)), w["k_norm"], a.k_rstd,
                                 dk.view((N * Hkv, D)), s["dkn"])
            dq, dk = s["dqn"], s["dkn"]
        dh = s["dh"]
        self._linear_backward(l, "q_proj", dq.view((N, Hq * D)), a.h1, a.lora_u.get("q_proj"), dh, False, dl)
        self._linear_backward(l, "k_proj", dk.view((N, Hkv * D)), a.h1, a.lora_u.get("k_proj"), dh, True, dl)
        self._linear_backward(l, "v_proj", dv.view((N, Hkv * D)), a.h1, a.lora_u.get("v_proj"), dh, True, dl)
        enc().copy_buffer_to_buffer(dx2.buffer, 0, dx.buffer, 0, dx2.nbytes)
        rmsnorm_backward_gpu(ctx, a.x, w["ln1"], a.rstd1, dh, dx, accumulate=True)

    # ---- step -----------------------------------------------------------------------------
    def _forward_layers(self, input_ids, attention_mask, labels, keep: bool):
        """Upload the batch, record embedding + all layers + final norm (into s["xf"]).
        keep=False reuses one activation set for every layer (nothing kept for backward)."""
        ids, inp, lab = self.model._inputs(input_ids, attention_mask, labels)
        B, T = ids.shape
        ctx = self.ctx
        s = self._bufs(B, T)
        if self._drop_step is not None:
            self._set_drop_keys(s)
        self._tables(T)
        ctx.write(s["ids"], ids.reshape(-1).astype(np.int32))
        if lab is not None:
            ctx.write(s["labels"], lab.reshape(-1).astype(np.int32))
        mask = None
        if inp.mask is not None:
            ctx.write(s["mask"], inp.mask.astype(np.uint32))
            mask = s["mask"]
        x = s["x"]
        embedding_gather_gpu(ctx, s["ids"], self.embed, x)
        for l in range(self.L):
            a = s["acts"][0 if (self.checkpointing or not keep) else l]
            if self.checkpointing and keep:
                ctx.encoder().copy_buffer_to_buffer(x.buffer, 0, s["inputs"][l].buffer, 0, x.nbytes)
            self._layer_forward(l, a, x, x, s, B, T, mask)
            # Send each layer as soon as it is recorded: the GPU runs it while Python records
            # the next (one submit per step left the GPU idle for the whole recording).
            ctx.submit()
        rmsnorm_forward_gpu(ctx, x, self.norm, self.eps, s["xf"], s["rstdf"])
        return B, T, lab, mask, s

    def forward(self, input_ids, attention_mask=None) -> np.ndarray:
        """int [B, T] -> float32 logits [B, T, V], like Model.forward (the logits come down)."""
        B, T, _, _, s = self._forward_layers(input_ids, attention_mask, None, keep=False)
        ctx, N = self.ctx, B * T
        logits = s.get("logits")
        if logits is None:
            logits = s["logits"] = ctx.empty((N, self.V))
        w, off = (self.lm_w, 0) if self.head_off is None else (self.params, self.head_off)
        kernels.gemm(ctx, N, self.V, self.H, Operand(s["xf"]), Operand(w, off, self.H), Operand(logits), b_t=True)
        return ctx.to_numpy(logits).reshape(B, T, self.V)

    def _record(self, input_ids, labels, attention_mask, want_grad: bool, reduction: str = "mean",
                clear_grads: bool = True):
        """Upload the batch and record forward (+ backward); returns (stats tensor, count).
        The gradients are those of the mean loss, or of the summed loss (reduction="sum");
        clear_grads=False adds them to self.grads (gradient accumulation)."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        # dropout in training steps only (as Model: eval losses and forward see no mask)
        self._drop_step = self.model.step if (want_grad and self.dropout > 0.0) else None
        try:
            return self._record_steps(input_ids, labels, attention_mask, want_grad, reduction, clear_grads)
        finally:
            self._drop_step = None

    def _record_steps(self, input_ids, labels, attention_mask, want_grad, reduction, clear_grads):
        B, T, lab, mask, s = self._forward_layers(input_ids, attention_mask, labels, keep=want_grad)
        ctx = self.ctx
        x = s["x"]
        count = int(np.count_nonzero(lab[:, 1:] != IGNORE_INDEX))
        if want_grad and clear_grads:
            ctx.encoder().clear_buffer(self.grads.buffer)
        dh = s["dh"] if want_grad else None
        scale = (1.0 if reduction == "sum" else 1.0 / count) if count else 0.0
        if self.head_off is None:
            stats = s["head"].record(s["xf"], self.lm_w, s["labels"], T, scale, dhidden=dh)
        else:
            stats = s["head"].record(s["xf"], self.params, s["labels"], T, scale, dhidden=dh,
                                     dw_lm=self.grads if want_grad else None,
                                     w_off=self.head_off, dw_off=self.head_off)
        if not want_grad or count == 0:
            return stats, count
        # Ping-pong: each layer's backward reads dy and writes dx, then they swap.
        dy, dx = s["gy"], s["gx"]
        rmsnorm_backward_gpu(ctx, x, self.norm, s["rstdf"], dh, dy)
        for l in reversed(range(self.L)):
            a = s["acts"][0 if self.checkpointing else l]
            if self.checkpointing:
                # Recompute this layer's activations from its saved input; its output is
                # not needed, so the down projection's GEMM (a fifth to a quarter of the
                # layer's forward GEMM FLOPs at Qwen3 shapes) is skipped.
                self._layer_forward(l, a, s["inputs"][l], None, s, B, T, mask)
            self._layer_backward(l, a, dy, dx, s, B, T, mask)
            ctx.submit()
            dy, dx = dx, dy
        return stats, count

    @contextmanager
    def _kernel_timing(self):
        """With qlora_ext.profile.PROFILER on (and timestamp queries available), every kernel
        recorded inside becomes a "gpu" span of it; otherwise nothing."""
        from ...profile import PROFILER

        if not (PROFILER.enabled and self.ctx.has_timestamps):
            yield
            return
        if self.ctx._timing is None or self.ctx._timing.profiler is not PROFILER:
            self.ctx.enable_timing(profiler=PROFILER)
        yield
        self.ctx.kernel_times()   # the remaining passes become spans

    @staticmethod
    def _finish(loss_sum, count, reduction):
        if reduction == "sum":
            return float(loss_sum)
        return float(loss_sum) / count if count else float("nan")

    def loss_and_grads(self, input_ids, labels, attention_mask=None, reduction: str = "mean"):
        """(loss, {PEFT name: float32 grad}) like Model.loss_and_grads (downloads grads)."""
        with self._kernel_timing():
            stats, count = self._record(input_ids, labels, attention_mask, want_grad=True, reduction=reduction)
        loss_sum, _ = self.ctx.to_numpy(stats)
        return self._finish(loss_sum, count, reduction), self._unflatten(self.ctx.to_numpy(self.grads))

    def loss(self, input_ids, labels, attention_mask=None, reduction: str = "mean") -> float:
        stats, count = self._record(input_ids, labels, attention_mask, want_grad=False, reduction=reduction)
        loss_sum, _ = self.ctx.to_numpy(stats)
        return self._finish(loss_sum, count, reduction)

    # ---- the trainer's update, with the gradients kept on the GPU -------------------------
    def accumulate(self, input_ids, labels, attention_mask=None, first: bool = True) -> float:
        """Forward + backward of one micro-batch; the gradient of its *summed* token loss is
        written to (first=True) or added to the device gradient buffer.  Returns the summed
        loss (the 8-byte statistics come down; nothing else does)."""
        with self._kernel_timing():
            stats, count = self._record(input_ids, labels, attention_mask, want_grad=True, reduction="sum",
                                        clear_grads=first)
        loss_sum, _ = self.ctx.to_numpy(stats)
        return float(loss_sum) if count else 0.0

    def grad_sq_norm(self, scale: float = 1.0) -> float:
        """sum((scale * g)^2) over the gradient buffer: per-workgroup float32 partials in a
        fixed order (deterministic), summed in float64 on the host."""
        with self._kernel_timing():
            return self.optimizer.sq_norm(self.grads, scale)

    def apply_update(self, lr: float, grad_scale: float = 1.0, clip_coef: float = 1.0) -> None:
        """AdamW on g = (grad * grad_scale) * clip_coef, each product rounded to float32 as
        the CPU Trainer's in-place scalings are."""
        with self._kernel_timing():
            self.optimizer.step(self.params, self.grads, lr, grad_scale=grad_scale, clip_coef=clip_coef)

    def download_grads(self) -> np.ndarray:
        """The flat gradient buffer (float32 [n_params], aligned layout) for an all-reduce."""
        return self.ctx.to_numpy(self.grads)

    def upload_grads(self, flat: np.ndarray) -> None:
        self.ctx.write(self.grads, flat)

    def train_step(self, input_ids, labels, attention_mask=None, lr: float | None = None) -> float:
        """Forward, backward and AdamW on the GPU (mean loss, no clipping); only the 8-byte
        loss statistics come down.  Advances model.step (the dropout masks) afterwards, as
        Model.loss_and_grads does."""
        with self._kernel_timing():
            stats, count = self._record(input_ids, labels, attention_mask, want_grad=True)
            self.model.step += 1
            if count:
                self.optimizer.step(self.params, self.grads, lr)
        loss_sum, _ = self.ctx.to_numpy(stats)
        return self._finish(loss_sum, count, "mean")

    def _unflatten(self, flat: np.ndarray) -> dict:
        return {n: flat[o:o + int(np.prod(sh))].reshape(sh).copy() for n, (o, sh) in self.offsets.items()}

    def parameters(self) -> dict:
        """{PEFT name: float32 array} downloaded from the flat buffer."""
        return self._unflatten(self.ctx.to_numpy(self.params))

    def sync_to_model(self) -> None:
        """Copy the trained LoRA weights into the CPU model (for save_adapter)."""
        self.model.set_parameters(self.parameters())

    def set_parameters(self, values: dict) -> None:
        """Upload {PEFT name: array} (every trainable name) into the flat buffer (resume)."""
        missing = [n for n in self.names if n not in values]
        if missing:
            raise ValueError(f"set_parameters: no value for {missing[0]!r} ({len(missing)} missing)")
        flat = np.empty(self.n_params, np.float32)
        for n, (o, sh) in self.offsets.items():
            a = np.asarray(values[n], np.float32)
            if a.shape != sh:
                raise ValueError(f"parameter {n}: shape {a.shape}, expected {sh}")
            flat[o:o + a.size] = a.reshape(-1)
        self.ctx.write(self.params, flat)

    # ---- optimizer state, in qlora_ext.train.optim.AdamW's format --------------------------
    def optimizer_state(self) -> dict:
        """{"step", "<name>.exp_avg", "<name>.exp_avg_sq"}: the CPU AdamW's state_dict, so a
        checkpoint from either mode resumes in the other (downloads the moments)."""
        st = self.optimizer.state_dict()
        out = {"step": st["step"]}
        for n, (o, sh) in self.offsets.items():
            k = int(np.prod(sh))
            out[f"{n}.exp_avg"] = st["exp_avg"][o:o + k].reshape(sh)
            out[f"{n}.exp_avg_sq"] = st["exp_avg_sq"][o:o + k].reshape(sh)
        return out

    def load_optimizer_state(self, state: dict) -> None:
        flat = {"step": state.get("step")}
        if flat["step"] is None:
            raise ValueError("optimizer state has no 'step' entry")
        for kind in ("exp_avg", "exp_avg_sq"):
            buf = np.empty(self.n_params, np.float32)
            for n, (o, sh) in self.offsets.items():
                key = f"{n}.{kind}"
                if key not in state:
                    raise ValueError(f"optimizer state lacks {key!r} (was it saved for another LoRA config?)")
                a = np.asarray(state[key], np.float32)
                if a.shape != sh:
                    raise ValueError(f"optimizer state {key!r} has shape {a.shape}, parameter has {sh}")
                buf[o:o + a.size] = a.reshape(-1)
            flat[kind] = buf
        self.optimizer.load_state_dict(flat)

    # ---- memory ---------------------------------------------------------------------------
    def memory_report(self, B: int | None = None, T: int | None = None) -> dict:
        """GPU bytes: resident weights + parameters + optimizer state ("resident"), and with
        B, T the per-batch-shape buffers (saved activations, gradients, logits chunk)."""
        rep = {"resident": self._resident_bytes}
        if B is not None and T is not None:
            self._bufs(B, T)
            rep["activations"] = self._shape_bytes[(B, T)]
        return rep

