"""Progress bars over tqdm: drawn on a terminal, silent when stderr is not a TTY, when the
caller passes enabled=False, or when QLORA_EXT_PROGRESS=0 (CI logs stay clean)."""
from __future__ import annotations

import os
import sys


def progress_enabled(enabled: bool | None = None) -> bool:
    """enabled=None means: on when stderr is a terminal and QLORA_EXT_PROGRESS is not 0."""
    if enabled is not None:
        return bool(enabled)
    if os.environ.get("QLORA_EXT_PROGRESS", "").strip() in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


class Progress:
    """A counter with an optional bar: `with Progress(total, "loading") as p: p.update(1)`.

    Also works as a plain object (call close()).  When disabled every method is a no-op, so
    callers never branch on it."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool | None = None, unit_scale: bool = False):
        self._bar = None
        if progress_enabled(enabled):
            from tqdm.auto import tqdm  # imported lazily: only a terminal needs it

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                             leave=False, dynamic_ncols=True)

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
