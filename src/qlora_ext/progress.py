"""Progress of a phase (loading, tokenizing, eval, training, saving) on stderr.

On a terminal: a tqdm bar.  Elsewhere (a log file, CI, a pipe): one plain line every few
seconds (QLORA_EXT_PROGRESS_INTERVAL, default 5) and one when the phase ends, so a long
phase never looks hung and a log holds no carriage-return noise.  Nothing at all when the
caller passes enabled=False (--quiet) or QLORA_EXT_PROGRESS=0."""
from __future__ import annotations

import os
import sys
import time

DEFAULT_INTERVAL = 5.0


def progress_mode(enabled: bool | None = None) -> str:
    """'bar', 'lines' or 'off'.  enabled=None: a bar on a terminal, lines elsewhere, off when
    QLORA_EXT_PROGRESS is 0; True: a bar; False: off."""
    if enabled is not None:
        return "bar" if enabled else "off"
    if os.environ.get("QLORA_EXT_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return "off"
    stream = sys.stderr
    return "bar" if getattr(stream, "isatty", None) and stream.isatty() else "lines"


def _interval() -> float:
    raw = os.environ.get("QLORA_EXT_PROGRESS_INTERVAL", "")
    try:
        v = float(raw) if raw.strip() else DEFAULT_INTERVAL
    except ValueError:
        raise ValueError(f"QLORA_EXT_PROGRESS_INTERVAL={raw!r} is not a number of seconds") from None
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"QLORA_EXT_PROGRESS_INTERVAL={raw!r} must be a finite number of seconds >= 0")
    return v


def _seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


class Progress:
    """A counter shown as a bar or as log lines: `with Progress(total, "loading") as p: p.update(1)`.

    Also works as a plain object (call close()).  When off every method is a no-op, so
    callers never branch on it."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool | None = None, unit_scale: bool = False):
        self._bar = None
        self.mode = progress_mode(enabled)
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self._postfix, self._closed = 0, "", False
        self._start = time.perf_counter()
        if self.mode == "bar":
            from tqdm.auto import tqdm  # imported lazily: only a terminal needs it

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                             leave=False, dynamic_ncols=True)
        elif self.mode == "lines":
            self._every = _interval()
            self._next_line = self._start + self._every

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and time.perf_counter() >= self._next_line:
            self._line()
            self._next_line = time.perf_counter() + self._every

    def set_postfix(self, text: str) -> None:
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def _count(self) -> str:
        u = self.unit
        units = u if u.endswith("s") else u + "es" if u.endswith(("ch", "sh", "x")) else u + "s"
        return f"{self.n}/{self.total} {units}" if self.total else f"{self.n} {units}"

    def _line(self, done: bool = False) -> None:
        elapsed = time.perf_counter() - self._start
        parts = [f"{self.desc}: {self._count()}"]
        if done:
            parts.append(f"done in {_seconds(elapsed)}")
        else:
            if self.total:
                parts[0] += f" ({100 * self.n / self.total:.0f}%)"
            parts.append(f"{_seconds(elapsed)} elapsed")
            if self.total and self.n:
                parts.append(f"ETA {_seconds(elapsed / self.n * (self.total - self.n))}")
        if self._postfix:
            parts.append(self._postfix)
        print(", ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        """End of the phase: the bar goes, or the closing line is written."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines":
            self._line(done=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self._bar is None:  # a phase that failed did not finish: no "done" line
            self._closed = True
        self.close()
