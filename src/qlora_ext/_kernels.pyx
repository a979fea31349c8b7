# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled kernels of qlora_ext: one extension module, so the SIMD path chosen at run time
is shared by every kernel.  Each op lives in its own .pxi (the contract: shapes, dtypes,
checks) over a C file in csrc/ (the loops).  Python code calls these through the public
modules (qlora_ext.nf4, qlora_ext.cpu.kernels), never directly."""

include "cpu_features.pxi"
include "nf4.pxi"
include "convert.pxi"
include "attention.pxi"
include "rope.pxi"
include "rmsnorm.pxi"
include "nf4_matmul.pxi"
include "small_gemm.pxi"
include "swiglu.pxi"
include "cross_entropy.pxi"
