/* The softmax part of the chunked cross-entropy, row by row over a logits chunk [rows, V]
 * (row stride ld): for row i with target t_i,
 *   m = max_j l_j,  z = sum_j exp(l_j - m)  (summed in float64),
 *   loss[i] = log z - (l_t - m)                                  (float64)
 * and with want_grad the row is overwritten by its gradient scale · (softmax - onehot(t_i)),
 * computed as exp(l_j - m) · float32(scale / z), minus scale at t_i.  Targets must lie in
 * [0, V) (checked: QX_E_ARG).  nthreads <= 0 means all cores. */
#ifndef QX_CROSS_ENTROPY_H
#define QX_CROSS_ENTROPY_H
#include "qx_common.h"

int qx_cross_entropy_rows(float *logits, int64_t rows, int64_t V, int64_t ld,
                          const int64_t *targets, float scale, int want_grad, double *loss,
                          int nthreads);

#endif
