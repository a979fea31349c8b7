"""ResidentModel: the qlora_ext Model API with the whole training step on the GPU.

The base, the LoRA weights, their gradients and the AdamW moments live on the GPU in a
ResidentEngine.  The host keeps the Model's arrays as a mirror of the LoRA weights: they are
refreshed from the GPU only when read (parameters(), save_adapter, generate), so a training
step moves nothing but ids and labels up and the loss down.  Generation runs the CPU path of
the Model (the KV-cached decoder) on the refreshed weights.

The Trainer drives the device path through the methods below `# ---- the Trainer's device
path`: gradients accumulate on the GPU, clipping needs one float of squared norm, AdamW
updates in place; checkpoints download the weights and moments in the CPU AdamW's format,
so a checkpoint of either placement resumes in the other."""
from __future__ import annotations

import numpy as np

from ...model.model import Model
from .engine import ResidentEngine


class ResidentModel(Model):
    """See Model; `ctx` is the resident GpuContext (None: the process default).
    weights: "resident" (the NF4 base uploaded once) or "stream" (per layer, each step)."""

    placement = "resident"
    keeps_optimizer_on_device = True

    def __init__(self, state, lora_config=None, ctx=None, gradient_checkpointing: bool = False,
                 train_lm_head: bool = False, threads: int | None = None, seed: int = 0,
                 weights: str = "resident"):
        from ...cpu.ffn import CpuFfnBackend

        self._host_stale = False   # True once the GPU has updated weights the host lacks
        # The host backend serves generate() only (the CPU decoder on the mirrored weights).
        super().__init__(state, lora_config, CpuFfnBackend(), gradient_checkpointing=gradient_checkpointing,
                         train_lm_head=train_lm_head, threads=threads, seed=seed)
        self._weights = weights
        self.engine = ResidentEngine(self, ctx=ctx, gradient_checkpointing=gradient_checkpointing,
                                     weights=weights)
        self.placement_reason = ""

    # ---- weights: the GPU holds the truth, the host mirror is refreshed on read -----------
    def _pull(self) -> None:
        if self._host_stale:
            self._host_stale = False
            host = Model.parameters(self)
            for name, value in self.engine.parameters().items():
                host[name][...] = value

    def parameters(self) -> dict:
        self._pull()
        return super().parameters()

    def set_parameters(self, values: dict) -> None:
        self._pull()
        super().set_parameters(values)
        self.engine.set_parameters(super().parameters())

    def load_adapter(self, directory) -> None:
        self._host_stale = False   # the file replaces whatever the GPU trained
        before = {n: a.shape for n, a in super().parameters().items()}
        super().load_adapter(directory)
        params = super().parameters()
        if {n: a.shape for n, a in params.items()} == before:
            self.engine.refresh_lora()
            self.engine.set_parameters(params)
        else:
            # Other targets or rank: the flat buffers' layout changes; build the engine anew
            # (fresh moments, the optimizer's hyperparameters kept).
            opt = self.engine.optimizer
            self.engine = ResidentEngine(self, ctx=self.engine.ctx, gradient_checkpointing=self.gradient_checkpointing,
                                         weights=self._weights, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                         weight_decay=opt.weight_decay)

    def save_adapter(self, directory) -> None:
        self._pull()
        super().save_adapter(directory)

    def generate(self, *args, **kwargs):
        self._pull()
        return super().generate(*args, **kwargs)

    # ---- forward / loss / gradients on the GPU --------------------------------------------
    def forward(self, input_ids, attention_mask=None) -> np.ndarray:
        return self.engine.forward(input_ids, attention_mask)

    __call__ = forward

    def loss(self, input_ids, labels, attention_mask=None, reduction: str = "mean") -> float:
        return self.engine.loss(input_ids, labels, attention_mask, reduction=reduction)

    def loss_and_grads(self, input_ids, labels, attention_mask=None, reduction: str = "mean"):
        out = self.engine.loss_and_grads(input_ids, labels, attention_mask, reduction=reduction)
        self.step += 1   # after, as Model.loss_and_grads: the masks are those of the step before
        return out

    # ---- the Trainer's device path ----------------------------------------------------------
    def configure_optimizer(self, lr: float, betas, eps: float, weight_decay: float) -> None:
        self.engine.configure_optimizer(lr, betas, eps, weight_decay)

    def accumulate_grads(self, input_ids, labels, attention_mask=None, first: bool = True) -> float:
        """Summed token loss of the micro-batch; its gradient is written (first) or added to
        the GPU gradient buffer."""
        out = self.engine.accumulate(input_ids, labels, attention_mask, first=first)
        self.step += 1
        return out

    def grads_sq_norm(self, scale: float) -> float:
        return self.engine.grad_sq_norm(scale)

    def apply_update(self, lr: float, grad_scale: float, clip_coef: float) -> None:
        self.engine.apply_update(lr, grad_scale, clip_coef)
        self._host_stale = True

    @property
    def flat_grad_size(self) -> int:
        return self.engine.n_params

    def flat_grads(self) -> np.ndarray:
        return self.engine.download_grads()

    def set_flat_grads(self, flat: np.ndarray) -> None:
        self.engine.upload_grads(flat)

    def named_grads(self) -> dict:
        """{PEFT name: gradient} (host copies): the Trainer names a non-finite one with it."""
        return self.engine._unflatten(self.engine.download_grads())

    def optimizer_state(self) -> dict:
        return self.engine.optimizer_state()

    def load_optimizer_state(self, state: dict) -> None:
        self.engine.load_optimizer_state(state)

    @property
    def optimizer_step_count(self) -> int:
        return self.engine.optimizer.step_count

    @optimizer_step_count.setter
    def optimizer_step_count(self, value: int) -> None:
        self.engine.optimizer.step_count = int(value)

    def state_arrays(self) -> list:
        """[flat weights, flat exp_avg, flat exp_avg_sq] (host copies): what must be equal on
        every rank of a data-parallel run."""
        st = self.engine.optimizer.state_dict()
        return [self.engine.ctx.to_numpy(self.engine.params), st["exp_avg"], st["exp_avg_sq"]]

    def set_state_arrays(self, arrays: list) -> None:
        params, m, v = arrays
        eng = self.engine
        eng.ctx.write(eng.params, params)
        eng.optimizer.load_state_dict({"step": eng.optimizer.step_count, "exp_avg": m, "exp_avg_sq": v})
        self._host_stale = True

    # ---- reports ----------------------------------------------------------------------------
    def memory_report(self) -> dict:
        rep = super().memory_report()
        rep["gpu_resident_bytes"] = int(self.engine.memory_report()["resident"])
        return rep
