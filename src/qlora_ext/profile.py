"""Step profiler: wall time per phase and device, GPU spans from timestamp queries, CPU/GPU
overlap, a phase table, and Chrome/Perfetto traces.

Code marks its work with `with PROFILER.phase("attention"):` (device "cpu" by default) or
reports spans it measured itself with `PROFILER.record(name, device, start_s, end_s)`
(GPU spans come from timestamp queries, converted to the host clock by the backend).
When the profiler is off, `phase()` returns one shared no-op context manager and `record()`
returns at once, so instrumented code costs a function call and an attribute test."""
from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

# Devices a span can belong to: "cpu" = host compute, "gpu" = GPU queue work, "transfer" =
# host<->GPU copies, "wait" = the host blocked on the GPU (neither side's work: it is what the
# overlap of CPU and GPU work could win back).
DEVICES = ("cpu", "gpu", "transfer", "wait")


@dataclass
class Span:
    name: str
    device: str
    start: float  # seconds, time.perf_counter() clock
    end: float
    thread: int


class _NullPhase:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _NullPhase()


class _Phase:
    __slots__ = ("prof", "name", "device", "t0")

    def __init__(self, prof, name, device):
        self.prof, self.name, self.device = prof, name, device

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.prof.record(self.name, self.device, self.t0, time.perf_counter())
        return False


