/* Products with a frozen weight, NF4 decoded inside the GEMM (or float32 rows read as they
 * are: the LM head); see nf4_matmul.h for the contract.
 *
 * Both directions run one micro-kernel: a tile[MR][NR] = sum over a depth of
 * broadcast(A[r][k]) * B[k][0..NR), A row-major with a leading dimension, B a packed panel
 * of NR lanes per depth step (bf16: one depth step is a PAIR of elements, as vdpbf16ps takes).
 *   y = x Wᵀ:  A = decoded W rows (MR out features, natural order: no transpose of W), B = x
 *              packed across NR activation rows; the tile is yᵀ and is stored transposed.
 *   dx = dy W: A = dy rows, B = W decoded across NR in-features (two W rows interleaved per
 *              bf16 pair); the tile is dx in natural order.
 * Transposing the activations (N x depth) costs less than transposing W (out x in), and the
 * transposed store touches each output once.  The whole depth is summed in registers: the
 * panels of the step's shapes (depth <= 1536) stay in L2. */
#include "nf4_matmul.h"

#include <stdlib.h>
#include <string.h>

#include "nf4.h"

#if QX_X86
#include <immintrin.h>
#define QX_TARGET_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#endif

/* The weight: NF4 (packed, absmax, block shift sh) or, with dense set, float32 rows; element
   e = o * I + i either way (dense rows are contiguous). */
typedef struct {
  const uint8_t *packed;
  const float *absmax;
  int sh;
  const float *dense;
} wsrc;

#define MR 12 /* broadcast rows per tile: 24 accumulators + 2 panel vectors + 1 broadcast */
#define NR 32 /* panel lanes per tile (two zmm) */

static int blocksize_shift(int64_t bs) {
  if (bs < 32 || bs > 4096 || (bs & (bs - 1))) return -1;
  int s = 0;
  while ((1LL << s) < bs) s++;
  return s;
}

/* Element e = o * I + i of W: NF4-decoded, or read from the float32 rows. */
static inline float w_at(const wsrc *W, int64_t e) {
  if (W->dense) return W->dense[e];
  uint8_t byte = W->packed[e >> 1];
  uint8_t q = (e & 1) ? (byte & 0x0F) : (byte >> 4);
  return qx_nf4_code[q] * W->absmax[e >> W->sh];
}

/* float32 -> bf16, round to nearest even; NaN stays a (quiet) NaN. */
static inline uint16_t bf16_rne(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return qx_bf16_to_f32(bf16_rne(f)); }

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static void *alloc64(size_t bytes) {
  return aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
}

/* ---- scalar reference ------------------------------------------------------------------ */
/* Sequential fp32 sums in depth order.  Parallel over out features (xwt) or in-feature
   column chunks (xw), so no thread decodes what another one does. */
static int xwt_scalar(const float *x, int64_t ldx, const wsrc *W, int64_t n, int64_t O, int64_t I, float *y, int64_t ldy, int bf16,
                      int nt) {
  int failed = 0;
#pragma omp parallel num_threads(nt)
  {
    float *wrow = (float *)malloc((size_t)(I > 0 ? I : 1) * sizeof(float));
    if (!wrow) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t o = 0; o < O; o++) {
      if (!wrow) continue;
      for (int64_t i = 0; i < I; i++) {
        float w = w_at(W, o * I + i);
        wrow[i] = bf16 ? round_bf16(w) : w;
      }
      for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * ldx;
        float acc = 0.0f;
        if (bf16)
          for (int64_t i = 0; i < I; i++) acc += round_bf16(xr[i]) * wrow[i];
        else
          for (int64_t i = 0; i < I; i++) acc += xr[i] * wrow[i];
        y[r * ldy + o] = acc;
      }
    }
    free(wrow);
  }
  return failed ? QX_E_NOMEM : QX_OK;
}

