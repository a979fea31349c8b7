"""Lanes: the split placement's training step as micro-batches in flight at once.

In one pass every layer waits on itself: the GPU's q/k/v projections, then their readback, the
CPU's RoPE and attention, the upload of its output, the GPU's o projection and FFN; the CPU and
the GPU take turns and each idles while the other works.  With the batch's rows cut into lanes,
each lane runs the same layer program (engine/program.py) on its own thread and its own
SplitDevice: while one lane's attention runs on the CPU worker, another lane's projections run
on the GPU, and its transfers wait outside the context's lock (split_device.py).

The result is the bits of one pass, for any lane count:
- every token row's forward and backward is computed alike whatever rows share a call (the
  rows are independent; dropout masks are drawn per global row; with the GpuDevice's
  row_stable the rank-r products sum each row's K in an order fixed by K alone);
- the gradients sum over rows: they add one batch row at a time into the one gradient buffer,
  and the lanes take turns (Turns) at each op that adds into it, so the rows add in order;
- the loss is summed on the host from the per-token losses of every lane, in row order."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext

from . import program

_pools: dict = {}
_pools_lock = threading.Lock()


def lane_rows(B: int, lanes: int) -> list:
    """[(first row, end row)] of each lane: B rows cut into min(lanes, B) near-equal parts."""
    n = max(1, min(int(lanes), B))
    bounds = [B * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _pool(threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="qlora_ext-lane")
        return pool


class LaneFailed(RuntimeError):
    """Another lane of the step raised: this one stops (that lane's error is the step's)."""


class Turns:
    """Lane i enters its k-th turn only once lane i - 1 has left its k-th: every lane runs the
    same program, so its k-th gradient op is the same op, and the ops are recorded (and run by
    the GPU) in lane order.  Lane 0 never waits; a failed lane releases every waiter."""

    def __init__(self, lanes: int):
        self._done = [0] * lanes
        self._cond = threading.Condition()
        self._failed = False

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    @contextmanager
    def turn(self, lane: int):
        with self._cond:
            if lane:
                self._cond.wait_for(lambda: self._failed or self._done[lane - 1] > self._done[lane])
            if self._failed:
                raise LaneFailed("another lane of this step failed")
        try:
            yield
        finally:
            with self._cond:
                self._done[lane] += 1
                self._cond.notify_all()

    def of(self, lane: int):
        """grad_turn for lane `lane`'s device."""
        return lambda: self.turn(lane)


def forward_backward_lanes(model, ids, mask, lab, scale: float, clear: bool, lanes: int, pack=None) -> list:
    """Model._forward_backward for a model whose device is a SplitDevice, the rows in `lanes`
    lanes: the gradient of scale · (summed loss) written to (clear) or added to the device's
    gradient buffer; returns the lanes' per-token losses in row order (the device's
    loss_value sums them)."""
    B, T = ids.shape
    rows = lane_rows(B, lanes)
    main = model.device
    devs = main.lanes(len(rows))
    turns = Turns(len(rows))
    work = []

    def run(i: int):
        dev, acts, s = work[i]
        try:
            if clear and i == 0:
                dev.clear_grads()     # recorded before lane 0's first turn, so before every lane's
            dev.embed(s.x)
            program.forward_layers(dev, acts, s, keep=True)
            losses = dev.lm_head_loss(s.xf, scale, s.dh)
            program.backward_layers(dev, acts, s)
            return losses
        except BaseException:
            turns.fail()
            raise

    try:
        for i, ((a, b), dev) in enumerate(zip(rows, devs)):
            dev.gpu.row0 = a * T
            dev.grad_turn = turns.of(i)
            pos, segs = ((None if p is None else p[a:b]) for p in (pack or (None, None)))
            _, acts, s = model._begin(ids[a:b], None if mask is None else mask[a:b], lab[a:b], keep=True,
                                      training=True, device=dev, positions=pos, segments=segs)
            work.append((dev, acts, s))
        model.step += 1     # after: the dropout masks are those of the step before
        others = [_pool(len(work) - 1).submit(run, i) for i in range(1, len(work))]
        try:
            results, errors = [run(0)], [None]
        except BaseException as e:    # raised below once every lane has stopped
            results, errors = [None], [e]
        wait(others)    # the other lanes use this step's buffers: never return before them
        errors += [f.exception() for f in others]
        failed = [e for e in errors if e is not None and not isinstance(e, LaneFailed)]
        if failed:
            raise failed[0]
        return results + [f.result() for f in others]
    finally:
        for dev in devs:
            dev.gpu.row0 = 0
            dev.grad_turn = nullcontext
