"""wgpu FFN backend: a layer's gate/up/SwiGLU/down (+ LoRA) forward and backward on the GPU.

Shapes, N = all token rows of the batch (processed in row chunks that keep every buffer under
the adapter's binding limit), H = hidden, I = intermediate, r* = LoRA ranks (0 = not adapted):
    x, y, dy, dx [N, H];  gu, dgu [N, 2I] (gate | up);  h, dh [N, I]
    Wgu = [Wg; Wu] [2I, H] (NF4: two tensors, one buffer);  Wd [H, I]
    ts_gu = x [sg·Ag; su·Au]ᵀ [N, rg+ru];  ts_d = h (sd·Ad)ᵀ [N, rd]       (scaled LoRA inputs)
    forward:  gu = x Wguᵀ + ts_gu Lguᵀ   (Lgu = blockdiag(Bg, Bu) [2I, rg+ru], fused epilogue;
              the host uploads Lguᵀ and Bdᵀ so that the epilogue reads L rows contiguously)
              h = silu(g)·u;   y = h Wdᵀ + ts_d Bdᵀ
    backward: dts_d = dy (sd·Bd);  dh = dy Wd + dts_d Ad;   dgu = SwiGLU'(gu, dh)
              dts_gu = [dg (sg·Bg), du (su·Bu)];   dx = dgu Wgu + dts_gu [Ag; Au]
              dB = doutᵀ ts,  dA = dtsᵀ drop(z)   (lora_grad.wgsl)
With dropout > 0 the dropped inputs drop(x) (per proj) and drop(h) are materialized in the
forward and kept for the backward, and the LoRA input gradients are masked separately.
A weight larger than the binding limit is split by output rows into pieces Wgu[s0:s1] (NF4:
each piece starts on a block boundary of its tensor; a piece may hold the end of Wg and the start
of Wu); forward GEMMs write columns s0:s1 of gu (or y), the backward's dx = Σ dgu[:, s0:s1] Wgu[s0:s1]
(and dh over the pieces of Wd) accumulates piece by piece.

Per layer and direction: one command encoder, one submit, one readback (y; or dx and all LoRA
grads in one buffer).  Weights stream by default: each layer's NF4 codes and absmax go up as
they are (4-bit) through two reused MAP_WRITE staging buffers; right after layer l is submitted
the host writes layer l±1 into the other staging buffer while the GPU computes (the overlap),
and the next layer's encoder starts with the staging→device copy.  resident=True uploads all
layers once in prepare() (GpuContext.write_bytes: through the context's reused staging
buffer).  Activations the backward needs (x, gu, LoRA inputs) stay on the GPU between a
layer's forward and backward."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..backend import FfnBackend, FfnGrads, FfnLora
from ..cpu.ffn import (FFN_PROJ, check_ffn_input, check_ffn_weights, check_lora, dropout_keep_scale,
                       dropout_key, dropout_threshold)
from ..nf4 import NF4Tensor, dequantize_nf4
from . import kernels as K
from .runtime import GpuContext, GpuError, pick_adapter, read_staging, shared_context, write_staging
from .kernels import Nf4B, Operand

F32 = 4


@dataclass
class _LayerPlan:
    """Where one layer's FFN weights sit in its upload (byte offsets) and on the device."""

    nf4: bool
    pieces: list            # [(name, byte offset in the layer's blob, ndarray)]
    sizes: dict             # device buffer name -> bytes
    offsets: dict           # device buffer name -> byte offset of that buffer's data in the blob
    gu: list = None         # row pieces of Wgu: [(s0, s1, buffer names, (split, code_off1, abs_off1))]
    d: list = None          # row pieces of Wd, same form
    blocksize: int = 64
    total: int = 0


class _Slot:
    """Device buffers holding one layer's FFN weights."""

    def __init__(self, ctx, sizes: dict, tag: str):
        self.bufs = {k: ctx.buffer(v, what=f"{tag} {k}") for k, v in sizes.items()}
        self.layer = None


