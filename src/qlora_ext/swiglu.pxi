from libc.stdint cimport int64_t

cdef extern from "swiglu.h" nogil:
    int qx_swiglu_forward(const float *g, const float *u, float *m, int64_t n, int nthreads)
    int qx_swiglu_backward(const float *g, const float *u, const float *dm, float *dg, float *du,
                           int64_t n, int nthreads)


cdef int64_t _same_size(object arrays, str what) except -1:
    cdef int64_t n = arrays[0].shape[0]
    for a in arrays:
        if a.shape[0] != n:
            raise ValueError(f"{what}: arrays of different sizes {[b.shape[0] for b in arrays]}")
    return n


def swiglu_forward(const float[::1] g, const float[::1] u, float[::1] m, int nthreads=0):
    """m = silu(g) · u over contiguous float32 arrays of one size (flattened views)."""
    cdef int64_t n = _same_size((g, u, m), "swiglu_forward")
    cdef int rc
    if n == 0:
        return
    with nogil:
        rc = qx_swiglu_forward(&g[0], &u[0], &m[0], n, nthreads)
    _check(rc, "swiglu_forward")


def swiglu_backward(const float[::1] g, const float[::1] u, const float[::1] dm, float[::1] dg,
                    float[::1] du, int nthreads=0):
    """du = dm · silu(g); dg = dm · u · σ(g)(1 + g(1 - σ(g))), contiguous float32, one size."""
    cdef int64_t n = _same_size((g, u, dm, dg, du), "swiglu_backward")
    cdef int rc
    if n == 0:
        return
    with nogil:
        rc = qx_swiglu_backward(&g[0], &u[0], &dm[0], &dg[0], &du[0], n, nthreads)
    _check(rc, "swiglu_backward")
