cdef extern from "convert.h" nogil:
    int qx_half_to_f32(const uint16_t *src, int dtype, int64_t n, float *dst, int nthreads)


def half_to_f32(const uint16_t[::1] src, int dtype, float[::1] dst, int nthreads=0):
    """src (n,) f16 (dtype 1) or bf16 (dtype 2) bit patterns -> dst (n,) f32."""
    cdef int64_t n = src.shape[0]
    if dst.shape[0] != n:
        raise ValueError(f"half_to_f32: dst has {dst.shape[0]} elements, src {n}")
    if n == 0:
        return
    cdef int rc
    with nogil:
        rc = qx_half_to_f32(&src[0], dtype, n, &dst[0], nthreads)
    _check(rc, "half_to_f32")
