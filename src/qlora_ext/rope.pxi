# RoPE: contract over csrc/rope.c.  x (B, T, H, D) float32 in place; tables (P, D/2) float32;
# positions (B, T) int64 (pos_bstride 0 shares one (T,) row across the batch).
cdef extern from "rope.h" nogil:
    int qx_rope_apply(float *x, const int64_t *positions, int64_t pos_bstride, int64_t B,
                      int64_t T, int64_t H, int64_t D, const float *cos_t, const float *sin_t,
                      int64_t P, int direction, int nthreads)


def rope_apply(float[:, :, :, ::1] x, const int64_t[:, ::1] positions, const float[:, ::1] cos_t,
               const float[:, ::1] sin_t, int direction, int nthreads=0):
    """Rotate x (B, T, H, D) in place; positions (B, T) or (1, T) int64; direction +1 / -1."""
    cdef int64_t B = x.shape[0], T = x.shape[1], H = x.shape[2], D = x.shape[3]
    cdef int64_t P = cos_t.shape[0]
    if (D % 2 or cos_t.shape[1] != D // 2 or sin_t.shape[0] != P or sin_t.shape[1] != D // 2
            or positions.shape[1] != T or (positions.shape[0] != B and positions.shape[0] != 1)):
        raise ValueError("rope_apply: x (B, T, H, D even), positions (B|1, T), tables (P, D/2)")
    if B == 0 or T == 0 or H == 0:
        return
    cdef int64_t bstride = T if positions.shape[0] == B and B > 1 else 0
    cdef int rc
    with nogil:
        rc = qx_rope_apply(&x[0, 0, 0, 0], &positions[0, 0], bstride, B, T, H, D, &cos_t[0, 0],
                           &sin_t[0, 0], P, direction, nthreads)
    if rc == -3:
        raise ValueError(f"rope_apply: a position lies outside the table's range [0, {P})")
    _check(rc, "rope_apply")
