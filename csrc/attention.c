/* Causal GQA attention, forward and backward, flash-attention style on the CPU.
 *
 * q (B, T, Hq, D), k, v (B, T, Hkv, D), out (B, T, Hq, D), lse (B, Hq, T), mask (B, T) | NULL.
 * Queries are cut into tiles of BR rows, keys into tiles of BC; one tile pair's scores
 * S (BR, BC) live in a per-thread buffer, never the whole (T, T) matrix.
 *
 * Every matrix product is one small GEMM, C (M, N) [+]= A (M, K) . B (K, N), with A read
 * through strides (so P^T and dS^T need no copy) and B row-major (N contiguous, vectorised):
 *   forward   S = Q Kt          O += P V
 *   backward  S = Q Kt -> P     dV += P^T dO     dP = dO Vt     dS = P (dP - Di) scale
 *             dK += dS^T Q      dQ += dS K
 * Kt / Vt are K / V tiles packed transposed (D, BC), so that S and dP vectorise over keys.
 *
 * Threads: every loop hands out work dynamically, so a thread the OS deschedules (a busy
 * host) does not hold the others up at a barrier.
 * The forward splits over (b, query head, query tile): each writes its own rows.
 * The backward splits over (b, kv head, key tile): a thread owns dK/dV of its key tile for
 * all query heads of the group (no race), and adds its dQ share into each query tile in
 * key-tile order (a per-tile turn counter), so results do not depend on the thread count.
 *
 * Non-finite input: a NaN or Inf in q or k makes a valid key's score non-finite, and every
 * path then gives that query row NaN (out, lse, and the gradients it feeds), never a silent 0
 * or a finite value; the SIMD paths' exp and row max keep NaN so that the result does not
 * depend on the CPU.  A padding key stays -inf whatever its score.
 *
 * Packed rows (segments): each position knows where its document's run starts (run_starts);
 * query i sees keys [start(i), i].  Starts never decrease along a row, so a query tile's first
 * row has the earliest start: key tiles before it are skipped, and within a tile pair the
 * products begin at the group's first visible key.  A row's keys before its own start are
 * handed to the row ops as an offset (the ops see only [start, ...)) and their P set to 0. */
#include "attention.h"

#include <math.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>

#if QX_X86
#include <immintrin.h>
#endif

enum { BR = 64, BC = 64 };
/* On a tile pair that the diagonal crosses, rows go in groups of DG, each computing only the
 * keys its last row may see (about 3/8 of the tile's work saved: the products' N and K
 * round up to whole vectors). */
enum { DG = 16 };

#define QX_INLINE inline __attribute__((always_inline))

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

/* The per-level pieces the tile loops are built from. */
typedef struct {
  /* C (M, N) = [C +] A B;  A(m, k) = A[m * ars + k * acs], B(k, n) = B[k * ldb + n],
   * C(m, n) = C[m * ldc + n]. */
  void (*gemm)(int64_t M, int64_t N, int64_t K, const float *A, int64_t ars, int64_t acs,
               const float *B, int64_t ldb, float *C, int64_t ldc, int accumulate);
  /* Online softmax over one row of one key tile: s (n,) raw scores, the first nv valid.
   * s becomes P = exp(s * scale + bias - m_new) (0 past nv); m, l and the output row o (D,)
   * are rescaled to the new running max. */
  void (*row_fwd)(float *s, int64_t n, int64_t nv, const float *bias, float scale, float *m,
                  float *l, float *o, int64_t D);
  /* s (n,) raw scores -> P = exp(s * scale + bias - lse) for the first nv, 0 after. */
  void (*row_p)(float *s, int64_t n, int64_t nv, const float *bias, float scale, float lse);
  /* dp (n,) -> dS = p * (dp - di) * scale. */
  void (*row_ds)(const float *p, float *dp, int64_t n, float di, float scale);
  float (*dot)(const float *a, const float *b, int64_t n);
} attn_ops;

/* ==== scalar ============================================================================ */
/* A valid key's scaled score: -inf for a padding key (bias -inf), NaN for a non-finite raw
 * score (see the file comment), else s * scale + bias. */
static inline float scaled_score(float s, float scale, float b) {
  if (b == -INFINITY) return -INFINITY;
  return isfinite(s) ? s * scale + b : NAN;
}

/* max that is NaN when either side is (the running max of a poisoned row stays NaN) */
static inline float max_keep_nan(float a, float b) {
  return a != a || b != b ? NAN : (a > b ? a : b);
}

static void gemm_scalar(int64_t M, int64_t N, int64_t K, const float *A, int64_t ars,
                        int64_t acs, const float *B, int64_t ldb, float *C, int64_t ldc,
                        int accumulate) {
  for (int64_t m = 0; m < M; m++) {
    float *c = C + m * ldc;
    if (!accumulate)
      for (int64_t n = 0; n < N; n++) c[n] = 0.0f;
    for (int64_t k = 0; k < K; k++) {
      const float a = A[m * ars + k * acs];
      const float *b = B + k * ldb;
      for (int64_t n = 0; n < N; n++) c[n] += a * b[n];
    }
  }
}

