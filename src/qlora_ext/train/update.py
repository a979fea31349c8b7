"""One AdamW update strategy per device where a model's parameters live: `HostAdamW` (numpy
arrays: the cpu placement, and models outside the engine) and `GpuAdamW` (one flat GPU buffer:
the gpu and split placements).  The Trainer decides (1/tokens, the clip coefficient, the
learning rate) and a strategy carries them out where the gradients are:

    accumulate(ids, labels, mask, first) -> summed token loss of the micro-batch; its gradient
                                           is added to the update being built
    allreduce(comm, scalars, have_grads) -> the summed scalars; the gradient summed over ranks
    scaled_norm(scale)                   -> the L2 norm of scale · gradient, which from then on
                                           is the gradient the update uses
    step(lr, clip_coef)                  AdamW on clip_coef · that gradient (None: no clipping)
    reset()                              an empty update
    named_grads()                        {PEFT name: gradient} (read only to name a bad value)
    optimizer_state() / load_optimizer_state(state)   the host AdamW's format in both
    step_count                           AdamW's step (settable: a broadcast sets it)
    state_arrays() / set_state_arrays(a) the float32 arrays equal on every rank
    rebind(params)                       after the model's adapter arrays were replaced

A model names its strategy by `optimizer_device` ("cpu" when absent; see UPDATES)."""
from __future__ import annotations

import math

import numpy as np

from .distributed import flat_zeros_like
from .optim import AdamW


class _Steps:
    """AdamW's step count, kept by the strategy's optimizer (a broadcast sets it)."""

    @property
    def step_count(self) -> int:
        return self.optimizer.step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self.optimizer.step_count = int(value)


class HostAdamW(_Steps):
    """Gradients summed into host arrays (views of one flat buffer, which an MPI all-reduce sums
    in place), scaled and clipped in place in float32, then the host AdamW."""

    def __init__(self, model, config):
        self.model = model
        params = model.parameters()
        self.optimizer = AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                               weight_decay=config.weight_decay)
        self.grads = flat_zeros_like(params)

    def accumulate(self, input_ids, labels, attention_mask, first: bool, **packed) -> float:
        """packed: segment_ids of packed rows, passed on only when given."""
        loss_sum, grads = self.model.loss_and_grads(input_ids, labels, attention_mask, reduction="sum", **packed)
        for name, acc in self.grads.items():
            g = grads.get(name)
            if g is None:
                raise ValueError(f"the model returned no gradient for trainable parameter {name!r}")
            acc += g
        return float(loss_sum)

    def allreduce(self, comm, scalars: list, have_grads: bool) -> list:
        return comm.allreduce_sum(list(self.grads.values()), scalars)

    def scaled_norm(self, scale: float) -> float:
        """Global L2 norm of the scaled gradient, accumulated in float64 in a fixed order."""
        s = np.float32(scale)
        total = 0.0
        for g in self.grads.values():
            g *= s
            flat = g.ravel().astype(np.float64)
            total += float(np.dot(flat, flat))
        return math.sqrt(total)

    def step(self, lr: float, clip_coef) -> None:
        if clip_coef is not None:
            for g in self.grads.values():
                g *= clip_coef
        self.optimizer.step(self.grads, lr=lr)

    def reset(self) -> None:
        for g in self.grads.values():
            g[...] = 0.0

    def named_grads(self) -> dict:
        return self.grads

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def state_arrays(self) -> list:
        """The live arrays: weights, then both moments, in parameter order."""
        opt = self.optimizer
        names = list(opt.params)
        return [opt.params[n] for n in names] + [opt.exp_avg[n] for n in names] + [opt.exp_avg_sq[n] for n in names]

    def set_state_arrays(self, arrays: list) -> None:
        """Nothing to do: state_arrays() are the live arrays, changed in place."""

    def rebind(self, params: dict) -> None:
        self.optimizer.params = params


