"""The LoRA products of one linear layer on the CPU (y = x Wᵀ + s · (x Aᵀ) Bᵀ), forward and
backward, with the dropout mask applied to the LoRA branch's input.

On AVX-512 (where the device holds numpy's BLAS to one thread so that the fused NF4 kernel's
OpenMP team owns the cores) the products run through csrc/small_gemm.c, threaded by that same
team: each has the rank r as one dimension, which single-threaded BLAS handles at a few
GFLOP/s.  Elsewhere numpy's BLAS does them, threaded by itself.  Both compute in float32."""
from __future__ import annotations

import numpy as np

from .._native import kernels, resolve_threads


class LoraProducts:
    """use_kernel: the C small-GEMM (AVX-512 machines); threads: its thread count (None: all)."""

    def __init__(self, use_kernel: bool, threads=None):
        self.use_kernel = bool(use_kernel)
        self.threads = threads

    def _gemm(self, a, b, c, alpha=1.0, accumulate=False):
        """c = alpha · a @ b (+ c); a may be a transposed view, b and c need contiguous rows."""
        if self.use_kernel:
            kernels().small_gemm(a, b, c, float(alpha), bool(accumulate), resolve_threads(self.threads))
        elif accumulate:
            c += np.float32(alpha) * (a @ b) if alpha != 1.0 else a @ b
        else:
            np.matmul(a, b, out=c)
            if alpha != 1.0:
                c *= np.float32(alpha)

    def forward(self, xd, A, B, scale: float, u, y) -> None:
        """u [N, r] = scale · xd Aᵀ (kept for the backward); y [N, out] += u Bᵀ unless y is None.
        xd is the LoRA branch's input (x with the dropout mask applied)."""
        self._gemm(xd, np.ascontiguousarray(A.T), u, scale)
        if y is not None:
            self._gemm(u, np.ascontiguousarray(B.T), y, 1.0, accumulate=True)

    def backward(self, xd, dy, u, A, B, scale: float, gA, gB, dx, mask) -> None:
        """gB += dyᵀ u (u carries the scale); gA += duᵀ xd with du = scale · dy B; and unless
        dx is None, dx += (du A) · mask (mask None: no dropout)."""
        self._gemm(dy.T, u, gB, 1.0, accumulate=True)
        du = np.empty((dy.shape[0], A.shape[0]), np.float32)
        self._gemm(dy, B, du, scale)
        self._gemm(du.T, xd, gA, 1.0, accumulate=True)
        if dx is None:
            return
        if mask is None:
            self._gemm(du, A, dx, 1.0, accumulate=True)
        else:
            dxd = np.empty(dx.shape, np.float32)
            self._gemm(du, A, dxd)
            dxd *= mask
            dx += dxd