static int xw_scalar(const float *dy, int64_t lddy, const wsrc *W,
                      int64_t n, int64_t O, int64_t I, float *dx, int64_t lddx, int bf16,
                     int nt) {
  const int64_t chunk = 256, nchunks = ceil_div(I, chunk);
  int failed = 0;
#pragma omp parallel num_threads(nt)
  {
    float *wrow = (float *)malloc(chunk * sizeof(float));
    if (!wrow) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; c++) {
      if (!wrow) continue;
      int64_t i0 = c * chunk, len = I - i0 < chunk ? I - i0 : chunk;
      for (int64_t r = 0; r < n; r++) memset(dx + r * lddx + i0, 0, (size_t)len * sizeof(float));
      for (int64_t o = 0; o < O; o++) {
        for (int64_t i = 0; i < len; i++) {
          float w = w_at(W, o * I + i0 + i);
          wrow[i] = bf16 ? round_bf16(w) : w;
        }
        for (int64_t r = 0; r < n; r++) {
          float a = bf16 ? round_bf16(dy[r * lddy + o]) : dy[r * lddy + o];
          float *d = dx + r * lddx + i0;
          for (int64_t i = 0; i < len; i++) d[i] += a * wrow[i];
        }
      }
    }
    free(wrow);
  }
  return failed ? QX_E_NOMEM : QX_OK;
}

#if QX_X86
/* ---- AVX-512: decode, rounding ---------------------------------------------------------- */
/* 16 weights from element e0 (even: whole bytes); they span at most two blocks (>= 32). */
QX_TARGET_AVX512 static inline __m512 decode16(const wsrc *W, int64_t e0) {
  const __m512 lut = _mm512_loadu_ps(qx_nf4_code);
  const __m128i m4 = _mm_set1_epi8(0x0F);
  __m128i b = _mm_loadl_epi64((const __m128i *)(W->packed + (e0 >> 1)));
  __m128i hn = _mm_and_si128(_mm_srli_epi16(b, 4), m4), ln = _mm_and_si128(b, m4);
  __m512 v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hn, ln)), lut);
  const int sh = W->sh;
  int64_t b0 = e0 >> sh, b1 = (e0 + 15) >> sh;
  __m512 am = _mm512_set1_ps(W->absmax[b0]);
  if (b1 != b0) {
    int split = (int)((b1 << sh) - e0); /* first lane in block b1 */
    am = _mm512_mask_blend_ps((__mmask16)(0xFFFFu << split), am, _mm512_set1_ps(W->absmax[b1]));
  }
  return _mm512_mul_ps(v, am);
}

/* Round 16 floats to bf16 values kept as floats (the AVX-512 path of QX_MM_BF16). */
QX_TARGET_AVX512 static inline __m512 round16_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
}

/* out[0..len) = W elements e0.., rounded to bf16 values when `bf16`. */
QX_TARGET_AVX512 static void decode_run_f32(const wsrc *W, int64_t e0, int64_t len, int bf16,
                                            float *out) {
  int64_t i = 0;
  if (W->dense) {
    const float *src = W->dense + e0;
    for (; i + 16 <= len; i += 16) {
      __m512 v = _mm512_loadu_ps(src + i);
      _mm512_storeu_ps(out + i, bf16 ? round16_bf16(v) : v);
    }
  } else if (!(e0 & 1)) {
    for (; i + 16 <= len; i += 16) {
      __m512 v = decode16(W, e0 + i);
      _mm512_storeu_ps(out + i, bf16 ? round16_bf16(v) : v);
    }
  }
  for (; i < len; i++) {
    float w = w_at(W, e0 + i);
    out[i] = bf16 ? round_bf16(w) : w;
  }
}

/* Copy of a float row rounded to bf16 values (len elements). */
QX_TARGET_AVX512 static void round_row_f32(const float *src, int64_t len, float *dst) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) _mm512_storeu_ps(dst + i, round16_bf16(_mm512_loadu_ps(src + i)));
  for (; i < len; i++) dst[i] = round_bf16(src[i]);
}