class GpuAdamW(_Steps):
    """The gradient summed in the GPU device's flat buffer; the squared norm and AdamW run there
    (gpu/bindings/adamw.py), so a step moves only the loss and one float of norm.  Only an
    all-reduce brings the gradient down (and back up)."""

    def __init__(self, model, config):
        self.model = model
        self.hyper = dict(lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
        self.optimizer = self._adamw()
        self.scale = 1.0

    def _adamw(self):
        from ..gpu.bindings.adamw import AdamWGpu

        return AdamWGpu(self.model.ctx, self.model.params.size, **self.hyper)

    @property
    def _dev(self):
        return self.model.device

    def accumulate(self, input_ids, labels, attention_mask, first: bool, **packed) -> float:
        return float(self.model.accumulate_grads(input_ids, labels, attention_mask, first=first, **packed))

    def allreduce(self, comm, scalars: list, have_grads: bool) -> list:
        ctx = self.model.ctx
        flat = ctx.to_numpy(self._dev.grads) if have_grads else np.zeros(self.model.params.size, np.float32)
        out = comm.allreduce_sum([flat], scalars)
        ctx.write(self._dev.grads, flat)
        return out

    def scaled_norm(self, scale: float) -> float:
        """sqrt(sum((scale · g)²)) from fixed-order partials (deterministic)."""
        self.scale = float(scale)
        with self.model.kernel_timing():
            return math.sqrt(self.optimizer.sq_norm(self._dev.grads, self.scale))

    def step(self, lr: float, clip_coef) -> None:
        """AdamW on g = (grad · scale) · clip_coef, each product rounded to float32 as the host's
        in-place scalings are."""
        with self.model.kernel_timing():
            self.optimizer.step(self._dev.values, self._dev.grads, lr, grad_scale=self.scale,
                                clip_coef=1.0 if clip_coef is None else float(clip_coef))
        self.model.weights_changed()

    def reset(self) -> None:
        """Nothing to do: the first micro-batch of an update overwrites the device's gradient."""

    def named_grads(self) -> dict:
        return self.model.params.named(self.model.ctx.to_numpy(self._dev.grads))

    def optimizer_state(self) -> dict:
        """{"step", "<name>.exp_avg", "<name>.exp_avg_sq"}: the host AdamW's state_dict, so a
        checkpoint of any placement resumes in any other (downloads the moments)."""
        st = self.optimizer.state_dict()
        out = {"step": st["step"]}
        for kind in ("exp_avg", "exp_avg_sq"):
            out.update({f"{n}.{kind}": a.copy() for n, a in self.model.params.named(st[kind]).items()})
        return out

    def load_optimizer_state(self, state: dict) -> None:
        params = self.model.params
        flat = {"step": state.get("step")}
        if flat["step"] is None:
            raise ValueError("optimizer state has no 'step' entry")
        for kind in ("exp_avg", "exp_avg_sq"):
            buf = np.zeros(params.size, np.float32)
            for n, view in params.named(buf).items():
                key = f"{n}.{kind}"
                if key not in state:
                    raise ValueError(f"optimizer state lacks {key!r} (was it saved for another LoRA config?)")
                a = np.asarray(state[key], np.float32)
                if a.shape != view.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {a.shape}, parameter has {view.shape}")
                view[...] = a
            flat[kind] = buf
        self.optimizer.load_state_dict(flat)

    def state_arrays(self) -> list:
        """[flat weights, flat exp_avg, flat exp_avg_sq] (host copies)."""
        st = self.optimizer.state_dict()
        return [self.model.ctx.to_numpy(self._dev.values), st["exp_avg"], st["exp_avg_sq"]]

    def set_state_arrays(self, arrays: list) -> None:
        params, m, v = arrays
        self.model.ctx.write(self._dev.values, params)
        self.optimizer.load_state_dict({"step": self.optimizer.step_count, "exp_avg": m, "exp_avg_sq": v})
        self.model.weights_changed()

    def rebind(self, params: dict) -> None:
        """A new flat layout (other targets or rank): fresh moments, the same hyperparameters."""
        if self.optimizer.n != self.model.params.size:
            self.optimizer = self._adamw()


UPDATES = {"cpu": HostAdamW, "gpu": GpuAdamW}


def update_for(model, config):
    """The strategy of the device holding `model`'s parameters."""
    return UPDATES[getattr(model, "optimizer_device", "cpu")](model, config)