class WgpuFfnBackend(FfnBackend):
    name = "wgpu"

    def __init__(self, ctx: GpuContext | None = None, resident: bool = False, tiles=None,
                 max_rows: int | None = None, allow_software: bool = True, max_binding: int | None = None):
        if ctx is None:
            adapter = pick_adapter(allow_software=allow_software)
            if adapter is None:
                raise GpuError("no wgpu adapter found" + ("" if allow_software else " (software adapters excluded)"))
            ctx = shared_context(adapter)
        self.ctx = ctx
        # bytes per storage binding: the adapter's limit, or less (tests force weight splitting)
        self.max_binding = self.ctx.max_binding if max_binding is None else min(int(max_binding), self.ctx.max_binding)
        self.resident = bool(resident)
        # tiles: a GemmTiles for every GEMM, or by default a TileChooser (per-shape choice)
        self.tiles = tiles.check(self.ctx) if tiles is not None else K.TileChooser(self.ctx)
        self.max_rows = max_rows  # tests force row chunking with a small value
        self.state = None
        self.name = f"wgpu ({self.ctx.info['name']})"

    # -- weights -------------------------------------------------------------------------------
    def prepare(self, state) -> None:
        H, I, self.shapes = check_ffn_weights(state)
        self.hidden, self.inter, self.state = H, I, state
        self.plans = [self._plan(layer.proj) for layer in state.layers]
        biggest = max(p.total for p in self.plans)
        if self.resident:
            self.slots = []
            for l, plan in enumerate(self.plans):
                slot = _Slot(self.ctx, plan.sizes, f"layer {l}")
                for name, off, arr in plan.pieces:
                    raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
                    pad = np.zeros((raw.size + 3) // 4 * 4, np.uint8)
                    pad[: raw.size] = raw
                    self.ctx.write_bytes(slot.bufs[name], off - plan.offsets[name], pad)
                slot.layer = l
                self.slots.append(slot)
        else:
            sizes = {}
            for plan in self.plans:
                for k, v in plan.sizes.items():
                    sizes[k] = max(sizes.get(k, 0), v)
            self.slots = [_Slot(self.ctx, sizes, f"weight slot {i}") for i in range(2)]
            self.staging = [self.ctx.staging(biggest, True, f"weight upload {i}") for i in range(2)]
            self.staged = [None, None]  # layer held by each staging buffer

    def _plan(self, proj) -> _LayerPlan:
        wg, wu, wd = proj["gate_proj"], proj["up_proj"], proj["down_proj"]
        nf4 = (all(isinstance(w, NF4Tensor) for w in (wg, wu, wd))
               and wg.blocksize == wu.blocksize == wd.blocksize)
        H, I = self.hidden, self.inter
        pieces, sizes, offsets = [], {}, {}
        cursor = 0

        def put(name, parts):
            """parts -> one device buffer `name`; returns each part's byte offset in it."""
            nonlocal cursor
            offsets[name] = cursor
            start, at = cursor, []
            for arr in parts:
                pieces.append((name, cursor, arr))
                at.append(cursor - start)
                cursor += (arr.nbytes + 7) // 8 * 8  # mapped writes need 8-byte offsets
            sizes[name] = cursor - start
            cursor = (cursor + 255) // 256 * 256
            return at

        # a piece's buffer (rounded up to 256 B, plus up to 16 B of padding between parts) must
        # stay within the binding limit
        budget = self.max_binding // 256 * 256 - 16
        if nf4:
            bs = wg.blocksize
            out = {}
            for tag, tensors, cols in (("gu", (wg, wu), H), ("d", (wd,), I)):
                step = bs // math.gcd(bs, cols)  # rows·cols must be a multiple of the block size
                cap = min(budget * 2 // cols, budget // 4 * bs // cols) // step * step
                out[tag] = []
                for pi, part in enumerate(_split_rows([t.shape[0] for t in tensors], cap, step, cols, lambda _: True)):
                    at_c = put(f"{tag}{pi}_codes", [tensors[si].packed[r0 * cols // 2: (r1 * cols + 1) // 2]
                                                    for si, r0, r1 in part])
                    at_a = put(f"{tag}{pi}_abs", [np.ascontiguousarray(tensors[si].absmax[r0 * cols // bs: -(-r1 * cols // bs)],
                                                                       np.float32) for si, r0, r1 in part])
                    two = len(part) == 2
                    fields = ((part[0][2] - part[0][1]) if two else 1 << 31,
                              at_c[1] // 4 if two else 0, at_a[1] // 4 if two else 0)
                    s0 = part[0][0] * I + part[0][1]
                    out[tag].append((s0, s0 + sum(r1 - r0 for _, r0, r1 in part),
                                     (f"{tag}{pi}_codes", f"{tag}{pi}_abs"), fields))
            plan = _LayerPlan(True, pieces, sizes, offsets, gu=out["gu"], d=out["d"], blocksize=bs, total=cursor)
        else:
            # fp32 weights (or a mix): dequantized on the host, uploaded as fp32
            f = [dequantize_nf4(w) if isinstance(w, NF4Tensor) else w for w in (wg, wu, wd)]
            out = {}
            for tag, tensors, cols in (("gu", f[:2], H), ("d", f[2:], I)):
                cap = budget // (4 * cols)
                out[tag] = []
                # fp32 parts must sit back to back: join Wu to Wg only if Wg's bytes need no padding
                join = lambda part, cols=cols: (part[2] - part[1]) * cols % 2 == 0  # noqa: E731
                for pi, part in enumerate(_split_rows([t.shape[0] for t in tensors], cap, 1, cols, join)):
                    put(f"{tag}{pi}_f32", [tensors[si][r0:r1] for si, r0, r1 in part])
                    s0 = part[0][0] * I + part[0][1]
                    out[tag].append((s0, s0 + sum(r1 - r0 for _, r0, r1 in part), (f"{tag}{pi}_f32",), None))
            plan = _LayerPlan(False, pieces, sizes, offsets, gu=out["gu"], d=out["d"], total=cursor)
        return plan

    def _b_operands(self, layer: int, slot: _Slot):
        """Row pieces [(s0, s1, B)] of gate|up [2I, H] and of down [H, I] as kernel operands."""
        plan = self.plans[layer]
        res = []
        for pieces, cols in ((plan.gu, self.hidden), (plan.d, self.inter)):
            ops = []
            for s0, s1, names, fields in pieces:
                if plan.nf4:
                    b = Nf4B(slot.bufs[names[0]], slot.bufs[names[1]], cols, *fields, plan.blocksize)
                else:
                    b = Operand(slot.bufs[names[0]], 0, cols)
                ops.append((s0, s1, b))
            res.append(ops)
        return res

    def _stage(self, layer: int) -> None:
        """Write layer's weights into its staging buffer (host memcpy; no GPU wait unless the
        buffer's last copy is still queued)."""
        s = layer % 2
        if self.staged[s] == layer:
            return
        plan = self.plans[layer]
        write_staging(self.ctx, self.staging[s], [(off, arr) for _, off, arr in plan.pieces], "upload weights")
        self.staged[s] = layer

    def _weights(self, layer: int) -> _Slot:
        if self.state is None:
            raise ValueError("WgpuFfnBackend: call prepare(state) first")
        if not 0 <= layer < len(self.plans):
            raise ValueError(f"layer {layer} out of range [0, {len(self.plans)})")
        if self.resident:
            return self.slots[layer]
        slot = self.slots[layer % 2]
        if slot.layer != layer:
            self._stage(layer)
            plan = self.plans[layer]
            st = self.staging[layer % 2]
            for name, size in plan.sizes.items():
                self.ctx.copy(st, plan.offsets[name], slot.bufs[name], 0, size)
            slot.layer = layer
        return slot

    def prefetch(self, layer: int) -> None:
        if not self.resident and self.state is not None and 0 <= layer < len(self.plans):
            if self.slots[layer % 2].layer != layer:
                self._stage(layer)

    # -- helpers -------------------------------------------------------------------------------
    def _chunks(self, n: int):
        H, I = self.hidden, self.inter
        widest = max(2 * I, H) * F32
        rows = max(1, self.max_binding // widest)
        rows = min(rows, int(self.ctx.limits["max-compute-workgroups-per-dimension"]))
        if self.max_rows:
            rows = min(rows, self.max_rows)
        return [(r, min(n, r + rows)) for r in range(0, n, rows)]

    def _ranks(self, lora):
        pairs = lora.pairs if lora is not None else {}
        return {p: (pairs[p].A.shape[0] if p in pairs else 0) for p in FFN_PROJ}

    def _upload_small(self, arrays: dict):
        """Small per-call arrays (LoRA weights, dropout keys) -> one buffer; returns (buffer, element
        offsets, each a multiple of 64: the GEMM binds LoRA matrices as sub-ranges)."""
        offs, cur, parts = {}, 0, []
        for k, a in arrays.items():
            a = np.ascontiguousarray(a, np.float32).reshape(-1)
            offs[k] = cur
            parts.append(a)
            cur += (a.size + 63) // 64 * 64
        buf = self.ctx.buffer(max(cur, 1) * F32, what="LoRA weights")
        blob = np.zeros(max(cur, 1), np.float32)
        for k, a in zip(offs, parts):
            blob.view(np.uint32)[offs[k]: offs[k] + a.size] = a.view(np.uint32)   # bit-exact (the keys)
        self.ctx.device.queue.write_buffer(buf, 0, blob)
        return buf, offs

    def _upload_rows(self, arr: np.ndarray, what: str):
        """[N, C] float32 -> per-chunk device buffers through one MAP_WRITE staging buffer."""
        st = self._act_staging(arr.nbytes, what)
        write_staging(self.ctx, st, [(0, arr)], f"upload {what}")
        out = []
        for r0, r1 in self._chunk_list:
            b = self.ctx.buffer((r1 - r0) * arr.shape[1] * F32, what=f"{what} rows {r0}:{r1}")
            self.ctx.copy(st, r0 * arr.shape[1] * F32, b, 0, (r1 - r0) * arr.shape[1] * F32)
            out.append(b)
        return out

    def _act_staging(self, nbytes, what):
        cache = self.__dict__.setdefault("_act_st", {})
        key = ("w", what)
        st = cache.get(key)
        if st is None or st.size < nbytes:
            st = cache[key] = self.ctx.staging(max(nbytes, 256), True, what)
        return st

    def _readback(self, nbytes):
        st = self.__dict__.get("_rb")
        if st is None or st.size < nbytes:
            st = self._rb = self.ctx.staging(max(nbytes, 256), False, "readback")
        return st

    # -- forward -------------------------------------------------------------------------------
    def ffn_forward(self, layer: int, x: np.ndarray, lora: FfnLora | None, need_backward: bool = True,
                    while_waiting=None):
        if self.state is None:
            raise ValueError("WgpuFfnBackend: call prepare(state) first")
        x = check_ffn_input(x, self.hidden)
        check_lora(lora, self.shapes)
        ctx, H, I, T = self.ctx, self.hidden, self.inter, self.tiles
        N = x.shape[0]
        r = self._ranks(lora)
        rgu, rd = r["gate_proj"] + r["up_proj"], r["down_proj"]
        drop = lora is not None and lora.dropout > 0
        self._chunk_list = self._chunks(N)
        slot = self._weights(layer)
        b_gu, b_d = self._b_operands(layer, slot)

        lw = {}
        if lora is not None:
            pr = lora.pairs
            if rgu:
                sa = [pr[p].A * np.float32(pr[p].scale) for p in ("gate_proj", "up_proj") if p in pr]
                lw["sA_gu"] = np.concatenate(sa, 0)                      # [rg+ru, H]
                # blockdiag(Bg, Bu)ᵀ [rg+ru, 2I]: stored [R, N] so the epilogue's loads coalesce
                L = np.zeros((rgu, 2 * I), np.float32)
                if r["gate_proj"]:
                    L[: r["gate_proj"], :I] = pr["gate_proj"].B.T
                if r["up_proj"]:
                    L[r["gate_proj"]:, I:] = pr["up_proj"].B.T
                for i, (s0, s1, _) in enumerate(b_gu):
                    lw[f"L_gu{i}"] = L[:, s0:s1]  # [rg+ru, s1-s0] per weight piece
            if rd:
                lw["sA_d"] = pr["down_proj"].A * np.float32(pr["down_proj"].scale)  # [rd, I]
                for i, (q0, q1, _) in enumerate(b_d):
                    lw[f"B_dT{i}"] = pr["down_proj"].B.T[:, q0:q1]                  # [rd, q1-q0]
        if drop:
            lw["keys"] = _dropout_keys(lora, layer)
        lbuf, lo = self._upload_small(lw) if lw else (None, {})

        xs = self._upload_rows(x, "x")
        rb = self._readback(N * H * F32)
        chunks = []
        for ci, (r0, r1) in enumerate(self._chunk_list):
            M = r1 - r0
            c = {"x": xs[ci], "r0": r0, "M": M}
            c["gu"] = ctx.buffer(M * 2 * I * F32, what="gate|up activations")
            h = ctx.buffer(M * I * F32, what="SwiGLU output")
            y = ctx.buffer(M * H * F32, what="FFN output")
            lora_gu = lora_d = None
            if rgu:
                c["ts_gu"] = ctx.buffer(M * rgu * F32, what="LoRA gate|up inputs")
                if drop:
                    col = 0
                    for p in ("gate_proj", "up_proj"):
                        if not r[p]:
                            continue
                        zd = c[f"xd_{p}"] = ctx.buffer(M * H * F32, what=f"dropped x for {p}")
                        K.dropout(ctx, M, H, Operand(c["x"], 0, H), Operand(zd, 0, H),
                                  lbuf, lo["keys"] + FFN_PROJ.index(p), dropout_threshold(lora.dropout),
                                  float(dropout_keep_scale(lora.dropout)), r0)
                        K.gemm(ctx, M, r[p], H, Operand(zd, 0, H), Operand(lbuf, lo["sA_gu"] + col * H, H),
                               Operand(c["ts_gu"], col, rgu), b_t=True, tiles=T)
                        col += r[p]
                else:
                    K.gemm(ctx, M, rgu, H, Operand(c["x"], 0, H), Operand(lbuf, lo["sA_gu"], H),
                           Operand(c["ts_gu"], 0, rgu), b_t=True, tiles=T)
            for i, (s0, s1, b) in enumerate(b_gu):  # gu[:, s0:s1] = x Wgu[s0:s1]ᵀ (+ LoRA)
                lora_gu = (Operand(c["ts_gu"], 0, rgu), rgu, Operand(lbuf, lo[f"L_gu{i}"]), 2) if rgu else None
                K.gemm(ctx, M, s1 - s0, H, Operand(c["x"], 0, H), b, Operand(c["gu"], s0, 2 * I),
                       b_t=True, lora=lora_gu, tiles=T)
            K.swiglu_forward(ctx, M, I, Operand(c["gu"], 0, 2 * I), Operand(c["gu"], I, 2 * I), Operand(h))
            if rd:
                c["ts_d"] = ctx.buffer(M * rd * F32, what="LoRA down inputs")
                z = h
                if drop:
                    z = c["hd"] = ctx.buffer(M * I * F32, what="dropped h")
                    K.dropout(ctx, M, I, Operand(h, 0, I), Operand(z, 0, I),
                              lbuf, lo["keys"] + FFN_PROJ.index("down_proj"), dropout_threshold(lora.dropout),
                              float(dropout_keep_scale(lora.dropout)), r0)
                K.gemm(ctx, M, rd, I, Operand(z, 0, I), Operand(lbuf, lo["sA_d"], I),
                       Operand(c["ts_d"], 0, rd), b_t=True, tiles=T)
            for i, (q0, q1, b) in enumerate(b_d):  # y[:, q0:q1] = h Wd[q0:q1]ᵀ (+ LoRA)
                lora_d = (Operand(c["ts_d"], 0, rd), rd, Operand(lbuf, lo[f"B_dT{i}"]), 2) if rd else None
                K.gemm(ctx, M, q1 - q0, I, Operand(h, 0, I), b, Operand(y, q0, H), b_t=True, lora=lora_d, tiles=T)
            ctx.copy(y, 0, rb, r0 * H * F32, M * H * F32)
            c["_tmp"] = [h, y]
            chunks.append(c)
        submitted = time.perf_counter()
        ctx.submit()
        # the GPU computes this layer now; meanwhile stage the next layer's weights and run the
        # caller's independent CPU work
        self.prefetch(layer + 1)
        if while_waiting is not None:
            while_waiting()
        out = np.empty((N, H), np.float32)
        read_staging(ctx, rb, N * H * F32, out, submitted, "gpu ffn forward")
        for c in chunks:
            ctx.release(*c.pop("_tmp"))
        ctx.release(lbuf)
        if not need_backward:
            for c in chunks:
                ctx.release(*[v for k, v in c.items() if k not in ("r0", "M")])
            return out, None
        return out, _GpuCtx(layer, N, lora, r, chunks)

    # -- backward ------------------------------------------------------------------------------
    def ffn_backward(self, layer: int, gctx, dy: np.ndarray, while_waiting=None) -> FfnGrads:
        if not isinstance(gctx, _GpuCtx):
            raise ValueError("ffn_backward needs the ctx of ffn_forward(..., need_backward=True)")
        if gctx.layer != layer:
            raise ValueError(f"ffn_backward for layer {layer} got the ctx of layer {gctx.layer}")
        if gctx.chunks is None:
            raise ValueError("this ctx was already used by ffn_backward")
        dy = check_ffn_input(dy, self.hidden, "dy")
        if dy.shape[0] != gctx.N:
            raise ValueError(f"dy has {dy.shape[0]} rows, the forward had {gctx.N}")
        ctx, H, I, T = self.ctx, self.hidden, self.inter, self.tiles
        N, lora, r = gctx.N, gctx.lora, gctx.r
        rg, ru, rd = r["gate_proj"], r["up_proj"], r["down_proj"]
        rgu = rg + ru
        drop = lora is not None and lora.dropout > 0
        self._chunk_list = [(c["r0"], c["r0"] + c["M"]) for c in gctx.chunks]
        slot = self._weights(layer)
        b_gu, b_d = self._b_operands(layer, slot)
        pr = lora.pairs if lora is not None else {}
        lw = {}
        if rd:
            lw["sB_d"] = pr["down_proj"].B * np.float32(pr["down_proj"].scale)   # [H, rd]
            lw["A_d"] = pr["down_proj"].A                                        # [rd, I]
        for p in ("gate_proj", "up_proj"):
            if r[p]:
                lw[f"sB_{p}"] = pr[p].B * np.float32(pr[p].scale)               # [I, r]
        if rgu:
            lw["A_gu"] = np.concatenate([pr[p].A for p in ("gate_proj", "up_proj") if r[p]], 0)  # [rgu, H]
        if drop:
            lw["keys"] = _dropout_keys(lora, layer)
        lbuf, lo = self._upload_small(lw) if lw else (None, {})

        # grads, packed after dx in the readback: per proj dA [r, in] then dB [out, r]
        gofs, cur = {}, 0
        for p in FFN_PROJ:
            if r[p]:
                o, i = self.shapes[p]
                gofs[p] = (cur, cur + r[p] * i)
                cur += r[p] * i + o * r[p]
        gbuf = ctx.buffer(max(cur, 1) * F32, what="LoRA grads") if cur else None
        rb = self._readback((N * H + cur) * F32)

        dys = self._upload_rows(dy, "dy")
        tmp = []
        for ci, c in enumerate(gctx.chunks):
            M, r0, acc = c["M"], c["r0"], ci > 0
            dyc = dys[ci]
            dh = ctx.buffer(M * I * F32, what="dh")
            dgu = ctx.buffer(M * 2 * I * F32, what="dgu")
            dx = ctx.buffer(M * H * F32, what="dx")
            tmp += [dyc, dh, dgu, dx]
            lora_dh = None
            if rd:
                dts_d = ctx.buffer(M * rd * F32, what="LoRA down dts")
                tmp.append(dts_d)
                K.gemm(ctx, M, rd, H, Operand(dyc, 0, H), Operand(lbuf, lo["sB_d"], rd),
                       Operand(dts_d, 0, rd), b_t=False, tiles=T)
                if not drop:
                    lora_dh = (Operand(dts_d, 0, rd), rd, Operand(lbuf, lo["A_d"]), 2)
            for i, (q0, q1, b) in enumerate(b_d):  # dh = Σ dy[:, q0:q1] Wd[q0:q1] (+ LoRA once)
                K.gemm(ctx, M, I, q1 - q0, Operand(dyc, q0, H), b, Operand(dh, 0, I), b_t=False,
                       lora=lora_dh if i == 0 else None, accumulate=i > 0, tiles=T)
            if rd:
                if drop:
                    pd = ctx.buffer(M * I * F32, what="LoRA down dz")
                    tmp.append(pd)
                    K.gemm(ctx, M, I, rd, Operand(dts_d, 0, rd), Operand(lbuf, lo["A_d"], I),
                           Operand(pd, 0, I), b_t=False, tiles=T)
                    K.dropout(ctx, M, I, Operand(pd, 0, I), Operand(dh, 0, I),
                              lbuf, lo["keys"] + FFN_PROJ.index("down_proj"), dropout_threshold(lora.dropout),
                              float(dropout_keep_scale(lora.dropout)), r0, add=True)
                    z = c["hd"]
                else:
                    z = ctx.buffer(M * I * F32, what="recomputed h")
                    tmp.append(z)
                    K.swiglu_forward(ctx, M, I, Operand(c["gu"], 0, 2 * I), Operand(c["gu"], I, 2 * I), Operand(z))
                ga, gb = gofs["down_proj"]
                K.lora_grad(ctx, M, rd, H, Operand(c["ts_d"], 0, rd), Operand(dyc, 0, H), gbuf, gb,
                            trans_out=True, accum=acc)
                K.lora_grad(ctx, M, rd, I, Operand(dts_d, 0, rd), Operand(z, 0, I), gbuf, ga,
                            trans_out=False, accum=acc)
            K.swiglu_backward(ctx, M, I, Operand(c["gu"], 0, 2 * I), Operand(c["gu"], I, 2 * I), dh,
                              Operand(dgu, 0, 2 * I), Operand(dgu, I, 2 * I))
            lora_dx = None
            if rgu:
                dts_gu = ctx.buffer(M * rgu * F32, what="LoRA gate|up dts")
                tmp.append(dts_gu)
                col = 0
                for p, a_off in (("gate_proj", 0), ("up_proj", I)):
                    if r[p]:
                        K.gemm(ctx, M, r[p], I, Operand(dgu, a_off, 2 * I), Operand(lbuf, lo[f"sB_{p}"], r[p]),
                               Operand(dts_gu, col, rgu), b_t=False, tiles=T)
                        col += r[p]
                if not drop:
                    lora_dx = (Operand(dts_gu, 0, rgu), rgu, Operand(lbuf, lo["A_gu"]), 2)
            for i, (s0, s1, b) in enumerate(b_gu):  # dx = Σ dgu[:, s0:s1] Wgu[s0:s1] (+ LoRA once)
                K.gemm(ctx, M, H, s1 - s0, Operand(dgu, s0, 2 * I), b, Operand(dx, 0, H), b_t=False,
                       lora=lora_dx if i == 0 else None, accumulate=i > 0, tiles=T)
            col = 0
            for p, y_off in (("gate_proj", 0), ("up_proj", I)):
                if not r[p]:
                    continue
                if drop:
                    pz = ctx.buffer(M * H * F32, what=f"LoRA {p} dz")
                    tmp.append(pz)
                    K.gemm(ctx, M, H, r[p], Operand(dts_gu, col, rgu), Operand(lbuf, lo["A_gu"] + col * H, H),
                           Operand(pz, 0, H), b_t=False, tiles=T)
                    K.dropout(ctx, M, H, Operand(pz, 0, H), Operand(dx, 0, H), lbuf, lo["keys"] + FFN_PROJ.index(p),
                              dropout_threshold(lora.dropout), float(dropout_keep_scale(lora.dropout)), r0, add=True)
                ga, gb = gofs[p]
                K.lora_grad(ctx, M, r[p], I, Operand(c["ts_gu"], col, rgu), Operand(dgu, y_off, 2 * I), gbuf, gb,
                            trans_out=True, accum=acc)
                z = c[f"xd_{p}"] if drop else c["x"]
                K.lora_grad(ctx, M, r[p], H, Operand(dts_gu, col, rgu), Operand(z, 0, H), gbuf, ga,
                            trans_out=False, accum=acc)
                col += r[p]
            ctx.copy(dx, 0, rb, r0 * H * F32, M * H * F32)
        if cur:
            ctx.copy(gbuf, 0, rb, N * H * F32, cur * F32)
        submitted = time.perf_counter()
        ctx.submit()
        self.prefetch(layer - 1)
        if while_waiting is not None:
            while_waiting()
        flat = np.empty(N * H + cur, np.float32)
        read_staging(ctx, rb, flat.nbytes, flat, submitted, "gpu ffn backward")
        ctx.release(*tmp, lbuf, gbuf)
        for c in gctx.chunks:
            ctx.release(*[v for k, v in c.items() if k not in ("r0", "M")])
        gctx.chunks = None
        grads = {}
        for p in FFN_PROJ:
            if r[p]:
                o, i = self.shapes[p]
                ga, gb = gofs[p]
                base = N * H
                grads[p] = (flat[base + ga: base + ga + r[p] * i].reshape(r[p], i),
                            flat[base + gb: base + gb + o * r[p]].reshape(o, r[p]))
        return FfnGrads(dx=flat[: N * H].reshape(N, H), lora=grads)

    def close(self) -> None:
        self.state = None
        self.slots = []
        self.ctx.trim()


def _split_rows(seg_rows, cap: int, step: int, K: int, join) -> list:
    """Row pieces of stacked tensors with seg_rows[i] rows of K elements: each piece a list of
    (tensor index, r0, r1), at most `cap` rows, every piece starting at row 0 or a multiple of
    `step` of its tensor; a tensor joins the piece that ends the previous one if join(its part)."""
    if cap < 1 or cap < min(step, max(seg_rows)):
        raise ValueError(f"a storage binding limit that holds {cap} rows of {K} elements cannot hold a weight "
                         f"piece of {step} rows (NF4 block alignment); raise max_binding")
    pieces, cur, room = [], [], cap
    for si, n in enumerate(seg_rows):
        if cur and not join(cur[-1]):
            pieces.append(cur)
            cur, room = [], cap
        r = 0
        while r < n:
            take = min(n - r, room)
            if take < n - r:
                take -= take % step  # a piece ending inside a tensor ends on a block boundary
            if take == 0:
                pieces.append(cur)
                cur, room = [], cap
                continue
            cur.append((si, r, r + take))
            room -= take
            r += take
            if r < n:
                pieces.append(cur)
                cur, room = [], cap
    if cur:
        pieces.append(cur)
    return pieces


def _dropout_keys(lora, layer: int) -> np.ndarray:
    """The layer's dropout keys (one per FFN_PROJ projection) as float32 bit patterns: they
    ride in the LoRA weight upload and dropout.wgsl reads them as u32."""
    return np.array([dropout_key(lora.seed, layer, p) for p in FFN_PROJ], np.uint32).view(np.float32)


class _GpuCtx:
    """Device buffers a layer's backward needs, per row chunk: x, gu, ts_gu, ts_d (and the
    dropped inputs when dropout is on)."""

    def __init__(self, layer, N, lora, r, chunks):
        self.layer, self.N, self.lora, self.r, self.chunks = layer, N, lora, r, chunks