/* ---- micro-kernels ---------------------------------------------------------------------- */
/* tile[r][0..NR) = sum_k a[r*lda + k] * b[k*NR + 0..NR), r < mr (fp32 FMA). */
QX_TARGET_AVX512 static inline __attribute__((always_inline)) void
mk_f32_body(const float *a, int64_t lda, const float *b, int64_t depth, const int mr, float *tile) {
  __m512 c0[MR], c1[MR];
  for (int r = 0; r < mr; r++) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; k++) {
    __m512 b0 = _mm512_loadu_ps(b + k * NR), b1 = _mm512_loadu_ps(b + k * NR + 16);
    for (int r = 0; r < mr; r++) {
      __m512 av = _mm512_set1_ps(a[r * lda + k]);
      c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
    }
  }
  for (int r = 0; r < mr; r++) {
    _mm512_storeu_ps(tile + r * NR, c0[r]);
    _mm512_storeu_ps(tile + r * NR + 16, c1[r]);
  }
}

#define QX_MR_CASES(BODY)                                                                   \
  switch (mr) {                                                                             \
    case 1: BODY(1); break;  case 2: BODY(2); break;  case 3: BODY(3); break;               \
    case 4: BODY(4); break;  case 5: BODY(5); break;  case 6: BODY(6); break;               \
    case 7: BODY(7); break;  case 8: BODY(8); break;  case 9: BODY(9); break;               \
    case 10: BODY(10); break; case 11: BODY(11); break; default: BODY(12); break;           \
  }

QX_TARGET_AVX512 static void mk_f32(const float *a, int64_t lda, const float *b, int64_t depth,
                                    int mr, float *tile) {
#define QX_BODY(M) mk_f32_body(a, lda, b, depth, M, tile)
  QX_MR_CASES(QX_BODY)
#undef QX_BODY
}

/* As mk_f32 with bf16 pairs: a and b hold two bf16 per uint32, depth counts pairs. */
QX_TARGET_AVX512BF16 static inline __attribute__((always_inline)) void
mk_bf16_body(const uint32_t *a, int64_t lda, const uint32_t *b, int64_t depth, const int mr,
             float *tile) {
  __m512 c0[MR], c1[MR];
  for (int r = 0; r < mr; r++) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; k++) {
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + k * NR);
    __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + k * NR + 16);
    for (int r = 0; r < mr; r++) {
      __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[r * lda + k]);
      c0[r] = _mm512_dpbf16_ps(c0[r], av, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], av, b1);
    }
  }
  for (int r = 0; r < mr; r++) {
    _mm512_storeu_ps(tile + r * NR, c0[r]);
    _mm512_storeu_ps(tile + r * NR + 16, c1[r]);
  }
}

QX_TARGET_AVX512BF16 static void mk_bf16(const uint32_t *a, int64_t lda, const uint32_t *b,
                                         int64_t depth, int mr, float *tile) {
#define QX_BODY(M) mk_bf16_body(a, lda, b, depth, M, tile)
  QX_MR_CASES(QX_BODY)
#undef QX_BODY
}

/* ---- bf16 pair packing (AVX512-BF16) ---------------------------------------------------- */
/* dst[0..ceil(len/2)) = bf16 pairs of src[0..len), the odd tail paired with zero. */
QX_TARGET_AVX512BF16 static void pairs_of_row(const float *src, int64_t len, uint32_t *dst) {
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    __m512bh p = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i / 2, (__m512i)p);
  }
  for (; i < len; i += 2) {
    uint32_t lo = bf16_rne(src[i]), hi = i + 1 < len ? bf16_rne(src[i + 1]) : 0;
    dst[i / 2] = lo | (hi << 16);
  }
}

/* 16 lanes of (bf16(r0[j]) low, bf16(r1[j]) high). */
QX_TARGET_AVX512BF16 static inline __m512i interleave_pairs(__m512 r0, __m512 r1) {
  __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(r0));
  __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(r1));
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

/* ---- y = x Wᵀ ----------------------------------------------------------------------------- */
/* Tile yᵀ[r][l] -> y[(n0 + l) * ldy + o0 + r]. */
static inline void store_transposed(const float *tile, int mr, int64_t n0, int64_t nl, int64_t o0,
                                    int64_t ldy, float *y) {
  for (int64_t l = 0; l < nl; l++) {
    float *dst = y + (n0 + l) * ldy + o0;
    for (int r = 0; r < mr; r++) dst[r] = tile[r * NR + l];
  }
}

