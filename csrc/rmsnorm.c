/* RMSNorm forward / backward.  x (N, C), weight (C,), rstd (N,), all float32.
 *
 * Forward follows HF's float32 order: var = sum(x^2) / C, rstd = 1 / sqrt(var + eps),
 * y = weight * (x * rstd).  Backward, with g = dy * weight:
 *   dx = rstd * g - x * rstd^3 * sum_c(g * x) / C
 *   dweight = sum_n dy * x * rstd   (accumulated in float64: N can be tens of thousands). */
#include "rmsnorm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if QX_X86
#include <immintrin.h>
#endif

/* ---- scalar ------------------------------------------------------------------------- */
/* Eight partial sums, like the vector paths, so all paths round alike. */
static float sumsq_scalar(const float *x, int64_t C) {
  float s[8] = {0};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8)
    for (int k = 0; k < 8; k++) s[k] += x[c + k] * x[c + k];
  for (; c < C; c++) s[0] += x[c] * x[c];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

static void fwd_row_scalar(const float *x, const float *w, int64_t C, float r, float *y) {
  for (int64_t c = 0; c < C; c++) y[c] = w[c] * (x[c] * r);
}

/* returns sum_c(dy * w * x) */
static float gdot_scalar(const float *x, const float *w, const float *dy, int64_t C) {
  float s = 0.0f;
  for (int64_t c = 0; c < C; c++) s += dy[c] * w[c] * x[c];
  return s;
}

static void bwd_row_scalar(const float *x, const float *w, const float *dy, int64_t C, float r,
                           float k, float *dx, double *dw) {
  for (int64_t c = 0; c < C; c++) {
    dx[c] = r * (dy[c] * w[c]) - x[c] * k;
    if (dw) dw[c] += (double)(dy[c] * (x[c] * r));
  }
}

#if QX_X86
/* ---- AVX2 --------------------------------------------------------------------------- */
QX_TARGET_AVX2 static float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

QX_TARGET_AVX2 static float sumsq_avx2(const float *x, int64_t C) {
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    __m256 u = _mm256_loadu_ps(x + c), v = _mm256_loadu_ps(x + c + 8);
    a = _mm256_fmadd_ps(u, u, a);
    b = _mm256_fmadd_ps(v, v, b);
  }
  for (; c + 8 <= C; c += 8) {
    __m256 u = _mm256_loadu_ps(x + c);
    a = _mm256_fmadd_ps(u, u, a);
  }
  float s = hsum256(_mm256_add_ps(a, b));
  for (; c < C; c++) s += x[c] * x[c];
  return s;
}

QX_TARGET_AVX2 static void fwd_row_avx2(const float *x, const float *w, int64_t C, float r,
                                        float *y) {
  __m256 rv = _mm256_set1_ps(r);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8)
    _mm256_storeu_ps(y + c, _mm256_mul_ps(_mm256_loadu_ps(w + c),
                                          _mm256_mul_ps(_mm256_loadu_ps(x + c), rv)));
  for (; c < C; c++) y[c] = w[c] * (x[c] * r);
}

QX_TARGET_AVX2 static float gdot_avx2(const float *x, const float *w, const float *dy, int64_t C) {
  __m256 a = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= C; c += 8)
    a = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(dy + c), _mm256_loadu_ps(w + c)),
                        _mm256_loadu_ps(x + c), a);
  float s = hsum256(a);
  for (; c < C; c++) s += dy[c] * w[c] * x[c];
  return s;
}

