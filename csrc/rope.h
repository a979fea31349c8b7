/* Rotary position embedding, HF `rotate_half` convention, in place.
 *
 * x (B, T, H, D) float32, half = D / 2; tables cos, sin (P, half) float32;
 * positions (B, T) int64 with row stride pos_bstride (0: one (T,) row shared by the batch).
 * Forward, per head with x1 = x[:half], x2 = x[half:], c = cos[p], s = sin[p]:
 *   x1' = x1 * c - x2 * s,   x2' = x2 * c + x1 * s
 * Backward applies the transpose (the same with s negated) to the gradient in place. */
#ifndef QX_ROPE_H
#define QX_ROPE_H
#include "qx_common.h"

/* direction: +1 forward, -1 backward.  Returns QX_E_ARG (touching nothing) if any position
 * lies outside [0, P). */
int qx_rope_apply(float *x, const int64_t *positions, int64_t pos_bstride, int64_t B, int64_t T,
                  int64_t H, int64_t D, const float *cos_t, const float *sin_t, int64_t P,
                  int direction, int nthreads);

#endif