static void row_fwd_scalar(float *s, int64_t n, int64_t nv, const float *bias, float scale,
                           float *m, float *l, float *o, int64_t D) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < nv; j++) {
    const float x = scaled_score(s[j], scale, bias ? bias[j] : 0.0f);
    s[j] = x;
    mx = max_keep_nan(mx, x);
  }
  const float mo = *m, mn = max_keep_nan(mx, mo);
  if (mn == -INFINITY) { /* nothing valid yet: keep m = -inf, l = 0 */
    for (int64_t j = 0; j < n; j++) s[j] = 0.0f;
    return;
  }
  const float alpha = expf(mo - mn);
  float sum = 0.0f;
  for (int64_t j = 0; j < nv; j++) {
    float p = expf(s[j] - mn);
    s[j] = p;
    sum += p;
  }
  for (int64_t j = nv; j < n; j++) s[j] = 0.0f;
  *l = *l * alpha + sum;
  *m = mn;
  if (alpha != 1.0f)
    for (int64_t d = 0; d < D; d++) o[d] *= alpha;
}

static void row_p_scalar(float *s, int64_t n, int64_t nv, const float *bias, float scale,
                         float lse) {
  if (lse == -INFINITY) nv = 0; /* a row with no valid key */
  for (int64_t j = 0; j < nv; j++) s[j] = expf(scaled_score(s[j], scale, bias ? bias[j] : 0.0f) - lse);
  for (int64_t j = nv; j < n; j++) s[j] = 0.0f;
}

static void row_ds_scalar(const float *p, float *dp, int64_t n, float di, float scale) {
  for (int64_t j = 0; j < n; j++) dp[j] = p[j] * (dp[j] - di) * scale;
}

static float dot_scalar(const float *a, const float *b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

#if QX_X86
/* ==== AVX2 ============================================================================== */
/* exp for x <= 88; x < -87.3 (and -inf) gives 0, x > ln(FLT_MAX) (and +inf) +inf, NaN NaN,
 * as expf does.  Cephes' expf: n = round(x log2 e), r = x - n ln2 (two-part ln2), degree-6
 * polynomial, times 2^n via the exponent field. */
QX_TARGET_AVX2 static QX_INLINE __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  __m256 keep = _mm256_cmp_ps(x, lo, _CMP_NLT_UQ); /* x >= lo, or NaN */
  /* maxps / minps return their second operand when one is NaN: this order keeps a NaN x */
  __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(lo, x));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 r2 = _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep);
  return _mm256_blendv_ps(r2, _mm256_set1_ps(INFINITY),
                          _mm256_cmp_ps(x, _mm256_set1_ps(88.72283935546875f), _CMP_GT_OQ));
}

QX_TARGET_AVX2 static QX_INLINE __m256i lanes_below(int64_t cnt) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* lanes where v is finite (all ones) */
QX_TARGET_AVX2 static QX_INLINE __m256 finite256(__m256 v) {
  const __m256 abs = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
  return _mm256_cmp_ps(abs, _mm256_set1_ps(INFINITY), _CMP_LT_OQ);
}