QX_TARGET_AVX2 static void bwd_row_avx2(const float *x, const float *w, const float *dy, int64_t C,
                                        float r, float k, float *dx, double *dw) {
  __m256 rv = _mm256_set1_ps(r), kv = _mm256_set1_ps(k);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    __m256 xv = _mm256_loadu_ps(x + c), d = _mm256_loadu_ps(dy + c);
    __m256 g = _mm256_mul_ps(d, _mm256_loadu_ps(w + c));
    _mm256_storeu_ps(dx + c, _mm256_fnmadd_ps(xv, kv, _mm256_mul_ps(rv, g)));
    if (dw) {
      __m256 p = _mm256_mul_ps(d, _mm256_mul_ps(xv, rv));
      _mm256_storeu_pd(dw + c, _mm256_add_pd(_mm256_loadu_pd(dw + c),
                                             _mm256_cvtps_pd(_mm256_castps256_ps128(p))));
      _mm256_storeu_pd(dw + c + 4, _mm256_add_pd(_mm256_loadu_pd(dw + c + 4),
                                                 _mm256_cvtps_pd(_mm256_extractf128_ps(p, 1))));
    }
  }
  for (; c < C; c++) {
    dx[c] = r * (dy[c] * w[c]) - x[c] * k;
    if (dw) dw[c] += (double)(dy[c] * (x[c] * r));
  }
}

/* ---- AVX-512 ------------------------------------------------------------------------ */
QX_TARGET_AVX512 static float sumsq_avx512(const float *x, int64_t C) {
  __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    __m512 u = _mm512_loadu_ps(x + c), v = _mm512_loadu_ps(x + c + 16);
    a = _mm512_fmadd_ps(u, u, a);
    b = _mm512_fmadd_ps(v, v, b);
  }
  for (; c < C; c += 16) {
    __mmask16 m = C - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (C - c)) - 1);
    __m512 u = _mm512_maskz_loadu_ps(m, x + c);
    a = _mm512_fmadd_ps(u, u, a);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}

QX_TARGET_AVX512 static void fwd_row_avx512(const float *x, const float *w, int64_t C, float r,
                                            float *y) {
  __m512 rv = _mm512_set1_ps(r);
  for (int64_t c = 0; c < C; c += 16) {
    __mmask16 m = C - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (C - c)) - 1);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + c),
                             _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + c), rv));
    _mm512_mask_storeu_ps(y + c, m, v);
  }
}

QX_TARGET_AVX512 static float gdot_avx512(const float *x, const float *w, const float *dy,
                                          int64_t C) {
  __m512 a = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    __mmask16 m = C - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (C - c)) - 1);
    a = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + c), _mm512_maskz_loadu_ps(m, w + c)),
                        _mm512_maskz_loadu_ps(m, x + c), a);
  }
  return _mm512_reduce_add_ps(a);
}

QX_TARGET_AVX512 static void bwd_row_avx512(const float *x, const float *w, const float *dy,
                                            int64_t C, float r, float k, float *dx, double *dw) {
  __m512 rv = _mm512_set1_ps(r), kv = _mm512_set1_ps(k);
  for (int64_t c = 0; c < C; c += 16) {
    __mmask16 m = C - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (C - c)) - 1);
    __m512 xv = _mm512_maskz_loadu_ps(m, x + c), d = _mm512_maskz_loadu_ps(m, dy + c);
    __m512 g = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(m, w + c));
    _mm512_mask_storeu_ps(dx + c, m, _mm512_fnmadd_ps(xv, kv, _mm512_mul_ps(rv, g)));
    if (dw) {
      __m512 p = _mm512_mul_ps(d, _mm512_mul_ps(xv, rv));
      __mmask8 lo = (__mmask8)m, hi = (__mmask8)(m >> 8);
      _mm512_mask_storeu_pd(dw + c, lo, _mm512_add_pd(_mm512_maskz_loadu_pd(lo, dw + c),
                                                      _mm512_cvtps_pd(_mm512_castps512_ps256(p))));
      _mm512_mask_storeu_pd(dw + c + 8, hi,
                            _mm512_add_pd(_mm512_maskz_loadu_pd(hi, dw + c + 8),
                                          _mm512_cvtps_pd(_mm512_extractf32x8_ps(p, 1))));
    }
  }
}
#endif /* QX_X86 */

/* Rows per thread chunk below which threads cost more than they save. */
static int rows_threads(int nthreads, int64_t N, int64_t C) {
  int nt = qx_threads(nthreads);
  if (N * C < (int64_t)1 << 15) nt = 1;
  if (nt > N) nt = (int)N;
  return nt < 1 ? 1 : nt;
}

