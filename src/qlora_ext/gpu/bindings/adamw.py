"""AdamW on the GPU over one flat buffer of all LoRA parameters, with
torch.optim.AdamW semantics (bias correction, decoupled weight decay) as
qlora_ext.train.optim.AdamW, and the squared gradient norm that global-norm clipping needs.
Shaders: shaders/adamw.wgsl, grad_norm.wgsl."""
from __future__ import annotations

import math
import struct

import numpy as np

from ...hyperparams import check_hyperparameters
from ..runtime import GpuContext, GpuTensor, grid_2d

_WG = 64
# Workgroups of the squared-norm pass: enough to fill a large GPU, few partials to read back.
_NORM_GROUPS = 1024


class AdamWGpu:
    """Moments m, v [n] live on the GPU; step() records one update of param [n] from grad [n]."""

    def __init__(self, ctx: GpuContext, n: int, lr: float = 2e-4, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        self.ctx, self.n = ctx, int(n)
        self.lr, self.betas, self.eps, self.weight_decay = check_hyperparameters(lr, betas, eps, weight_decay)
        self.step_count = 0
        self.m = ctx.zeros((self.n,))
        self.v = ctx.zeros((self.n,))
        # Per-step scalars change every step: one uniform buffer rewritten, not one per step.
        u = ctx.wgpu.BufferUsage
        self._params = ctx.device.create_buffer(size=48, usage=u.UNIFORM | u.COPY_DST)

    def step(self, param: GpuTensor, grad: GpuTensor, lr: float | None = None,
             grad_scale: float = 1.0, clip_coef: float = 1.0) -> None:
        """One update from g = (grad * grad_scale) * clip_coef (both products rounded to f32,
        as the CPU Trainer's in-place `g *= 1/tokens; g *= coef`)."""
        if param.size != self.n or grad.size != self.n:
            raise ValueError(f"AdamWGpu.step: expected {self.n} elements, got param {param.shape}, "
                             f"grad {grad.shape}")
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        t = self.step_count
        b1, b2 = self.betas
        data = struct.pack("<Iffffffffff", self.n, b1, b2, 1.0 - b1, 1.0 - b2, self.eps,
                           1.0 - lr * self.weight_decay, lr / (1.0 - b1 ** t),
                           math.sqrt(1.0 - b2 ** t), grad_scale, clip_coef)
        ctx = self.ctx
        # The pending encoder may hold the previous step's update, which must see its own values.
        ctx.submit()
        ctx.queue.write_buffer(self._params, 0, data + b"\0" * (48 - len(data)))
        pipe = ctx.pipeline("adamw", "step", "uwrww", overrides={"WG": _WG})
        ctx.dispatch(pipe, [self._params, param, grad, self.m, self.v],
                     grid_2d((self.n + _WG - 1) // _WG))

    def sq_norm(self, grad: GpuTensor, scale: float = 1.0) -> float:
        """sum((grad * scale)^2) (scale rounded to f32 first, as the CPU Trainer's product):
        one partial per workgroup in a fixed order, summed on the host in float64.  Waits
        for the GPU (the clip coefficient is needed before the update)."""
        if grad.size != self.n:
            raise ValueError(f"AdamWGpu.sq_norm: expected {self.n} elements, got {grad.shape}")
        ctx = self.ctx
        groups = min(_NORM_GROUPS, max(1, -(-self.n // _WG)))
        part = getattr(self, "_partials", None)
        if part is None or part.size != groups:
            part = self._partials = ctx.empty((groups,))
        pipe = ctx.pipeline("grad_norm", "sq_norm", "urw", overrides={"WG": _WG})
        ctx.dispatch(pipe, [ctx.uniform("If", self.n, float(np.float32(scale))), grad, part], (groups,))
        return float(np.sum(ctx.to_numpy(part), dtype=np.float64))

    def state_dict(self) -> dict:
        """{"step": int64 0-d, "exp_avg": f32 [n], "exp_avg_sq": f32 [n]} (downloads)."""
        return {"step": np.array(self.step_count, np.int64), "exp_avg": self.ctx.to_numpy(self.m),
                "exp_avg_sq": self.ctx.to_numpy(self.v)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if key not in state:
                raise ValueError(f"optimizer state has no {key!r} entry")
        for key, t in (("exp_avg", self.m), ("exp_avg_sq", self.v)):
            a = np.asarray(state[key], np.float32)
            if a.shape != (self.n,):
                raise ValueError(f"optimizer state {key!r} has shape {a.shape}, expected ({self.n},)")
            self.ctx.write(t, a)
        self.step_count = int(np.asarray(state["step"]))
