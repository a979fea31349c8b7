/* SwiGLU of the FFN, element-wise over n float32 values (g, u the gate and up projections):
 *   forward   m = silu(g) u = g σ(g) u
 *   backward  du = dm g σ(g);  dg = dm u σ(g) (1 + g (1 - σ(g)))
 * σ is computed from t = exp(-|g|) (σ = 1/(1+t) for g >= 0, t/(1+t) below), which never
 * overflows.  Outputs are overwritten; nthreads <= 0 means all cores. */
#ifndef QX_SWIGLU_H
#define QX_SWIGLU_H
#include "qx_common.h"

int qx_swiglu_forward(const float *g, const float *u, float *m, int64_t n, int nthreads);
int qx_swiglu_backward(const float *g, const float *u, const float *dm, float *dg, float *du,
                       int64_t n, int nthreads);

#endif