/* Transposed activation panel: strip s holds lanes n = s*NR + l, depth `dep` steps of `wpe`
   words (1 float or 1 bf16 pair).  Rows past N stay zero. */
QX_TARGET_AVX512BF16 static void xpanel_bf16_rows(const float *x, int64_t ldx, int64_t r0,
                                                  int64_t r1, int64_t I, int64_t Ih, uint32_t *xp,
                                                  uint32_t *rowbuf) {
  for (int64_t r = r0; r < r1; r++) {
    pairs_of_row(x + r * ldx, I, rowbuf);
    uint32_t *dst = xp + (r / NR) * Ih * NR + (r % NR);
    for (int64_t k = 0; k < Ih; k++) dst[k * NR] = rowbuf[k];
  }
}

QX_TARGET_AVX512 static void xpanel_f32_rows(const float *x, int64_t ldx, int64_t r0, int64_t r1,
                                             int64_t I, int bf16, float *xp, float *rowbuf) {
  for (int64_t r = r0; r < r1; r++) {
    const float *src = x + r * ldx;
    if (bf16) {
      round_row_f32(src, I, rowbuf);
      src = rowbuf;
    }
    float *dst = xp + (r / NR) * I * NR + (r % NR);
    for (int64_t k = 0; k < I; k++) dst[k * NR] = src[k];
  }
}

static int xwt_avx512(const float *x, int64_t ldx, const wsrc *W, int64_t n, int64_t O, int64_t I, float *y, int64_t ldy, int mode,
                      int native_bf16, int nt) {
  const int pairs = mode == QX_MM_BF16 && native_bf16;
  const int round = mode == QX_MM_BF16 && !native_bf16;
  const int64_t nstrips = ceil_div(n, NR), Ih = ceil_div(I, 2);
  const int64_t depth = pairs ? Ih : I;               /* words per panel row */
  const size_t wsz = 4;                               /* float or uint32 pair */
  void *xp = alloc64((size_t)nstrips * depth * NR * wsz);
  if (!xp) return QX_E_NOMEM;
  memset(xp, 0, (size_t)nstrips * depth * NR * wsz);
  const int64_t oblocks = ceil_div(O, MR);
  if (nt > oblocks) nt = (int)oblocks;
  int failed = 0;
#pragma omp parallel num_threads(nt)
  {
    /* per thread: one decoded row (I + 1 floats, and its pairs) and MR rows of W */
    float *rowbuf = (float *)alloc64((size_t)(I + 32) * 4);
    void *wr = alloc64((size_t)MR * depth * wsz);
    float tile[MR * NR];
    const int ok = rowbuf && wr;
    if (!ok) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t s = 0; s < nstrips; s++) {
      if (!ok) continue;
      int64_t r0 = s * NR, r1 = r0 + NR < n ? r0 + NR : n;
      if (pairs)
        xpanel_bf16_rows(x, ldx, r0, r1, I, Ih, (uint32_t *)xp, (uint32_t *)rowbuf);
      else
        xpanel_f32_rows(x, ldx, r0, r1, I, round, (float *)xp, rowbuf);
    }
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
    for (int64_t ob = 0; ob < oblocks; ob++) {
      if (!ok) continue;
      int64_t o0 = ob * MR;
      int mr = (int)(O - o0 < MR ? O - o0 : MR);
      for (int r = 0; r < mr; r++) {
        if (pairs) {
          decode_run_f32(W, (o0 + r) * I, I, 0, rowbuf);
          pairs_of_row(rowbuf, I, (uint32_t *)wr + r * depth);
        } else {
          decode_run_f32(W, (o0 + r) * I, I, round, (float *)wr + r * depth);
        }
      }
      for (int64_t s = 0; s < nstrips; s++) {
        if (pairs)
          mk_bf16((const uint32_t *)wr, depth, (const uint32_t *)xp + s * depth * NR, depth, mr, tile);
        else
          mk_f32((const float *)wr, depth, (const float *)xp + s * depth * NR, depth, mr, tile);
        int64_t n0 = s * NR, nl = n - n0 < NR ? n - n0 : NR;
        store_transposed(tile, mr, n0, nl, o0, ldy, y);
      }
    }
    free(rowbuf);
    free(wr);
  }
  free(xp);
  return failed ? QX_E_NOMEM : QX_OK;
}

