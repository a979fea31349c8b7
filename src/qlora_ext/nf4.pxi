from libc.stdint cimport uint8_t, uint16_t, int64_t

cdef extern from "nf4.h" nogil:
    int qx_nf4_quantize(const void *x, int dtype, int64_t n, int64_t blocksize, uint8_t *packed,
                        float *absmax, int nthreads, int64_t *bad_index)
    int qx_nf4_dequantize(const uint8_t *packed, const float *absmax, int64_t n,
                          int64_t blocksize, float *out, int nthreads)
    int qx_blockwise8_quantize(const float *x, int64_t n, int64_t blocksize, const float *code,
                               uint8_t *out, float *absmax)


def nf4_quantize_f32(const float[::1] x, int64_t blocksize, uint8_t[::1] packed,
                     float[::1] absmax, int nthreads=0):
    """x (n,) f32 -> packed (ceil(n/2),) u8, absmax (ceil(n/blocksize),) f32.
    Returns -1, or the index of the first NaN/inf element (nothing else is then valid)."""
    return _nf4_quantize(&x[0] if x.shape[0] else NULL, 0, x.shape[0], blocksize, packed,
                         absmax, nthreads)


def nf4_quantize_half(const uint16_t[::1] x, int dtype, int64_t blocksize, uint8_t[::1] packed,
                      float[::1] absmax, int nthreads=0):
    """As nf4_quantize_f32 for f16 (dtype 1) or bf16 (dtype 2) bit patterns."""
    return _nf4_quantize(&x[0] if x.shape[0] else NULL, dtype, x.shape[0], blocksize, packed,
                         absmax, nthreads)


cdef int _nf4_blocksize(int64_t blocksize, str what) except -1:
    """The C kernels' blocksize contract, checked before any size is computed from it (an
    absurd blocksize would overflow (n + blocksize - 1))."""
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"{what}: blocksize must be a power of two from 32 to 4096, got {blocksize}")
    return 0


cdef int64_t _nf4_quantize(const void *x, int dtype, int64_t n, int64_t blocksize,
                           uint8_t[::1] packed, float[::1] absmax, int nthreads) except -2:
    _nf4_blocksize(blocksize, "nf4 quantize")
    if packed.shape[0] != (n + 1) // 2 or absmax.shape[0] != (n + blocksize - 1) // blocksize:
        raise ValueError("nf4 quantize: packed or absmax has the wrong length")
    if n == 0:
        return -1
    cdef int64_t bad = -1
    cdef int rc
    with nogil:
        rc = qx_nf4_quantize(x, dtype, n, blocksize, &packed[0], &absmax[0], nthreads, &bad)
    if rc == -1:
        return bad
    _check(rc, "nf4 quantize")
    return -1


def nf4_dequantize(const uint8_t[::1] packed, const float[::1] absmax, int64_t blocksize,
                   float[::1] out, int nthreads=0):
    """packed (ceil(n/2),) u8, absmax (ceil(n/blocksize),) f32 -> out (n,) f32."""
    cdef int64_t n = out.shape[0]
    _nf4_blocksize(blocksize, "nf4 dequantize")
    if packed.shape[0] != (n + 1) // 2 or absmax.shape[0] != (n + blocksize - 1) // blocksize:
        raise ValueError("nf4 dequantize: packed or absmax does not match out's length")
    if n == 0:
        return
    cdef int rc
    with nogil:
        rc = qx_nf4_dequantize(&packed[0], &absmax[0], n, blocksize, &out[0], nthreads)
    _check(rc, "nf4 dequantize")


def blockwise8_quantize(const float[::1] x, int64_t blocksize, const float[::1] code,
                        uint8_t[::1] out, float[::1] absmax):
    """x (n,) f32 -> out (n,) u8 codes into the sorted 256-entry code, absmax per block."""
    cdef int64_t n = x.shape[0]
    if blocksize < 1 or blocksize > 1 << 20:
        raise ValueError(f"blockwise8 quantize: blocksize must be from 1 to 2**20, got {blocksize}")
    if code.shape[0] != 256 or out.shape[0] != n or absmax.shape[0] != (n + blocksize - 1) // blocksize:
        raise ValueError("blockwise8 quantize: wrong sizes")
    if n == 0:
        return
    cdef int rc
    with nogil:
        rc = qx_blockwise8_quantize(&x[0], n, blocksize, &code[0], &out[0], &absmax[0])
    if rc == -1:
        raise ValueError("blockwise8 quantize: input has a NaN or infinite value")
    _check_mem(rc, "blockwise8 quantize")