int qx_rmsnorm_forward(const float *x, const float *weight, int64_t N, int64_t C, float eps,
                       float *y, float *rstd, int nthreads) {
  if (N < 0 || C <= 0 || !(eps >= 0.0f)) return QX_E_ARG;
  const int level = qx_cpu_level();
  const int nt = rows_threads(nthreads, N, C);
#pragma omp parallel for schedule(dynamic, 32) num_threads(nt)
  for (int64_t n = 0; n < N; n++) {
    const float *xr = x + n * C;
    float ss, r;
#if QX_X86
    if (level >= QX_LEVEL_AVX512) ss = sumsq_avx512(xr, C);
    else if (level >= QX_LEVEL_AVX2) ss = sumsq_avx2(xr, C);
    else
#endif
      ss = sumsq_scalar(xr, C);
    r = 1.0f / sqrtf(ss / (float)C + eps);
    rstd[n] = r;
#if QX_X86
    if (level >= QX_LEVEL_AVX512) fwd_row_avx512(xr, weight, C, r, y + n * C);
    else if (level >= QX_LEVEL_AVX2) fwd_row_avx2(xr, weight, C, r, y + n * C);
    else
#endif
      fwd_row_scalar(xr, weight, C, r, y + n * C);
  }
  return QX_OK;
}

/* dweight partial sums cover fixed blocks of rows, added in block order at the end, so the
 * result does not depend on the thread count. */
enum { DW_ROWS = 256 };

int qx_rmsnorm_backward(const float *x, const float *weight, const float *rstd, const float *dy,
                        int64_t N, int64_t C, float *dx, float *dweight, int nthreads) {
  if (N < 0 || C <= 0) return QX_E_ARG;
  const int level = qx_cpu_level();
  const int64_t nblocks = (N + DW_ROWS - 1) / DW_ROWS;
  int nt = rows_threads(nthreads, N, C);
  if (nt > nblocks) nt = (int)(nblocks > 0 ? nblocks : 1);
  /* one float64 partial dweight row per block of DW_ROWS rows */
  double *part = NULL;
  if (dweight) {
    part = (double *)calloc((size_t)(nblocks > 0 ? nblocks : 1) * (size_t)C, sizeof(double));
    if (!part) return QX_E_NOMEM;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t blk = 0; blk < nblocks; blk++) {
    double *dw = part ? part + (size_t)blk * (size_t)C : NULL;
    const int64_t n1 = (blk + 1) * DW_ROWS < N ? (blk + 1) * DW_ROWS : N;
    for (int64_t n = blk * DW_ROWS; n < n1; n++) {
      const float *xr = x + n * C, *dyr = dy + n * C;
      const float r = rstd[n];
      float dot, k;
#if QX_X86
      if (level >= QX_LEVEL_AVX512) dot = gdot_avx512(xr, weight, dyr, C);
      else if (level >= QX_LEVEL_AVX2) dot = gdot_avx2(xr, weight, dyr, C);
      else
#endif
        dot = gdot_scalar(xr, weight, dyr, C);
      k = r * r * r * dot / (float)C;
#if QX_X86
      if (level >= QX_LEVEL_AVX512) bwd_row_avx512(xr, weight, dyr, C, r, k, dx + n * C, dw);
      else if (level >= QX_LEVEL_AVX2) bwd_row_avx2(xr, weight, dyr, C, r, k, dx + n * C, dw);
      else
#endif
        bwd_row_scalar(xr, weight, dyr, C, r, k, dx + n * C, dw);
    }
  }
  if (dweight) {
    for (int64_t c = 0; c < C; c++) {
      double s = 0.0;
      for (int64_t blk = 0; blk < nblocks; blk++) s += part[(size_t)blk * (size_t)C + c];
      dweight[c] = (float)s;
    }
    free(part);
  }
  return QX_OK;
}