QX_TARGET_AVX2 static QX_INLINE float hmax256(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

QX_TARGET_AVX2 static QX_INLINE float hsum256(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

/* 6 rows x (nv * 8) columns; the last vector loads/stores only the lanes of `last`. */
QX_TARGET_AVX2 static QX_INLINE void mk256(const int mr, const int nv, __m256i last, int64_t K,
                                           const float *A, int64_t ars, int64_t acs,
                                           const float *B, int64_t ldb, float *C, int64_t ldc,
                                           int accumulate) {
  __m256 c[6][2];
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < nv; v++)
      c[r][v] = !accumulate ? _mm256_setzero_ps()
                : v == nv - 1 ? _mm256_maskload_ps(C + r * ldc + 8 * v, last)
                              : _mm256_loadu_ps(C + r * ldc + 8 * v);
  for (int64_t k = 0; k < K; k++) {
    const float *bk = B + k * ldb, *ak = A + k * acs;
    __m256 b[2];
    for (int v = 0; v < nv; v++)
      b[v] = v == nv - 1 ? _mm256_maskload_ps(bk + 8 * v, last) : _mm256_loadu_ps(bk + 8 * v);
    for (int r = 0; r < mr; r++) {
      __m256 a = _mm256_broadcast_ss(ak + r * ars);
      for (int v = 0; v < nv; v++) c[r][v] = _mm256_fmadd_ps(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < nv; v++) {
      if (v == nv - 1) _mm256_maskstore_ps(C + r * ldc + 8 * v, last, c[r][v]);
      else _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
    }
}

QX_TARGET_AVX2 static void gemm_avx2(int64_t M, int64_t N, int64_t K, const float *A,
                                     int64_t ars, int64_t acs, const float *B, int64_t ldb,
                                     float *C, int64_t ldc, int accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const int64_t nn = min64(16, N - n0);
    const int nv = (int)((nn + 7) / 8);
    const __m256i last = lanes_below(nn - 8 * (nv - 1));
    for (int64_t m0 = 0; m0 < M; m0 += 6) {
      const int mr = (int)min64(6, M - m0);
      const float *a = A + m0 * ars, *b = B + n0;
      float *c = C + m0 * ldc + n0;
#define QX_MK256(R, V) \
  case R * 4 + V: mk256(R, V, last, K, a, ars, acs, b, ldb, c, ldc, accumulate); break;
      switch (mr * 4 + nv) {
        QX_MK256(1, 1) QX_MK256(1, 2) QX_MK256(2, 1) QX_MK256(2, 2) QX_MK256(3, 1) QX_MK256(3, 2)
        QX_MK256(4, 1) QX_MK256(4, 2) QX_MK256(5, 1) QX_MK256(5, 2) QX_MK256(6, 1) QX_MK256(6, 2)
      }
#undef QX_MK256
    }
  }
}

QX_TARGET_AVX2 static void row_fwd_avx2(float *s, int64_t n, int64_t nv, const float *bias,
                                        float scale, float *m, float *l, float *o, int64_t D) {
  const __m256 sc = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY), nan = _mm256_set1_ps(NAN);
  __m256 mx = ninf, bad = _mm256_setzero_ps();
  for (int64_t j = 0; j < nv; j += 8) {
    __m256i lm = lanes_below(nv - j);
    __m256 raw = _mm256_maskload_ps(s + j, lm), x = _mm256_mul_ps(raw, sc);
    if (bias) x = _mm256_add_ps(x, _mm256_maskload_ps(bias + j, lm));
    x = _mm256_blendv_ps(nan, x, finite256(raw)); /* as scaled_score */
    if (bias) x = _mm256_blendv_ps(x, ninf, _mm256_cmp_ps(_mm256_maskload_ps(bias + j, lm), ninf, _CMP_EQ_OQ));
    x = _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(lm));
    _mm256_maskstore_ps(s + j, lm, x);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    mx = _mm256_max_ps(mx, x);
  }
  const float rowmax = _mm256_movemask_ps(bad) ? NAN : hmax256(mx);
  const float mo = *m, mn = max_keep_nan(rowmax, mo);
  if (mn == -INFINITY) {
    for (int64_t j = 0; j < n; j++) s[j] = 0.0f;
    return;
  }
  const float alpha = expf(mo - mn);
  const __m256 mv = _mm256_set1_ps(mn);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    __m256i ln = lanes_below(n - j);
    __m256 p = exp256(_mm256_sub_ps(_mm256_maskload_ps(s + j, ln), mv));
    p = _mm256_and_ps(p, _mm256_castsi256_ps(lanes_below(nv - j)));
    _mm256_maskstore_ps(s + j, ln, p);
    sum = _mm256_add_ps(sum, p);
  }
  *l = *l * alpha + hsum256(sum);
  *m = mn;
  if (alpha != 1.0f) {
    const __m256 av = _mm256_set1_ps(alpha);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), av));
    for (; d < D; d++) o[d] *= alpha;
  }
}

QX_TARGET_AVX2 static void row_p_avx2(float *s, int64_t n, int64_t nv, const float *bias,
                                      float scale, float lse) {
  if (lse == -INFINITY) nv = 0;
  const __m256 sc = _mm256_set1_ps(scale), lv = _mm256_set1_ps(lse), nan = _mm256_set1_ps(NAN);
  const __m256 ninf = _mm256_set1_ps(-INFINITY), padded = _mm256_sub_ps(ninf, lv);
  for (int64_t j = 0; j < n; j += 8) {
    __m256i ln = lanes_below(n - j), lv_ = lanes_below(nv - j);
    __m256 raw = _mm256_maskload_ps(s + j, ln), x = _mm256_fmsub_ps(raw, sc, lv);
    if (bias) x = _mm256_add_ps(x, _mm256_maskload_ps(bias + j, lv_));
    x = _mm256_blendv_ps(nan, x, finite256(raw)); /* as scaled_score, then - lse */
    if (bias) x = _mm256_blendv_ps(x, padded, _mm256_cmp_ps(_mm256_maskload_ps(bias + j, lv_), ninf, _CMP_EQ_OQ));
    __m256 p = _mm256_and_ps(exp256(x), _mm256_castsi256_ps(lv_));
    _mm256_maskstore_ps(s + j, ln, p);
  }
}

QX_TARGET_AVX2 static void row_ds_avx2(const float *p, float *dp, int64_t n, float di,
                                       float scale) {
  const __m256 dv = _mm256_set1_ps(di), sc = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 8) {
    __m256i ln = lanes_below(n - j);
    __m256 x = _mm256_sub_ps(_mm256_maskload_ps(dp + j, ln), dv);
    _mm256_maskstore_ps(dp + j, ln, _mm256_mul_ps(_mm256_mul_ps(_mm256_maskload_ps(p + j, ln), x), sc));
  }
}

QX_TARGET_AVX2 static float dot_avx2(const float *a, const float *b, int64_t n) {
  __m256 s = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    __m256i ln = lanes_below(n - i);
    s = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, ln), _mm256_maskload_ps(b + i, ln), s);
  }
  return hsum256(s);
}

