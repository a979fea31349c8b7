"""The FFN backend interface: one object per device that runs a layer's FFN
(gate, up, SwiGLU, down, with LoRA terms) forward and backward on a batch of token rows.

The model code calls only this interface, so the CPU backend (numpy BLAS + C kernels) and
the wgpu backend are interchangeable, and a GPU-resident mode can take more of the layer
later without changing the model's control flow."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass
class FfnLora:
    """LoRA terms of one layer's FFN: proj name -> LoraPair (absent = not adapted), and the
    dropout applied to the input of each adapter (0 = none; masks come from `seed`)."""

    pairs: dict
    dropout: float = 0.0
    seed: int = 0


@dataclass
class FfnGrads:
    """Result of ffn_backward: dx [N, hidden] and, per adapted proj, (dA [r, in], dB [out, r])."""

    dx: np.ndarray
    lora: dict = field(default_factory=dict)


class FfnBackend(ABC):
    """x [N, hidden] float32, N = all token rows of the batch (one matmul per projection)."""

    name: str = "abstract"

    @abstractmethod
    def prepare(self, state) -> None:
        """Take the model's weights (a ModelState); resident backends upload them here."""

    @abstractmethod
    def ffn_forward(self, layer: int, x: np.ndarray, lora: FfnLora | None, need_backward: bool = True,
                    while_waiting=None):
        """Returns (y [N, hidden], ctx); ctx holds what ffn_backward needs (None if not asked).
        `while_waiting`: CPU work of the caller that does not depend on y; a device backend
        calls it once after submitting its work and before waiting for it (so the two
        overlap), a host backend once after computing."""

    @abstractmethod
    def ffn_backward(self, layer: int, ctx, dy: np.ndarray, while_waiting=None) -> FfnGrads:
        """dy [N, hidden] -> dx and the LoRA grads of this layer's adapted FFN projections;
        `while_waiting` as in ffn_forward."""

    def prefetch(self, layer: int) -> None:
        """Hint: layer `layer` comes next (streaming backends start its upload)."""

    def close(self) -> None:
        """Release device resources."""
