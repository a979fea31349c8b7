/* RMSNorm forward and backward (HF LlamaRMSNorm / Qwen3RMSNorm numerics for float32).
 *
 * N rows of C channels: x (N, C), weight (C,), y (N, C), rstd (N,).
 * Per-head q/k norm (Qwen3) is the same kernel on x viewed as (N * H, D). */
#ifndef QX_RMSNORM_H
#define QX_RMSNORM_H
#include "qx_common.h"

/* rstd[n] = 1 / sqrt(mean_c(x[n,c]^2) + eps);  y[n,c] = weight[c] * (x[n,c] * rstd[n]). */
int qx_rmsnorm_forward(const float *x, const float *weight, int64_t N, int64_t C, float eps,
                       float *y, float *rstd, int nthreads);

/* dx (N, C) = d/dx given dy (N, C) (overwritten, not accumulated).
 * dweight (C,) = sum_n dy * x * rstd (overwritten) when dweight != NULL. */
int qx_rmsnorm_backward(const float *x, const float *weight, const float *rstd, const float *dy,
                        int64_t N, int64_t C, float *dx, float *dweight, int nthreads);

#endif