/* ==== AVX-512 =========================================================================== */
QX_TARGET_AVX512 static QX_INLINE __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ); /* as exp256 */
  __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(lo, x));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_mask_mov_ps(_mm512_maskz_scalef_ps(keep, y, n),
                            _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.72283935546875f), _CMP_GT_OQ),
                            _mm512_set1_ps(INFINITY));
}

static QX_INLINE __mmask16 mask_below(int64_t cnt) {
  return cnt >= 16 ? (__mmask16)0xFFFF : cnt <= 0 ? (__mmask16)0 : (__mmask16)((1u << cnt) - 1);
}

/* 6 rows x (nv * 16) columns; the last vector loads/stores only the lanes of `last`. */
QX_TARGET_AVX512 static QX_INLINE void mk512(const int mr, const int nv, __mmask16 last,
                                             int64_t K, const float *A, int64_t ars,
                                             int64_t acs, const float *B, int64_t ldb,
                                             float *C, int64_t ldc, int accumulate) {
  __m512 c[6][4];
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < nv; v++)
      c[r][v] = !accumulate ? _mm512_setzero_ps()
                : v == nv - 1 ? _mm512_maskz_loadu_ps(last, C + r * ldc + 16 * v)
                              : _mm512_loadu_ps(C + r * ldc + 16 * v);
  for (int64_t k = 0; k < K; k++) {
    const float *bk = B + k * ldb, *ak = A + k * acs;
    __m512 b[4];
    for (int v = 0; v < nv; v++)
      b[v] = v == nv - 1 ? _mm512_maskz_loadu_ps(last, bk + 16 * v) : _mm512_loadu_ps(bk + 16 * v);
    for (int r = 0; r < mr; r++) {
      __m512 a = _mm512_set1_ps(ak[r * ars]);
      for (int v = 0; v < nv; v++) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < nv; v++) {
      if (v == nv - 1) _mm512_mask_storeu_ps(C + r * ldc + 16 * v, last, c[r][v]);
      else _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
    }
}

QX_TARGET_AVX512 static void gemm_avx512(int64_t M, int64_t N, int64_t K, const float *A,
                                         int64_t ars, int64_t acs, const float *B, int64_t ldb,
                                         float *C, int64_t ldc, int accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t nn = min64(64, N - n0);
    const int nv = (int)((nn + 15) / 16);
    const __mmask16 last = mask_below(nn - 16 * (nv - 1));
    for (int64_t m0 = 0; m0 < M; m0 += 6) {
      const int mr = (int)min64(6, M - m0);
      const float *a = A + m0 * ars, *b = B + n0;
      float *c = C + m0 * ldc + n0;
#define QX_MK512(R, V) \
  case R * 8 + V: mk512(R, V, last, K, a, ars, acs, b, ldb, c, ldc, accumulate); break;
      switch (mr * 8 + nv) {
        QX_MK512(1, 1) QX_MK512(1, 2) QX_MK512(1, 3) QX_MK512(1, 4)
        QX_MK512(2, 1) QX_MK512(2, 2) QX_MK512(2, 3) QX_MK512(2, 4)
        QX_MK512(3, 1) QX_MK512(3, 2) QX_MK512(3, 3) QX_MK512(3, 4)
        QX_MK512(4, 1) QX_MK512(4, 2) QX_MK512(4, 3) QX_MK512(4, 4)
        QX_MK512(5, 1) QX_MK512(5, 2) QX_MK512(5, 3) QX_MK512(5, 4)
        QX_MK512(6, 1) QX_MK512(6, 2) QX_MK512(6, 3) QX_MK512(6, 4)
      }
#undef QX_MK512
    }
  }
}

QX_TARGET_AVX512 static void row_fwd_avx512(float *s, int64_t n, int64_t nv, const float *bias,
                                            float scale, float *m, float *l, float *o,
                                            int64_t D) {
  const __m512 sc = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY), nan = _mm512_set1_ps(NAN);
  const __m512 pinf = _mm512_set1_ps(INFINITY);
  __m512 mx = ninf;
  __mmask16 bad = 0;
  for (int64_t j = 0; j < nv; j += 16) {
    __mmask16 lm = mask_below(nv - j);
    __m512 raw = _mm512_maskz_loadu_ps(lm, s + j), x = _mm512_mul_ps(raw, sc);
    if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(lm, bias + j));
    x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(raw), pinf, _CMP_LT_OQ), nan, x);
    if (bias)
      x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(lm, bias + j), ninf, _CMP_EQ_OQ), x, ninf);
    x = _mm512_mask_blend_ps(lm, ninf, x);
    _mm512_mask_storeu_ps(s + j, lm, x);
    bad |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, x);
  }
  const float rowmax = bad ? NAN : _mm512_reduce_max_ps(mx);
  const float mo = *m, mn = max_keep_nan(rowmax, mo);
  if (mn == -INFINITY) {
    for (int64_t j = 0; j < n; j++) s[j] = 0.0f;
    return;
  }
  const float alpha = expf(mo - mn);
  const __m512 mv = _mm512_set1_ps(mn);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    __mmask16 ln = mask_below(n - j), lv = mask_below(nv - j);
    __m512 p = _mm512_maskz_mov_ps(lv, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(lv, s + j), mv)));
    _mm512_mask_storeu_ps(s + j, ln, p);
    sum = _mm512_add_ps(sum, p);
  }
  *l = *l * alpha + _mm512_reduce_add_ps(sum);
  *m = mn;
  if (alpha != 1.0f) {
    const __m512 av = _mm512_set1_ps(alpha);
    for (int64_t d = 0; d < D; d += 16) {
      __mmask16 md = mask_below(D - d);
      _mm512_mask_storeu_ps(o + d, md, _mm512_mul_ps(_mm512_maskz_loadu_ps(md, o + d), av));
    }
  }
}

