from libc.stdint cimport uint8_t, int64_t

cdef extern from "nf4_matmul.h" nogil:
    int qx_nf4_matmul_xwt(const float *x, int64_t ldx, const uint8_t *packed, const float *absmax,
                          int64_t blocksize, int64_t n, int64_t out_f, int64_t in_f, float *y,
                          int64_t ldy, int mode, int nthreads)
    int qx_nf4_matmul_xw(const float *dy, int64_t lddy, const uint8_t *packed, const float *absmax,
                         int64_t blocksize, int64_t n, int64_t out_f, int64_t in_f, float *dx,
                         int64_t lddx, int mode, int nthreads)
    int qx_dense_matmul_xwt(const float *x, int64_t ldx, const float *w, int64_t n, int64_t out_f,
                            int64_t in_f, float *y, int64_t ldy, int mode, int nthreads)
    int qx_dense_matmul_xw(const float *dy, int64_t lddy, const float *w, int64_t n, int64_t out_f,
                           int64_t in_f, float *dx, int64_t lddx, int mode, int nthreads)


cdef int _nf4_matmul_mode(str compute_dtype) except -1:
    if compute_dtype == "fp32":
        return 0
    if compute_dtype == "bf16":
        return 1
    raise ValueError(f"compute_dtype must be 'fp32' or 'bf16', got {compute_dtype!r}")


cdef int64_t _row_stride(const float[:, :] a, str what) except -1:
    """Row stride in elements of a float32 matrix whose rows are contiguous."""
    if a.shape[1] > 1 and a.strides[1] != 4:
        raise ValueError(f"{what}: rows must be contiguous (column stride {a.strides[1]} bytes)")
    if a.shape[0] > 1 and (a.strides[0] % 4 or a.strides[0] < 4 * a.shape[1]):
        raise ValueError(f"{what}: row stride {a.strides[0]} bytes is not a float32 row step")
    return a.strides[0] // 4 if a.shape[0] > 1 else a.shape[1]


cdef int _check_nf4_weight(const uint8_t[::1] packed, const float[::1] absmax, int64_t blocksize,
                           int64_t out_f, int64_t in_f, str what) except -1:
    cdef int64_t n = out_f * in_f
    if out_f < 0 or in_f < 0 or blocksize < 1:
        raise ValueError(f"{what}: invalid weight shape ({out_f}, {in_f}) or blocksize {blocksize}")
    if packed.shape[0] != (n + 1) // 2 or absmax.shape[0] != (n + blocksize - 1) // blocksize:
        raise ValueError(f"{what}: packed ({packed.shape[0]},) / absmax ({absmax.shape[0]},) do not "
                         f"match an NF4 weight ({out_f}, {in_f}) with blocksize {blocksize}")
    return 0


cdef int _check_matmul_rc(int rc, str what) except -1:
    if rc == -4:
        raise MemoryError(f"{what}: out of memory for the packed panels")
    return _check(rc, what)


def nf4_matmul_xwt(const float[:, :] x, const uint8_t[::1] packed, const float[::1] absmax,
                   int64_t blocksize, int64_t out_f, float[:, :] y, str compute_dtype="fp32",
                   int nthreads=0):
    """y (N, O) = x (N, I) Wᵀ with W (O, I) NF4 (packed, absmax, blocksize), decoded in the
    GEMM.  x and y need contiguous rows (column slices are fine); y is overwritten.
    compute_dtype 'fp32' (exact) or 'bf16' (both operands rounded to bf16, fp32 sums)."""
    cdef int mode = _nf4_matmul_mode(compute_dtype)
    cdef int64_t n = x.shape[0], in_f = x.shape[1]
    _check_nf4_weight(packed, absmax, blocksize, out_f, in_f, "nf4 matmul x Wᵀ")
    if y.shape[0] != n or y.shape[1] != out_f:
        raise ValueError(f"nf4 matmul x Wᵀ: y has shape ({y.shape[0]}, {y.shape[1]}), expected ({n}, {out_f})")
    cdef int64_t ldx = _row_stride(x, "nf4 matmul x Wᵀ: x"), ldy = _row_stride(y, "nf4 matmul x Wᵀ: y")
    if n == 0 or out_f == 0:
        return
    cdef int rc
    with nogil:
        rc = qx_nf4_matmul_xwt(&x[0, 0] if in_f else NULL, ldx, &packed[0] if in_f else NULL,
                               &absmax[0] if in_f else NULL, blocksize, n, out_f, in_f,
                               &y[0, 0], ldy, mode, nthreads)
    _check_matmul_rc(rc, "nf4 matmul x Wᵀ")


