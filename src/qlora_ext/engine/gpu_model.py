"""GpuModel: the Model API with the whole training step on the GPU (the `gpu` placement).

The base, the LoRA weights, their gradients and the AdamW moments live on the GPU; the host
keeps the flat parameter array as a mirror that is refreshed only when read (parameters(),
save_adapter), so a training step moves nothing but ids and labels up and the loss down.
Generation runs the layer program on the GPU too, with the KV cache in GPU memory.

The Trainer's GpuAdamW (train/update.py) drives the step: gradients accumulate on the GPU
(accumulate_grads), clipping needs one float of squared norm, AdamW updates in place;
checkpoints download the weights and moments in the host AdamW's format, so a checkpoint of
any placement resumes in any other."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..options import DEFAULT_LANES, WEIGHTS_ON_GPU, check_lanes
from .gpu_device import GpuDevice
from .model import Model


class GpuModel(Model):
    """See Model; `ctx` is the GPU runtime context.  weights: "on GPU" (the NF4 base uploaded
    once) or "streamed" (one slot per projection, each layer uploaded before use)."""

    placement = "gpu"
    optimizer_device = "gpu"   # the Trainer's update strategy: GpuAdamW

    def __init__(self, state, lora_config=None, ctx=None, gradient_checkpointing: bool | int = False,
                 train_lm_head: bool = False, threads: int | None = None, seed: int = 0,
                 weights: str = WEIGHTS_ON_GPU, gemm: str | None = None):
        super().__init__(state, lora_config, gradient_checkpointing=gradient_checkpointing,
                         train_lm_head=train_lm_head, threads=threads, seed=seed)
        if ctx is None:
            from ..gpu.runtime import shared_context
            ctx = shared_context()
        self.host = self.device            # the CPU device (the split placement's CPU side)
        self._host_stale = False           # True once the GPU has updated weights the host lacks
        self._weights, self._gemm = weights, gemm
        self.device = self._gpu_device(ctx)

    def _gpu_device(self, ctx) -> GpuDevice:
        return GpuDevice(self.state, self.params, ctx, self.rope, recompute_layers=self.recompute_layers,
                         weights=self._weights, gemm=self._gemm, dropout=float(self.lora_config.dropout))

    @property
    def ctx(self):
        return self.device.ctx

    # ---- weights: the GPU holds the truth, the host mirror is refreshed on read -----------
    def _pull(self) -> None:
        if self._host_stale:
            self._host_stale = False
            self.params.values[...] = self.ctx.to_numpy(self.device.values)

    def _push(self) -> None:
        self.ctx.write(self.device.values, self.params.values)

    def parameters(self) -> dict:
        self._pull()
        return super().parameters()

    def set_parameters(self, values: dict) -> None:
        self._pull()
        super().set_parameters(values)
        self._push()

    def load_adapter(self, directory) -> None:
        self._host_stale = False   # the file replaces whatever the GPU trained
        before = self.params.size, dict(self.params.offsets)
        super().load_adapter(directory)
        if (self.params.size, dict(self.params.offsets)) == before:
            self.device.params = self.params
            self._push()
        else:
            # other targets or rank: the flat layout changes, and with it the device's buffers
            self.device = self._gpu_device(self.ctx)

    def save_adapter(self, directory) -> None:
        self._pull()
        super().save_adapter(directory)

    # ---- forward / loss / gradients on the GPU --------------------------------------------
    @contextmanager
    def kernel_timing(self):
        """With qlora_ext.profile.PROFILER on (and timestamp queries available), every kernel
        recorded inside becomes a "gpu" span of it; otherwise nothing."""
        from ..profile import PROFILER

        ctx = self.ctx
        if not (PROFILER.enabled and ctx.has_timestamps):
            yield
            return
        if ctx._timing is None or ctx._timing.profiler is not PROFILER:
            ctx.enable_timing(profiler=PROFILER)
        yield
        ctx.kernel_times()   # the remaining passes become spans

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None) -> np.ndarray:
        with self.kernel_timing():
            return super().forward(input_ids, attention_mask, position_ids, segment_ids)

    __call__ = forward

    def loss(self, input_ids, labels, attention_mask=None, reduction: str = "mean", position_ids=None,
             segment_ids=None) -> float:
        with self.kernel_timing():
            return super().loss(input_ids, labels, attention_mask, reduction, position_ids, segment_ids)

    def loss_and_grads(self, input_ids, labels, attention_mask=None, reduction: str = "mean", position_ids=None,
                       segment_ids=None):
        with self.kernel_timing():
            return super().loss_and_grads(input_ids, labels, attention_mask, reduction, position_ids, segment_ids)

    def _grads(self) -> dict:
        return self.params.named(self.ctx.to_numpy(self.device.grads))

    # ---- what the Trainer's GpuAdamW (train/update.py) drives ------------------------------
    def accumulate_grads(self, input_ids, labels, attention_mask=None, first: bool = True, position_ids=None,
                         segment_ids=None) -> float:
        """Summed token loss of the micro-batch; its gradient is written (first) or added to
        the GPU gradient buffer (device.grads).  Only the 8-byte loss statistics come down."""
        from .model import check_inputs

        ids, mask, lab = check_inputs(self.config, input_ids, attention_mask, labels)
        pack, lab = self._packing(ids, lab, position_ids, segment_ids)
        with self.kernel_timing():
            pending = self._forward_backward(ids, mask, lab, 1.0, clear=first, pack=pack)
            return self.device.loss_value(pending) if self.count_tokens(lab) else 0.0

    def weights_changed(self) -> None:
        """The GPU's parameters were updated: the host mirror is refreshed on its next read."""
        self._host_stale = True

    # ---- reports ----------------------------------------------------------------------------
    def memory_report(self, batch_shape: tuple | None = None) -> dict:
        """Host bytes as Model's, plus the GPU's: weights, parameters and optimizer state
        ("gpu_fixed_bytes": held for the whole run), and with batch_shape (B, T) the per-shape buffers."""
        rep = super().memory_report()
        rep["gpu_fixed_bytes"] = int(self.device.fixed_bytes + 2 * 4 * self.params.size)
        if batch_shape is not None:
            B, T = batch_shape
            rep["gpu_activation_bytes"] = int(self.device.shape_bytes(self.dims(B, T)))
        return rep


