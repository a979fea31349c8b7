"""Learning-rate schedules: linear warmup, then constant, linear decay or cosine decay.

`step` is the 0-based index of the update about to be applied.  Warmup rises as
lr·(step+1)/warmup so that the first update already moves the weights (HF's warmup
starts at exactly 0, which wastes a step); the decay runs from step=warmup, where the
rate is lr, toward 0 at step=total_steps (never reached: the last update is total_steps-1)."""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def check_schedule(schedule: str, warmup: int, total_steps: int | None) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    if schedule != "constant":
        if total_steps is None:
            raise ValueError(f"the {schedule!r} schedule needs total_steps")
        if total_steps <= warmup:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup ({warmup}) for the {schedule!r} schedule")


def lr_at(step: int, lr: float, warmup: int = 0, schedule: str = "constant",
          total_steps: int | None = None) -> float:
    check_schedule(schedule, warmup, total_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / (total_steps - warmup))
    if schedule == "linear":
        return lr * (1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