class Profiler:
    def __init__(self):
        self.enabled = False
        self.spans: list[Span] = []
        self.steps: list[tuple[float, float]] = []
        self.meta: dict = {}
        self._lock = threading.Lock()

    # ---- recording -----------------------------------------------------------------
    def phase(self, name: str, device: str = "cpu"):
        if not self.enabled:
            return _NULL
        return _Phase(self, name, device)

    def record(self, name: str, device: str, start: float, end: float) -> None:
        if not self.enabled:
            return
        span = Span(name, device, start, end, threading.get_ident())
        with self._lock:
            self.spans.append(span)

    @contextmanager
    def step(self):
        """Marks one training step; the table reports per-step averages over these."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.enabled:
                self.steps.append((t0, time.perf_counter()))

    def start(self, **meta) -> None:
        self.spans, self.steps, self.meta = [], [], dict(meta)
        self.enabled = True

    def stop(self) -> None:
        self.enabled = False

    # ---- analysis --------------------------------------------------------------------
    def summary(self) -> dict:
        """Per-phase totals over the recorded steps: {'phases': [...], 'totals': {...}}."""
        nsteps = max(len(self.steps), 1)
        wall = sum(e - s for s, e in self.steps) if self.steps else _extent(self.spans)
        per = defaultdict(float)
        for sp in self.spans:
            per[(sp.name, sp.device)] += sp.end - sp.start
        phases = [
            {"phase": name, "device": dev, "ms_per_step": 1e3 * t / nsteps,
             "share": t / wall if wall > 0 else 0.0}
            for (name, dev), t in sorted(per.items(), key=lambda kv: -kv[1])
        ]
        by_dev = {d: _union([(s.start, s.end) for s in self.spans if s.device == d]) for d in DEVICES}
        cpu_iv = _intervals([(s.start, s.end) for s in self.spans if s.device == "cpu"])
        gpu_iv = _intervals([(s.start, s.end) for s in self.spans if s.device in ("gpu", "transfer")])
        overlap = _intersection_length(cpu_iv, gpu_iv)
        busy = _union([(s.start, s.end) for s in self.spans])
        totals = {
            "steps": len(self.steps),
            "step_ms": 1e3 * wall / nsteps,
            "cpu_ms": 1e3 * by_dev["cpu"] / nsteps,
            "gpu_ms": 1e3 * by_dev["gpu"] / nsteps,
            "transfer_ms": 1e3 * by_dev["transfer"] / nsteps,
            "wait_ms": 1e3 * by_dev["wait"] / nsteps,
            "overlap_ms": 1e3 * overlap / nsteps,
            "idle_ms": 1e3 * max(wall - busy, 0.0) / nsteps,
        }
        return {"phases": phases, "totals": totals, "meta": self.meta}

    def table(self) -> str:
        """The phase table as text: phase, device, ms per step, share of the step; totals."""
        s = self.summary()
        lines = [f"{'phase':<24}{'device':<10}{'ms/step':>10}{'share':>8}"]
        for p in s["phases"]:
            lines.append(f"{p['phase']:<24}{p['device']:<10}{p['ms_per_step']:>10.2f}{100 * p['share']:>7.1f}%")
        t = s["totals"]
        lines.append("-" * 52)
        for key in ("step_ms", "cpu_ms", "gpu_ms", "transfer_ms", "wait_ms", "overlap_ms", "idle_ms"):
            lines.append(f"{key[:-3] + ' (ms/step)':<34}{t[key]:>10.2f}")
        for k, v in s["meta"].items():
            lines.append(f"{k}: {v}")
        return "\n".join(lines)

    def chrome_trace(self) -> dict:
        """Chrome/Perfetto trace: one track per CPU thread, one for the GPU queue, one for
        transfers; times in microseconds from the first span."""
        t0 = min((s.start for s in self.spans), default=0.0)
        on_host = ("cpu", "wait")
        threads = sorted({s.thread for s in self.spans if s.device in on_host})
        tid_of = {t: i + 1 for i, t in enumerate(threads)}
        events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "qlora_ext"}}]
        for t, i in tid_of.items():
            events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": i, "args": {"name": f"CPU thread {i}"}})
        events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": 1000, "args": {"name": "GPU queue"}})
        events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": 1001, "args": {"name": "host<->GPU transfer"}})
        for s in self.spans:
            tid = tid_of.get(s.thread, 1) if s.device in on_host else (1000 if s.device == "gpu" else 1001)
            events.append({"ph": "X", "name": s.name, "cat": s.device, "pid": 1, "tid": tid,
                           "ts": 1e6 * (s.start - t0), "dur": 1e6 * (s.end - s.start)})
        for i, (a, b) in enumerate(self.steps):
            events.append({"ph": "X", "name": f"step {i}", "cat": "step", "pid": 1, "tid": 0,
                           "ts": 1e6 * (a - t0), "dur": 1e6 * (b - a)})
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": self.meta}

    def write_trace(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.chrome_trace(), f)

    def plot(self, path) -> None:
        """Stacked bar of ms per step by phase for each device (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise OSError("--plot needs matplotlib: pip install 'qlora_ext[plot]'") from None
        s = self.summary()
        fig, ax = plt.subplots(figsize=(8, 3 + 0.1 * len(s["phases"])))
        left = defaultdict(float)
        for p in s["phases"]:
            ax.barh(p["device"], p["ms_per_step"], left=left[p["device"]], label=p["phase"])
            left[p["device"]] += p["ms_per_step"]
        ax.set_xlabel("ms per step")
        ax.set_title(f"CPU/GPU split, step {s['totals']['step_ms']:.1f} ms")
        ax.legend(fontsize=7, ncol=3, loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _intervals(iv):
    """Merged, sorted, disjoint intervals."""
    out = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _union(iv) -> float:
    return sum(b - a for a, b in _intervals(iv))


def _intersection_length(x, y) -> float:
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if hi > lo:
            total += hi - lo
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def _extent(spans) -> float:
    if not spans:
        return 0.0
    return max(s.end for s in spans) - min(s.start for s in spans)


# The process-wide profiler every module reports into.
PROFILER = Profiler()


class PhaseTimer:
    """Exclusive seconds per phase (embed, norms, projections, dequant, attention, rope, ffn,
    loss, lm_head), accumulated until reset().  A phase nested in another (dequant inside
    projections) pauses its parent, so the shares add up to the total; each uninterrupted
    segment also goes to the step profiler (qlora_ext.PROFILER) as a CPU span when it is on.
    Threads nest their phases apart (the split placement times from its lanes and its CPU
    worker at once) and add into the same totals."""

    def __init__(self):
        self.profiler = PROFILER
        self.times: dict[str, float] = {}
        # profiler device per phase (default "cpu"); the model marks "ffn" as "wait" when a
        # GPU backend runs it, since the host then only waits for the GPU
        self.devices: dict[str, str] = {}
        self._local = threading.local()     # .stack: [name, start of its current segment]
        self._lock = threading.Lock()

    def _close(self, entry, now):
        name, t0 = entry
        with self._lock:
            self.times[name] = self.times.get(name, 0.0) + now - t0
        self.profiler.record(name, self.devices.get(name, "cpu"), t0, now)

    @contextmanager
    def __call__(self, name: str):
        now = time.perf_counter()
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        if stack:
            self._close(stack[-1], now)
        stack.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self._close(stack.pop(), now)
            if stack:
                stack[-1][1] = now

    def reset(self) -> dict:
        with self._lock:
            out, self.times = self.times, {}
        return out