/* A few activation rows (generation: one token at a time): a 32-lane tile would waste most of
   its lanes, so lanes run along the depth instead; each W row is decoded once and dotted with
   every x row (x rounded once up front in bf16 mode; bf16 products are exact in fp32, so the
   FMAs compute the same function). */
#define FEW_ROWS 8

QX_TARGET_AVX512 static int xwt_few_rows(const float *x, int64_t ldx, const wsrc *W,
                                          int64_t n, int64_t O,
                                         int64_t I, float *y, int64_t ldy, int bf16, int nt) {
  float *xr = NULL;
  if (bf16) {
    xr = (float *)alloc64((size_t)n * I * 4);
    if (!xr) return QX_E_NOMEM;
    for (int64_t r = 0; r < n; r++) round_row_f32(x + r * ldx, I, xr + r * I);
    x = xr;
    ldx = I;
  }
  if (nt > O / 16) nt = O / 16 > 0 ? (int)(O / 16) : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t o = 0; o < O; o++) {
    const int64_t e0 = o * I;
    __m512 acc[FEW_ROWS];
    for (int r = 0; r < n; r++) acc[r] = _mm512_setzero_ps();
    int64_t i = 0;
    if (W->dense || !(e0 & 1))
      for (; i + 16 <= I; i += 16) {
        __m512 w = W->dense ? _mm512_loadu_ps(W->dense + e0 + i) : decode16(W, e0 + i);
        if (bf16) w = round16_bf16(w);
        for (int r = 0; r < n; r++) acc[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + r * ldx + i), acc[r]);
      }
    for (int r = 0; r < n; r++) {
      float sum = _mm512_reduce_add_ps(acc[r]);
      for (int64_t j = i; j < I; j++) {
        float w = w_at(W, e0 + j);
        sum += (bf16 ? round_bf16(w) : w) * x[r * ldx + j];
      }
      y[r * ldy + o] = sum;
    }
  }
  free(xr);
  return QX_OK;
}

/* ---- dx = dy W ---------------------------------------------------------------------------- */
/* W panel of in-features p0..p0+NR over all O rows; columns past I are zero. */
QX_TARGET_AVX512 static void wpanel_f32(const wsrc *W, 
                                        int64_t O, int64_t I, int64_t p0, int round, float *bp) {
  int64_t w = I - p0 < NR ? I - p0 : NR;
  for (int64_t o = 0; o < O; o++) {
    float *dst = bp + o * NR;
    decode_run_f32(W, o * I + p0, w, round, dst);
    for (int64_t c = w; c < NR; c++) dst[c] = 0.0f;
  }
}

QX_TARGET_AVX512BF16 static void wpanel_bf16(const wsrc *W, 
                                             int64_t O, int64_t I, int64_t p0, uint32_t *bp) {
  int64_t w = I - p0 < NR ? I - p0 : NR;
  float rows[2][NR];
  for (int64_t kp = 0; kp < ceil_div(O, 2); kp++) {
    for (int h = 0; h < 2; h++) {
      int64_t o = 2 * kp + h;
      if (o < O) decode_run_f32(W, o * I + p0, w, 0, rows[h]);
      for (int64_t c = o < O ? w : 0; c < NR; c++) rows[h][c] = 0.0f;
    }
    uint32_t *dst = bp + kp * NR;
    _mm512_storeu_si512(dst, interleave_pairs(_mm512_loadu_ps(rows[0]), _mm512_loadu_ps(rows[1])));
    _mm512_storeu_si512(dst + 16, interleave_pairs(_mm512_loadu_ps(rows[0] + 16),
                                                   _mm512_loadu_ps(rows[1] + 16)));
  }
}

