# Causal GQA attention: contract over csrc/attention.c.  float32, C-contiguous:
# q, out, dout, dq (B, T, Hq, D); k, v, dk, dv (B, T, Hkv, D); lse (B, Hq, T);
# mask (B, T) uint8 or None; segments (B, T) int32 or None (packed documents: runs of equal
# ids).  Hq % Hkv == 0, D even.
from libc.stdint cimport int32_t
cdef extern from "attention.h" nogil:
    int qx_attention_forward(const float *q, const float *k, const float *v, const uint8_t *mask,
                             const int32_t *segments, int64_t B, int64_t T, int64_t Hq,
                             int64_t Hkv, int64_t D, float *out, float *lse, int nthreads)
    int qx_attention_backward(const float *q, const float *k, const float *v, const float *out,
                              const float *lse, const float *dout, const uint8_t *mask,
                              const int32_t *segments, int64_t B,
                              int64_t T, int64_t Hq, int64_t Hkv, int64_t D, float *dq, float *dk,
                              float *dv, int nthreads)


cdef tuple _shape4(const float[:, :, :, ::1] a):
    return (a.shape[0], a.shape[1], a.shape[2], a.shape[3])


cdef int _attn_shapes(tuple qs, tuple ks, tuple vs, tuple ls, const uint8_t[:, ::1] mask,
                      const int32_t[:, ::1] segments) except -1:
    cdef int64_t B = qs[0], T = qs[1], Hq = qs[2], D = qs[3]
    if ks[0] != B or ks[1] != T or ks[3] != D or ks[2] < 1 or Hq % ks[2] or D % 2 or ks != vs:
        raise ValueError("attention: q (B, T, Hq, D even), k = v (B, T, Hkv, D) with Hq % Hkv == 0")
    if ls != (B, Hq, T):
        raise ValueError("attention: lse must be (B, Hq, T)")
    if mask is not None and (mask.shape[0] != B or mask.shape[1] != T):
        raise ValueError("attention: mask must be (B, T)")
    if segments is not None and (segments.shape[0] != B or segments.shape[1] != T):
        raise ValueError("attention: segments must be (B, T)")
    return 0


def attention_forward(const float[:, :, :, ::1] q, const float[:, :, :, ::1] k,
                      const float[:, :, :, ::1] v, const uint8_t[:, ::1] mask,
                      float[:, :, :, ::1] out, float[:, :, ::1] lse, int nthreads=0,
                      const int32_t[:, ::1] segments=None):
    """q (B, T, Hq, D), k, v (B, T, Hkv, D), mask (B, T) | None -> out (B, T, Hq, D), lse (B, Hq, T)."""
    _attn_shapes(_shape4(q), _shape4(k), _shape4(v), (lse.shape[0], lse.shape[1], lse.shape[2]), mask,
                 segments)
    if _shape4(out) != _shape4(q):
        raise ValueError("attention_forward: out must have q's shape")
    cdef const uint8_t *mp = &mask[0, 0] if mask is not None else NULL
    cdef const int32_t *sp = &segments[0, 0] if segments is not None else NULL
    cdef int rc
    with nogil:
        rc = qx_attention_forward(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0], mp, sp, q.shape[0],
                                  q.shape[1], q.shape[2], k.shape[2], q.shape[3],
                                  &out[0, 0, 0, 0], &lse[0, 0, 0], nthreads)
    _check_mem(rc, "attention_forward")


def attention_backward(const float[:, :, :, ::1] q, const float[:, :, :, ::1] k,
                       const float[:, :, :, ::1] v, const float[:, :, :, ::1] out,
                       const float[:, :, ::1] lse, const float[:, :, :, ::1] dout,
                       const uint8_t[:, ::1] mask, float[:, :, :, ::1] dq,
                       float[:, :, :, ::1] dk, float[:, :, :, ::1] dv, int nthreads=0,
                       const int32_t[:, ::1] segments=None):
    """Gradients dq (B, T, Hq, D), dk, dv (B, T, Hkv, D) of attention_forward (overwritten)."""
    _attn_shapes(_shape4(q), _shape4(k), _shape4(v), (lse.shape[0], lse.shape[1], lse.shape[2]), mask,
                 segments)
    if (_shape4(out) != _shape4(q) or _shape4(dout) != _shape4(q) or _shape4(dq) != _shape4(q)
            or _shape4(dk) != _shape4(k) or _shape4(dv) != _shape4(k)):
        raise ValueError("attention_backward: out, dout, dq must have q's shape, dk and dv k's")
    cdef const uint8_t *mp = &mask[0, 0] if mask is not None else NULL
    cdef const int32_t *sp = &segments[0, 0] if segments is not None else NULL
    cdef int rc
    with nogil:
        rc = qx_attention_backward(&q[0, 0, 0, 0], &k[0, 0, 0, 0], &v[0, 0, 0, 0],
                                   &out[0, 0, 0, 0], &lse[0, 0, 0], &dout[0, 0, 0, 0], mp, sp,
                                   q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3],
                                   &dq[0, 0, 0, 0], &dk[0, 0, 0, 0], &dv[0, 0, 0, 0], nthreads)
    _check_mem(rc, "attention_backward")
