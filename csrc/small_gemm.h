/* Products with one small dimension (the LoRA rank r): C (N, M) = alpha · A B (+ C).
 *
 * A is read as A(i, k) = a[i*sar + k*sak], so the same kernel takes A or Aᵀ without a copy
 * (the LoRA weight gradients read the activations transposed); B is row-major (K, M) with row
 * stride ldb; C is row-major (N, M) with row stride ldc.  Every element of C is summed in
 * depth order by one thread, so the result does not depend on the thread count.
 * The six LoRA products of a linear layer are all of this form, with r as M (u = s x Aᵀ,
 * du = s dy B, gB += dyᵀ u), as K (y += u Bᵀ, dx += du A) or as N (gA += duᵀ x).
 * The AVX-512 path tiles C in registers (rows × 16-lane vectors, broadcast A, FMA B); the
 * scalar path is the reference.  Below AVX-512, callers use numpy's BLAS instead. */
#ifndef QX_SMALL_GEMM_H
#define QX_SMALL_GEMM_H
#include "qx_common.h"

int qx_small_gemm(const float *a, int64_t sar, int64_t sak, const float *b, int64_t ldb,
                  float *c, int64_t ldc, int64_t n, int64_t m, int64_t k, float alpha,
                  int accumulate, int nthreads);

#endif