static int xw_avx512(const float *dy, int64_t lddy, const wsrc *W,
                      int64_t n, int64_t O, int64_t I, float *dx, int64_t lddx, int mode,
                     int native_bf16, int nt) {
  const int pairs = mode == QX_MM_BF16 && native_bf16;
  const int round = mode == QX_MM_BF16 && !native_bf16;
  const int64_t Oh = ceil_div(O, 2), depth = pairs ? Oh : O;
  const int64_t pstrips = ceil_div(I, NR);
  /* the broadcast operand: dy itself (exact), rounded (AVX-512 bf16), or bf16 pairs */
  void *a = NULL;
  if (pairs || round) {
    a = alloc64((size_t)n * depth * 4);
    if (!a) return QX_E_NOMEM;
  }
  const void *A = a ? (const void *)a : (const void *)dy;
  const int64_t lda = a ? depth : lddy;
  if (nt > pstrips) nt = (int)pstrips;
  int failed = 0;
#pragma omp parallel num_threads(nt)
  {
    void *bp = alloc64((size_t)depth * NR * 4);
    float tile[MR * NR];
    if (!bp) {
#pragma omp atomic write
      failed = 1;
    }
    if (a) {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < n; r++) {
        if (pairs)
          pairs_of_row(dy + r * lddy, O, (uint32_t *)a + r * depth);
        else
          round_row_f32(dy + r * lddy, O, (float *)a + r * depth);
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t ps = 0; ps < pstrips; ps++) {
      if (!bp) continue;
      int64_t p0 = ps * NR, w = I - p0 < NR ? I - p0 : NR;
      if (pairs)
        wpanel_bf16(W, O, I, p0, (uint32_t *)bp);
      else
        wpanel_f32(W, O, I, p0, round, (float *)bp);
      for (int64_t n0 = 0; n0 < n; n0 += MR) {
        int mr = (int)(n - n0 < MR ? n - n0 : MR);
        if (pairs)
          mk_bf16((const uint32_t *)A + n0 * lda, lda, (const uint32_t *)bp, depth, mr, tile);
        else
          mk_f32((const float *)A + n0 * lda, lda, (const float *)bp, depth, mr, tile);
        for (int r = 0; r < mr; r++)
          memcpy(dx + (n0 + r) * lddx + p0, tile + r * NR, (size_t)w * sizeof(float));
      }
    }
    free(bp);
  }
  free(a);
  return failed ? QX_E_NOMEM : QX_OK;
}
#endif /* QX_X86 */

/* ---- entry points ----------------------------------------------------------------------- */
static int check_shape(int64_t n, int64_t out_f, int64_t in_f, int mode) {
  if (n < 0 || out_f < 0 || in_f < 0) return QX_E_ARG;
  if (mode != QX_MM_F32 && mode != QX_MM_BF16) return QX_E_ARG;
  /* every element index (and the panels' sizes) must fit in int64 */
  const int64_t lim = (int64_t)1 << 40;
  if (n > lim || out_f > lim || in_f > lim) return QX_E_SIZE;
  if (out_f && in_f > INT64_MAX / 8 / out_f) return QX_E_SIZE;
  if (n && (in_f + NR) > INT64_MAX / 8 / (n + NR)) return QX_E_SIZE;
  if (n && (out_f + NR) > INT64_MAX / 8 / (n + NR)) return QX_E_SIZE;
  return QX_OK;
}

