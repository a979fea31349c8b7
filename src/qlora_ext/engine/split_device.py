"""The split placement's device: the projections with LoRA, SwiGLU, RMSNorm (and the q/k
norms), the residual adds, the embedding and the LM head with the loss on the GPU; RoPE and the
attention core on the CPU's C kernels.  The norms run on the GPU because there their inputs and
outputs never cross the bus: on the CPU each layer read back x and x2 and uploaded h1 and h2
(and the same again in the backward), which with the norms themselves took 3.5 s of a 7.2 s
step at the Qwen3-0.6B shape, 4 x 1024, on the H200 (BENCHMARKS.md).

Every buffer of the program is a SplitTensor: one logical tensor with a host array and a GPU
buffer (each made on first use) and the side(s) holding its current value.  An op reads its
inputs on its own side (a transfer where the value is only on the other side), writes its
outputs there, and leaves them valid on that side only; views share their tensor's state.
Transfers are timed as "upload" / "readback" (device "transfer") in the profiler.

Lanes: a training step can run as several micro-batches ("lanes", engine/lanes.py), each a
SplitDevice of its own (lanes()) driven by its own thread through the same layer program.  The
CPU ops of every lane run on one worker thread (CpuWorker: one OpenMP team over all cores, one
kernel at a time), the GPU ops take the context's lock; so while one lane's attention runs on
the CPU, another lane records and the GPU runs its projections, and the transfers of one lane
wait outside the lock.  The GpuDevice runs row_stable, and the ops that add into the gradient
buffer (linear_backward, lm_head_loss) take turns (engine/lanes.py): lane i records its k-th
such op after lane i - 1 recorded its k-th, so the gradients add up in row order, the loss is
summed on the host from the per-token losses, and any lane count gives the bits of one pass.

Shape letters as in engine/acts.py."""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np

from ..gpu.runtime import GpuTensor

CPU, GPU = "cpu", "gpu"


class _Storage:
    __slots__ = ("size", "host", "dev", "valid")

    def __init__(self, size: int):
        self.size = size
        self.host = self.dev = None
        self.valid = set()


class SplitTensor:
    """A view (shape) of a storage that may live on the host, the GPU or both."""

    __slots__ = ("store", "shape")

    def __init__(self, store: _Storage, shape: tuple):
        self.store, self.shape = store, tuple(shape)


class CpuWorker:
    """One thread that runs every CPU kernel of the split placement, one at a time: the
    kernels' OpenMP team stays that thread's (a team per calling thread would leave one
    spinning while the other starts), and a lane's attention runs while its own thread waits
    and the other lanes record GPU work."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qlora_ext-cpu")

    def run(self, fn, *args):
        return self._pool.submit(fn, *args).result()


def _gpu_op(method):
    """The op records GPU work: under the context's lock (lanes share one pending encoder)."""
    @functools.wraps(method)
    def op(self, *args, **kwargs):
        with self.ctx.lock:
            return method(self, *args, **kwargs)
    return op


