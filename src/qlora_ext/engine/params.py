"""The trainable parameters as one flat float32 array (LoRA A/B of every adapted projection, and
the LM head when trained), in model.parameters() order, each tensor starting at a multiple of
PARAM_ALIGN elements: the layout both devices use (the GPU binds LoRA matrices as aligned
sub-ranges of one buffer), so moving weights, gradients and AdamW moments between devices is
one copy.  The padding stays zero under every update."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..model.lora import LM_HEAD_NAME, PROJECTIONS, LoraWeights, peft_name

PARAM_ALIGN = 64
# FlatParams.version: unique across objects, so a cache keyed by it never meets a recycled value
_VERSIONS = itertools.count(1)


@dataclass(frozen=True)
class LoraSlot:
    """Where one adapted projection's A [r, in] and B [out, r] live in the flat array."""

    a_off: int
    b_off: int
    r: int
    inn: int
    out: int
    scale: float


class FlatParams:
    """`values` and `grads` are flat host arrays; the LoraWeights' A/B (and the trained head)
    become views into `values`, so everything that held them sees the same numbers."""

    def __init__(self, lora: LoraWeights, lm_head: np.ndarray | None = None):
        named = lora.named_parameters()
        if lm_head is not None:
            named[LM_HEAD_NAME] = lm_head
        self.offsets, off = {}, 0
        for n, a in named.items():
            self.offsets[n] = (off, tuple(a.shape))
            off += -(-a.size // PARAM_ALIGN) * PARAM_ALIGN
        self.size = off
        self.values = np.zeros(off, np.float32)
        for n, a in named.items():
            self._view(self.values, n)[...] = a
        self.grads = np.zeros(off, np.float32)
        # one view per tensor for the object's life: holders of parameters() (an optimizer)
        # keep the same arrays
        self._named = {n: self._view(self.values, n) for n in self.offsets}
        for (l, proj), pair in lora.pairs.items():
            pair.A = self._named[peft_name(l, proj, "A")]
            pair.B = self._named[peft_name(l, proj, "B")]
        self.lora_weights = lora
        self.slots = {}
        for (l, proj), pair in lora.pairs.items():
            r, inn = pair.A.shape
            self.slots[(l, proj)] = LoraSlot(self.offsets[peft_name(l, proj, "A")][0],
                                             self.offsets[peft_name(l, proj, "B")][0], int(r), int(inn),
                                             int(pair.B.shape[0]), float(pair.scale))
        self.head_off = self.offsets[LM_HEAD_NAME][0] if LM_HEAD_NAME in self.offsets else None
        # changes whenever the slots do (a new object, refresh_scales): what the GPU device's
        # replay of captured layers keys on, as the scales are baked into recorded work
        self.version = next(_VERSIONS)

    def _view(self, flat, name):
        off, shape = self.offsets[name]
        return flat[off:off + int(np.prod(shape))].reshape(shape)

    def named(self, flat=None) -> dict:
        """{PEFT name: view} into `flat` (default: the values, the same views every call)."""
        if flat is None:
            return dict(self._named)
        return {n: self._view(flat, n) for n in self.offsets}

    def refresh_scales(self) -> None:
        """Take the adapters' current scales (loading an adapter with another alpha)."""
        for key, slot in self.slots.items():
            pair = self.lora_weights.pairs[key]
            self.slots[key] = LoraSlot(slot.a_off, slot.b_off, slot.r, slot.inn, slot.out, float(pair.scale))
        self.version = next(_VERSIONS)

    # ---- per-projection access (the devices' linear ops) -----------------------------------
    def lora(self, l: int, proj: str) -> LoraSlot | None:
        return self.slots.get((l, proj))

    def A(self, s: LoraSlot) -> np.ndarray:
        return self.values[s.a_off:s.a_off + s.r * s.inn].reshape(s.r, s.inn)

    def B(self, s: LoraSlot) -> np.ndarray:
        return self.values[s.b_off:s.b_off + s.out * s.r].reshape(s.out, s.r)

    def gA(self, s: LoraSlot) -> np.ndarray:
        return self.grads[s.a_off:s.a_off + s.r * s.inn].reshape(s.r, s.inn)

    def gB(self, s: LoraSlot) -> np.ndarray:
        return self.grads[s.b_off:s.b_off + s.out * s.r].reshape(s.out, s.r)

    def lm_head(self) -> np.ndarray | None:
        return None if self.head_off is None else self._named[LM_HEAD_NAME]

    def grad_lm_head(self) -> np.ndarray | None:
        return None if self.head_off is None else self._view(self.grads, LM_HEAD_NAME)

    def ranks(self, l: int) -> dict:
        """{proj: r} of layer l's adapted projections, in PROJECTIONS order."""
        return {p: self.slots[(l, p)].r for p in PROJECTIONS if (l, p) in self.slots}

    @property
    def max_rank(self) -> int:
        return max((s.r for s in self.slots.values()), default=1)
