"""Access to the compiled kernels.  A module that fails to load (a broken build, a wheel for
another platform) becomes a diagnostic raised on first use, not an import-time crash, so
that `import qlora_ext` and `qlora-ext info` still work and say what is wrong."""
from __future__ import annotations

import os

import numpy as np

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


# Threads per logical CPU allowed before a count is cut down: a little oversubscription is
# harmless (and tested), while tens of thousands of OpenMP threads exhaust the process's
# thread and stack limits, which makes libgomp abort or the kernels crash.
THREADS_PER_CPU = 4


def machine_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_threads() -> int:
    """The most kernel threads a call may start: THREADS_PER_CPU per logical CPU."""
    return THREADS_PER_CPU * machine_cpus()


def resolve_threads(threads, name: str = "threads") -> int:
    """The kernel thread count for a `threads` argument: None means default_threads();
    otherwise a positive integer, cut down to max_threads().  Anything else (0, negative,
    a float, a bool, a string) raises ValueError naming `name`."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise ValueError(f"{name}={threads!r}: expected a positive integer or None")
    if threads < 1:
        raise ValueError(f"{name}={threads!r}: expected a positive integer or None")
    return int(min(int(threads), max_threads()))


def default_threads() -> int:
    """Threads the kernels use when none is given: QLORA_EXT_THREADS (cut down to
    max_threads()), else every CPU this process may run on."""
    env = os.environ.get("QLORA_EXT_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"QLORA_EXT_THREADS={env!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"QLORA_EXT_THREADS={env!r} must be >= 1")
        return min(n, max_threads())
    return machine_cpus()


def available_memory() -> int:
    """Bytes of RAM a new allocation can get without swapping: MemAvailable where the OS
    reports it (Linux), else the physical RAM."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: no limit from this check


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.3g} GiB"


def require_memory(nbytes: int, what: str) -> None:
    """ValueError when `what` (a phrase naming the file and key it comes from) would need more
    than the RAM available, checked before anything that size is allocated."""
    avail = available_memory()
    if nbytes > avail:
        raise ValueError(f"{what} needs at least {_gib(nbytes)} of RAM, more than the {_gib(avail)} "
                         "available on this machine")


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
