"""The GPU device of the layer program: every op in WGSL on one wgpu device.

At construction the base (NF4 codes + absmax, or fp32 projections; or, with weights="streamed",
one slot per projection that each layer is uploaded into before use), norms, embeddings, the
LM head and the flat parameter buffer go up once.  Per step only the token ids, labels, mask
and positions go up; the loss statistics come down.

Each op records dispatches into the runtime's pending encoder; layer_done() submits, so the
GPU runs a layer while Python records the next.  Projections (gemm="dequant") dequantize the
NF4 weight into one fp32 scratch buffer and run the fp32 GEMM (shaders/gemm_f32.wgsl) with the
LoRA term as extra K tiles; gemm="fused" runs the NF4 GEMM that dequantizes in its tile loads
(shaders/gemm.wgsl: no scratch, 3-10% slower).  The default follows the memory choice: layers
that recompute their activations mean memory is short, so the scratch (the largest
projection in fp32: 100 MB at Qwen3-4B) is left out; otherwise the faster path.  LoRA dropout draws the masks of
qlora_ext.model.dropout: the host computes the step's 7·L keys (one small upload) and
shaders/dropout.wgsl applies them.

Shape letters as in engine/acts.py."""
from __future__ import annotations

import copy
from contextlib import nullcontext

import numpy as np

from ..gpu import kernels
from ..gpu.kernels import SPLIT_SCRATCH_FLOATS, Operand
from ..gpu.decode import MAX_TOP_K, decode_attention_gpu, kv_store_gpu, topk_gpu
from ..gpu.bindings.attention import attention_backward_gpu, attention_forward_gpu, stored_ds_floats
from ..gpu.bindings.cross_entropy import LmHeadLoss
from ..gpu.bindings.gemm import gemm_gpu
from ..gpu.bindings.layer_ops import (add_gpu, bias_add_gpu, embedding_gather_gpu, rmsnorm_backward_gpu,
                                      rmsnorm_forward_gpu, rope_apply_gpu)
from ..gpu.bindings.weights import GpuWeight, StreamedLayers, WeightScratch, upload_weight
from ..gpu.runtime import GpuTensor
from ..model.dropout import dropout_keep_scale, dropout_key, dropout_seed, dropout_threshold
from ..model.generate import top_candidates
from ..model.lora import PROJECTIONS
from ..model.packing import document_starts
from ..nf4 import NF4Tensor
from ..options import WEIGHTS_ON_GPU, WEIGHTS_STREAMED
from .acts import allocate_step


class _LayerGpu:
    __slots__ = ("ln1", "ln2", "q_norm", "k_norm", "bias", "proj")

    def __init__(self, up, lw, on_gpu: bool):
        self.ln1, self.ln2 = up(lw.input_layernorm), up(lw.post_attention_layernorm)
        self.q_norm = up(lw.q_norm) if lw.q_norm is not None else None
        self.k_norm = up(lw.k_norm) if lw.k_norm is not None else None
        # frozen biases: Qwen2's q/k/v; q/k/v/o of Llama-family configs with attention_bias
        self.bias = {p: up(lw.bias[p]) for p in PROJECTIONS if lw.bias and p in lw.bias}
        self.proj = None if not on_gpu else {}


class _StepGpu:
    """One batch shape's inputs and the GPU kernels' own scratch."""

    def __init__(self, ctx, d, vocab, max_rank):
        N = d.N
        self.ids, self.labels = ctx.empty((N,), "i32"), ctx.empty((N,), "i32")
        self.pos = ctx.empty((N,), "i32")
        self.mask = ctx.empty((d.B, d.T), "u32")
        self.starts = ctx.empty((d.B, d.T), "i32")   # packed rows: each position's document start
        self.delta = ctx.empty((d.B, d.Hq, d.T))
        self.dlora = ctx.empty((N, max(max_rank, 1)))     # scale · dy B of one projection
        # the context's scratch, grown once here to what this shape's ops use in it: the
        # GEMMs' split-K partials and the attention backward's dS
        ctx.scratch(max(SPLIT_SCRATCH_FLOATS, stored_ds_floats(ctx, d.B, d.T, d.Hq)))
        self.head = None     # LmHeadLoss, made by the first loss (generation never needs it)
        self.drop = self.drop_keys = None    # LoRA dropout's buffers, made by its first step

    def dropout_buffers(self, ctx, d, layers) -> None:
        if self.drop is None:
            width = d.N * max(d.H, d.Hq * d.D, d.F)
            self.drop = (ctx.empty((width,)), ctx.empty((width,)))
            self.drop_keys = ctx.empty((layers * len(PROJECTIONS),), "u32")