QX_TARGET_AVX512 static void row_p_avx512(float *s, int64_t n, int64_t nv, const float *bias,
                                          float scale, float lse) {
  if (lse == -INFINITY) nv = 0;
  const __m512 sc = _mm512_set1_ps(scale), lv = _mm512_set1_ps(lse), nan = _mm512_set1_ps(NAN);
  const __m512 ninf = _mm512_set1_ps(-INFINITY), padded = _mm512_sub_ps(ninf, lv);
  for (int64_t j = 0; j < n; j += 16) {
    __mmask16 ln = mask_below(n - j), lvm = mask_below(nv - j);
    __m512 raw = _mm512_maskz_loadu_ps(lvm, s + j), x = _mm512_fmsub_ps(raw, sc, lv);
    if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(lvm, bias + j));
    x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(raw), _mm512_set1_ps(INFINITY), _CMP_LT_OQ),
                             nan, x);
    if (bias)
      x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(lvm, bias + j), ninf, _CMP_EQ_OQ),
                               x, padded);
    _mm512_mask_storeu_ps(s + j, ln, _mm512_maskz_mov_ps(lvm, exp512(x)));
  }
}

QX_TARGET_AVX512 static void row_ds_avx512(const float *p, float *dp, int64_t n, float di,
                                           float scale) {
  const __m512 dv = _mm512_set1_ps(di), sc = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 16) {
    __mmask16 ln = mask_below(n - j);
    __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(ln, dp + j), dv);
    _mm512_mask_storeu_ps(dp + j, ln, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(ln, p + j), x), sc));
  }
}

QX_TARGET_AVX512 static float dot_avx512(const float *a, const float *b, int64_t n) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 ln = mask_below(n - i);
    s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(ln, a + i), _mm512_maskz_loadu_ps(ln, b + i), s);
  }
  return _mm512_reduce_add_ps(s);
}
#endif /* QX_X86 */

static attn_ops ops_for_level(int level) {
  attn_ops o = {gemm_scalar, row_fwd_scalar, row_p_scalar, row_ds_scalar, dot_scalar};
#if QX_X86
  if (level >= QX_LEVEL_AVX512)
    o = (attn_ops){gemm_avx512, row_fwd_avx512, row_p_avx512, row_ds_avx512, dot_avx512};
  else if (level >= QX_LEVEL_AVX2)
    o = (attn_ops){gemm_avx2, row_fwd_avx2, row_p_avx2, row_ds_avx2, dot_avx2};
#else
  (void)level;
#endif
  return o;
}

/* ==== shared pieces ====================================================================== */
static int check_dims(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D) {
  if (B < 1 || T < 1 || Hq < 1 || Hkv < 1 || D < 2 || (D & 1) || Hq % Hkv) return 0;
  return 1;
}

/* Padding mask (B, T) -> additive key bias (B, T): 0 for real keys, -inf for padding. */
static float *key_bias(const uint8_t *mask, int64_t B, int64_t T) {
  if (!mask) return NULL;
  float *bias = (float *)malloc((size_t)(B * T) * sizeof(float));
  if (bias)
    for (int64_t i = 0; i < B * T; i++) bias[i] = mask[i] ? 0.0f : -INFINITY;
  return bias;
}

/* Segment ids (B, T) -> for each position the first position of its run of equal ids. */
static int64_t *run_starts(const int32_t *seg, int64_t B, int64_t T) {
  if (!seg) return NULL;
  int64_t *st = (int64_t *)malloc((size_t)(B * T) * sizeof(int64_t));
  if (st)
    for (int64_t b = 0; b < B; b++)
      for (int64_t t = 0; t < T; t++)
        st[b * T + t] = t > 0 && seg[b * T + t] == seg[b * T + t - 1] ? st[b * T + t - 1] : t;
  return st;
}

/* Tile of rows [j0, j0 + n) of x (row stride ld) packed transposed: xt[d * BC + c]. */
static void pack_transposed(const float *x, int64_t ld, int64_t n, int64_t D, float *xt) {
  for (int64_t c = 0; c < n; c++) {
    const float *row = x + c * ld;
    for (int64_t d = 0; d < D; d++) xt[d * BC + c] = row[d];
  }
  for (int64_t c = n; c < BC; c++)
    for (int64_t d = 0; d < D; d++) xt[d * BC + c] = 0.0f;
}

static int thread_count(int nthreads, int64_t items) {
  int nt = qx_threads(nthreads);
  if (nt > items) nt = (int)items;
  return nt < 1 ? 1 : nt;
}

