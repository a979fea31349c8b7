# RMSNorm: contract over csrc/rmsnorm.c.  x (N, C), weight (C,), rstd (N,), float32, C-contiguous.
cdef extern from "rmsnorm.h" nogil:
    int qx_rmsnorm_forward(const float *x, const float *weight, int64_t N, int64_t C, float eps,
                           float *y, float *rstd, int nthreads)
    int qx_rmsnorm_backward(const float *x, const float *weight, const float *rstd,
                            const float *dy, int64_t N, int64_t C, float *dx, float *dweight,
                            int nthreads)



def rmsnorm_forward(const float[:, ::1] x, const float[::1] weight, float eps,
                    float[:, ::1] y, float[::1] rstd, int nthreads=0):
    """x (N, C), weight (C,) -> y (N, C) = weight * x * rstd, rstd (N,)."""
    cdef int64_t N = x.shape[0], C = x.shape[1]
    if weight.shape[0] != C or y.shape[0] != N or y.shape[1] != C or rstd.shape[0] != N:
        raise ValueError("rmsnorm_forward: weight (C,), y (N, C) and rstd (N,) must match x (N, C)")
    if N == 0:
        return
    cdef int rc
    with nogil:
        rc = qx_rmsnorm_forward(&x[0, 0], &weight[0], N, C, eps, &y[0, 0], &rstd[0], nthreads)
    _check_mem(rc, "rmsnorm_forward")


def rmsnorm_backward(const float[:, ::1] x, const float[::1] weight, const float[::1] rstd,
                     const float[:, ::1] dy, float[:, ::1] dx, float[::1] dweight=None,
                     int nthreads=0):
    """x, dy (N, C), weight (C,), rstd (N,) -> dx (N, C); dweight (C,) if given (overwritten)."""
    cdef int64_t N = x.shape[0], C = x.shape[1]
    if (weight.shape[0] != C or rstd.shape[0] != N or dy.shape[0] != N or dy.shape[1] != C
            or dx.shape[0] != N or dx.shape[1] != C
            or (dweight is not None and dweight.shape[0] != C)):
        raise ValueError("rmsnorm_backward: weight/dweight (C,), rstd (N,), dy and dx (N, C) must match x")
    cdef float *dw = &dweight[0] if dweight is not None else NULL
    if N == 0:
        if dweight is not None:
            dweight[:] = 0
        return
    cdef int rc
    with nogil:
        rc = qx_rmsnorm_backward(&x[0, 0], &weight[0], &rstd[0], &dy[0, 0], N, C, &dx[0, 0], dw,
                                 nthreads)
    _check_mem(rc, "rmsnorm_backward")
