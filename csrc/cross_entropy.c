/* Softmax cross-entropy of logits rows; see cross_entropy.h.  A row of the vocabulary
 * (~50-600 KB) stays in L2 across its three passes (max; exp and sum; scale), so the chunk is
 * read from memory about once instead of once per numpy operation. */
#include "cross_entropy.h"

#include <math.h>

#include "vexp.h"

static double row_scalar(float *l, int64_t V, int64_t t, float scale, int want_grad) {
  float m = l[0];
  for (int64_t j = 1; j < V; j++) m = l[j] > m || isnan(l[j]) ? l[j] : m;
  const float picked = l[t] - m;
  double z = 0.0;
  for (int64_t j = 0; j < V; j++) {
    const float e = expf(l[j] - m);
    z += e;
    if (want_grad) l[j] = e;
  }
  if (want_grad) {
    const float f = (float)(scale / z);
    for (int64_t j = 0; j < V; j++) l[j] *= f;
    l[t] -= scale;
  }
  return log(z) - (double)picked;
}

#if QX_X86
QX_TARGET_AVX512 static double row_avx512(float *l, int64_t V, int64_t t, float scale,
                                          int want_grad) {
  int64_t j = 0;
  __m512 mv = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (; j + 16 <= V; j += 16) {
    const __m512 x = _mm512_loadu_ps(l + j);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    mv = _mm512_max_ps(mv, x);
  }
  float m = _mm512_reduce_max_ps(mv);
  for (; j < V; j++) m = l[j] > m || isnan(l[j]) ? l[j] : m;
  if (nan) m = NAN;
  const float picked = l[t] - m;
  const __m512 mb = _mm512_set1_ps(m);
  __m512d z0 = _mm512_setzero_pd(), z1 = _mm512_setzero_pd();
  for (j = 0; j + 16 <= V; j += 16) {
    const __m512 e = qx_exp16(_mm512_sub_ps(_mm512_loadu_ps(l + j), mb));
    z0 = _mm512_add_pd(z0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    z1 = _mm512_add_pd(z1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    if (want_grad) _mm512_storeu_ps(l + j, e);
  }
  double z = _mm512_reduce_add_pd(_mm512_add_pd(z0, z1));
  for (; j < V; j++) {
    const float e = expf(l[j] - m);
    z += e;
    if (want_grad) l[j] = e;
  }
  if (want_grad) {
    const __m512 f = _mm512_set1_ps((float)(scale / z));
    for (j = 0; j + 16 <= V; j += 16) _mm512_storeu_ps(l + j, _mm512_mul_ps(_mm512_loadu_ps(l + j), f));
    const float fs = (float)(scale / z);
    for (; j < V; j++) l[j] *= fs;
    l[t] -= scale;
  }
  return log(z) - (double)picked;
}
#endif

int qx_cross_entropy_rows(float *logits, int64_t rows, int64_t V, int64_t ld,
                          const int64_t *targets, float scale, int want_grad, double *loss,
                          int nthreads) {
  if (rows < 0 || V < 1 || ld < V) return QX_E_SIZE;
  for (int64_t i = 0; i < rows; i++)
    if (targets[i] < 0 || targets[i] >= V) return QX_E_ARG;
  int nt = qx_threads(nthreads);
  if (nt > rows) nt = rows > 0 ? (int)rows : 1;
  const int vec = QX_X86 && qx_cpu_level() >= QX_LEVEL_AVX512;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < rows; i++) {
#if QX_X86
    if (vec) {
      loss[i] = row_avx512(logits + i * ld, V, targets[i], scale, want_grad);
      continue;
    }
#endif
    loss[i] = row_scalar(logits + i * ld, V, targets[i], scale, want_grad);
  }
  (void)vec;
  return QX_OK;
}