class SplitModel(GpuModel):
    """The split placement: projections with LoRA, norms, SwiGLU, residual adds and the LM head
    on the GPU; RoPE and attention on the CPU (engine/split_device.py).  Parameters,
    gradients and AdamW live on the GPU as in the gpu placement."""

    placement = "split"

    def __init__(self, state, lora_config=None, ctx=None, lanes: int | None = None, **kw):
        super().__init__(state, lora_config, ctx=ctx, **kw)
        self.lanes = lanes

    @property
    def lanes(self) -> int:
        """Micro-batches of a training step in flight at once (engine/lanes.py): with 2, one
        lane's attention runs on the CPU while the other's projections run on the GPU; 1: one
        pass.  Any count gives the same bits; a batch of B rows runs min(lanes, B)."""
        return self._lanes

    @lanes.setter
    def lanes(self, n: int | None) -> None:
        self._lanes = DEFAULT_LANES if n is None else check_lanes(n)

    def _gpu_device(self, ctx):
        from .split_device import SplitDevice

        return SplitDevice(self.host, super()._gpu_device(ctx))

    def _forward_backward(self, ids, mask, lab, scale: float, clear: bool = True, pack=None):
        if self.lanes < 2 or ids.shape[0] < 2 or self.device.gpu.streamed is not None:
            return super()._forward_backward(ids, mask, lab, scale, clear, pack)
        from .lanes import forward_backward_lanes

        return forward_backward_lanes(self, ids, mask, lab, scale, clear, self.lanes, pack)

    def memory_report(self, batch_shape: tuple | None = None) -> dict:
        rep = Model.memory_report(self)
        rep["gpu_fixed_bytes"] = int(self.device.fixed_bytes + 2 * 4 * self.params.size)
        return rep
