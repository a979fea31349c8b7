/* C = alpha · A B (+ C) for the LoRA products; see small_gemm.h for the contract.
 *
 * Tiles: MR rows × NV 16-lane vectors of C held in registers over the whole depth (K is at
 * most a few thousand: B's rows stream from L2).  Wide outputs (M > 32) take NV = 4, MR = 6;
 * narrow ones (M = r <= 32) NV = M/16 rounded up and MR = 12, so that the r-wide products still
 * keep 12+ FMAs in flight.  Tiles are spread over threads in one flat loop. */
#include "small_gemm.h"

#include <string.h>

#if QX_X86
#include <immintrin.h>
#endif

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* ---- scalar reference ------------------------------------------------------------------- */
static void gemm_scalar(const float *a, int64_t sar, int64_t sak, const float *b, int64_t ldb,
                        float *c, int64_t ldc, int64_t n, int64_t m, int64_t k, float alpha,
                        int accumulate, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < n; i++) {
    float *ci = c + i * ldc;
    for (int64_t j = 0; j < m; j++) {
      float s = 0.0f;
      for (int64_t p = 0; p < k; p++) s += a[i * sar + p * sak] * b[p * ldb + j];
      ci[j] = accumulate ? ci[j] + alpha * s : alpha * s;
    }
  }
}

#if QX_X86
static inline __mmask16 lane_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (left > 0 ? left : 0)) - 1u);
}

/* One tile: rows i0..i0+mr, columns j0..j0+16·nv (lanes past m masked off). */
QX_TARGET_AVX512 static inline __attribute__((always_inline)) void
tile_avx512(const float *a, int64_t sar, int64_t sak, const float *b, int64_t ldb, float *c,
            int64_t ldc, int64_t i0, int64_t j0, int64_t m, int64_t k, float alpha,
            int accumulate, const int mr, const int nv) {
  __m512 acc[12][4];
  __mmask16 mk[4];
  for (int v = 0; v < nv; v++) mk[v] = lane_mask(m - j0 - 16 * v);
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < nv; v++) acc[r][v] = _mm512_setzero_ps();
  const float *ar = a + i0 * sar;
  const float *bj = b + j0;
  for (int64_t p = 0; p < k; p++) {
    __m512 bv[4];
    for (int v = 0; v < nv; v++) bv[v] = _mm512_maskz_loadu_ps(mk[v], bj + p * ldb + 16 * v);
    const float *ap = ar + p * sak;
    for (int r = 0; r < mr; r++) {
      const __m512 x = _mm512_set1_ps(ap[r * sar]);
      for (int v = 0; v < nv; v++) acc[r][v] = _mm512_fmadd_ps(x, bv[v], acc[r][v]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
  for (int r = 0; r < mr; r++) {
    float *cr = c + (i0 + r) * ldc + j0;
    for (int v = 0; v < nv; v++) {
      __m512 out = _mm512_mul_ps(al, acc[r][v]);
      if (accumulate) out = _mm512_add_ps(_mm512_maskz_loadu_ps(mk[v], cr + 16 * v), out);
      _mm512_mask_storeu_ps(cr + 16 * v, mk[v], out);
    }
  }
}

/* The row count of a tile as a compile-time constant, so acc[][] lives in registers. */
#define QX_ROWS_CASE(R, NV) \
  case R: tile_avx512(a, sar, sak, b, ldb, c, ldc, i0, j0, m, k, alpha, accumulate, R, NV); break;

#define QX_TILE_FN(NAME, NV, MR, CASES)                                                        \
  QX_TARGET_AVX512 static void NAME(const float *a, int64_t sar, int64_t sak, const float *b,   \
                                    int64_t ldb, float *c, int64_t ldc, int64_t i0, int64_t j0, \
                                    int64_t m, int64_t k, float alpha, int accumulate, int mr) { \
    switch (mr) { CASES }                                                                       \
  }

#define QX_CASES_6(NV) QX_ROWS_CASE(1, NV) QX_ROWS_CASE(2, NV) QX_ROWS_CASE(3, NV) \
  QX_ROWS_CASE(4, NV) QX_ROWS_CASE(5, NV) QX_ROWS_CASE(6, NV)
#define QX_CASES_12(NV) QX_CASES_6(NV) QX_ROWS_CASE(7, NV) QX_ROWS_CASE(8, NV) \
  QX_ROWS_CASE(9, NV) QX_ROWS_CASE(10, NV) QX_ROWS_CASE(11, NV) QX_ROWS_CASE(12, NV)

QX_TILE_FN(tile_nv1, 1, 12, QX_CASES_12(1))
QX_TILE_FN(tile_nv2, 2, 12, QX_CASES_12(2))
QX_TILE_FN(tile_nv4, 4, 6, QX_CASES_6(4))

typedef void (*tile_fn)(const float *, int64_t, int64_t, const float *, int64_t, float *, int64_t,
                        int64_t, int64_t, int64_t, int64_t, float, int, int);

static void gemm_avx512(const float *a, int64_t sar, int64_t sak, const float *b, int64_t ldb,
                        float *c, int64_t ldc, int64_t n, int64_t m, int64_t k, float alpha,
                        int accumulate, int nt) {
  int nv, mr;
  tile_fn fn;
  if (m <= 16) { nv = 1; mr = 12; fn = tile_nv1; }
  else if (m <= 32) { nv = 2; mr = 12; fn = tile_nv2; }
  else { nv = 4; mr = 6; fn = tile_nv4; }
  const int64_t row_tiles = ceil_div(n, mr), col_tiles = ceil_div(m, 16 * nv);
  const int64_t tiles = row_tiles * col_tiles;
  if (tiles < nt) nt = (int)tiles;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = 0; t < tiles; t++) {
    const int64_t i0 = (t / col_tiles) * mr, j0 = (t % col_tiles) * 16 * nv;
    const int64_t rows = n - i0 < mr ? n - i0 : mr;
    fn(a, sar, sak, b, ldb, c, ldc, i0, j0, m, k, alpha, accumulate, (int)rows);
  }
}
#endif /* QX_X86 */

int qx_small_gemm(const float *a, int64_t sar, int64_t sak, const float *b, int64_t ldb,
                  float *c, int64_t ldc, int64_t n, int64_t m, int64_t k, float alpha,
                  int accumulate, int nthreads) {
  if (n < 0 || m < 0 || k < 0 || sar < 0 || sak < 0 || ldb < m || ldc < m) return QX_E_SIZE;
  if (n == 0 || m == 0) return QX_OK;
  if (k == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < n; i++) memset(c + i * ldc, 0, (size_t)m * sizeof(float));
    return QX_OK;
  }
  /* threads only pay once a product has some work (fork/join costs a few microseconds) */
  int nt = qx_threads(nthreads);
  if (n * m * k < (int64_t)1 << 16) nt = 1;
#if QX_X86
  if (qx_cpu_level() >= QX_LEVEL_AVX512) {
    gemm_avx512(a, sar, sak, b, ldb, c, ldc, n, m, k, alpha, accumulate, nt);
    return QX_OK;
  }
#endif
  gemm_scalar(a, sar, sak, b, ldb, c, ldc, n, m, k, alpha, accumulate, nt);
  return QX_OK;
}