class GpuKVCache:
    """Keys (after RoPE) and values of every layer in GPU memory, k[l], v[l] [B, S, Hkv, D],
    and which slots each row may attend to: valid u32 [B, S] (1 = a real token of that row),
    uploaded from its host copy as slots are marked.  As model.generate.KVCache otherwise,
    but rows that finish stay (compacts False): the step costs the same with them, and a
    fixed batch shape keeps its buffers."""

    compacts = False

    def __init__(self, ctx, layers: int, rows: int, slots: int, Hkv: int, D: int):
        self.ctx = ctx
        self.k = [ctx.empty((rows, slots, Hkv, D)) for _ in range(layers)]
        self.v = [ctx.empty((rows, slots, Hkv, D)) for _ in range(layers)]
        self.valid = ctx.zeros((rows, slots), "u32")
        self._valid = np.zeros((rows, slots), np.uint32)
        self.length = 0

    def advance(self, t: int, valid: np.ndarray) -> None:
        """Mark the t slots just stored: valid [B, t] says which hold real tokens."""
        self._valid[:, self.length:self.length + t] = valid
        self.ctx.write(self.valid, self._valid)
        self.length += t


# Rows of logits one pass of generation's LM head holds: [64, V] floats (39 MB at V = 151,936;
# lavapipe binds at most 128 MiB), however many prompts are prefilled together.
HEAD_ROWS = 64


class _DecodeRows:
    """Generation's buffers for n rows: the rows' positions in the step, their hidden states,
    after the final norm, and the logits of up to HEAD_ROWS of them."""

    def __init__(self, ctx, n: int, H: int, V: int):
        self.index = ctx.empty((n,), "i32")
        self.rows, self.h, self.rstd = ctx.empty((n, H)), ctx.empty((n, H)), ctx.empty((n,))
        self.logits = ctx.empty((min(n, HEAD_ROWS), V))


