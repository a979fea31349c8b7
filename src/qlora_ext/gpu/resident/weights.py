"""Base projection weights of the resident mode: uploaded once (NF4 codes + absmax, or fp32)
and dequantized on the GPU into a reusable fp32 scratch buffer before the GEMM.
Shader: shaders/resident_nf4.wgsl."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...nf4 import NF4_CODE, NF4Tensor
from .context import GpuContext, GpuTensor, grid_2d

_WG = 256


@dataclass
class ResidentWeight:
    """One projection on the GPU: shape (out, in); either fp32 or NF4 (packed bytes as u32
    words, zero-padded to a multiple of 4 bytes, and f32 absmax per block)."""

    shape: tuple
    fp32: GpuTensor | None = None
    packed: GpuTensor | None = None
    absmax: GpuTensor | None = None
    blocksize: int = 64


def upload_weight(ctx: GpuContext, w) -> ResidentWeight:
    """An NF4Tensor (double quant: its dequantized absmax) or a float32 [out, in] array."""
    if isinstance(w, NF4Tensor):
        raw = np.ascontiguousarray(w.packed, dtype=np.uint8)
        raw = np.concatenate([raw, np.zeros(-raw.size % 4, np.uint8)])
        return ResidentWeight(tuple(w.shape), packed=ctx.upload(raw.view(np.uint32), "u32"),
                              absmax=ctx.upload(np.ascontiguousarray(w.absmax, np.float32)),
                              blocksize=int(w.blocksize))
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise ValueError(f"weight: expected an NF4Tensor or a 2-D float array, got {type(w).__name__}")
    return ResidentWeight(tuple(w.shape), fp32=ctx.upload(np.ascontiguousarray(w, np.float32)))


class WeightScratch:
    """fp32 scratch weights, one per shape, that NF4 projections dequantize into."""

    def __init__(self, ctx: GpuContext):
        self.ctx = ctx
        self.code = ctx.upload(NF4_CODE.astype(np.float32))
        self._bufs = {}

    def fp32(self, w: ResidentWeight) -> GpuTensor:
        """fp32 [out, in]: the resident tensor, or (recorded) the NF4 weight dequantized into
        the scratch buffer of its shape -- valid until the next weight of that shape."""
        if w.fp32 is not None:
            return w.fp32
        ctx = self.ctx
        buf = self._bufs.get(w.shape)
        if buf is None:
            buf = self._bufs[w.shape] = ctx.empty(w.shape)
        n = w.shape[0] * w.shape[1]
        pipe = ctx.pipeline("resident_nf4", "dequant", "urrrw", overrides={"WG": _WG})
        ctx.dispatch(pipe, [ctx.uniform("II", n, w.blocksize), w.packed, w.absmax, self.code, buf],
                     grid_2d((n + _WG - 1) // _WG))
        return buf
