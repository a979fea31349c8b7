"""Benchmarks run with pytest-benchmark: `pytest bench/ --benchmark-only`.  Each benchmark
puts its rate in extra_info; references are timed in the same run where installed."""
import os
import sys

# A source checkout without an installed package: import from src/.
_src = os.path.join(os.path.dirname(__file__), "..", "src")
if os.path.isdir(os.path.join(_src, "qlora_ext")) and _src not in sys.path:
    try:
        import qlora_ext  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.abspath(_src))
