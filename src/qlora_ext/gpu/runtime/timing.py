"""Per-kernel GPU times from timestamp queries, for GpuContext.enable_timing and the profiler."""
from __future__ import annotations

import time

import numpy as np


class PassTimer:
    """Begin/end timestamps of each compute pass in a query set; resolved on collect() or
    when the set is full.  Timestamps are taken as nanoseconds (WebGPU's unit; Vulkan's
    timestampPeriod is 1 ns on NVIDIA and lavapipe)."""

    CAPACITY = 4096  # queries = 2 per pass

    def __init__(self, ctx, profiler=None):
        w = ctx.wgpu
        self.qs = ctx.device.create_query_set(type=w.QueryType.timestamp, count=self.CAPACITY)
        self.resolve = ctx.device.create_buffer(size=8 * self.CAPACITY,
                                                usage=w.BufferUsage.QUERY_RESOLVE | w.BufferUsage.COPY_SRC)
        self.labels: list[str] = []
        self.submit_times: list[float] = []   # host time of the submit of each label's pass, once submitted
        self.totals: dict = {}
        # Spans go to the profiler at every collect, including the ones forced mid-step by a
        # full query set (a step has more passes than CAPACITY / 2).
        self.profiler = profiler

    def begin_pass(self, ctx, label: str):
        if 2 * (len(self.labels) + 1) > self.CAPACITY:
            self.collect(ctx)
        i = len(self.labels)
        self.labels.append(label)
        return ctx._enc().begin_compute_pass(timestamp_writes={
            "query_set": self.qs, "beginning_of_pass_write_index": 2 * i,
            "end_of_pass_write_index": 2 * i + 1})

    def submitted(self) -> None:
        """The passes begun since the last submit are being submitted now."""
        now = time.perf_counter()
        self.submit_times += [now] * (len(self.labels) - len(self.submit_times))

    def collect(self, ctx) -> None:
        """Resolve the pending passes' timestamps into totals (and profiler spans on the host
        clock: see _host_offset)."""
        n = len(self.labels)
        if n == 0:
            return
        ctx.encoder().resolve_query_set(self.qs, 0, 2 * n, self.resolve, 0)
        ctx.submit()
        raw = ctx.queue.read_buffer(self.resolve, 0, 16 * n)
        t_host = time.perf_counter()
        ticks = np.frombuffer(raw, dtype=np.uint64).reshape(n, 2).astype(np.int64)
        for label, (t0, t1) in zip(self.labels, ticks):
            sec, cnt = self.totals.get(label, (0.0, 0))
            self.totals[label] = (sec + max(int(t1 - t0), 0) * 1e-9, cnt + 1)
        if self.profiler is not None:
            offset = self._host_offset(ticks, t_host)
            for label, (t0, t1) in zip(self.labels, ticks):
                self.profiler.record(label, "gpu", offset + int(t0) * 1e-9, offset + int(t1) * 1e-9)
        self.labels, self.submit_times = [], []

    def _host_offset(self, ticks, t_host: float) -> float:
        """Seconds to add to a timestamp (in seconds) to place it on the host clock.  No pass
        starts before its submit, and the last one ended before the read returned (t_host):
        the offset lies between those bounds.  The lower one is taken: it is exact for any
        pass the GPU started at once (an idle GPU, as after each wait), where the upper one is
        late by the readback's own latency, which would show the GPU busy after it was idle."""
        upper = t_host - int(ticks[:, 1].max()) * 1e-9
        lower = max(s - int(t0) * 1e-9 for s, t0 in zip(self.submit_times, ticks[:, 0]))
        return min(lower, upper)
