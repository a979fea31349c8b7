"""AdamW as torch.optim.AdamW (decoupled weight decay, bias correction), on numpy arrays.

Parameters are updated in place (the model's live arrays); the moments are float32 and
live in the optimizer.  Every operation runs in a fixed order in float32, so the same
state and gradients give bit-identical weights: what makes a resumed run equal an
unbroken one."""
from __future__ import annotations

import math

import numpy as np

from ..hyperparams import check_hyperparameters


class AdamW:
    """params: {name: float32 array}, updated in place by step()."""

    def __init__(self, params: dict, lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        hp = check_hyperparameters(lr, betas, eps, weight_decay)
        for name, p in params.items():
            if not isinstance(p, np.ndarray) or p.dtype != np.float32:
                raise ValueError(f"AdamW parameter {name!r} must be a float32 numpy array, "
                                 f"got {getattr(p, 'dtype', type(p))}")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = hp
        self.step_count = 0
        self.exp_avg = {n: np.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: np.zeros_like(p) for n, p in params.items()}
        # One scratch buffer per shape, reused across steps (no allocation per update).
        self._scratch = {}

    def step(self, grads: dict, lr: float | None = None) -> None:
        """One update with `grads` ({name: array}, same names as params; a missing name is an
        error, since silently skipping a parameter would desynchronise the moments)."""
        lr = self.lr if lr is None else float(lr)
        missing = [n for n in self.params if n not in grads]
        if missing:
            raise ValueError(f"AdamW.step: no gradient for {missing[0]!r} ({len(missing)} missing)")
        self.step_count += 1
        b1, b2 = self.betas
        t = self.step_count
        # Same scalar algebra as torch's single-tensor AdamW: step_size = lr / (1 - b1^t),
        # denom = sqrt(v) / sqrt(1 - b2^t) + eps.
        step_size = np.float32(lr / (1.0 - b1 ** t))
        bc2_sqrt = np.float32(math.sqrt(1.0 - b2 ** t))
        decay = np.float32(1.0 - lr * self.weight_decay)
        f1, f1c = np.float32(b1), np.float32(1.0 - b1)
        f2, f2c = np.float32(b2), np.float32(1.0 - b2)
        eps = np.float32(self.eps)
        for name, p in self.params.items():
            g = grads[name]
            if g.shape != p.shape:
                raise ValueError(f"AdamW.step: gradient {name!r} has shape {g.shape}, parameter has {p.shape}")
            g = np.asarray(g, dtype=np.float32)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            tmp = self._scratch.get(p.shape)
            if tmp is None:
                tmp = self._scratch[p.shape] = np.empty(p.shape, np.float32)
            if self.weight_decay != 0.0:
                p *= decay
            m *= f1
            np.multiply(g, f1c, out=tmp)
            m += tmp
            v *= f2
            np.multiply(g, g, out=tmp)
            tmp *= f2c
            v += tmp
            np.sqrt(v, out=tmp)
            tmp /= bc2_sqrt
            tmp += eps
            np.divide(m, tmp, out=tmp)
            tmp *= step_size
            p -= tmp

    # -- state as flat numpy arrays (safetensors-friendly) ------------------------------------
    def state_dict(self) -> dict:
        """{"step": int64 0-d array, "<name>.exp_avg": f32, "<name>.exp_avg_sq": f32}."""
        out = {"step": np.array(self.step_count, dtype=np.int64)}
        for n in self.params:
            out[f"{n}.exp_avg"] = self.exp_avg[n]
            out[f"{n}.exp_avg_sq"] = self.exp_avg_sq[n]
        return out

    def load_state_dict(self, state: dict) -> None:
        if "step" not in state:
            raise ValueError("optimizer state has no 'step' entry")
        for n, p in self.params.items():
            for kind, store in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                key = f"{n}.{kind}"
                if key not in state:
                    raise ValueError(f"optimizer state lacks {key!r} (was it saved for another LoRA config?)")
                a = np.asarray(state[key])
                if a.shape != p.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {a.shape}, parameter has {p.shape}")
                store[n][...] = a
        extra = set(state) - {"step"} - {f"{n}.{k}" for n in self.params for k in ("exp_avg", "exp_avg_sq")}
        if extra:
            raise ValueError(f"optimizer state has entries for unknown parameters, e.g. {sorted(extra)[0]!r}")
        self.step_count = int(np.asarray(state["step"]))