static int matmul_xwt(const float *x, int64_t ldx, const wsrc *W, int64_t n, int64_t out_f,
                      int64_t in_f, float *y, int64_t ldy, int mode, int nthreads) {
  int rc = check_shape(n, out_f, in_f, mode);
  if (rc != QX_OK) return rc;
  if (ldx < in_f || ldy < out_f || (n && (ldx > INT64_MAX / 8 / n || ldy > INT64_MAX / 8 / n)))
    return QX_E_SIZE;
  if (n == 0 || out_f == 0) return QX_OK;
  if (in_f == 0) {
    for (int64_t r = 0; r < n; r++) memset(y + r * ldy, 0, (size_t)out_f * sizeof(float));
    return QX_OK;
  }
  int nt = qx_threads(nthreads);
  const int level = qx_cpu_level();
#if QX_X86
  if (level >= QX_LEVEL_AVX512 && n <= FEW_ROWS)
    return xwt_few_rows(x, ldx, W, n, out_f, in_f, y, ldy, mode == QX_MM_BF16, nt);
  if (level >= QX_LEVEL_AVX512)
    return xwt_avx512(x, ldx, W, n, out_f, in_f, y, ldy, mode, level >= QX_LEVEL_AVX512_BF16, nt);
#endif
  (void)level;
  return xwt_scalar(x, ldx, W, n, out_f, in_f, y, ldy, mode == QX_MM_BF16,
                    nt > out_f ? (int)out_f : nt);
}

static int matmul_xw(const float *dy, int64_t lddy, const wsrc *W, int64_t n, int64_t out_f,
                     int64_t in_f, float *dx, int64_t lddx, int mode, int nthreads) {
  int rc = check_shape(n, out_f, in_f, mode);
  if (rc != QX_OK) return rc;
  if (lddy < out_f || lddx < in_f || (n && (lddy > INT64_MAX / 8 / n || lddx > INT64_MAX / 8 / n)))
    return QX_E_SIZE;
  if (n == 0 || in_f == 0) return QX_OK;
  if (out_f == 0) {
    for (int64_t r = 0; r < n; r++) memset(dx + r * lddx, 0, (size_t)in_f * sizeof(float));
    return QX_OK;
  }
  int nt = qx_threads(nthreads);
  const int level = qx_cpu_level();
#if QX_X86
  if (level >= QX_LEVEL_AVX512)
    return xw_avx512(dy, lddy, W, n, out_f, in_f, dx, lddx, mode, level >= QX_LEVEL_AVX512_BF16, nt);
#endif
  (void)level;
  return xw_scalar(dy, lddy, W, n, out_f, in_f, dx, lddx, mode == QX_MM_BF16, nt);
}

int qx_nf4_matmul_xwt(const float *x, int64_t ldx, const uint8_t *packed, const float *absmax,
                      int64_t blocksize, int64_t n, int64_t out_f, int64_t in_f, float *y,
                      int64_t ldy, int mode, int nthreads) {
  const wsrc W = {packed, absmax, blocksize_shift(blocksize), NULL};
  if (W.sh < 0) return QX_E_ARG;
  return matmul_xwt(x, ldx, &W, n, out_f, in_f, y, ldy, mode, nthreads);
}

int qx_nf4_matmul_xw(const float *dy, int64_t lddy, const uint8_t *packed, const float *absmax,
                     int64_t blocksize, int64_t n, int64_t out_f, int64_t in_f, float *dx,
                     int64_t lddx, int mode, int nthreads) {
  const wsrc W = {packed, absmax, blocksize_shift(blocksize), NULL};
  if (W.sh < 0) return QX_E_ARG;
  return matmul_xw(dy, lddy, &W, n, out_f, in_f, dx, lddx, mode, nthreads);
}

int qx_dense_matmul_xwt(const float *x, int64_t ldx, const float *w, int64_t n, int64_t out_f,
                        int64_t in_f, float *y, int64_t ldy, int mode, int nthreads) {
  const wsrc W = {NULL, NULL, 0, w};
  return matmul_xwt(x, ldx, &W, n, out_f, in_f, y, ldy, mode, nthreads);
}

int qx_dense_matmul_xw(const float *dy, int64_t lddy, const float *w, int64_t n, int64_t out_f,
                       int64_t in_f, float *dx, int64_t lddx, int mode, int nthreads) {
  const wsrc W = {NULL, NULL, 0, w};
  return matmul_xw(dy, lddy, &W, n, out_f, in_f, dx, lddx, mode, nthreads);
}
