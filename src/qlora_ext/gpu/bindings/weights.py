"""Base projection weights of the GPU device: uploaded once (NF4 codes + absmax, or fp32)
and dequantized on the GPU into a reusable fp32 scratch buffer before the GEMM.
Shader: shaders/nf4.wgsl."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...nf4 import NF4_CODE, NF4Tensor, check_tensor
from ..kernels import Nf4B, Operand
from ..runtime import GpuContext, GpuTensor, grid_2d

_WG = 256


@dataclass
class GpuWeight:
    """One projection on the GPU: shape (out, in); either fp32 or NF4 (packed bytes as u32
    words, zero-padded to a multiple of 4 bytes, and f32 absmax per block)."""

    shape: tuple
    fp32: GpuTensor | None = None
    packed: GpuTensor | None = None
    absmax: GpuTensor | None = None
    blocksize: int = 64

    def operand(self):
        """W [out, in] as kernels.gemm's B operand (fp32: gemm_f32.wgsl; NF4: gemm.wgsl)."""
        if self.fp32 is not None:
            return Operand(self.fp32, 0, self.shape[1])
        return Nf4B(self.packed, self.absmax, self.shape[1], blocksize=self.blocksize)


def host_arrays(w) -> dict:
    """What goes up for one projection: {"packed": u32 words, "absmax": f32} for an NF4Tensor
    (double quant: its dequantized absmax), {"fp32": f32 [out, in]} for a float array."""
    if isinstance(w, NF4Tensor):
        check_tensor(w)   # a hand-built tensor too: the shaders take its sizes and blocksize on trust
        raw = np.ascontiguousarray(w.packed, dtype=np.uint8)
        if raw.size % 4:   # whole u32 words (a copy only for the rare odd sizes)
            raw = np.concatenate([raw, np.zeros(-raw.size % 4, np.uint8)])
        return {"packed": raw.view(np.uint32), "absmax": np.ascontiguousarray(w.absmax, np.float32)}
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise ValueError(f"weight: expected an NF4Tensor or a 2-D float array, got {type(w).__name__}")
    return {"fp32": np.ascontiguousarray(w, np.float32)}


def upload_weight(ctx: GpuContext, w) -> GpuWeight:
    """An NF4Tensor or a float32 [out, in] array, uploaded once."""
    arrs = host_arrays(w)
    if "fp32" in arrs:
        return GpuWeight(tuple(w.shape), fp32=ctx.upload(arrs["fp32"]))
    return GpuWeight(tuple(w.shape), packed=ctx.upload(arrs["packed"], "u32"),
                          absmax=ctx.upload(arrs["absmax"]), blocksize=int(w.blocksize))


class StreamedLayers:
    """Base weights kept on the host and streamed into one set of per-projection device
    slots a layer at a time, for models whose NF4 base does not fit on the GPU.

    load(l) first submits the recorded work (which reads the slots' previous contents), then
    queues the writes; queue order makes the next dispatches see layer l."""

    def __init__(self, ctx: GpuContext, layers: list, names):
        self.ctx = ctx
        self.host = [{p: host_arrays(lw.proj[p]) for p in names} for lw in layers]
        self.slots = {}
        for p in names:
            w = layers[0].proj[p]
            a = self.host[0][p]
            for l, hl in enumerate(self.host):
                if {k: v.shape for k, v in hl[p].items()} != {k: v.shape for k, v in a.items()}:
                    raise ValueError(f"streamed weights: layer {l} {p} differs in shape or format "
                                     "from layer 0 (one slot per projection needs equal shapes)")
            if "fp32" in a:
                self.slots[p] = GpuWeight(tuple(w.shape), fp32=ctx.empty(a["fp32"].shape))
            else:
                self.slots[p] = GpuWeight(tuple(w.shape), packed=ctx.empty(a["packed"].shape, "u32"),
                                               absmax=ctx.empty(a["absmax"].shape),
                                               blocksize=int(w.blocksize))
        self.loaded = None
        self.bytes_streamed = 0

    def load(self, l: int) -> dict:
        """{proj: GpuWeight} holding layer l (streamed unless already there)."""
        if self.loaded != l:
            for p, slot in self.slots.items():
                for k, a in self.host[l][p].items():
                    self.ctx.write(getattr(slot, k), a)
                    self.bytes_streamed += a.nbytes
            self.loaded = l
        return self.slots


class WeightScratch:
    """One fp32 scratch buffer that NF4 projections dequantize into ahead of the fp32 GEMM,
    sized for the largest of `shapes` (out, in) and allocated here, so the memory estimate
    (which runs this constructor against a counting context) includes it.  Each dequantized
    weight is valid until the next one: the queue orders the dispatches."""

    def __init__(self, ctx: GpuContext, shapes=()):
        self.ctx = ctx
        self.code = ctx.upload(NF4_CODE.astype(np.float32))
        n = max((int(o) * int(i) for o, i in shapes), default=0)
        self.buf = ctx.empty((n,)) if n else None

    def fp32(self, w: GpuWeight) -> GpuTensor:
        """fp32 [out, in]: the fp32 tensor on the GPU, or (recorded) the NF4 weight dequantized into
        the scratch buffer."""
        if w.fp32 is not None:
            return w.fp32
        ctx = self.ctx
        n = w.shape[0] * w.shape[1]
        if self.buf is None or self.buf.size < n:
            raise ValueError(f"WeightScratch: a {w.shape} weight needs {n} elements, the scratch holds "
                             f"{0 if self.buf is None else self.buf.size}")
        buf = self.buf.view(w.shape)
        pipe = ctx.pipeline("nf4", "dequant", "urrrw", overrides={"WG": _WG})
        ctx.dispatch(pipe, [ctx.uniform("II", n, w.blocksize), w.packed, w.absmax, self.code, buf],
                     grid_2d((n + 8 * _WG - 1) // (8 * _WG)))   # a thread per packed word (8 elements)
        return buf