/* ==== forward ============================================================================ */
int qx_attention_forward(const float *q, const float *k, const float *v, const uint8_t *mask,
                         const int32_t *segments, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, float *out,
                         float *lse, int nthreads) {
  if (!check_dims(B, T, Hq, Hkv, D)) return QX_E_ARG;
  const attn_ops ops = ops_for_level(qx_cpu_level());
  const int64_t group = Hq / Hkv, nqt = (T + BR - 1) / BR, nkt = (T + BC - 1) / BC;
  const float scale = (float)(1.0 / sqrt((double)D));
  const int64_t items = B * Hq * nqt;
  const int nt = thread_count(nthreads, items);

  /* Kt: every key tile of every (b, kv head) packed transposed, (B, Hkv, nkt, D, BC) */
  const size_t kt_len = (size_t)(B * Hkv * nkt) * (size_t)(D * BC);
  const size_t per_thread = (size_t)(BR * BC + BR * D + 2 * BR);
  float *work = (float *)malloc((kt_len + (size_t)nt * per_thread) * sizeof(float));
  float *bias = key_bias(mask, B, T);
  int64_t *starts = run_starts(segments, B, T);
  if (!work || (mask && !bias) || (segments && !starts)) {
    free(work);
    free(bias);
    free(starts);
    return QX_E_NOMEM;
  }
  float *kt_all = work;

#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < B * Hkv * nkt; i++) {
      const int64_t bk = i / nkt, jt = i % nkt, b = bk / Hkv, kvh = bk % Hkv;
      const int64_t j0 = jt * BC;
      pack_transposed(k + ((b * T + j0) * Hkv + kvh) * D, Hkv * D, min64(BC, T - j0), D,
                      kt_all + (size_t)i * (size_t)(D * BC));
    }

#ifdef _OPENMP
    float *mine = work + kt_len + (size_t)omp_get_thread_num() * per_thread;
#else
    float *mine = work + kt_len;
#endif
    float *S = mine;            /* (BR, BC) scores, then probabilities */
    float *O = S + BR * BC;     /* (BR, D) unnormalised output rows */
    float *mrow = O + BR * D;   /* (BR,) running max */
    float *lrow = mrow + BR;    /* (BR,) running sum */

    /* largest (latest) query tiles first: causal work grows with the tile index */
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; item++) {
      const int64_t it = nqt - 1 - item / (B * Hq), bh = item % (B * Hq);
      const int64_t b = bh / Hq, h = bh % Hq, kvh = h / group;
      const int64_t i0 = it * BR, rows = min64(BR, T - i0);
      const float *qi = q + ((b * T + i0) * Hq + h) * D;
      const float *bb = bias ? bias + b * T : NULL;
      const int64_t *st = starts ? starts + b * T + i0 : NULL; /* rows' run starts */
      for (int64_t r = 0; r < rows; r++) {
        mrow[r] = -INFINITY;
        lrow[r] = 0.0f;
      }
      memset(O, 0, (size_t)(rows * D) * sizeof(float));
      const int64_t last_key = i0 + rows - 1;
      for (int64_t jt = st ? st[0] / BC : 0; jt * BC <= last_key; jt++) {
        const int64_t j0 = jt * BC, ncols = min64(BC, T - j0);
        const float *ktile = kt_all + (size_t)((b * Hkv + kvh) * nkt + jt) * (size_t)(D * BC);
        const float *vj = v + ((b * T + j0) * Hkv + kvh) * D;
        /* rows in groups of G needing keys [c0, nmax) (see DG); a run starting inside the
           tile pair also takes groups, each beginning at its first row's start */
        const int split = j0 + ncols - 1 > i0 || (st && st[rows - 1] > j0);
        const int64_t G = split ? DG : rows;
        for (int64_t r0 = 0; r0 < rows; r0 += G) {
          const int64_t g = min64(G, rows - r0), nmax = clamp64(i0 + r0 + g - j0, 0, ncols);
          const int64_t c0 = st ? clamp64(st[r0] - j0, 0, nmax) : 0;
          if (c0 == nmax) continue; /* these rows see no key of this tile */
          ops.gemm(g, nmax - c0, D, qi + r0 * Hq * D, Hq * D, 1, ktile + c0, BC, S + r0 * BC + c0,
                   BC, 0);
          for (int64_t r = r0; r < r0 + g; r++) {
            const int64_t nv = clamp64(i0 + r - j0 + 1, 0, ncols);
            const int64_t lo = st ? clamp64(st[r] - j0, c0, nmax) : 0;
            float *s = S + r * BC;
            ops.row_fwd(s + lo, nmax - lo, nv > lo ? nv - lo : 0, bb ? bb + j0 + lo : NULL, scale,
                        &mrow[r], &lrow[r], O + r * D, D);
            for (int64_t c = c0; c < lo; c++) s[c] = 0.0f;
          }
          ops.gemm(g, D, nmax - c0, S + r0 * BC + c0, BC, 1, vj + c0 * Hkv * D, Hkv * D,
                   O + r0 * D, D, 1);
        }
      }
      for (int64_t r = 0; r < rows; r++) {
        float *orow = out + ((b * T + i0 + r) * Hq + h) * D;
        /* l is 0 for a row with no valid key (out 0, lse -inf), NaN for a poisoned row */
        const float l = lrow[r];
        const float inv = l == 0.0f ? 0.0f : 1.0f / l;
        for (int64_t d = 0; d < D; d++) orow[d] = O[r * D + d] * inv;
        lse[(b * Hq + h) * T + i0 + r] = l == 0.0f ? -INFINITY : mrow[r] + logf(l);
      }
    }
  }
  free(work);
  free(bias);
  free(starts);
  return QX_OK;
}