class GpuDevice:
    """state: a ModelState; params: engine.params.FlatParams (uploaded here; the GPU copy is
    the truth while training); ctx: the GPU runtime."""

    name = "gpu"
    # Batch rows are padded to a multiple of this many tokens: a step's buffers are allocated
    # once per batch shape and kept, so rounding lengths bounds the shapes (seq_len / 64 of
    # them); 64 tokens is also the attention kernels' largest query/key tile.
    pad_multiple = 64

    def __init__(self, state, params, ctx, rope, recompute_layers: int = 0, weights: str = WEIGHTS_ON_GPU,
                 gemm: str | None = None, dropout: float = 0.0):
        if weights not in (WEIGHTS_ON_GPU, WEIGHTS_STREAMED):
            raise ValueError(f"weights={weights!r}: expected {WEIGHTS_ON_GPU!r} or {WEIGHTS_STREAMED!r}")
        if gemm is None:
            gemm = "fused" if recompute_layers else "dequant"
        if gemm not in ("fused", "dequant"):
            raise ValueError(f"gemm={gemm!r}: expected 'dequant' (NF4 -> fp32 scratch, then the fp32 GEMM) or "
                             "'fused' (NF4 dequantized in the GEMM's tile loads)")
        cfg = state.config
        self.ctx, self.state = ctx, state
        start = ctx.allocated_bytes
        self.layers = len(state.layers)
        self.recompute_layers = int(recompute_layers)
        self.fused = gemm == "fused"
        self.eps = float(cfg.rms_norm_eps)
        self.V = int(cfg.vocab_size)
        self.dropout_p = float(dropout)
        up = ctx.upload
        self.embed_w = up(state.embed_tokens)
        self.head_w = self.embed_w if state.lm_head is None else up(state.lm_head)
        self.final_norm = up(state.norm)
        nf4_shapes = [] if self.fused else [w.shape for lw in state.layers for w in lw.proj.values()
                                             if isinstance(w, NF4Tensor)]
        self.scratch_w = WeightScratch(ctx, nf4_shapes)
        self._layers = [_LayerGpu(up, lw, weights == WEIGHTS_ON_GPU) for lw in state.layers]
        if weights == WEIGHTS_ON_GPU:
            for lg, lw in zip(self._layers, state.layers):
                lg.proj = {p: upload_weight(ctx, lw.proj[p]) for p in PROJECTIONS}
        self.streamed = StreamedLayers(ctx, state.layers, PROJECTIONS) if weights == WEIGHTS_STREAMED else None
        self.rope_cache = rope
        self._tab_src = None
        self._tab_version = 0      # counts RoPE table uploads (new buffers each)
        self._replays: dict = {}   # replayable(): captured runs by key and device state
        self.params = params
        self.values = up(params.values)
        self.grads = ctx.zeros((params.size,))
        self.fixed_bytes = ctx.allocated_bytes - start
        self._steps: dict = {}       # (dims, keep) -> (LayerActs list, StepScratch)
        self._decode_rows: dict = {}  # n -> _DecodeRows
        self._inputs: dict = {}      # dims -> _StepGpu
        self.step_bytes: dict = {}
        self.cur = None
        self.dims = None
        self.mask = self.starts = None   # the step's padding mask and document starts (prepare)
        self._drop_on = False
        # the first token row of this device's batch within the step's (a lane of the split
        # placement runs rows further on): dropout masks are drawn per global row
        self.row0 = 0
        # row_stable (the split placement, engine/lanes.py): each token row's results do not
        # depend on how many rows share a call, and gradients that sum over rows (LoRA, the
        # trained LM head) add one batch row at a time in row order, so a step cut into lanes
        # gives the bits of one pass
        self.row_stable = False

    # ---- buffers ---------------------------------------------------------------------------
    def empty(self, shape):
        return self.ctx.empty(tuple(shape))

    @staticmethod
    def view(t: GpuTensor, shape) -> GpuTensor:
        return t.view(shape)

    def copy(self, src, dst) -> None:
        self.ctx.copy(src.buffer, 0, dst.buffer, 0, src.nbytes)

    def replayable(self, key, run) -> None:
        """run() (a layer's ops, engine/program.py), or where it ran before with the same key
        (the program's buffers) and device state, the replay of the dispatches it recorded
        then (GpuContext.replay): the same work without the ops' Python.  The state is all the
        ops read besides their arguments: the batch shape, whether there is padding, packing
        or dropout, the RoPE tables and the context's scratch (their buffers), the rows'
        offset and row_stable, the LoRA slots and scales (params.version) and the GPU knobs
        (tuning).  Runs that write or read (streamed weights) never replay."""
        tuning = self.ctx.tuning
        if not tuning.replay:
            run()
            return
        full = (key, self.dims, self.mask is None, self.starts is None, self._drop_on, self.dropout_p,
                self._tab_version, self.ctx.scratch_version, self.row0, self.row_stable, self.params.version,
                tuning)
        got = self._replays.get(full)
        if got is not None:
            self.ctx.replay(got)
            return
        self.ctx.begin_capture()
        try:
            run()
        finally:
            got = self.ctx.end_capture()
        if got is not None:
            self._replays[full] = got

    def step_inputs(self, d) -> _StepGpu:
        """The batch shape d's input buffers and kernel scratch (made once per shape)."""
        st = self._inputs.get(d)
        if st is None:
            start = self.ctx.allocated_bytes
            st = self._inputs[d] = _StepGpu(self.ctx, d, self.V, self.params.max_rank)
            if self.dropout_p > 0.0:
                st.dropout_buffers(self.ctx, d, self.layers)
            self.step_bytes[d] = self.step_bytes.get(d, 0) + self.ctx.allocated_bytes - start
        return st

    def _loss_head(self, d) -> LmHeadLoss:
        st = self.step_inputs(d)
        if st.head is None:
            start = self.ctx.allocated_bytes
            st.head = LmHeadLoss(self.ctx, d.N, d.H, self.V, row_block=d.T if self.row_stable else None)
            self.step_bytes[d] += self.ctx.allocated_bytes - start
        return st.head

    def buffers(self, d, keep: bool):
        """(LayerActs list, StepScratch) for dims d, allocated once per (shape, keep)."""
        key = (d, keep)
        bufs = self._steps.get(key)
        if bufs is None:
            start = self.ctx.allocated_bytes
            bufs = self._steps[key] = allocate_step(d, self.layers, self.recompute_layers, keep, self.params.ranks,
                                                    self.empty)
            self.step_bytes[key] = self.ctx.allocated_bytes - start
        return bufs

    def shape_bytes(self, d, keep: bool = True) -> int:
        """GPU bytes of one training batch shape's buffers, the loss's included (allocating
        them if they are not yet)."""
        self._loss_head(d)
        self.buffers(d, keep)
        return self.step_bytes[d] + self.step_bytes[(d, keep)]

    def lane(self, kept: "GpuDevice | None" = None) -> "GpuDevice":
        """A device for rows run beside this one's (the split placement's lanes): this device's
        weights, parameters and gradient buffer as they are now, its own batch inputs and step
        buffers (kept's, the lane an earlier step made).  Not with streamed weights: their
        slots hold one layer at a time."""
        if self.streamed is not None:
            raise ValueError("lanes need the weights on the GPU (streamed slots hold one layer at a time)")
        ln = copy.copy(self)
        if kept is None:
            ln._steps, ln._inputs, ln.step_bytes, ln._decode_rows, ln._replays = {}, {}, {}, {}, {}
        else:
            ln._steps, ln._inputs, ln.step_bytes, ln._decode_rows, ln._replays = (
                kept._steps, kept._inputs, kept.step_bytes, kept._decode_rows, kept._replays)
        return ln

    def layer_weights(self, l: int) -> _LayerGpu:
        return self._layers[l]

    def layer_done(self) -> None:
        self.ctx.submit()

    @staticmethod
    def compute_scope():
        """Nothing to hold around the GPU's work (the CPU device holds numpy's BLAS)."""
        return nullcontext()

    def _proj(self, l, proj) -> GpuWeight:
        if self.streamed is not None:
            return self.streamed.load(l)[proj]
        return self._layers[l].proj[proj]

    # ---- the step's inputs -----------------------------------------------------------------
    def prepare(self, dims, positions, mask, ids, labels=None, dropout: float = 0.0, seed: int = 0,
                step: int | None = None, segments=None) -> None:
        """Upload the batch (ids, labels, mask, positions; segments int [B, T] of packed rows,
        documents as runs of equal ids, or None) and, for a training step with dropout, the
        step's mask keys."""
        self.dims = dims
        ctx = self.ctx
        st = self.cur = self.step_inputs(dims)
        self._upload_tables(int(np.max(positions)) + 1)
        B, T = dims.B, dims.T
        pos = np.broadcast_to(np.asarray(positions, np.int32), (B, T))
        ctx.write(st.pos, np.ascontiguousarray(pos).reshape(-1))
        ctx.write(st.ids, np.asarray(ids, np.int32).reshape(-1))
        if labels is not None:
            ctx.write(st.labels, np.asarray(labels, np.int32).reshape(-1))
        self.mask = None
        if mask is not None:
            ctx.write(st.mask, mask.astype(np.uint32))
            self.mask = st.mask
        self.starts = None
        if segments is not None:
            starts = document_starts(np.asarray(segments))
            if starts.shape != (B, T):
                raise ValueError(f"segments: expected shape ({B}, {T}) [B, T], got {starts.shape}")
            ctx.write(st.starts, starts)
            self.starts = st.starts
        self._drop_on = step is not None and dropout > 0.0
        if self._drop_on:
            self.dropout_p = float(dropout)
            st.dropout_buffers(ctx, dims, self.layers)
            keys = np.zeros(self.layers * len(PROJECTIONS), np.uint32)
            for l in range(self.layers):
                sd = dropout_seed(seed, step, l)
                for i, p in enumerate(PROJECTIONS):
                    keys[l * len(PROJECTIONS) + i] = dropout_key(sd, l, p)
            ctx.write(st.drop_keys, keys)

    def begin(self, dims, positions, mask, ids, labels=None, keep: bool = False, dropout: float = 0.0,
              seed: int = 0, step: int | None = None, segments=None):
        """prepare() and buffers(): the program's buffers for this batch."""
        self.prepare(dims, positions, mask, ids, labels, dropout, seed, step, segments)
        return self.buffers(dims, keep)

    def _upload_tables(self, n: int):
        tab = self.rope_cache.covering(n)
        if tab is not self._tab_src:
            self._tab_src = tab
            self.cos, self.sin = self.ctx.upload(tab.cos), self.ctx.upload(tab.sin)
            self._tab_version += 1

    # ---- LoRA linear -------------------------------------------------------------------------
    def _drop_index(self, l, proj):
        if not self._drop_on or self.params.lora(l, proj) is None:
            return None
        return l * len(PROJECTIONS) + PROJECTIONS.index(proj)

    def _apply_dropout(self, l, proj, z: GpuTensor, out: GpuTensor, add: bool) -> None:
        rows, cols = z.shape
        kernels.dropout(self.ctx, rows, cols, Operand(z), Operand(out), self.cur.drop_keys, self._drop_index(l, proj),
                        dropout_threshold(self.dropout_p), float(dropout_keep_scale(self.dropout_p)), self.row0,
                        add=add)

    def _dropped(self, l, proj, x: GpuTensor) -> GpuTensor:
        """x, or x with (l, proj)'s dropout mask and 1/(1-p) applied (a scratch view)."""
        if self._drop_index(l, proj) is None:
            return x
        xd = self.cur.drop[0].view(x.shape)
        self._apply_dropout(l, proj, x, xd, add=False)
        return xd

    def linear_forward(self, l, proj, x, y, u) -> None:
        ctx, pr = self.ctx, self._proj(l, proj)
        out, inn = pr.shape
        N = x.shape[0]
        lo = self.params.lora(l, proj)
        if lo is not None:
            gemm_gpu(ctx, self._dropped(l, proj, x), self.values, u, N, lo.r, inn, trans_b=True, alpha=lo.scale,
                     b_off=lo.a_off, row_stable=self.row_stable)
        if y is None:
            return
        lora = None if lo is None else (Operand(u), lo.r, Operand(self.values, lo.b_off), 1)
        kernels.gemm(ctx, N, out, inn, Operand(x), self._operand(pr), Operand(y), b_t=True, lora=lora)
        bias = self._layers[l].bias.get(proj)
        if bias is not None:
            bias_add_gpu(ctx, y, bias)

    def linear_backward(self, l, proj, dy, x, u, dx, accumulate) -> None:
        ctx, pr = self.ctx, self._proj(l, proj)
        out, inn = pr.shape
        N = dy.shape[0]
        lo = self.params.lora(l, proj)
        du = self.cur.dlora.view((N, lo.r)) if lo is not None else None
        if lo is not None:
            self._grad_add(dy, u, out, lo.r, N, lo.b_off)
            gemm_gpu(ctx, dy, self.values, du, N, lo.r, out, alpha=lo.scale, b_off=lo.b_off,
                     row_stable=self.row_stable)
            xa = self._dropped(l, proj, x)   # recomputed from x: the same mask as forward
            self._grad_add(du, xa, lo.r, inn, N, lo.a_off)
        if dx is None:
            return
        if lo is not None and self._drop_index(l, proj) is not None:
            # dx = dy W + mask ⊙ (du A): the masked adapter term cannot ride in the GEMM's
            # epilogue, so it is formed apart and added through the mask
            self._base_backward(N, inn, out, dy, pr, dx, accumulate, None)
            t = self.cur.drop[1].view((N, inn))
            gemm_gpu(ctx, du, self.values, t, N, inn, lo.r, b_off=lo.a_off)
            self._apply_dropout(l, proj, t, dx, add=True)
        else:
            self._base_backward(N, inn, out, dy, pr, dx, accumulate, lo, du)

    def _grad_add(self, a, b, M: int, N: int, rows: int, c_off: int) -> None:
        """grads[c_off:][M, N] += aᵀ b summed over `rows` token rows: one product, or with
        row_stable one per batch row, in row order."""
        block = self.dims.T if self.row_stable else rows
        for r0 in range(0, rows, block):
            gemm_gpu(self.ctx, a, b, self.grads, M, N, min(block, rows - r0), trans_a=True, accumulate=True,
                     a_off=r0 * M, b_off=r0 * N, c_off=c_off)

    def _base_backward(self, N, inn, out, dy, pr, dx, accumulate, lo, du=None) -> None:
        """dx (+)= dy W (+ du A when lo is given)."""
        lora = None if lo is None else (Operand(du), lo.r, Operand(self.values, lo.a_off), 2)
        kernels.gemm(self.ctx, N, inn, out, Operand(dy), self._operand(pr), Operand(dx), b_t=False, lora=lora,
                     accumulate=accumulate)

    def _operand(self, pr: GpuWeight):
        """The projection as the GEMM's B: NF4 (fused) or fp32 (its own, or dequantized into
        the scratch)."""
        if self.fused or pr.fp32 is not None:
            return pr.operand()
        return Operand(self.scratch_w.fp32(pr), 0, pr.shape[1])

    # ---- norms, RoPE, attention, SwiGLU, residual ----------------------------------------------
    def rmsnorm_forward(self, x, w, y, rstd) -> None:
        rmsnorm_forward_gpu(self.ctx, x, w, self.eps, y, rstd)

    def rmsnorm_backward(self, x, w, rstd, dy, dx, accumulate) -> None:
        rmsnorm_backward_gpu(self.ctx, x, w, rstd, dy, dx, accumulate=accumulate)

    def rope(self, t, sign: int) -> None:
        rope_apply_gpu(self.ctx, t, self.cur.pos, self.cos, self.sin, 1 if sign > 0 else -1)

    def attention_forward(self, q, k, v, attn, lse) -> None:
        attention_forward_gpu(self.ctx, q, k, v, self.mask, attn, lse, starts=self.starts)

    def attention_backward(self, q, k, v, attn, lse, dattn, dq, dk, dv) -> None:
        attention_backward_gpu(self.ctx, q, k, v, attn, lse, dattn, self.mask, dq, dk, dv, self.cur.delta,
                               starts=self.starts)

    def swiglu_forward(self, g, u, m) -> None:
        N, F = g.shape
        kernels.swiglu_forward(self.ctx, N, F, Operand(g), Operand(u), Operand(m))

    def swiglu_backward(self, g, u, dm, dg, du) -> None:
        N, F = g.shape
        kernels.swiglu_backward(self.ctx, N, F, Operand(g), Operand(u), dm, Operand(dg), Operand(du))

    def add(self, y, x) -> None:
        add_gpu(self.ctx, y, x)

    # ---- embedding, LM head, loss ----------------------------------------------------------------
    def embed(self, out) -> None:
        """The step's uploaded ids (begin) gathered from the embedding into out [N, H]."""
        embedding_gather_gpu(self.ctx, self.cur.ids, self.embed_w, out)

    def _head(self):
        off = self.params.head_off
        return (self.head_w, 0) if off is None else (self.values, off)

    def lm_head_loss(self, xf, scale: float, dh):
        """Records the loss over the step's labels (begin); with dh [N, H], dh = scale · its
        gradient and the trained head's gradient added.  Returns the stats tensor [sum, count]."""
        w, off = self._head()
        dw = self.grads if (dh is not None and self.params.head_off is not None) else None
        head = self._loss_head(self.dims)
        # the projections' weight scratch is idle during the head: room for dhidden's split K
        return head.record(xf, w, self.cur.labels, self.dims.T, scale or 0.0, dhidden=dh, dw_lm=dw, w_off=off,
                           dw_off=off, scratch=self.scratch_w.buf)

    def loss_value(self, stats) -> float:
        return float(self.ctx.to_numpy(stats)[0])

    def logits(self, xf) -> np.ndarray:
        ctx, d = self.ctx, self.dims
        w, off = self._head()
        out = ctx.empty((d.N, self.V))
        kernels.gemm(ctx, d.N, self.V, d.H, Operand(xf), Operand(w, off, d.H), Operand(out), b_t=True)
        return ctx.to_numpy(out)

    def clear_grads(self) -> None:
        self.ctx.encoder().clear_buffer(self.grads.buffer)

    # ---- generation ----------------------------------------------------------------------------
    def kv_cache(self, rows: int, slots: int) -> GpuKVCache:
        cfg = self.state.config
        return GpuKVCache(self.ctx, self.layers, rows, slots, int(cfg.num_key_value_heads), int(cfg.head_dim))

    def attention_cached(self, l, cache, q, k, v, attn, lse) -> None:
        """The prompts' causal flash attention (cache empty; lse written), or the new tokens'
        over the cache; either way the new keys and values go into the cache first."""
        ctx = self.ctx
        kv_store_gpu(ctx, k, v, cache.k[l], cache.v[l], cache.length)
        if cache.length == 0:
            attention_forward_gpu(ctx, q, k, v, mask=self.mask, o=attn, lse=lse)
        else:
            decode_attention_gpu(ctx, q, cache.k[l], cache.v[l], cache.valid, cache.length, attn)

    def generation_bytes(self, prefill, step) -> int:
        """GPU bytes of generating for prompts of dims `prefill` (rows x prompt length) with
        decoding steps of dims `step` (rows x 1), slots = prefill.T: the prefill's and the
        step's buffers (allocated here if they are not yet: the device keeps them) and the KV
        cache (counted, not allocated: a generation makes its own)."""
        from .gpu_memory import CountingContext

        start = self.ctx.allocated_bytes
        for d in (prefill, step):
            self.step_inputs(d)
            self.buffers(d, keep=False)
        self.decode_rows(step.B)
        counting = CountingContext(self.ctx)
        cfg = self.state.config
        GpuKVCache(counting, self.layers, step.B, prefill.T, int(cfg.num_key_value_heads), int(cfg.head_dim))
        return self.ctx.allocated_bytes - start + counting.allocated_bytes

    def decode_rows(self, n: int) -> _DecodeRows:
        b = self._decode_rows.get(n)
        if b is None:
            b = self._decode_rows[n] = _DecodeRows(self.ctx, n, int(self.state.config.hidden_size), self.V)
        return b

    def next_tokens(self, x, last, k: int) -> tuple:
        """(values [n, k] or None when k is 1, ids [n, k]): the k most likely tokens after
        position last[r] of each sequence of x [N, H] (the layers' output), best first; k 0:
        all.  Only the k ids (and values) per row come back from the GPU."""
        ctx, d, n = self.ctx, self.dims, len(last)
        b = self.decode_rows(n)
        rows = x
        if d.T > 1:
            ctx.write(b.index, (np.arange(n) * d.T + last).astype(np.int32))
            embedding_gather_gpu(ctx, b.index, x.view((d.N, d.H)), b.rows)
            rows = b.rows
        rmsnorm_forward_gpu(ctx, rows, self.final_norm, self.eps, b.h, b.rstd)
        return self.head_candidates(b.h, k)

    def head_candidates(self, h: GpuTensor, k: int) -> tuple:
        """next_tokens() from the final-normed rows h [n, H], HEAD_ROWS rows per pass."""
        ctx = self.ctx
        n, H = h.shape
        b = self.decode_rows(n)
        w, off = self._head()
        vals, ids = [], []
        for r0 in range(0, n, b.logits.shape[0]):
            rows = min(b.logits.shape[0], n - r0)
            logits = b.logits.view((rows, self.V))
            kernels.gemm(ctx, rows, self.V, H, Operand(h, r0 * H), Operand(w, off, H), Operand(logits), b_t=True)
            if k == 0 or k > MAX_TOP_K:
                v, i = top_candidates(ctx.to_numpy(logits), k)
            else:
                gv, gi = topk_gpu(ctx, logits, k)
                v, i = (ctx.to_numpy(gv) if k > 1 else None), ctx.to_numpy(gi).astype(np.int64)
            vals.append(v)
            ids.append(i)
        return (None if vals[0] is None else np.concatenate(vals)), np.concatenate(ids)

