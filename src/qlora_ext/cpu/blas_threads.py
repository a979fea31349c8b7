"""numpy's BLAS held to one thread while the CPU device computes.

The C kernels (the fused NF4 GEMM, attention, norms) run an OpenMP team over the cores.
OpenBLAS keeps a pthread team of its own whose workers spin for a while after every call; on
a machine with few cores the two teams then take turns on the same cores and a step slows
several-fold (BENCHMARKS.md, "CPU threads").  Where the fused kernel takes the frozen
products, the BLAS calls left (LoRA's rank-r products, the LM head) run on one thread and
every parallel loop runs on the one OpenMP team.  threadpoolctl finds the BLAS numpy loaded
(OpenBLAS, MKL, BLIS, Accelerate) and sets its threads; the previous setting comes back when
the scope ends."""
from __future__ import annotations

from contextlib import nullcontext

_controller = None


def _blas():
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _controller = False
        else:
            _controller = ThreadpoolController().select(user_api="blas")
    return _controller


def single_threaded_blas():
    """A context in which numpy's BLAS uses one thread (a no-op without threadpoolctl)."""
    blas = _blas()
    return blas.limit(limits=1) if blas else nullcontext()