def nf4_matmul_xw(const float[:, :] dy, const uint8_t[::1] packed, const float[::1] absmax,
                  int64_t blocksize, int64_t in_f, float[:, :] dx, str compute_dtype="fp32",
                  int nthreads=0):
    """dx (N, I) = dy (N, O) W with W (O, I) NF4: the input gradient of y = x Wᵀ.  Rows
    contiguous as for nf4_matmul_xwt; dx is overwritten."""
    cdef int mode = _nf4_matmul_mode(compute_dtype)
    cdef int64_t n = dy.shape[0], out_f = dy.shape[1]
    _check_nf4_weight(packed, absmax, blocksize, out_f, in_f, "nf4 matmul dy W")
    if dx.shape[0] != n or dx.shape[1] != in_f:
        raise ValueError(f"nf4 matmul dy W: dx has shape ({dx.shape[0]}, {dx.shape[1]}), expected ({n}, {in_f})")
    cdef int64_t lddy = _row_stride(dy, "nf4 matmul dy W: dy"), lddx = _row_stride(dx, "nf4 matmul dy W: dx")
    if n == 0 or in_f == 0:
        return
    cdef int rc
    with nogil:
        rc = qx_nf4_matmul_xw(&dy[0, 0] if out_f else NULL, lddy, &packed[0] if out_f else NULL,
                              &absmax[0] if out_f else NULL, blocksize, n, out_f, in_f,
                              &dx[0, 0], lddx, mode, nthreads)
    _check_matmul_rc(rc, "nf4 matmul dy W")


def dense_matmul_xwt(const float[:, :] x, const float[:, ::1] w, float[:, :] y, str compute_dtype="fp32",
                     int nthreads=0):
    """y (N, O) = x (N, I) Wᵀ with W (O, I) float32, C-contiguous: nf4_matmul_xwt's kernel with
    the weight read instead of decoded (bf16: both operands rounded to bf16, fp32 sums)."""
    cdef int mode = _nf4_matmul_mode(compute_dtype)
    cdef int64_t n = x.shape[0], in_f = x.shape[1], out_f = w.shape[0]
    if w.shape[1] != in_f or y.shape[0] != n or y.shape[1] != out_f:
        raise ValueError(f"dense matmul x Wᵀ: x ({n}, {in_f}), W ({out_f}, {w.shape[1]}), "
                         f"y ({y.shape[0]}, {y.shape[1]}) do not match")
    cdef int64_t ldx = _row_stride(x, "dense matmul x Wᵀ: x"), ldy = _row_stride(y, "dense matmul x Wᵀ: y")
    if n == 0 or out_f == 0:
        return
    cdef int rc
    with nogil:
        rc = qx_dense_matmul_xwt(&x[0, 0] if in_f else NULL, ldx, &w[0, 0] if in_f else NULL, n, out_f,
                                 in_f, &y[0, 0], ldy, mode, nthreads)
    _check_matmul_rc(rc, "dense matmul x Wᵀ")


def dense_matmul_xw(const float[:, :] dy, const float[:, ::1] w, float[:, :] dx, str compute_dtype="fp32",
                    int nthreads=0):
    """dx (N, I) = dy (N, O) W with W (O, I) float32, C-contiguous (see dense_matmul_xwt)."""
    cdef int mode = _nf4_matmul_mode(compute_dtype)
    cdef int64_t n = dy.shape[0], out_f = dy.shape[1], in_f = w.shape[1]
    if w.shape[0] != out_f or dx.shape[0] != n or dx.shape[1] != in_f:
        raise ValueError(f"dense matmul dy W: dy ({n}, {out_f}), W ({w.shape[0]}, {in_f}), "
                         f"dx ({dx.shape[0]}, {dx.shape[1]}) do not match")
    cdef int64_t lddy = _row_stride(dy, "dense matmul dy W: dy"), lddx = _row_stride(dx, "dense matmul dy W: dx")
    if n == 0 or in_f == 0:
        return
    cdef int rc
    with nogil:
        rc = qx_dense_matmul_xw(&dy[0, 0] if out_f else NULL, lddy, &w[0, 0] if out_f else NULL, n, out_f,
                                in_f, &dx[0, 0], lddx, mode, nthreads)
    _check_matmul_rc(rc, "dense matmul dy W")