class SplitDevice:
    """cpu: the CpuDevice; gpu: the GpuDevice (both over the same base and FlatParams; the GPU
    holds the parameters and their gradients, as in the gpu placement)."""

    name = "split"

    def __init__(self, cpu, gpu, worker: CpuWorker | None = None):
        self.cpu, self.gpu = cpu, gpu
        self.ctx = gpu.ctx
        self.layers, self.recompute_layers = gpu.layers, gpu.recompute_layers
        self.final_norm = gpu.final_norm
        self.timer = cpu.timer
        self.timer.devices.update(upload="transfer", readback="transfer")
        self.worker = worker if worker is not None else CpuWorker()
        gpu.row_stable = True
        self._steps: dict = {}
        self._lanes: list = []      # the other lanes' SplitDevices, kept for their buffers
        self.dims = None
        # a context manager around each op that adds into the gradient buffer: the lane's
        # turn while lanes run (engine/lanes.py), else nothing
        self.grad_turn = nullcontext

    # A layer's ops run on both devices here: the GPU device's replay of captured dispatches
    # (engine/program.py's _replayed) would leave out the CPU's.
    replayable = None

    @property
    def pad_multiple(self) -> int:
        return max(self.cpu.pad_multiple, self.gpu.pad_multiple)

    def __getattr__(self, name):
        # the GPU device holds the parameters, gradients and memory accounting
        return getattr(self.gpu, name)

    def lanes(self, n: int) -> list:
        """This device and n - 1 others for rows run beside it: each with its own batch inputs
        and buffers, all sharing the weights, the parameters, their gradient buffer and the CPU
        worker."""
        while len(self._lanes) < n - 1:
            self._lanes.append(None)
        for i in range(n - 1):
            old = self._lanes[i]
            lane = SplitDevice(self.cpu.lane(), self.gpu.lane(None if old is None else old.gpu), self.worker)
            if old is not None:
                lane._steps = old._steps
            self._lanes[i] = lane
        return [self, *self._lanes[:n - 1]]

    # ---- tensors -------------------------------------------------------------------------------
    @staticmethod
    def empty(shape) -> SplitTensor:
        return SplitTensor(_Storage(int(np.prod(shape))), shape)

    @staticmethod
    def view(t: SplitTensor, shape) -> SplitTensor:
        return SplitTensor(t.store, shape)

    def _host(self, t: SplitTensor) -> np.ndarray:
        st = t.store
        if st.host is None:
            st.host = np.empty(st.size, np.float32)
        if CPU not in st.valid and GPU in st.valid:
            with self.timer("readback"):
                with self.ctx.lock:
                    pending = self.ctx.read_start(GpuTensor(st.dev.buffer, (st.size,)), st.host)
                pending.finish()     # the wait for the GPU and the copy, outside the lock
            st.valid.add(CPU)
        return st.host.reshape(t.shape)

    def _dev(self, t: SplitTensor) -> GpuTensor:
        st = t.store
        if st.dev is None:
            st.dev = self.ctx.empty((st.size,))
        if GPU not in st.valid and CPU in st.valid:
            with self.timer("upload"):
                self.ctx.write(st.dev, st.host)
            st.valid.add(GPU)
        return GpuTensor(st.dev.buffer, t.shape)

    @staticmethod
    def _wrote(t: SplitTensor, side: str) -> None:
        t.store.valid = {side}

    def _on(self, side, t):
        return self._host(t) if side == CPU else self._dev(t)

    def _out(self, side, t, accumulate: bool = False):
        """t's buffer on `side` for an op to write (its value brought over first when the op
        adds into it)."""
        if accumulate:
            buf = self._on(side, t)
        elif side == CPU:
            st = t.store
            if st.host is None:
                st.host = np.empty(st.size, np.float32)
            buf = st.host.reshape(t.shape)
        else:
            st = t.store
            if st.dev is None:
                st.dev = self.ctx.empty((st.size,))
            buf = GpuTensor(st.dev.buffer, t.shape)
        self._wrote(t, side)
        return buf

    # ---- the step ------------------------------------------------------------------------------
    @_gpu_op
    def begin(self, dims, positions, mask, ids, labels=None, keep: bool = False, dropout: float = 0.0,
              seed: int = 0, step: int | None = None, segments=None):
        self.dims = dims
        self.cpu.prepare(dims, positions, mask, ids, labels, dropout, seed, step, segments)  # attention's
        self.gpu.prepare(dims, positions, mask, ids, labels, dropout, seed, step)
        key = (dims, keep)
        if key not in self._steps:
            from .acts import allocate_step

            self._steps[key] = allocate_step(dims, self.layers, self.recompute_layers, keep, self.params.ranks,
                                             self.empty)
        acts, s = self._steps[key]
        return acts, s

    def layer_weights(self, l: int):
        return self.gpu.layer_weights(l)      # the norms run on the GPU

    @_gpu_op
    def layer_done(self) -> None:
        self.ctx.submit()

    @_gpu_op
    def clear_grads(self) -> None:
        self.gpu.clear_grads()

    def loss_value(self, losses) -> float:
        """The summed loss from lm_head_loss's per-token losses, or from each lane's (a list in
        row order): one float64 sum over every token, whatever the lanes."""
        parts = losses if isinstance(losses, list) else [losses]
        with self.ctx.lock:
            rows = [self.ctx.to_numpy(t) for t in parts]
        return float(np.concatenate(rows).sum(dtype=np.float64))

    def copy(self, src, dst) -> None:
        if GPU in src.store.valid:
            with self.ctx.lock:
                self.gpu.copy(self._dev(src), self._out(GPU, dst))
        else:
            np.copyto(self._out(CPU, dst), self._host(src))

    # ---- GPU ops -------------------------------------------------------------------------------
    @_gpu_op
    def linear_forward(self, l, proj, x, y, u) -> None:
        xd = self._dev(x)
        ud = self._out(GPU, u) if u is not None else None
        yd = self._out(GPU, y) if y is not None else None
        self.gpu.linear_forward(l, proj, xd, yd, ud)

    def linear_backward(self, l, proj, dy, x, u, dx, accumulate) -> None:
        with self.grad_turn(), self.ctx.lock:
            dyd, xd = self._dev(dy), self._dev(x)
            ud = self._dev(u) if u is not None else None
            dxd = self._out(GPU, dx, accumulate) if dx is not None else None
            self.gpu.linear_backward(l, proj, dyd, xd, ud, dxd, accumulate)

    @_gpu_op
    def swiglu_forward(self, g, u, m) -> None:
        self.gpu.swiglu_forward(self._dev(g), self._dev(u), self._out(GPU, m))

    @_gpu_op
    def swiglu_backward(self, g, u, dm, dg, du) -> None:
        self.gpu.swiglu_backward(self._dev(g), self._dev(u), self._dev(dm), self._out(GPU, dg), self._out(GPU, du))

    @_gpu_op
    def rmsnorm_forward(self, x, w, y, rstd) -> None:
        self.gpu.rmsnorm_forward(self._dev(x), w, self._out(GPU, y), self._out(GPU, rstd))

    @_gpu_op
    def rmsnorm_backward(self, x, w, rstd, dy, dx, accumulate) -> None:
        self.gpu.rmsnorm_backward(self._dev(x), w, self._dev(rstd), self._dev(dy),
                                  self._out(GPU, dx, accumulate), accumulate)

    @_gpu_op
    def add(self, y, x) -> None:
        xd = self._dev(x)
        self.gpu.add(self._out(GPU, y, accumulate=True), xd)

    @_gpu_op
    def embed(self, out) -> None:
        self.gpu.embed(self._out(GPU, out))

    def lm_head_loss(self, xf, scale, dh):
        """Records the GPU's loss head; returns its per-token losses (loss_value sums them)."""
        with self.grad_turn(), self.ctx.lock:
            self.gpu.lm_head_loss(self._dev(xf), scale, self._out(GPU, dh) if dh is not None else None)
            return self.gpu.step_inputs(self.dims).head.losses

    @_gpu_op
    def logits(self, xf) -> np.ndarray:
        return self.gpu.logits(self._dev(xf))

    # ---- generation: the cache beside the attention (CPU), the LM head on the GPU ----------------
    def kv_cache(self, rows: int, slots: int):
        return self.cpu.kv_cache(rows, slots)

    def next_tokens(self, x, last, k: int) -> tuple:
        h = self.worker.run(self.cpu.final_rows, self._host(x), last)
        with self.ctx.lock:
            buf = self.gpu.decode_rows(len(last)).rows
            self.ctx.write(buf, h)
            return self.gpu.head_candidates(buf, k)

    # ---- CPU ops: inputs brought over on the lane's thread, the kernel on the CPU worker ---------
    def rope(self, t, sign: int) -> None:
        self.worker.run(self.cpu.rope, self._out(CPU, t, accumulate=True), sign)

    def attention_forward(self, q, k, v, attn, lse) -> None:
        qh, kh, vh = self._host(q), self._host(k), self._host(v)
        self.worker.run(self.cpu.attention_forward, qh, kh, vh, self._out(CPU, attn), self._out(CPU, lse))

    def attention_cached(self, l, cache, q, k, v, attn, lse) -> None:
        qh, kh, vh = self._host(q), self._host(k), self._host(v)
        self.worker.run(self.cpu.attention_cached, l, cache, qh, kh, vh, self._out(CPU, attn), None)

    def attention_backward(self, q, k, v, attn, lse, dattn, dq, dk, dv) -> None:
        ins = [self._host(t) for t in (q, k, v, attn, lse, dattn)]
        self.worker.run(self.cpu.attention_backward, *ins, self._out(CPU, dq), self._out(CPU, dk),
                        self._out(CPU, dv))
