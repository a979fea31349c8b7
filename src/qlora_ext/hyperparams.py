"""AdamW's hyperparameter contract, shared by the host and the GPU optimizers (a leaf module:
both layers import it downward)."""
from __future__ import annotations

import math


def check_hyperparameters(lr, betas, eps, weight_decay) -> tuple:
    """(lr, (b1, b2), eps, weight_decay) as floats; ValueError naming the bad one.  Shared by
    the host AdamW (train/optim.py) and the GPU one (gpu/bindings/adamw.py)."""
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"AdamW lr must be a finite number >= 0, got {lr!r}")
    b1, b2 = (float(b) for b in betas)
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"AdamW betas must be in [0, 1), got {betas!r}")
    if not 0.0 < eps < math.inf:
        raise ValueError(f"AdamW eps must be a finite number > 0, got {eps!r}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"AdamW weight_decay must be a finite number >= 0, got {weight_decay!r}")
    return float(lr), (b1, b2), float(eps), float(weight_decay)
