/* Causal self-attention with grouped-query heads, forward and backward (flash-attention
 * style: key tiles, online softmax, nothing of size T x T is ever stored).
 *
 * Shapes (float32, C-contiguous): q, out, dout, dq (B, T, Hq, D); k, v, dk, dv (B, T, Hkv, D);
 * lse (B, Hq, T); mask (B, T) uint8 or NULL (1 = real token, 0 = padding key nobody attends);
 * segments (B, T) int32 or NULL: documents packed into one row, each a run of equal ids; a
 * query attends only to keys of its own run (block-diagonal causal), and key tiles that lie
 * wholly before its run are never computed.
 * Query head h reads key/value head h / (Hq / Hkv).  Scale 1 / sqrt(D).
 * Work memory: O(T * D) per head (a transposed copy of K for the forward; per-thread tiles). */
#ifndef QX_ATTENTION_H
#define QX_ATTENTION_H
#include "qx_common.h"

/* out = softmax(q k^T * scale + causal/padding mask) v;  lse = log-sum-exp of each row's
 * scaled scores.  A row with no key to attend (all keys up to it are padding) gets out = 0
 * and lse = -inf. */
int qx_attention_forward(const float *q, const float *k, const float *v, const uint8_t *mask,
                         const int32_t *segments, int64_t B, int64_t T, int64_t Hq, int64_t Hkv,
                         int64_t D, float *out, float *lse, int nthreads);

/* dq, dk, dv from dout, recomputing the probabilities from lse block by block.  All three
 * outputs are overwritten (not accumulated). */
int qx_attention_backward(const float *q, const float *k, const float *v, const float *out,
                          const float *lse, const float *dout, const uint8_t *mask,
                          const int32_t *segments, int64_t B, int64_t T, int64_t Hq, int64_t Hkv,
                          int64_t D, float *dq, float *dk, float *dv, int nthreads);

#endif
