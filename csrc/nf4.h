/* NF4 (4-bit NormalFloat) quantize / dequantize, bitsandbytes-compatible.
 *
 * x is (n,) in row-major order over the whole tensor, blocked in runs of `blocksize`
 * (a power of two, 32..4096); the last block may be short.
 * packed is (ceil(n/2),) uint8: element 2i in the HIGH nibble, 2i+1 in the low one.
 * absmax is (ceil(n/blocksize),) float32. */
#ifndef QX_NF4_H
#define QX_NF4_H
#include "qx_common.h"

extern const float qx_nf4_code[16];

/* x: float32 / float16 / bfloat16 (dtype QX_F32 / QX_F16 / QX_BF16).  On a NaN or infinite
 * value returns QX_E_NONFINITE and sets *bad_index to the first offending element's index. */
int qx_nf4_quantize(const void *x, int dtype, int64_t n, int64_t blocksize, uint8_t *packed,
                    float *absmax, int nthreads, int64_t *bad_index);

/* out (n,) float32 = code[nibble] * absmax[block]. */
int qx_nf4_dequantize(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                      float *out, int nthreads);

/* 8-bit blockwise quantization against a sorted 256-entry code (bitsandbytes' dynamic map),
 * used for the nested absmax of double quantization: out[i] = nearest code index of
 * x[i] / absmax[block]. */
int qx_blockwise8_quantize(const float *x, int64_t n, int64_t blocksize, const float *code,
                           uint8_t *out, float *absmax);

#endif
