/* Products with an NF4 weight, decoded inside the GEMM (no dequantized copy of the weight).
 *
 * Shape letters: N activation rows, O out features, I in features.
 * W is (O, I) in NF4 (nf4.h's layout: row-major over the whole tensor, element 2i in the HIGH
 * nibble of packed[i]); packed is (ceil(O*I/2),) uint8, absmax (ceil(O*I/blocksize),) float32
 * (the dequantized scales when double-quantized).  W[o, i] = code[nibble] * absmax[block].
 *
 * mode QX_MM_F32: exact fp32 products (fp32 W, fp32 accumulation).
 * mode QX_MM_BF16: W and the activations rounded to bf16 (round to nearest even), products
 *   summed in fp32.  The AVX512-BF16 path uses vdpbf16ps, the AVX-512 path fp32 FMAs on the
 *   bf16-valued floats (exact products), the scalar path a plain loop: the same function,
 *   summed in different orders.
 * y = x Wᵀ with N <= 8 (generation) runs lanes along the depth instead of across rows.
 * Below AVX-512 every mode takes the scalar path (the reference; callers on such CPUs use
 * dequantize + BLAS).  Outputs are overwritten, never accumulated into. */
#ifndef QX_NF4_MATMUL_H
#define QX_NF4_MATMUL_H
#include "qx_common.h"

enum { QX_MM_F32 = 0, QX_MM_BF16 = 1 };

/* Activation matrices are row-major with a row stride (ld*, in elements, >= their width), so
 * that column slices of a wider matrix (the FFN's [gate | up]) are read and written in place.
 * nthreads <= 0: all cores; the kernels use at most one thread per output tile column. */

/* x is (N, I) with row stride ldx, y is (N, O) with row stride ldy:  y = x Wᵀ. */
int qx_nf4_matmul_xwt(const float *x, int64_t ldx, const uint8_t *packed, const float *absmax,
                      int64_t blocksize, int64_t n, int64_t out_f, int64_t in_f, float *y,
                      int64_t ldy, int mode, int nthreads);

/* dy is (N, O) with row stride lddy, dx is (N, I) with row stride lddx:  dx = dy W  (the
 * input gradient of y = x Wᵀ). */
int qx_nf4_matmul_xw(const float *dy, int64_t lddy, const uint8_t *packed, const float *absmax,
                     int64_t blocksize, int64_t n, int64_t out_f, int64_t in_f, float *dx,
                     int64_t lddx, int mode, int nthreads);

/* The same two products with a float32 weight W (O, I), rows contiguous (the LM head):
 * mode QX_MM_BF16 rounds W and the activations to bf16 as above; QX_MM_F32 is exact. */
int qx_dense_matmul_xwt(const float *x, int64_t ldx, const float *w, int64_t n, int64_t out_f,
                        int64_t in_f, float *y, int64_t ldy, int mode, int nthreads);
int qx_dense_matmul_xw(const float *dy, int64_t lddy, const float *w, int64_t n, int64_t out_f,
                       int64_t in_f, float *dx, int64_t lddx, int mode, int nthreads);

#endif
