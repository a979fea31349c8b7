"""The training step: gradient accumulation by summed token loss, optional all-reduce across
ranks, global-norm clipping, AdamW with a warmup/decay schedule.

Exactness: each micro-batch returns the *sum* of its token losses and the gradient of that
sum; the sums and the counted targets are added over micro-batches (and, with a `comm`,
over ranks) before one division.  The update therefore equals the one for the mean loss
over the whole global batch, however it is split into micro-batches or ranks.

Where the work happens: an update strategy of the device holding the parameters
(train/update.py: HostAdamW on host arrays, GpuAdamW on the GPU's flat buffer) sums the
gradients, scales, clips and runs AdamW; the Trainer makes the same decisions for both
(1/tokens, the clip coefficient from the norm, the learning rate).

Non-finite values: every update checks its loss and gradient norm (the numbers the update
needs anyway, so the check costs nothing) before the optimizer runs.  A NaN or Inf raises
NonFiniteError naming the step and the first non-finite parameter or gradient (looked up
only then), and the update is not applied: the weights stay those of the last good step.

Distributed slot: `comm` is any object with `rank`, `size` and
`allreduce_sum(arrays, scalars) -> list[float]` that sums the float32 `arrays` in place
across ranks and returns the summed `scalars`.  Only rank 0 writes (see `is_writer`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ..finite import NonFiniteError, first_nonfinite
from .schedule import check_schedule, lr_at
from .update import update_for


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    lr: float = _help("peak learning rate of AdamW", 2e-4)
    betas: tuple = _help("AdamW (beta1, beta2)", (0.9, 0.999))
    eps: float = _help("AdamW epsilon, added to sqrt(v)", 1e-8)
    weight_decay: float = _help("decoupled weight decay (torch.optim.AdamW semantics)", 0.0)
    warmup: int = _help("updates over which the lr rises linearly to `lr`", 0)
    schedule: str = _help("lr after warmup: constant, linear (to 0) or cosine (to 0)", "constant")
    grad_clip: float | None = _help("clip the global L2 norm of the gradients to this; None or 0 = off", 1.0)
    grad_accum: int = _help("micro-batches per optimizer update when feeding Trainer.step()", 1)
    seed: int = _help("seed for data order (and any randomness in the model)", 0)
    total_steps: int | None = _help("number of updates in the run; needed by linear/cosine", None)

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas must be two numbers, got {self.betas!r}")
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"TrainConfig.grad_accum must be a positive int, got {self.grad_accum!r}")
        if self.grad_clip is not None and not 0 <= self.grad_clip < math.inf:
            raise ValueError(f"TrainConfig.grad_clip must be a finite number >= 0 or None, got {self.grad_clip!r}")
        if not 0 <= self.lr < math.inf:
            raise ValueError(f"TrainConfig.lr must be a finite number >= 0, got {self.lr!r}")
        check_schedule(self.schedule, self.warmup, self.total_steps)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig field {sorted(unknown)[0]!r}")
        return cls(**d)


class Trainer:
    """Drives `model` (the qlora_ext Model API: loss_and_grads, count_tokens, loss,
    parameters) with AdamW.  `step` counts optimizer updates done so far."""

    def __init__(self, model, config: TrainConfig | None = None, comm=None):
        self.model = model
        self.config = config or TrainConfig()
        self.comm = comm
        self.params = model.parameters()
        if not self.params:
            raise ValueError("the model has no trainable parameters (was it loaded with lora=None?)")
        self.update = update_for(model, self.config)
        if hasattr(model, "optimizer_bytes"):  # the model's memory_report() lists the moments
            model.optimizer_bytes = 2 * sum(p.nbytes for p in self.params.values())
        self.step_count = 0
        self.last_loss = float("nan")
        self.last_grad_norm = float("nan")
        self.last_tokens = 0
        self.last_lr = float("nan")
        # Accumulators of the update being built (the gradient is the strategy's): summed token
        # loss, counted targets, micro-batches seen.
        self._loss_sum = 0.0
        self._tokens = 0
        self._micro = 0

    @property
    def rank(self) -> int:
        return 0 if self.comm is None else int(self.comm.rank)

    @property
    def world_size(self) -> int:
        return 1 if self.comm is None else int(self.comm.size)

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes metrics, checkpoints and adapters."""
        return self.rank == 0

    def current_lr(self) -> float:
        c = self.config
        return lr_at(self.step_count, c.lr, c.warmup, c.schedule, c.total_steps)

    # -- accumulation --------------------------------------------------------------------------
    def accumulate(self, input_ids, labels, attention_mask=None, segment_ids=None) -> float:
        """Forward+backward of one micro-batch; adds its summed loss and grads to the update
        being built.  Returns the micro-batch's own mean loss (nan if it has no targets).
        segment_ids: packed rows (the model's loss_and_grads says what they do)."""
        # packed rows only: a model without packing keeps the protocol's plain signatures
        packed = {} if segment_ids is None else {"segment_ids": segment_ids}
        n = int(self.model.count_tokens(labels, **packed))
        if n > 0:
            # the first counted micro-batch of the update starts the gradient
            loss_sum = self.update.accumulate(input_ids, labels, attention_mask, first=self._tokens == 0, **packed)
            self._loss_sum += loss_sum
            self._tokens += n
        self._micro += 1
        return float(loss_sum) / n if n > 0 else float("nan")

    def apply_update(self) -> float:
        """Average the accumulated sums (over micro-batches and ranks), clip, step AdamW.
        Returns the mean token loss of the whole update (nan and no update if no rank had
        a counted target).  A rank with no micro-batch (a global batch smaller than the number
        of ranks) still joins the all-reduce with zeros."""
        up = self.update
        loss_sum, tokens = self._loss_sum, float(self._tokens)
        if self.comm is not None:
            loss_sum, tokens = up.allreduce(self.comm, [loss_sum, tokens], have_grads=self._tokens > 0)
        tokens = int(round(tokens))
        lr = self.current_lr()
        if tokens == 0:
            self.last_grad_norm = float("nan")
            return self._finish_update(float("nan"), 0, lr)
        loss = loss_sum / tokens
        norm = up.scaled_norm(float(np.float32(1.0 / tokens)))
        self._stop_if_nonfinite(loss, norm)
        up.step(lr, self._clip_coef(norm))
        self.last_grad_norm = norm
        return self._finish_update(loss, tokens, lr)

    def _finish_update(self, loss: float, tokens: int, lr: float) -> float:
        self.step_count += 1
        self.last_loss = loss
        self.last_tokens = tokens
        self.last_lr = lr
        self._reset_accumulators()
        return loss

    def _stop_if_nonfinite(self, loss: float, norm: float) -> None:
        """NonFiniteError before an update whose loss or gradient norm is NaN/Inf.  Only then
        are the parameters and the strategy's named_grads() searched, to name the first
        bad tensor: a NaN parameter (from the previous update) is the cause, not its gradient."""
        if math.isfinite(loss) and math.isfinite(norm):
            return
        bad = first_nonfinite(self.model.parameters())
        where = f"parameter {bad}" if bad else None
        if where is None:
            bad = first_nonfinite(self.update.named_grads())
            where = f"gradient of {bad}" if bad else ("the loss" if not math.isfinite(loss) else
                                                     "the gradient norm (it overflowed)")
        step = self.step_count + 1
        self._reset_accumulators()
        raise NonFiniteError(f"step {step}: non-finite value (NaN or Inf) in {where}; loss {loss:.6g}, "
                             f"gradient norm {norm:.6g}; the update was not applied and nothing was saved "
                             f"for this step (a lower learning rate, or --grad-clip, usually helps)")

    def _clip_coef(self, norm: float):
        """torch's clip_grad_norm_: coef = max_norm / (norm + 1e-6) as float32, or None when
        clipping is off or the coefficient is not below 1."""
        clip = self.config.grad_clip
        if clip and norm > 0 and clip / (norm + 1e-6) < 1.0:
            return np.float32(clip / (norm + 1e-6))
        return None

    def _reset_accumulators(self):
        self.update.reset()
        self._loss_sum = 0.0
        self._tokens = 0
        self._micro = 0

    # -- public steps ----------------------------------------------------------------------------
    def step(self, input_ids, labels, attention_mask=None, segment_ids=None) -> float:
        """Feed one micro-batch.  Every `grad_accum`-th call applies the update and returns the
        mean loss of the whole update; the calls in between return their micro-batch's loss."""
        micro_loss = self.accumulate(input_ids, labels, attention_mask, segment_ids)
        if self._micro >= self.config.grad_accum:
            return self.apply_update()
        return micro_loss

    def train_step(self, micro_batches) -> float:
        """One optimizer update over this rank's `micro_batches` (an iterable of
        (input_ids, labels[, attention_mask[, segment_ids]]) tuples, any number of them)."""
        if self._micro:
            raise ValueError("train_step() called while step() has a partial accumulation pending")
        for mb in micro_batches:
            self.accumulate(*mb)
        return self.apply_update()

    def evaluate(self, batches) -> float:
        """Mean token loss over `batches` (see evaluate_loss), summed over ranks when distributed."""
        return evaluate_loss(self.model, batches, self.comm)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able trainer state (the optimizer's arrays are separate: optimizer_state())."""
        if self._micro:
            raise ValueError("cannot save trainer state in the middle of a gradient accumulation")
        return {"step": self.step_count, "last_loss": self.last_loss if math.isfinite(self.last_loss) else None,
                "config": self.config.to_dict()}

    def load_state_dict(self, state: dict, optimizer_state: dict) -> None:
        """Restore after model.load_adapter(checkpoint): that may have replaced the model's
        arrays, so the live parameters are fetched again (same names required)."""
        params = self.model.parameters()
        if list(params) != list(self.params):
            missing = sorted(set(self.params) ^ set(params))
            raise ValueError(f"the model's trainable parameters changed since the Trainer was built "
                             f"(e.g. {missing[0] if missing else 'order'!r}); is the adapter from another LoRA config?")
        for name, p in params.items():
            if p.shape != self.params[name].shape:
                raise ValueError(f"the loaded adapter's {name} has shape {p.shape}, this Trainer's has "
                                 f"{self.params[name].shape}: the checkpoint is from another LoRA rank")
        self.params = params
        self.update.rebind(params)
        self.update.load_optimizer_state(optimizer_state)
        self.step_count = int(state["step"])
        last = state.get("last_loss")
        self.last_loss = float("nan") if last is None else float(last)
        self._reset_accumulators()

    def optimizer_state(self) -> dict:
        """The AdamW state in the host optimizer's format (downloaded from a GPU)."""
        return self.update.optimizer_state()

    # -- what must be equal on every rank (qlora_ext.train.distributed) ---------------------------
    @property
    def optimizer_step_count(self) -> int:
        return self.update.step_count

    @optimizer_step_count.setter
    def optimizer_step_count(self, value: int) -> None:
        self.update.step_count = value

    def state_arrays(self) -> list:
        """Every float32 array of the trainable state: LoRA weights and AdamW moments (host
        arrays; copies from a GPU, the live arrays otherwise)."""
        return self.update.state_arrays()

    def set_state_arrays(self, arrays: list) -> None:
        """After the arrays of state_arrays() were changed (a broadcast): apply them."""
        self.update.set_state_arrays(arrays)


def evaluate_loss(model, batches, comm=None) -> float:
    """Mean token loss over `batches` ((input_ids, labels[, attention_mask[, segment_ids]])
    tuples, as Batch.as_tuple gives them): summed token losses over summed counts, so batch
    sizes do not weight it.  nan if nothing is counted.  With `comm`, each rank passes its own
    batches and gets the global mean."""
    loss_sum, tokens = 0.0, 0
    for b in batches:
        input_ids, labels = b[0], b[1]
        mask = b[2] if len(b) > 2 else None
        # packed rows only: a model without packing keeps the protocol's plain signatures
        packed = {"segment_ids": b[3]} if len(b) > 3 and b[3] is not None else {}
        n = int(model.count_tokens(labels, **packed))
        if n:
            loss_sum += float(model.loss(input_ids, labels, mask, reduction="sum", **packed))
            tokens += n
    if comm is not None:
        loss_sum, tokens = comm.allreduce_sum([], [loss_sum, float(tokens)])
    return loss_sum / tokens if tokens else float("nan")
