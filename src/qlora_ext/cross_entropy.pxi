from libc.stdint cimport int64_t

cdef extern from "cross_entropy.h" nogil:
    int qx_cross_entropy_rows(float *logits, int64_t rows, int64_t V, int64_t ld,
                              const int64_t *targets, float scale, int want_grad, double *loss,
                              int nthreads)


def cross_entropy_rows(float[:, :] logits, const int64_t[::1] targets, double[::1] loss,
                       float scale=1.0, bint want_grad=False, int nthreads=0):
    """Per row of a logits chunk [rows, V] (contiguous rows): loss[i] = log Σ exp(l) - l[t_i];
    with want_grad the row becomes scale · (softmax - onehot(t_i)) in place."""
    cdef int64_t rows = logits.shape[0], V = logits.shape[1]
    if targets.shape[0] != rows or loss.shape[0] != rows:
        raise ValueError(f"cross_entropy_rows: {rows} rows, {targets.shape[0]} targets, "
                         f"{loss.shape[0]} losses")
    if rows == 0:
        return
    if V == 0:
        raise ValueError("cross_entropy_rows: empty vocabulary")
    cdef int64_t ld = _row_stride(logits, "cross_entropy_rows: logits")
    cdef int rc
    with nogil:
        rc = qx_cross_entropy_rows(&logits[0, 0], rows, V, ld, &targets[0], scale, want_grad,
                                   &loss[0], nthreads)
    if rc == -3:
        raise ValueError(f"cross_entropy_rows: a target outside [0, {V})")
    _check(rc, "cross_entropy_rows")
