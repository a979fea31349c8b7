/* RoPE forward / backward in place.  x (B, T, H, D), cos/sin tables (P, D/2), positions
 * (B, T) int64.  One row (b, t) reads one table row and rotates its H heads. */
#include "rope.h"

#if QX_X86
#include <immintrin.h>
#endif

/* x (H, D) of one token; c, s (half,) with s already signed for the direction. */
static void rope_row_scalar(float *x, int64_t H, int64_t D, const float *c, const float *s,
                            float sign) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < H; h++) {
    float *x1 = x + h * D, *x2 = x1 + half;
    for (int64_t i = 0; i < half; i++) {
      float a = x1[i], b = x2[i], si = sign * s[i];
      x1[i] = a * c[i] - b * si;
      x2[i] = b * c[i] + a * si;
    }
  }
}

#if QX_X86
QX_TARGET_AVX2 static void rope_row_avx2(float *x, int64_t H, int64_t D, const float *c,
                                         const float *s, float sign) {
  const int64_t half = D / 2;
  const __m256 sg = _mm256_set1_ps(sign);
  for (int64_t h = 0; h < H; h++) {
    float *x1 = x + h * D, *x2 = x1 + half;
    int64_t i = 0;
    for (; i + 8 <= half; i += 8) {
      __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
      __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_mul_ps(sg, _mm256_loadu_ps(s + i));
      _mm256_storeu_ps(x1 + i, _mm256_fmsub_ps(a, cv, _mm256_mul_ps(b, sv)));
      _mm256_storeu_ps(x2 + i, _mm256_fmadd_ps(b, cv, _mm256_mul_ps(a, sv)));
    }
    for (; i < half; i++) {
      float a = x1[i], b = x2[i], si = sign * s[i];
      x1[i] = a * c[i] - b * si;
      x2[i] = b * c[i] + a * si;
    }
  }
}

QX_TARGET_AVX512 static void rope_row_avx512(float *x, int64_t H, int64_t D, const float *c,
                                             const float *s, float sign) {
  const int64_t half = D / 2;
  const __m512 sg = _mm512_set1_ps(sign);
  for (int64_t h = 0; h < H; h++) {
    float *x1 = x + h * D, *x2 = x1 + half;
    for (int64_t i = 0; i < half; i += 16) {
      __mmask16 m = half - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (half - i)) - 1);
      __m512 a = _mm512_maskz_loadu_ps(m, x1 + i), b = _mm512_maskz_loadu_ps(m, x2 + i);
      __m512 cv = _mm512_maskz_loadu_ps(m, c + i);
      __m512 sv = _mm512_mul_ps(sg, _mm512_maskz_loadu_ps(m, s + i));
      _mm512_mask_storeu_ps(x1 + i, m, _mm512_fmsub_ps(a, cv, _mm512_mul_ps(b, sv)));
      _mm512_mask_storeu_ps(x2 + i, m, _mm512_fmadd_ps(b, cv, _mm512_mul_ps(a, sv)));
    }
  }
}
#endif

int qx_rope_apply(float *x, const int64_t *positions, int64_t pos_bstride, int64_t B, int64_t T,
                  int64_t H, int64_t D, const float *cos_t, const float *sin_t, int64_t P,
                  int direction, int nthreads) {
  if (B < 0 || T < 0 || H <= 0 || D <= 0 || (D & 1) || P <= 0 || pos_bstride < 0) return QX_E_ARG;
  if (direction != 1 && direction != -1) return QX_E_ARG;
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < T; t++) {
      int64_t p = positions[b * pos_bstride + t];
      if (p < 0 || p >= P) return QX_E_ARG;
    }
  const int level = qx_cpu_level();
  const int64_t half = D / 2, rows = B * T;
  const float sign = (float)direction;
  int nt = qx_threads(nthreads);
  if (rows * H * D < (int64_t)1 << 15) nt = 1;
#pragma omp parallel for schedule(dynamic, 16) num_threads(nt)
  for (int64_t r = 0; r < rows; r++) {
    const int64_t b = r / T, t = r % T;
    const int64_t p = positions[b * pos_bstride + t];
    float *xr = x + r * H * D;
    const float *c = cos_t + p * half, *s = sin_t + p * half;
#if QX_X86
    if (level >= QX_LEVEL_AVX512) rope_row_avx512(xr, H, D, c, s, sign);
    else if (level >= QX_LEVEL_AVX2) rope_row_avx2(xr, H, D, c, s, sign);
    else
#endif
      rope_row_scalar(xr, H, D, c, s, sign);
  }
  return QX_OK;
}