/* ==== backward =========================================================================== */
/* Wait until dQ tile `slot` has received the shares of key tiles 0 .. jt-1.  Items are handed
 * out in increasing order and a share only waits for earlier key tiles, whose items are
 * already running, so this always ends; it rarely waits at all, because items of one key
 * tile index cover every (b, kv head) before the next index starts. */
static void wait_turn(const int64_t *turn, int64_t jt) {
  unsigned spins = 0;
  while (__atomic_load_n(turn, __ATOMIC_ACQUIRE) != jt) {
#if QX_X86
    __builtin_ia32_pause();
#endif
    if (++spins % 1024 == 0) sched_yield(); /* the writer may be descheduled (busy host) */
  }
}

int qx_attention_backward(const float *q, const float *k, const float *v, const float *out,
                          const float *lse, const float *dout, const uint8_t *mask,
                          const int32_t *segments, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, float *dq, float *dk,
                          float *dv, int nthreads) {
  if (!check_dims(B, T, Hq, Hkv, D)) return QX_E_ARG;
  const attn_ops ops = ops_for_level(qx_cpu_level());
  const int64_t group = Hq / Hkv, nqt = (T + BR - 1) / BR, nkt = (T + BC - 1) / BC;
  const float scale = (float)(1.0 / sqrt((double)D));
  const int64_t items = B * Hkv * nkt;
  const int nt = thread_count(nthreads, items);

  /* Di (B, Hq, T) = rowsum(dout * out): the softmax backward's per-row term.
   * turn (B, Hq, nqt): the next key tile whose dQ share a query tile takes.  Shares are
   * added in key-tile order, so dq is bit-for-bit the same for any thread count. */
  const size_t di_len = (size_t)(B * Hq * T);
  const size_t per_thread = (size_t)(2 * D * BC + 2 * BC * D + 2 * BR * BC + BR * D);
  float *work = (float *)malloc((di_len + (size_t)nt * per_thread) * sizeof(float));
  int64_t *turn = (int64_t *)calloc((size_t)(B * Hq * nqt), sizeof(int64_t));
  float *bias = key_bias(mask, B, T);
  int64_t *starts = run_starts(segments, B, T);
  if (!work || !turn || (mask && !bias) || (segments && !starts)) {
    free(work);
    free(turn);
    free(bias);
    free(starts);
    return QX_E_NOMEM;
  }
  /* a query tile's first dQ share comes from the key tile of its first row's run start */
  if (starts)
    for (int64_t i = 0; i < B * Hq * nqt; i++) {
      const int64_t b = i / (Hq * nqt), it = i % nqt;
      turn[i] = starts[b * T + it * BR] / BC;
    }
  float *Di = work;
  int64_t next_item = 0;

#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(dynamic, 16)
    for (int64_t bt = 0; bt < B * T; bt++) {
      const int64_t b = bt / T, t = bt % T;
      for (int64_t h = 0; h < Hq; h++) {
        const size_t off = (size_t)((bt * Hq + h) * D);
        Di[(b * Hq + h) * T + t] = ops.dot(dout + off, out + off, D);
      }
    }

#ifdef _OPENMP
    float *mine = work + di_len + (size_t)omp_get_thread_num() * per_thread;
#else
    float *mine = work + di_len;
#endif
    float *Kt = mine;              /* (D, BC) key tile transposed */
    float *Vt = Kt + D * BC;       /* (D, BC) value tile transposed */
    float *dK = Vt + D * BC;       /* (BC, D) */
    float *dV = dK + BC * D;       /* (BC, D) */
    float *P = dV + BC * D;        /* (BR, BC) probabilities */
    float *dS = P + BR * BC;       /* (BR, BC) dP, then dS */
    float *dQt = dS + BR * BC;     /* (BR, D) this key tile's share of dQ */

    /* items in increasing order (wait_turn relies on it): key tile index major, so the
     * earliest key tiles, which see the most query rows, start first */
    for (;;) {
      int64_t item;
#pragma omp atomic capture
      item = next_item++;
      if (item >= items) break;
      const int64_t jt = item / (B * Hkv), bk = item % (B * Hkv);
      const int64_t b = bk / Hkv, kvh = bk % Hkv;
      const int64_t j0 = jt * BC, ncols = min64(BC, T - j0);
      const float *kj = k + ((b * T + j0) * Hkv + kvh) * D, *vj = v + ((b * T + j0) * Hkv + kvh) * D;
      const float *bb = bias ? bias + b * T + j0 : NULL;
      const int64_t *sb = starts ? starts + b * T : NULL;
      pack_transposed(kj, Hkv * D, ncols, D, Kt);
      pack_transposed(vj, Hkv * D, ncols, D, Vt);
      memset(dK, 0, (size_t)(ncols * D) * sizeof(float));
      memset(dV, 0, (size_t)(ncols * D) * sizeof(float));
      for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
        /* query tiles from the diagonal to the last whose first row's run starts in or
           before this key tile */
        for (int64_t it = j0 / BR; it < nqt && (!sb || sb[it * BR] < j0 + ncols); it++) {
          const int64_t i0 = it * BR, rows = min64(BR, T - i0);
          const int64_t *st = sb ? sb + i0 : NULL; /* rows' run starts */
          const float *qi = q + ((b * T + i0) * Hq + h) * D;
          const float *doi = dout + ((b * T + i0) * Hq + h) * D;
          const float *lse_i = lse + (b * Hq + h) * T + i0, *di = Di + (b * Hq + h) * T + i0;
          /* query rows in groups of G needing keys [0, nmax); keys in groups of G seen
             by rows [rs, rows) (see DG) */
          const int split = j0 + ncols - 1 > i0 || (st && st[rows - 1] > j0);
          const int64_t G = split ? DG : (rows > ncols ? rows : ncols);
          for (int64_t r0 = 0; r0 < rows; r0 += G) {
            const int64_t g = min64(G, rows - r0), nmax = clamp64(i0 + r0 + g - j0, 0, ncols);
            const int64_t c0 = st ? clamp64(st[r0] - j0, 0, nmax) : 0;
            float *Pg = P + r0 * BC + c0, *dSg = dS + r0 * BC + c0;
            /* S = Q Kt, dP = dO Vt over the keys [c0, nmax) these rows may see */
            ops.gemm(g, nmax - c0, D, qi + r0 * Hq * D, Hq * D, 1, Kt + c0, BC, Pg, BC, 0);
            ops.gemm(g, nmax - c0, D, doi + r0 * Hq * D, Hq * D, 1, Vt + c0, BC, dSg, BC, 0);
            for (int64_t r = r0; r < r0 + g; r++) {
              /* P and dS are 0 outside the row's valid keys, up to ncols, for the products below */
              const int64_t nv = clamp64(i0 + r - j0 + 1, 0, ncols);
              const int64_t lo = st ? clamp64(st[r] - j0, c0, nmax) : 0;
              float *p = P + r * BC, *ds = dS + r * BC;
              ops.row_p(p + lo, ncols - lo, nv > lo ? nv - lo : 0, bb ? bb + lo : NULL, scale, lse_i[r]);
              ops.row_ds(p + lo, ds + lo, nmax - lo, di[r], scale);
              for (int64_t c = 0; c < lo; c++) p[c] = ds[c] = 0.0f;
              for (int64_t c = nmax; c < ncols; c++) ds[c] = 0.0f;
            }
            ops.gemm(g, D, nmax - c0, dSg, BC, 1, kj + c0 * Hkv * D, Hkv * D, dQt + r0 * D, D,
                     0); /* dQ share = dS K */
          }
          for (int64_t c0 = 0; c0 < ncols; c0 += G) {
            const int64_t gc = min64(G, ncols - c0), rs = clamp64(j0 + c0 - i0, 0, rows);
            int64_t re = rows; /* rows past the run of the group's last key see none of it */
            while (st && re > rs && st[re - 1] > j0 + c0 + gc - 1) re--;
            if (rs == re) continue;
            ops.gemm(gc, D, re - rs, P + rs * BC + c0, 1, BC, doi + rs * Hq * D, Hq * D,
                     dV + c0 * D, D, 1);                                   /* dV += P^T dO */
            ops.gemm(gc, D, re - rs, dS + rs * BC + c0, 1, BC, qi + rs * Hq * D, Hq * D,
                     dK + c0 * D, D, 1);                                   /* dK += dS^T Q */
          }
          /* the first key tile a query tile sees (tile 0, or its first row's run start)
             initialises dq */
          float *dqi = dq + ((b * T + i0) * Hq + h) * D;
          int64_t *slot = turn + (b * Hq + h) * nqt + it;
          wait_turn(slot, jt);
          for (int64_t r = 0; r < rows; r++) {
            float *dst = dqi + r * Hq * D;
            const float *src = dQt + r * D;
            if (jt == (st ? st[0] / BC : 0)) memcpy(dst, src, (size_t)D * sizeof(float));
            else for (int64_t d = 0; d < D; d++) dst[d] += src[d];
          }
          __atomic_store_n(slot, jt + 1, __ATOMIC_RELEASE);
        }
      }
      for (int64_t c = 0; c < ncols; c++) {
        memcpy(dk + ((b * T + j0 + c) * Hkv + kvh) * D, dK + c * D, (size_t)D * sizeof(float));
        memcpy(dv + ((b * T + j0 + c) * Hkv + kvh) * D, dV + c * D, (size_t)D * sizeof(float));
      }
    }
  }
  free(work);
  free(turn);
  free(bias);
  free(starts);
  return QX_OK;
}
