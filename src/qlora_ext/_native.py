"""Access to the compiled kernels.  A module that fails to load (a broken build, a wheel for
another platform) becomes a diagnostic raised on first use, not an import-time crash, so
that `import qlora_ext` and `qlora-ext info` still work and say what is wrong."""
from __future__ import annotations

import os

_kernels = None
_load_error: BaseException | None = None


def kernels():
    """The compiled `_kernels` module; raises ImportError with the reason if it cannot load."""
    global _kernels, _load_error
    if _kernels is None and _load_error is None:
        try:
            from . import _kernels as mod  # type: ignore[attr-defined]

            _kernels = mod
        except ImportError as e:  # pragma: no cover - depends on the build
            _load_error = e
    if _kernels is None:
        raise ImportError(
            "qlora_ext's compiled kernels failed to load "
            f"({_load_error}). Reinstall with `pip install --force-reinstall qlora_ext`, "
            "or for a source checkout build them with "
            "`cmake -S . -B build/dev -DQLORA_EXT_INPLACE=ON && cmake --build build/dev`."
        )
    return _kernels


def default_threads() -> int:
    """Threads the kernels use when none is given: QLORA_EXT_THREADS, else all cores."""
    env = os.environ.get("QLORA_EXT_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"QLORA_EXT_THREADS={env!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"QLORA_EXT_THREADS={env!r} must be >= 1")
        return n
    return os.cpu_count() or 1


def cpu_features() -> dict:
    """Which SIMD path the C kernels take: {'active', 'best', 'threads'}.

    'active' is what runs now, 'best' what the CPU supports; the environment variable
    QLORA_EXT_CPU=scalar|avx2|avx512|avx512_bf16 caps 'active' (re-read by refresh_cpu_features())."""
    k = kernels()
    return {"active": k.cpu_level_name(), "best": k.cpu_hw_level_name(), "threads": default_threads()}


def refresh_cpu_features() -> dict:
    """Re-read QLORA_EXT_CPU and return cpu_features()."""
    kernels().refresh_cpu_features()
    return cpu_features()
