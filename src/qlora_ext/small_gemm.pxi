from libc.stdint cimport int64_t

cdef extern from "small_gemm.h" nogil:
    int qx_small_gemm(const float *a, int64_t sar, int64_t sak, const float *b, int64_t ldb,
                      float *c, int64_t ldc, int64_t n, int64_t m, int64_t k, float alpha,
                      int accumulate, int nthreads)


cdef int64_t _elem_stride(Py_ssize_t stride, str what) except -1:
    if stride < 0 or stride % 4:
        raise ValueError(f"{what}: stride {stride} bytes is not a non-negative float32 step")
    return stride // 4


def small_gemm(const float[:, :] a, const float[:, :] b, float[:, :] c, float alpha=1.0,
               bint accumulate=False, int nthreads=0):
    """c (N, M) = alpha · a (N, K) @ b (K, M), or c += that with accumulate.  a may be any
    strided view (a transposed array is read in place); b and c need contiguous rows.  Each
    element is summed in depth order by one thread (csrc/small_gemm.h)."""
    cdef int64_t n = a.shape[0], k = a.shape[1], m = b.shape[1]
    if b.shape[0] != k or c.shape[0] != n or c.shape[1] != m:
        raise ValueError(f"small_gemm: shapes a ({n}, {k}) @ b ({b.shape[0]}, {m}) -> c "
                         f"({c.shape[0]}, {c.shape[1]}) do not match")
    cdef int64_t sar = _elem_stride(a.strides[0], "small_gemm: a")
    cdef int64_t sak = _elem_stride(a.strides[1], "small_gemm: a")
    cdef int64_t ldb = _row_stride(b, "small_gemm: b"), ldc = _row_stride(c, "small_gemm: c")
    if n == 0 or m == 0:
        return
    cdef int rc
    with nogil:
        rc = qx_small_gemm(&a[0, 0] if k else NULL, sar, sak, &b[0, 0] if k else NULL, ldb,
                           &c[0, 0], ldc, n, m, k, alpha, accumulate, nthreads)
    _check(rc, "small_gemm")
